"""Evaluation against the ground truth of a simulated dataset (``cryoscape simulate``).

Each part is one function on arrays, and :func:`evaluate_against_truth` runs those that the
inputs allow, on the particles a run was trained on (their rows in the dataset follow the run's
``--ind``/``--first``):

``fsc`` -- per-image FSC (thesis 3.x / 4.4.7, the CryoBench protocol)
    For ``n_images`` (default 100) particles evenly spaced over the run's particle order, the map
    of the particle's latent is compared with the ground-truth map of the state that generated
    the image (``ground_truth.npz: state_index`` -> ``gt_volumes/vol_XXX.mrc``), without a mask.
    Per image: the FSC curve, its area ``AUC = mean |FSC|`` over shells ``1 .. D//2`` (1 for a
    perfect map), and the frequencies where it falls below 0.5 and 0.143 (Nyquist when it never
    does).  Maps and truth are compared at the smaller of their boxes (Fourier cropping keeps
    the field of view).  Also reported, as checks of sign and hand: the real-space correlation
    with the truth and the AUC against the mirrored truth.
``latent`` -- latents against the true coordinate
    |Spearman rho| between the first principal component of the latents and the true
    coordinate (hinge angle, trajectory position), and the best single latent dimension.
``clusters`` -- cluster agreement
    Adjusted Rand index (and normalised mutual information) of predicted labels against the true
    classes: given labels, or k-means of the latents with as many clusters as true classes.
    Computed for discrete datasets, or whenever labels are given.
``poses`` -- pose accuracy
    Rotation error after the best global rotation (and mirror) and translation error of
    predicted poses (``--poses``, or the run's own ``poses.E.npz``/``poses.E.pkl`` of the
    evaluated epoch), by :mod:`cryoscape.analysis.pose_accuracy`.

A new kind of evaluation is one more function here, one more optional field of
:class:`Evaluation`, and one more section in report/evaluate.py.

Maps from another tool
----------------------
``--maps DIR`` takes one map per evaluated image, in the order of the evaluated images, sorted
by the number in their file names (``vol_000.mrc``, ``vol_001.mrc``, ... as cryoDRGN's
``eval_vol`` writes them).  The evaluated images are chosen by the same rule from the tool's
latents (``--z``, e.g. cryoDRGN's ``z.pkl``) and its index file (``--ind``); a first run with
``--z`` and no ``--maps`` writes their latents to ``eval_z.txt`` for the tool to decode.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cryoscape.errors import InputError

__all__ = [
    "GroundTruth",
    "load_ground_truth",
    "evenly_spaced_indices",
    "PerImageFsc",
    "per_image_fsc",
    "masked_per_image_fsc",
    "score_map_files",
    "list_map_files",
    "latent_correlation",
    "cluster_agreement",
    "read_latent_file",
    "Evaluation",
    "evaluate_against_truth",
    "evaluate_poses_against_reference",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# ground truth
# --------------------------------------------------------------------------------------------
@dataclass
class GroundTruth:
    """What ``cryoscape simulate`` wrote about the truth of each image (see simulate/dataset.py).

    Attributes
    ----------
    folder
        The dataset folder.
    state_index
        ``(N,)`` state (ground-truth map) of each image.
    coordinate
        ``(N,)`` true continuous coordinate (hinge angle, trajectory u) or NaN.
    coordinate_name, kind
        What the coordinate is; the heterogeneity (``none``, ``hinge``, ``discrete``, ``trajectory``).
    volume_files
        Path of the map of each state.
    rotations, shifts_pixel
        ``(N, 3, 3)`` and ``(N, 2)`` true poses.
    box_size, pixel_size_angstrom
        Of the images and maps.
    """

    folder: Path
    state_index: np.ndarray
    coordinate: np.ndarray
    coordinate_name: str
    kind: str
    volume_files: list[Path]
    rotations: np.ndarray
    shifts_pixel: np.ndarray
    box_size: int
    pixel_size_angstrom: float
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.state_index)

    @property
    def n_states(self) -> int:
        return len(self.volume_files)

    def volume(self, state: int) -> np.ndarray:
        """The ground-truth map of ``state`` (read once, cached)."""
        from cryoscape.io.mrc import read_mrc

        state = int(state)
        if state not in self._cache:
            path = self.volume_files[state]
            if not path.is_file():
                raise InputError(f"{path} (the ground-truth map of state {state}) was not found; pass the complete "
                                 "folder written by cryoscape simulate.")
            self._cache[state] = read_mrc(path)[0].astype(np.float32)
        return self._cache[state]


def load_ground_truth(folder: PathLike) -> GroundTruth:
    """Read ``folder/ground_truth.npz`` (the output folder of ``cryoscape simulate``)."""
    folder = Path(folder)
    path = folder / "ground_truth.npz" if folder.is_dir() else folder
    folder = path.parent
    if not path.is_file():
        raise InputError(f"{path} was not found; pass the output folder of cryoscape simulate (it holds "
                         "ground_truth.npz and gt_volumes/).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user error
        raise InputError(f"{path} could not be read ({type(err).__name__}); simulate the dataset again.") from None
    missing = [k for k in ("state_index", "volume_files", "box_size", "pixel_size_angstrom") if k not in data]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}; pass a ground_truth.npz written by cryoscape simulate.")
    n = len(data["state_index"])
    return GroundTruth(
        folder=folder,
        state_index=data["state_index"].astype(np.int64),
        coordinate=data.get("coordinate", np.full(n, np.nan)).astype(np.float64),
        coordinate_name=str(data.get("coordinate_name", "coordinate")),
        kind=str(data.get("kind", "unknown")),
        volume_files=[folder / str(f) for f in data["volume_files"]],
        rotations=data.get("rotations", np.tile(np.eye(3), (n, 1, 1))).astype(np.float64),
        shifts_pixel=data.get("shifts_pixel", np.zeros((n, 2))).astype(np.float64),
        box_size=int(data["box_size"]),
        pixel_size_angstrom=float(data["pixel_size_angstrom"]),
    )


def evenly_spaced_indices(n_total: int, n: int = 100) -> np.ndarray:
    """``min(n, n_total)`` positions evenly spaced over ``0 .. n_total - 1``, both ends included."""
    if n_total <= 0 or n <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n_total - 1, min(int(n), int(n_total))).round().astype(np.int64))


# --------------------------------------------------------------------------------------------
# per-image FSC
# --------------------------------------------------------------------------------------------
@dataclass
class PerImageFsc:
    """Per-image FSC of M maps against their ground truth.

    Attributes
    ----------
    freqs
        ``(S,)`` shell frequencies, cycles per pixel of the compared box.
    curves
        ``(M, S)`` FSC curves.
    auc
        ``(M,)`` mean ``|FSC|`` over shells ``1 .. D//2``.
    res_0_5, res_0_143
        ``(M,)`` frequencies (cycles/pixel) where the curve first falls below 0.5 / 0.143.
    correlation
        ``(M,)`` real-space Pearson correlation with the truth (negative: inverted maps).
    auc_mirror
        ``(M,)`` AUC against the mirrored truth (larger than ``auc``: the maps have the wrong hand).
    box_size, pixel_size_angstrom
        Box and pixel size at which the maps were compared.
    """

    freqs: np.ndarray
    curves: np.ndarray
    auc: np.ndarray
    res_0_5: np.ndarray
    res_0_143: np.ndarray
    correlation: np.ndarray
    auc_mirror: np.ndarray
    box_size: int
    pixel_size_angstrom: float

    def angstrom(self, freq: np.ndarray) -> np.ndarray:
        """Resolution in angstroms of frequencies in cycles per pixel."""
        with np.errstate(divide="ignore"):
            return self.pixel_size_angstrom / np.asarray(freq, dtype=np.float64)

    def summary(self) -> dict[str, float]:
        """Means and medians of the per-image numbers (resolutions also in angstroms)."""
        out: dict[str, float] = {"n_images": int(len(self.auc)), "box_size": int(self.box_size),
                                 "pixel_size_angstrom": float(self.pixel_size_angstrom)}
        for name in ("auc", "res_0_5", "res_0_143", "correlation", "auc_mirror"):
            values = getattr(self, name)
            out[f"{name}_mean"] = float(np.mean(values))
            out[f"{name}_median"] = float(np.median(values))
        for name in ("res_0_5", "res_0_143"):
            # the angstrom value of the mean frequency (a mean of angstroms is dominated by bad maps)
            out[f"{name}_angstrom_of_mean"] = float(self.angstrom(np.mean(getattr(self, name))))
        return out


def _as_box(volume: np.ndarray, box: int) -> torch.Tensor:
    from cryoscape.fourier.resample import downsample_volume

    v = torch.as_tensor(np.asarray(volume), dtype=torch.float64)
    return v if v.shape[-1] == box else downsample_volume(v, box).to(torch.float64)


def per_image_fsc(maps: Sequence[np.ndarray], truths: Sequence[np.ndarray], *,
                  pixel_size_angstrom: float | None = None, truth_box_pixel: tuple[int, float] | None = None
                  ) -> PerImageFsc:
    """Per-image FSC of ``maps[i]`` against ``truths[i]`` (cubic arrays, any boxes).

    Each pair is compared at the smaller of the two boxes, the larger one Fourier-cropped
    (same field of view).

    Parameters
    ----------
    maps, truths
        Sequences of M ``(D, D, D)`` maps.
    pixel_size_angstrom
        Pixel size at the compared box (or give ``truth_box_pixel``).
    truth_box_pixel
        ``(box, pixel size)`` of the truth, from which the compared box's pixel size follows.
    """
    from cryoscape.fourier.fsc import fourier_shell_correlation, fsc_auc, resolution_at_threshold

    if len(maps) != len(truths):
        raise ValueError(f"{len(maps)} maps but {len(truths)} ground-truth maps")
    if not len(maps):
        raise ValueError("no maps to compare")
    curves, auc, r05, r0143, corr, mirror = [], [], [], [], [], []
    box = None
    freqs = None
    for v, g in zip(maps, truths):
        n = min(np.shape(v)[-1], np.shape(g)[-1])
        if box is None:
            box = n
        elif n != box:
            raise ValueError(f"maps compare at different boxes ({box} and {n}); give maps of one box")
        vt, gt = _as_box(v, n), _as_box(g, n)
        freqs, fsc = fourier_shell_correlation(vt, gt)
        _, fsc_m = fourier_shell_correlation(vt, gt.flip(0))
        curves.append(fsc.numpy())
        auc.append(float(fsc_auc(fsc)))
        mirror.append(float(fsc_auc(fsc_m)))
        r05.append(resolution_at_threshold(freqs, fsc, 0.5))
        r0143.append(resolution_at_threshold(freqs, fsc, 0.143))
        a, b = vt.reshape(-1) - vt.mean(), gt.reshape(-1) - gt.mean()
        denom = float(torch.sqrt((a * a).sum() * (b * b).sum()))
        corr.append(float((a * b).sum()) / denom if denom > 0 else 0.0)
    if pixel_size_angstrom is None:
        if truth_box_pixel is None:
            pixel_size_angstrom = 1.0
        else:
            gbox, gpix = truth_box_pixel
            pixel_size_angstrom = float(gpix) * gbox / box
    return PerImageFsc(freqs=freqs.numpy(), curves=np.stack(curves), auc=np.array(auc), res_0_5=np.array(r05),
                       res_0_143=np.array(r0143), correlation=np.array(corr), auc_mirror=np.array(mirror),
                       box_size=int(box), pixel_size_angstrom=float(pixel_size_angstrom))


def masked_per_image_fsc(maps: Sequence[np.ndarray], truths: Sequence[np.ndarray], mask: np.ndarray | torch.Tensor,
                         **kwargs) -> PerImageFsc:
    """:func:`per_image_fsc` of ``maps[i] * mask`` against ``truths[i] * mask``: the FSC of one region.

    With the mask of the region where the true maps vary (:func:`cryoscape.fourier.masks.variability_mask`)
    this scores how well the moving part is recovered, which the rigid part would otherwise dominate.
    Maps, truths and mask must share one box (``kwargs`` go to :func:`per_image_fsc`).
    """
    m = np.asarray(mask, dtype=np.float32)
    for v in (*maps, *truths):
        if np.shape(v) != m.shape:
            raise ValueError(f"a map of shape {np.shape(v)} does not match the mask's {m.shape}")
    return per_image_fsc([np.asarray(v) * m for v in maps], [np.asarray(g) * m for g in truths], **kwargs)


def list_map_files(folder: PathLike) -> list[Path]:
    """The ``.mrc`` maps of ``folder`` sorted by the last number in their names (vol_2 before vol_10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; pass the folder of maps (vol_000.mrc, ...).")
    files = [p for p in folder.iterdir() if p.suffix.lower() == ".mrc" and p.is_file()]

    def key(p: Path) -> tuple[int, str]:
        numbers = re.findall(r"\d+", p.stem)
        return (int(numbers[-1]) if numbers else -1, p.name)

    files.sort(key=key)
    if not files:
        raise InputError(f"{folder} holds no .mrc maps; pass the folder the maps were written to.")
    return files


def score_map_files(map_paths: Sequence[PathLike], states: Sequence[int], truth: GroundTruth | PathLike, *,
                    invert: bool = False, flip: bool = False) -> PerImageFsc:
    """Per-image FSC of map files against the truth of ``states`` (``map_paths[i]`` is of ``states[i]``).

    ``invert`` negates the maps and ``flip`` reverses their z axis (the other hand) first.
    """
    from cryoscape.io.mrc import read_mrc

    gt = truth if isinstance(truth, GroundTruth) else load_ground_truth(truth)
    if len(map_paths) != len(states):
        raise ValueError(f"{len(map_paths)} maps but {len(states)} states")
    maps, truths = [], []
    for path, s in zip(map_paths, states):
        v, _ = read_mrc(path)
        if v.ndim != 3 or len(set(v.shape)) != 1:
            raise InputError(f"{path} holds an array of shape {v.shape}, not a cubic map; pass 3-D maps.")
        v = -v if invert else v
        maps.append(v[::-1].copy() if flip else v)
        truths.append(gt.volume(int(s)))
    return per_image_fsc(maps, truths, truth_box_pixel=(gt.box_size, gt.pixel_size_angstrom))


# --------------------------------------------------------------------------------------------
# latents, clusters, poses
# --------------------------------------------------------------------------------------------
def latent_correlation(z: np.ndarray, coordinate: np.ndarray) -> dict[str, Any]:
    """How well the latents order the particles along the true coordinate.

    Returns ``spearman_pc1`` (|rho| of the latents' first principal component), ``pearson_pc1``
    (|r|), ``spearman_best_dim`` and ``best_dim`` (the latent dimension with the largest
    |rho|), and ``n`` (particles with a finite coordinate).  NaN when fewer than 3 particles.
    """
    from scipy.stats import pearsonr, spearmanr

    from cryoscape.analysis.selection import pca_embedding

    z = np.asarray(z, dtype=np.float64)
    c = np.asarray(coordinate, dtype=np.float64)
    ok = np.isfinite(c)
    out: dict[str, Any] = {"n": int(ok.sum())}
    if ok.sum() < 3 or np.ptp(c[ok]) == 0:
        return {**out, "spearman_pc1": float("nan"), "pearson_pc1": float("nan"),
                "spearman_best_dim": float("nan"), "best_dim": -1}
    pc1 = pca_embedding(z[ok], 1)[0][:, 0]
    per_dim = [abs(float(spearmanr(z[ok, d], c[ok]).statistic)) if np.ptp(z[ok, d]) > 0 else 0.0
               for d in range(z.shape[1])]
    best = int(np.argmax(per_dim))
    return {**out,
            "spearman_pc1": abs(float(spearmanr(pc1, c[ok]).statistic)) if np.ptp(pc1) > 0 else 0.0,
            "pearson_pc1": abs(float(pearsonr(pc1, c[ok]).statistic)) if np.ptp(pc1) > 0 else 0.0,
            "spearman_best_dim": per_dim[best], "best_dim": best}


def cluster_agreement(predicted: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Adjusted Rand index and normalised mutual information of two labelings (1: identical up to names)."""
    from sklearn.metrics import adjusted_rand_score, confusion_matrix, normalized_mutual_info_score

    p = np.asarray(predicted, dtype=np.int64)
    t = np.asarray(truth, dtype=np.int64)
    if p.shape != t.shape:
        raise ValueError(f"label arrays differ in shape: {p.shape} vs {t.shape}")
    p_values, t_values = np.unique(p), np.unique(t)
    table = confusion_matrix(t, p, labels=np.union1d(t_values, p_values))
    rows = np.isin(np.union1d(t_values, p_values), t_values)
    cols = np.isin(np.union1d(t_values, p_values), p_values)
    return {"adjusted_rand_index": float(adjusted_rand_score(t, p)),
            "normalized_mutual_info": float(normalized_mutual_info_score(t, p)),
            "n_predicted": int(len(p_values)), "n_true": int(len(t_values)),
            "true_labels": t_values.tolist(), "predicted_labels": p_values.tolist(),
            "contingency": table[rows][:, cols].tolist()}


def read_latent_file(path: PathLike) -> np.ndarray:
    """``(N, zdim)`` latents from .pkl (cryoDRGN z.pkl), .npy or .txt."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass the latents (.pkl, .npy or .txt).")
    try:
        if path.suffix.lower() == ".pkl":
            with open(path, "rb") as f:
                z = np.asarray(pickle.load(f), dtype=np.float64)
        elif path.suffix.lower() == ".npy":
            z = np.load(path, allow_pickle=False).astype(np.float64)
        else:
            z = np.loadtxt(path, ndmin=2)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user error
        raise InputError(f"{path} could not be read as latents ({type(err).__name__}); pass an (N, zdim) .pkl, "
                         ".npy or .txt array.") from None
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or not np.isfinite(z).all():
        raise InputError(f"{path} does not hold finite (N, zdim) latents; pass the latent file of the run.")
    return z.astype(np.float32)


# --------------------------------------------------------------------------------------------
# the whole evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Results of :func:`evaluate_against_truth`; each part is None when it could not be computed.

    Attributes
    ----------
    out_dir
        Where the files were written.
    n_particles
        Particles evaluated (the run's).
    rows
        ``(n_particles,)`` dataset row of each.
    source
        What was evaluated (run folder, epoch, or the latent / map files).
    fsc, fsc_positions
        Per-image FSC and the positions (run particle order) of the images it used.
    latent, clusters, poses
        Dicts of numbers (see :func:`latent_correlation`, :func:`cluster_agreement`,
        :meth:`cryoscape.analysis.pose_accuracy.PoseAccuracy.summary`).
    pose_angle_deg
        Per-particle rotation errors (degrees) after the global alignment.
    notes
        Sentences about what was skipped or looks wrong (e.g. inverted maps).
    """

    out_dir: Path
    n_particles: int
    rows: np.ndarray
    source: dict[str, Any]
    truth: GroundTruth
    z: np.ndarray | None = None
    fsc: PerImageFsc | None = None
    fsc_positions: np.ndarray | None = None
    latent: dict[str, Any] | None = None
    clusters: dict[str, Any] | None = None
    poses: dict[str, Any] | None = None
    pose_angle_deg: np.ndarray | None = None
    atomic: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The numbers, YAML-safe."""
        out: dict[str, Any] = {"source": self.source, "truth": str(self.truth.folder), "kind": self.truth.kind,
                               "n_particles": int(self.n_particles)}
        if self.fsc is not None:
            out["per_image_fsc"] = self.fsc.summary()
        for name in ("latent", "clusters", "poses", "atomic"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def _run_epoch_and_decoder(run_dir: Path, epoch: int | None, device):
    from cryoscape.train.volumes import load_trained_model

    decoder, _, state = load_trained_model(run_dir, epoch=epoch, device=device)
    return decoder, state


def evaluate_against_truth(
    truth: PathLike,
    *,
    run_dir: PathLike | None = None,
    epoch: int | None = None,
    z_path: PathLike | None = None,
    ind: PathLike | str | None = None,
    maps_dir: PathLike | None = None,
    n_images: int = 100,
    box_size: int | None = None,
    labels: PathLike | None = None,
    n_clusters: int | None = None,
    poses: PathLike | None = None,
    invert_maps: bool = False,
    flip_maps: bool = False,
    out_dir: PathLike | None = None,
    device: Any = "cpu",
    seed: int = 0,
    progress: bool = True,
    true_model: PathLike | None = None,
) -> Evaluation:
    """Evaluate a run (or another tool's latents and maps) against a simulated dataset's truth.

    Parameters
    ----------
    truth
        The ``cryoscape simulate`` output folder.
    run_dir, epoch
        A ``cryoscape train`` run and epoch (default: latest).  Its latents, decoder, recorded
        ``--ind``/``--first`` and (with refined poses) ``poses.E.npz``/``poses.E.pkl`` are used.
    z_path
        Latents of another tool (e.g. cryoDRGN ``z.pkl``) instead of the run's.
    ind
        Dataset rows of the particles (the ``--ind`` of another tool's training); overrides the
        run's recorded ``--ind``.
    maps_dir
        One map per evaluated image (see the module docstring) instead of decoding the run's.
    n_images
        Images for the per-image FSC (CryoBench: 100).
    box_size
        Decode the run's maps at this box (default the training box, or the truth's if smaller).
    labels
        Per-particle cluster labels to score; default k-means of the latents (discrete datasets).
    n_clusters
        k of that k-means (default: the number of true classes among the particles).
    poses
        Predicted poses (poses.pkl / .npz / .star / .cs, or a folder holding them) of the run's
        particles or of every dataset row.
    invert_maps, flip_maps
        Negate / mirror the maps before the FSC.
    out_dir
        Output folder (default ``RUN/evaluate.EPOCH``; required without a run).
    true_model
        True atomic model(s) for a run of an atomic decoder (default: the dataset's
        ``gt_models.pdb``): C-alpha RMSE, % within 3 A, volume NMSE (:mod:`cryoscape.analysis.atomic`).
    """
    import yaml

    from cryoscape.io.writers import atomic_write

    result, run, epoch, decoder, state = _open_evaluation(
        truth, run_dir, epoch, z_path=z_path, ind=ind, maps_dir=maps_dir, poses=poses, n_images=n_images,
        out_dir=out_dir, device=device)
    accuracy = _evaluate_poses(result, poses, run, epoch)
    _score_fsc(result, accuracy, maps_dir, decoder, state, n_images=n_images, box_size=box_size, device=device,
               progress=progress, invert_maps=invert_maps, flip_maps=flip_maps)
    if result.z is not None:
        _score_latents(result, labels=labels, n_clusters=n_clusters, seed=seed)
    if decoder is not None:  # atomic models: an atomic decoder against the true models (analysis/atomic.py)
        _score_atomic_models(result, decoder, true_model)
    with atomic_write(result.out_dir / "evaluation.yaml", "w") as fh:
        yaml.safe_dump(result.to_dict(), fh, sort_keys=False)
    return result


def _open_evaluation(truth: PathLike, run_dir: PathLike | None, epoch: int | None, *, z_path: PathLike | None,
                     ind: PathLike | str | None, maps_dir: PathLike | None, poses: PathLike | None, n_images: int,
                     out_dir: PathLike | None,
                     device: Any) -> tuple[Evaluation, Path | None, int | None, Any, dict | None]:
    """Check the options, load the truth, what is evaluated and its particles' rows, and make the output folder."""
    from cryoscape.analysis.selection import run_particle_rows

    gt = load_ground_truth(truth)
    run = Path(run_dir) if run_dir is not None else None
    if run is None and z_path is None and maps_dir is None and poses is None:
        raise InputError("pass a run folder, or another tool's latents (--z), maps (--maps) or poses (--poses), "
                         "to evaluate.")
    if n_images < 1:
        raise InputError(f"--n-images {n_images} is not positive; pass the number of images for the per-image FSC.")
    decoder, state, z, epoch, source = _evaluated_sources(run, epoch, z_path, maps_dir, device)
    if z is not None:
        n_particles = len(z)
    elif state is not None:
        n_particles = int(state["data"]["n_particles"])
    else:  # maps or poses only: the particles are the dataset rows (or --ind)
        n_particles = len(load_indices_or_all(ind, len(gt)))
    rows = run_particle_rows(run, n_particles, n_source=len(gt), train_ind=ind,
                             source_name=f"the dataset {gt.folder}",
                             hint="pass the dataset the particles come from, and --ind with their rows in it",
                             ind_flag="--ind")
    out = Path(out_dir) if out_dir is not None else (run / f"evaluate.{epoch}" if run is not None else None)
    if out is None:
        raise InputError("pass an output folder with -o when no run folder is evaluated.")
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    result = Evaluation(out_dir=out, n_particles=n_particles, rows=rows, source=source, truth=gt, z=z)
    return result, run, epoch, decoder, state


def _score_fsc(result: Evaluation, accuracy, maps_dir: PathLike | None, decoder, state: dict | None, *,
               n_images: int, box_size: int | None, device: Any, progress: bool, invert_maps: bool,
               flip_maps: bool) -> None:
    """Per-image FSC at ``n_images`` evenly spaced particles, whose latents go to eval_z.txt for decoding maps."""
    positions = evenly_spaced_indices(result.n_particles, n_images)
    result.fsc_positions = positions
    if result.z is not None:
        np.savetxt(result.out_dir / "eval_z.txt", result.z[positions], fmt="%.7g")
    maps = _maps_to_score(result, maps_dir, decoder, state, box_size, device, progress)
    if maps is not None:
        _score_maps(result, maps, accuracy, invert_maps=invert_maps, flip_maps=flip_maps)


def _score_atomic_models(result: Evaluation, decoder, true_model: PathLike | None) -> None:
    """``result.atomic``: the run's atomic models against the true ones (None without an atomic model or truth)."""
    from cryoscape.analysis.atomic import atomic_evaluation

    result.atomic = atomic_evaluation(decoder, result.truth, result.rows, result.z, result.out_dir,
                                      true_model=true_model)


def _evaluated_sources(run: Path | None, epoch: int | None, z_path: PathLike | None, maps_dir: PathLike | None,
                       device: Any) -> tuple[Any, dict | None, np.ndarray | None, int | None, dict[str, Any]]:
    """The run's decoder and state (when maps are to be decoded), the latents and the epoch, and a
    record of where each came from."""
    from cryoscape.analysis.selection import read_run_latents

    decoder = state = None
    source: dict[str, Any] = {}
    z = None
    if run is not None and (maps_dir is None or z_path is None):
        decoder, state = _run_epoch_and_decoder(run, epoch, device)
        epoch = int(state["epoch"])
        source.update(run=str(run), epoch=epoch)
    if z_path is not None:
        z = read_latent_file(z_path)
        source["latents"] = str(z_path)
    elif run is not None and (decoder is None or decoder.zdim > 0):
        latents = read_run_latents(run, epoch=epoch)
        z, epoch = latents.z, latents.epoch
        source.update(run=str(run), epoch=epoch)
    if maps_dir is not None:
        source["maps"] = str(maps_dir)
    return decoder, state, z, epoch, source


def _evaluate_poses(result: Evaluation, poses: PathLike | None, run: Path | None, epoch: int | None):
    """Pose accuracy of the given (or the run's refined) poses against the truth; None without poses."""
    gt, rows, n_particles = result.truth, result.rows, result.n_particles
    poses_path = Path(poses) if poses is not None else None
    if poses_path is None and run is not None and epoch is not None:
        from cryoscape.analysis.pose_accuracy import run_pose_files

        poses_path = run_pose_files(run).get(epoch)
    if poses_path is None:
        return None
    from cryoscape.analysis.pose_accuracy import compare_poses, read_poses

    R, t = read_poses(poses_path, box_size=gt.box_size)
    if len(R) == len(gt) and len(R) != n_particles:  # poses of every dataset row
        R, t = R[rows], (None if t is None else t[rows])
    elif len(R) != n_particles:
        raise InputError(f"{poses_path} holds {len(R)} poses but the run has {n_particles} particles and the "
                         f"dataset {len(gt)}; pass the poses of either.")
    accuracy = compare_poses(R, gt.rotations[rows], t, None if t is None else gt.shifts_pixel[rows],
                             fit_map_shift=True)
    result.poses = {"file": str(poses_path), **accuracy.summary()}
    result.pose_angle_deg = accuracy.angle_deg
    return accuracy


def _maps_to_score(result: Evaluation, maps_dir: PathLike | None, decoder, state: dict | None,
                   box_size: int | None, device: Any, progress: bool) -> list[np.ndarray] | None:
    """One map per evaluated image: read from ``maps_dir`` or decoded from the run; None (with a note)
    when there are latents but no maps."""
    positions, gt, z, out = result.fsc_positions, result.truth, result.z, result.out_dir
    if maps_dir is not None:
        from cryoscape.io.mrc import read_mrc

        files = list_map_files(maps_dir)
        if len(files) != len(positions):
            raise InputError(f"{maps_dir} holds {len(files)} maps but {len(positions)} images are evaluated; decode "
                             f"one map per line of {out / 'eval_z.txt'}, in order (or pass --n-images {len(files)} if "
                             "the maps follow the same rule).")
        return [read_mrc(p)[0] for p in files]
    if decoder is not None:
        from tqdm.auto import tqdm

        D = int(state["data"]["box_size"])
        n = min(int(box_size), D) if box_size else min(D, gt.box_size)
        maps = []
        with torch.no_grad():
            for p in tqdm(positions, desc="maps", unit="map", disable=not progress, leave=False):
                zi = None if decoder.zdim == 0 else torch.as_tensor(z[p], device=device)
                maps.append(decoder.eval_volume(zi, box_size=n).float().cpu().numpy())
        return maps
    if z is not None:
        result.notes.append(f"no maps to score: decode the latents in {out / 'eval_z.txt'} (one map per line, in "
                            "order) and pass their folder with --maps.")
    return None


def _score_maps(result: Evaluation, maps: list[np.ndarray], accuracy, *, invert_maps: bool, flip_maps: bool) -> None:
    """Per-image FSC of the maps against each image's true map (turned into the truth's frame first
    when the poses were learnt ab initio); ``per_image_fsc.txt``, ``fsc_curves.npy`` and notes."""
    from cryoscape.io.writers import atomic_write

    gt, rows, positions, out = result.truth, result.rows, result.fsc_positions, result.out_dir
    states = gt.state_index[rows[positions]]
    maps = [(-m if invert_maps else m) for m in maps]
    maps = [m[::-1].copy() if flip_maps else m for m in maps]
    if accuracy is not None and (accuracy.handedness_flipped or _rotation_angle_deg(accuracy.global_rotation) > 1.0):
        # poses learnt ab initio: their map lives in another frame (and maybe hand) than the truth
        from cryoscape.analysis.pose_accuracy import map_in_reference_frame

        maps = [map_in_reference_frame(m, accuracy.global_rotation, accuracy.handedness_flipped,
                                       truth_map if truth_map.shape == m.shape else None)
                for m, truth_map in zip(maps, (gt.volume(s) for s in states))]
        result.notes.append(
            f"the maps were turned into the truth's frame by the pose alignment (a rotation of "
            f"{_rotation_angle_deg(accuracy.global_rotation):.1f} deg"
            f"{', mirrored' if accuracy.handedness_flipped else ''}) and centred on it before the FSC.")
    result.fsc = f = per_image_fsc(maps, [gt.volume(s) for s in states],
                                   truth_box_pixel=(gt.box_size, gt.pixel_size_angstrom))
    table = np.column_stack([positions, rows[positions], states, gt.coordinate[rows[positions]], f.auc,
                             f.res_0_5, f.angstrom(f.res_0_5), f.res_0_143, f.angstrom(f.res_0_143),
                             f.correlation, f.auc_mirror])
    np.savetxt(out / "per_image_fsc.txt", table, fmt="%.6g",
               header="position dataset_row state true_coordinate auc res_0.5_cycles_per_pixel res_0.5_angstrom "
                      "res_0.143_cycles_per_pixel res_0.143_angstrom correlation auc_vs_mirrored_truth")
    with atomic_write(out / "fsc_curves.npy") as fh:
        np.save(fh, np.concatenate([f.freqs[None], f.curves]).astype(np.float32))
    if np.mean(f.correlation) < 0:
        result.notes.append("the maps correlate negatively with the truth: they are inverted; evaluate again "
                            "with --invert-maps.")
    if np.mean(f.auc_mirror) > np.mean(f.auc) + 0.05:
        result.notes.append("the maps match the mirrored truth better: they have the other hand; evaluate again "
                            "with --flip-maps.")
    log.info("per-image FSC of %d images: AUC mean %.3f, FSC=0.5 at %.2f A (mean frequency)", len(f.auc),
             float(f.auc.mean()), float(f.angstrom(f.res_0_5.mean())))


def _score_latents(result: Evaluation, *, labels: PathLike | None, n_clusters: int | None, seed: int) -> None:
    """The latents against the true coordinate (Spearman) and, for discrete data or given labels,
    clusters against the true classes."""
    from cryoscape.analysis.selection import kmeans_labels, read_labels

    gt, rows, z = result.truth, result.rows, result.z
    coord = gt.coordinate[rows]
    if np.isfinite(coord).sum() >= 3:
        result.latent = latent_correlation(z, coord)
        result.latent["coordinate"] = gt.coordinate_name
    true_classes = gt.state_index[rows]
    predicted = None
    if labels is not None:
        predicted = read_labels(labels, n_particles=result.n_particles)
        how = f"labels from {labels}"
    elif gt.kind == "discrete" and len(np.unique(true_classes)) > 1:
        k = int(n_clusters or len(np.unique(true_classes)))
        predicted, _ = kmeans_labels(z, k, seed=seed)
        how = f"k-means of the latents, k={k} (seed {seed})"
    if predicted is not None:
        result.clusters = {"labels": how, **cluster_agreement(predicted, true_classes)}


def _rotation_angle_deg(R: np.ndarray) -> float:
    """Angle of a rotation matrix in degrees."""
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


def evaluate_poses_against_reference(poses: PathLike, reference: PathLike, out_dir: PathLike, *,
                                     ind: PathLike | None = None, box_size: int | None = None) -> dict[str, Any]:
    """Pose accuracy of ``poses`` against a reference refinement (real data, no ground truth).

    ``poses`` and ``reference`` are pose files (.star, .cs, poses.pkl, our poses.E.npz) or run
    folders (:func:`cryoscape.analysis.pose_accuracy.read_poses`); ``ind`` the reference rows of
    the predicted particles when the reference holds more.  Errors are measured after the best
    global rotation and hand and with a global map offset removed; the summary is written to
    ``out_dir/evaluation.yaml`` and returned.
    """
    import yaml

    from cryoscape.analysis.pose_accuracy import pose_accuracy, read_poses
    from cryoscape.io.writers import atomic_write

    indices = None
    if ind is not None:
        n_reference = len(read_poses(reference, box_size=box_size)[0])
        indices = load_indices_or_all(ind, n_reference)
    accuracy = pose_accuracy(poses, reference, indices=indices, box_size=box_size, fit_map_shift=True)
    summary = {"file": str(poses), "reference": str(reference), **accuracy.summary()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "evaluation.yaml", "w") as fh:
        yaml.safe_dump({"poses": summary}, fh, sort_keys=False)
    return summary


def load_indices_or_all(ind: PathLike | str | None, n: int) -> np.ndarray:
    """Rows given by an index file, or all ``n`` rows (``None`` / ``"none"``)."""
    if ind is None or str(ind).lower() == "none":
        return np.arange(n, dtype=np.int64)
    from cryoscape.io.particles import load_indices

    return load_indices(ind, n_particles=n)
