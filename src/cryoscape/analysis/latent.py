"""Latent-space analysis of a trained run: PCA, UMAP, k-means with "on-data" centres, PC traversals.

The methods follow the thesis (ch. 4.4.5, 4.4.6, 4.4.9, 4.4.11):

* **PCA** of the per-particle latent means (scikit-learn), for plots and for traversals along the
  principal axes: ``n`` equally spaced points between the 5th and 95th percentile of the
  particles' projections on a PC, mapped back to latent space (``mean + t * component``).
* **UMAP** (umap-learn, ``n_neighbors = 15``, ``min_dist = 0.1`` as in the thesis) of the latents
  into 2-D, for plots only.
* **k-means** (scikit-learn) into ``k`` regions; each region is represented by its *on-data*
  centre, the particle latent nearest (Euclidean) to the k-means centre, so that maps are only
  generated where particles are.

Scaling to large datasets (500k particles and more)
---------------------------------------------------
PCA and k-means see every particle (k-means switches to mini-batch k-means above
``minibatch_above`` = 100k particles).  UMAP's cost grows with the number of points and its
embedding serves only to look at, so :func:`compute_umap` fits at most ``fit_max`` (20k)
particles drawn at random; every other particle is placed at the inverse-distance weighted mean
of the embeddings of its ``n_interpolate`` (10) nearest fitted neighbours in latent space.  That
is much like the starting point of UMAP's own ``transform`` for new points (a mean of the
neighbours' embeddings weighted by their fuzzy memberships), without its refinement epochs: a
neighbourhood-preserving placement that costs seconds instead of many minutes.  The
fitted particles' indices are returned, so plots can show the fitted points alone.

The k-nearest-neighbour graph UMAP needs is computed exactly with scikit-learn (a k-d tree on
the low-dimensional latents) and handed to UMAP, which skips its approximate search (and the
just-in-time compilation of that search), and ``random_state`` is fixed, which makes the
embedding reproducible.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryoscape.errors import InputError

__all__ = [
    "available_latent_epochs",
    "load_latents",
    "PCAResult",
    "compute_pca",
    "KMeansResult",
    "kmeans_on_data",
    "nearest_particles",
    "pc_traversal",
    "UMAPResult",
    "compute_umap",
    "save_umap_of_run",
]

_Z_RE = re.compile(r"^z\.(\d+)\.npy$")


# --------------------------------------------------------------------------- reading
def available_latent_epochs(run_dir: str | os.PathLike) -> list[int]:
    """Epochs with a ``z.EPOCH.npy`` file in the run folder ``run_dir``, ascending."""
    out = []
    for p in Path(run_dir).glob("z.*.npy"):
        m = _Z_RE.match(p.name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def load_latents(run_dir: str | os.PathLike, epoch: int | None = None) -> tuple[np.ndarray, int]:
    """``(z, epoch)``: the latent means ``(N, zdim)`` float32 of ``run_dir/z.EPOCH.npy``.

    ``epoch`` is 0-based as in the run folder; ``None`` or a negative number picks the latest.

    Raises
    ------
    InputError
        No such folder or epoch, a homogeneous run (no latents), an unreadable file, or NaNs.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run} is not a folder; pass the output folder of cryoscape train.", path=run)
    epochs = available_latent_epochs(run)
    if not epochs:
        raise InputError(f"{run} holds no z.EPOCH.npy latents; pass the folder of a heterogeneous run "
                         "(cryoscape train --zdim 1 or more) that finished an epoch.", path=run)
    if epoch is None or epoch < 0:
        epoch = epochs[-1]
    if epoch not in epochs:
        listed = ", ".join(str(e) for e in epochs)
        raise InputError(f"{run} has no latents for epoch {epoch} (epochs with z.EPOCH.npy: {listed}); "
                         "pass one of those to --epoch.", path=run)
    path = run / f"z.{epoch}.npy"
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user error
        raise InputError(f"{path} could not be read ({type(err).__name__}); re-run the epoch or pass "
                         "another one with --epoch.", path=path) from None
    z = np.asarray(z, dtype=np.float32)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise InputError(f"{path} holds an array of shape {z.shape}, not (particles, zdim) latents; "
                         "pass a cryoscape train run folder.", path=path)
    if not np.isfinite(z).all():
        bad = int((~np.isfinite(z).all(axis=1)).sum())
        raise InputError(f"{path} holds {bad} particle(s) with NaN or infinite latents; the training "
                         "diverged at that epoch, so pass an earlier --epoch.", path=path)
    return z, int(epoch)


# --------------------------------------------------------------------------- PCA
@dataclass
class PCAResult:
    """Principal components of latents ``(N, zdim)``.

    Attributes
    ----------
    projections
        ``(N, zdim)`` coordinates of every particle on the PCs (PC1 first).
    explained_variance_ratio
        ``(zdim,)`` fraction of the latent variance along each PC.
    components
        ``(zdim, zdim)`` unit PC directions as rows.
    mean
        ``(zdim,)`` mean latent.
    """

    projections: np.ndarray
    explained_variance_ratio: np.ndarray
    components: np.ndarray
    mean: np.ndarray

    def to_latent(self, coordinates: np.ndarray) -> np.ndarray:
        """Latents ``(M, zdim)`` at PC coordinates ``(M, n <= zdim)`` (missing PCs are 0)."""
        c = np.atleast_2d(np.asarray(coordinates, dtype=np.float64))
        return (self.mean + c @ self.components[: c.shape[1]]).astype(np.float32)


def compute_pca(z: np.ndarray) -> PCAResult:
    """PCA of ``z (N, zdim)`` with all ``zdim`` components (scikit-learn, exact SVD).

    The sign of each component is fixed so that the particles' projections have a non-negative
    third moment (the longer tail on the positive side), which makes PC plots and traversals of
    repeated runs point the same way.
    """
    from sklearn.decomposition import PCA

    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise InputError(f"PCA needs at least 2 latents of shape (N, zdim), got {z.shape}.")
    n_comp = min(z.shape[1], z.shape[0])
    pca = PCA(n_components=n_comp, svd_solver="full").fit(z)
    components = pca.components_.copy()
    proj = (z - pca.mean_) @ components.T
    skew = (proj**3).mean(axis=0)
    sign = np.where(skew < 0, -1.0, 1.0)
    components *= sign[:, None]
    proj *= sign
    return PCAResult(projections=proj.astype(np.float32),
                     explained_variance_ratio=np.asarray(pca.explained_variance_ratio_, dtype=np.float64),
                     components=components, mean=pca.mean_.copy())


def pc_traversal(pca: PCAResult, pc: int, *, n_points: int = 10, low_percentile: float = 5.0,
                 high_percentile: float = 95.0) -> tuple[np.ndarray, np.ndarray]:
    """Latents along principal component ``pc`` (1-based), thesis 4.4.11.

    ``n_points`` equally spaced PC coordinates from the ``low_percentile`` to the
    ``high_percentile`` of the particles' projections on that PC, the other PCs at 0 (the mean).

    Returns
    -------
    ``(coordinates (n_points,), latents (n_points, zdim) float32)``.
    """
    n_pc = pca.components.shape[0]
    if not 1 <= pc <= n_pc:
        raise InputError(f"PC {pc} does not exist: the latent space has {n_pc} principal component(s); "
                         f"pass a PC from 1 to {n_pc}.")
    if n_points < 1:
        raise InputError(f"{n_points} points along a PC is not a positive number; pass 1 or more.")
    if not 0 <= low_percentile <= high_percentile <= 100:
        raise InputError(f"percentiles {low_percentile:g} and {high_percentile:g} are not a range within "
                         "0-100; pass LOW <= HIGH.")
    lo, hi = np.percentile(pca.projections[:, pc - 1], [low_percentile, high_percentile])
    t = np.linspace(lo, hi, n_points) if n_points > 1 else np.array([(lo + hi) / 2])
    coords = np.zeros((n_points, pc))
    coords[:, pc - 1] = t
    return t, pca.to_latent(coords)


# --------------------------------------------------------------------------- k-means
@dataclass
class KMeansResult:
    """k-means of latents with on-data centres.

    Attributes
    ----------
    labels
        ``(N,)`` int cluster of every particle, ``0 .. k-1``.
    centers
        ``(k, zdim)`` k-means centres (means of their clusters).
    center_indices
        ``(k,)`` index of the on-data centre of each cluster: the particle nearest to its centre.
    counts
        ``(k,)`` particles per cluster.
    """

    labels: np.ndarray
    centers: np.ndarray
    center_indices: np.ndarray
    counts: np.ndarray

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centers.shape[0])


def nearest_particles(z: np.ndarray, points: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
    """``(M,)`` index of the latent in ``z (N, zdim)`` nearest (Euclidean) to each of ``points (M, zdim)``."""
    z = np.asarray(z, dtype=np.float64)
    points = np.atleast_2d(np.asarray(points, dtype=np.float64))
    best = np.full(points.shape[0], np.inf)
    best_idx = np.zeros(points.shape[0], dtype=np.int64)
    p2 = (points**2).sum(1)
    for start in range(0, z.shape[0], chunk):
        block = z[start : start + chunk]
        d2 = (block**2).sum(1)[:, None] - 2 * block @ points.T + p2[None, :]
        i = d2.argmin(0)
        v = d2[i, np.arange(points.shape[0])]
        better = v < best
        best[better] = v[better]
        best_idx[better] = i[better] + start
    return best_idx


def kmeans_on_data(z: np.ndarray, k: int, *, seed: int = 0, n_init: int = 5,
                   minibatch_above: int = 100_000) -> KMeansResult:
    """k-means of ``z (N, zdim)`` into ``k`` clusters and their on-data centres (thesis 4.4.5).

    scikit-learn's ``KMeans`` (k-means++ seeding, ``n_init`` restarts); above ``minibatch_above``
    particles ``MiniBatchKMeans`` (batches of 4096, 3 restarts), which is a few seconds on 500k.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    z = np.asarray(z, dtype=np.float32)
    n = z.shape[0]
    if k < 1:
        raise InputError(f"k-means with k = {k} is impossible; pass --ksample 1 or more.")
    n_distinct = np.unique(z, axis=0).shape[0] if n <= 200_000 else n
    if k > n_distinct:
        raise InputError(f"k-means with k = {k} needs at least {k} distinct latents but the run has "
                         f"{n_distinct}; pass a smaller --ksample.")
    if n > minibatch_above:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=3)
    else:
        model = KMeans(n_clusters=k, random_state=seed, n_init=n_init)
    labels = model.fit_predict(z).astype(np.int64)
    centers = np.stack([z[labels == c].mean(0) if (labels == c).any() else model.cluster_centers_[c]
                        for c in range(k)]).astype(np.float32)
    idx = nearest_particles(z, centers)
    counts = np.bincount(labels, minlength=k)
    return KMeansResult(labels=labels, centers=centers, center_indices=idx, counts=counts)


# --------------------------------------------------------------------------- UMAP
@dataclass
class UMAPResult:
    """2-D UMAP embedding of latents.

    Attributes
    ----------
    embedding
        ``(N, 2)`` float32 coordinates of every particle.
    fit_indices
        Sorted indices of the particles UMAP was fitted on (all of them unless subsampled); the
        others were placed by interpolation (module docstring).
    """

    embedding: np.ndarray
    fit_indices: np.ndarray

    @property
    def subsampled(self) -> bool:
        """True when UMAP was fitted on a subset."""
        return self.fit_indices.shape[0] < self.embedding.shape[0]


def _knn(reference: np.ndarray, queries: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours ``(indices, distances)``; ``queries=None`` queries the reference."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k).fit(reference)
    dist, idx = nn.kneighbors(reference if queries is None else queries)
    return idx, dist


def compute_umap(z: np.ndarray, *, n_neighbors: int = 15, min_dist: float = 0.1, fit_max: int = 20_000,
                 n_interpolate: int = 10, seed: int = 0, n_epochs: int | None = None) -> UMAPResult:
    """2-D UMAP embedding of ``z (N, zdim)`` (umap-learn; large N: subsample, module docstring).

    Parameters
    ----------
    n_neighbors, min_dist
        UMAP's parameters (the thesis uses its defaults, 15 and 0.1).
    fit_max
        Fit on at most this many particles (drawn with ``seed``); the rest are interpolated.
    n_interpolate
        Neighbours used to place the particles left out of the fit.
    n_epochs
        UMAP's optimisation epochs (default: its own, 500 below 10k points, 200 above).
    """
    z = np.asarray(z, dtype=np.float32)
    n = z.shape[0]
    if n < 4:
        raise InputError(f"UMAP needs at least 4 particles, the run has {n}; pass --skip-umap.")
    rng = np.random.default_rng(seed)
    fit_idx = np.arange(n) if n <= fit_max else np.sort(rng.choice(n, size=int(fit_max), replace=False))
    zf = z[fit_idx]
    k = int(min(n_neighbors, zf.shape[0] - 1))
    with warnings.catch_warnings():
        # the precomputed neighbours carry no search index (only transform() would need it) and
        # a fixed random_state turns off UMAP's thread parallelism; both are intended here
        warnings.simplefilter("ignore")
        import umap

        knn_idx, knn_dist = _knn(zf, None, k)
        reducer = umap.UMAP(n_neighbors=k, min_dist=min_dist, n_components=2, random_state=seed,
                            precomputed_knn=(knn_idx, knn_dist), n_epochs=n_epochs)
        fitted = reducer.fit_transform(zf).astype(np.float32)
    embedding = np.empty((n, 2), dtype=np.float32)
    embedding[fit_idx] = fitted
    if fit_idx.shape[0] < n:
        rest = np.setdiff1d(np.arange(n), fit_idx, assume_unique=True)
        m = int(min(n_interpolate, fit_idx.shape[0]))
        idx, dist = _knn(zf, z[rest], m)
        w = 1.0 / np.maximum(dist, 1e-12)
        w /= w.sum(1, keepdims=True)
        embedding[rest] = np.einsum("nk,nkd->nd", w, fitted[idx]).astype(np.float32)
    return UMAPResult(embedding=embedding, fit_indices=fit_idx)


def save_umap_of_run(run_dir: str | os.PathLike, epoch: int | str, result_path: str | os.PathLike,
                     fit_max: int | str = 20_000, seed: int | str = 0) -> Path:
    """UMAP of ``run_dir/z.EPOCH.npy`` saved as ``result_path`` (.npz: ``embedding``, ``fit_indices``).

    The entry point of the background process of ``cryoscape analyze`` (arguments may be strings);
    the file appears atomically, complete or not at all.
    """
    z, _ = load_latents(run_dir, int(epoch))
    res = compute_umap(z, fit_max=int(fit_max), seed=int(seed))
    result_path = Path(result_path)
    tmp = result_path.with_name(result_path.name + ".tmp.npz")
    np.savez(tmp, embedding=res.embedding, fit_indices=res.fit_indices)
    os.replace(tmp, result_path)
    return result_path
