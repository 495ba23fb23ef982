"""Coordinate grids in real and Fourier space, centred at index ``D // 2`` (see fourier/fft.py).

Fourier coordinates come in two units, named in the function:
``*_cycles_per_pixel`` (frequency, |k| <= 0.5 at Nyquist) and ``*_index`` (frequency times D,
i.e. position in voxels from the origin; the unit of trilinear interpolation on a D-grid).
Coordinates are returned as ``(x, y)`` or ``(x, y, z)`` vectors in the last axis while the
array axes stay ``[y, x]`` / ``[z, y, x]``.
"""

from __future__ import annotations

import torch

__all__ = [
    "centered_indices",
    "grid_2d_index",
    "grid_3d_index",
    "frequency_grid_2d_cycles_per_pixel",
    "radius_2d_index",
    "radius_3d_index",
    "shell_index_2d",
    "shell_index_3d",
]


def centered_indices(D: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[-D//2, ..., D - D//2 - 1]``: position of each element relative to the origin."""
    return torch.arange(D, device=device, dtype=dtype) - (D // 2)


def grid_2d_index(D: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(D, D, 2)`` array of ``(x, y)`` offsets from the origin, in pixels / frequency indices."""
    c = centered_indices(D, device=device, dtype=dtype)
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x, y], dim=-1)


def grid_3d_index(D: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(D, D, D, 3)`` array of ``(x, y, z)`` offsets from the origin."""
    c = centered_indices(D, device=device, dtype=dtype)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def frequency_grid_2d_cycles_per_pixel(D: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(D, D, 2)`` array of ``(kx, ky)`` in cycles per pixel (``index / D``)."""
    return grid_2d_index(D, device=device, dtype=dtype) / D


def radius_2d_index(D: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(D, D)`` distance of each element from the origin, in pixels."""
    return grid_2d_index(D, device=device, dtype=dtype).norm(dim=-1)


def radius_3d_index(D: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(D, D, D)`` distance of each element from the origin, in voxels."""
    return grid_3d_index(D, device=device, dtype=dtype).norm(dim=-1)


def shell_index_2d(D: int, *, device=None) -> torch.Tensor:
    """``(D, D)`` integer Fourier shell of each element: ``round(|k| * D)``."""
    return torch.round(radius_2d_index(D, device=device, dtype=torch.float64)).long()


def shell_index_3d(D: int, *, device=None) -> torch.Tensor:
    """``(D, D, D)`` integer Fourier shell of each element: ``round(|k| * D)``."""
    return torch.round(radius_3d_index(D, device=device, dtype=torch.float64)).long()
