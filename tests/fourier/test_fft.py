"""The centring, normalisation and Hartley conventions of fourier/fft.py and fourier/grids.py."""

import math

import pytest
import torch

from cryoscape.fourier import fft, grids

SIZES = [7, 8]


def _mirror(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """x(-k) about the origin at D//2, wrapping periodically."""
    for dim in range(-ndim, 0):
        n = x.shape[dim]
        idx = (2 * (n // 2) - torch.arange(n)) % n
        x = x.index_select(dim, idx)
    return x


@pytest.mark.parametrize("D", SIZES)
def test_parseval_2d_and_3d(D):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, D, D, generator=g, dtype=torch.float64)
    F = fft.fft2_center(img)
    assert torch.allclose(F.abs().square().sum((-2, -1)) / D**2, img.square().sum((-2, -1)))
    vol = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    V = fft.fft3_center(vol)
    assert torch.allclose(V.abs().square().sum() / D**3, vol.square().sum())


@pytest.mark.parametrize("D", SIZES)
def test_friedel_symmetry_of_real_input(D):
    g = torch.Generator().manual_seed(1)
    img = torch.randn(D, D, generator=g, dtype=torch.float64)
    F = fft.fft2_center(img)
    assert torch.allclose(_mirror(F, 2), F.conj())
    vol = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    V = fft.fft3_center(vol)
    assert torch.allclose(_mirror(V, 3), V.conj())


@pytest.mark.parametrize("D", SIZES)
def test_round_trips(D):
    g = torch.Generator().manual_seed(2)
    img = torch.randn(2, D, D, generator=g, dtype=torch.float64)
    vol = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    assert torch.allclose(fft.ifft2_center(fft.fft2_center(img)).real, img)
    assert torch.allclose(fft.ifft3_center(fft.fft3_center(vol)).real, vol)
    assert torch.allclose(fft.iht2_center(fft.ht2_center(img)), img)
    assert torch.allclose(fft.iht3_center(fft.ht3_center(vol)), vol)


@pytest.mark.parametrize("D", SIZES)
def test_hartley_fourier_conversion(D):
    g = torch.Generator().manual_seed(3)
    img = torch.randn(2, D, D, generator=g, dtype=torch.float64)
    F = fft.fft2_center(img)
    H = fft.ht2_center(img)
    assert torch.allclose(H, F.real - F.imag)
    assert torch.allclose(fft.hartley_to_fourier(H, ndim=2), F)
    vol = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    V = fft.fft3_center(vol)
    assert torch.allclose(fft.hartley_to_fourier(fft.ht3_center(vol), ndim=3), V)
    assert torch.allclose(fft.fourier_to_hartley(V), fft.ht3_center(vol))


@pytest.mark.parametrize("D", SIZES)
def test_delta_at_origin_has_constant_transform(D):
    img = torch.zeros(D, D, dtype=torch.float64)
    img[D // 2, D // 2] = 1.0
    F = fft.fft2_center(img)
    assert torch.allclose(F, torch.ones_like(F))
    vol = torch.zeros(D, D, D, dtype=torch.float64)
    vol[D // 2, D // 2, D // 2] = 2.5
    assert torch.allclose(fft.fft3_center(vol), torch.full((D, D, D), 2.5, dtype=torch.complex128))
    # ... and the zero frequency sits at index D//2: the DC term is the sum of the image.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(D, D, generator=g, dtype=torch.float64)
    assert math.isclose(fft.fft2_center(x)[D // 2, D // 2].real, x.sum().item(), rel_tol=1e-12)


@pytest.mark.parametrize("D", SIZES)
def test_frequency_of_each_element(D):
    # A cosine of m cycles across the box along x puts its two peaks at x-index D//2 +- m, row D//2.
    m = 2
    j = torch.arange(D, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * m * (j - D // 2) / D).expand(D, D)
    F = fft.fft2_center(wave).abs()
    peaks = (F > 1e-6 * F.max()).nonzero().tolist()
    assert sorted(peaks) == [[D // 2, D // 2 - m], [D // 2, D // 2 + m]]
    freqs = grids.frequency_grid_2d_cycles_per_pixel(D, dtype=torch.float64)
    assert freqs[D // 2, D // 2 + m].tolist() == [m / D, 0.0]
    assert freqs[D // 2 + 1, D // 2].tolist() == [0.0, 1 / D]
    assert freqs[0, 0, 0].item() == -(D // 2) / D


@pytest.mark.parametrize("D", SIZES)
def test_slice_theorem_for_axis_aligned_projection(D):
    g = torch.Generator().manual_seed(5)
    vol = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    projection = vol.sum(dim=-3)  # integrate along z: image [y, x]
    central_slice = fft.fft3_center(vol)[D // 2]  # kz = 0 plane, [ky, kx]
    assert torch.allclose(fft.fft2_center(projection), central_slice)


def test_grid_conventions():
    D = 5
    idx = grids.grid_2d_index(D)
    assert idx[0, 4].tolist() == [2.0, -2.0]  # (x, y) = (col - D//2, row - D//2)
    g3 = grids.grid_3d_index(D)
    assert g3[1, 2, 3].tolist() == [1.0, 0.0, -1.0]
    assert grids.shell_index_2d(D)[0, 0].item() == round(math.sqrt(8))
