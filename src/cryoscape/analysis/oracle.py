"""Oracle references for a simulated continuous dataset: what knowing the answer would give.

A heterogeneous decoder sees every image, so its map of an image should beat two voxel
reconstructions that use the same known poses and CTF (issue 19):

``consensus``
    One backprojection of all images: it ignores the motion, but averages the most images, so its
    high frequencies are the least noisy.  A decoder whose plain per-image FSC falls below it adds
    noise where it should add signal.
``binned``
    The images cut into ``n_bins`` equal-width bins of their *true* coordinate (hinge angle,
    trajectory position) and one backprojection per bin; an image is scored against its bin's map.
    This is a discrete reconstruction that KNOWS each image's state up to the bin width.

Both are Wiener-filtered with the per-shell regulariser from their half-map FSC (``regularization
= "fsc"`` of :func:`cryoscape.reconstruct.backproject.backproject_particles`), the best a voxel
reconstruction with known poses gets without a prior.

Scores (:class:`MapScores`, :func:`score_maps`): the per-image FSC AUC against the truth of the
image's state (the CryoBench protocol, :func:`cryoscape.analysis.evaluate.per_image_fsc`), the same
AUC inside a mask of the region where the true maps vary
(:func:`cryoscape.fourier.masks.variability_mask`, :func:`masked_per_image_fsc`) and, for a
decoder, the |Spearman rho| of its latents' first principal component with the true coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from cryoscape.analysis.evaluate import GroundTruth, latent_correlation, masked_per_image_fsc, per_image_fsc

__all__ = ["MapScores", "coordinate_bins", "score_maps", "oracle_reconstructions", "truth_variability_mask"]


@dataclass
class MapScores:
    """Per-image scores of one method's maps against the truth (module docstring).

    ``auc`` and ``masked_auc`` are ``(M,)`` per evaluated image; ``spearman`` is |rho| of the
    latents' PC1 with the true coordinate (``None`` for the oracles, which have no latents);
    ``negated`` says the maps correlated negatively with the truth and their negatives were scored.
    """

    auc: np.ndarray
    masked_auc: np.ndarray
    spearman: float | None = None
    negated: bool = False

    def summary(self) -> dict[str, float | None]:
        return {"auc_mean": float(np.mean(self.auc)), "masked_auc_mean": float(np.mean(self.masked_auc)),
                "spearman_pc1": self.spearman, "negated": self.negated}


def coordinate_bins(coordinate: np.ndarray, n_bins: int) -> np.ndarray:
    """``(N,)`` bin (0 .. n_bins-1) of each image: equal-width bins from the smallest to the largest
    true coordinate (the largest value falls in the last bin)."""
    c = np.asarray(coordinate, dtype=np.float64)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if not np.isfinite(c).all():
        raise ValueError("the true coordinate has non-finite values: bin a continuous dataset only")
    lo, hi = float(c.min()), float(c.max())
    if hi == lo:
        return np.zeros(len(c), dtype=np.int64)
    return np.clip(np.floor((c - lo) / (hi - lo) * n_bins), 0, n_bins - 1).astype(np.int64)


def truth_variability_mask(truth: GroundTruth, **kwargs) -> np.ndarray:
    """The :func:`~cryoscape.fourier.masks.variability_mask` of all the truth maps of a dataset."""
    from cryoscape.fourier.masks import variability_mask

    volumes = np.stack([truth.volume(s) for s in range(truth.n_states)])
    return variability_mask(volumes, **kwargs).numpy()


def score_maps(maps: Sequence[np.ndarray], states: Sequence[int], truth: GroundTruth, mask: np.ndarray, *,
               z: np.ndarray | None = None, fix_sign: bool = True) -> MapScores:
    """Per-image plain and masked FSC AUC of ``maps[i]`` against the truth of ``states[i]``.

    With ``fix_sign`` maps that correlate negatively with the truth on average are negated first
    (FSC is sign-sensitive; a tool's contrast convention is not what is being scored).  ``z``
    (``(N, zdim)`` latents of all images, in the dataset's order) adds |Spearman| of PC1.
    """
    truths = [truth.volume(int(s)) for s in states]
    box_pixel = (truth.box_size, truth.pixel_size_angstrom)
    plain = per_image_fsc(maps, truths, truth_box_pixel=box_pixel)
    negated = bool(fix_sign and np.mean(plain.correlation) < 0)
    if negated:
        maps = [-np.asarray(m) for m in maps]
        plain = per_image_fsc(maps, truths, truth_box_pixel=box_pixel)
    masked = masked_per_image_fsc(maps, truths, mask, truth_box_pixel=box_pixel)
    spearman = None
    if z is not None:
        coordinate = truth.coordinate[: len(z)]
        spearman = float(latent_correlation(z, coordinate)["spearman_pc1"])
    return MapScores(auc=plain.auc, masked_auc=masked.auc, spearman=spearman, negated=negated)


def oracle_reconstructions(table, bins: np.ndarray, *, regularization: str | float = "fsc",
                           progress: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(consensus map, [map of bin b])``: backprojections of all particles of ``table`` and of each
    bin's particles (``bins[i]`` is particle ``i``'s bin, e.g. :func:`coordinate_bins`).

    ``table`` is a :class:`cryoscape.io.particles.ParticleTable` with poses and CTF; a bin with
    fewer than two particles has no map (``None``).
    """
    from cryoscape.reconstruct.backproject import backproject_particles

    def solve(sub) -> np.ndarray:
        result = backproject_particles(sub, regularization=regularization, progress=progress)
        return result.volume.to(torch.float32).numpy()

    bins = np.asarray(bins)
    if len(bins) != len(table):
        raise ValueError(f"{len(bins)} bin labels for {len(table)} particles")
    consensus = solve(table)
    per_bin = []
    for b in range(int(bins.max()) + 1):
        idx = np.flatnonzero(bins == b)
        per_bin.append(solve(table.subset(idx)) if len(idx) >= 2 else None)
    return consensus, per_bin
