"""Training options: learning rate and batch size default per decoder and survive the config round trip."""

from __future__ import annotations

import pytest

from cryoscape.train.abinit import AbinitConfig
from cryoscape.train.config import DEFAULT_BATCH_SIZES, DEFAULT_LEARNING_RATES, TrainConfig


def test_default_learning_rate_depends_on_the_decoder():
    assert TrainConfig().lr == DEFAULT_LEARNING_RATES["neural_field"] == 4e-4
    assert TrainConfig(decoder="basis").lr == 1e-3  # its voxels learn at voxel_lr_scale times this
    assert TrainConfig(lr=2e-3).lr == 2e-3  # an explicit --lr wins
    assert AbinitConfig().lr == 1e-3  # ab initio keeps its own default


def test_default_batch_size_depends_on_the_decoder():
    assert TrainConfig().batch_size == 8  # cryoDRGN's
    assert TrainConfig(decoder="basis").batch_size == DEFAULT_BATCH_SIZES["basis"] == 64
    assert TrainConfig(decoder="basis", batch_size=8).batch_size == 8  # an explicit --batch-size wins
    assert AbinitConfig().batch_size == 16 and AbinitConfig(decoder="basis").batch_size == 16


def test_resolved_defaults_round_trip():
    config = TrainConfig(decoder="basis")
    again = TrainConfig.from_dict(config.to_dict())
    assert again.lr == config.lr == 1e-3 and again.batch_size == config.batch_size == 64
    assert again.decoder == "basis" and again.warm_start_images == 20000


def test_an_atomic_run_saved_before_the_local_restraint_resumes_without_it():
    """Runs saved before this version (no ``pose_encoder`` field) keep the behaviour they trained with:
    the atomic decoder's local-geometry restraint off unless their options set it; new runs keep it."""
    saved = TrainConfig(decoder="atomic", decoder_options={"bond_strength": 0.2}).to_dict()
    old = {k: v for k, v in saved.items() if k != "pose_encoder"}
    assert TrainConfig.from_dict(old).decoder_options == {"local_strength": 0.0, "bond_strength": 0.2}
    explicit = {**old, "decoder_options": {"local_strength": 0.3}}
    assert TrainConfig.from_dict(explicit).decoder_options == {"local_strength": 0.3}
    assert TrainConfig.from_dict(saved).decoder_options == {"bond_strength": 0.2}
    plain = {k: v for k, v in TrainConfig().to_dict().items() if k != "pose_encoder"}
    assert TrainConfig.from_dict(plain).decoder_options == {}


def test_a_run_saved_before_the_refit_resumes_without_it():
    """Runs saved before the refit (no ``refit`` field) resume as they trained (no refit); new runs
    refit after the last epoch by default, and --no-refit turns every refit off."""
    saved = TrainConfig(decoder="basis", num_epochs=12).to_dict()
    assert (saved["refit"], saved["refit_every"]) == (True, 0)
    old = {k: v for k, v in saved.items() if k not in ("refit", "refit_every")}
    assert (TrainConfig.from_dict(old).refit, TrainConfig.from_dict(old).refit_every) == (False, 0)
    assert TrainConfig.from_dict({**saved, "refit_every": 2}).refit_every == 2
    with pytest.raises(ValueError, match="refit-every"):
        TrainConfig(refit_every=-1).validate()
