"""Heterogeneous ensembles: M ground-truth volumes and how images are assigned to them.

An :class:`Ensemble` holds the volumes and knows how to draw a state for each image:

* ``"homogeneous"``: one volume; every image uses it.
* ``"discrete"``: classes drawn with given populations (default equal).
* ``"trajectory"``: a 1-D path of M volumes; each image draws ``u ~ U[0, 1]`` and uses the
  volume nearest to it, volume ``m`` sitting at ``u = m / (M - 1)``.  ``u`` is the stored
  per-image coordinate.
* ``"hinge"``: the built-in molecule (simulate/molecule.py); each image draws a hinge angle
  uniform in ``[lo, hi]`` and uses the bin it falls in: the range is cut into M equal bins and
  bin ``m`` is rendered at its centre ``lo + (m + 1/2) (hi - lo) / M``.  The true angle is the
  stored per-image coordinate; its error from the rendered angle is at most ``(hi - lo) / (2M)``.

Per-image draws come from a numpy ``Generator`` (:meth:`Ensemble.sample_states`), so a seed fixes
them.  Volumes are float32 ``(D, D, D)`` arrays ``[z, y, x]`` on one grid, all with the same
pixel size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryoscape.errors import InputError
from cryoscape.simulate.molecule import HINGE_ANGLE_RANGE_DEG, hinge_molecule
from cryoscape.simulate.volumes import (
    atomic_model_centroid,
    is_atomic_model_path,
    is_map_path,
    render_gaussian_atoms,
    volume_from_atomic_model,
    volume_from_map,
)

__all__ = [
    "Ensemble",
    "StateAssignment",
    "homogeneous_ensemble",
    "discrete_ensemble",
    "trajectory_ensemble",
    "hinge_ensemble",
    "hinge_discrete_ensemble",
    "load_volumes",
    "build_ensemble",
    "HETEROGENEITY_CHOICES",
]

KINDS = ("homogeneous", "discrete", "trajectory", "hinge")

PathLike = str | os.PathLike


@dataclass
class StateAssignment:
    """Which volume each image shows.

    Attributes
    ----------
    state_index
        ``(N,)`` int64 index into :attr:`Ensemble.volumes`.
    coordinate
        ``(N,)`` float64 continuous ground truth: ``u`` in [0, 1] (trajectory), the hinge angle in
        degrees (hinge), or NaN (homogeneous, discrete).
    """

    state_index: np.ndarray
    coordinate: np.ndarray


@dataclass
class Ensemble:
    """M ground-truth volumes and the rule that assigns images to them (see the module docstring).

    Attributes
    ----------
    kind
        ``"homogeneous"``, ``"discrete"``, ``"trajectory"`` or ``"hinge"``.
    volumes
        ``(M, D, D, D)`` float32.
    pixel_size_angstrom
        Voxel size shared by all volumes.
    state_values
        ``(M,)`` the coordinate at which each volume sits (``u``, hinge angle in degrees) or NaN.
    populations
        ``(M,)`` probabilities of the states for ``"discrete"`` (equal otherwise).
    labels
        One string per volume (its source file or angle), for the ground-truth record.
    coordinate_name
        What :attr:`StateAssignment.coordinate` means: ``"none"``, ``"trajectory_u"`` or
        ``"hinge_angle_deg"``.
    coordinate_range
        ``(lo, hi)`` of the continuous coordinate (``(0, 1)`` or the hinge range).
    """

    kind: str
    volumes: np.ndarray
    pixel_size_angstrom: float
    state_values: np.ndarray
    populations: np.ndarray
    labels: list[str] = field(default_factory=list)
    coordinate_name: str = "none"
    coordinate_range: tuple[float, float] = (math.nan, math.nan)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown ensemble kind {self.kind!r}; use one of {KINDS}")
        self.volumes = np.asarray(self.volumes, dtype=np.float32)
        if self.volumes.ndim == 3:
            self.volumes = self.volumes[None]
        M = len(self.volumes)
        if self.volumes.ndim != 4 or len(set(self.volumes.shape[1:])) != 1:
            raise ValueError(f"volumes must be (M, D, D, D), got {self.volumes.shape}")
        self.state_values = np.broadcast_to(np.asarray(self.state_values, dtype=np.float64), (M,)).copy()
        p = np.broadcast_to(np.asarray(self.populations, dtype=np.float64), (M,)).copy()
        if (p < 0).any() or not p.sum() > 0:
            raise ValueError("populations must be non-negative with a positive sum")
        self.populations = p / p.sum()
        if not self.labels:
            self.labels = [f"state {m}" for m in range(M)]
        if len(self.labels) != M:
            raise ValueError(f"{len(self.labels)} labels for {M} volumes")

    @property
    def n_states(self) -> int:
        """M."""
        return len(self.volumes)

    @property
    def box_size(self) -> int:
        """D."""
        return int(self.volumes.shape[-1])

    def sample_states(self, n: int, rng: np.random.Generator) -> StateAssignment:
        """Draw the state (and continuous coordinate) of ``n`` images with ``rng``."""
        M = self.n_states
        if self.kind == "homogeneous":
            return StateAssignment(np.zeros(n, dtype=np.int64), np.full(n, np.nan))
        if self.kind == "discrete":
            idx = rng.choice(M, size=n, p=self.populations).astype(np.int64)
            return StateAssignment(idx, np.full(n, np.nan))
        if self.kind == "trajectory":
            u = rng.uniform(0.0, 1.0, size=n)
            idx = np.clip(np.rint(u * (M - 1)), 0, M - 1).astype(np.int64)
            return StateAssignment(idx, u)
        lo, hi = self.coordinate_range
        angle = rng.uniform(lo, hi, size=n)
        idx = np.clip(np.floor((angle - lo) / (hi - lo) * M), 0, M - 1).astype(np.int64)
        return StateAssignment(idx, angle)


# ----------------------------------------------------------------------------------------------
# loading volumes from files
# ----------------------------------------------------------------------------------------------
def load_volumes(
    paths: Sequence[PathLike],
    *,
    box_size: int | None = None,
    pixel_size_angstrom: float | None = None,
    resolution_angstrom: float | None = None,
) -> tuple[np.ndarray, float]:
    """Read maps (``.mrc``) and/or render atomic models (``.pdb``/``.cif``) onto one common grid.

    Maps are resampled to the pixel size and box (see :func:`volume_from_map`); atomic models are
    rendered as Gaussian atoms, all shifted by the centroid of the *first* atomic model so that
    conformations stay superposed (a per-model centring would hide the motion).

    Parameters
    ----------
    paths
        The files, in order.
    box_size
        ``D``; default: the first map's box, or 64 when only atomic models are given.
    pixel_size_angstrom
        Default: the first map's pixel size; for atomic models only, a pixel size at which the
        first model's largest extent fills 60% of the box.
    resolution_angstrom
        Width of rendered atoms (``sigma = 0.225 * resolution``); default 3 pixels.

    Returns
    -------
    volumes : (M, D, D, D) float32
    pixel_size_angstrom : float

    Raises
    ------
    InputError
        Missing files, unknown extensions, unreadable files, maps without a pixel size mixed
        with atomic models, non-cubic maps.
    """
    paths = [Path(p) for p in paths]
    _check_volume_paths(paths)
    maps = [p for p in paths if is_map_path(p)]
    models = [p for p in paths if is_atomic_model_path(p)]
    pixel = pixel_size_angstrom
    D = box_size
    if maps and (pixel is None or D is None):
        first, first_pixel = volume_from_map(maps[0], pixel_size_angstrom=pixel)
        D = first.shape[0] if D is None else D
        pixel = first_pixel if pixel is None else pixel
        if not pixel or pixel <= 0:
            if models:
                raise InputError(
                    f"{maps[0]} has no pixel size in its header, which is needed to render the atomic "
                    "models next to it; pass --pixel-size.",
                    path=maps[0],
                )
            pixel = 1.0
    center = atomic_model_centroid(models[0]) if models else None
    if models and (pixel is None or D is None):
        from cryoscape.simulate.volumes import read_atomic_model

        coords, _ = read_atomic_model(models[0])
        extent = 2.0 * float(np.linalg.norm(coords - center, axis=1).max())
        D = 64 if D is None else D
        pixel = round(extent / (0.6 * D), 3) if pixel is None else pixel
    resolution = 3.0 * pixel if resolution_angstrom is None else resolution_angstrom
    return _volumes_on_grid(paths, D, pixel, resolution, center), float(pixel)


def _check_volume_paths(paths: list[Path]) -> None:
    """Reject an empty list, unknown extensions and missing files, in file order, before any is read."""
    if not paths:
        raise InputError("no volume files were given; pass at least one .mrc, .pdb or .cif file.")
    for p in paths:
        if not (is_map_path(p) or is_atomic_model_path(p)):
            raise InputError(
                f"{p} has the unknown extension '{p.suffix}'; pass a map (.mrc, .map) or an atomic "
                "model (.pdb, .cif).",
                path=p,
            )
        if not p.is_file():
            raise InputError(f"{p} was not found; pass an existing map or atomic model.", path=p)


def _volumes_on_grid(
    paths: list[Path], D: int, pixel: float, resolution: float, center: np.ndarray | None
) -> np.ndarray:
    """Resample each map and render each atomic model (shifted by ``center``) onto the common grid."""
    out = np.empty((len(paths), D, D, D), dtype=np.float32)
    for m, p in enumerate(paths):
        if is_map_path(p):
            out[m], _ = volume_from_map(p, box_size=D, pixel_size_angstrom=pixel)
        else:
            out[m] = volume_from_atomic_model(
                p, box_size=D, pixel_size_angstrom=pixel, resolution_angstrom=resolution, center=center
            )
    return out


# ----------------------------------------------------------------------------------------------
# constructors
# ----------------------------------------------------------------------------------------------
def homogeneous_ensemble(volume: np.ndarray, *, pixel_size_angstrom: float, label: str = "volume") -> Ensemble:
    """One volume for every image."""
    return Ensemble("homogeneous", np.asarray(volume)[None], pixel_size_angstrom, np.nan, 1.0, [label])


def discrete_ensemble(
    volumes: np.ndarray,
    *,
    pixel_size_angstrom: float,
    populations: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
) -> Ensemble:
    """Discrete classes with ``populations`` (relative, normalised; default equal)."""
    volumes = np.asarray(volumes)
    M = len(volumes)
    if populations is not None:
        populations = np.asarray(populations, dtype=np.float64)
        if populations.shape != (M,) or (populations < 0).any() or not populations.sum() > 0:
            raise InputError(
                f"{len(populations)} populations were given for {M} classes; pass one non-negative "
                "number per class (they are normalised to sum to 1)."
            )
    return Ensemble(
        "discrete",
        volumes,
        pixel_size_angstrom,
        np.full(M, np.nan),
        np.ones(M) if populations is None else populations,
        list(labels) if labels is not None else [],
    )


def trajectory_ensemble(
    volumes: np.ndarray, *, pixel_size_angstrom: float, labels: Sequence[str] | None = None
) -> Ensemble:
    """A 1-D path through ``volumes`` (at least 2), volume ``m`` at ``u = m / (M - 1)``."""
    volumes = np.asarray(volumes)
    M = len(volumes)
    if M < 2:
        raise InputError(f"a trajectory needs at least 2 volumes but {M} was given; pass the volumes along the path.")
    return Ensemble(
        "trajectory",
        volumes,
        pixel_size_angstrom,
        np.arange(M) / (M - 1),
        np.ones(M),
        list(labels) if labels is not None else [],
        coordinate_name="trajectory_u",
        coordinate_range=(0.0, 1.0),
    )


def _render_hinge(angle_deg: float, box_size: int, pixel_size_angstrom: float, resolution_angstrom: float) -> np.ndarray:
    coords, weights = hinge_molecule(angle_deg)
    return render_gaussian_atoms(
        coords,
        weights,
        box_size=box_size,
        pixel_size_angstrom=pixel_size_angstrom,
        resolution_angstrom=resolution_angstrom,
    )


def _check_range(angle_range_deg: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(a) for a in angle_range_deg)
    if not hi > lo:
        raise InputError(f"the hinge range {lo:g}..{hi:g} degrees is empty; pass MIN MAX with MAX > MIN.")
    return lo, hi


def hinge_ensemble(
    *,
    box_size: int,
    pixel_size_angstrom: float,
    resolution_angstrom: float,
    angle_range_deg: Sequence[float] = HINGE_ANGLE_RANGE_DEG,
    n_states: int = 40,
) -> Ensemble:
    """The built-in hinge molecule, continuous angle in ``angle_range_deg`` over ``n_states`` bins."""
    lo, hi = _check_range(angle_range_deg)
    if n_states < 1:
        raise InputError(f"the number of hinge states must be at least 1, not {n_states}.")
    centres = lo + (np.arange(n_states) + 0.5) * (hi - lo) / n_states
    volumes = np.stack([_render_hinge(a, box_size, pixel_size_angstrom, resolution_angstrom) for a in centres])
    return Ensemble(
        "hinge",
        volumes,
        pixel_size_angstrom,
        centres,
        np.ones(n_states),
        [f"hinge {a:.3f} deg" for a in centres],
        coordinate_name="hinge_angle_deg",
        coordinate_range=(lo, hi),
    )


def hinge_discrete_ensemble(
    n_classes: int,
    *,
    box_size: int,
    pixel_size_angstrom: float,
    resolution_angstrom: float,
    angle_range_deg: Sequence[float] = HINGE_ANGLE_RANGE_DEG,
    populations: Sequence[float] | None = None,
) -> Ensemble:
    """``n_classes`` discrete conformations of the built-in molecule, angles evenly spaced over the
    range (both ends included; one class sits at the range's middle)."""
    lo, hi = _check_range(angle_range_deg)
    if n_classes < 1:
        raise InputError(f"the number of classes must be at least 1, not {n_classes}.")
    angles = np.array([0.5 * (lo + hi)]) if n_classes == 1 else np.linspace(lo, hi, n_classes)
    volumes = np.stack([_render_hinge(a, box_size, pixel_size_angstrom, resolution_angstrom) for a in angles])
    ens = discrete_ensemble(
        volumes,
        pixel_size_angstrom=pixel_size_angstrom,
        populations=populations,
        labels=[f"hinge {a:.3f} deg" for a in angles],
    )
    ens.state_values = angles
    return ens


# ----------------------------------------------------------------------------------------------
# one entry point for the command line
# ----------------------------------------------------------------------------------------------
HETEROGENEITY_CHOICES = ("none", "hinge", "discrete", "trajectory")


def build_ensemble(
    *,
    molecule: str | os.PathLike | None = None,
    heterogeneity: str | None = None,
    classes: Sequence[PathLike] | None = None,
    populations: Sequence[float] | None = None,
    trajectory: Sequence[PathLike] | None = None,
    n_classes: int | None = None,
    hinge_range_deg: Sequence[float] = HINGE_ANGLE_RANGE_DEG,
    hinge_states: int = 40,
    box_size: int | None = None,
    pixel_size_angstrom: float | None = None,
    resolution_angstrom: float | None = None,
) -> Ensemble:
    """Build the ensemble that ``cryoscape simulate`` options describe.

    Parameters
    ----------
    molecule
        ``"hinge"`` (the built-in molecule, the default) or a map / atomic model file.
    heterogeneity
        ``"none"``, ``"hinge"``, ``"discrete"`` or ``"trajectory"``.  Default: ``"discrete"`` with
        ``classes``, ``"trajectory"`` with ``trajectory``, ``"hinge"`` for the built-in molecule
        and ``"none"`` for a file.
    classes, populations
        Files of the discrete classes and their relative populations.
    trajectory
        Files along a 1-D trajectory, in order.
    n_classes
        For the built-in molecule with ``"discrete"``: number of hinge angles (default 3),
        evenly spaced over ``hinge_range_deg``.
    hinge_range_deg, hinge_states
        Range of hinge angles and number of rendered bins (``"hinge"``).  With ``"none"`` the
        built-in molecule is rendered at the first angle of the range.
    box_size
        ``D``; default 64 for the built-in molecule and atomic models, a map's own box for maps.
    pixel_size_angstrom
        Default: :func:`cryoscape.simulate.molecule.default_pixel_size_angstrom` for the built-in
        molecule (it fills ~60% of the box), the map's own, or (atomic models) 60% fill.
    resolution_angstrom
        Gaussian atom width (``sigma = 0.225 * resolution``); default 3 pixels.

    Raises
    ------
    InputError
        Contradictory options (e.g. ``--classes`` with ``--heterogeneity hinge``), bad files.
    """
    builtin = _check_ensemble_options(molecule, heterogeneity, classes, populations, trajectory)
    grid = dict(box_size=box_size, pixel_size_angstrom=pixel_size_angstrom, resolution_angstrom=resolution_angstrom)
    if classes:
        if heterogeneity not in (None, "discrete"):
            raise InputError(f"--classes gives discrete classes but --heterogeneity is {heterogeneity}; drop one of them.")
        volumes, pixel = load_volumes(classes, **grid)
        return discrete_ensemble(
            volumes, pixel_size_angstrom=pixel, populations=populations, labels=[os.fspath(p) for p in classes]
        )
    if trajectory:
        if heterogeneity not in (None, "trajectory"):
            raise InputError(f"--trajectory gives a trajectory but --heterogeneity is {heterogeneity}; drop one of them.")
        volumes, pixel = load_volumes(trajectory, **grid)
        return trajectory_ensemble(volumes, pixel_size_angstrom=pixel, labels=[os.fspath(p) for p in trajectory])

    if builtin:
        return _builtin_ensemble(
            heterogeneity, n_classes, populations, hinge_range_deg, hinge_states, box_size, pixel_size_angstrom,
            resolution_angstrom,
        )

    kind = heterogeneity or "none"
    if kind != "none":
        what = {"discrete": "--classes FILE...", "trajectory": "--trajectory FILE...", "hinge": "the built-in molecule (--molecule hinge)"}
        raise InputError(f"--heterogeneity {kind} with --molecule {molecule} needs {what[kind]}; pass those or --heterogeneity none.")
    volumes, pixel = load_volumes([molecule], **grid)
    return homogeneous_ensemble(volumes[0], pixel_size_angstrom=pixel, label=os.fspath(molecule))


def _check_ensemble_options(
    molecule: str | os.PathLike | None,
    heterogeneity: str | None,
    classes: Sequence[PathLike] | None,
    populations: Sequence[float] | None,
    trajectory: Sequence[PathLike] | None,
) -> bool:
    """Reject contradictory ``cryoscape simulate`` options; True when the built-in molecule is meant."""
    if heterogeneity is not None and heterogeneity not in HETEROGENEITY_CHOICES:
        raise InputError(f"unknown heterogeneity {heterogeneity!r}; use one of {', '.join(HETEROGENEITY_CHOICES)}.")
    if classes and trajectory:
        raise InputError("--classes and --trajectory were both given; pass one of them.")
    if populations is not None and not classes and heterogeneity != "discrete":
        raise InputError("--populations needs discrete classes; pass --classes FILE... or --heterogeneity discrete.")
    builtin = molecule is None or str(molecule) == "hinge"
    if (classes or trajectory) and not builtin:
        raise InputError(
            f"--molecule {molecule} cannot be combined with --classes/--trajectory; list every volume "
            "in --classes or --trajectory instead."
        )
    return builtin


def _builtin_ensemble(
    heterogeneity: str | None,
    n_classes: int | None,
    populations: Sequence[float] | None,
    hinge_range_deg: Sequence[float],
    hinge_states: int,
    box_size: int | None,
    pixel_size_angstrom: float | None,
    resolution_angstrom: float | None,
) -> Ensemble:
    """The built-in hinge molecule's ensemble (default ``"hinge"``), on its default grid unless given one."""
    from cryoscape.simulate.molecule import default_pixel_size_angstrom

    D = 64 if box_size is None else int(box_size)
    pixel = default_pixel_size_angstrom(D) if pixel_size_angstrom is None else float(pixel_size_angstrom)
    resolution = 3.0 * pixel if resolution_angstrom is None else float(resolution_angstrom)
    kind = heterogeneity or "hinge"
    common = dict(box_size=D, pixel_size_angstrom=pixel, resolution_angstrom=resolution)
    if kind == "hinge":
        return hinge_ensemble(angle_range_deg=hinge_range_deg, n_states=hinge_states, **common)
    if kind == "discrete":
        return hinge_discrete_ensemble(
            3 if n_classes is None else n_classes, angle_range_deg=hinge_range_deg, populations=populations, **common
        )
    if kind == "none":
        angle = float(hinge_range_deg[0])
        return homogeneous_ensemble(
            _render_hinge(angle, D, pixel, resolution), pixel_size_angstrom=pixel, label=f"hinge {angle:.3f} deg"
        )
    raise InputError(
        "--heterogeneity trajectory needs --trajectory FILE...; for a continuous motion of the built-in "
        "molecule use --heterogeneity hinge."
    )
