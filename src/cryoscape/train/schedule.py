"""What each epoch is: a :class:`Schedule` answers with an :class:`EpochPlan`.

The trainer's epoch loop is the same for every kind of run; a schedule decides which model trains
(ab initio's homogeneous search phase, then the VAE or the final decoder), whether the model is
re-initialised first, which frequency band trains, and whether (and with which grid) the poses
are searched.  :class:`ConstantSchedule` is ``cryoscape train`` (every epoch alike, all pixels);
ab initio's schedule lives with its options (:class:`cryoscape.train.abinit.AbinitSchedule`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cryoscape.posesearch.search import SearchSettings
from cryoscape.train.config import TrainConfig

__all__ = ["EpochPlan", "Schedule", "ConstantSchedule"]


@dataclass
class EpochPlan:
    """One epoch as the schedule wants it.

    Attributes
    ----------
    kind
        A word for the log and history (``train``; ab initio: ``search``, ``reuse``, ``final``).
    model_config
        The options of the model that trains in this epoch; when its decoder or ``zdim`` differ
        from the current model's, a new model is built from ``model_seed``.
    batch_size
        Images per (global) batch.
    model_seed
        Seed of a model built at this epoch.
    reset_seed
        Re-initialise the model (weights and optimisers) from this seed before the epoch.
    band_pixel
        Training band radius in Fourier pixels (``None``: every training pixel).
    search, search_images
        Pose-search settings and images per search chunk (``None``: no search this epoch).
    write_map
        Write the homogeneous map after this epoch even when no weights are kept.
    record
        Extra figures for the epoch's history record.
    switch_note
        What the log says when this epoch's model replaces the current one.
    """

    kind: str
    model_config: TrainConfig
    batch_size: int
    model_seed: int = 0
    reset_seed: int | None = None
    band_pixel: float | None = None
    search: SearchSettings | None = None
    search_images: int = 0
    write_map: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    switch_note: str = ""


class Schedule:
    """Base class: ``num_epochs`` epochs, each described by :meth:`plan`."""

    num_epochs: int = 0

    def plan(self, epoch: int, box_size: int) -> EpochPlan:
        raise NotImplementedError

    def warmup(self, box_size: int) -> tuple[int, float | None]:
        """``(images, band)`` of a warm-up with random poses before the first epoch (0: none)."""
        return 0, None

    def fixed(self, config: TrainConfig) -> TrainConfig:
        """``config`` with the schedule lengths that default to "the whole run" fixed, so that a
        resume with another ``--num-epochs`` keeps them."""
        return config

    def describe(self) -> str:
        """One line for the log."""
        return f"{self.num_epochs} epochs"


class ConstantSchedule(Schedule):
    """Every epoch trains the model of ``config`` on all pixels (``cryoscape train``)."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.num_epochs = int(config.num_epochs)

    def plan(self, epoch: int, box_size: int) -> EpochPlan:
        return EpochPlan(kind="train", model_config=self.config, batch_size=int(self.config.batch_size))

    def fixed(self, config: TrainConfig) -> TrainConfig:
        if config.beta == "anneal" and config.beta_anneal_epochs is None:
            import math

            config = dataclasses.replace(config, beta_anneal_epochs=max(1, math.ceil(config.num_epochs / 4)))
        return config
