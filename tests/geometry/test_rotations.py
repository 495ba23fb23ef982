"""Tests of cryoscape.geometry.rotations: conventions, round trips, scipy cross-checks, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.transform import Rotation

from cryoscape.geometry.rotations import (
    cryosparc_pose_to_matrix,
    euler_relion_to_matrix,
    frobenius_squared,
    matrix_to_cryosparc_pose,
    matrix_to_euler_relion,
    matrix_to_quaternion,
    matrix_to_rotvec,
    matrix_to_sixd,
    quaternion_to_matrix,
    random_rotations,
    rotation_about_axis,
    rotation_angle_between,
    rotvec_to_matrix,
    sixd_to_matrix,
)


@pytest.fixture(scope="module")
def rotations() -> torch.Tensor:
    return random_rotations(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _special_rotations() -> torch.Tensor:
    """Rotations at the awkward places: identity, angle pi, gimbal lock and close to it."""
    eulers = torch.tensor(
        [
            [0.0, 0.0, 0.0],
            [30.0, 0.0, 40.0],
            [30.0, 180.0, 40.0],
            [30.0, 1e-9, 40.0],
            [30.0, 1e-4, 40.0],
            [30.0, 180 - 1e-7, 40.0],
            [180.0, 90.0, -180.0],
            [0.0, 180.0, 0.0],
            [90.0, 90.0, 90.0],
        ],
        dtype=torch.float64,
    )
    R = euler_relion_to_matrix(eulers)
    extra = [rotvec_to_matrix(torch.tensor(v, dtype=torch.float64)) for v in
             ([math.pi, 0, 0], [0, 0, math.pi], [math.pi / math.sqrt(2), -math.pi / math.sqrt(2), 0],
              [1e-9, 2e-9, 0], [0, 0, math.pi - 1e-9])]
    return torch.cat([R, torch.stack(extra)])


def test_euler_convention_matches_scipy_transpose(rotations):
    eulers = np.random.default_rng(1).uniform([-180, 0, -180], [180, 180, 180], size=(500, 3))
    ours = euler_relion_to_matrix(torch.from_numpy(eulers)).numpy()
    theirs = Rotation.from_euler("ZYZ", eulers, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_euler_hand_values():
    # rot = 90 only: R = Rz(90) passive = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]];
    # the volume's x axis shows up along -y in the image.
    R = euler_relion_to_matrix(torch.tensor([90.0, 0.0, 0.0], dtype=torch.float64))
    np.testing.assert_allclose(R.numpy(), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-15)
    # tilt = 90 only: Ry(90) passive = [[0, 0, -1], [0, 1, 0], [1, 0, 0]]; the viewing
    # direction (third row) is +x.
    R = euler_relion_to_matrix(torch.tensor([0.0, 90.0, 0.0], dtype=torch.float64))
    np.testing.assert_allclose(R.numpy(), [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-15)
    # Viewing direction is (cos rot sin tilt, sin rot sin tilt, cos tilt).
    R = euler_relion_to_matrix(torch.tensor([30.0, 60.0, 77.0], dtype=torch.float64))
    r, t = math.radians(30), math.radians(60)
    np.testing.assert_allclose(R[2].numpy(), [math.cos(r) * math.sin(t), math.sin(r) * math.sin(t), math.cos(t)],
                               atol=1e-15)


def test_euler_round_trip(rotations):
    R = torch.cat([rotations, _special_rotations()])
    eulers = matrix_to_euler_relion(R)
    assert eulers[:, 1].min() >= 0 and eulers[:, 1].max() <= 180
    assert eulers[:, [0, 2]].abs().max() <= 180
    torch.testing.assert_close(euler_relion_to_matrix(eulers), R, atol=1e-9, rtol=0)


def test_euler_gimbal_lock_puts_angle_in_psi():
    e = matrix_to_euler_relion(euler_relion_to_matrix(torch.tensor([[30.0, 0.0, 40.0], [30.0, 180.0, 40.0]],
                                                                    dtype=torch.float64)))
    np.testing.assert_allclose(e.numpy(), [[0, 0, 70], [0, 180, 10]], atol=1e-9)


def test_euler_float32_round_trip(rotations):
    R = rotations.float()
    back = euler_relion_to_matrix(matrix_to_euler_relion(R))
    assert (back - R).abs().max() < 2e-6


def test_numpy_in_numpy_out():
    e = np.array([[10.0, 20.0, 30.0]])
    R = euler_relion_to_matrix(e)
    assert isinstance(R, np.ndarray) and R.shape == (1, 3, 3) and R.dtype == np.float64
    assert isinstance(matrix_to_euler_relion(R), np.ndarray)
    np.testing.assert_allclose(matrix_to_euler_relion(R), e, atol=1e-10)
    assert isinstance(euler_relion_to_matrix(torch.from_numpy(e)), torch.Tensor)


def test_rotvec_matches_scipy_and_round_trips(rotations):
    R = torch.cat([rotations, _special_rotations()])
    v = matrix_to_rotvec(R)
    assert v.norm(dim=-1).max() <= math.pi + 1e-12
    torch.testing.assert_close(rotvec_to_matrix(v), R, atol=1e-9, rtol=0)
    np.testing.assert_allclose(Rotation.from_rotvec(v.numpy()).as_matrix(), R.numpy(), atol=1e-9)
    vs = np.random.default_rng(2).normal(size=(200, 3))
    np.testing.assert_allclose(rotvec_to_matrix(vs), Rotation.from_rotvec(vs).as_matrix(), atol=1e-12)


def test_rotvec_small_angles_are_accurate():
    v = torch.tensor([[1e-9, -2e-9, 3e-9], [1e-4, 0, 0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    np.testing.assert_allclose(rotvec_to_matrix(v).numpy(), Rotation.from_rotvec(v.numpy()).as_matrix(), atol=1e-15)
    np.testing.assert_allclose(matrix_to_rotvec(rotvec_to_matrix(v)).numpy(), v.numpy(), rtol=1e-7, atol=1e-18)
    # differentiable at 0
    v0 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    rotvec_to_matrix(v0)[0, 1].backward()
    np.testing.assert_allclose(v0.grad.numpy(), [0, 0, -1], atol=1e-12)


def test_rotvec_near_pi():
    axis = np.array([1.0, 2.0, -2.0]) / 3.0
    for angle in (math.pi, math.pi - 1e-8, math.pi - 1e-4):
        R = Rotation.from_rotvec(axis * angle).as_matrix()
        v = matrix_to_rotvec(R)
        np.testing.assert_allclose(Rotation.from_rotvec(v).as_matrix(), R, atol=1e-9)
        np.testing.assert_allclose(np.linalg.norm(v), angle, atol=1e-8)


def test_cryosparc_pose_is_transposed_expmap(rotations):
    vs = np.random.default_rng(3).normal(size=(100, 3))
    R = cryosparc_pose_to_matrix(vs)
    np.testing.assert_allclose(R, Rotation.from_rotvec(vs).as_matrix().transpose(0, 2, 1), atol=1e-12)
    back = cryosparc_pose_to_matrix(matrix_to_cryosparc_pose(rotations))
    torch.testing.assert_close(back, rotations, atol=1e-9, rtol=0)


def test_quaternions_match_scipy_and_are_canonical(rotations):
    R = torch.cat([rotations, _special_rotations()])
    q = matrix_to_quaternion(R)
    assert (q[:, 0] >= 0).all()
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(len(q), dtype=torch.float64))
    torch.testing.assert_close(quaternion_to_matrix(q), R, atol=1e-9, rtol=0)
    scipy_R = Rotation.from_quat(q[:, [1, 2, 3, 0]].numpy()).as_matrix()
    np.testing.assert_allclose(scipy_R, R.numpy(), atol=1e-9)
    # hand value: 90 degrees about z is (cos 45, 0, 0, sin 45)
    Rz = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    np.testing.assert_allclose(matrix_to_quaternion(Rz).numpy(), [math.sqrt(0.5), 0, 0, math.sqrt(0.5)], atol=1e-15)


def test_sixd_round_trip_and_gram_schmidt(rotations):
    torch.testing.assert_close(sixd_to_matrix(matrix_to_sixd(rotations)), rotations, atol=1e-12, rtol=0)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    R = sixd_to_matrix(x)
    eye = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(50, dtype=torch.float64))
    # first row is the normalised first vector
    torch.testing.assert_close(R[:, 0], x[:, :3] / x[:, :3].norm(dim=-1, keepdim=True))


def test_random_rotations_are_haar_uniform():
    R = random_rotations(20000, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(R @ R.transpose(-1, -2), eye.expand_as(R), atol=1e-12, rtol=0)
    assert torch.linalg.det(R).sub(1).abs().max() < 1e-12
    # E[R] = 0 for the Haar measure; each entry has std 1/sqrt(3) / sqrt(n) = 0.004 here
    assert R.mean(dim=0).abs().max() < 0.03
    # rotation angle density (1 - cos a) / pi, CDF (a - sin a) / pi
    angles = rotation_angle_between(eye, R).numpy()
    p = stats.kstest(angles, lambda a: (a - np.sin(a)) / np.pi).pvalue
    assert p > 1e-3
    # and a non-uniform sampler would fail the same test
    p_bad = stats.kstest(angles * 0.9, lambda a: (a - np.sin(a)) / np.pi).pvalue
    assert p_bad < 1e-6


def test_random_rotations_dtype_and_reproducibility():
    a = random_rotations(5, generator=torch.Generator().manual_seed(7))
    b = random_rotations(5, generator=torch.Generator().manual_seed(7))
    assert a.dtype == torch.float32 and a.shape == (5, 3, 3)
    assert torch.equal(a, b)


def test_rotation_about_axis():
    M = rotation_about_axis(torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), math.pi / 2)
    np.testing.assert_allclose((M @ torch.tensor([1.0, 0, 0], dtype=torch.float64)).numpy(), [0, 1, 0], atol=1e-15)
    axes = torch.randn(10, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    angles = torch.linspace(-3, 3, 10, dtype=torch.float64)
    M = rotation_about_axis(axes, angles)
    unit = axes / axes.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(M.numpy(), Rotation.from_rotvec((unit * angles[:, None]).numpy()).as_matrix(),
                               atol=1e-12)
    # the axis is fixed, and the angle is |angle|
    torch.testing.assert_close((M @ unit[..., None])[..., 0], unit)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(rotation_angle_between(eye, M), angles.abs())


def test_angle_between_and_frobenius(rotations):
    R1, R2 = rotations[:500], rotations[500:]
    angle = rotation_angle_between(R1, R2)
    expected = Rotation.from_matrix((R1.transpose(-1, -2) @ R2).numpy()).magnitude()
    np.testing.assert_allclose(angle.numpy(), expected, atol=1e-9)
    torch.testing.assert_close(frobenius_squared(R1, R2), 4 * (1 - torch.cos(angle)), atol=1e-12, rtol=0)
    # small angles are resolved (arccos of the trace would give 0 or ~1e-8 noise)
    small = rotation_about_axis(torch.tensor([1.0, 1, 0], dtype=torch.float64), torch.tensor(1e-10, dtype=torch.float64))
    d = rotation_angle_between(R1[:3], R1[:3] @ small)
    np.testing.assert_allclose(d.numpy(), 1e-10, rtol=1e-5)
    # symmetric, and a left-invariant metric
    torch.testing.assert_close(rotation_angle_between(R2, R1), angle)
    torch.testing.assert_close(rotation_angle_between(R2[:1] @ R1, R2[:1] @ R2), angle)


def test_projection_convention_with_points():
    """The pose R maps a volume point X to image point (R X)_xy; the view direction is R^T e_z."""
    R = euler_relion_to_matrix(torch.tensor([20.0, 35.0, -50.0], dtype=torch.float64))
    view = R[2]
    # Points along the viewing direction all land on the same image point.
    X0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    pts = X0 + torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None] * view
    image_pts = (pts @ R.T)[:, :2]
    torch.testing.assert_close(image_pts, image_pts[:1].expand_as(image_pts))


def test_gradients_flow_for_pose_refinement():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sixd_to_matrix, (x,))
    v = torch.tensor([[0.3, -0.2, 0.1], [1e-5, 2e-5, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rotvec_to_matrix, (v,))


def test_numpy_zero_dim_inputs_keep_their_shape():
    """A 0-d numpy angle gives one (3, 3) matrix, not a batch of one."""
    from cryoscape.geometry.rotations import rotation_about_axis

    R = rotation_about_axis(np.array([0.0, 0.0, 1.0]), np.array(0.3))
    assert R.shape == (3, 3)
    assert np.isclose(R[0, 0], np.cos(0.3))
