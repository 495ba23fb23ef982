"""Training options: the defaults (decoder, window, learning rate and batch size per decoder) and the config round trip."""

from __future__ import annotations

import argparse

import pytest

from cryoscape.cli.train import add_arguments
from cryoscape.train.abinit import AbinitConfig
from cryoscape.train.config import DEFAULT_BATCH_SIZES, DEFAULT_LEARNING_RATES, TrainConfig


def test_the_default_decoder_is_the_basis_and_ab_initio_keeps_the_neural_field():
    assert TrainConfig().decoder == "basis"  # README "Choosing a decoder": the oracle benchmark's figures
    assert AbinitConfig().decoder == "neural_field"  # it aligns from random poses; the basis does not


def test_train_reads_the_images_without_a_window_and_abinit_keeps_it():
    # README "Choosing a decoder", *The window*: it cut the signal the CTF spreads beyond the particle;
    # abinit's pose search was measured with it
    assert TrainConfig().window is False and AbinitConfig().window is True
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["p.star"]).window is False
    assert parser.parse_args(["p.star", "--window"]).window is True
    assert parser.parse_args(["p.star", "--no-window"]).window is False


def test_default_learning_rate_depends_on_the_decoder():
    assert TrainConfig(decoder="neural_field").lr == DEFAULT_LEARNING_RATES["neural_field"] == 4e-4
    assert TrainConfig().lr == 1e-3  # the basis: its voxels learn at voxel_lr_scale times this
    assert TrainConfig(lr=2e-3).lr == 2e-3  # an explicit --lr wins
    assert AbinitConfig().lr == 1e-3  # ab initio keeps its own default


def test_default_batch_size_depends_on_the_decoder():
    assert TrainConfig(decoder="neural_field").batch_size == 8  # cryoDRGN's
    assert TrainConfig().batch_size == DEFAULT_BATCH_SIZES["basis"] == 64
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
    """Runs saved before the refit (no ``refit`` field) resume as they trained (no refit), runs
    saved before the latent step (no ``refit_latents``) without it; new runs refit after the last
    epoch, choose the refits between epochs from the epoch's length (``refit_every`` None) and
    re-estimate the latents after the final refit; abinit refits after its last epoch only."""
    from cryoscape.train.abinit import AbinitConfig

    saved = TrainConfig(decoder="basis", num_epochs=12).to_dict()
    assert (saved["refit"], saved["refit_every"], saved["refit_latents"]) == (True, None, True)
    assert AbinitConfig().refit_every == 0
    old = {k: v for k, v in saved.items() if k not in ("refit", "refit_every", "refit_latents")}
    assert (TrainConfig.from_dict(old).refit, TrainConfig.from_dict(old).refit_every) == (False, 0)
    assert TrainConfig.from_dict(old).refit_latents is False
    before_step = {k: v for k, v in saved.items() if k != "refit_latents"}
    assert TrainConfig.from_dict({**before_step, "refit_every": 0}).refit_latents is False
    assert TrainConfig.from_dict({**before_step, "refit_every": 0}).refit_every == 0
    assert TrainConfig.from_dict({**saved, "refit_every": 2}).refit_every == 2
    # auto: refits between epochs every 2nd epoch from 100 optimiser steps per epoch on
    auto = TrainConfig(decoder="basis")
    assert (auto.batch_size, auto.refit_every_for(8000), auto.refit_every_for(6336), auto.refit_every_for(1000)) \
        == (64, 2, 0, 0)
    assert auto.refit_every_for(6337) == 2
    assert TrainConfig(decoder="basis", refit_every=5).refit_every_for(1000) == 5
    with pytest.raises(ValueError, match="refit-every"):
        TrainConfig(refit_every=-1).validate()


@pytest.mark.parametrize("command, config_class", [("train", "TrainConfig"), ("abinit", "AbinitConfig")])
def test_the_commands_defaults_are_the_configs_defaults(command, config_class):
    """A library caller and a command-line user get the same run: every option left out on the command line
    takes the config class's default (they once differed in the encoder and in abinit's positional encoding)."""
    import dataclasses
    import importlib

    from cryoscape.cli.main import build_parser
    from cryoscape.train.abinit import AbinitConfig
    from cryoscape.train.config import TrainConfig

    cls = {"TrainConfig": TrainConfig, "AbinitConfig": AbinitConfig}[config_class]
    cli = importlib.import_module(f"cryoscape.cli.{command}")
    config = cli._config_from_args(build_parser().parse_args([command, "p.star", "-o", "r"]))
    default = cls(particles=config.particles)
    differ = {f.name: (getattr(config, f.name), getattr(default, f.name)) for f in dataclasses.fields(cls)
              if getattr(config, f.name) != getattr(default, f.name)}
    assert differ == {}
