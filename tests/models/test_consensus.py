"""The low-pass consensus map (models/consensus.py): the backprojection of a blob's slices puts its maximum
in the blob's cell in both domains, its half-map FSC is near 1 for noiseless slices, and noise lowers it."""

from __future__ import annotations

import math

import pytest
import torch

from cryoscape.geometry.rotations import random_rotations
from cryoscape.models.consensus import cell_maxima, lowpass_backprojection

D = 16
CENTRE = (3.0, -2.0, 1.0)  # x, y, z in pixels from the box centre


def _blob() -> torch.Tensor:
    ax = torch.arange(D, dtype=torch.float64) - D // 2
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    r2 = (xx - CENTRE[0]) ** 2 + (yy - CENTRE[1]) ** 2 + (zz - CENTRE[2]) ** 2
    return torch.exp(-r2 / (2 * 1.5 ** 2))


def _slices(domain: str, n_images: int = 64, noise: float = 0.0, batch: int = 16):
    """Exact slices of the blob's transform (a direct DFT at the rotated frequencies, cycles per pixel), in the
    loss's conventions: Fourier half-plane pixels (complex) or the Hartley circle (real)."""
    volume = _blob()
    ax = torch.arange(D, dtype=torch.float64) - D // 2
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    x = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    ky, kx = torch.meshgrid(ax, ax, indexing="ij")
    k = torch.stack([kx, ky, torch.zeros_like(kx)], -1).reshape(-1, 3)
    k = k[k.norm(dim=-1) <= D // 2]
    if domain == "fourier":  # the half-plane: one of each Friedel pair
        k = k[(k[:, 1] > 0) | ((k[:, 1] == 0) & (k[:, 0] >= 0))]
    generator = torch.Generator().manual_seed(0)
    rotations = random_rotations(n_images, generator=generator).double()
    for start in range(0, n_images, batch):
        R = rotations[start:start + batch]
        coords = k @ R  # R^T k per image (row vectors): (B, P, 3) index units
        phase = torch.exp(-2j * math.pi * (coords @ x.T) / D)
        values = phase @ volume.reshape(-1).to(phase.dtype)
        values = values + noise * torch.randn(values.shape, generator=generator, dtype=torch.float64) * (1 + 1j)
        target = values if domain == "fourier" else values.real - values.imag
        yield coords / D, target, None, torch.ones(coords.shape[1])


@pytest.mark.parametrize("domain", ["fourier", "hartley"])
def test_the_consensus_of_a_blobs_slices_peaks_in_its_cell_with_fsc_near_one(domain):
    volume, fsc, n = lowpass_backprojection(_slices(domain), D, 4, domain=domain)
    assert n == 64 and volume.shape == (11, 11, 11) and fsc.shape == (5,)
    # noiseless halves agree up to the trilinear gridding's error, largest in the outer shell
    assert float(fsc[:4].min()) > 0.98 and float(fsc.min()) > 0.9
    # the map samples the box every D / n pixels, the origin at n // 2: its largest sample is the one nearest
    # the blob's centre
    n = volume.shape[0]
    ax = (torch.arange(n, dtype=torch.float32) - n // 2) * D / n
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    peak = [float(a.reshape(-1)[volume.argmax()]) for a in (xx, yy, zz)]
    assert max(abs(p - c) for p, c in zip(peak, CENTRE)) <= 0.5 * D / n + 1e-4
    levels = cell_maxima(volume, D, 4)  # cells of 4 px from -8: the centre (3, -2, 1) is in cell x 2, y 1, z 2
    assert tuple(int(i) for i in torch.nonzero(levels == levels.max())[0]) == (2, 1, 2)
    # low-passed at 4 cycles per box (a 4-px wavelength), the far corner cell is at most a few % of the peak
    assert float(levels[0, 3, 0]) < 0.1 * float(levels.max())


def test_both_domains_give_the_same_map_and_noise_lowers_the_fsc():
    fourier, _, _ = lowpass_backprojection(_slices("fourier"), D, 4, domain="fourier")
    hartley, _, _ = lowpass_backprojection(_slices("hartley"), D, 4, domain="hartley")
    assert float((fourier - hartley).abs().max()) < 0.05 * float(fourier.abs().max())
    _, clean, _ = lowpass_backprojection(_slices("fourier"), D, 4)
    _, noisy, _ = lowpass_backprojection(_slices("fourier", noise=30.0), D, 4)
    assert float(noisy[1:].mean()) < float(clean[1:].mean()) - 0.2
