"""Landscape analysis of a trained heterogeneous model in volume space (thesis chapter 6).

The latent space of a VAE has an arbitrary layout and its distances mean little (the decoder is
nonlinear), so the ensemble is summarised in the space of the maps themselves:

1. **Sketch** (6.2.3).  k-means with ``k`` clusters (default 500) on the latents; for each cluster
   the *on-data* latent nearest its centre is decoded, giving ``k`` maps that cover rare states
   far better than ``k`` random particles would.  Every particle belongs to the sketch map of its
   k-means cluster.
2. **Mask** (6.2.4).  A voxel is kept when it is above ``threshold`` (default one half) of the
   maximum of at least one sketch map: the union of the molecule's envelopes, so every position a
   moving part reaches is kept and the background noise is not.  Or a user mask (an MRC file;
   voxels above 0.5 are kept), e.g. around the part that moves.
3. **PCA** (6.2.5) of the masked maps.  The eigenvolumes are the principal directions; the
   maps along PC ``i`` are ``mean + s * eigenvolume_i`` at the 5th ... 95th percentiles ``s`` of
   the sketch's scores (``mean`` is the mean of the whole sketch maps, so the maps look
   complete; the eigenvolumes are zero outside the mask).  Computed from the ``k x k`` Gram
   matrix, so memory is one copy of the masked maps.
4. **Agglomerative clustering** (6.2.6) of the masked maps (linkage and metric selectable;
   Ward needs Euclidean distances), with each cluster's mean map and the particles of its sketch
   maps.  Clusters are numbered by decreasing particle count.
5. **Latent -> volume-PC MLP** (6.2.5, 6.4.2).  Decoding every particle is too slow, so a small
   MLP ``phi`` is trained on pairs ``(z, PCA scores of the map of z)``: the sketch maps plus
   ``mlp_samples`` more particles whose maps are decoded, projected and dropped (never stored).
   The inputs are standardised, each output PC is scaled to unit variance (so minor PCs count as
   much as PC1), 3 hidden ReLU layers of 128, Adam (lr 1e-3), batches of 64, 50 epochs on a 3:1
   train/validation split, keeping the weights of the best validation loss (the thesis's recipe).
   ``phi(z)`` of every particle is the conformational landscape.

Memory and box size
-------------------
At ``D = 128`` the 500 sketch maps are 4 GB, so maps are decoded at a smaller box (default 64:
the decoder samples the same field of view with ``D / 64`` larger pixels, i.e. a low-pass
to ``64 / (2 D)`` cycles per original pixel) and kept in a memory-mapped file in the output
folder during the run (0.5 GB at 64), deleted at the end.  Only the masked voxels are held in
memory for PCA and clustering.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.errors import InputError

__all__ = [
    "LandscapeOptions",
    "LandscapeResult",
    "Sketch",
    "VolumePca",
    "LatentToPcMlp",
    "sketch_latents",
    "union_threshold_mask",
    "read_mask",
    "volume_pca",
    "pc_traversal_values",
    "cluster_volumes",
    "train_latent_to_pc_mlp",
    "load_latent_to_pc_mlp",
    "compute_landscape",
    "landscape_from_run",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
LINKAGES = ("ward", "average", "complete", "single")
METRICS = ("euclidean", "l1", "l2", "manhattan", "cosine")


@dataclass
class LandscapeOptions:
    """Options of :func:`compute_landscape` (``cryoscape landscape --help`` has each)."""

    sketch_size: int = 500
    box_size: int | None = 64
    mask: str | None = None
    mask_threshold: float = 0.5
    n_pcs: int = 10
    n_clusters: int = 10
    linkage: str = "ward"
    metric: str = "euclidean"
    traversal_pcs: int = 3
    traversal_points: int = 10
    mlp_samples: int = 1000
    mlp_epochs: int = 50
    mlp_batch_size: int = 64
    mlp_lr: float = 1e-3
    mlp_hidden: int = 128
    mlp_layers: int = 3
    write_sketch_maps: bool = False
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`InputError` for impossible values."""
        if self.sketch_size < 2:
            raise InputError(f"--sketch-size {self.sketch_size} is too small; pass at least 2 maps.")
        if self.box_size is not None and self.box_size < 4:
            raise InputError(f"--box-size {self.box_size} is too small; pass at least 4 pixels.")
        if not 0 < self.mask_threshold < 1:
            raise InputError(f"--mask-threshold {self.mask_threshold} is not between 0 and 1; pass a fraction "
                             "of each map's maximum.")
        if self.n_pcs < 1 or self.n_clusters < 1:
            raise InputError("--pcs and --n-clusters must be at least 1.")
        if self.linkage not in LINKAGES:
            raise InputError(f"--linkage {self.linkage} is unknown; pass one of {', '.join(LINKAGES)}.")
        if self.metric not in METRICS:
            raise InputError(f"--metric {self.metric} is unknown; pass one of {', '.join(METRICS)}.")
        if self.linkage == "ward" and self.metric not in ("euclidean", "l2"):
            raise InputError(f"Ward linkage needs the euclidean metric, not {self.metric}; pass --metric euclidean "
                             "or another --linkage (average, complete, single).")
        if self.mlp_samples < 0 or self.mlp_epochs < 1:
            raise InputError("--mlp-samples must be >= 0 and --mlp-epochs >= 1.")


# --------------------------------------------------------------------------------------------
# 1. sketch
# --------------------------------------------------------------------------------------------
@dataclass
class Sketch:
    """k-means sketch of the latents.

    Attributes
    ----------
    indices
        ``(k,)`` position of the on-data latent nearest each k-means centre.
    labels
        ``(N,)`` k-means cluster (= sketch map) of every particle.
    centres
        ``(k, zdim)`` k-means centres.
    """

    indices: np.ndarray
    labels: np.ndarray
    centres: np.ndarray


def sketch_latents(z: np.ndarray, k: int, *, seed: int = 0) -> Sketch:
    """k-means sketch (thesis 6.2.3): ``k`` on-data latents covering the latent distribution.

    ``k`` larger than the number of particles is reduced to it.  scikit-learn k-means with
    k-means++ seeding (one start, seeded).
    """
    from sklearn.cluster import KMeans

    z = np.asarray(z, dtype=np.float64)
    k = int(min(k, len(z)))
    model = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(z)
    labels = model.labels_.astype(np.int64)
    centres = model.cluster_centers_
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    indices = np.empty(k, dtype=np.int64)
    for c in range(k):
        members = order[bounds[c]: bounds[c + 1]]
        if len(members) == 0:  # cannot happen after Lloyd's assignment, but be safe
            members = np.arange(len(z))
        d = np.sum((z[members] - centres[c]) ** 2, axis=1)
        indices[c] = members[int(np.argmin(d))]
    return Sketch(indices=indices, labels=labels, centres=centres)


# --------------------------------------------------------------------------------------------
# 2. mask
# --------------------------------------------------------------------------------------------
def union_threshold_mask(volumes, *, threshold: float = 0.5) -> np.ndarray:
    """Boolean mask: voxels above ``threshold`` times its maximum in at least one of ``volumes``."""
    mask = None
    for v in volumes:
        v = np.asarray(v)
        inside = v >= threshold * float(v.max())
        mask = inside if mask is None else (mask | inside)
    if mask is None:
        raise ValueError("no volumes")
    return mask


def read_mask(path: PathLike, box_size: int) -> np.ndarray:
    """Boolean mask (voxels above 0.5) from an MRC file, resampled to ``box_size`` if needed.

    The mask must cover the same field of view as the maps (the training box); a different box
    is sampled by linear interpolation at the landscape voxels' positions (the origins, voxel
    ``D//2`` and ``n//2``, coincide) before thresholding.
    """
    from scipy import ndimage

    from cryoscape.io.mrc import read_mrc

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass an MRC mask covering the training box.")
    data, _ = read_mrc(path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(f"{path} holds an array of shape {data.shape}, not a cubic volume; pass a 3-D mask.")
    D = data.shape[0]
    if D != box_size:
        # sample the mask where the landscape box's voxels sit: same field of view, origins at D//2 and n//2
        idx = (np.arange(box_size) - box_size // 2) * (D / box_size) + D // 2
        coords = np.stack(np.meshgrid(idx, idx, idx, indexing="ij"))
        data = ndimage.map_coordinates(data.astype(np.float64), coords, order=1, mode="nearest")
    mask = data > 0.5
    if not mask.any():
        raise InputError(f"{path} has no voxel above 0.5; pass a mask whose inside is 1.")
    return mask


# --------------------------------------------------------------------------------------------
# 3. PCA
# --------------------------------------------------------------------------------------------
@dataclass
class VolumePca:
    """PCA of masked maps.

    Attributes
    ----------
    mean
        ``(m,)`` mean of the masked maps.
    components
        ``(L, m)`` orthonormal principal directions (eigenvolumes inside the mask).
    scores
        ``(k, L)`` coordinates of the maps.
    explained_variance
        ``(L,)`` variance along each component.
    explained_variance_ratio
        ``(L,)`` fraction of the total variance.
    """

    mean: np.ndarray
    components: np.ndarray
    scores: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Scores ``(..., L)`` of masked maps ``(..., m)``."""
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


def volume_pca(x: np.ndarray, n_components: int, *, block_columns: int | None = None) -> VolumePca:
    """PCA of ``k`` masked maps ``x`` ``(k, m)``, via the ``k x k`` Gram matrix.

    At most ``k - 1`` components (and only those with positive variance) are returned.  Signs
    are fixed so that each component's largest loading is positive.  The columns are processed
    in float64 blocks of ``block_columns`` (default: 16M values per block).
    """
    x = np.asarray(x)
    k, m = x.shape
    mean = x.mean(axis=0, dtype=np.float64)
    # column blocks in float64: no centred or float64 copy of the whole (k, m) array is made
    step = int(block_columns) if block_columns else max(1, (1 << 24) // max(k, 1))
    blocks = [slice(j, min(j + step, m)) for j in range(0, m, step)]
    gram = np.zeros((k, k))
    for b in blocks:
        c = x[:, b].astype(np.float64) - mean[b]
        gram += c @ c.T
    eigval, eigvec = np.linalg.eigh(gram)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0, None), eigvec[:, order]
    total = float(eigval.sum())
    tol = max(total, 1e-300) * 1e-10
    n = int(min(n_components, k - 1, int((eigval > tol).sum())))
    if n < 1:
        raise InputError("the sketch maps are all identical inside the mask, so they have no principal "
                         "components; check the run (or the mask) and the --sketch-size.")
    sv = np.sqrt(eigval[:n])
    components = np.empty((n, m))  # orthonormal rows: Xc^T U / s
    for b in blocks:
        c = x[:, b].astype(np.float64) - mean[b]
        components[:, b] = (c.T @ eigvec[:, :n] / sv).T
    sign = np.sign(components[np.arange(n), np.abs(components).argmax(axis=1)])
    sign[sign == 0] = 1.0
    components *= sign[:, None]
    scores = eigvec[:, :n] * sv * sign
    return VolumePca(mean=mean, components=components, scores=scores,
                     explained_variance=eigval[:n] / max(k - 1, 1),
                     explained_variance_ratio=eigval[:n] / total if total > 0 else np.zeros(n))


def pc_traversal_values(scores: np.ndarray, n_points: int, *, low: float = 5.0, high: float = 95.0) -> np.ndarray:
    """``n_points`` evenly spaced values from the ``low``-th to the ``high``-th percentile of ``scores``."""
    lo, hi = np.percentile(np.asarray(scores, dtype=np.float64), [low, high])
    return np.linspace(lo, hi, int(n_points))


# --------------------------------------------------------------------------------------------
# 4. clustering
# --------------------------------------------------------------------------------------------
def cluster_volumes(x: np.ndarray, n_clusters: int, *, linkage: str = "ward", metric: str = "euclidean",
                    weights: np.ndarray | None = None) -> np.ndarray:
    """Agglomerative clustering of maps ``(k, m)``; labels ``(k,)`` numbered by decreasing size.

    ``weights`` (e.g. the particle count of each sketch map) decide the order of the numbers:
    cluster 0 holds the most weight.  Without weights each map counts once.
    """
    from sklearn.cluster import AgglomerativeClustering

    x = np.asarray(x)
    n_clusters = int(min(n_clusters, len(x)))
    if n_clusters == 1:
        return np.zeros(len(x), dtype=np.int64)
    metric = "euclidean" if metric == "l2" else metric
    raw = AgglomerativeClustering(n_clusters=n_clusters, linkage=linkage, metric=metric).fit_predict(x)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    totals = np.bincount(raw, weights=w, minlength=n_clusters)
    first = np.array([np.flatnonzero(raw == c)[0] for c in range(n_clusters)])
    order = np.lexsort((first, -totals))  # by weight, ties by first appearance
    relabel = np.empty(n_clusters, dtype=np.int64)
    relabel[order] = np.arange(n_clusters)
    return relabel[raw]


# --------------------------------------------------------------------------------------------
# 5. latent -> volume PC MLP
# --------------------------------------------------------------------------------------------
class LatentToPcMlp(torch.nn.Module):
    """``phi``: latent ``(..., zdim)`` -> volume PCA scores ``(..., n_pcs)``.

    Inputs are standardised and outputs rescaled with buffers saved in the state dict, so a
    loaded model needs no other file.
    """

    def __init__(self, zdim: int, n_pcs: int, *, hidden: int = 128, layers: int = 3):
        super().__init__()
        self.config = {"zdim": int(zdim), "n_pcs": int(n_pcs), "hidden": int(hidden), "layers": int(layers)}
        blocks: list[torch.nn.Module] = []
        width = zdim
        for _ in range(layers):
            blocks += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
            width = hidden
        blocks.append(torch.nn.Linear(width, n_pcs))
        self.net = torch.nn.Sequential(*blocks)
        self.register_buffer("z_mean", torch.zeros(zdim))
        self.register_buffer("z_scale", torch.ones(zdim))
        self.register_buffer("v_scale", torch.ones(n_pcs))

    def forward_scaled(self, z: torch.Tensor) -> torch.Tensor:
        """Outputs in units of each PC's training standard deviation."""
        return self.net((z - self.z_mean) / self.z_scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_scaled(z) * self.v_scale

    @torch.no_grad()
    def predict(self, z: np.ndarray, *, batch_size: int = 65536) -> np.ndarray:
        """``phi(z)`` for a numpy array, in batches; float32 ``(N, n_pcs)``."""
        self.eval()
        device = self.z_mean.device
        out = [self(torch.as_tensor(np.asarray(z[i: i + batch_size], dtype=np.float32), device=device)).cpu()
               for i in range(0, len(z), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.config["n_pcs"]), np.float32)


@dataclass
class MlpFit:
    """A trained :class:`LatentToPcMlp` and how well it predicts held-out maps."""

    model: LatentToPcMlp
    train_loss: list[float]
    val_loss: list[float]
    best_epoch: int
    val_true: np.ndarray
    val_pred: np.ndarray
    val_r2: np.ndarray


def train_latent_to_pc_mlp(
    z: np.ndarray,
    v: np.ndarray,
    *,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 1e-3,
    hidden: int = 128,
    layers: int = 3,
    val_fraction: float = 0.25,
    seed: int = 0,
) -> MlpFit:
    """Fit ``phi: z -> v`` on ``(z_i, v_i)`` pairs (thesis 6.4.2), keeping the best validation weights.

    Parameters
    ----------
    z, v
        ``(P, zdim)`` latents and ``(P, L)`` volume PCA scores of their maps.
    val_fraction
        Share of pairs held out (the thesis's 3:1 split); at least one pair each side.

    Returns
    -------
    MlpFit
        With ``val_r2`` the coefficient of determination of each PC on the held-out pairs.
    """
    z = np.asarray(z, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    P = len(z)
    if P < 4:
        raise InputError(f"only {P} latent/map pairs to train the landscape MLP; pass a larger --sketch-size "
                         "or --mlp-samples.")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(P)
    n_val = int(min(max(1, round(val_fraction * P)), P - 1))
    val, tr = perm[:n_val], perm[n_val:]
    threads = torch.get_num_threads()
    # a net this small runs fastest on one thread (4-15x faster than two on a busy machine)
    torch.set_num_threads(1)
    try:
        model, train_loss, val_loss, best = _fit_mlp(z, v, tr, val, epochs=epochs, batch_size=batch_size, lr=lr,
                                                     hidden=hidden, layers=layers, seed=seed)
    finally:
        torch.set_num_threads(threads)
    pred = model.predict(z[val])
    truth = v[val]
    ss_res = ((pred - truth) ** 2).sum(0)
    ss_tot = ((truth - truth.mean(0)) ** 2).sum(0)
    r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1), np.nan)
    return MlpFit(model=model, train_loss=train_loss, val_loss=val_loss, best_epoch=best[1], val_true=truth,
                  val_pred=pred, val_r2=r2)


def _fit_mlp(z: np.ndarray, v: np.ndarray, tr: np.ndarray, val: np.ndarray, *, epochs: int, batch_size: int,
             lr: float, hidden: int, layers: int, seed: int):
    """The training loop of :func:`train_latent_to_pc_mlp`; returns (model, losses, best)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LatentToPcMlp(z.shape[1], v.shape[1], hidden=hidden, layers=layers)
    zt, vt = torch.from_numpy(z), torch.from_numpy(v)
    z_scale = zt[tr].std(0) if len(tr) > 1 else torch.ones(z.shape[1])
    v_scale = vt[tr].std(0) if len(tr) > 1 else torch.ones(v.shape[1])
    model.z_mean.copy_(zt[tr].mean(0))
    model.z_scale.copy_(torch.where(z_scale > 0, z_scale, torch.ones_like(z_scale)))
    model.v_scale.copy_(torch.where(v_scale > 0, v_scale, torch.ones_like(v_scale)))
    target = vt / model.v_scale
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    train_loss: list[float] = []
    val_loss: list[float] = []
    best: tuple[float, int, dict | None] = (math.inf, -1, None)
    tr_t, val_t = torch.from_numpy(tr), torch.from_numpy(val)
    for epoch in range(int(epochs)):
        model.train()
        order = tr_t[torch.randperm(len(tr_t), generator=gen)]
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            loss = torch.mean((model.forward_scaled(zt[idx]) - target[idx]) ** 2)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            vl = float(torch.mean((model.forward_scaled(zt[val_t]) - target[val_t]) ** 2))
        train_loss.append(total / len(order))
        val_loss.append(vl)
        if vl < best[0]:
            best = (vl, epoch, {k: t.clone() for k, t in model.state_dict().items()})
    model.load_state_dict(best[2])
    model.eval()
    return model, train_loss, val_loss, best


def load_latent_to_pc_mlp(path: PathLike) -> LatentToPcMlp:
    """The MLP saved by :func:`compute_landscape` (``mlp.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass the mlp.pt of a landscape folder.")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = LatentToPcMlp(**saved["config"])
    model.load_state_dict(saved["state"])
    return model.eval()


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------
@dataclass
class LandscapeResult:
    """Everything :func:`compute_landscape` computed and where it wrote it (see its docstring)."""

    out_dir: Path
    options: LandscapeOptions
    box_size: int
    pixel_size_angstrom: float
    sketch: Sketch
    mask: np.ndarray
    pca: VolumePca
    traversal_values: dict[int, np.ndarray]
    volume_clusters: np.ndarray
    particle_clusters: np.ndarray
    cluster_volume_counts: np.ndarray
    cluster_particle_counts: np.ndarray
    landscape_pcs: np.ndarray
    mlp: MlpFit
    n_particles: int
    n_mlp_extra: int = 0
    paths: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    run_dir: Path | None = None


def _write_pickle(path: Path, obj: Any) -> None:
    from cryoscape.io.writers import atomic_write

    with atomic_write(path) as f:
        pickle.dump(obj, f, protocol=4)


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="map", disable=not enabled, leave=False)


def compute_landscape(
    generate_volume: Callable[[np.ndarray], np.ndarray],
    z: np.ndarray,
    out_dir: PathLike,
    *,
    options: LandscapeOptions | None = None,
    pixel_size_angstrom: float = 1.0,
    progress: bool = False,
) -> LandscapeResult:
    """Run the landscape analysis on latents ``z`` with maps from ``generate_volume``.

    Parameters
    ----------
    generate_volume
        ``z_i (zdim,) -> (n, n, n)`` real map (e.g. a decoder at the landscape box).
    z
        ``(N, zdim)`` latents of all particles.
    out_dir
        Output folder.  Written: ``sketch_indices.txt`` (positions of the sketch latents),
        ``sketch_z.txt``, ``kmeans_labels.pkl`` (sketch map of each particle), ``mask.mrc``,
        ``mean.mrc``, ``pca/eigenvol_NN.mrc``, ``pca/explained_variance.txt``,
        ``pca/sketch_pcs.txt``, ``pca/pcN/vol_XXX.mrc`` with ``pca/pcN/pc_values.txt``,
        ``clusters/cluster_NN.mrc`` (mean map), ``clusters/cluster_NN.ind.pkl`` (positions of
        its particles in the run's particle order), ``clusters/sketch_clusters.txt``,
        ``cluster_labels.pkl`` (cluster of every particle; for ``cryoscape select --labels``),
        ``mlp.pt``, ``landscape_pcs.npy`` (``phi(z)`` of every particle), ``mlp_validation.txt``,
        ``summary.yaml``; with ``write_sketch_maps`` also ``sketch/vol_XXX.mrc``.
    options
        :class:`LandscapeOptions`.
    pixel_size_angstrom
        Pixel size of the generated maps (written in the MRC headers).
    progress
        Show progress bars.
    """
    opts = options or LandscapeOptions()
    opts.validate()
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or len(z) < 2:
        raise InputError(f"the landscape needs latents of at least 2 particles, got shape {z.shape}.")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    pixel = float(pixel_size_angstrom)
    sketch = _write_sketch(z, opts, out)
    maps = _SketchMaps(out / ".sketch_volumes.tmp.npy")
    try:
        _decode_sketch_maps(maps, generate_volume, z, sketch, opts, out, pixel, progress)
        pca, traversal = _write_pca(maps, opts, out, pixel)
        clusters = _write_clusters(maps, sketch, opts, out, pixel)
    finally:
        maps.close()
    fit, landscape, n_extra = _fit_landscape_mlp(generate_volume, z, sketch, pca, maps.flat_mask, opts, out,
                                                 progress)
    _write_summary(out, opts, n_particles=len(z), sketch=sketch, maps=maps, pixel=pixel, pca=pca,
                   clusters=clusters, fit=fit, n_extra=n_extra)
    return LandscapeResult(
        out_dir=out, options=opts, box_size=maps.box_size, pixel_size_angstrom=pixel, sketch=sketch,
        mask=maps.mask, pca=pca, traversal_values=traversal, volume_clusters=clusters.volume_clusters,
        particle_clusters=clusters.particle_clusters, cluster_volume_counts=clusters.volume_counts,
        cluster_particle_counts=clusters.particle_counts, landscape_pcs=landscape, mlp=fit, n_particles=len(z),
        n_mlp_extra=n_extra,
        paths={"cluster_maps": sorted((out / "clusters").glob("cluster_*.mrc")),
               "eigenvolumes": sorted((out / "pca").glob("eigenvol_*.mrc")),
               "traversals": {i: sorted((out / "pca" / f"pc{i + 1}").glob("vol_*.mrc")) for i in traversal}},
    )


class _SketchMaps:
    """The sketch's maps while the analysis runs: a memory-mapped ``(k, n, n, n)`` stack on disk, the
    mask, the masked maps ``x`` ``(k, m)`` and the mean map (flattened)."""

    def __init__(self, path: Path):
        self.path = path
        self.stack: np.ndarray | None = None
        self.box_size = 0
        self.mask = np.zeros(0, dtype=bool)
        self.flat_mask = np.zeros(0, dtype=bool)
        self.x = np.zeros((0, 0), dtype=np.float32)
        self.mean_full = np.zeros(0)

    def close(self) -> None:
        self.stack = None
        self.path.unlink(missing_ok=True)


@dataclass
class _Clusters:
    volume_clusters: np.ndarray
    particle_clusters: np.ndarray
    volume_counts: np.ndarray
    particle_counts: np.ndarray


def _write_sketch(z: np.ndarray, opts: LandscapeOptions, out: Path) -> Sketch:
    """Step 1: k-means sketch of the latents; its indices, latents and particle labels written."""
    sketch = sketch_latents(z, opts.sketch_size, seed=opts.seed)
    k = len(sketch.indices)
    if k < opts.sketch_size:
        log.info("sketch size reduced to %d, the number of particles", k)
    log.info("sketch: %d maps from k-means of %d latents", k, len(z))
    np.savetxt(out / "sketch_indices.txt", sketch.indices, fmt="%d")
    np.savetxt(out / "sketch_z.txt", z[sketch.indices], fmt="%.6g")
    _write_pickle(out / "kmeans_labels.pkl", sketch.labels)
    return sketch


def _decode_sketch_maps(maps: _SketchMaps, generate_volume, z: np.ndarray, sketch: Sketch, opts: LandscapeOptions,
                        out: Path, pixel: float, progress: bool) -> None:
    """Step 2: decode the sketch's maps into ``maps.stack``; the mask (given, or the union of thresholded
    maps), the masked maps and the mean map; ``mask.mrc`` and ``mean.mrc`` written."""
    from cryoscape.io.mrc import write_mrc

    k = len(sketch.indices)
    first = np.asarray(generate_volume(z[sketch.indices[0]]), dtype=np.float32)
    if first.ndim != 3 or len(set(first.shape)) != 1:
        raise ValueError(f"generate_volume must return cubic maps, got shape {first.shape}")
    n = maps.box_size = first.shape[0]
    maps.stack = stack = np.lib.format.open_memmap(maps.path, mode="w+", dtype=np.float32, shape=(k, n, n, n))
    if opts.write_sketch_maps:
        (out / "sketch").mkdir(exist_ok=True)
    user_mask = read_mask(opts.mask, n) if opts.mask else None
    union = None
    for i in _progress(range(k), total=k, desc="sketch maps", enabled=progress):
        vol = first if i == 0 else np.asarray(generate_volume(z[sketch.indices[i]]), dtype=np.float32)
        stack[i] = vol
        if user_mask is None:
            inside = vol >= opts.mask_threshold * float(vol.max())
            union = inside if union is None else (union | inside)
        if opts.write_sketch_maps:
            write_mrc(out / "sketch" / f"vol_{i:03d}.mrc", vol, pixel_size_angstrom=pixel)
    maps.mask = user_mask if user_mask is not None else union
    if not maps.mask.any():
        raise InputError("the threshold mask of the sketch maps is empty; pass --mask FILE.")
    write_mrc(out / "mask.mrc", maps.mask.astype(np.float32), pixel_size_angstrom=pixel)
    maps.flat_mask = flat_mask = maps.mask.reshape(-1)
    m = int(flat_mask.sum())
    log.info("mask: %d of %d voxels (%s)", m, flat_mask.size, "from " + str(opts.mask) if opts.mask
             else f"union of voxels above {opts.mask_threshold:g} x each map's maximum")
    maps.x = np.empty((k, m), dtype=np.float32)
    maps.mean_full = np.zeros(n**3, dtype=np.float64)
    for i in range(k):
        row = np.asarray(stack[i]).reshape(-1)
        maps.x[i] = row[flat_mask]
        maps.mean_full += row
    maps.mean_full /= k
    write_mrc(out / "mean.mrc", maps.mean_full.reshape(n, n, n).astype(np.float32), pixel_size_angstrom=pixel)


def _write_pca(maps: _SketchMaps, opts: LandscapeOptions, out: Path, pixel: float
               ) -> tuple[VolumePca, dict[int, np.ndarray]]:
    """Step 3: PCA of the masked sketch maps; eigenvolumes, variances, scores and PC traversals written."""
    from cryoscape.io.mrc import write_mrc

    n = maps.box_size
    pca = volume_pca(maps.x, opts.n_pcs)
    L = len(pca.explained_variance)
    if L < min(opts.n_pcs, len(maps.x) - 1):
        log.warning("only %d principal component(s) (of %d asked) have variance inside the mask of %d voxels; "
                    "lower --mask-threshold or pass --mask for a larger mask", L, opts.n_pcs, maps.x.shape[1])
    (out / "pca").mkdir(exist_ok=True)
    np.savetxt(out / "pca" / "explained_variance.txt",
               np.stack([np.arange(1, L + 1), pca.explained_variance, pca.explained_variance_ratio], 1),
               fmt=["%d", "%.6g", "%.6g"], header="pc variance fraction_of_total")
    np.savetxt(out / "pca" / "sketch_pcs.txt", pca.scores, fmt="%.6g")
    eigen_full = np.zeros((L, n**3), dtype=np.float32)
    eigen_full[:, maps.flat_mask] = pca.components
    for i in range(L):
        write_mrc(out / "pca" / f"eigenvol_{i + 1:02d}.mrc", eigen_full[i].reshape(n, n, n),
                  pixel_size_angstrom=pixel)
    traversal: dict[int, np.ndarray] = {}
    for i in range(min(opts.traversal_pcs, L)):
        values = pc_traversal_values(pca.scores[:, i], opts.traversal_points)
        traversal[i] = values
        folder = out / "pca" / f"pc{i + 1}"
        folder.mkdir(exist_ok=True)
        np.savetxt(folder / "pc_values.txt", values, fmt="%.6g")
        for j, s in enumerate(values):
            vol = (maps.mean_full + s * eigen_full[i]).reshape(n, n, n).astype(np.float32)
            write_mrc(folder / f"vol_{j:03d}.mrc", vol, pixel_size_angstrom=pixel)
    return pca, traversal


def _write_clusters(maps: _SketchMaps, sketch: Sketch, opts: LandscapeOptions, out: Path, pixel: float
                    ) -> _Clusters:
    """Step 4: agglomerative clustering of the sketch maps; each cluster's mean map and particles written."""
    from cryoscape.io.mrc import write_mrc

    n = maps.box_size
    counts = np.bincount(sketch.labels, minlength=len(sketch.indices))
    volume_clusters = cluster_volumes(maps.x, opts.n_clusters, linkage=opts.linkage, metric=opts.metric,
                                      weights=counts)
    M = int(volume_clusters.max()) + 1
    particle_clusters = volume_clusters[sketch.labels]
    (out / "clusters").mkdir(exist_ok=True)
    np.savetxt(out / "clusters" / "sketch_clusters.txt", volume_clusters, fmt="%d")
    _write_pickle(out / "cluster_labels.pkl", particle_clusters)
    width = max(2, len(str(M - 1)))
    for c in range(M):
        members = np.flatnonzero(volume_clusters == c)
        acc = np.zeros((n, n, n), dtype=np.float64)
        for i in members:
            acc += maps.stack[i]
        write_mrc(out / "clusters" / f"cluster_{c:0{width}d}.mrc", (acc / len(members)).astype(np.float32),
                  pixel_size_angstrom=pixel)
        _write_pickle(out / "clusters" / f"cluster_{c:0{width}d}.ind.pkl",
                      np.flatnonzero(particle_clusters == c).astype(np.int64))
    return _Clusters(volume_clusters, particle_clusters, np.bincount(volume_clusters, minlength=M),
                     np.bincount(particle_clusters, minlength=M))


def _fit_landscape_mlp(generate_volume, z: np.ndarray, sketch: Sketch, pca: VolumePca, flat_mask: np.ndarray,
                       opts: LandscapeOptions, out: Path, progress: bool) -> tuple[MlpFit, np.ndarray, int]:
    """Step 5: the MLP z -> volume PCs, trained on the sketch pairs plus more decoded particles; its
    weights, every particle's ``phi(z)`` and the held-out validation written."""
    from cryoscape.io.writers import atomic_write

    N, L, k = len(z), len(pca.explained_variance), len(sketch.indices)
    rng = np.random.default_rng(opts.seed + 1)
    others = np.setdiff1d(np.arange(N), sketch.indices)
    extra = rng.choice(others, size=min(opts.mlp_samples, len(others)), replace=False) if len(others) else others
    extra_scores = np.empty((len(extra), L), dtype=np.float64)
    for j, p in enumerate(_progress(extra, total=len(extra), desc="MLP training maps", enabled=progress)):
        vol = np.asarray(generate_volume(z[p]), dtype=np.float32).reshape(-1)
        extra_scores[j] = pca.transform(vol[flat_mask])
    pair_z = np.concatenate([z[sketch.indices], z[extra]])
    pair_v = np.concatenate([pca.scores, extra_scores])
    fit = train_latent_to_pc_mlp(pair_z, pair_v, epochs=opts.mlp_epochs, batch_size=opts.mlp_batch_size,
                                 lr=opts.mlp_lr, hidden=opts.mlp_hidden, layers=opts.mlp_layers, seed=opts.seed)
    with atomic_write(out / "mlp.pt") as f:
        torch.save({"config": fit.model.config, "state": fit.model.state_dict()}, f)
    landscape = fit.model.predict(z)
    with atomic_write(out / "landscape_pcs.npy") as f:
        np.save(f, landscape.astype(np.float32))
    np.savetxt(out / "mlp_validation.txt", np.concatenate([fit.val_true, fit.val_pred], axis=1), fmt="%.6g",
               header=" ".join([f"true_pc{i + 1}" for i in range(L)] + [f"pred_pc{i + 1}" for i in range(L)]))
    log.info("MLP latent -> volume PCs: %d pairs (%d sketch + %d more maps), best epoch %d, held-out R^2 of PC1 %.3f",
             len(pair_z), k, len(extra), fit.best_epoch + 1, float(fit.val_r2[0]))
    return fit, landscape, int(len(extra))


def _write_summary(out: Path, opts: LandscapeOptions, *, n_particles: int, sketch: Sketch, maps: _SketchMaps,
                   pixel: float, pca: VolumePca, clusters: _Clusters, fit: MlpFit, n_extra: int) -> None:
    """``summary.yaml``: the sizes, mask, PCA, clusters and MLP figures of the analysis."""
    import yaml

    from cryoscape.io.writers import atomic_write

    n, m = maps.box_size, int(maps.flat_mask.sum())
    k = len(sketch.indices)
    summary = {
        "n_particles": n_particles,
        "sketch_size": k,
        "box_size": n,
        "pixel_size_angstrom": pixel,
        "mask": {"source": opts.mask or f"union threshold {opts.mask_threshold:g}", "voxels": m,
                 "fraction": m / n**3},
        "pca": {"n_components": len(pca.explained_variance),
                "explained_variance_ratio": [float(r) for r in pca.explained_variance_ratio]},
        "clusters": {"n_clusters": len(clusters.volume_counts), "linkage": opts.linkage, "metric": opts.metric,
                     "volumes": clusters.volume_counts.tolist(), "particles": clusters.particle_counts.tolist()},
        "mlp": {"pairs": k + n_extra, "extra_maps": n_extra, "best_epoch": fit.best_epoch + 1,
                "validation_r2": [None if not np.isfinite(r) else float(r) for r in fit.val_r2]},
        "options": asdict(opts),
    }
    with atomic_write(out / "summary.yaml", "w") as f:
        yaml.safe_dump(summary, f, sort_keys=False)


def landscape_from_run(
    run_dir: PathLike,
    *,
    epoch: int | None = None,
    out_dir: PathLike | None = None,
    options: LandscapeOptions | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> LandscapeResult:
    """:func:`compute_landscape` for a ``cryoscape train`` run: its decoder and latents of one epoch.

    The maps are decoded at ``options.box_size`` (at most the training box; the field of view is
    kept, so the pixel size is ``training pixel * D / box``).  Default output ``RUN/landscape.EPOCH``.
    """
    from cryoscape.analysis.selection import read_run_latents
    from cryoscape.train.volumes import load_trained_model

    opts = options or LandscapeOptions()
    opts.validate()
    decoder, _, state = load_trained_model(run_dir, epoch=epoch, device=device)
    if decoder.zdim <= 0:
        raise InputError(f"{run_dir} is a homogeneous run (zdim 0), which has no landscape; pass a run trained "
                         "with --zdim N.")
    e = int(state["epoch"])
    z = read_run_latents(run_dir, epoch=e).z
    if z.shape[1] != decoder.zdim:
        raise InputError(f"the latents of epoch {e} have {z.shape[1]} dimensions but the decoder expects "
                         f"{decoder.zdim}; restore the run's z.{e}.npy.")
    D = int(state["data"]["box_size"])
    n = D if not opts.box_size else min(int(opts.box_size), D)
    pixel = state["data"].get("pixel_size_angstrom")
    pixel_out = (float(pixel) if pixel is not None and np.isfinite(pixel) else 1.0) * D / n
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / f"landscape.{e}"
    log.info("landscape of %s, epoch %d: %d particles, maps at box %d (training box %d, %.4g A/pixel)",
             run_dir, e, len(z), n, D, pixel_out)

    @torch.no_grad()
    def generate(zi: np.ndarray) -> np.ndarray:
        vol = decoder.eval_volume(torch.as_tensor(np.asarray(zi, dtype=np.float32), device=device), box_size=n)
        return vol.float().cpu().numpy()

    result = compute_landscape(generate, z, out, options=opts, pixel_size_angstrom=pixel_out, progress=progress)
    result.epoch = e
    result.run_dir = Path(run_dir)
    return result
