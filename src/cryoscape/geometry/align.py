"""Alignment of two sets of poses of the same particles, for evaluating poses against the truth.

Why poses are compared only up to a global rotation and a mirror (tested in
tests/geometry/test_align.py)
------------------------------------------------------------------------------------------
With the pose convention of :mod:`cryoscape.geometry.rotations`, image_i = P[V o R_i^T] (``P``
integrates along z), a reconstruction is defined only up to:

* a global rotation: the map ``V'(X) = V(Q^T X)`` (``V`` turned by ``Q``) with the poses
  ``R'_i = R_i Q^T`` gives the same images, because ``V'(R'^T x) = V(Q^T Q R_i^T x)``;
* a mirror (handedness): the map ``V'(X) = V(F X)`` with ``F = diag(1, 1, -1)`` and the poses
  ``R'_i = F R_i F`` gives the same images, because ``V'(R'^T x) = V(R_i^T F x)`` and ``F``
  only flips the z that is integrated away.  ``F R F`` is again a proper rotation.  A mirror in
  any other plane is this one followed by a rotation.

So predicted poses relate to the truth as ``R_true_i = H(R_pred_i) G`` with ``H`` the identity or
``R -> F R F`` and ``G`` one rotation for all particles.  :func:`align_rotation_sets` finds ``G``
by orthogonal Procrustes, minimising ``sum_i ||H(R_pred_i) G - R_true_i||_F^2``: with
``M = sum_i H(R_pred_i)^T R_true_i = U S V^T``, ``G = U diag(1, 1, det(U V^T)) V^T``.  The
predicted map brought into the frame of the true one is ``V_true(X) ~ V_pred(F G X)`` (drop
``F`` if no flip).  Poses that are simply wrong are spread over SO(3) and add little to ``M``,
so the fit tolerates a fair share of outliers.

Shifts are unchanged by a rotation or mirror about the box centre.  A reconstruction that sits
off-centre by a 3-D vector ``s`` moves every shift by ``(R_i s)_xy``; :func:`pose_errors` can fit
and remove that (``fit_map_shift=True``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cryoscape.geometry.rotations import (
    _as_float_tensor,
    frobenius_squared,
    numpy_compatible,
    rotation_angle_between,
)

__all__ = ["mirror_poses", "align_rotation_sets", "pose_errors"]

ArrayLike = Any


def _mirror_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=dtype, device=device))


@numpy_compatible
def mirror_poses(R: ArrayLike) -> ArrayLike:
    """Poses of the mirrored map ``V(F X)``, ``F = diag(1, 1, -1)``: ``F R F`` for ``(..., 3, 3)`` ``R``."""
    R = _as_float_tensor(R)
    F = _mirror_matrix(R.dtype, R.device)
    return F @ R @ F


def _procrustes(R_pred: torch.Tensor, R_true: torch.Tensor) -> torch.Tensor:
    """Rotation ``G`` minimising ``sum ||R_pred_i G - R_true_i||_F^2`` (float64)."""
    M = torch.einsum("nji,njk->ik", R_pred, R_true)
    U, _, Vh = torch.linalg.svd(M)
    D = torch.ones(3, dtype=M.dtype, device=M.device)
    D[2] = torch.sign(torch.linalg.det(U @ Vh))  # +-1: U, Vh are orthogonal
    return U @ torch.diag(D) @ Vh


def _fit(pred: torch.Tensor, true: torch.Tensor, robust: bool) -> tuple[torch.Tensor, float]:
    """Procrustes fit, then robust refits on the inliers; returns ``G`` and the cost to compare
    handedness by (sum over the better-agreeing half when robust)."""
    G = _procrustes(pred, true)
    errors = frobenius_squared(pred @ G, true)
    if not robust or len(pred) < 4:
        return G, errors.sum().item()
    for _ in range(_ROBUST_ITERATIONS):
        # inliers: at most 3x the angle of the best quarter (Frobenius ~ angle^2), and never
        # fewer than the better half
        q25, q50 = torch.quantile(errors, torch.tensor([0.25, 0.5], dtype=errors.dtype))
        inliers = errors <= torch.maximum(9 * q25, q50)
        G = _procrustes(pred[inliers], true[inliers])
        errors = frobenius_squared(pred @ G, true)
    return G, torch.topk(errors, len(pred) // 2, largest=False).values.sum().item()


_ROBUST_ITERATIONS = 3


@numpy_compatible
def align_rotation_sets(
    R_pred: ArrayLike, R_true: ArrayLike, *, flip: bool = True, robust: bool = True
) -> tuple[ArrayLike, ArrayLike, bool]:
    """Global rotation (and optionally mirror) that best maps predicted poses onto the truth.

    Parameters
    ----------
    R_pred, R_true
        ``(N, 3, 3)`` pose matrices of the same particles.
    flip
        Also try the mirrored predictions ``F R_pred F`` (``F = diag(1, 1, -1)``) and keep
        whichever fits better.
    robust
        After the fit on all particles, refit three times on the inliers (errors up to 3x the
        angle of the best quarter, and at least the better half), and compare handedness on the
        better half, so a minority of wrong poses (e.g. from ab initio search) does not bias
        ``G``.  Without it, ``n_wrong`` random poses perturb ``G`` by roughly
        ``sqrt(n_wrong / 3) / n_right`` radians.

    Returns
    -------
    R_global
        ``(3, 3)`` rotation ``G`` (float64 for numpy input, else dtype of ``R_pred``).
    aligned
        ``(N, 3, 3)`` ``H(R_pred) G``, directly comparable with ``R_true``.
    handedness_flipped
        Whether the mirror was applied (``H(R) = F R F``).
    """
    R_pred = _as_float_tensor(R_pred)
    R_true = _as_float_tensor(R_true, like=R_pred)
    if R_pred.ndim != 3 or R_pred.shape[-2:] != (3, 3) or R_pred.shape != R_true.shape:
        raise ValueError(
            f"R_pred and R_true must both be (N, 3, 3), got {tuple(R_pred.shape)} and {tuple(R_true.shape)}"
        )
    pred64 = R_pred.to(torch.float64)
    true64 = R_true.to(torch.float64)
    candidates = [False, True] if flip else [False]
    best = None
    for flipped in candidates:
        pred = mirror_poses(pred64) if flipped else pred64
        G, cost = _fit(pred, true64, robust)
        if best is None or cost < best[0]:
            best = (cost, G, pred @ G, flipped)
    _, G, aligned, flipped = best
    return G.to(R_pred.dtype), aligned.to(R_pred.dtype), flipped


def _fit_map_shift(R_true: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """3-D ``s`` minimising ``sum_i ||delta_i - (R_true_i s)_xy||^2``."""
    A = R_true[:, :2, :].reshape(-1, 3)
    b = delta.reshape(-1, 1)
    return torch.linalg.lstsq(A, b).solution[:, 0]


def _float64_cpu(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _median(x: torch.Tensor) -> float:
    return float(np.median(x.numpy()))


def pose_errors(
    R_pred: ArrayLike,
    R_true: ArrayLike,
    t_pred: ArrayLike | None = None,
    t_true: ArrayLike | None = None,
    *,
    align: bool = True,
    flip: bool = True,
    robust: bool = True,
    fit_map_shift: bool = False,
) -> dict[str, float | bool]:
    """Summary of pose errors against the truth, after the best global alignment.

    Parameters
    ----------
    R_pred, R_true
        ``(N, 3, 3)`` pose matrices (tensors or numpy arrays).
    t_pred, t_true
        Optional ``(N, 2)`` shifts ``(x, y)`` in pixels.
    align
        Align ``R_pred`` to ``R_true`` first (:func:`align_rotation_sets`); if False the poses are
        compared as given.
    flip, robust
        Passed to :func:`align_rotation_sets`.
    fit_map_shift
        Fit and remove the shift pattern ``(R_true_i s)_xy`` of an off-centre reconstruction
        before measuring translation errors.

    Returns
    -------
    dict with ``rotation_frobenius_mean``, ``rotation_frobenius_median`` (squared Frobenius
    ``||R_aligned - R_true||_F^2``), ``angle_deg_mean``, ``angle_deg_median`` (geodesic),
    ``handedness_flipped``, and with shifts ``translation_pixel_mean``,
    ``translation_pixel_median`` (Euclidean), plus ``map_shift_pixel`` (norm of ``s``) when
    ``fit_map_shift``.
    """
    Rp, Rt = _float64_cpu(R_pred), _float64_cpu(R_true)
    if Rp.shape != Rt.shape:
        raise ValueError(f"R_pred and R_true must have the same shape, got {tuple(Rp.shape)} and {tuple(Rt.shape)}")
    flipped = False
    if align:
        _, aligned, flipped = align_rotation_sets(Rp, Rt, flip=flip, robust=robust)
    else:
        aligned = Rp
    frob = frobenius_squared(aligned, Rt)
    angle_deg = torch.rad2deg(rotation_angle_between(aligned, Rt))
    out: dict[str, float | bool] = {
        "rotation_frobenius_mean": frob.mean().item(),
        "rotation_frobenius_median": _median(frob),
        "angle_deg_mean": angle_deg.mean().item(),
        "angle_deg_median": _median(angle_deg),
        "handedness_flipped": bool(flipped),
    }
    if (t_pred is None) != (t_true is None):
        raise ValueError("pass both t_pred and t_true, or neither")
    if t_pred is not None:
        delta = _float64_cpu(t_pred) - _float64_cpu(t_true)
        if delta.shape != (Rt.shape[0], 2):
            raise ValueError(f"shifts must be (N, 2) with N = {Rt.shape[0]}, got {tuple(delta.shape)}")
        if fit_map_shift:
            s = _fit_map_shift(Rt, delta)
            delta = delta - (Rt[:, :2, :] @ s)
            out["map_shift_pixel"] = s.norm().item()
        err = delta.norm(dim=-1)
        out["translation_pixel_mean"] = err.mean().item()
        out["translation_pixel_median"] = _median(err)
    return out
