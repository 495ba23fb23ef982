"""Translations of images as phase ramps in Fourier space.

Convention
----------
``phase_shift_images(F, t)`` multiplies the centred FFT ``F`` (fourier/fft.py) by
``exp(-2 pi i (kx * tx + ky * ty))`` with ``k`` in cycles per pixel (``(i - D//2) / D``) and
``t = (tx, ty)`` in pixels.  By the shift theorem the real-space content moves by ``+t``: a pixel at
array index ``[y, x]`` goes to ``[y + ty, x + tx]`` (cyclically; fractional ``t`` interpolates
band-limitedly).  A delta at the centre ``[D//2, D//2]`` shifted by integer ``(dx, dy)`` lands on
``[D//2 + dy, D//2 + dx]``.

With the project's shift convention (``shifts_pixel`` is the shift that, applied to the image,
centres the particle; RELION's origin sign) ``phase_shift_images(F, shifts_pixel)`` centres the
particle and ``phase_shift_images(F, -shifts_pixel)`` moves a centred projection to where the
particle sits in the observed image.

For even ``D`` the -Nyquist row/column has no +Nyquist partner, so a fractional shift leaves it
with a phase that breaks Hermitian symmetry; take the real part of the inverse transform (or
ignore that row) as usual.
"""

from __future__ import annotations

import math

import torch

from cryoscape.fourier import grids

__all__ = ["phase_shift_images", "phase_shift_coords"]


def _phase_ramp(coords_index: torch.Tensor, shifts_pixel: torch.Tensor, box_size: int) -> torch.Tensor:
    """``exp(-2 pi i k.t)`` for ``k = coords_index / D``: ``(P, 2)`` x ``(..., 2)`` -> ``(..., P)``."""
    # (..., 1, 2) . (P, 2) -> (..., P)
    dot = (shifts_pixel.unsqueeze(-2) * coords_index).sum(-1)
    angle = (-2.0 * math.pi / box_size) * dot
    return torch.polar(torch.ones_like(angle), angle)


def phase_shift_images(images_ft: torch.Tensor, shifts_pixel: torch.Tensor) -> torch.Tensor:
    """Translate images by ``+shifts_pixel`` by multiplying their centred FFTs by a phase ramp.

    Parameters
    ----------
    images_ft
        ``(..., D, D)`` complex centred FFTs (``[..., y, x]``).
    shifts_pixel
        ``(..., 2)`` shifts ``(tx, ty)`` in pixels; leading axes broadcast against those of
        ``images_ft``.

    Returns
    -------
    torch.Tensor
        ``(..., D, D)`` complex: ``images_ft * exp(-2 pi i k.t)``, whose inverse FFT is the image
        content moved by ``+t`` (see the module docstring).
    """
    D = images_ft.shape[-1]
    if images_ft.shape[-2] != D:
        raise ValueError(f"images_ft must be square in its last two axes, got {tuple(images_ft.shape)}")
    real_dtype = images_ft.real.dtype
    coords = grids.grid_2d_index(D, device=images_ft.device, dtype=real_dtype).reshape(D * D, 2)
    shifts = torch.as_tensor(shifts_pixel, device=images_ft.device, dtype=real_dtype)
    ramp = _phase_ramp(coords, shifts, D)
    return images_ft * ramp.reshape(*ramp.shape[:-1], D, D)


def phase_shift_coords(
    values: torch.Tensor,
    coords_index: torch.Tensor,
    shifts_pixel: torch.Tensor,
    box_size: int,
) -> torch.Tensor:
    """:func:`phase_shift_images` for a list of Fourier coefficients (e.g. a masked subset).

    Parameters
    ----------
    values
        ``(..., P)`` complex Fourier coefficients.
    coords_index
        ``(P, 2)`` their ``(x, y)`` frequency indices relative to the origin (``i - D//2``; e.g.
        rows of :func:`cryoscape.fourier.grids.grid_2d_index`), so ``k = coords_index / D``.
    shifts_pixel
        ``(..., 2)`` shifts ``(tx, ty)`` in pixels, broadcasting against the leading axes of
        ``values``.
    box_size
        ``D``.

    Returns
    -------
    torch.Tensor
        ``(..., P)`` complex: ``values * exp(-2 pi i k.t)``.
    """
    real_dtype = values.real.dtype if values.is_complex() else values.dtype
    coords = torch.as_tensor(coords_index, device=values.device, dtype=real_dtype)
    shifts = torch.as_tensor(shifts_pixel, device=values.device, dtype=real_dtype)
    return values * _phase_ramp(coords, shifts, box_size)
