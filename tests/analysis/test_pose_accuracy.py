"""Pose accuracy after global alignment: invariance to the map's rotation and hand, known errors
come out, shifts (with and without an off-centre map), and every pose source reads the same."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import yaml

from cryoscape.analysis.pose_accuracy import (
    compare_poses,
    pose_accuracy,
    pose_accuracy_per_epoch,
    read_poses,
    run_pose_files,
)
from cryoscape.errors import InputError
from cryoscape.geometry.rotations import random_rotations, rotation_about_axis

F = np.diag([1.0, 1.0, -1.0])


def truth(n=400, seed=0):
    R = random_rotations(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    t = np.random.default_rng(seed).uniform(-3, 3, (n, 2))
    return R, t


def perturb(R, angle_deg, seed):
    """Each rotation turned by exactly ``angle_deg`` about a random axis (image frame)."""
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(len(R), 3))
    Q = rotation_about_axis(axes, np.full(len(R), math.radians(angle_deg)))
    return np.einsum("nij,njk->nik", Q, R)


@pytest.mark.parametrize("flip", [False, True])
def test_global_rotation_and_hand_are_removed(flip):
    R, t = truth()
    G = random_rotations(1, generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()[0]
    pred = np.einsum("nij,jk->nik", perturb(R, 3.0, 1), G.T)  # the map turned by G, poses 3 deg off
    if flip:
        pred = F @ pred @ F
    acc = compare_poses(pred, R, t + 0.5, t)
    s = acc.summary()
    assert s["handedness_flipped"] is flip
    assert s["angle_deg_median"] == pytest.approx(3.0, abs=0.05)
    # 4 (1 - cos a): 3 degrees -> 0.01096
    assert s["rotation_frobenius_median"] == pytest.approx(4 * (1 - math.cos(math.radians(3.0))), rel=0.02)
    assert s["translation_pixel_median"] == pytest.approx(0.5 * math.sqrt(2), rel=1e-6)
    assert s["fraction_within_5_deg"] == 1.0
    assert acc.rotation_frobenius.shape == (400,)


def test_a_minority_of_wrong_poses_does_not_bias_the_alignment():
    R, _ = truth(seed=2)
    pred = perturb(R, 1.0, 3)
    wrong = random_rotations(100, generator=torch.Generator().manual_seed(9), dtype=torch.float64).numpy()
    pred[:100] = wrong  # 25 % random
    s = compare_poses(pred, R).summary()
    assert s["angle_deg_median"] < 1.5  # the good 75 % still measure ~1 degree
    assert 0.2 < 1 - s["fraction_within_5_deg"] < 0.3


def test_off_centre_map_shift_is_fitted():
    R, t = truth(seed=4)
    s3 = np.array([1.5, -0.5, 2.0])
    pred_t = t + np.einsum("nij,j->ni", R[:, :2, :], s3)
    raw = compare_poses(R, R, pred_t, t).summary()
    fitted = compare_poses(R, R, pred_t, t, fit_map_shift=True).summary()
    assert raw["translation_pixel_median"] > 1.0
    assert fitted["translation_pixel_median"] < 1e-9
    assert fitted["map_shift_pixel"] == pytest.approx(np.linalg.norm(s3))


def test_every_pose_source_reads_the_same(tmp_path):
    R, t = truth(n=20, seed=6)
    D = 40
    np.savez(tmp_path / "poses.3.npz", rotations=R, shifts_pixel=t, wall_seconds=12.5)
    with open(tmp_path / "poses.pkl", "wb") as f:
        pickle.dump((R, t / D), f)
    sim = tmp_path / "sim"
    sim.mkdir()
    np.savez(sim / "ground_truth.npz", rotations=R, shifts_pixel=t, box_size=D)
    for source, box in ((tmp_path / "poses.3.npz", None), (tmp_path / "poses.pkl", D), (sim, None)):
        R2, t2 = read_poses(source, box_size=box)
        np.testing.assert_allclose(R2, R)
        np.testing.assert_allclose(t2, t)
    # a run folder: its latest poses, the box from config.yaml
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"box_size": D}}))
    with open(run / "poses.0.pkl", "wb") as f:
        pickle.dump((perturb(R, 10.0, 1), t / D), f)
    np.savez(run / "poses.1.npz", rotations=perturb(R, 2.0, 2), shifts_pixel=t, wall_seconds=7.0)
    assert sorted(run_pose_files(run)) == [0, 1]
    rows = pose_accuracy_per_epoch(run, sim)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0]["angle_deg_median"] == pytest.approx(10.0, abs=1.0)  # 20 particles: G absorbs a little
    assert rows[1]["angle_deg_median"] == pytest.approx(2.0, abs=0.2)
    assert rows[1]["wall_seconds"] == 7.0 and "wall_seconds" not in rows[0]
    assert pose_accuracy(run, sim).summary()["angle_deg_median"] == rows[1]["angle_deg_median"]


def test_subset_indices_and_clear_errors(tmp_path):
    R, t = truth(n=30, seed=7)
    idx = np.arange(0, 30, 3)
    acc = pose_accuracy((R[idx], t[idx]), (R, t), indices=idx)
    assert acc.n_particles == 10 and acc.summary()["angle_deg_median"] < 1e-5
    with pytest.raises(InputError, match="10 predicted poses but 30"):
        pose_accuracy((R[idx], t[idx]), (R, t))
    with pytest.raises(InputError, match="was not found"):
        read_poses(tmp_path / "missing.npz")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(InputError, match="unknown extension"):
        read_poses(tmp_path / "x.txt")


def _blobs(D: int, transform: np.ndarray | None = None, shift_voxel=(0, 0, 0)) -> np.ndarray:
    """An asymmetric map of Gaussian blobs, sampled at ``transform @ X - shift`` (X = (x, y, z) - D//2;
    ``shift_voxel`` in array order z, y, x)."""
    c = np.arange(D) - D // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    X = np.stack([xx, yy, zz], -1).astype(np.float64)
    if transform is not None:
        X = X @ np.asarray(transform).T
    X = X - np.asarray(shift_voxel, np.float64)[::-1]
    centres = np.array([[5.0, 0, 0], [-3, 4, 1], [0, -2, 6], [2, 3, -4]])
    widths = [2.0, 1.5, 2.5, 1.2]
    return sum(np.exp(-((X - m) ** 2).sum(-1) / (2 * w * w)) for m, w in zip(centres, widths)).astype(np.float32)


@pytest.mark.parametrize("flip", [False, True])
def test_map_from_an_aligned_frame_returns_to_the_truth(flip):
    from cryoscape.analysis.pose_accuracy import map_in_reference_frame

    D = 32
    R_true, _ = truth(200, seed=3)
    G = rotation_about_axis(torch.tensor([0.3, -1.0, 0.5], dtype=torch.float64), torch.tensor(1.1)).numpy()
    M = (F @ G) if flip else G
    # the map and poses of a reconstruction in another frame: V_pred(Y) = V_true(M^-1 Y), R_pred = H(R_true G^T)
    predicted = _blobs(D, M.T, shift_voxel=(1, -2, 0))  # and off centre by whole voxels (truth frame)
    R_pred = R_true @ G.T
    if flip:
        R_pred = F @ R_pred @ F
    acc = compare_poses(R_pred, R_true)
    assert acc.handedness_flipped == flip and np.median(acc.rotation_frobenius) < 1e-10
    reference = _blobs(D)
    turned = map_in_reference_frame(predicted, acc.global_rotation, acc.handedness_flipped, reference)
    good = np.corrcoef(turned.ravel(), reference.ravel())[0, 1]
    assert good > 0.99
    wrong = map_in_reference_frame(predicted, acc.global_rotation, not acc.handedness_flipped, reference)
    assert np.corrcoef(wrong.ravel(), reference.ravel())[0, 1] < 0.9  # the hand matters
