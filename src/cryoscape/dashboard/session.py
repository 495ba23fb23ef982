"""What the dashboard knows about one run: latents, embeddings, colourings, selections, maps, paths.

A :class:`DashboardSession` is the dashboard without the web: every route of
:mod:`cryoscape.dashboard.app` is one call here, and each call is the library function the
command-line tools use (``analyze``'s PCA, UMAP and k-means, ``select``'s polygon test and subset
writer, ``traverse``'s graph path and folder), so what the browser shows is what the commands make.

Maps for the viewer are decoded at ``view_box`` (default 64, or the training box if smaller) with the
field of view kept, as ``--box-size`` does: the browser draws an isosurface of a 64^3 grid in a
fraction of a second, and a 128^3 map would be 8x the data for detail a screen does not show.
Saved maps (trajectories) use the full box unless ``maps.box_size`` says otherwise.  Decoded maps are
kept in a least-recently-used cache keyed by their latent, so replaying a path or returning to a
point costs nothing.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryoscape.analysis.maps import MapOptions
from cryoscape.errors import InputError

__all__ = ["DashboardOptions", "DashboardSession", "Colouring"]

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class DashboardOptions:
    """How the dashboard reads a run and makes its maps.

    Attributes
    ----------
    epoch
        Latents and weights of this 0-based epoch (default: the latest with latents).
    z_path
        Latents from another file (.npy/.pkl/.txt, e.g. another tool's), one row per trained particle.
    particles, train_ind, datadir
        The ORIGINAL particle file for exports and per-particle values, as ``cryoscape select``'s
        ``--particles``, ``--train-ind``, ``--datadir`` (default: the file the run was trained on).
    view_box
        Box of the maps decoded for the viewer (at most the training box).
    cache_maps
        Decoded maps kept in memory.
    seed
        Seed of k-means, GMM and UMAP (as the commands').
    maps
        Post-processing and device of every map (:class:`MapOptions`).
    """

    epoch: int | None = None
    z_path: str | os.PathLike | None = None
    particles: str | os.PathLike | None = None
    train_ind: str | None = None
    datadir: str | os.PathLike | None = None
    view_box: int = 64
    cache_maps: int = 64
    seed: int = 0
    maps: MapOptions = field(default_factory=MapOptions)


@dataclass
class Colouring:
    """Per-particle colours: ``categorical`` labels (ints) or ``continuous`` values, and their name."""

    name: str
    values: np.ndarray
    categorical: bool
    centres: np.ndarray | None = None  # k-means: the on-data centre particle of each cluster


class _MapCache:
    """Least-recently-used maps keyed by (latent bytes, box)."""

    def __init__(self, size: int):
        self.size = max(1, int(size))
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: bytes, volume: np.ndarray) -> None:
        with self._lock:
            self._items[key] = volume
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class DashboardSession:
    """The data and computations behind the dashboard of one run folder (module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, options: DashboardOptions | None = None):
        from cryoscape.analysis.latent import compute_pca, load_latents

        self.options = options or DashboardOptions()
        self.run = Path(run_dir).resolve()
        if not self.run.is_dir():
            raise InputError(f"{run_dir} is not a folder; pass the output folder of cryoscape train or abinit.")
        if self.options.z_path is not None:
            self.z, self.epoch = self._read_z_file(self.options.z_path), self.options.epoch
        else:
            self.z, self.epoch = load_latents(self.run, self.options.epoch)
        if self.z.shape[0] < 2:
            raise InputError(f"{run_dir} has {self.z.shape[0]} latent(s); the dashboard needs at least 2 particles.")
        self.pca = compute_pca(self.z)
        self.out = self.run / "dashboard"
        self._cache = _MapCache(self.options.cache_maps)
        self._lock = threading.Lock()  # one decoder, one map at a time
        self._model = None
        self._model_error: str | None = None
        self._embeddings: dict[str, np.ndarray] = {}
        self._colourings: dict[str, Colouring] = {}
        self._table_rows = None
        self._history_stamp: tuple[float, list[dict[str, Any]]] | None = None

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _read_z_file(path: str | os.PathLike) -> np.ndarray:
        """``(N, zdim)`` float32 latents from a .npy, .pkl (cryoDRGN's z.pkl) or .txt file."""
        from cryoscape.train.volumes import load_latent_file

        p = Path(path)
        arr = load_latent_file(p, option="--z ")
        arr = arr[:, None] if arr.ndim == 1 else arr
        if arr.ndim != 2 or not np.isfinite(arr).all():
            raise InputError(f"--z {p} holds an array of shape {arr.shape} or non-finite values; pass finite "
                             "(particles, zdim) latents.")
        return arr

    def summary(self) -> dict[str, Any]:
        """What the page needs first: counts, dimensions, the choices it offers."""
        n, zdim = self.z.shape
        model = self._try_model()
        embeddings = ["pc"] + (["umap"] if zdim >= 2 else []) + (["z"] if zdim <= 2 else [])
        return dict(run=self.run.name, n_particles=int(n), zdim=int(zdim), epoch=self.epoch,
                    embeddings=embeddings, maps=model is not None,
                    maps_unavailable=self._model_error, box_size=model.box_size if model else None,
                    view_box=self.view_box if model else None, decoder=type(model.decoder).__name__ if model else None,
                    values=self.value_names(), label_files=self.label_files(),
                    explained_variance=self.pca.explained_variance_ratio[:2].tolist())

    # ------------------------------------------------------------------ embeddings and colours
    def embedding(self, name: str) -> np.ndarray:
        """``(N, 2)`` coordinates: ``pc`` (PC1, PC2 as analyze), ``umap`` (analyze's umap.npy when present), ``z``."""
        if name in self._embeddings:
            return self._embeddings[name]
        if name == "pc":
            xy = self.pca.projections[:, :2] if self.z.shape[1] >= 2 else np.stack(
                [self.pca.projections[:, 0], np.zeros(len(self.z), np.float32)], axis=1)
        elif name == "z" and self.z.shape[1] <= 2:
            xy = self.z if self.z.shape[1] == 2 else np.stack([self.z[:, 0], np.zeros(len(self.z))], axis=1)
        elif name == "umap":
            xy = self._umap()
        else:
            raise InputError(f"embedding {name!r} is not one of pc, umap, z (zdim <= 2).")
        self._embeddings[name] = np.asarray(xy, dtype=np.float64)
        return self._embeddings[name]

    def _umap(self) -> np.ndarray:
        from cryoscape.analysis.latent import compute_umap

        saved = self.run / f"analysis.{self.epoch}" / "umap.npy" if self.epoch is not None else None
        if saved is not None and saved.is_file() and self.options.z_path is None:
            xy = np.load(saved)
            if xy.shape == (len(self.z), 2):
                return xy
        if self.z.shape[1] < 2:
            raise InputError("UMAP of a 1-D latent is the latent itself; choose the pc embedding.")
        return compute_umap(self.z, seed=self.options.seed).embedding

    def colouring(self, spec: str) -> Colouring:
        """Colours from ``spec``: ``none``, ``kmeans:K``, ``gmm:N``, ``labels:FILE`` (in the run folder), ``value:NAME``."""
        if spec in self._colourings:
            return self._colourings[spec]
        kind, _, arg = spec.partition(":")
        n = len(self.z)
        if kind == "none":
            result = Colouring("none", np.zeros(n, dtype=np.int64), True)
        elif kind in ("kmeans", "gmm"):
            k = _positive_int(arg, kind)
            if kind == "kmeans":
                from cryoscape.analysis.latent import kmeans_on_data

                km = kmeans_on_data(self.z, k, seed=self.options.seed)
                result = Colouring(f"k-means, k = {k}", km.labels, True, centres=km.center_indices)
            else:
                from cryoscape.analysis.selection import gmm_labels

                result = Colouring(f"GMM, {k} components", gmm_labels(self.z, k, seed=self.options.seed)[0], True)
        elif kind == "labels":
            from cryoscape.analysis.selection import read_labels

            path = self.confined(arg)
            result = Colouring(f"labels {arg}", read_labels(path, n_particles=n), True)
        elif kind == "value":
            values = self.particle_values()
            if arg not in values:
                raise InputError(f"no per-particle value {arg!r}; choose one of {', '.join(values)}.")
            result = Colouring(arg, values[arg], False)
        else:
            raise InputError(f"colouring {spec!r} is not none, kmeans:K, gmm:N, labels:FILE or value:NAME.")
        self._colourings[spec] = result
        return result

    def value_names(self) -> list[str]:
        """Names of the per-particle values offered for colouring (cheap: no table is read)."""
        names = [f"z{i + 1}" for i in range(self.z.shape[1])] + ["|z - mean|"]
        names += [f"PC{i + 1}" for i in range(min(3, self.pca.projections.shape[1]))]
        return names + ["defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "rot_deg", "tilt_deg",
                        "psi_deg", "shift_x_pixel", "shift_y_pixel"]

    def particle_values(self) -> dict[str, np.ndarray]:
        """Per-particle values: latent coordinates, PCs, latent norm, and (from the particle file) CTF and pose."""
        values = {f"z{i + 1}": self.z[:, i] for i in range(self.z.shape[1])}
        values["|z - mean|"] = np.linalg.norm(self.z - self.z.mean(0), axis=1)
        values.update({f"PC{i + 1}": self.pca.projections[:, i] for i in range(min(3, self.pca.projections.shape[1]))})
        try:
            table, rows = self.particle_table()
        except InputError as err:
            log.info("no per-particle metadata for the dashboard: %s", err)
            return values
        if table.ctf is not None:
            for name in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg"):
                values[name] = getattr(table.ctf, name)[rows]
        if table.rotations is not None:
            from cryoscape.geometry.rotations import matrix_to_euler_relion

            eulers = np.asarray(matrix_to_euler_relion(np.asarray(table.rotations[rows], dtype=np.float64)))
            values.update(rot_deg=eulers[:, 0], tilt_deg=eulers[:, 1], psi_deg=eulers[:, 2])
        if table.shifts_pixel is not None:
            values.update(shift_x_pixel=table.shifts_pixel[rows, 0], shift_y_pixel=table.shifts_pixel[rows, 1])
        return values

    def label_files(self) -> list[str]:
        """Per-particle label files in the run folder (analyze's k-means, landscape's clusters), relative paths."""
        found = []
        for pattern in ("analysis.*/kmeans*/labels.pkl", "landscape.*/cluster_labels.pkl", "*.labels.pkl"):
            found += [p.relative_to(self.run).as_posix() for p in sorted(self.run.glob(pattern))]
        return found

    def particle_table(self):
        """``(original ParticleTable, row of it for each latent)``, read once (``select``'s functions)."""
        if self._table_rows is None:
            from cryoscape.analysis.selection import load_run_particles, run_particle_rows

            o = self.options
            table = load_run_particles(self.run, particles=o.particles, datadir=o.datadir)
            rows = run_particle_rows(self.run, len(self.z), n_source=len(table), train_ind=o.train_ind,
                                     source_name=str(table.source_path))
            self._table_rows = (table, rows)
        return self._table_rows

    # ------------------------------------------------------------------ selection and export
    def select(self, polygon: np.ndarray, embedding: str) -> np.ndarray:
        """Positions (rows of the latents) inside ``polygon (M, 2)`` drawn on ``embedding``: ``select --polygon``'s test."""
        from cryoscape.analysis.selection import points_in_polygon

        poly = np.asarray(polygon, dtype=np.float64)
        if poly.ndim != 2 or poly.shape[0] < 3 or poly.shape[1] != 2 or not np.isfinite(poly).all():
            raise InputError("a selection polygon needs at least 3 finite (x, y) vertices; draw a lasso or a box.")
        return points_in_polygon(self.embedding(embedding), poly)

    def export(self, positions: np.ndarray, name: str, fmt: str, *, polygon: np.ndarray | None = None,
               embedding: str = "") -> dict[str, Path]:
        """Write a selection into ``RUN/dashboard/``: ``star``/``cs`` subset of the ORIGINAL particles (with
        ``NAME.ind.pkl``) or ``indices`` (``NAME.pkl`` of original rows and ``NAME.positions.txt``)."""
        from cryoscape.analysis.selection import write_polygon, write_selection

        if not _NAME_RE.match(name or ""):
            raise InputError(f"export name {name!r} must be 1-64 letters, digits, '_', '-' or '.', starting with a "
                             "letter or digit.")
        if fmt not in ("star", "cs", "indices"):
            raise InputError(f"export format {fmt!r} is not star, cs or indices.")
        positions = np.unique(np.asarray(positions, dtype=np.int64))
        table, rows = self.particle_table()
        self.out.mkdir(parents=True, exist_ok=True)
        target = self.out / (f"{name}.{fmt}" if fmt != "indices" else f"{name}.pkl")
        paths = write_selection(target, table, rows[positions])
        positions_path = self.out / f"{name}.positions.txt"
        np.savetxt(positions_path, positions, fmt="%d")
        paths["positions"] = positions_path
        if polygon is not None:
            paths["polygon"] = self.out / f"{name}.polygon.txt"
            write_polygon(paths["polygon"], np.asarray(polygon, dtype=np.float64),
                          comment=f"drawn in the dashboard's {embedding} embedding of {self.run}")
        log.info("dashboard: wrote %d particles to %s", positions.size, ", ".join(str(p) for p in paths.values()))
        return paths

    # ------------------------------------------------------------------ maps
    def _try_model(self):
        if self._model is None and self._model_error is None:
            from cryoscape.analysis.maps import load_map_model

            try:
                model = load_map_model(self.run, epoch=self.epoch, device=self.options.maps.device)
            except InputError as err:
                self._model_error = str(err)
                return None
            if model.zdim != self.z.shape[1]:
                self._model_error = (f"the run's decoder has zdim {model.zdim} but the latents have {self.z.shape[1]} "
                                     "columns, so no maps can be made from them")
                return None
            self._model = model
        return self._model

    @property
    def view_box(self) -> int:
        """Box of the viewer's maps."""
        model = self._try_model()
        return min(int(self.options.view_box), model.box_size) if model else int(self.options.view_box)

    def latent_of(self, index: int | None = None, latent: list[float] | None = None,
                  pc: list[float] | None = None) -> np.ndarray:
        """The latent of particle ``index``, the given ``latent``, or the point ``pc`` of the PC1-PC2 plane
        (the other PCs at the mean, as analyze's PC traversals), checked."""
        if sum(x is not None for x in (index, latent, pc)) != 1:
            raise InputError("ask for a map at one of a particle index, a latent or a PC1-PC2 point.")
        if pc is not None:
            point = np.asarray(pc, dtype=np.float64).ravel()
            if point.shape != (2,) or not np.isfinite(point).all():
                raise InputError("a PC1-PC2 point needs 2 finite numbers.")
            return self.pca.to_latent(point[None, : min(2, self.z.shape[1])])[0]
        if index is not None:
            if not 0 <= int(index) < len(self.z):
                raise InputError(f"particle {index} is not in the run (0 to {len(self.z) - 1}).")
            return self.z[int(index)]
        zi = np.asarray(latent, dtype=np.float32).ravel()
        if zi.shape != (self.z.shape[1],) or not np.isfinite(zi).all():
            raise InputError(f"a latent needs {self.z.shape[1]} finite numbers.")
        return zi

    def decode(self, latent: np.ndarray, *, box_size: int | None = None) -> tuple[np.ndarray, float, bool]:
        """``(map (n, n, n) float32, seconds, cached)`` at ``latent``, post-processed as ``MapOptions`` say."""
        import torch

        from cryoscape.models.precision import autocast, resolve_amp

        model = self._try_model()
        if model is None:
            raise InputError(f"no maps: {self._model_error}.")
        n = int(box_size or self.view_box)
        key = np.asarray(latent, dtype=np.float32).tobytes() + n.to_bytes(4, "little")
        hit = self._cache.get(key)
        if hit is not None:
            return hit, 0.0, True
        start = time.perf_counter()
        opts = self.options.maps
        with self._lock, torch.no_grad(), autocast(model.device, resolve_amp(opts.amp, model.device)):
            zt = torch.as_tensor(np.asarray(latent, dtype=np.float32), device=model.device)
            volume = model.decoder.eval_volume(zt, box_size=n).to(torch.float32)
        volume = _post_process(volume, model.pixel_size_angstrom * model.box_size / n, opts)
        seconds = time.perf_counter() - start
        self._cache.put(key, volume)
        return volume, seconds, False

    def centre_maps(self, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(on-data centre particle of each k-means cluster, their maps)`` (``analyze``'s k-means)."""
        colouring = self.colouring(f"kmeans:{k}")
        return colouring.centres, [self.decode(self.z[i])[0] for i in colouring.centres]

    # ------------------------------------------------------------------ trajectories
    def graph_path(self, anchors: list[int], *, avg_neighbors: float = 5.0, max_neighbors: int = 10,
                   max_maps: int | None = 20) -> dict[str, np.ndarray]:
        """``traverse --along graph``'s path through ``anchors``: every visited particle and the thinned map particles."""
        from cryoscape.analysis.trajectories import graph_traversal
        from cryoscape.report.traverse import thin_path

        anchors = [int(a) for a in anchors]
        if len(anchors) < 2 or any(not 0 <= a < len(self.z) for a in anchors):
            raise InputError(f"a path needs 2 or more anchors among the particles 0 to {len(self.z) - 1}; "
                             "click particles to add anchors.")
        path = graph_traversal(self.z, anchors, avg_neighbors=avg_neighbors, max_neighbors=max_neighbors)
        return dict(indices=path.indices, map_indices=path.indices[thin_path(path, max_maps)],
                    length=float(path.lengths[-1]))

    def save_path(self, anchors: list[int], name: str, *, avg_neighbors: float = 5.0, max_neighbors: int = 10,
                  max_maps: int | None = 20):
        """Save a path as ``cryoscape traverse --along graph`` would, into ``RUN/dashboard/NAME/``."""
        from cryoscape.report.traverse import TraverseOptions, traverse_run

        if not _NAME_RE.match(name or ""):
            raise InputError(f"trajectory name {name!r} must be 1-64 letters, digits, '_', '-' or '.'.")
        options = TraverseOptions(along="graph", anchors=[int(a) for a in anchors], avg_neighbors=avg_neighbors,
                                  max_neighbors=max_neighbors, max_maps=max_maps, seed=self.options.seed,
                                  maps=self.options.maps)
        return traverse_run(self.run, options, outdir=self.out / name, latents=(self.z, self.epoch or 0),
                            progress=False)

    # ------------------------------------------------------------------ training progress
    def history(self) -> dict[str, Any]:
        """Per-epoch losses from the run's checkpoint (re-read only when the checkpoint changed)."""
        from cryoscape.analysis.selection import read_run_config
        from cryoscape.report.analyze import read_training_history

        newest = max((p.stat().st_mtime for p in self.run.glob("*.pt")), default=0.0)
        if self._history_stamp is None or self._history_stamp[0] != newest:
            self._history_stamp = (newest, read_training_history(self.run))
        records = self._history_stamp[1]
        planned = read_run_config(self.run).get("num_epochs")
        keys = ("loss", "error", "kl")
        return dict(epochs=[int(r.get("epoch", i)) for i, r in enumerate(records)],
                    **{k: [r.get(k) for r in records] for k in keys},
                    planned_epochs=planned, in_progress=bool(planned) and len(records) < int(planned))

    # ------------------------------------------------------------------ files
    def confined(self, relative: str) -> Path:
        """``RUN/relative`` if it is a file inside the run folder (after resolving links), else InputError."""
        target = (self.run / relative).resolve()
        if not target.is_relative_to(self.run):
            raise PermissionError(f"{relative} is outside the run folder")
        if not target.is_file():
            raise InputError(f"{relative} is not a file of the run folder.")
        return target


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1000:
        raise InputError(f"{what}:{text} needs a whole number of clusters from 1 to 1000.")
    return value


def _post_process(volume, pixel_size_angstrom: float, opts: MapOptions) -> np.ndarray:
    """Low-pass, hand flip and inversion as ``cryoscape volumes`` writes them (without writing a file)."""
    from cryoscape.train.volumes import postprocess_map

    volume = postprocess_map(volume, pixel_size_angstrom=pixel_size_angstrom, lowpass_angstrom=opts.lowpass_angstrom,
                             flip=opts.flip, invert=opts.invert)
    return volume.cpu().numpy().astype(np.float32)
