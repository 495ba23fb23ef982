"""Real-space rendering (models/realspace.py) against the analytic projection of a sum of Gaussians."""

from __future__ import annotations

import math

import pytest
import torch

from cryoscape.data.training import fourier_pixels, transform_at_pixels
from cryoscape.geometry.rotations import random_rotations
from cryoscape.models.base import build_decoder
from cryoscape.models.realspace import column_points, render_values

SIGMA = 1.5
CENTRES = torch.tensor([[2.0, -1.5, 1.0], [-2.5, 1.5, -2.0], [0.5, 2.5, 2.0]])
AMPS = torch.tensor([1.0, 0.6, 1.4])


def _density(world: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    d2 = (world.unsqueeze(-2) - CENTRES).square().sum(-1)  # (B, M, G)
    return (AMPS * torch.exp(-d2 / (2 * sigma ** 2))).sum(-1)


def _analytic_images(rotations: torch.Tensor, D: int, sigma: float = SIGMA) -> torch.Tensor:
    """``integral V(R^T x) dz``: Gaussians of amplitude a sqrt(2 pi) sigma at (R c)_xy."""
    axis = torch.arange(D, dtype=torch.float64) - D // 2
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    centres = torch.einsum("bij,gj->bgi", rotations.double(), CENTRES.double())[..., :2]  # (B, G, 2)
    d2 = (xx[None, None] - centres[..., 0, None, None]) ** 2 + (yy[None, None] - centres[..., 1, None, None]) ** 2
    amp = AMPS.double()[None, :, None, None] * math.sqrt(2 * math.pi) * sigma
    return (amp * torch.exp(-d2 / (2 * sigma ** 2))).sum(1)


@pytest.mark.parametrize("D", [24, 25])
def test_full_resolution_render_equals_the_analytic_projection(D):
    torch.manual_seed(0)
    R = random_rotations(4, generator=torch.Generator().manual_seed(3))
    pixels = fourier_pixels(D)
    truth = transform_at_pixels(_analytic_images(R, D).float(), pixels)
    cols = column_points(D, D, radius_fraction=1.0)
    rendered = render_values(_density, R, cols, pixels.coords_index, box_size=D)
    err = (rendered - truth).abs().max() / truth.abs().max()
    assert err < 1e-4, float(err)


def test_coarse_render_matches_the_projection_in_its_band_with_and_without_jitter():
    """r = D/2: the band |k| < r/2 agrees with the analytic transform, pixels beyond it are 0, and a
    jittered lattice gives the same values.  (Sampling every 2 pixels aliases a Gaussian of sigma
    2.5 by exp(-2 pi^2 sigma^2 / 4^2) ~ 5e-4 of its peak at the band edge; sigma 1.5 would alias 6 %.)"""
    D, r = 32, 16
    R = random_rotations(3, generator=torch.Generator().manual_seed(5))
    pixels = fourier_pixels(D)
    truth = transform_at_pixels(_analytic_images(R, D, 2.5).float(), pixels)
    band = pixels.coords_index.square().sum(-1) < (r / 2) ** 2
    cols = column_points(D, r, radius_fraction=1.0)
    scale = truth.abs().max()
    for offsets in (None, (torch.rand(3, 3, generator=torch.Generator().manual_seed(1)) - 0.5) * 2):
        rendered = render_values(lambda w: _density(w, 2.5), R, cols, pixels.coords_index, box_size=D,
                                 offsets=offsets)
        assert float((rendered[:, band] - truth[:, band]).abs().max() / scale) < 5e-3
        assert float(rendered[:, ~band].abs().max()) == 0.0


def test_point_budget_is_the_lattice_inside_the_sphere():
    cols = column_points(64, 32, radius_fraction=0.9)
    expected = math.pi / 6 * (0.9 * 32) ** 3
    assert abs(len(cols) - expected) / expected < 0.05
    assert int(cols.pixel.max()) < 32 * 32


@pytest.mark.parametrize("render_size, sigma", [(32, 1.5), (16, 2.5)])
def test_depth_stride_two_keeps_the_band_with_half_the_points(render_size, sigma):
    """Planes every 2 lattice steps along z: the first aliased term (k_z = 1 / (2 s)) sits on the band's
    edge, where these Gaussians keep exp(-2 pi^2 sigma^2 k^2) ~ 1e-5 (s = 1, sigma 1.5) and 6e-4 (s = 2,
    sigma 2.5) of their peak; a stride of 3 would alias 1-2 % and fail.  With z offsets as well."""
    D = 32
    R = random_rotations(3, generator=torch.Generator().manual_seed(7))
    pixels = fourier_pixels(D)
    truth = transform_at_pixels(_analytic_images(R, D, sigma).float(), pixels)
    band = pixels.coords_index.square().sum(-1) < (render_size / 2) ** 2
    dense = column_points(D, render_size, radius_fraction=1.0)
    cols = column_points(D, render_size, radius_fraction=1.0, depth_stride=2)
    assert cols.z_step == 2 * cols.step and abs(len(cols) / len(dense) - 0.5) < 0.02
    assert bool((cols.positions[:, 2] == 0).any())  # the centre plane is kept
    scale = truth.abs().max()
    z_only = torch.zeros(3, 3)
    z_only[:, 2] = torch.tensor([-0.9, 0.3, 0.7]) * cols.z_step / 2
    for offsets in (None, z_only):
        rendered = render_values(lambda w: _density(w, sigma), R, cols, pixels.coords_index, box_size=D,
                                 offsets=offsets)
        assert float((rendered[:, band] - truth[:, band]).abs().max() / scale) < 1e-3
    with pytest.raises(ValueError, match="depth_stride"):
        column_points(D, render_size, depth_stride=0)
    with pytest.raises(ValueError, match="depth_stride a positive integer, got 32 and 0"):
        build_decoder("cryoformer", box_size=D, depth_stride=0)  # at construction, not at the first step


def test_jitter_spans_one_spacing_per_axis_and_none_on_the_pixel_lattice():
    """Training offsets (CryoFormer.predict_images): each axis moves by up to its own spacing, none where the
    lattice is on the training pixels (every pixel column, every plane)."""
    assert column_points(32, 32).jitter_scale() == (0.0, 0.0, 0.0)
    assert column_points(32, 32, depth_stride=2).jitter_scale() == (0.0, 0.0, 2.0)
    assert column_points(32, 16).jitter_scale() == (2.0, 2.0, 2.0)
    assert column_points(32, 16, depth_stride=2).jitter_scale() == (2.0, 2.0, 4.0)
