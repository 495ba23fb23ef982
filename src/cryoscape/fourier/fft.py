"""The FFT and Hartley conventions of cryoscape.  Every other module goes through these.

Conventions (tested in tests/fourier/test_fft.py)
-------------------------------------------------
* Centring: in real space and in Fourier space the origin is the element at index ``D // 2``
  along every axis, for odd and even boxes alike.  ``ifftshift`` moves it to index 0 before the
  transform and ``fftshift`` moves the zero frequency back to ``D // 2`` after it.
* Normalisation: the forward transform is an unnormalised sum, ``F(k) = sum_x f(x) e^{-2 pi i k.x}``
  (numpy's ``norm="backward"``); the inverse divides by the number of elements.  With this choice
  the Fourier slice theorem holds with no scale factor: the 2-D transform of a projection (a sum
  along z) equals the central slice of the 3-D transform.
* Frequencies: element ``i`` along an axis of length ``D`` is the frequency ``(i - D//2) / D``
  cycles per pixel.  For even ``D`` the element at index 0 is -Nyquist and has no +Nyquist
  partner on the grid.
* Hartley: ``H = Re(F) - Im(F)`` with ``F`` the centred FFT above; it is real and its own inverse
  up to the factor ``1 / N``.
* Array order: images are ``[..., y, x]`` and volumes ``[..., z, y, x]`` (MRC order); transforms act
  on the trailing 2 or 3 axes and keep any leading batch axes.
"""

from __future__ import annotations

import torch

__all__ = [
    "fft2_center",
    "ifft2_center",
    "fft3_center",
    "ifft3_center",
    "ht2_center",
    "iht2_center",
    "ht3_center",
    "iht3_center",
    "hartley_to_fourier",
    "fourier_to_hartley",
    "mirror_frequencies",
]

_DIMS2 = (-2, -1)
_DIMS3 = (-3, -2, -1)


def fft2_center(image: torch.Tensor) -> torch.Tensor:
    """Centred, unnormalised 2-D FFT over the last two axes: ``(..., D, D)`` -> complex."""
    shifted = torch.fft.ifftshift(image, dim=_DIMS2)
    return torch.fft.fftshift(torch.fft.fft2(shifted, dim=_DIMS2), dim=_DIMS2)


def ifft2_center(image_ft: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2_center` (divides by ``D*D``); returns a complex tensor."""
    shifted = torch.fft.ifftshift(image_ft, dim=_DIMS2)
    return torch.fft.fftshift(torch.fft.ifft2(shifted, dim=_DIMS2), dim=_DIMS2)


def fft3_center(volume: torch.Tensor) -> torch.Tensor:
    """Centred, unnormalised 3-D FFT over the last three axes: ``(..., D, D, D)`` -> complex."""
    shifted = torch.fft.ifftshift(volume, dim=_DIMS3)
    return torch.fft.fftshift(torch.fft.fftn(shifted, dim=_DIMS3), dim=_DIMS3)


def ifft3_center(volume_ft: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft3_center` (divides by ``D**3``); returns a complex tensor."""
    shifted = torch.fft.ifftshift(volume_ft, dim=_DIMS3)
    return torch.fft.fftshift(torch.fft.ifftn(shifted, dim=_DIMS3), dim=_DIMS3)


def fourier_to_hartley(x_ft: torch.Tensor) -> torch.Tensor:
    """``H = Re(F) - Im(F)``."""
    return x_ft.real - x_ft.imag


def hartley_to_fourier(x_ht: torch.Tensor, *, ndim: int) -> torch.Tensor:
    """Recover ``F`` from a centred Hartley transform over the last ``ndim`` axes.

    ``F(k) = (H(k) + H(-k)) / 2 - i (H(k) - H(-k)) / 2``.  ``H(-k)`` is the array flipped about
    the origin at ``D//2``; for even boxes the -Nyquist plane has no partner and is treated as
    its own mirror image (its imaginary part is set to zero).
    """
    mirrored = mirror_frequencies(x_ht, ndim=ndim)
    return torch.complex((x_ht + mirrored) / 2, -(x_ht - mirrored) / 2)


def mirror_frequencies(x: torch.Tensor, *, ndim: int) -> torch.Tensor:
    """``x(-k)`` over the last ``ndim`` axes, for arrays centred at ``D//2`` (index i -> 2*(D//2) - i, wrapping -Nyquist to itself)."""
    out = x
    for dim in range(-ndim, 0):
        n = x.shape[dim]
        idx = (2 * (n // 2) - torch.arange(n, device=x.device)) % n
        out = out.index_select(dim, idx)
    return out


def ht2_center(image: torch.Tensor) -> torch.Tensor:
    """Centred 2-D Hartley transform (real)."""
    return fourier_to_hartley(fft2_center(image))


def iht2_center(image_ht: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ht2_center`: the Hartley transform again, divided by ``D*D``."""
    n = image_ht.shape[-1] * image_ht.shape[-2]
    return ht2_center(image_ht) / n


def ht3_center(volume: torch.Tensor) -> torch.Tensor:
    """Centred 3-D Hartley transform (real)."""
    return fourier_to_hartley(fft3_center(volume))


def iht3_center(volume_ht: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ht3_center`: the Hartley transform again, divided by ``D**3``."""
    n = volume_ht.shape[-1] * volume_ht.shape[-2] * volume_ht.shape[-3]
    return ht3_center(volume_ht) / n
