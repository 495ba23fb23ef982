"""Positional encodings of 3-D frequency coordinates for coordinate networks (thesis 3.1.1).

A coordinate MLP fed raw coordinates learns only smooth functions; featurising each coordinate
with sinusoids of many frequencies lets it represent the fast oscillations of a map's transform
(thesis eq. 3.1-3.3, Fig. 3-2).  Every encoding here is one matrix product of the coordinates
with a fixed ``(3, F)`` frequency matrix ``W`` followed by ``sin`` and ``cos``::

    pe(k) = [sin(k @ W), cos(k @ W)]            (..., 3) -> (..., 2F)

Units
-----
Inputs are frequencies in **cycles per training pixel** (``|k| <= 0.5`` at Nyquist).  This is
exactly the thesis's coordinate: the ``D x D`` lattice spanning ``[-0.5, 0.5]^2`` (sec. 3.1.2),
so eq. 3.3 applies unchanged with ``D`` the training box.  Entries of ``W`` are angular
frequencies ``gamma`` (radians per unit of ``k``); a feature ``sin(gamma k)`` has wavelength
``2 pi / gamma`` in units of ``k``.  (In real-space terms, ``gamma / (2 pi)`` is a distance in
pixels: a map whose density extends ``r`` pixels from the origin has a transform that oscillates
at up to ``gamma = 2 pi r`` along ``k``.)

Kinds
-----
``gaussian`` (default)
    Random Fourier features (Tancik et al. 2020; cryoDRGN >= 1.0): ``W`` has ``n_freqs``
    (default ``3 * (D // 2)``) columns drawn once from ``N(0, sigma^2)`` with
    ``sigma = gaussian_scale * D / 2`` (``gaussian_scale`` defaults to 0.5, cryoDRGN's
    ``--feat-sigma``), from a generator seeded with ``seed``: the same seed gives the same matrix,
    and the matrix is also saved in the module's state dict.  Random directions are isotropic,
    which suits central slices at arbitrary orientations better than the axis-aligned geometric
    series.  Why it is the default (bench/train.py setting: D = 64 hinge data, SNR 0.1, 1000
    images, 2 epochs, 256 x 3, per-image FSC AUC on 25 images): gaussian 0.5 gave 0.650 against
    0.610 (scale 0.35), 0.543 (scale 1), geom_lowf 0.493, geom_nohighf 0.419, geom_full 0.382.
``geom_full``
    Thesis eq. 3.1-3.3: per axis, ``n_freqs = D // 2`` angular frequencies in a geometric series
    ``gamma_d = D pi (2/D)^(d / (n_freqs - 1))``, i.e. wavelengths from the Nyquist limit ``2/D``
    (``gamma = D pi``) up to the unit extent ``1`` (``gamma = 2 pi``).  The thesis uses it on
    noiseless data.
``geom_lowf``
    The featurisation the thesis uses for noisy and real data (sec. 5.6.1: "scale all
    wavelengths of the featurisation by 2 pi"; sec. 3.1.1 describes it as leaving out the
    highest-frequency components of the noiseless encoding): the same geometric series with
    every wavelength multiplied by ``2 pi``, i.e. wavelengths from ``4 pi / D`` to ``2 pi``,
    ``gamma`` from ``D / 2`` down to ``1``.  The top of the noiseless series (``gamma`` between
    ``D / 2`` and ``D pi``, the oscillations of density more than ``D / (4 pi)`` pixels from the
    centre) is not fed to the network directly; the MLP still builds such frequencies from
    products of the lower ones, but is biased towards smooth transforms (compact maps).
``geom_nohighf``
    The literal reading of thesis sec. 3.1.1 ("a geometric series that excludes the top 10
    percentile of highest frequency components of the noiseless positional encoding"): the
    geom_full series cut at 90 % of its log-frequency span, ``gamma`` from ``2 pi`` up to
    ``2 pi (D/2)^0.9`` (for D = 128: 0.66 x the Nyquist frequency ``D pi``), ``n_freqs`` terms
    (default ``D // 2``) spaced geometrically over that range.
``none``
    The raw coordinates, ``out_dim = 3`` (for ablations).

For the geometric kinds ``n_freqs`` counts frequencies per axis (``out_dim = 6 n_freqs``, the
matrix is block diagonal); for ``gaussian`` it counts random directions (``out_dim = 2 n_freqs``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ENCODING_KINDS", "DEFAULT_ENCODING", "DEFAULT_GAUSSIAN_SCALE", "PositionalEncoding", "make_encoding", "geometric_frequencies"]

ENCODING_KINDS = ("gaussian", "geom_lowf", "geom_full", "geom_nohighf", "none")
DEFAULT_ENCODING = "gaussian"
DEFAULT_GAUSSIAN_SCALE = 0.5

# Fraction of the log-frequency span of eq. 3.3 kept by ``geom_nohighf`` (thesis sec. 3.1.1).
_NOHIGHF_KEPT_FRACTION = 0.9


def geometric_frequencies(
    kind: str, *, box_size: int, n_freqs: int | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Angular frequencies ``gamma_d`` (radians per unit of ``k``) of a geometric encoding, highest first.

    Parameters
    ----------
    kind
        ``"geom_full"``, ``"geom_lowf"`` or ``"geom_nohighf"`` (see the module docstring).
    box_size
        Training box ``D`` in pixels.
    n_freqs
        Number of frequencies per axis; default ``D // 2`` (thesis eq. 3.1).

    Returns
    -------
    ``(n_freqs,)`` tensor, ``gamma_0 = gamma_max`` down to ``gamma_{n-1} = gamma_min``.
    """
    D = int(box_size)
    n = int(n_freqs) if n_freqs is not None else max(D // 2, 1)
    if n < 1:
        raise ValueError(f"n_freqs must be at least 1, got {n}")
    if kind == "geom_full":
        g_max, g_min = D * math.pi, 2 * math.pi
    elif kind == "geom_lowf":
        g_max, g_min = D / 2, 1.0
    elif kind == "geom_nohighf":
        g_min = 2 * math.pi
        g_max = g_min * (D / 2) ** _NOHIGHF_KEPT_FRACTION
    else:
        raise ValueError(f"{kind!r} is not a geometric encoding")
    if n == 1:
        return torch.tensor([g_min], dtype=dtype)
    t = torch.arange(n, dtype=torch.float64) / (n - 1)
    return (g_max * (g_min / g_max) ** t).to(dtype)


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal featurisation ``k -> [sin(k W), cos(k W)]`` (or the identity for ``"none"``).

    Build it with :func:`make_encoding`.  The ``(3, F)`` matrix ``W`` is a buffer (saved in the
    state dict, moved with ``.to(device)``).  The product and the sinusoids are always computed in
    float32 or better, also under autocast: ``sin(400 rad)`` in half precision would be noise.

    Attributes
    ----------
    kind, box_size, n_freqs, gaussian_scale, seed
        The arguments it was built with (``config`` holds them as a dict).
    out_dim
        Number of output features.
    """

    def __init__(self, kind: str, frequencies: torch.Tensor | None, *, config: dict):
        super().__init__()
        self.kind = kind
        self.config = dict(config)
        if frequencies is None:
            self.register_buffer("frequencies", None)
            self.out_dim = 3
        else:
            self.register_buffer("frequencies", frequencies.to(torch.float32).contiguous())
            self.out_dim = 2 * frequencies.shape[1]

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``(..., 3)`` frequencies in cycles per training pixel -> ``(..., out_dim)`` features."""
        if self.frequencies is None:
            return coords
        dtype = torch.promote_types(coords.dtype, torch.float32)
        with torch.autocast(device_type=coords.device.type, enabled=False):
            x = coords.to(dtype) @ self.frequencies.to(dtype)
            return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, out_dim={self.out_dim}"


def make_encoding(
    kind: str = DEFAULT_ENCODING,
    *,
    box_size: int,
    n_freqs: int | None = None,
    gaussian_scale: float | None = None,
    seed: int = 0,
) -> PositionalEncoding:
    """Build a :class:`PositionalEncoding` (kinds and their frequencies: module docstring).

    Parameters
    ----------
    kind
        One of :data:`ENCODING_KINDS`.
    box_size
        Training box ``D``; sets the frequency range.
    n_freqs
        Frequencies per axis (geometric kinds, default ``D // 2``) or random directions
        (``gaussian``, default ``3 * (D // 2)``).
    gaussian_scale
        ``gaussian`` only: standard deviation of ``W`` in units of ``D / 2`` (default 0.5).
    seed
        ``gaussian`` only: seed of the random matrix.
    """
    D = int(box_size)
    if D < 2:
        raise ValueError(f"box_size must be at least 2, got {box_size}")
    config = {"kind": kind, "box_size": D, "n_freqs": n_freqs, "gaussian_scale": gaussian_scale, "seed": int(seed)}
    if kind == "none":
        return PositionalEncoding(kind, None, config=config)
    if kind in ("geom_full", "geom_lowf", "geom_nohighf"):
        gamma = geometric_frequencies(kind, box_size=D, n_freqs=n_freqs)
        # Block-diagonal (3, 3n): column a*n + d is gamma_d along axis a.
        W = torch.kron(torch.eye(3, dtype=torch.float64), gamma[None, :])
        return PositionalEncoding(kind, W, config=config)
    if kind == "gaussian":
        n = int(n_freqs) if n_freqs is not None else 3 * max(D // 2, 1)
        if n < 1:
            raise ValueError(f"n_freqs must be at least 1, got {n}")
        scale = DEFAULT_GAUSSIAN_SCALE if gaussian_scale is None else float(gaussian_scale)
        if not scale > 0:
            raise ValueError(f"gaussian_scale must be positive, got {gaussian_scale}")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        W = torch.randn(3, n, generator=gen, dtype=torch.float64) * (scale * D / 2)
        return PositionalEncoding(kind, W, config=config)
    raise ValueError(f"unknown positional encoding {kind!r}; choose one of {list(ENCODING_KINDS)}")
