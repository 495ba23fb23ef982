"""Symmetry in reconstruction: symmetrised sums equal inserting every symmetry mate, and help."""

from __future__ import annotations

import numpy as np
import torch

from cryoscape.fourier.fsc import fourier_shell_correlation
from cryoscape.fourier.grids import grid_3d_index
from cryoscape.fourier.slicing import project_volume
from cryoscape.geometry.rotations import random_rotations
from cryoscape.geometry.symmetry import symmetry_group
from cryoscape.reconstruct.backproject import backproject_images, reconstruct_from_accumulator


def _symmetric_blobs(D, group, seed=0):
    rng = np.random.default_rng(seed)
    g = grid_3d_index(D, dtype=torch.float64)
    vol = torch.zeros(D, D, D, dtype=torch.float64)
    for _ in range(6):
        c = rng.uniform(-D / 5, D / 5, 3)
        a, s = rng.uniform(0.5, 1.5), rng.uniform(1.2, 2.0)
        for m in group:
            cc = torch.as_tensor(m @ c)
            vol += a * torch.exp(-((g - cc) ** 2).sum(-1) / (2 * s * s))
    return vol.float()


def _map(images, R, D, group=None):
    acc = backproject_images(lambda i: images[i], box_size=D, rotations=R, invert_contrast=False, progress=False)
    if group is not None:
        acc.apply_symmetry_(group)
    return reconstruct_from_accumulator(acc, regularization=1e-3, sphere_mask_radius_fraction=None).volume


def test_symmetrised_sums_equal_inserting_every_mate_and_improve_few_view_maps():
    D = 32
    group = symmetry_group("D2")
    vol = _symmetric_blobs(D, group)
    mirrored = vol.flip(0).flip(1).roll((1, 1), (0, 1))  # index i -> D - i: (y, z) -> (-y, -z)
    assert torch.allclose(vol, mirrored, atol=1e-4)  # the 2-fold about x
    R = random_rotations(40, generator=torch.Generator().manual_seed(1)).numpy()
    images = project_volume(vol, torch.as_tensor(R)).numpy()
    with_sym = _map(images, R, D, group)
    expanded_R = (R[:, None] @ group[None].astype(np.float32)).reshape(-1, 3, 3)
    expanded = _map(np.repeat(images, len(group), axis=0), expanded_R, D)
    _, same = fourier_shell_correlation(with_sym, expanded)
    assert same[1 : D // 2 - 2].min() > 0.98
    _, fsc_sym = fourier_shell_correlation(with_sym, vol)
    _, fsc_plain = fourier_shell_correlation(_map(images, R, D), vol)
    assert fsc_sym[1 : D // 2].mean() > fsc_plain[1 : D // 2].mean() + 0.02
