"""Training options: the learning rate defaults per decoder and survives the config round trip."""

from __future__ import annotations

from cryoscape.train.abinit import AbinitConfig
from cryoscape.train.config import DEFAULT_LEARNING_RATES, TrainConfig


def test_default_learning_rate_depends_on_the_decoder():
    assert TrainConfig().lr == DEFAULT_LEARNING_RATES["neural_field"] == 4e-4
    assert TrainConfig(decoder="basis").lr == 1e-4  # its voxels learn at voxel_lr_scale times this
    assert TrainConfig(lr=2e-3).lr == 2e-3  # an explicit --lr wins
    assert AbinitConfig().lr == 1e-3  # ab initio keeps its own default


def test_resolved_learning_rate_round_trips():
    config = TrainConfig(decoder="basis")
    again = TrainConfig.from_dict(config.to_dict())
    assert again.lr == config.lr == 1e-4 and again.decoder == "basis"
