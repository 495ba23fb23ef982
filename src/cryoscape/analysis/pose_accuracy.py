"""Accuracy of predicted poses against ground truth or a reference refinement.

Poses from an ab initio run are defined only up to a global rotation and a mirror of the map
(:mod:`cryoscape.geometry.align` explains why), so they are compared after the best global
alignment: one rotation ``G`` for all particles, with or without the handedness flip
``R -> F R F`` (``F = diag(1, 1, -1)``), fitted robustly so that a minority of wrong poses does
not bias it.  Reported per particle, and as mean and median over particles:

* rotation error: the squared Frobenius norm ``||H(R_pred) G - R_ref||_F^2`` (as in thesis Table
  5.2; ``2 (3 - tr) = 4 (1 - cos angle)``, so 0.05 is about 9 degrees and 0.01 about 4), and the
  geodesic angle in degrees;
* translation error: ``|t_pred - t_ref|`` in pixels.  Shifts do not change under a rotation or a
  mirror of the map about the box centre, but a map reconstructed slightly off-centre by a 3-D
  vector ``s`` moves every shift by ``(R_i s)_xy``; ``fit_map_shift=True`` fits ``s`` and reports
  the errors with it removed (and ``map_shift_pixel = |s|``).

Pose sources (:func:`read_poses`): our ``poses.E.npz`` (``cryoscape abinit``), cryoDRGN
``poses.pkl``, RELION ``.star``, cryoSPARC ``.cs``, a simulated dataset folder (its
``ground_truth.npz``), or a run folder (its latest ``poses.E.npz`` / ``poses.E.pkl``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.errors import InputError
from cryoscape.geometry.align import align_rotation_sets
from cryoscape.geometry.rotations import frobenius_squared, rotation_angle_between

__all__ = [
    "PoseAccuracy",
    "read_poses",
    "compare_poses",
    "pose_accuracy",
    "pose_accuracy_per_epoch",
    "run_pose_files",
    "map_in_reference_frame",
]

PathLike = str | os.PathLike
_POSE_FILE = re.compile(r"^poses\.(\d+)\.(npz|pkl)$")


@dataclass
class PoseAccuracy:
    """Pose errors after the global alignment (module docstring).

    ``summary()`` gives the scalar figures as a dict (for reports and JSON); the per-particle
    arrays are kept for histograms.
    """

    n_particles: int
    rotation_frobenius: np.ndarray  # (N,) squared Frobenius errors
    angle_deg: np.ndarray  # (N,) geodesic angles
    translation_pixel: np.ndarray | None  # (N,) or None without shifts
    handedness_flipped: bool
    global_rotation: np.ndarray  # (3, 3) G: H(R_pred) G ~ R_ref
    map_shift_pixel: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Means, medians and fractions as plain floats."""
        out: dict[str, Any] = {
            "n_particles": int(self.n_particles),
            "rotation_frobenius_mean": float(np.mean(self.rotation_frobenius)),
            "rotation_frobenius_median": float(np.median(self.rotation_frobenius)),
            "angle_deg_mean": float(np.mean(self.angle_deg)),
            "angle_deg_median": float(np.median(self.angle_deg)),
            "fraction_within_5_deg": float(np.mean(self.angle_deg <= 5.0)),
            "fraction_within_15_deg": float(np.mean(self.angle_deg <= 15.0)),
            "handedness_flipped": bool(self.handedness_flipped),
        }
        if self.translation_pixel is not None:
            out["translation_pixel_mean"] = float(np.mean(self.translation_pixel))
            out["translation_pixel_median"] = float(np.median(self.translation_pixel))
        if self.map_shift_pixel is not None:
            out["map_shift_pixel"] = float(self.map_shift_pixel)
        out.update(self.extra)
        return out


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def run_pose_files(run_dir: PathLike) -> dict[int, Path]:
    """``{epoch: poses file}`` of a run folder (``poses.E.npz`` preferred over ``poses.E.pkl``)."""
    found: dict[int, Path] = {}
    for path in Path(run_dir).iterdir():
        m = _POSE_FILE.match(path.name)
        if m:
            epoch = int(m.group(1))
            if epoch not in found or m.group(2) == "npz":
                found[epoch] = path
    return dict(sorted(found.items()))


def read_poses(source: PathLike, *, box_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotations ``(N, 3, 3)`` and shifts ``(N, 2)`` (pixels, RELION sign; None if absent) from a file or folder.

    ``box_size`` is needed only for a cryoDRGN ``poses.pkl`` with translations (stored as box
    fractions); a run folder's or dataset's own box is used when known.
    """
    path = Path(source)
    if path.is_dir():
        if (path / "ground_truth.npz").is_file():
            return read_poses(path / "ground_truth.npz")
        files = run_pose_files(path)
        if not files:
            raise InputError(f"{path} holds no ground_truth.npz and no poses.EPOCH.npz/.pkl; pass a simulated "
                             "dataset folder, a cryoscape abinit run folder or a pose file.")
        if box_size is None:
            box_size = _run_box_size(path)
        return read_poses(files[max(files)], box_size=box_size)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass a pose file (.npz, .pkl, .star, .cs) or a folder holding one.")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "rotations" not in npz.files:
                    raise KeyError("rotations")
                R = np.asarray(npz["rotations"], dtype=np.float64)
                t = np.asarray(npz["shifts_pixel"], dtype=np.float64) if "shifts_pixel" in npz.files else None
        except (KeyError, ValueError, OSError) as err:
            raise InputError(f"{path} holds no 'rotations' array ({type(err).__name__}); pass a poses.E.npz of "
                             "cryoscape abinit or a ground_truth.npz of cryoscape simulate.") from None
    elif suffix == ".pkl":
        from cryoscape.io.cryodrgn import read_poses_pkl

        if box_size is None:
            box_size = _run_box_size(path.parent)
        R, t = read_poses_pkl(path, box_size=box_size)
    elif suffix in (".star", ".cs"):
        from cryoscape.io.particles import load_particles

        table = load_particles(path, check_stacks=False)
        table.require_poses()
        R, t = table.rotations, table.shifts_pixel
    else:
        raise InputError(f"{path} has the unknown extension '{path.suffix}'; pass poses as .npz, .pkl, .star or .cs.")
    if R.ndim != 3 or R.shape[1:] != (3, 3) or (t is not None and t.shape != (len(R), 2)):
        raise InputError(f"{path} holds poses of shapes {R.shape} / {None if t is None else t.shape}; "
                         "expected (N, 3, 3) rotations and (N, 2) shifts.")
    return R, t


def _run_box_size(folder: Path) -> int | None:
    """The box size recorded in a run folder's config.yaml (None if there is none)."""
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        return int(config["data"]["box_size"])
    except (KeyError, TypeError, ValueError, OSError, yaml.YAMLError):
        return None


# --------------------------------------------------------------------------------------------
# comparing
# --------------------------------------------------------------------------------------------
def compare_poses(
    R_pred: np.ndarray,
    R_ref: np.ndarray,
    t_pred: np.ndarray | None = None,
    t_ref: np.ndarray | None = None,
    *,
    flip: bool = True,
    robust: bool = True,
    fit_map_shift: bool = False,
) -> PoseAccuracy:
    """Pose errors of ``(R_pred, t_pred)`` against ``(R_ref, t_ref)`` after the global alignment.

    Parameters
    ----------
    R_pred, R_ref
        ``(N, 3, 3)`` rotations of the same particles, in the same order.
    t_pred, t_ref
        Optional ``(N, 2)`` shifts in pixels.
    flip
        Also consider the mirrored map (the handedness of an ab initio map is arbitrary).
    robust
        Fit the global rotation on the inliers (see :func:`cryoscape.geometry.align.align_rotation_sets`).
    fit_map_shift
        Fit and remove the shift pattern of an off-centre map before measuring translations.
    """
    Rp = torch.as_tensor(np.asarray(R_pred, dtype=np.float64))
    Rr = torch.as_tensor(np.asarray(R_ref, dtype=np.float64))
    if Rp.shape != Rr.shape or Rp.ndim != 3 or Rp.shape[1:] != (3, 3):
        raise InputError(f"the predicted and reference poses disagree in shape ({tuple(Rp.shape)} vs "
                         f"{tuple(Rr.shape)}); pass the poses of the same particles in the same order.")
    G, aligned, flipped = align_rotation_sets(Rp, Rr, flip=flip, robust=robust)
    frob = frobenius_squared(aligned, Rr).numpy()
    angle = np.degrees(rotation_angle_between(aligned, Rr).numpy())
    trans = None
    shift_norm = None
    if (t_pred is None) != (t_ref is None):
        t_pred = t_ref = None  # one side has no shifts: rotations only
    if t_pred is not None:
        delta = np.asarray(t_pred, dtype=np.float64) - np.asarray(t_ref, dtype=np.float64)
        if delta.shape != (len(frob), 2):
            raise InputError(f"shifts must be (N, 2) with N = {len(frob)}, got {delta.shape}.")
        if fit_map_shift:
            A = Rr.numpy()[:, :2, :].reshape(-1, 3)
            s, *_ = np.linalg.lstsq(A, delta.reshape(-1), rcond=None)
            delta = delta - np.einsum("nij,j->ni", Rr.numpy()[:, :2, :], s)
            shift_norm = float(np.linalg.norm(s))
        trans = np.linalg.norm(delta, axis=-1)
    return PoseAccuracy(
        n_particles=len(frob), rotation_frobenius=frob, angle_deg=angle, translation_pixel=trans,
        handedness_flipped=bool(flipped), global_rotation=G.numpy(), map_shift_pixel=shift_norm,
    )


def map_in_reference_frame(volume: np.ndarray, global_rotation: np.ndarray, handedness_flipped: bool,
                           reference: np.ndarray | None = None) -> np.ndarray:
    """A predicted map brought into the frame of the reference poses (for an FSC to the truth).

    With ``G`` and the flip from :func:`compare_poses`, ``V_ref(X) ~ V_pred(F G X)``
    (:mod:`cryoscape.geometry.align`; ``F = diag(1, 1, -1)`` only when flipped), resampled with
    cubic splines about the box centre ``D//2``.  With ``reference`` (same box), the result is
    then moved by the whole-voxel shift that maximises its cross-correlation with it: an ab
    initio map may sit a few pixels off centre (all its particles' shifts then absorb the offset).
    """
    from scipy import ndimage

    volume = np.asarray(volume, dtype=np.float32)
    D = volume.shape[-1]
    c = D // 2
    M = np.asarray(global_rotation, dtype=np.float64)
    if handedness_flipped:
        M = np.diag([1.0, 1.0, -1.0]) @ M
    P = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.float64)  # (x, y, z) <-> array axes (z, y, x)
    A = P @ M @ P  # output voxel X reads the input at M X (array axis order)
    offset = c - A @ np.full(3, c, dtype=np.float64)
    turned = ndimage.affine_transform(volume, A, offset=offset, order=3, mode="constant").astype(np.float32)
    if reference is None:
        return turned
    reference = np.asarray(reference, dtype=np.float32)
    if reference.shape != turned.shape:
        raise ValueError(f"reference box {reference.shape} differs from the map's {turned.shape}")
    cc = np.fft.ifftn(np.fft.fftn(reference) * np.conj(np.fft.fftn(turned))).real
    shift = np.array(np.unravel_index(np.argmax(cc), cc.shape))
    shift = np.where(shift > D // 2, shift - D, shift)
    return np.roll(turned, tuple(int(v) for v in shift), axis=(0, 1, 2))


def pose_accuracy(
    predicted: PathLike | tuple[np.ndarray, np.ndarray | None],
    reference: PathLike | tuple[np.ndarray, np.ndarray | None],
    *,
    indices: np.ndarray | None = None,
    box_size: int | None = None,
    flip: bool = True,
    fit_map_shift: bool = False,
) -> PoseAccuracy:
    """Pose accuracy of ``predicted`` against ``reference`` (files, folders or ``(R, t)`` pairs).

    Parameters
    ----------
    predicted
        Poses to evaluate: a pose file or folder (:func:`read_poses`) or ``(R, t)`` arrays.
    reference
        Ground truth (a ``cryoscape simulate`` folder) or a reference refinement, same forms.
    indices
        When the reference holds every particle of the dataset and the prediction only a subset
        (``--ind``), the dataset rows of the predicted particles.
    box_size
        For cryoDRGN ``poses.pkl`` files with shifts (box fractions), when no folder tells it.
    flip, fit_map_shift
        See :func:`compare_poses`.
    """
    R_ref, t_ref = reference if isinstance(reference, tuple) else read_poses(reference, box_size=box_size)
    if box_size is None and not isinstance(reference, tuple):
        box_size = _dataset_box_size(Path(reference))
    R_pred, t_pred = predicted if isinstance(predicted, tuple) else read_poses(predicted, box_size=box_size)
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
        R_ref = np.asarray(R_ref)[indices]
        t_ref = None if t_ref is None else np.asarray(t_ref)[indices]
    if len(R_pred) != len(R_ref):
        raise InputError(f"{len(R_pred)} predicted poses but {len(R_ref)} reference poses; pass the poses of the "
                         "same particles (or --ind with the rows of the predicted particles).")
    return compare_poses(R_pred, R_ref, t_pred, t_ref, flip=flip, fit_map_shift=fit_map_shift)


def _dataset_box_size(path: Path) -> int | None:
    npz = path / "ground_truth.npz" if path.is_dir() else path
    if npz.suffix == ".npz" and npz.is_file():
        with np.load(npz, allow_pickle=False) as data:
            if "box_size" in data.files:
                return int(data["box_size"])
    return None


def pose_accuracy_per_epoch(
    run_dir: PathLike,
    reference: PathLike | tuple[np.ndarray, np.ndarray | None],
    *,
    flip: bool = True,
    fit_map_shift: bool = False,
) -> list[dict[str, Any]]:
    """Summary of :func:`pose_accuracy` for every ``poses.E.npz``/``.pkl`` of a run, in epoch order.

    Each dict also holds ``epoch`` and, for our ``.npz`` files, ``wall_seconds`` (time since the
    run started when the epoch ended): the data of a time-to-accuracy curve.
    """
    run = Path(run_dir)
    ref = reference if isinstance(reference, tuple) else read_poses(reference)
    box = _run_box_size(run)
    rows = []
    for epoch, path in run_pose_files(run).items():
        acc = pose_accuracy(path, ref, box_size=box, flip=flip, fit_map_shift=fit_map_shift)
        row = {"epoch": epoch, "file": str(path), **acc.summary()}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if "wall_seconds" in npz.files:
                    row["wall_seconds"] = float(npz["wall_seconds"])
        rows.append(row)
    return rows

