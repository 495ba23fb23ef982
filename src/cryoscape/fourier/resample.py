"""Resampling by Fourier cropping and zero padding, for images and volumes, odd and even boxes.

Conventions are those of :mod:`cryoscape.fourier.fft`: centred transforms with the origin at
index ``D // 2``, so cropping keeps the ``D_new`` central frequencies
``-(D_new // 2) .. D_new - D_new // 2 - 1`` and padding puts the old grid back in the middle.
For an even ``D_new`` the kept band contains the new -Nyquist frequency but not +Nyquist; the
real part of the inverse transform is taken, which splits that line evenly between +-Nyquist
(equivalently, it uses the mean of the old +-Nyquist coefficients).

Scale: with the unnormalised forward FFT, a constant image ``c`` has ``F(0) = c D^2``; the
inverse on the new grid divides by ``D_new^2``.  Resampled images are therefore multiplied by
``(D_new / D) ** ndim`` so that pixel *values* (not sums) are kept: a constant stays the same
constant, and a smooth image keeps its values at the new sample points.  The pixel size
becomes ``pixel_size * D / D_new``.

Kernels are pure functions on tensors with leading batch dimensions; device and dtype come
from the input (integer input is promoted to float32).
"""

from __future__ import annotations

import torch

from cryoscape.fourier.fft import fft2_center, fft3_center, ifft2_center, ifft3_center

__all__ = [
    "crop_fourier_2d",
    "pad_fourier_2d",
    "crop_fourier_3d",
    "pad_fourier_3d",
    "downsample_images",
    "upsample_images",
    "downsample_volume",
    "upsample_volume",
    "resampled_pixel_size_angstrom",
]


def _check_new_size(D_new: int) -> int:
    if int(D_new) != D_new or D_new < 1:
        raise ValueError(f"new box size must be a positive integer, got {D_new!r}")
    return int(D_new)


def _crop(x: torch.Tensor, D_new: int, ndim: int) -> torch.Tensor:
    D_new = _check_new_size(D_new)
    out = x
    for dim in range(-ndim, 0):
        D = x.shape[dim]
        if D_new > D:
            raise ValueError(f"cannot crop an axis of length {D} to {D_new}; use padding")
        start = D // 2 - D_new // 2  # old origin D//2 lands on new origin D_new//2
        out = out.narrow(dim, start, D_new)
    return out


def _pad(x: torch.Tensor, D_new: int, ndim: int) -> torch.Tensor:
    D_new = _check_new_size(D_new)
    shape = list(x.shape)
    index = [slice(None)] * x.dim()
    for dim in range(-ndim, 0):
        D = x.shape[dim]
        if D_new < D:
            raise ValueError(f"cannot pad an axis of length {D} to {D_new}; use cropping")
        start = D_new // 2 - D // 2
        shape[dim] = D_new
        index[dim] = slice(start, start + D)
    out = x.new_zeros(shape)
    out[tuple(index)] = x
    return out


def crop_fourier_2d(image_ft: torch.Tensor, D_new: int) -> torch.Tensor:
    """Keep the central ``D_new x D_new`` frequencies of centred transforms ``(..., D, D)``.

    Works on complex FTs and real Hartley transforms alike; returns a view.
    """
    return _crop(image_ft, D_new, 2)


def pad_fourier_2d(image_ft: torch.Tensor, D_new: int) -> torch.Tensor:
    """Zero-pad centred transforms ``(..., D, D)`` to ``(..., D_new, D_new)`` (origin kept)."""
    return _pad(image_ft, D_new, 2)


def crop_fourier_3d(volume_ft: torch.Tensor, D_new: int) -> torch.Tensor:
    """Keep the central ``D_new^3`` frequencies of centred transforms ``(..., D, D, D)``."""
    return _crop(volume_ft, D_new, 3)


def pad_fourier_3d(volume_ft: torch.Tensor, D_new: int) -> torch.Tensor:
    """Zero-pad centred transforms ``(..., D, D, D)`` to ``D_new^3`` (origin kept)."""
    return _pad(volume_ft, D_new, 3)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    return x if x.is_floating_point() else x.to(torch.float32)


def _check_square(x: torch.Tensor, ndim: int, what: str) -> int:
    if x.dim() < ndim:
        raise ValueError(f"{what} need at least {ndim} dimensions, got shape {tuple(x.shape)}")
    sizes = set(x.shape[-ndim:])
    if len(sizes) != 1:
        raise ValueError(f"{what} must be square/cubic, got shape {tuple(x.shape)}")
    return x.shape[-1]


def downsample_images(images: torch.Tensor, D_new: int) -> torch.Tensor:
    """Downsample real images ``(..., D, D)`` to ``(..., D_new, D_new)`` by Fourier cropping.

    Equal to ``Re(ifft2_center(crop_fourier_2d(fft2_center(x), D_new))) * (D_new / D)**2`` but
    computed with real FFTs (about half the work): the half spectrum of that real result is
    assembled directly, averaging the old +-Nyquist coefficients on an even ``D_new``.

    Parameters
    ----------
    images
        Real tensor ``(..., D, D)``.
    D_new
        New box size, ``<= D``; odd and even both work, whatever ``D`` is.

    Returns
    -------
    torch.Tensor
        ``(..., D_new, D_new)``, same dtype and device; pixel values are preserved (a
        constant image stays that constant).
    """
    x = _as_float(images)
    D = _check_square(x, 2, "images")
    D_new = _check_new_size(D_new)
    if D_new > D:
        raise ValueError(f"cannot downsample images of box {D} to a larger box {D_new}")
    if D_new == D:
        return x.clone()
    Fu = torch.fft.rfft2(torch.fft.ifftshift(x, dim=(-2, -1)), dim=(-2, -1))  # (..., D, D//2+1)
    a = D_new // 2
    H = Fu.new_zeros(x.shape[:-2] + (D_new, a + 1))
    if D_new % 2:
        # Frequencies -a..a on both axes: all interior, copied as they are.
        H[..., : a + 1, :] = Fu[..., : a + 1, : a + 1]
        H[..., D_new - a :, :] = Fu[..., D - a :, : a + 1]
    else:
        N = a  # kept rows -N..N-1; the half spectrum stores column kx = N (= -N)
        H[..., :N, :N] = Fu[..., :N, :N]  # ky = 0..N-1
        if N > 1:
            H[..., N + 1 :, :N] = Fu[..., D - N + 1 :, :N]  # ky = -N+1..-1
        # Row ky = -N: mean of the old -N and +N rows.
        H[..., N, :N] = 0.5 * (Fu[..., D - N, :N] + Fu[..., N, :N])
        # Column kx = -N (stored as +N): (F(ky, N) + conj F(-ky, N)) / 2 for interior ky.
        col = Fu[..., :, N]
        ky = torch.arange(-N + 1, N, device=x.device)
        rows_new = ky % D_new
        plus = col[..., ky % D]
        minus = col[..., (-ky) % D].conj()
        H[..., rows_new, N] = 0.5 * (plus + minus)
        # Corner (-N, -N): the real part of F(N, N).
        H[..., N, N] = Fu[..., N, N].real.to(H.dtype)
    out = torch.fft.irfft2(H, s=(D_new, D_new), dim=(-2, -1))
    out = torch.fft.fftshift(out, dim=(-2, -1))
    return out * ((D_new / D) ** 2)


def upsample_images(images: torch.Tensor, D_new: int) -> torch.Tensor:
    """Upsample real images ``(..., D, D)`` to ``(..., D_new, D_new)`` by Fourier zero padding.

    Pixel values are preserved (same scale convention as :func:`downsample_images`); an image
    whose spectrum lies strictly inside the band of ``D`` is recovered exactly by
    ``downsample_images(upsample_images(x, D_new), D)``.
    """
    x = _as_float(images)
    D = _check_square(x, 2, "images")
    if D_new < D:
        raise ValueError(f"cannot upsample images of box {D} to a smaller box {D_new}")
    if D_new == D:
        return x.clone()
    out = ifft2_center(pad_fourier_2d(fft2_center(x), D_new)).real
    return out * ((D_new / D) ** 2)


def downsample_volume(volume: torch.Tensor, D_new: int) -> torch.Tensor:
    """Downsample real volumes ``(..., D, D, D)`` to ``D_new^3`` by Fourier cropping.

    ``Re(ifft3_center(crop_fourier_3d(fft3_center(v), D_new))) * (D_new / D)**3``: voxel values
    are preserved.
    """
    x = _as_float(volume)
    D = _check_square(x, 3, "volumes")
    D_new = _check_new_size(D_new)
    if D_new > D:
        raise ValueError(f"cannot downsample a volume of box {D} to a larger box {D_new}")
    if D_new == D:
        return x.clone()
    out = ifft3_center(crop_fourier_3d(fft3_center(x), D_new)).real
    return out * ((D_new / D) ** 3)


def upsample_volume(volume: torch.Tensor, D_new: int) -> torch.Tensor:
    """Upsample real volumes ``(..., D, D, D)`` to ``D_new^3`` by Fourier zero padding."""
    x = _as_float(volume)
    D = _check_square(x, 3, "volumes")
    if D_new < D:
        raise ValueError(f"cannot upsample a volume of box {D} to a smaller box {D_new}")
    if D_new == D:
        return x.clone()
    out = ifft3_center(pad_fourier_3d(fft3_center(x), D_new)).real
    return out * ((D_new / D) ** 3)


def resampled_pixel_size_angstrom(pixel_size_angstrom: float, D: int, D_new: int) -> float:
    """Pixel size after resampling a box of ``D`` pixels to ``D_new``: ``pixel_size * D/D_new``."""
    return float(pixel_size_angstrom) * D / D_new
