"""Fourier-space filters of images and volumes, and radial (shell) averages.

All functions act on the trailing ``ndim`` axes (2 for images ``[..., y, x]``, 3 for volumes
``[..., z, y, x]``) and keep leading batch axes.  Frequencies follow fourier/fft.py: element
``i`` is ``(i - D//2) / D`` cycles per pixel, i.e. ``(i - D//2) / (D * pixel_size)`` per angstrom.
Shells are the integer ``round(|k| * D)`` of :func:`cryoscape.fourier.grids.shell_index_2d` /
``shell_index_3d``; shell ``D//2`` is Nyquist, and the corners beyond it belong to no shell.
"""

from __future__ import annotations

import math

import torch

from cryoscape.fourier import fft, grids

__all__ = [
    "lowpass_filter",
    "apply_b_factor",
    "apply_fourier_filter",
    "radial_average",
    "radial_profile_to_grid",
]


def _check_ndim(ndim: int) -> None:
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 (images) or 3 (volumes), got {ndim}")


def _radius_index(D: int, ndim: int, *, device, dtype) -> torch.Tensor:
    if ndim == 2:
        return grids.radius_2d_index(D, device=device, dtype=dtype)
    return grids.radius_3d_index(D, device=device, dtype=dtype)


def _shell_index(D: int, ndim: int, *, device) -> torch.Tensor:
    if ndim == 2:
        return grids.shell_index_2d(D, device=device)
    return grids.shell_index_3d(D, device=device)


def apply_fourier_filter(x: torch.Tensor, weights: torch.Tensor, *, ndim: int) -> torch.Tensor:
    """Multiply the centred FFT of real-space ``x`` by ``weights`` (on the centred grid) and invert.

    Real input gives a real output (the imaginary round-off is dropped; ``weights`` are assumed
    symmetric, ``w(k) = w(-k)``); complex input stays complex.
    """
    _check_ndim(ndim)
    if ndim == 2:
        forward, inverse = fft.fft2_center, fft.ifft2_center
    else:
        forward, inverse = fft.fft3_center, fft.ifft3_center
    out = inverse(forward(x) * weights)
    return out if x.is_complex() else out.real


def lowpass_filter(
    x: torch.Tensor,
    resolution_angstrom: float,
    pixel_size_angstrom: float,
    *,
    ndim: int,
    edge_width_shells: float = 2.0,
) -> torch.Tensor:
    """Low-pass filter images or volumes to ``resolution_angstrom`` with a soft cosine edge.

    The cutoff radius is ``r_c = D * pixel_size / resolution`` (in shells).  The Fourier weight is
    1 for ``|k| D <= r_c - edge_width_shells / 2``, falls as a raised cosine through 0.5 at ``r_c``
    and is 0 from ``r_c + edge_width_shells / 2`` on (``edge_width_shells = 0``: a hard cut,
    keeping ``|k| D <= r_c``).

    Parameters
    ----------
    x
        ``(..., D, D)`` images (``ndim=2``) or ``(..., D, D, D)`` volumes (``ndim=3``), real space.
    resolution_angstrom, pixel_size_angstrom
        Target resolution and pixel size.
    ndim
        2 or 3.
    edge_width_shells
        Width of the soft edge in Fourier shells.
    """
    _check_ndim(ndim)
    D = x.shape[-1]
    real_dtype = x.real.dtype if x.is_complex() else x.dtype
    cutoff = D * pixel_size_angstrom / resolution_angstrom
    r = _radius_index(D, ndim, device=x.device, dtype=real_dtype)
    if edge_width_shells <= 0:
        weights = (r <= cutoff).to(real_dtype)
    else:
        t = ((r - (cutoff - edge_width_shells / 2.0)) / edge_width_shells).clamp(0.0, 1.0)
        weights = 0.5 * (1.0 + torch.cos(math.pi * t))
    return apply_fourier_filter(x, weights, ndim=ndim)


def apply_b_factor(
    x: torch.Tensor,
    b_factor_angstrom2: float,
    pixel_size_angstrom: float,
    *,
    ndim: int,
) -> torch.Tensor:
    """Multiply the Fourier amplitudes of ``x`` by ``exp(-B |k|^2 / 4)`` (``k`` in 1/angstrom).

    Positive ``B`` blurs, negative ``B`` sharpens (e.g. ``B = -80`` for map sharpening).  The
    shell power is multiplied by ``exp(-B |k|^2 / 2)``.  ``x`` is real space, as in
    :func:`lowpass_filter`.
    """
    _check_ndim(ndim)
    D = x.shape[-1]
    real_dtype = x.real.dtype if x.is_complex() else x.dtype
    k = _radius_index(D, ndim, device=x.device, dtype=real_dtype) / (D * pixel_size_angstrom)
    weights = torch.exp(-b_factor_angstrom2 * k * k / 4.0)
    return apply_fourier_filter(x, weights, ndim=ndim)


def radial_average(x: torch.Tensor, *, ndim: int) -> torch.Tensor:
    """Mean of ``x`` over each integer Fourier shell ``0 .. D//2``.

    Parameters
    ----------
    x
        ``(..., D, D)`` or ``(..., D, D, D)`` values on the centred grid (e.g. ``|F|^2``); real or
        complex.
    ndim
        2 or 3.

    Returns
    -------
    torch.Tensor
        ``(..., D//2 + 1)``: element ``s`` is the mean over elements with ``round(|k| D) == s``.
    """
    _check_ndim(ndim)
    D = x.shape[-1]
    n_shells = D // 2 + 1
    shells = _shell_index(D, ndim, device=x.device).reshape(-1)
    keep = shells < n_shells
    shells = shells[keep]
    flat = x.reshape(*x.shape[: x.dim() - ndim], -1)[..., keep]
    sums = torch.zeros(*flat.shape[:-1], n_shells, dtype=flat.dtype, device=flat.device)
    sums = sums.index_add(-1, shells, flat)
    counts = torch.bincount(shells, minlength=n_shells)
    counts = counts.to(sums.real.dtype if sums.is_complex() else sums.dtype)
    return sums / counts


def radial_profile_to_grid(
    profile: torch.Tensor,
    D: int,
    *,
    ndim: int,
    outside_value: float | None = None,
) -> torch.Tensor:
    """Spread a per-shell profile ``(..., D//2 + 1)`` back onto the centred grid.

    Element ``k`` gets ``profile[..., round(|k| D)]``.  The corners beyond Nyquist get
    ``outside_value``, or the outermost shell's value when it is ``None``.

    Returns
    -------
    torch.Tensor
        ``(..., D, D)`` or ``(..., D, D, D)``.
    """
    _check_ndim(ndim)
    n_shells = D // 2 + 1
    if profile.shape[-1] != n_shells:
        raise ValueError(f"profile must have D//2 + 1 = {n_shells} shells, got {profile.shape[-1]}")
    shells = _shell_index(D, ndim, device=profile.device)
    outside = shells >= n_shells
    values = profile[..., shells.clamp(max=n_shells - 1)]
    if outside_value is not None:
        values = values.masked_fill(outside, outside_value)
    return values
