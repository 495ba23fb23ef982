"""Image preprocessing: contrast inversion, soft circular window, normalisation, phase flipping.

All functions are pure functions on torch tensors ``(..., D, D)``; :class:`Preprocessor` bundles
the usual options and applies them in this order::

    downsample (Fourier crop) -> invert contrast -> normalise (x - mean) / std -> window

Normalising before windowing makes the window taper towards the background level (0 after
mean subtraction) rather than towards ``-mean / std``.  ``mean`` and ``std`` refer to images
that have already been downsampled and inverted; :meth:`Preprocessor.fit_normalization`
estimates them that way.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

import numpy as np
import torch

from cryoscape.fourier.fft import fft2_center, ifft2_center
from cryoscape.fourier.resample import downsample_images

__all__ = [
    "invert_contrast",
    "soft_circular_window",
    "apply_window",
    "estimate_normalization",
    "normalize",
    "phase_flip",
    "Preprocessor",
]


class ImageReader(Protocol):
    """Anything with ``len()`` and ``read(indices) -> (n, D, D)`` (e.g. ParticleImages)."""

    def __len__(self) -> int: ...

    def read(self, indices: Any) -> Any: ...


def _as_tensor(images: Any) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images if images.is_floating_point() else images.to(torch.float32)
    arr = np.asarray(images)
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float32)
    if not arr.flags.writeable:
        # Shared without a copy; nothing here writes in place, so silence torch's warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_numpy(arr)


def invert_contrast(images: torch.Tensor) -> torch.Tensor:
    """Flip the sign of the images (dark protein on a light background becomes light)."""
    return -_as_tensor(images)


def soft_circular_window(
    D: int,
    *,
    inner_radius_fraction: float = 0.85,
    outer_radius_fraction: float = 0.99,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A ``(D, D)`` real-space mask: 1 inside, 0 outside, with a raised-cosine edge.

    The radius is measured in pixels from the origin at ``(D//2, D//2)`` and expressed as a
    fraction of ``D / 2``: the mask is 1 for ``r <= inner * D/2``, 0 for ``r >= outer * D/2``,
    and ``(1 + cos(pi t)) / 2`` in between with ``t`` going from 0 to 1 across the edge.
    """
    if not 0 <= inner_radius_fraction <= outer_radius_fraction:
        raise ValueError("need 0 <= inner_radius_fraction <= outer_radius_fraction")
    c = torch.arange(D, device=device, dtype=torch.float64) - D // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2) / (D / 2)
    width = outer_radius_fraction - inner_radius_fraction
    if width > 0:
        t = ((r - inner_radius_fraction) / width).clamp(0.0, 1.0)
        mask = 0.5 * (1.0 + torch.cos(math.pi * t))
    else:
        mask = (r <= inner_radius_fraction).to(torch.float64)
    return mask.to(dtype)


def apply_window(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Multiply images ``(..., D, D)`` by a ``(D, D)`` window."""
    x = _as_tensor(images)
    return x * window.to(device=x.device, dtype=x.dtype)


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(images - mean) / std``."""
    return (_as_tensor(images) - mean) / std


def estimate_normalization(
    reader: ImageReader,
    *,
    n_sample: int = 1000,
    seed: int = 0,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
) -> tuple[float, float]:
    """Mean and standard deviation of all pixels of a random subset of images.

    Parameters
    ----------
    reader
        Has ``len()`` and ``read(indices)`` returning ``(n, D, D)``.
    n_sample
        Number of images drawn without replacement (all of them if fewer).
    seed
        Seed of the draw (same seed, same subset).
    transform
        Applied to each batch before the statistics (e.g. downsampling and inversion).
    batch_size
        Images read at a time (memory stays bounded).

    Returns
    -------
    (mean, std) : tuple of float
    """
    n = len(reader)
    if n == 0:
        raise ValueError("cannot estimate a normalisation from zero images")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=min(int(n_sample), n), replace=False))
    total = 0.0
    total_sq = 0.0
    count = 0
    for start in range(0, chosen.size, batch_size):
        batch = _as_tensor(reader.read(chosen[start:start + batch_size]))
        if transform is not None:
            batch = transform(batch)
        batch = batch.to(torch.float64)
        total += float(batch.sum())
        total_sq += float((batch * batch).sum())
        count += batch.numel()
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    return mean, math.sqrt(var)


def phase_flip(images: torch.Tensor, ctf_images: torch.Tensor) -> torch.Tensor:
    """Multiply each image's FT by ``sign(CTF)`` and transform back.

    Parameters
    ----------
    images
        Real ``(..., D, D)``.
    ctf_images
        CTF values on the centred Fourier grid of :mod:`cryoscape.fourier.fft`, shape
        broadcastable to ``images``.

    Returns
    -------
    torch.Tensor
        Real ``(..., D, D)``, same dtype as ``images``.
    """
    x = _as_tensor(images)
    sign = torch.sign(ctf_images).to(device=x.device, dtype=x.dtype)
    return ifft2_center(fft2_center(x) * sign).real.to(x.dtype)


@dataclass(frozen=True)
class Preprocessor:
    """The usual preprocessing of particle images, as one callable.

    Attributes
    ----------
    downsample_box_size
        Fourier-crop to this box (``None`` keeps the box).
    invert
        Flip the contrast.
    mean, std
        Normalisation ``(x - mean) / std`` of the downsampled, inverted images.
    window
        Multiply by :func:`soft_circular_window` with the two radius fractions below.
    window_inner_radius_fraction, window_outer_radius_fraction
        Edge of the window as fractions of ``D / 2``.
    """

    downsample_box_size: int | None = None
    invert: bool = False
    mean: float = 0.0
    std: float = 1.0
    window: bool = False
    window_inner_radius_fraction: float = 0.85
    window_outer_radius_fraction: float = 0.99

    def output_box_size(self, D: int) -> int:
        """Box size of the output for input box ``D``."""
        if self.downsample_box_size is None:
            return D
        if self.downsample_box_size > D:
            raise ValueError(f"cannot downsample box {D} to a larger box "
                             f"{self.downsample_box_size}")
        return int(self.downsample_box_size)

    def _before_normalization(self, images: torch.Tensor) -> torch.Tensor:
        x = _as_tensor(images)
        D = x.shape[-1]
        if self.downsample_box_size is not None and self.downsample_box_size != D:
            x = downsample_images(x, self.output_box_size(D))
        if self.invert:
            x = invert_contrast(x)
        return x

    def __call__(self, images: Any) -> torch.Tensor:
        """Apply the options to ``(..., D, D)`` images (numpy or torch); returns a tensor."""
        x = self._before_normalization(images)
        if self.mean != 0.0 or self.std != 1.0:
            x = normalize(x, self.mean, self.std)
        if self.window:
            w = soft_circular_window(
                x.shape[-1],
                inner_radius_fraction=self.window_inner_radius_fraction,
                outer_radius_fraction=self.window_outer_radius_fraction,
                device=x.device,
                dtype=x.dtype,
            )
            x = apply_window(x, w)
        return x

    def fit_normalization(self, reader: ImageReader, *, n_sample: int = 1000,
                          seed: int = 0) -> "Preprocessor":
        """A copy with ``mean`` and ``std`` estimated on a random subset of ``reader``."""
        mean, std = estimate_normalization(reader, n_sample=n_sample, seed=seed,
                                           transform=self._before_normalization)
        return replace(self, mean=mean, std=std if std > 0 else 1.0)
