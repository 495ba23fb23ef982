"""The image formation model at the training pixels, and the training objective.

Image formation
---------------
For particle ``i`` with pose ``(R_i, t_i)``, CTF ``c_i`` and latent ``z_i`` the model predicts
the centred Fourier transform of the image, once its shift is undone, at every training pixel
``k = (kx, ky)`` (cycles per pixel, see :mod:`cryoscape.data.training`)::

    Xhat_i(k) = c_i(k) * V(R_i^T (kx, ky, 0); z_i)

with ``V`` the decoder (the central-slice theorem; fourier/slicing.py).  The observed
coefficient ``X_i(k)`` (image transform divided by the global ``fourier_scale``) is multiplied
by the phase ramp ``exp(-2 pi i k.t_i)`` (fourier/shift.py), which moves the particle centre to
the box centre.  In the Hartley domain both sides are taken as ``H = Re - Im`` after that.

Objective (per batch, minimised)
--------------------------------
With ``S`` the training pixels, ``w_k`` their weights (2 for a half-plane pixel that stands for
its Friedel mate too, else 1) and ``P = n_circle`` the number of pixels in the circle
``|k| < D/2``::

    loss = mean_i [ (1/P) sum_{k in S} w_k |Xhat_i(k) - X_i(k)|^2  +  beta * KL_i / P ]

The first term is the mean squared error over the whole circle, i.e. the negative Gaussian
log-likelihood of white noise up to a constant and a factor ``2 sigma^2``; it is the same number
in the Fourier (half-plane, complex) and Hartley (full circle, real) domains, because
``H(k)^2 + H(-k)^2 = 2 |F(k)|^2``.  ``KL_i`` is the KL divergence of the encoder's Gaussian
``q(z | X_i)`` from the standard normal prior (zero for homogeneous training, ``zdim = 0``).
Dividing it by ``P`` puts it on the per-pixel scale of the first term (as cryoDRGN does), so
``beta = 1`` corresponds to the ELBO for a noise variance of 1/2 per normalised coefficient.
For tilt pairs both images' errors are added (each averaged over its pixels) and the KL is
counted once per pair.
"""

from __future__ import annotations

import math

import torch

from cryoscape.data.training import FourierPixels
from cryoscape.fourier.slicing import slice_coordinates

__all__ = [
    "slice_points",
    "centre_values",
    "to_domain",
    "squared_error",
    "predict_values",
]


def slice_points(rotations: torch.Tensor, freqs_2d: torch.Tensor) -> torch.Tensor:
    """3-D frequencies ``R^T (kx, ky, 0)``: ``(B, 3, 3)`` x ``(P, 2)`` -> ``(B, P, 3)``.

    The central-slice geometry of :func:`cryoscape.fourier.slicing.slice_coordinates`, in the
    decoder's unit (cycles per pixel).
    """
    return slice_coordinates(rotations, freqs_2d)


def centre_values(values: torch.Tensor, coords_index: torch.Tensor, shifts_pixel: torch.Tensor, box_size: int) -> torch.Tensor:
    """Undo the particle shifts: ``values * exp(-2 pi i k.t)`` (``(B, P)`` complex, ``(B, 2)`` shifts).

    Same convention as :func:`cryoscape.fourier.shift.phase_shift_coords` (the shift that, applied
    to the image, centres the particle), written out here so that it stays differentiable in the
    shifts and allocates one ``(B, P)`` angle array.
    """
    angle = (shifts_pixel.to(coords_index.dtype) @ coords_index.T) * (-2.0 * math.pi / box_size)
    return values * torch.polar(torch.ones_like(angle), angle)


def to_domain(values: torch.Tensor, domain: str) -> torch.Tensor:
    """Complex coefficients in the decoder's domain: unchanged (fourier) or ``Re - Im`` (hartley)."""
    if domain == "hartley":
        return values.real - values.imag
    return values


def predict_values(
    decoder: torch.nn.Module,
    rotations: torch.Tensor,
    pixels: FourierPixels,
    z: torch.Tensor | None,
    ctf: torch.Tensor | None,
) -> torch.Tensor:
    """``c(k) V(R^T k; z)`` at the training pixels: ``(B, P)`` in the decoder's domain."""
    coords = slice_points(rotations, pixels.freqs_cycles_per_pixel)
    pred = decoder(coords, z)
    if ctf is not None:
        pred = pred * ctf.to(pred.real.dtype)
    return pred


def squared_error(pred: torch.Tensor, target: torch.Tensor, pixels: FourierPixels) -> torch.Tensor:
    """``(B,)`` mean squared error over the circle: ``sum_k w_k |pred - target|^2 / n_circle``."""
    diff = pred - target
    if diff.is_complex():
        sq = diff.real.square() + diff.imag.square()
    else:
        sq = diff.square()
    return (sq @ pixels.weights.to(sq.dtype)) / pixels.n_circle
