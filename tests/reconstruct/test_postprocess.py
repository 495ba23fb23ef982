"""Post-processing: Guinier B-factor recovery, phase randomisation, mask-corrected FSC, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoscape.fourier.filters import apply_b_factor
from cryoscape.fourier.fsc import fourier_shell_correlation
from cryoscape.reconstruct.postprocess import (
    guinier_b_factor,
    mask_corrected_fsc,
    postprocess,
    randomize_phases,
    solvent_mask,
)

PIXEL = 1.5


def _point_atoms(D: int = 64, n: int = 4000, seed: int = 0, ball: bool = False) -> torch.Tensor:
    """Unit point atoms at random voxels: a flat power spectrum in expectation (over the whole box;
    a ball's edge adds low-frequency power, which the mask tests want)."""
    rng = np.random.default_rng(seed)
    vol = np.zeros((D, D, D))
    pts = rng.integers(0, D, size=(4 * n, 3))
    if ball:
        pts = pts[np.linalg.norm(pts - D // 2, axis=1) < D // 4]
    np.add.at(vol, tuple(pts[:n].T), 1.0)
    return torch.as_tensor(vol)


@pytest.mark.parametrize("b_factor", [60.0, 150.0])
def test_guinier_recovers_a_known_b_factor_within_10_percent(b_factor):
    blurred = apply_b_factor(_point_atoms(), b_factor, PIXEL, ndim=3)
    estimate = guinier_b_factor(blurred, PIXEL, low_angstrom=10.0, high_angstrom=3.5)
    assert abs(estimate - b_factor) < 0.1 * b_factor, estimate


def test_sharpening_recovers_the_b_factor_of_half_maps():
    """Two noisy half-maps of a blurred map: postprocess estimates B within 10 % and its sharpened
    map is closer to the unblurred truth (inside the resolution) than the blurred one."""
    truth = _point_atoms().float()
    blurred = apply_b_factor(truth.double(), 100.0, PIXEL, ndim=3).float()
    gen = torch.Generator().manual_seed(1)
    noise = 0.02 * blurred.std()
    halves = [blurred + noise * torch.randn(blurred.shape, generator=gen) for _ in range(2)]
    mask = torch.ones_like(truth)
    result = postprocess(halves[0], halves[1], PIXEL, mask=mask, guinier_low_angstrom=10.0)
    assert abs(result.b_factor_angstrom2 - 100.0) < 10.0, result.b_factor_angstrom2
    assert result.resolution_angstrom < 3.6


def test_phase_randomisation_keeps_amplitudes_and_kills_high_frequency_correlation():
    vol = apply_b_factor(_point_atoms(D=32, n=500), 20.0, PIXEL, ndim=3)
    rand = randomize_phases(vol, 6, generator=torch.Generator().manual_seed(0))
    freqs, fsc = fourier_shell_correlation(vol, rand)
    assert (fsc[:6] > 0.999).all()
    assert fsc[10:].abs().max() < 0.3
    ft_a = torch.fft.fftn(vol).abs()
    ft_b = torch.fft.fftn(rand).abs()
    assert torch.allclose(ft_a, ft_b, rtol=1e-6, atol=1e-6 * ft_a.max())


def test_mask_correction_removes_the_mask_induced_correlation():
    """Independent noise half-maps under a tight mask correlate through the mask alone; the
    corrected FSC beyond the randomisation shell is near 0."""
    D = 48
    gen = torch.Generator().manual_seed(2)
    signal = apply_b_factor(_point_atoms(D=D, n=800, seed=3, ball=True), 200.0, PIXEL, ndim=3)
    h1 = signal + 0.5 * signal.std() * torch.randn(signal.shape, generator=gen, dtype=torch.float64)
    h2 = signal + 0.5 * signal.std() * torch.randn(signal.shape, generator=gen, dtype=torch.float64)
    mask = solvent_mask(signal, PIXEL, lowpass_angstrom=8.0, dilate_pixel=1.0, edge_width_pixel=2.0)
    freqs, unmasked, masked, rand, corrected, shell = mask_corrected_fsc(h1, h2, mask)
    outer = slice(shell + 3, D // 2)
    assert rand[outer].mean() > 0.02  # the mask correlates pure noise
    assert corrected[outer].abs().mean() < masked[outer].abs().mean()
