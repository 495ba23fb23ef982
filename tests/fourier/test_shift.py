"""Phase-ramp translations of fourier/shift.py."""

import math

import pytest
import torch

from cryoscape.fourier import fft, grids
from cryoscape.fourier.shift import phase_shift_coords, phase_shift_images


@pytest.mark.parametrize("D", [9, 10])
def test_integer_shift_moves_a_centred_delta(D):
    img = torch.zeros(D, D, dtype=torch.float64)
    img[D // 2, D // 2] = 1.0
    F = fft.fft2_center(img)
    shifts = torch.tensor([[2.0, -3.0], [-1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    moved = fft.ifft2_center(phase_shift_images(F.expand(3, D, D), shifts)).real
    for n, (dx, dy) in enumerate(shifts.long().tolist()):
        expected = torch.zeros(D, D, dtype=torch.float64)
        expected[D // 2 + dy, D // 2 + dx] = 1.0
        assert torch.allclose(moved[n], expected, atol=1e-12)


@pytest.mark.parametrize("D", [31, 32])
def test_fractional_shift_of_a_gaussian(D):
    sigma = 2.0
    xy = grids.grid_2d_index(D, dtype=torch.float64)

    def gaussian(center):
        return torch.exp(-((xy - center) ** 2).sum(-1) / (2 * sigma**2))

    t = torch.tensor([1.3, -2.7], dtype=torch.float64)
    moved = fft.ifft2_center(phase_shift_images(fft.fft2_center(gaussian(torch.zeros(2))), t))
    assert torch.allclose(moved.real, gaussian(t), atol=1e-7)
    if D % 2:
        assert moved.imag.abs().max() < 1e-10


def test_shift_broadcasts_and_keeps_dtype():
    D = 8
    g = torch.Generator().manual_seed(0)
    images = fft.fft2_center(torch.randn(2, 3, D, D, generator=g))
    shifts = torch.randn(2, 3, 2, generator=g)
    out = phase_shift_images(images, shifts)
    assert out.shape == (2, 3, D, D) and out.dtype == torch.complex64
    one = phase_shift_images(images[1, 2], shifts[1, 2])
    assert torch.allclose(out[1, 2], one)
    # Shifting by t and then by -t is the identity; magnitudes never change.
    assert torch.allclose(phase_shift_images(out, -shifts), images, atol=1e-3)
    assert torch.allclose(out.abs(), images.abs())


@pytest.mark.parametrize("D", [7, 8])
def test_coords_variant_matches_full_images(D):
    g = torch.Generator().manual_seed(1)
    images = fft.fft2_center(torch.randn(4, D, D, generator=g, dtype=torch.float64))
    shifts = 3 * torch.randn(4, 2, generator=g, dtype=torch.float64)
    full = phase_shift_images(images, shifts)
    coords = grids.grid_2d_index(D, dtype=torch.float64).reshape(-1, 2)
    keep = coords.norm(dim=-1) <= D / 3
    subset = phase_shift_coords(images.reshape(4, -1)[:, keep], coords[keep], shifts, D)
    assert torch.allclose(subset, full.reshape(4, -1)[:, keep])
    # The first element of a coordinate list at k = (1, 0)/D picks up exp(-2 pi i tx / D).
    value = phase_shift_coords(
        torch.ones(1, dtype=torch.complex128), torch.tensor([[1.0, 0.0]]), torch.tensor([0.5, 9.0]), D
    )
    expected = complex(math.cos(math.pi / D), -math.sin(math.pi / D))
    assert torch.allclose(value, torch.tensor([expected], dtype=torch.complex128))
