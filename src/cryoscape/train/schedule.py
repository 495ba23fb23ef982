"""What each epoch is: a :class:`Schedule` answers with an :class:`EpochPlan`.

The trainer's epoch loop is the same for every kind of run; a schedule decides which model trains
(ab initio's homogeneous search phase, then the VAE or the final decoder), whether the model is
re-initialised first, which frequency band trains, and whether (and with which grid) the poses
are searched.  :class:`ConstantSchedule` is ``cryoscape train`` (every epoch alike but for its
band); ab initio's schedule lives with its options (:class:`cryoscape.train.abinit.AbinitSchedule`).

Frequency marching
------------------
``cryoscape train`` may train a band that widens over the run (``band_start``, ``band_epochs``;
:func:`band_fraction_at`): epoch 0 fits only the pixels with ``|k| < band_start x D/2``, the radius
grows linearly to Nyquist at epoch ``band_epochs`` (default the last), and later epochs train every
pixel.  A neural field's step costs in proportion to the pixels it evaluates (the area of the
band), so low bands early buy speed; the maps come from the full-band epochs at the end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cryoscape.posesearch.search import SearchSettings
from cryoscape.train.config import DEFAULT_BAND_STARTS, TrainConfig

__all__ = ["EpochPlan", "Schedule", "ConstantSchedule", "band_fraction_at"]


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


def band_fraction_at(epoch: int, start: float, epochs: int) -> float:
    """The training band of ``epoch`` as a fraction of Nyquist: ``start`` at epoch 0, rising linearly
    to 1 at epoch ``epochs`` and 1 from then on (``epochs`` 0: 1 throughout)."""
    if epoch >= epochs:
        return 1.0
    return float(start) + (1.0 - float(start)) * max(0, int(epoch)) / int(epochs)


def _band_ramp(config: TrainConfig) -> tuple[float, int]:
    """``(band_start, band_epochs)`` of a run: the config's, or the decoder's default start and the
    run's last epoch."""
    start = DEFAULT_BAND_STARTS.get(config.decoder, 1.0) if config.band_start is None else config.band_start
    epochs = max(0, int(config.num_epochs) - 1) if config.band_epochs is None else config.band_epochs
    return start, epochs


class ConstantSchedule(Schedule):
    """Every epoch trains the model of ``config`` (``cryoscape train``), on a band that widens from
    ``config.band_start`` to every pixel at epoch ``config.band_epochs`` (module docstring)."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.num_epochs = int(config.num_epochs)

    def band_fraction(self, epoch: int) -> float:
        """The band of ``epoch`` as a fraction of Nyquist (1: every pixel)."""
        return band_fraction_at(epoch, *_band_ramp(self.config))

    def plan(self, epoch: int, box_size: int) -> EpochPlan:
        fraction = self.band_fraction(epoch)
        if fraction >= 1.0:
            return EpochPlan(kind="train", model_config=self.config, batch_size=int(self.config.batch_size))
        band = fraction * box_size / 2.0
        return EpochPlan(kind="marching", model_config=self.config, batch_size=int(self.config.batch_size),
                         band_pixel=band, record={"band_pixel": band})

    def fixed(self, config: TrainConfig) -> TrainConfig:
        """``beta_anneal_epochs``, ``band_start`` and ``band_epochs`` fixed from this run's length and
        decoder, so that a resume with another ``--num-epochs`` keeps the ramps."""
        if config.beta == "anneal" and config.beta_anneal_epochs is None:
            import math

            config = dataclasses.replace(config, beta_anneal_epochs=max(1, math.ceil(config.num_epochs / 4)))
        start, epochs = _band_ramp(config)
        return dataclasses.replace(config, band_start=start, band_epochs=epochs)

    def describe(self) -> str:
        c = self.config
        if c.band_start is None or c.band_start >= 1.0 or not c.band_epochs:
            return super().describe()
        return (f"{self.num_epochs} epochs (band from {c.band_start:g} x Nyquist to Nyquist at epoch "
                f"{c.band_epochs + 1})")
