"""Tests of cryoscape.geometry.so3_grid: sizes, spacing, nesting, uniformity, translation grids."""

from __future__ import annotations

import math

import healpy
import numpy as np
import pytest
import torch
from scipy import stats

from cryoscape.geometry.rotations import (
    euler_relion_to_matrix,
    matrix_to_quaternion,
    random_rotations,
    rotation_angle_between,
)
from cryoscape.geometry.so3_grid import (
    base_grid_spacing_deg,
    locate_in_so3_grid,
    so3_grid,
    so3_grid_children,
    so3_grid_resolution,
    so3_grid_rotations,
    so3_grid_size,
    translation_grid,
    translation_grid_children,
)


def _angles_to_nearest(query: torch.Tensor, grid: torch.Tensor, k: int = 1):
    """Geodesic angles (degrees) and indices of the k nearest grid rotations, via quaternions."""
    dots = (matrix_to_quaternion(query) @ matrix_to_quaternion(grid).T).abs().clamp(max=1.0)
    top = torch.topk(dots, k, dim=1)
    return torch.rad2deg(2 * torch.arccos(top.values)), top.indices


@pytest.fixture(scope="module")
def grids():
    return {L: so3_grid(L, dtype=torch.float64) for L in (0, 1)}


@pytest.fixture(scope="module")
def random_R():
    return random_rotations(2000, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def test_sizes_and_ids():
    assert [so3_grid_size(L) for L in range(4)] == [576, 4608, 36864, 294912]
    assert so3_grid_resolution(2) == (8, 48)
    assert so3_grid_size(0, base_nside=4, base_n_psi=24) == 4608
    R, ids = so3_grid(0)
    assert R.shape == (576, 3, 3) and R.dtype == torch.float32 and ids.shape == (576, 2)
    assert ids.dtype == torch.int64
    assert len({tuple(x) for x in ids.tolist()}) == 576
    assert ids[:, 0].max() == 47 and ids[:, 1].max() == 11
    torch.testing.assert_close(ids[13], torch.tensor([1, 1]))  # pixel-major order


def test_spacing_values():
    assert [base_grid_spacing_deg(L) for L in range(3)] == [30.0, 15.0, 7.5]
    assert base_grid_spacing_deg(0, base_nside=4, base_n_psi=24) == 15.0


@pytest.mark.parametrize("level", [0, 1])
def test_rotations_are_proper_and_see_their_pixel(grids, level):
    R, ids = grids[level]
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye.expand_as(R), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(len(R), dtype=torch.float64))
    nside, _ = so3_grid_resolution(level)
    centres = np.stack(healpy.pix2vec(nside, ids[:, 0].numpy(), nest=True), axis=-1)
    np.testing.assert_allclose(R[:, 2].numpy(), centres, atol=1e-12)  # viewing direction = 3rd row


def test_level0_is_relion_eulers_of_pixel_centre(grids):
    R, ids = grids[0]
    theta, phi = healpy.pix2ang(2, ids[:, 0].numpy(), nest=True)
    psi = (ids[:, 1].numpy() + 0.5) * 30.0
    eulers = np.stack([np.degrees(phi), np.degrees(theta), psi], axis=-1)
    np.testing.assert_allclose(R.numpy(), euler_relion_to_matrix(eulers), atol=1e-12)


@pytest.mark.parametrize("level", [0, 1])
def test_nearest_neighbour_spacing_and_covering_radius(grids, random_R, level):
    R, _ = grids[level]
    spacing = base_grid_spacing_deg(level)
    nn, _ = _angles_to_nearest(R, R, k=2)
    nn = nn[:, 1]  # the first is the point itself
    assert 0.75 * spacing < nn.mean() < 1.05 * spacing
    assert nn.min() > 0.4 * spacing
    # every rotation is within ~0.85 spacing of the grid (a cubic lattice would give sqrt(3)/2)
    cover, _ = _angles_to_nearest(random_R, R)
    assert cover.max() < 0.85 * spacing
    assert 0.3 * spacing < cover.mean() < 0.5 * spacing


def test_children_partition_the_next_level(grids):
    _, ids0 = grids[0]
    _, ids1 = grids[1]
    kids = so3_grid_children(ids0)
    assert kids.shape == (576, 8, 2)
    torch.testing.assert_close(so3_grid_children(torch.tensor([5, 7])),
                               torch.tensor([[20, 14], [20, 15], [21, 14], [21, 15],
                                             [22, 14], [22, 15], [23, 14], [23, 15]]))
    flat = {tuple(x) for x in kids.flatten(0, 1).tolist()}
    assert flat == {tuple(x) for x in ids1.tolist()}
    assert so3_grid_children(ids0.reshape(16, 36, 2)).shape == (16, 36, 8, 2)


@pytest.mark.parametrize("level", [0, 1])
def test_children_lie_close_to_their_parent(level):
    R, ids = so3_grid(level, dtype=torch.float64)
    kids = so3_grid_children(ids)
    R_kids = so3_grid_rotations(kids, level + 1, dtype=torch.float64)
    d = torch.rad2deg(rotation_angle_between(R[:, None], R_kids))
    # half a parent spacing plus a little: children sit inside their parent's cell
    assert d.max() < 0.55 * base_grid_spacing_deg(level)


def test_children_cover_their_parents_cells(grids, random_R):
    """The nearest level-1 point of any rotation descends from one of its nearest level-0 points."""
    R0, ids0 = grids[0]
    R1, ids1 = grids[1]
    _, nearest1 = _angles_to_nearest(random_R, R1)
    parent = ids1[nearest1[:, 0]] // torch.tensor([4, 2])
    _, nearest0 = _angles_to_nearest(random_R, R0, k=4)
    is_parent = (ids0[nearest0] == parent[:, None, :]).all(dim=-1)  # (n, 4)
    # cells are not Voronoi cells, so it is not always the very nearest, but it is among the few
    assert is_parent[:, :1].any(dim=1).float().mean() > 0.8
    assert is_parent[:, :3].any(dim=1).float().mean() > 0.99
    assert is_parent.any(dim=1).all()


def test_locate_round_trip_and_nesting(grids, random_R):
    R1, ids1 = grids[1]
    torch.testing.assert_close(locate_in_so3_grid(R1, 1), ids1)
    at0 = locate_in_so3_grid(random_R, 0)
    at1 = locate_in_so3_grid(random_R, 1)
    assert at0.shape == (2000, 2)
    # cells are nested: the level-1 cell lies inside the level-0 cell
    torch.testing.assert_close(at1 // torch.tensor([4, 2]), at0)
    R2, ids2 = so3_grid(2, dtype=torch.float64)
    torch.testing.assert_close(locate_in_so3_grid(R2, 2), ids2)
    # the located grid point is near (cells are not Voronoi cells, so not always the nearest)
    d = torch.rad2deg(rotation_angle_between(random_R, so3_grid_rotations(at1, 1, dtype=torch.float64)))
    assert d.max() < 1.1 * base_grid_spacing_deg(1)
    assert torch.quantile(d, 0.99) < 0.85 * base_grid_spacing_deg(1)


def test_cells_have_equal_haar_measure():
    R = random_rotations(57600, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ids = locate_in_so3_grid(R, 0)
    counts = torch.bincount(ids[:, 0] * 12 + ids[:, 1], minlength=576).numpy()
    assert counts.sum() == 57600
    assert stats.chisquare(counts).pvalue > 1e-3
    # directions alone: equal-area HEALPix pixels
    assert stats.chisquare(np.bincount(ids[:, 0].numpy(), minlength=48)).pvalue > 1e-3


def test_grid_rotations_dtype_device_and_validation():
    ids = torch.tensor([[3, 4], [47, 11]])
    R = so3_grid_rotations(ids, 0)
    assert R.dtype == torch.float32 and R.device == ids.device and R.shape == (2, 3, 3)
    assert so3_grid_rotations(ids[None], 0).shape == (1, 2, 3, 3)
    with pytest.raises(ValueError):
        so3_grid_rotations(torch.tensor([[48, 0]]), 0)
    with pytest.raises(ValueError):
        so3_grid_rotations(torch.tensor([[0, 12]]), 0)
    with pytest.raises(ValueError):
        so3_grid(0, base_nside=3)


@pytest.mark.parametrize("n", [3, 14])
def test_translation_grid(n):
    extent = 20.0
    t = translation_grid(extent, n, dtype=torch.float64)
    assert t.shape == (n * n, 2)
    step = 2 * extent / n
    xs = torch.unique(t[:, 0])
    assert len(xs) == n
    torch.testing.assert_close(xs[1:] - xs[:-1], torch.full((n - 1,), step, dtype=torch.float64))
    torch.testing.assert_close(t.mean(dim=0), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert t.abs().max() == pytest.approx(extent - step / 2)
    assert (t.abs().sum(dim=1).min() == 0) == (n % 2 == 1)
    torch.testing.assert_close(t[1], torch.tensor([-extent + 1.5 * step, -extent + 0.5 * step], dtype=torch.float64))
    # every shift in the square is within half a step (per axis) of a grid point
    probe = torch.rand(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 * extent - extent
    cheb = (probe[:, None] - t[None]).abs().amax(dim=-1).min(dim=1).values
    assert cheb.max() <= step / 2 + 1e-12


def test_translation_grid_children():
    centres = torch.tensor([[[1.0, -2.0], [0.0, 0.0]]], dtype=torch.float64)
    kids = translation_grid_children(centres, extent_pixel=8.0, n_per_axis=4)
    assert kids.shape == (1, 2, 16, 2) and kids.dtype == torch.float64
    torch.testing.assert_close(kids.mean(dim=-2), centres)
    xs = torch.unique(kids[0, 1, :, 0])
    torch.testing.assert_close(xs[1:] - xs[:-1], torch.full((3,), 2.0, dtype=torch.float64))  # 2*4/4
    # twice the resolution of the parent grid
    parent = translation_grid(8.0, 4, dtype=torch.float64)
    assert torch.unique(parent[:, 0]).diff()[0] == pytest.approx(2 * 2.0)
    # successive refinement converges to any target shift
    target = torch.tensor([3.3, -5.1], dtype=torch.float64)
    grid, extent = translation_grid(10.0, 5, dtype=torch.float64), 10.0
    for _ in range(6):
        best = grid[(grid - target).norm(dim=-1).argmin()]
        grid = translation_grid_children(best, extent_pixel=extent, n_per_axis=5)
        extent /= 2
    assert (grid - target).norm(dim=-1).min() < 2 * extent / 5
    assert math.isclose(extent, 10.0 / 64)
