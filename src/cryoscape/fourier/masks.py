"""Real-space masks: hard and soft circles/spheres, soft threshold masks of a map, and the mask of
the region where a set of maps varies (:func:`variability_mask`).

Radii are measured in pixels from the origin at index ``D // 2`` (fourier/fft.py).  Soft edges are
raised cosines: with ``r0`` where the edge starts and ``width`` its extent, the mask is
``1`` for ``r <= r0``, ``0.5 * (1 + cos(pi * (r - r0) / width))`` for ``r0 < r < r0 + width``
(one half at the middle of the edge) and ``0`` beyond.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryoscape.fourier import grids

__all__ = [
    "circular_mask_2d",
    "soft_circular_mask_2d",
    "spherical_mask_3d",
    "soft_spherical_mask_3d",
    "threshold_mask",
    "variability_mask",
    "raised_cosine_edge",
]


def raised_cosine_edge(distance: torch.Tensor, *, start: float, width: float) -> torch.Tensor:
    """``1`` up to ``start``, a raised-cosine fall to ``0`` at ``start + width``, ``0`` beyond.

    ``width <= 0`` gives the hard step ``distance <= start``.
    """
    if width <= 0:
        return (distance <= start).to(distance.dtype)
    t = ((distance - start) / width).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def circular_mask_2d(D: int, radius_pixel: float, *, device=None) -> torch.Tensor:
    """``(D, D)`` boolean disc: ``True`` where the distance from ``D//2`` is ``<= radius_pixel``."""
    return grids.radius_2d_index(D, device=device, dtype=torch.float64) <= radius_pixel


def soft_circular_mask_2d(
    D: int,
    radius_pixel: float,
    *,
    edge_width_pixel: float,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(D, D)`` disc of radius ``radius_pixel`` with a raised-cosine edge outside it.

    The mask is 1 up to ``radius_pixel``, 0.5 at ``radius_pixel + edge_width_pixel / 2`` and 0
    from ``radius_pixel + edge_width_pixel`` on.
    """
    r = grids.radius_2d_index(D, device=device, dtype=torch.float64)
    return raised_cosine_edge(r, start=radius_pixel, width=edge_width_pixel).to(dtype)


def spherical_mask_3d(D: int, radius_pixel: float, *, device=None) -> torch.Tensor:
    """``(D, D, D)`` boolean ball: ``True`` where the distance from the origin is ``<= radius_pixel``."""
    return grids.radius_3d_index(D, device=device, dtype=torch.float64) <= radius_pixel


def soft_spherical_mask_3d(
    D: int,
    radius_pixel: float,
    *,
    edge_width_pixel: float,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(D, D, D)`` ball of radius ``radius_pixel`` with a raised-cosine edge outside it."""
    r = grids.radius_3d_index(D, device=device, dtype=torch.float64)
    return raised_cosine_edge(r, start=radius_pixel, width=edge_width_pixel).to(dtype)


def threshold_mask(
    volume: torch.Tensor,
    *,
    threshold: float | None = None,
    dilate_pixel: float = 3.0,
    edge_width_pixel: float = 6.0,
) -> torch.Tensor:
    """Soft mask around the density of a map (thesis 4.4.4, map-to-map FSC masks).

    The map is thresholded (``volume >= threshold``), the binary object is dilated by
    ``dilate_pixel`` (every voxel within that Euclidean distance of the object joins it) and a
    raised-cosine edge tapers the mask from 1 at the dilated boundary to 0 at
    ``edge_width_pixel`` beyond it.  Distances come from an exact Euclidean distance transform
    (scipy.ndimage), computed on the CPU.

    Parameters
    ----------
    volume
        ``(D, D, D)`` (or any-dimensional) real map.
    threshold
        Density threshold; ``None`` uses half of the 99.99th percentile of ``volume`` (the
        thesis's choice: essentially half the maximum, but robust to a few hot voxels).
    dilate_pixel
        Dilation distance in voxels (to convert angstroms, divide by the pixel size).
    edge_width_pixel
        Width of the soft edge in voxels.

    Returns
    -------
    torch.Tensor
        Float mask in ``[0, 1]``, same shape, dtype (float) and device as ``volume``.
    """
    from scipy import ndimage

    values = volume.detach().to("cpu", torch.float64).numpy()
    if threshold is None:
        threshold = 0.5 * float(np.quantile(values, 0.9999))
    inside = values >= threshold
    if not inside.any():
        distance = np.full(values.shape, np.inf)
    else:
        # Distance from each voxel to the nearest object voxel (0 inside the object).
        distance = ndimage.distance_transform_edt(~inside)
    mask = raised_cosine_edge(torch.from_numpy(distance), start=dilate_pixel, width=edge_width_pixel)
    dtype = volume.dtype if volume.is_floating_point() else torch.float32
    return mask.to(device=volume.device, dtype=dtype)


def variability_mask(
    volumes: torch.Tensor | np.ndarray,
    *,
    threshold_fraction: float = 0.1,
    dilate_pixel: float = 2.0,
    edge_width_pixel: float = 3.0,
) -> torch.Tensor:
    """Soft mask of the region where a set of maps differ (the moving part of a flexible molecule).

    The voxel-wise standard deviation over the ``M`` maps is thresholded at ``threshold_fraction``
    of its maximum, and the region is dilated and softened as in :func:`threshold_mask`.  Scoring
    maps inside it (a masked FSC) measures how well the *heterogeneity* is recovered, which a
    consensus map of the rigid part would otherwise dominate.

    Parameters
    ----------
    volumes
        ``(M, D, D, D)`` maps on one grid (e.g. the ground-truth maps of the states of a dataset).
    threshold_fraction
        Fraction of the largest standard deviation a voxel must reach to belong to the core.
    dilate_pixel, edge_width_pixel
        Dilation of the core and width of its raised-cosine edge, in voxels.

    Returns
    -------
    torch.Tensor
        ``(D, D, D)`` float32 mask in ``[0, 1]``.

    Raises
    ------
    ValueError
        With fewer than two maps, or maps that do not vary at all.
    """
    v = torch.as_tensor(np.asarray(volumes), dtype=torch.float64)
    if v.ndim != 4 or v.shape[0] < 2:
        raise ValueError(f"variability_mask needs (M >= 2, D, D, D) maps, got shape {tuple(v.shape)}")
    std = v.std(dim=0, unbiased=False)
    top = float(std.max())
    if top <= 0:
        raise ValueError("the maps are identical everywhere: there is no variable region to mask")
    mask = threshold_mask(std, threshold=threshold_fraction * top, dilate_pixel=dilate_pixel,
                          edge_width_pixel=edge_width_pixel)
    return mask.to(torch.float32)
