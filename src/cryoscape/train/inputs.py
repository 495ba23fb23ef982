"""The training data of a run: particle tables, the dataset with its normalisation, the pixels.

:func:`load_tables` reads the particles (and tilted partners) a config names;
:func:`build_training_data` wraps them as :class:`TrainingData` (datasets, normalisation fitted
or taken from a checkpoint); :func:`likelihood_pixels` gives the training pixels with the noise
model's weights and hands a decoder that wants it the data's spectrum.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryoscape.data.training import DataNormalization, ParticleDataset, TrainingBatch
from cryoscape.errors import InputError
from cryoscape.train.config import TrainConfig
from cryoscape.train.objective import tilt_rotation

__all__ = ["TrainingData", "load_tables", "build_dataset", "build_training_data", "likelihood_pixels"]

log = logging.getLogger(__name__)


def load_tables(config: TrainConfig):
    """The particle table (and tilted table) named in ``config``, with ``ind``/``first`` applied."""
    from cryoscape.io.particles import load_particles, select_particles

    if not config.particles:
        raise InputError("no particles were given; pass a .star, .cs, .txt or .mrcs file.")
    table = load_particles(config.particles, datadir=config.datadir, poses_path=config.poses,
                           ctf_path=config.ctf, pixel_size_angstrom=config.pixel_size_angstrom)
    n_all = len(table)
    table = select_particles(table, ind=config.ind, first=config.first)
    tilted = None
    if config.tilt:
        tilted = load_particles(config.tilt, datadir=config.datadir, poses_path=config.tilt_poses,
                                ctf_path=config.tilt_ctf, pixel_size_angstrom=config.pixel_size_angstrom)
        if len(tilted) != n_all:
            raise InputError(
                f"{config.tilt} holds {len(tilted)} tilted particles but {config.particles} has {n_all}; "
                "pass the tilted partner of every untilted particle, in the same order."
            )
        tilted = select_particles(tilted, ind=config.ind, first=config.first)
    return table, tilted


def _prepare_tilted_table(table, tilted, tilt_deg: float):
    """The tilted table with poses ``T @ R`` of the untilted particles (and a CTF, shifts)."""
    T = tilt_rotation(tilt_deg, dtype=torch.float64).numpy()
    if tilted.box_size != table.box_size:
        raise InputError(
            f"{tilted.source_path} holds {tilted.box_size}-pixel images but the untilted particles are "
            f"{table.box_size} pixels; extract both in the same box."
        )
    ctf, pixel = tilted.ctf, tilted.pixel_size_angstrom
    if ctf is None:
        log.info("%s has no CTF parameters; using the untilted particles' CTF for the tilted images",
                 tilted.source_path)
        ctf, pixel = table.ctf, table.pixel_size_angstrom
    shifts = tilted.shifts_pixel
    if shifts is None:
        log.info("%s has no shifts; the tilted particles are taken as centred", tilted.source_path)
        shifts = np.zeros((len(tilted), 2))
    return dataclasses.replace(
        tilted, rotations=np.einsum("ij,njk->nik", T, np.asarray(table.rotations, dtype=np.float64)),
        shifts_pixel=shifts, ctf=ctf, pixel_size_angstrom=pixel,
    )


def build_dataset(config: TrainConfig, table, *, resume_state: dict[str, Any] | None = None) -> ParticleDataset:
    """``table`` as training data, its normalisation fitted (or taken from ``resume_state``)."""
    dataset = ParticleDataset(table, domain=config.domain, use_ctf=config.use_ctf,
                              in_memory=False if config.lazy else None, shuffle_chunk=config.shuffle_chunk,
                              cache_dir=config.cache_dir)
    if resume_state is not None:
        dataset.normalization = DataNormalization.from_dict(resume_state["normalization"])
    else:
        dataset.fit_normalization(
            invert=config.invert_data, window=config.window,
            window_inner_radius_fraction=config.window_inner_radius_fraction,
            window_outer_radius_fraction=config.window_outer_radius_fraction,
            n_sample=config.n_normalization_images, seed=config.seed,
        )
    return dataset


@dataclass
class TrainingData:
    """The particles of a run: the table, its dataset, and the tilted partners' dataset (or ``None``)."""

    table: Any
    dataset: ParticleDataset
    tilted: ParticleDataset | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def box_size(self) -> int:
        return self.dataset.box_size

    @property
    def normalization(self) -> DataNormalization:
        return self.dataset.normalization

    def prepare_cache(self) -> None:
        """Write the float16 caches now (``--cache-dir``; nothing without one)."""
        for dataset in (self.dataset, self.tilted):
            if dataset is not None:
                dataset.prepare_cache()

    def get_batch(self, indices: np.ndarray) -> TrainingBatch:
        batch = self.dataset.get_batch(indices)
        if self.tilted is not None:
            batch.tilted = self.tilted.get_batch(indices)
        return batch


def build_training_data(config: TrainConfig, table, tilted_table=None, *,
                        resume_state: dict[str, Any] | None = None) -> TrainingData:
    """:class:`TrainingData` of ``table`` (and its tilt partners when ``config.tilt``)."""
    dataset = build_dataset(config, table, resume_state=resume_state)
    tilted = None
    if config.tilt:
        if tilted_table is None:
            raise InputError("--tilt was given but no tilted particles were loaded; pass the tilted .star/.mrcs file.")
        tilted = ParticleDataset(_prepare_tilted_table(table, tilted_table, config.tilt_deg), domain=config.domain,
                                 use_ctf=config.use_ctf, in_memory=False if config.lazy else None,
                                 normalization=dataset.normalization)
    return TrainingData(table=table, dataset=dataset, tilted=tilted)


def likelihood_pixels(config: TrainConfig, dataset: ParticleDataset, decoder, *, fresh: bool):
    """The training pixels with the likelihood's weights (``--noise-model``), on the CPU.

    When ``fresh`` (a new model, not a resumed one) a decoder that wants it receives the data's
    per-shell RMS (seed 003 eq. 5) and mean CTF^2 (:meth:`~cryoscape.models.base.VolumeDecoder.
    set_data_spectrum`), to precondition or regularise Fourier-grid parameters with them.
    """
    pixels = dataset.pixels
    wants_spectrum = fresh and decoder.wants_data_spectrum
    if config.noise_model == "spectral" or wants_spectrum:
        from cryoscape.train.noise import estimate_noise_spectrum, spectral_pixel_weights

        spectrum = estimate_noise_spectrum(dataset, n_images=config.n_normalization_images, seed=config.seed)
        if config.noise_model == "spectral":
            pixels = spectral_pixel_weights(pixels, spectrum)
        if wants_spectrum:
            decoder.set_data_spectrum(torch.as_tensor(spectrum.shell_rms), mean_ctf_squared=spectrum.mean_ctf_squared)
    return pixels
