"""Rotation matrices and their representations: RELION eulers, cryoSPARC rotation vectors,
quaternions, the 6-D representation, uniform random rotations and distances.

The convention (tested in tests/geometry/test_rotations.py)
-----------------------------------------------------------
A pose rotation ``R`` (a proper 3x3 rotation matrix) means

    image(x, y) = integral of V(R^T (x, y, z)) dz,

i.e. a world (volume) point ``X`` appears at image point ``(R X)_xy``.  The rows of ``R`` are the
image axes expressed in the volume frame: row 0 is the image x axis, row 1 the image y axis and
row 2, ``R^T e_z``, the viewing (projection) direction.  By the Fourier slice theorem the image's
2-D transform at ``k = (kx, ky)`` is the volume transform at ``R^T (kx, ky, 0)``.  cryoDRGN's
``poses.pkl`` stores exactly this ``R``.

* RELION eulers ``(rot, tilt, psi)`` in degrees give ``R = Rz(psi) Ry(tilt) Rz(rot)`` with the
  *passive* elementary matrices

      Rz(a) = [[cos a, sin a, 0], [-sin a, cos a, 0], [0, 0, 1]]
      Ry(b) = [[cos b, 0, -sin b], [0, 1, 0], [sin b, 0, cos b]]

  (RELION's ``Euler_angles2matrix``), which equals
  ``scipy.spatial.transform.Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True)
  .as_matrix().T``.  The viewing direction is then
  ``R^T e_z = (cos rot sin tilt, sin rot sin tilt, cos tilt)``: ``tilt`` is its colatitude and
  ``rot`` its longitude; ``psi`` is the in-plane rotation.
* A cryoSPARC ``alignments3D/pose`` rotation vector ``v`` gives ``R = expmap(v)^T``, the transpose
  of ``Rotation.from_rotvec(v).as_matrix()``.
* Rotation vectors, axis-angle and quaternions ``(w, x, y, z)`` here follow the ordinary *active*
  convention (scipy's): ``rotvec_to_matrix(v)`` rotates vectors by ``|v|`` radians counter-
  clockwise about ``v / |v|``, and ``quaternion_to_matrix(q)`` equals
  ``Rotation.from_quat([x, y, z, w]).as_matrix()``.  They are plain representations of a matrix;
  which matrix it is (a pose ``R`` or its transpose) is up to the caller.

Array types
-----------
Every function takes torch tensors with leading batch dimensions and returns tensors on the same
device and dtype.  Functions whose array inputs are all numpy arrays return numpy arrays (they run
through torch in the input's float precision; integer input becomes float64).  Python scalars are
accepted where a batch of scalars is.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import numpy as np
import torch

__all__ = [
    "euler_relion_to_matrix",
    "matrix_to_euler_relion",
    "rotvec_to_matrix",
    "matrix_to_rotvec",
    "cryosparc_pose_to_matrix",
    "matrix_to_cryosparc_pose",
    "quaternion_to_matrix",
    "matrix_to_quaternion",
    "sixd_to_matrix",
    "matrix_to_sixd",
    "random_quaternions",
    "random_rotations",
    "rotation_about_axis",
    "rotation_angle_between",
    "frobenius_squared",
]

ArrayLike = Any  # torch.Tensor or numpy.ndarray
_F = TypeVar("_F", bound=Callable[..., Any])


# ----------------------------------------------------------------------------------------------
# numpy in, numpy out
# ----------------------------------------------------------------------------------------------
def _to_tensor(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        # reshape: ascontiguousarray turns a 0-d array into shape (1,)
        return torch.from_numpy(np.ascontiguousarray(x).reshape(x.shape))
    return x


def _to_numpy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, tuple):
        return tuple(_to_numpy(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_numpy(v) for k, v in x.items()}
    return x


def numpy_compatible(func: _F) -> _F:
    """Let a tensor function take numpy arrays: if every array argument is a numpy array, the
    arguments are converted to tensors and the tensor results back to numpy arrays."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        values = list(args) + list(kwargs.values())
        has_numpy = any(isinstance(v, np.ndarray) for v in values)
        has_torch = any(isinstance(v, torch.Tensor) for v in values)
        if not has_numpy:
            return func(*args, **kwargs)
        args = tuple(_to_tensor(a) for a in args)
        kwargs = {k: _to_tensor(v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        return out if has_torch else _to_numpy(out)

    return wrapper  # type: ignore[return-value]


def _as_float_tensor(x: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    """Tensor of a floating dtype (python scalars / ints take ``like``'s or the default dtype)."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return x
        return x.to(like.dtype if like is not None and like.is_floating_point() else torch.get_default_dtype())
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    return torch.as_tensor(x, dtype=dtype, device=device)


def _check_last_dims(x: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(x.shape[x.ndim - len(shape):]) != shape or x.ndim < len(shape):
        raise ValueError(f"{name} must have trailing shape {shape}, got {tuple(x.shape)}")


def _small_eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


# ----------------------------------------------------------------------------------------------
# RELION eulers
# ----------------------------------------------------------------------------------------------
def _rz_passive(a: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([c, s, z, -s, c, z, z, z, o], dim=-1).reshape(*a.shape, 3, 3)


def _ry_passive(b: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(b), torch.sin(b)
    o, z = torch.ones_like(b), torch.zeros_like(b)
    return torch.stack([c, z, -s, z, o, z, s, z, c], dim=-1).reshape(*b.shape, 3, 3)


@numpy_compatible
def euler_relion_to_matrix(eulers_deg: ArrayLike) -> ArrayLike:
    """RELION ``(rot, tilt, psi)`` in degrees -> pose matrix ``R = Rz(psi) Ry(tilt) Rz(rot)``.

    Parameters
    ----------
    eulers_deg
        ``(..., 3)`` angles ``(rot, tilt, psi)`` in degrees (``rlnAngleRot``, ``rlnAngleTilt``,
        ``rlnAnglePsi``).

    Returns
    -------
    ``(..., 3, 3)`` rotation matrices in the cryoscape pose convention (module docstring).
    """
    eulers = _as_float_tensor(eulers_deg)
    _check_last_dims(eulers, (3,), "eulers_deg")
    rot, tilt, psi = torch.deg2rad(eulers).unbind(-1)
    return _rz_passive(psi) @ _ry_passive(tilt) @ _rz_passive(rot)


@numpy_compatible
def matrix_to_euler_relion(R: ArrayLike) -> ArrayLike:
    """Pose matrix -> RELION ``(rot, tilt, psi)`` in degrees, inverse of :func:`euler_relion_to_matrix`.

    ``tilt`` is in ``[0, 180]``, ``rot`` and ``psi`` in ``(-180, 180]``.  At gimbal lock
    (``tilt`` = 0 or 180, where only ``psi + rot`` resp. ``psi - rot`` is defined) ``rot`` is set
    to 0 and the whole in-plane angle goes into ``psi``.

    The sum ``psi + rot`` (for ``tilt <= 90``) or difference ``psi - rot`` (for ``tilt > 90``) is
    read from the upper-left 2x2 block, where it is well conditioned, so the round trip
    ``R -> eulers -> R`` is accurate to rounding error also near the poles.

    Parameters
    ----------
    R
        ``(..., 3, 3)`` rotation matrices.

    Returns
    -------
    ``(..., 3)`` angles ``(rot, tilt, psi)`` in degrees.
    """
    R = _as_float_tensor(R)
    _check_last_dims(R, (3, 3), "R")
    r20, r21, r22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    sin_tilt = torch.sqrt(r20 * r20 + r21 * r21)
    tilt = torch.atan2(sin_tilt, r22)
    locked = sin_tilt <= 8 * _small_eps(R.dtype)
    rot = torch.where(locked, torch.zeros_like(tilt), torch.atan2(r21, r20))
    # (1 + cos tilt) (cos, sin)(psi + rot) and (1 - cos tilt) (cos, sin)(psi - rot):
    psi_plus_rot = torch.atan2(R[..., 0, 1] - R[..., 1, 0], R[..., 0, 0] + R[..., 1, 1])
    psi_minus_rot = torch.atan2(R[..., 0, 1] + R[..., 1, 0], R[..., 1, 1] - R[..., 0, 0])
    psi = torch.where(r22 >= 0, psi_plus_rot - rot, psi_minus_rot + rot)
    psi = torch.atan2(torch.sin(psi), torch.cos(psi))  # wrap to (-pi, pi]
    return torch.rad2deg(torch.stack([rot, tilt, psi], dim=-1))


# ----------------------------------------------------------------------------------------------
# Axis-angle / rotation vectors
# ----------------------------------------------------------------------------------------------
def _skew(v: torch.Tensor) -> torch.Tensor:
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*v.shape[:-1], 3, 3)


@numpy_compatible
def rotvec_to_matrix(rotvec: ArrayLike) -> ArrayLike:
    """Rotation vector (axis times angle in radians, active) -> ``(..., 3, 3)`` matrix.

    Rodrigues' formula ``R = I + sin(a)/a K + (1 - cos a)/a^2 K^2`` with ``K = [v]_x``, using
    Taylor series for small ``a`` so it is accurate and differentiable at ``v = 0``.  Equals
    ``scipy.spatial.transform.Rotation.from_rotvec(v).as_matrix()``.
    """
    v = _as_float_tensor(rotvec)
    _check_last_dims(v, (3,), "rotvec")
    theta2 = (v * v).sum(-1)
    small = theta2 < 1e-6
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = torch.sqrt(theta2_safe)
    a = torch.where(small, 1 - theta2 / 6 + theta2 * theta2 / 120, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24 + theta2 * theta2 / 720, (1 - torch.cos(theta)) / theta2_safe)
    K = _skew(v)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand(K.shape)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


@numpy_compatible
def matrix_to_rotvec(R: ArrayLike) -> ArrayLike:
    """``(..., 3, 3)`` rotation matrix -> rotation vector (active; angle in ``[0, pi]``).

    Goes through the canonical quaternion (:func:`matrix_to_quaternion`), which is stable near
    angle 0 and angle pi; at exactly pi either of the two opposite vectors may come back.
    """
    q = matrix_to_quaternion(_as_float_tensor(R))
    w, xyz = q[..., 0], q[..., 1:]
    n = xyz.norm(dim=-1)
    angle = 2 * torch.atan2(n, w)
    small = n < 1e-6
    n_safe = torch.where(small, torch.ones_like(n), n)
    w_safe = torch.where(small, w, torch.ones_like(w))
    # angle / n -> 2/w (1 - n^2 / (3 w^2)) as n -> 0 (w is then close to 1)
    scale = torch.where(small, 2 / w_safe * (1 - n * n / (3 * w_safe * w_safe)), angle / n_safe)
    return xyz * scale[..., None]


@numpy_compatible
def cryosparc_pose_to_matrix(pose: ArrayLike) -> ArrayLike:
    """cryoSPARC ``alignments3D/pose`` rotation vector ``(..., 3)`` -> pose matrix ``expmap(v)^T``."""
    return rotvec_to_matrix(pose).transpose(-1, -2)


@numpy_compatible
def matrix_to_cryosparc_pose(R: ArrayLike) -> ArrayLike:
    """Pose matrix ``(..., 3, 3)`` -> cryoSPARC rotation vector, inverse of :func:`cryosparc_pose_to_matrix`."""
    return matrix_to_rotvec(_as_float_tensor(R).transpose(-1, -2))


# ----------------------------------------------------------------------------------------------
# Quaternions (w, x, y, z)
# ----------------------------------------------------------------------------------------------
@numpy_compatible
def quaternion_to_matrix(q: ArrayLike) -> ArrayLike:
    """Quaternion ``(..., 4)`` as ``(w, x, y, z)`` -> active rotation matrix ``(..., 3, 3)``.

    The quaternion need not be normalised (it is normalised here).  Equals scipy's
    ``Rotation.from_quat([x, y, z, w]).as_matrix()``.
    """
    q = _as_float_tensor(q)
    _check_last_dims(q, (4,), "q")
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    out = torch.stack(
        [
            1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy),
            2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx),
            2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy),
        ],
        dim=-1,
    )
    return out.reshape(*q.shape[:-1], 3, 3)


@numpy_compatible
def matrix_to_quaternion(R: ArrayLike) -> ArrayLike:
    """Active rotation matrix ``(..., 3, 3)`` -> unit quaternion ``(..., 4)`` ``(w, x, y, z)``, ``w >= 0``.

    Shepperd's method: of the four ways to read the quaternion off the matrix, each element uses
    the one whose square root argument is largest, so no division by a small number happens.
    """
    R = _as_float_tensor(R)
    _check_last_dims(R, (3, 3), "R")
    r00, r01, r02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    r10, r11, r12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    r20, r21, r22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    # 4 * (w^2, x^2, y^2, z^2)
    squares = torch.stack(
        [1 + r00 + r11 + r22, 1 + r00 - r11 - r22, 1 - r00 + r11 - r22, 1 - r00 - r11 + r22], dim=-1
    )
    best = squares.argmax(dim=-1, keepdim=True)
    # candidate j holds 4 q_j * q; the chosen one has 4 q_j^2 >= 1 so q_j >= 1/2.
    cand = torch.stack(
        [
            torch.stack([squares[..., 0], r21 - r12, r02 - r20, r10 - r01], dim=-1),
            torch.stack([r21 - r12, squares[..., 1], r01 + r10, r02 + r20], dim=-1),
            torch.stack([r02 - r20, r01 + r10, squares[..., 2], r12 + r21], dim=-1),
            torch.stack([r10 - r01, r02 + r20, r12 + r21, squares[..., 3]], dim=-1),
        ],
        dim=-2,
    )
    idx = best[..., None].expand(*best.shape[:-1], 1, 4)
    q = torch.gather(cand, -2, idx).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


# ----------------------------------------------------------------------------------------------
# 6-D representation
# ----------------------------------------------------------------------------------------------
@numpy_compatible
def sixd_to_matrix(sixd: ArrayLike) -> ArrayLike:
    """6-D representation ``(..., 6)`` -> rotation matrix ``(..., 3, 3)`` by Gram-Schmidt.

    The six numbers are two 3-vectors ``a1 = sixd[..., :3]``, ``a2 = sixd[..., 3:]`` taken as the
    first two *rows* of the matrix (image x and y axes of a pose): ``b1 = a1/|a1|``,
    ``b2 = normalise(a2 - (b1.a2) b1)``, ``b3 = b1 x b2``.  Continuous and differentiable, for
    gradient-based pose refinement.
    """
    x = _as_float_tensor(sixd)
    _check_last_dims(x, (6,), "sixd")
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


@numpy_compatible
def matrix_to_sixd(R: ArrayLike) -> ArrayLike:
    """Rotation matrix ``(..., 3, 3)`` -> 6-D representation: its first two rows, concatenated."""
    R = _as_float_tensor(R)
    _check_last_dims(R, (3, 3), "R")
    return R[..., :2, :].reshape(*R.shape[:-2], 6)


# ----------------------------------------------------------------------------------------------
# Random rotations, axis rotations, distances
# ----------------------------------------------------------------------------------------------
def random_quaternions(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(n, 4)`` unit quaternions ``(w, x, y, z)``, ``w >= 0``, uniform on SO(3) (Haar measure).

    A normalised 4-D Gaussian is uniform on the 3-sphere, and the 3-sphere covers SO(3) twice
    with the Haar measure.  Sampling happens on the generator's device, then moves to ``device``.
    """
    gen_device = generator.device if generator is not None else device
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64, device=gen_device)
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[:, :1] < 0, -q, q)
    return q.to(dtype=dtype, device=device)


def random_rotations(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(n, 3, 3)`` rotation matrices drawn uniformly (Haar measure) from SO(3).

    Built from :func:`random_quaternions`; the rotation angle ``a`` then has density
    ``(1 - cos a) / pi`` on ``[0, pi]``.  Pass a seeded ``generator`` for reproducibility.
    """
    q = random_quaternions(n, generator=generator, dtype=torch.float64, device=device)
    return quaternion_to_matrix(q).to(dtype)


@numpy_compatible
def rotation_about_axis(axis: ArrayLike, angle_rad: ArrayLike) -> ArrayLike:
    """Active rotation by ``angle_rad`` counter-clockwise about ``axis`` (Rodrigues).

    Parameters
    ----------
    axis
        ``(..., 3)`` axis directions (need not be unit length; must be non-zero).
    angle_rad
        ``(...)`` angles in radians, or a python float; broadcast against ``axis[..., 0]``.

    Returns
    -------
    ``(..., 3, 3)`` matrices ``M`` such that ``M @ p`` is ``p`` rotated about the axis through the
    origin (right-hand rule), e.g. ``rotation_about_axis([0, 0, 1], pi/2) @ e_x = e_y``.
    """
    axis = _as_float_tensor(axis)
    _check_last_dims(axis, (3,), "axis")
    angle = _as_float_tensor(angle_rad, like=axis)
    unit = axis / axis.norm(dim=-1, keepdim=True)
    return rotvec_to_matrix(unit * angle[..., None])


@numpy_compatible
def rotation_angle_between(R1: ArrayLike, R2: ArrayLike) -> ArrayLike:
    """Geodesic distance on SO(3): the angle in radians, in ``[0, pi]``, of ``R1^T R2``.

    Computed as ``atan2(sin a, cos a)`` from the antisymmetric part and the trace, which stays
    accurate for small angles (unlike ``arccos`` of the trace).  Broadcasts over batch dims.
    """
    R1 = _as_float_tensor(R1)
    R2 = _as_float_tensor(R2, like=R1)
    M = R1.transpose(-1, -2) @ R2
    axial = torch.stack(
        [M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], dim=-1
    )
    sin_a = 0.5 * axial.norm(dim=-1)
    cos_a = 0.5 * (M[..., 0, 0] + M[..., 1, 1] + M[..., 2, 2] - 1)
    return torch.atan2(sin_a, cos_a)


@numpy_compatible
def frobenius_squared(R1: ArrayLike, R2: ArrayLike) -> ArrayLike:
    """Squared Frobenius distance ``||R1 - R2||_F^2`` over the last two axes (``4 (1 - cos a)`` for rotations)."""
    R1 = _as_float_tensor(R1)
    R2 = _as_float_tensor(R2, like=R1)
    return ((R1 - R2) ** 2).sum(dim=(-1, -2))
