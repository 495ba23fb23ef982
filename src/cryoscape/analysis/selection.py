"""Choosing particles from a trained run and writing them back for RELION or cryoSPARC.

A run's latents ``z.E.npy`` hold one row per *trained* particle: the rows of the file it was
trained on, after its ``--ind`` and ``--first``.  Every selection here is first a set of
positions in that latent array and is then mapped back to rows of the ORIGINAL particle file
(:func:`run_particle_rows`), so the subset written is of the original full-resolution particles
with their original metadata (a .star keeps its optics table and every column, a .cs every field).

Criteria (each returns 0-based positions in the latent array, ascending)
    * a k-means cluster (:func:`kmeans_labels`) or a Gaussian-mixture component
      (:func:`gmm_labels`) of the latents, or any per-particle label file;
    * latent-norm outliers (:func:`latent_norm_outliers`, thesis 4.4.10: junk particles sit far
      from the bulk of the latent distribution);
    * an index list;
    * a polygon in a 2-D embedding of the latents (:func:`points_in_polygon`: the first two
      principal components, a UMAP, or any ``(N, 2)`` array).

The full command (:func:`select_from_run`) then writes the original rows as a cryoDRGN-style
index pickle and as a .star or .cs subset (:func:`write_selection`).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryoscape.errors import InputError

__all__ = [
    "RunLatents",
    "read_run_config",
    "read_run_latents",
    "run_particle_rows",
    "load_run_particles",
    "kmeans_labels",
    "gmm_labels",
    "read_labels",
    "indices_in_clusters",
    "latent_norm_outliers",
    "read_polygon",
    "write_polygon",
    "points_in_polygon",
    "pca_embedding",
    "load_embedding",
    "complement",
    "selection_output_paths",
    "write_selection",
    "Selection",
    "choose_particles",
    "select_from_run",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
_Z_RE = re.compile(r"^z\.(\d+)\.npy$")


# --------------------------------------------------------------------------------------------
# reading a run folder
# --------------------------------------------------------------------------------------------
@dataclass
class RunLatents:
    """The latents of one epoch of a run.

    Attributes
    ----------
    z
        ``(N, zdim)`` float32 posterior means, one row per trained particle.
    epoch
        0-based epoch they were collected in.
    path
        The ``z.E.npy`` file.
    """

    z: np.ndarray
    epoch: int
    path: Path


def read_run_config(run_dir: PathLike) -> dict[str, Any]:
    """The ``training`` options recorded in ``run_dir/config.yaml`` (``{}`` when absent)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise InputError(f"{path} could not be parsed as YAML; restore the run's config.yaml.") from None
    training = content.get("training") or content.get("arguments") or {}
    return dict(training) if isinstance(training, dict) else {}


def read_run_latents(run_dir: PathLike, *, epoch: int | None = None) -> RunLatents:
    """The latents ``z.E.npy`` of ``run_dir`` (``epoch`` 0-based; default the latest).

    Raises
    ------
    InputError
        The folder holds no latents (a homogeneous run, or not a run) or not that epoch.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run} is not a folder; pass the output folder of cryoscape train.")
    found = sorted((int(m.group(1)), p) for p in run.iterdir() if (m := _Z_RE.match(p.name)))
    if not found:
        raise InputError(f"{run} holds no latents (z.EPOCH.npy); pass the folder of a heterogeneous "
                         "run (cryoscape train --zdim N).")
    if epoch is None or epoch < 0:
        e, path = found[-1]
    else:
        matches = [p for e, p in found if e == int(epoch)]
        if not matches:
            listed = ", ".join(str(e) for e, _ in found)
            raise InputError(f"{run} has no latents for epoch {epoch} (epochs with z.EPOCH.npy: {listed}); "
                             "pass one of those to --epoch.")
        e, path = int(epoch), matches[0]
    z = np.load(path, allow_pickle=False)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or not np.isfinite(z).all():
        raise InputError(f"{path} does not hold finite (N, zdim) latents; restore it from the run.")
    return RunLatents(z=z.astype(np.float32), epoch=e, path=path)


def _resolve_recorded_path(value: str, run_dir: Path) -> Path | None:
    """A path recorded in config.yaml: as written (absolute, or from the working directory),
    else relative to the run folder and its parent (runs are often started next to the data)."""
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [p, run_dir / p, run_dir.parent / p]
    return next((c for c in candidates if c.exists()), None)


def run_particle_rows(
    run_dir: PathLike | None,
    n_latents: int,
    *,
    n_source: int,
    train_ind: PathLike | str | None = None,
    first: int | None = None,
    source_name: str = "the particle file",
    hint: str = ("pass the particle file the run was trained on (--particles), and --train-ind if its --ind "
                 "file moved"),
    ind_flag: str = "--train-ind",
) -> np.ndarray:
    """Row of the original particle file of each trained particle (each latent row).

    The run's ``--ind`` and ``--first`` (from ``run_dir/config.yaml``) are applied to
    ``arange(n_source)``, exactly as training did.

    Parameters
    ----------
    run_dir
        The run folder; None means no recorded ``--ind``/``--first``.
    n_latents
        Rows of the latent array; the result must have as many.
    n_source
        Rows of the original particle file.
    train_ind
        Overrides the recorded ``--ind``: an index file, or ``"none"`` for "the particle file
        holds exactly the trained particles, in order".
    first
        Overrides the recorded ``--first``.
    source_name, hint, ind_flag
        The particle file, what to do when the counts differ, and the option that overrides the
        recorded ``--ind``, for error messages.

    Raises
    ------
    InputError
        The recorded index file is gone, indexes past the particle file, or the counts differ.
    """
    config = read_run_config(run_dir) if run_dir is not None else {}
    run = Path(run_dir) if run_dir is not None else Path.cwd()
    if train_ind is not None and str(train_ind).lower() == "none":
        rows = np.arange(n_source, dtype=np.int64)
        first = None
    else:
        from cryoscape.io.particles import load_indices

        ind = train_ind if train_ind is not None else config.get("ind")
        first = first if first is not None else config.get("first")
        if ind:
            path = Path(ind) if train_ind is not None else _resolve_recorded_path(str(ind), run)
            if path is None or not path.is_file():
                raise InputError(f"{run / 'config.yaml'} says the run was trained with --ind {ind}, which was not "
                                 f"found; pass it with {ind_flag} FILE (or {ind_flag} none if the particle file "
                                 "holds exactly the trained particles).")
            rows = load_indices(path, n_particles=n_source)
        else:
            rows = np.arange(n_source, dtype=np.int64)
    if first:
        rows = rows[: int(first)]
    if len(rows) != n_latents:
        how = "" if train_ind is None and not config.get("ind") else " after its --ind"
        raise InputError(f"{source_name} gives {len(rows)} particles{how} but the run has {n_latents} latents; "
                         f"{hint}.")
    return rows


def load_run_particles(run_dir: PathLike, *, particles: PathLike | None = None,
                       datadir: PathLike | None = None):
    """The original particle table of a run: ``particles`` or the file recorded in config.yaml.

    ``.star`` and ``.cs`` files are read without opening the stacks (a subset can be written on a
    machine that cannot see the images) and without the run's ``--poses``/``--ctf`` overrides,
    so their rows are written back untouched.  Stack lists and bare stacks get the recorded
    ``--poses``/``--ctf`` pickles, which a .star subset of them needs.
    """
    from cryoscape.io.particles import load_particles

    run = Path(run_dir)
    config = read_run_config(run)
    overrides: dict[str, Any] = {}
    if particles is None:
        recorded = config.get("particles")
        if not recorded:
            raise InputError(f"{run / 'config.yaml'} records no particle file; pass the original particles "
                             "with --particles FILE.")
        path = _resolve_recorded_path(str(recorded), run)
        if path is None:
            raise InputError(f"the run's particle file {recorded} (from {run / 'config.yaml'}) was not found; "
                             "pass the original particles with --particles FILE.")
        datadir = datadir if datadir is not None else config.get("datadir")
        for key in ("poses", "ctf"):
            if config.get(key):
                found = _resolve_recorded_path(str(config[key]), run)
                if found is not None:
                    overrides[f"{key}_path"] = found
    else:
        path = Path(particles)
    suffix = path.suffix.lower()
    if suffix in (".star", ".cs"):
        return load_particles(path, datadir=datadir, check_stacks=False)
    return load_particles(path, datadir=datadir, **overrides)


# --------------------------------------------------------------------------------------------
# criteria
# --------------------------------------------------------------------------------------------
def kmeans_labels(z: np.ndarray, k: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means of the latents: ``(labels (N,) int64, centres (k, zdim))``.

    The same k-means as ``cryoscape analyze`` (:func:`cryoscape.analysis.latent.kmeans_on_data`,
    seeded), so ``--kmeans K --seed S`` numbers the clusters as analyze's k-means with the same
    ``K`` and seed does, and the same run always gives the same clusters.
    """
    from cryoscape.analysis.latent import kmeans_on_data

    z = np.asarray(z)
    if not 1 <= k <= len(z):
        raise InputError(f"--kmeans {k} is not between 1 and the number of particles ({len(z)}); pass a valid k.")
    result = kmeans_on_data(z, int(k), seed=seed)
    return result.labels.astype(np.int64), np.asarray(result.centers)


def gmm_labels(z: np.ndarray, n_components: int, *, seed: int = 0,
               covariance_type: str = "full") -> tuple[np.ndarray, Any]:
    """Gaussian mixture of the latents (full covariances, thesis 4.4.10): ``(labels, fitted model)``."""
    from sklearn.mixture import GaussianMixture

    z = np.asarray(z, dtype=np.float64)
    if not 1 <= n_components <= len(z):
        raise InputError(f"--gmm {n_components} is not between 1 and the number of particles ({len(z)}); "
                         "pass a valid number of components.")
    model = GaussianMixture(n_components=int(n_components), covariance_type=covariance_type,
                            random_state=seed, n_init=3).fit(z)
    return model.predict(z).astype(np.int64), model


def read_labels(path: PathLike, *, n_particles: int) -> np.ndarray:
    """Per-particle integer labels from a .pkl / .npy / .txt file (e.g. k-means labels of ``analyze``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass a label file with one integer per particle.")
    try:
        if path.suffix.lower() == ".pkl":
            with open(path, "rb") as f:
                values = pickle.load(f)
        elif path.suffix.lower() == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            values = np.loadtxt(path, ndmin=1)
        labels = np.asarray(values)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user error
        raise InputError(f"{path} could not be read as labels ({type(err).__name__}); pass a .pkl, .npy or "
                         ".txt with one integer per particle.") from None
    if labels.ndim != 1 or len(labels) != n_particles:
        raise InputError(f"{path} holds {labels.size} labels but the run has {n_particles} particles; pass the "
                         "labels made for this run.")
    if labels.size and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise InputError(f"{path} holds non-integer labels; pass one integer cluster number per particle.")
    return labels.astype(np.int64)


def indices_in_clusters(labels: np.ndarray, clusters, *, what: str = "cluster") -> np.ndarray:
    """Positions whose label is one of ``clusters`` (ascending).

    Raises
    ------
    InputError
        A requested cluster does not exist (the message lists those that do, with their sizes).
    """
    labels = np.asarray(labels, dtype=np.int64)
    values, counts = np.unique(labels, return_counts=True)
    wanted = [int(c) for c in clusters]
    missing = [c for c in wanted if c not in set(values.tolist())]
    if missing:
        sizes = ", ".join(f"{v}: {c}" for v, c in zip(values.tolist(), counts.tolist()))
        raise InputError(f"{what} {missing[0]} does not exist; pass one of the {what}s (with particle counts "
                         f"{sizes}).")
    return np.flatnonzero(np.isin(labels, wanted)).astype(np.int64)


def latent_norm_outliers(
    z: np.ndarray, *, zscore: float | None = None, percentile: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Particles whose latent lies unusually far from the centre of the latent distribution.

    The distance of each latent from the mean latent, ``r_i = |z_i - mean(z)|``, is compared
    either with its z-score, ``(r_i - mean(r)) / std(r) > zscore``, or with a percentile of
    ``r``, ``r_i > percentile(r, percentile)``.  Junk particles (ice, aggregates, bad picks)
    encode far from the bulk (thesis 4.4.10, where the outliers were found from the magnitude
    of the latent encodings).

    Returns
    -------
    outliers
        Positions of the outliers (ascending).
    distance
        ``(N,)`` ``r_i``.
    """
    if (zscore is None) == (percentile is None):
        raise ValueError("pass exactly one of zscore and percentile")
    z = np.asarray(z, dtype=np.float64)
    r = np.linalg.norm(z - z.mean(axis=0), axis=1)
    if zscore is not None:
        std = r.std()
        score = (r - r.mean()) / (std if std > 0 else 1.0)
        keep = score > float(zscore)
    else:
        if not 0 <= percentile <= 100:
            raise InputError(f"--norm-percentile {percentile} is not between 0 and 100; pass a percentile.")
        keep = r > np.percentile(r, float(percentile))
    return np.flatnonzero(keep).astype(np.int64), r


def read_polygon(path: PathLike) -> np.ndarray:
    """Polygon vertices ``(M, 2)`` from a text file (one ``x y`` pair a line; ``#`` comments) or .npy."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass a polygon file with one 'x y' vertex a line.")
    try:
        if path.suffix.lower() == ".npy":
            vertices = np.load(path, allow_pickle=False)
        else:
            vertices = np.loadtxt(path, ndmin=2, delimiter=None, comments="#")
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user error
        raise InputError(f"{path} could not be read as a polygon ({type(err).__name__}); write one 'x y' vertex "
                         "a line.") from None
    vertices = np.asarray(vertices, dtype=np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 2 or len(vertices) < 3 or not np.isfinite(vertices).all():
        raise InputError(f"{path} does not hold at least 3 finite 'x y' vertices; write one vertex a line.")
    return vertices


def write_polygon(path: PathLike, vertices: np.ndarray, *, comment: str = "") -> None:
    """Write polygon vertices as text, one ``x y`` a line (readable by :func:`read_polygon`)."""
    from cryoscape.io.writers import atomic_write

    vertices = np.asarray(vertices, dtype=np.float64).reshape(-1, 2)
    with atomic_write(path, "w") as f:
        if comment:
            f.write(f"# {comment}\n")
        for x, y in vertices:
            f.write(f"{x:.9g} {y:.9g}\n")


def points_in_polygon(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Positions of the ``(N, 2)`` points inside the polygon ``(M, 2)`` (even-odd rule; ascending).

    The polygon closes itself (last vertex back to the first).  Points exactly on an edge may
    fall either way.
    """
    from matplotlib.path import Path as PolygonPath  # pure geometry, no plotting

    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got {points.shape}")
    inside = PolygonPath(np.asarray(vertices, dtype=np.float64)).contains_points(points)
    return np.flatnonzero(inside).astype(np.int64)


def pca_embedding(z: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (N, n), explained variance ratio (n,))`` of the latents' principal components.

    The PCA of ``cryoscape analyze`` (:func:`cryoscape.analysis.latent.compute_pca`, with its sign
    convention), so a polygon drawn on analyze's PC plot selects the same particles here.  Latents
    with fewer dimensions than ``n_components`` are padded with zero columns (a 1-D latent plots
    against 0).
    """
    from cryoscape.analysis.latent import compute_pca

    z = np.asarray(z, dtype=np.float64)
    pca = compute_pca(z)
    n = min(n_components, pca.projections.shape[1])
    scores = pca.projections[:, :n].astype(np.float64)
    ratio = np.asarray(pca.explained_variance_ratio[:n], dtype=np.float64)
    if n < n_components:
        scores = np.concatenate([scores, np.zeros((len(z), n_components - n))], axis=1)
        ratio = np.concatenate([ratio, np.zeros(n_components - n)])
    return scores, ratio


def load_embedding(spec: str, z: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, str]:
    """The 2-D embedding a polygon is drawn in: ``(points (N, 2), axis label prefix)``.

    ``spec`` is ``pc`` (first two principal components of the latents), ``z`` (the latents
    themselves, for ``zdim`` 2; a 1-D latent is plotted against 0), ``umap`` (computed now with
    umap-learn, seeded; slow for large N) or a ``.npy`` / ``.pkl`` / ``.txt`` file holding an
    ``(N, 2)`` array such as the UMAP written by ``cryoscape analyze``.
    """
    z = np.asarray(z)
    n = len(z)
    key = str(spec).lower()
    if key == "pc":
        return pca_embedding(z, 2)[0], "PC"
    if key == "z":
        if z.shape[1] > 2:
            raise InputError(f"--embedding z needs zdim <= 2 but the latents have {z.shape[1]} dimensions; "
                             "use --embedding pc or an embedding file.")
        return np.concatenate([z, np.zeros((n, 2 - z.shape[1]))], axis=1).astype(np.float64), "z"
    if key == "umap":
        try:
            import umap
        except ImportError:  # pragma: no cover - umap-learn is a dependency
            raise InputError("umap-learn is not installed; pass --embedding pc or a UMAP file from analyze.") from None
        return umap.UMAP(random_state=seed).fit_transform(z.astype(np.float32)).astype(np.float64), "UMAP"
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--embedding {spec} is neither pc, z, umap nor an existing file; pass one of those.")
    try:
        if path.suffix.lower() == ".pkl":
            with open(path, "rb") as f:
                points = np.asarray(pickle.load(f), dtype=np.float64)
        elif path.suffix.lower() == ".npy":
            points = np.load(path, allow_pickle=False).astype(np.float64)
        else:
            points = np.loadtxt(path, ndmin=2)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user error
        raise InputError(f"{path} could not be read as an embedding ({type(err).__name__}); pass an (N, 2) "
                         ".npy, .pkl or .txt array.") from None
    if points.ndim != 2 or points.shape[1] < 2 or len(points) != n:
        raise InputError(f"{path} holds an array of shape {points.shape} but the run has {n} particles; pass an "
                         f"({n}, 2) embedding of this run's latents.")
    return points[:, :2], path.stem


def complement(indices: np.ndarray, n: int) -> np.ndarray:
    """The positions in ``range(n)`` not in ``indices`` (ascending)."""
    keep = np.ones(n, dtype=bool)
    keep[np.asarray(indices, dtype=np.int64)] = False
    return np.flatnonzero(keep).astype(np.int64)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
_INDEX_SUFFIXES = (".pkl", ".txt", ".npy")
_SUBSET_SUFFIXES = (".star", ".cs")


def selection_output_paths(out: PathLike, source_suffix: str) -> dict[str, Path]:
    """Where :func:`write_selection` writes, from the ``-o`` name.

    ``sel.star`` / ``sel.cs``: the subset there and the indices in ``sel.ind.pkl``.
    ``sel.pkl`` / ``sel.txt`` / ``sel.npy``: the indices there and the subset beside them in the
    original file's format (``sel.star`` or ``sel.cs``; ``.star`` for stack lists and stacks).
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix in _SUBSET_SUFFIXES:
        return {"subset": out, "indices": out.with_suffix(".ind.pkl")}
    if suffix in _INDEX_SUFFIXES:
        fmt = source_suffix.lower() if source_suffix.lower() in _SUBSET_SUFFIXES else ".star"
        return {"indices": out, "subset": out.with_suffix(fmt)}
    raise InputError(f"-o {out} has the unknown extension '{out.suffix}'; name the output .star, .cs "
                     "(subset) or .pkl, .txt, .npy (indices).")


def _write_indices(path: Path, rows: np.ndarray) -> None:
    from cryoscape.io.writers import atomic_write

    rows = np.asarray(rows, dtype=np.int64)
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        with atomic_write(path) as f:
            pickle.dump(rows, f, protocol=4)
    elif suffix == ".npy":
        with atomic_write(path) as f:
            np.save(f, rows, allow_pickle=False)
    else:
        with atomic_write(path, "w") as f:
            f.write("\n".join(str(int(r)) for r in rows) + ("\n" if len(rows) else ""))


def write_selection(out: PathLike, table, rows: np.ndarray, *, absolute_paths: bool = False) -> dict[str, Path]:
    """Write the particles ``rows`` of ``table`` as indices and as a .star / .cs subset.

    A .star subset keeps ``rlnImageName`` exactly as the input had it (RELION resolves names from
    its project folder), or with ``absolute_paths`` gets absolute stack paths.

    Parameters
    ----------
    out
        ``-o`` name (see :func:`selection_output_paths`).
    table
        The original :class:`~cryoscape.io.particles.ParticleTable`.
    rows
        0-based rows of ``table``, in the order to write.

    Returns
    -------
    dict
        ``{"indices": path, "subset": path}``.
    """
    from cryoscape.io.cryosparc import write_cs
    from cryoscape.io.star import write_star

    rows = np.asarray(rows, dtype=np.int64)
    paths = selection_output_paths(out, Path(table.source_path).suffix)
    if len(rows) == 0:
        raise InputError("the selection is empty, so nothing was written; loosen the criterion or drop "
                         "--invert-selection.")
    if paths["subset"].suffix.lower() == ".cs":
        write_cs(paths["subset"], table, indices=rows)
    else:
        write_star(paths["subset"], table, indices=rows, image_names="absolute" if absolute_paths else "keep")
    _write_indices(paths["indices"], rows)
    return paths


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """What :func:`select_from_run` chose and wrote.

    Attributes
    ----------
    positions
        Selected positions in the run's latent array (the run's particle order).
    rows
        The same particles as rows of the original particle file.
    description
        One line saying how they were chosen.
    n_particles
        Trained particles the choice was made from.
    paths
        Files written (``indices``, ``subset``).
    labels
        Per-particle labels of a clustering criterion (None otherwise).
    embedding
        ``(N, 2)`` embedding of a polygon criterion (None otherwise).
    """

    positions: np.ndarray
    rows: np.ndarray
    description: str
    n_particles: int
    paths: dict[str, Path] = field(default_factory=dict)
    labels: np.ndarray | None = None
    embedding: np.ndarray | None = None
    embedding_label: str = ""
    polygon: np.ndarray | None = None


def _cluster_table(labels: np.ndarray, z: np.ndarray) -> str:
    r = np.linalg.norm(z - z.mean(axis=0), axis=1)
    parts = []
    for c in np.unique(labels):
        members = labels == c
        parts.append(f"{int(c)}: {int(members.sum())} particles, mean |z - mean| {r[members].mean():.3g}")
    return "; ".join(parts)


def choose_particles(
    z: np.ndarray,
    *,
    kmeans: int | None = None,
    gmm: int | None = None,
    labels: PathLike | np.ndarray | None = None,
    clusters: list[int] | None = None,
    outliers: bool = False,
    zscore: float | None = None,
    norm_percentile: float | None = None,
    ind: PathLike | None = None,
    polygon: PathLike | np.ndarray | None = None,
    embedding: str | np.ndarray = "pc",
    invert: bool = False,
    seed: int = 0,
) -> Selection:
    """Apply one criterion to the latents ``z``; returns a :class:`Selection` without rows or paths.

    Exactly one of ``kmeans``, ``gmm``, ``labels``, ``outliers``, ``ind`` and ``polygon`` is used.
    ``clusters`` names the k-means clusters / GMM components / labels to take.  ``ind`` holds
    positions in the run's particle order.  ``invert`` takes every other trained particle.
    """
    z = np.asarray(z)
    n = len(z)
    modes = {"kmeans": kmeans is not None, "gmm": gmm is not None, "labels": labels is not None,
             "outliers": bool(outliers), "ind": ind is not None, "polygon": polygon is not None}
    chosen = [k for k, v in modes.items() if v]
    if len(chosen) != 1:
        raise InputError("pass exactly one selection criterion (--kmeans, --gmm, --labels, --outliers, --ind, "
                         f"--polygon or --interactive); got {', '.join(chosen) or 'none'}.")
    mode = chosen[0]
    if mode != "outliers" and (zscore is not None or norm_percentile is not None):
        raise InputError("--zscore and --norm-percentile go with --outliers; add --outliers or drop them.")
    if mode not in ("kmeans", "gmm", "labels") and clusters:
        raise InputError("--cluster/--component go with --kmeans, --gmm or --labels; add one of those or drop them.")
    chosen_by = {"kmeans": _by_labels, "gmm": _by_labels, "labels": _by_labels, "outliers": _by_outliers,
                 "ind": _by_index_file, "polygon": _by_polygon}[mode]
    selection = chosen_by(z, mode=mode, kmeans=kmeans, gmm=gmm, labels=labels, clusters=clusters, zscore=zscore,
                          norm_percentile=norm_percentile, ind=ind, polygon=polygon, embedding=embedding, seed=seed)
    positions, description = selection.positions, selection.description
    if invert:
        positions = complement(positions, n)
        description = f"all trained particles except those {description}" if mode != "outliers" else \
            f"all trained particles except {description}"
    selection.positions, selection.description = positions, description
    return selection


def _selection(z: np.ndarray, positions: np.ndarray, description: str, **extra: Any) -> Selection:
    return Selection(positions=np.asarray(positions), rows=np.empty(0, dtype=np.int64), description=description,
                     n_particles=len(z), **extra)


def _by_labels(z: np.ndarray, *, mode: str, kmeans, gmm, labels, clusters, seed: int, **_: Any) -> Selection:
    """k-means clusters, GMM components or labels read from a file: the ``clusters`` named."""
    if mode == "kmeans":
        result_labels, _ = kmeans_labels(z, int(kmeans), seed=seed)
        what, flag, name = "k-means cluster", "--cluster", f"k-means (k={kmeans}, seed {seed})"
    elif mode == "gmm":
        result_labels, _ = gmm_labels(z, int(gmm), seed=seed)
        what, flag, name = "GMM component", "--component", f"Gaussian mixture ({gmm} components, seed {seed})"
    else:
        result_labels = labels if isinstance(labels, np.ndarray) else read_labels(labels, n_particles=len(z))
        origin = "an array" if isinstance(labels, np.ndarray) else str(labels)
        what, flag, name = "label", "--cluster", f"labels from {origin}"
    if not clusters:
        raise InputError(f"pass {flag} with one or more {what}s to select (of {name}: "
                         f"{_cluster_table(result_labels, z)}).")
    positions = indices_in_clusters(result_labels, clusters, what=what)
    description = f"{what}s {' '.join(str(c) for c in clusters)} of {name}"
    return _selection(z, positions, description, labels=result_labels)


def _by_outliers(z: np.ndarray, *, zscore: float | None, norm_percentile: float | None, **_: Any) -> Selection:
    """Latent-norm outliers by z-score (default 3) or percentile."""
    if zscore is None and norm_percentile is None:
        zscore = 3.0
    if zscore is not None and norm_percentile is not None:
        raise InputError("pass either --zscore or --norm-percentile with --outliers, not both.")
    positions, _ = latent_norm_outliers(z, zscore=zscore, percentile=norm_percentile)
    rule = f"z-score > {zscore:g}" if zscore is not None else f"above the {norm_percentile:g}th percentile"
    return _selection(z, positions, f"latent-norm outliers (|z - mean z| {rule})")


def _by_index_file(z: np.ndarray, *, ind: PathLike, **_: Any) -> Selection:
    """Positions in the run's particle order listed in an index file."""
    from cryoscape.io.particles import load_indices

    positions = np.unique(load_indices(ind, n_particles=len(z)))
    return _selection(z, positions, f"the run's particles listed in {ind}")


def _by_polygon(z: np.ndarray, *, polygon, embedding, seed: int, **_: Any) -> Selection:
    """Particles inside a polygon (file or drawn vertices) in a 2-D embedding of the latents."""
    n = len(z)
    poly = read_polygon(polygon) if not isinstance(polygon, np.ndarray) else np.asarray(polygon, float)
    if isinstance(embedding, np.ndarray):
        points, points_label = np.asarray(embedding, dtype=np.float64), "embedding"
        if points.shape != (n, 2):
            raise InputError(f"the embedding has shape {points.shape}, not ({n}, 2).")
    else:
        points, points_label = load_embedding(embedding, z, seed=seed)
    positions = points_in_polygon(points, poly)
    source = "drawn" if isinstance(polygon, np.ndarray) else str(polygon)
    return _selection(z, positions, f"inside the polygon {source} in the {points_label} embedding",
                      embedding=points, embedding_label=points_label, polygon=poly)


def select_from_run(
    run_dir: PathLike,
    out: PathLike,
    *,
    epoch: int | None = None,
    particles: PathLike | None = None,
    datadir: PathLike | None = None,
    train_ind: PathLike | str | None = None,
    absolute_paths: bool = False,
    **criteria: Any,
) -> Selection:
    """Choose particles of a run (see :func:`choose_particles`) and write them (:func:`write_selection`).

    Parameters
    ----------
    run_dir
        The training run folder (its ``z.E.npy`` and config.yaml are read).
    out
        ``-o`` name: ``.star``/``.cs`` subset or ``.pkl``/``.txt``/``.npy`` indices; both are written.
    epoch
        Latents of this epoch (default the latest).
    particles
        The ORIGINAL particle file to subset (default: the file the run was trained on).  Its rows
        must be those the run's ``--ind``/``--first`` refer to.
    datadir
        Folder of the stacks (only needed for stack lists and bare stacks).
    train_ind
        Override of the run's recorded ``--ind`` (``"none"``: the particle file holds exactly the
        trained particles).
    absolute_paths
        Write the .star subset's ``rlnImageName`` with absolute stack paths (for use outside the
        RELION project folder the input's relative names refer to).
    criteria
        Keyword arguments of :func:`choose_particles`.
    """
    latents = read_run_latents(run_dir, epoch=epoch)
    table = load_run_particles(run_dir, particles=particles, datadir=datadir)
    all_rows = run_particle_rows(run_dir, len(latents.z), n_source=len(table), train_ind=train_ind,
                                 source_name=str(table.source_path))
    selection = choose_particles(latents.z, **criteria)
    selection.rows = all_rows[selection.positions]
    selection.paths = write_selection(out, table, selection.rows, absolute_paths=absolute_paths)
    log.info("selected %d of %d particles (%s) from %s (epoch %d); wrote %s and %s", len(selection.rows),
             len(latents.z), selection.description, run_dir, latents.epoch, selection.paths["subset"],
             selection.paths["indices"])
    return selection
