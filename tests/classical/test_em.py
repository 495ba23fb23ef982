"""E-step kernels: the GEMM expansion equals a brute-force loop; the search finds true poses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoscape.classical.em import (
    Reference,
    SearchSchedule,
    log_likelihoods,
    search_batch,
    significant,
)
from cryoscape.fourier.ctf import evaluate_ctf
from cryoscape.fourier.fft import fft2_center
from cryoscape.fourier.grids import grid_3d_index
from cryoscape.fourier.shift import phase_shift_images
from cryoscape.fourier.slicing import prepare_projection_volume, project_volume, sample_trilinear, slice_coordinates
from cryoscape.geometry.rotations import random_rotations, rotation_angle_between, rotvec_to_matrix
from cryoscape.geometry.so3_grid import so3_grid, translation_grid
from cryoscape.reconstruct.backproject import half_plane_coordinates


def _blobs(D: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    g = grid_3d_index(D, dtype=torch.float64)
    vol = torch.zeros(D, D, D, dtype=torch.float64)
    for _ in range(12):
        c = torch.tensor(rng.uniform(-D / 5, D / 5, 3))
        vol += rng.uniform(0.5, 1.5) * torch.exp(-((g - c) ** 2).sum(-1) / (2 * rng.uniform(1.0, 2.0) ** 2))
    return vol.float()


def _half_plane(images: torch.Tensor):
    """Centred-FFT coefficients of (B, D, D) images at the inserted half-plane pixels."""
    D = images.shape[-1]
    coords, _ = half_plane_coordinates(D)
    ft = fft2_center(images)
    ix, iy = coords[:, 0].long() + D // 2, coords[:, 1].long() + D // 2
    return ft[:, iy, ix], coords


def test_log_likelihoods_equal_brute_force_and_posterior_over_grid():
    """Tiny case: every (image, rotation, shift) log-likelihood and the posterior over the whole
    level-0 grid x 9 shifts, against a loop that applies the shift to the *model* (no expansion)
    and slices with fourier/slicing's trilinear sampler instead of the lattice."""
    D, B = 16, 3
    torch.manual_seed(0)
    vol = _blobs(D)
    images = torch.randn(B, D, D) * 3 + project_volume(vol, random_rotations(B, generator=torch.Generator().manual_seed(1)))
    x, coords = _half_plane(images)
    freqs = coords / (D * 4.0)
    ctf = evaluate_ctf(freqs, defocus_u_angstrom=torch.tensor([9000.0, 15000.0, 21000.0]),
                       defocus_v_angstrom=torch.tensor([8800.0, 15000.0, 20000.0]),
                       defocus_angle_deg=torch.tensor([10.0, 0.0, 80.0]), voltage_kv=300.0, cs_mm=2.7,
                       amplitude_contrast=0.1)
    inv_sigma2 = 1.0 / (1.0 + coords.norm(dim=-1))
    rotations, _ = so3_grid(0)
    shifts = translation_grid(1.5, 3)
    ref = Reference.from_volume(vol)
    fast = log_likelihoods(x, ctf, inv_sigma2, ref.slices(rotations, coords), shifts, coords, D)

    padded = prepare_projection_volume(vol, oversampling=2)
    slices = sample_trilinear(padded, slice_coordinates(rotations, 2 * coords))  # (C, P)
    brute = torch.empty(B, len(rotations), len(shifts), dtype=torch.float64)
    for i in range(B):
        for c in range(len(rotations)):
            for t, s in enumerate(shifts):
                model = ctf[i] * slices[c] * torch.exp(2j * math.pi * (coords @ s) / D)
                brute[i, c, t] = -((x[i] - model).abs().double() ** 2 * inv_sigma2).sum()
    assert torch.allclose(fast.double(), brute, rtol=2e-4, atol=0.05 * brute.abs().mean().item() * 1e-3)
    post_fast = torch.softmax(fast.double().reshape(B, -1), dim=1)
    post_brute = torch.softmax(brute.reshape(B, -1), dim=1)
    assert (post_fast - post_brute).abs().max() < 1e-3


def test_significant_keeps_the_mass():
    log_mass = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.999, 0.0005, 0.0003, 0.0002]]))
    index, keep = significant(log_mass, significance=0.9, max_count=4)
    assert keep[0].tolist() == [True, True, True] and index[0].tolist() == [0, 1, 2]
    assert keep[1].tolist() == [True, False, False]


@pytest.mark.parametrize("local", [False, True])
def test_search_finds_true_poses_of_noiseless_images(local):
    """Images of known pose and shift (the simulator's conventions) are found within the grid
    spacing, by the global search and by the local search started from a neighbouring cell."""
    D, B = 32, 8
    vol = _blobs(D, seed=3)
    R = random_rotations(B, generator=torch.Generator().manual_seed(4))
    true_shifts = torch.tensor(np.random.default_rng(5).uniform(-2, 2, (B, 2)), dtype=torch.float32)
    proj = project_volume(vol, R)
    # the particle sits at the centre minus its shift: move the projection by -shift
    images = _recentre(phase_shift_images(fft2_center(proj), -true_shifts))
    x, coords = _half_plane(images)
    ctf = torch.ones(x.shape)
    ref = Reference.from_volume(vol)
    schedule = SearchSchedule(level=3, local=local, offset_range_pixel=3.0)
    # the local search starts from poses 5 degrees and 0.3 pixels off
    turn = rotvec_to_matrix(torch.nn.functional.normalize(torch.randn(B, 3, generator=torch.Generator().manual_seed(6)),
                                                          dim=-1) * math.radians(5.0))
    prior = R @ turn if local else None
    post = search_batch(ref, x, ctf, torch.ones(coords.shape[0]), coords, schedule,
                        prior_shifts_pixel=true_shifts + 0.3 if local else torch.zeros(B, 2),
                        prior_rotations=prior)
    angle = torch.rad2deg(rotation_angle_between(post.rotations[:, 0].double(), R.double()))
    assert angle.max() < 4.5, angle  # within about one 3.75-degree grid step
    assert (post.shifts_pixel[:, 0] - true_shifts).norm(dim=-1).max() < 0.3
    assert torch.allclose(post.weights.sum(1), torch.ones(B), atol=1e-5)


def _recentre(images_ft: torch.Tensor) -> torch.Tensor:
    from cryoscape.fourier.fft import ifft2_center

    return ifft2_center(images_ft).real


def test_a_local_window_at_a_coarser_level_reaches_poses_several_fine_steps_away():
    """A local search at level 5 (0.94 degrees) from poses 6 degrees off: a window of one
    level-4 step (the default, 1.9 degrees) cannot reach the truth in one E-step, a window of one
    level-3 step (3.75 degrees, what refine uses) does, and its children refine it to the fine grid."""
    from cryoscape.classical.em import local_candidates

    D, B = 32, 8
    vol = _blobs(D, seed=3)
    R = random_rotations(B, generator=torch.Generator().manual_seed(7))
    images = project_volume(vol, R)
    x, coords = _half_plane(images)
    turn = rotvec_to_matrix(torch.nn.functional.normalize(torch.randn(B, 3, generator=torch.Generator().manual_seed(8)),
                                                          dim=-1) * math.radians(6.0))
    errors = {}
    for start in (None, 3):
        schedule = SearchSchedule(level=5, local=True, local_start_level=start, offset_range_pixel=1.0)
        post = search_batch(Reference.from_volume(vol), x, torch.ones(x.shape), torch.ones(coords.shape[0]), coords,
                            schedule, prior_shifts_pixel=torch.zeros(B, 2), prior_rotations=R @ turn)
        errors[start] = torch.rad2deg(rotation_angle_between(post.rotations[:, 0].double(), R.double()))
    assert errors[3].median() < 1.5 and errors[3].max() < 2.5, errors[3]
    assert errors[None].median() > 2.5, errors[None]
    # two steps: the window holds the prior's cell, its 26 one-step and 26 two-step neighbours, once each
    ids, keep = local_candidates(R, 3, steps=2)
    assert ids.shape == (B, 53, 2)
    key = ids[..., 0] * 1000 + ids[..., 1]
    for b in range(B):
        assert len(set(key[b][keep[b]].tolist())) == int(keep[b].sum())


def test_a_reference_cropped_to_a_band_slices_like_the_full_one_inside_it():
    """Band-limited E-steps keep only the lattice their slices touch: the same values inside the
    radius, a smaller array."""
    volume = _blobs(32)
    full, cropped = Reference.from_volume(volume), Reference.from_volume(volume, radius_index=6.0)
    assert cropped.lattice.values.shape[-1] < full.lattice.values.shape[-1] / 2
    coords, _ = half_plane_coordinates(32)
    inside = coords[coords.norm(dim=-1) < 6.0]
    rotations = random_rotations(5, generator=torch.Generator().manual_seed(1))
    a, b = full.slices(rotations, inside), cropped.slices(rotations, inside)
    assert torch.allclose(a, b, atol=1e-5 * float(a.abs().max()))
    assert torch.equal(Reference.from_volume(volume, radius_index=40.0).lattice.values, full.lattice.values)
