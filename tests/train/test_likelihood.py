"""Image formation at the training pixels: rotations, shifts, CTF and the squared error, checked
against analytic projections of Gaussian blobs (whose 3-D transform is known in closed form)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoscape.data.training import fourier_pixels, transform_at_pixels
from cryoscape.fourier.ctf import ctf_images
from cryoscape.fourier.fft import fft2_center, ifft2_center
from cryoscape.fourier.grids import grid_2d_index, grid_3d_index
from cryoscape.fourier.shift import phase_shift_coords
from cryoscape.fourier.slicing import slice_coordinates
from cryoscape.geometry.rotations import random_rotations
from cryoscape.models.base import VolumeDecoder
from cryoscape.train.likelihood import centre_values, predict_values, slice_points, squared_error, to_domain


def _blobs(D: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        (rng.uniform(0.5, 1.5), torch.tensor(rng.uniform(-D / 5, D / 5, 3)), rng.uniform(1.3, 2.2))
        for _ in range(6)
    ]


class AnalyticGaussians(VolumeDecoder):
    """The exact continuous transform of a sum of Gaussian blobs (a test decoder, not registered)."""

    def __init__(self, *, box_size: int, blobs, domain: str = "fourier"):
        super().__init__(box_size=box_size, zdim=0)
        self.blobs = blobs
        self.domain = domain

    def forward(self, coords, z=None):
        k = coords.to(torch.float64)
        out = torch.zeros(k.shape[:-1], dtype=torch.complex128)
        for a, c, s in self.blobs:
            amp = a * (2 * math.pi * s * s) ** 1.5 * torch.exp(-2 * math.pi**2 * s * s * (k**2).sum(-1))
            out = out + amp * torch.exp(-2j * math.pi * (k @ c))
        out = out.to(torch.complex64)
        return to_domain(out, self.domain)

    def eval_volume(self, z=None, *, box_size=None):
        g = grid_3d_index(self.box_size, dtype=torch.float64)
        return sum(a * torch.exp(-((g - c) ** 2).sum(-1) / (2 * s * s)) for a, c, s in self.blobs).float()


def _observed_images(D, blobs, R, shifts, ctf):
    """Analytic projections, moved so the particle centre sits at box centre - shift, times the CTF."""
    g2 = grid_2d_index(D, dtype=torch.float64)
    images = torch.zeros(len(R), D, D, dtype=torch.float64)
    for a, c, s in blobs:
        p = (R @ c)[:, :2] - shifts
        images += a * math.sqrt(2 * math.pi) * s * torch.exp(-((g2[None] - p[:, None, None]) ** 2).sum(-1) / (2 * s * s))
    return ifft2_center(fft2_center(images) * ctf).real.float()


@pytest.mark.parametrize("D", [32, 33])
@pytest.mark.parametrize("domain", ["fourier", "hartley"])
def test_prediction_matches_analytic_images(D, domain):
    blobs = _blobs(D)
    n = 6
    R = random_rotations(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    shifts = torch.tensor(np.random.default_rng(3).uniform(-3, 3, (n, 2)))
    defocus = torch.linspace(6000, 15000, n, dtype=torch.float64)
    pixel_size = 3.0
    ctf_full = ctf_images(
        D, pixel_size, defocus_u_angstrom=defocus, defocus_v_angstrom=defocus * 0.95,
        defocus_angle_deg=torch.full((n,), 30.0, dtype=torch.float64), voltage_kv=300.0, cs_mm=2.7,
        amplitude_contrast=0.1,
    )
    images = _observed_images(D, blobs, R, shifts, ctf_full)
    pixels = fourier_pixels(D, domain=domain)
    kx = pixels.coords_index[:, 0].long() + D // 2
    ky = pixels.coords_index[:, 1].long() + D // 2
    ctf = ctf_full[:, ky, kx].float()

    values = transform_at_pixels(images, pixels)
    target = to_domain(centre_values(values, pixels.coords_index, shifts.float(), D), domain)
    decoder = AnalyticGaussians(box_size=D, blobs=blobs, domain=domain)
    pred = predict_values(decoder, R.float(), pixels, None, ctf)
    relative = float(squared_error(pred, target, pixels).sum() / squared_error(torch.zeros_like(target), target, pixels).sum())
    assert relative < 1e-3

    # the test has teeth: the wrong shift sign, or a transposed pose, is far off
    wrong_shift = to_domain(centre_values(values, pixels.coords_index, -shifts.float(), D), domain)
    assert float(squared_error(pred, wrong_shift, pixels).sum()) > 0.1 * float(
        squared_error(torch.zeros_like(target), target, pixels).sum())
    pred_transposed = predict_values(decoder, R.float().transpose(-1, -2), pixels, None, ctf)
    assert float(squared_error(pred_transposed, target, pixels).sum()) > 0.1 * float(
        squared_error(torch.zeros_like(target), target, pixels).sum())


def test_centre_values_is_the_project_phase_shift():
    D = 20
    pixels = fourier_pixels(D)
    values = torch.randn(3, len(pixels), dtype=torch.complex64)
    shifts = torch.randn(3, 2)
    torch.testing.assert_close(
        centre_values(values, pixels.coords_index, shifts, D),
        phase_shift_coords(values, pixels.coords_index, shifts, D),
    )


def test_slice_points_are_slicing_coordinates_in_cycles_per_pixel():
    D = 24
    pixels = fourier_pixels(D)
    R = random_rotations(4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        slice_points(R, pixels.freqs_cycles_per_pixel), slice_coordinates(R, pixels.coords_index) / D
    )


def test_slice_points_keep_full_precision_under_autocast():
    """Training predicts under autocast; the slice geometry must not become a bfloat16 product, which would
    round every decoder's input frequencies to 8 bits of mantissa."""
    pixels = fourier_pixels(24)
    R = random_rotations(4, generator=torch.Generator().manual_seed(0))
    exact = slice_points(R, pixels.freqs_cycles_per_pixel)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = slice_points(R, pixels.freqs_cycles_per_pixel)
    assert under.dtype == torch.float32
    assert torch.equal(under, exact)


@pytest.mark.parametrize("D", [16, 17])
def test_squared_error_is_the_same_objective_in_both_domains(D):
    gen = torch.Generator().manual_seed(D)
    a, b = torch.randn(2, 5, D, D, generator=gen)
    half, full = fourier_pixels(D, domain="fourier"), fourier_pixels(D, domain="hartley")
    e_fourier = squared_error(transform_at_pixels(a, half), transform_at_pixels(b, half), half)
    e_hartley = squared_error(
        to_domain(transform_at_pixels(a, full), "hartley"), to_domain(transform_at_pixels(b, full), "hartley"), full
    )
    torch.testing.assert_close(e_fourier, e_hartley, rtol=1e-4, atol=1e-3)
    # and it is the mean over the circle of |A - B|^2
    diff = transform_at_pixels(a - b, full)
    torch.testing.assert_close(e_fourier, (diff.abs() ** 2).mean(-1), rtol=1e-4, atol=1e-3)
