"""A NeuralField learns a small known map from its central slices (differentiable end to end)."""

import math
import time

import pytest
import torch

from cryoscape.fourier.fft import fourier_to_hartley
from cryoscape.geometry.rotations import random_rotations
from cryoscape.models import NeuralField

D = 16
BLOBS = [((2.0, -1.0, 0.5), 1.5, 1.0), ((-2.5, 1.5, -1.0), 1.2, 0.7), ((0.0, 2.0, 2.5), 1.8, 0.5)]


def map_transform(coords):
    """FT of a sum of Gaussian blobs (unnormalised convention), normalised to F(0) = 1."""
    k = coords.double()
    total = 0
    for centre, sigma, weight in BLOBS:
        amp = weight * (2 * math.pi * sigma**2) ** 1.5 * torch.exp(-2 * math.pi**2 * sigma**2 * (k**2).sum(-1))
        phase = -2 * math.pi * (k * torch.tensor(centre, dtype=torch.float64)).sum(-1)
        total = total + amp * torch.exp(1j * phase)
    norm = sum(w * (2 * math.pi * s**2) ** 1.5 for _, s, w in BLOBS)
    return total / norm


def slice_points(rotations):
    c = (torch.arange(D, dtype=torch.float32) - D // 2) / D
    ky, kx = torch.meshgrid(c, c, indexing="ij")
    k2 = torch.stack([kx, ky], -1).reshape(-1, 2)
    k2 = k2[k2.norm(dim=-1) <= 0.5]
    return k2 @ rotations[:, :2, :]  # R^T (kx, ky, 0)


@pytest.mark.parametrize("domain", ["fourier", "hartley"])
def test_fits_slices_of_a_known_map(domain):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    dec = NeuralField(box_size=D, layers=2, width=64, domain=domain)
    opt = torch.optim.Adam(dec.parameters(), lr=2e-3)

    def target(coords):
        F = map_transform(coords)
        return F.to(torch.complex64) if domain == "fourier" else fourier_to_hartley(F).float()

    def rel_error(coords):
        with torch.no_grad():
            return ((dec(coords) - target(coords)).abs().norm() / target(coords).abs().norm()).item()

    test_coords = slice_points(random_rotations(16, generator=gen))
    start = rel_error(test_coords)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster and immune to a busy machine
    try:
        for _ in range(300):
            coords = slice_points(random_rotations(8, generator=gen))
            loss = (dec(coords) - target(coords)).abs().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    end = rel_error(test_coords)
    print(f"{domain}: relative error {start:.3f} -> {end:.3f} in {time.perf_counter() - t0:.1f} s")
    assert end < 0.15 and end < 0.25 * start
