"""Tests of cryoscape.geometry.align: global rotation and handedness, derived from projections."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoscape.geometry.align import align_rotation_sets, mirror_poses, pose_errors
from cryoscape.geometry.rotations import (
    random_rotations,
    rotation_about_axis,
    rotation_angle_between,
)

F = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


def _project(points: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Image positions ``(R X)_xy`` of a point-cloud "map" under poses ``R``: (N, P, 2)."""
    return torch.einsum("nij,pj->npi", R, points)[..., :2]


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    R_true = random_rotations(300, generator=g, dtype=torch.float64)
    Q = random_rotations(1, generator=g, dtype=torch.float64)[0]
    points = torch.randn(7, 3, generator=g, dtype=torch.float64)  # an asymmetric (chiral) "map"
    return R_true, Q, points


def test_rotated_and_mirrored_maps_give_the_same_images(setup):
    """The derivations in align.py's docstring, checked against the projection definition."""
    R_true, Q, X = setup
    images = _project(X, R_true)
    # map turned by Q (points Q X), poses R Q^T
    torch.testing.assert_close(_project(X @ Q.T, R_true @ Q.T), images)
    # mirrored map (points F X), poses F R F
    torch.testing.assert_close(_project(X @ F, mirror_poses(R_true)), images)
    # a mirrored map cannot be matched by a rotation alone (the point cloud is chiral)
    G, aligned, flipped = align_rotation_sets(mirror_poses(R_true), R_true, flip=False)
    assert not flipped and rotation_angle_between(aligned, R_true).mean() > 0.3


def test_recovers_global_rotation(setup):
    R_true, Q, _ = setup
    R_pred = R_true @ Q.T  # poses of the map turned by Q
    G, aligned, flipped = align_rotation_sets(R_pred, R_true)
    assert not flipped
    torch.testing.assert_close(G, Q, atol=1e-9, rtol=0)
    assert rotation_angle_between(aligned, R_true).max() < 1e-6


def test_recovers_handedness_flip_and_map_transform(setup):
    R_true, Q, X = setup
    # predicted map: the true one mirrored, then turned by Q; its poses reproduce the same images
    Y = (X @ F) @ Q.T
    R_pred = mirror_poses(R_true) @ Q.T
    torch.testing.assert_close(_project(Y, R_pred), _project(X, R_true))
    G, aligned, flipped = align_rotation_sets(R_pred, R_true, flip=True)
    assert flipped
    assert rotation_angle_between(aligned, R_true).max() < 1e-6
    # docstring: V_true(X) = V_pred(F G X), i.e. true points are G^T F applied to predicted ones
    torch.testing.assert_close(Y @ F @ G, X)


def test_robust_to_noise_and_outliers(setup):
    R_true, Q, _ = setup
    g = torch.Generator().manual_seed(1)
    n = len(R_true)
    noise = rotation_about_axis(torch.randn(n, 3, generator=g, dtype=torch.float64),
                                torch.full((n,), np.deg2rad(3.0), dtype=torch.float64))
    R_pred = R_true @ noise @ Q.T
    R_pred[: n // 3] = random_rotations(n // 3, generator=g, dtype=torch.float64)  # a third are wrong
    G, _, flipped = align_rotation_sets(R_pred, R_true)
    assert not flipped
    assert np.rad2deg(rotation_angle_between(G, Q).item()) < 0.5
    # the plain least-squares fit is pulled by the wrong third
    G_plain, _, _ = align_rotation_sets(R_pred, R_true, robust=False)
    assert np.rad2deg(rotation_angle_between(G_plain, Q).item()) > 1.0
    # and with a mirrored prediction the handedness is still found
    _, aligned, flipped = align_rotation_sets(mirror_poses(R_pred), R_true)
    assert flipped
    assert torch.rad2deg(rotation_angle_between(aligned, R_true)[n // 3:]).max() < 6.0


def test_numpy_and_float32_inputs(setup):
    R_true, Q, _ = setup
    R_pred = R_true @ Q.T
    G, aligned, flipped = align_rotation_sets(R_pred.numpy(), R_true.numpy())
    assert isinstance(G, np.ndarray) and isinstance(aligned, np.ndarray) and flipped is False
    np.testing.assert_allclose(G, Q.numpy(), atol=1e-9)
    G32, aligned32, _ = align_rotation_sets(R_pred.float(), R_true.float())
    assert G32.dtype == torch.float32 and aligned32.shape == (len(R_true), 3, 3)
    torch.testing.assert_close(G32, Q.float(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        align_rotation_sets(R_pred, R_true[:10])


def test_pose_errors(setup):
    R_true, Q, _ = setup
    g = torch.Generator().manual_seed(2)
    n = len(R_true)
    angles = torch.full((n,), np.deg2rad(5.0), dtype=torch.float64)
    axes = torch.randn(n, 3, generator=g, dtype=torch.float64)
    R_pred = mirror_poses(R_true @ rotation_about_axis(axes, angles)) @ Q.T
    t_true = torch.randn(n, 2, generator=g, dtype=torch.float64) * 5
    t_pred = t_true + torch.tensor([3.0, 4.0], dtype=torch.float64)
    out = pose_errors(R_pred, R_true, t_pred, t_true)
    assert out["handedness_flipped"] is True
    assert out["angle_deg_mean"] == pytest.approx(5.0, abs=0.05)
    assert out["angle_deg_median"] == pytest.approx(5.0, abs=0.05)
    expected_frob = 4 * (1 - np.cos(np.deg2rad(5.0)))
    assert out["rotation_frobenius_mean"] == pytest.approx(expected_frob, rel=0.02)
    assert out["rotation_frobenius_median"] == pytest.approx(expected_frob, rel=0.02)
    assert out["translation_pixel_mean"] == pytest.approx(5.0)
    assert out["translation_pixel_median"] == pytest.approx(5.0)
    # without alignment the global rotation dominates the error
    raw = pose_errors(R_pred.numpy(), R_true.numpy(), align=False)
    assert raw["angle_deg_mean"] > 30 and "translation_pixel_mean" not in raw
    with pytest.raises(ValueError):
        pose_errors(R_pred, R_true, t_pred, None)


def test_pose_errors_fits_an_off_centre_map(setup):
    R_true, _, _ = setup
    g = torch.Generator().manual_seed(3)
    n = len(R_true)
    s = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)  # reconstruction off-centre by s
    t_true = torch.randn(n, 2, generator=g, dtype=torch.float64) * 5
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.1
    t_pred = t_true - (R_true @ s)[:, :2] + noise
    plain = pose_errors(R_true, R_true, t_pred, t_true)
    fitted = pose_errors(R_true, R_true, t_pred, t_true, fit_map_shift=True)
    assert plain["translation_pixel_mean"] > 2.0
    assert fitted["translation_pixel_mean"] < 0.2
    assert fitted["map_shift_pixel"] == pytest.approx(s.norm().item(), rel=0.02)
    assert fitted["angle_deg_mean"] < 1e-6
