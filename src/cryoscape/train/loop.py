"""``cryoscape train``: neural reconstruction with known poses, on the training engine.

Entry points
------------
:func:`run_training`
    Load the particles named in a :class:`~cryoscape.train.config.TrainConfig`, prepare the run
    folder (config.yaml, run.log) and train.  ``config.load`` style initialisation from a
    weights file is ``run_training(config, out, init_from=PATH)``.
:func:`resume_training`
    Continue a run from its folder (its latest checkpoint, mid-epoch ones included).
:func:`train_model`
    Train on an already loaded :class:`~cryoscape.io.particles.ParticleTable`.

A ``train`` run is the engine (:class:`cryoscape.train.trainer.Trainer`) with the table's poses
(:class:`~cryoscape.train.pose_sources.KnownPoses`, refined with ``--refine-poses``) and every
epoch alike (:class:`~cryoscape.train.schedule.ConstantSchedule`).

Run folder
----------
``config.yaml``  every option plus what rebuilds the model (decoder name and config, encoder
config, data normalisation, box and pixel size, number of processes); ``run.log``; ``loss.png``
(loss per epoch and within epochs); ``checkpoint.pt`` (latest epoch, atomically replaced;
``checkpoint.partial.pt`` inside an epoch with ``--checkpoint-minutes``); ``weights.E.pt``
(every ``checkpoint_every`` epochs and the last); for ``zdim > 0`` ``z.E.npy`` /
``z_logvar.E.npy`` (per-particle posterior means and log-variances collected during epoch ``E``,
in particle order) and ``z.E.pkl`` (cryoDRGN format: pickled float32 ``(N, zdim)`` means); for
homogeneous runs ``reconstruct.E.mrc`` when weights are saved; with ``refine_poses``
``poses.E.pkl`` (cryoDRGN format) when weights are saved.  Epochs ``E`` count from 0 (cryoDRGN
4.x counts from 1: our ``z.0.npy`` is its ``z.1.pkl``).

Speed
-----
Images are read, normalised, transformed (one ``rfft2`` per batch, gathered at the training
pixels) and their CTF evaluated at those pixels only, in a background thread two batches ahead;
the training step is then the encoder, one decoder call on ``B x P`` slice points, and the
loss.  At D = 64 with 256 x 3 networks about 75-90 % of the step is the decoder's matrix products
(forward and backward).  ``amp`` runs encoder and decoder under bfloat16 autocast (about 2x faster
on an AVX512-BF16 CPU, the same per-image FSC in bench/train.py); the loss stays in float32.  It
is on by default where the hardware has fast bfloat16 (:func:`cryoscape.models.precision.resolve_amp`), like cryoDRGN's
default mixed precision on GPUs.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.errors import InputError
from cryoscape.train.checkpoint import (find_checkpoint, load_checkpoint, load_latest_checkpoint,
                                        refuse_to_overwrite_run)
from cryoscape.train.config import TrainConfig
from cryoscape.train.distributed import Distributed
from cryoscape.train.inputs import build_dataset, build_training_data, load_tables
from cryoscape.train.latent_search import fixed_latent_search
from cryoscape.train.model import check_options, saved_decoder_options
from cryoscape.train.objective import batch_loss, tilt_rotation
from cryoscape.train.pose_sources import KnownPoses, PoseSource
from cryoscape.train.schedule import ConstantSchedule
from cryoscape.train.teacher import teacher_epochs_for, train_teacher
from cryoscape.train.trainer import RunContext, Trainer, TrainingDiverged, TrainResult

__all__ = [
    "TrainingDiverged",
    "TrainResult",
    "train_model",
    "run_training",
    "resume_training",
    "load_tables",
    "build_dataset",
    "batch_loss",
    "tilt_rotation",
    "load_resume_state",
    "check_particle_count",
    "pose_source_for",
]

log = logging.getLogger(__name__)


def train_model(config: TrainConfig, table, out_dir: str | Path, *, tilted_table=None,
                resume_state: dict[str, Any] | None = None, continue_run: bool = False,
                arguments: dict[str, Any] | None = None, dist: Distributed | None = None) -> TrainResult:
    """Train a decoder (and encoder) on ``table``; write the run folder ``out_dir``.

    ``resume_state``: a checkpoint dict to start from (``--resume`` / ``--load``);
    ``continue_run``: resuming in the same folder (keep its loss history).  Raises
    :class:`~cryoscape.train.trainer.TrainingDiverged` when the loss becomes NaN or infinite
    (the last checkpoint on disk is left intact).
    """
    check_options(config)
    schedule = ConstantSchedule(config)
    config = fixed_latent_search(schedule.fixed(config))
    schedule = ConstantSchedule(config)
    dist = dist or Distributed()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    data = build_training_data(config, table, tilted_table, resume_state=resume_state)
    poses = pose_source_for(config, data.dataset, table)
    trainer = Trainer(config, data, poses, schedule, out_dir, command="train", arguments=arguments,
                      resume_state=resume_state, continue_run=continue_run, dist=dist)
    return trainer.fit()


def pose_source_for(config: TrainConfig, dataset, table) -> PoseSource:
    """The :class:`~cryoscape.train.pose_sources.PoseSource` of ``config.pose_source``: the table's poses
    (optionally refined) or an orientation encoder's (:mod:`cryoscape.train.predicted_poses`)."""
    if config.pose_source == "encoder":
        from cryoscape.train.predicted_poses import PredictedPoses

        return PredictedPoses(dataset, table, layers=config.pose_encoder_layers, width=config.pose_encoder_dim,
                              pretrain_epochs=config.pose_pretrain_epochs, lr=config.pose_encoder_lr,
                              start_epoch=config.pose_start_epoch, seed=config.seed,
                              residual=config.pose_encoder == "residual")
    return KnownPoses(dataset, refine=config.refine_poses, representation=config.pose_representation,
                      refine_shifts=config.refine_shifts, lr=config.pose_lr, lr_decay=config.pose_lr_decay,
                      start_epoch=config.pose_start_epoch)


def run_training(config: TrainConfig, out_dir: str | Path, *, arguments: dict[str, Any] | None = None,
                 init_from: str | Path | None = None) -> TrainResult:
    """Load the particles of ``config``, set up the run folder and log, and train.

    ``init_from``: a ``checkpoint.pt`` / ``weights.E.pt`` (or a run folder) whose weights,
    optimiser state, normalisation and epoch the new run starts from (cryoDRGN's ``--load``).
    """
    check_options(config)
    teacher_epochs = teacher_epochs_for(config) if init_from is None else 0  # --load brings its encoder
    out = Path(out_dir)
    refuse_to_overwrite_run(out, "train")
    with RunContext(out) as dist:
        resume_state = None
        if init_from is not None:
            resume_state = load_checkpoint(find_checkpoint(init_from))
            resume_state.pop("partial", None)
            log.info("starting from %s (epoch %d)", init_from, resume_state["epoch"])
        table, tilted = load_tables(config)
        if teacher_epochs:  # an automatic latent teacher (train/teacher.py); the caller's config stays as given
            config = dataclasses.replace(config, teacher_epochs=teacher_epochs)
            config = dataclasses.replace(config, init_encoder=str(train_teacher(config, table, out,
                                                                                tilted_table=tilted, dist=dist)))
        return train_model(config, table, out, tilted_table=tilted, resume_state=resume_state,
                           arguments=arguments, dist=dist)


_RESUME_OVERRIDES = ("num_epochs", "lr", "weight_decay", "pose_lr", "device", "progress", "checkpoint_every",
                     "checkpoint_minutes", "prefetch", "datadir", "amp", "lazy", "cache_dir")


def load_resume_state(run: Path, config_class: type, overrides: dict[str, Any], allowed: tuple[str, ...], *,
                      command: str, state: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    """``(checkpoint state, config)`` of the run folder ``run`` to resume (its latest checkpoint,
    mid-epoch included, unless the caller already read it as ``state``), with ``overrides`` (only
    the ``allowed`` keys; ``None`` values are ignored) applied to the saved config."""
    if state is None:
        state = load_latest_checkpoint(run, command=command)
    config = config_class.from_dict(state["config"])
    for key, value in overrides.items():
        if key not in allowed:
            raise ValueError(f"{key} cannot be changed when resuming")
        if value is not None:
            setattr(config, key, value)
    return state, config


def check_particle_count(config: TrainConfig, table, state: dict[str, Any]) -> None:
    """Refuse to resume when the particle files now give another number of particles."""
    if len(table) != state["data"]["n_particles"]:
        raise InputError(f"{config.particles} now gives {len(table)} particles but the run was trained on "
                         f"{state['data']['n_particles']}; restore the original particle files.")


def resume_training(run_dir: str | Path, *, arguments: dict[str, Any] | None = None,
                    state: dict[str, Any] | None = None, **overrides: Any) -> TrainResult:
    """Continue the run in ``run_dir`` from its latest checkpoint (or ``state``, that checkpoint
    already read), in the same folder.

    ``overrides`` may change ``num_epochs`` (to train longer), ``lr``, ``weight_decay``,
    ``pose_lr``, ``device``, ``progress``, ``checkpoint_every``, ``checkpoint_minutes``,
    ``prefetch``, ``datadir``, ``amp``, ``lazy`` and ``cache_dir``; everything else comes from the checkpoint.
    """
    run = Path(run_dir)
    state, config = load_resume_state(run, TrainConfig, overrides, _RESUME_OVERRIDES, command="train", state=state)
    config.decoder_options = saved_decoder_options(config, state)
    with RunContext(run) as dist:
        log.info("resuming %s after epoch %d", run, state["epoch"])
        table, tilted = load_tables(config)
        check_particle_count(config, table, state)
        return train_model(config, table, run, tilted_table=tilted, resume_state=state, continue_run=True,
                           arguments=arguments, dist=dist)
