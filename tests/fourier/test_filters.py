"""Low-pass, B-factor and radial-average kernels of fourier/filters.py."""

import math

import pytest
import torch

from cryoscape.fourier import fft, grids
from cryoscape.fourier.filters import apply_b_factor, lowpass_filter, radial_average, radial_profile_to_grid


@pytest.mark.parametrize("D", [15, 16])
def test_lowpass_keeps_low_and_kills_high_frequencies_3d(D):
    g = torch.Generator().manual_seed(0)
    vol = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    pixel, resolution, edge = 2.0, 6.0, 2.0
    cutoff = D * pixel / resolution  # in shells
    out = lowpass_filter(vol, resolution, pixel, ndim=3, edge_width_shells=edge)
    assert out.dtype == torch.float64 and not out.is_complex()
    F, G = fft.fft3_center(vol), fft.fft3_center(out)
    r = grids.radius_3d_index(D, dtype=torch.float64)
    low = r <= cutoff - edge / 2
    assert low.sum() > 20
    assert torch.allclose(G[low], F[low], atol=1e-9)
    assert G[r >= cutoff + edge / 2].abs().max() < 1e-9
    # On the cutoff shell the weight is one half.
    on = (r - cutoff).abs() < 1e-9
    if on.any():
        assert torch.allclose(G[on], 0.5 * F[on], atol=1e-9)


@pytest.mark.parametrize("D", [15, 16])
def test_lowpass_images_batched_and_hard_edge(D):
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, D, D, generator=g, dtype=torch.float64)
    out = lowpass_filter(imgs, 8.0, 1.0, ndim=2, edge_width_shells=0)
    F, G = fft.fft2_center(imgs), fft.fft2_center(out)
    r = grids.radius_2d_index(D, dtype=torch.float64)
    keep = r <= D / 8.0
    assert torch.allclose(G[:, keep], F[:, keep], atol=1e-9)
    assert G[:, ~keep].abs().max() < 1e-9
    assert torch.allclose(out[1], lowpass_filter(imgs[1], 8.0, 1.0, ndim=2, edge_width_shells=0))


@pytest.mark.parametrize("D", [16, 17])
@pytest.mark.parametrize("b_factor", [100.0, -60.0])
def test_b_factor_scales_shell_power(D, b_factor):
    g = torch.Generator().manual_seed(2)
    vol = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    pixel = 1.5
    out = apply_b_factor(vol, b_factor, pixel, ndim=3)
    power_in = fft.fft3_center(vol).abs().square()
    power_out = fft.fft3_center(out).abs().square()
    k = grids.radius_3d_index(D, dtype=torch.float64) / (D * pixel)
    # Per Fourier coefficient the power is multiplied by exp(-B k^2 / 2) exactly ...
    assert torch.allclose(power_out, power_in * torch.exp(-b_factor * k**2 / 2), rtol=1e-9)
    # ... and per shell approximately so (white noise: about the shell mean of the factor).
    ratio = radial_average(power_out, ndim=3) / radial_average(power_in, ndim=3)
    expected = radial_average(torch.exp(-b_factor * k**2 / 2), ndim=3)
    assert torch.allclose(ratio[1:], expected[1:], rtol=0.05)
    k_shell = torch.arange(D // 2 + 1, dtype=torch.float64) / (D * pixel)
    assert torch.allclose(ratio[2:], torch.exp(-b_factor * k_shell[2:] ** 2 / 2), rtol=0.15)
    # Positive B blurs (less high-frequency power); negative B sharpens.
    assert (ratio[-1] < 1) == (b_factor > 0)


@pytest.mark.parametrize("D", [9, 10])
@pytest.mark.parametrize("ndim", [2, 3])
def test_radial_average_and_profile_round_trip(D, ndim):
    profile = torch.arange(D // 2 + 1, dtype=torch.float64) ** 2 + 1.0
    profile = torch.stack([profile, -profile])  # batch of two
    grid = radial_profile_to_grid(profile, D, ndim=ndim)
    assert grid.shape == (2,) + (D,) * ndim
    assert torch.allclose(radial_average(grid, ndim=ndim), profile)
    c = D // 2
    centre = (c,) * ndim
    assert grid[(0,) + centre].item() == 1.0
    along_x = (0,) + (c,) * (ndim - 1) + (c + 3,)
    assert grid[along_x].item() == 10.0
    # Corners beyond Nyquist: outermost shell by default, or a fill value.
    corner = (0,) + (0,) * ndim
    assert grid[corner].item() == profile[0, -1].item()
    assert radial_profile_to_grid(profile, D, ndim=ndim, outside_value=0.0)[corner].item() == 0.0


def test_radial_average_of_known_values():
    D = 8
    # Shell 1 of a 2-D grid holds the 4 axis neighbours and (round(sqrt 2) = 1) the 4 diagonals.
    x = torch.zeros(D, D)
    c = D // 2
    x[c, c + 1] = 8.0
    avg = radial_average(x, ndim=2)
    assert avg.shape == (D // 2 + 1,)
    assert avg[1].item() == pytest.approx(1.0)
    assert avg[0].item() == 0.0 and avg[2:].abs().max().item() == 0.0
    # Complex input is averaged as complex.
    z = radial_average(torch.full((D, D), 1 + 2j), ndim=2)
    assert torch.allclose(z, torch.full((D // 2 + 1,), 1 + 2j))
    assert math.isclose(grids.shell_index_2d(D)[c + 1, c + 1].item(), 1)
