"""``cryoscape traverse``: maps along a trajectory through a trained run's latent space.

:func:`traverse_run` builds the latents of one of three kinds of trajectory
(:mod:`cryoscape.analysis.trajectories`), generates their maps (:mod:`cryoscape.analysis.maps`),
plots the path over the particles' PC1-PC2 plane (a histogram for zdim 1) and writes a small
``report.html``.

``along="pc"``
    ``n_points`` maps along principal component ``pc`` from its 5th to its 95th percentile.
``along="line"``
    Straight lines through the anchors (particle indices, latents read from a file, or the
    on-data centres of k-means), ``n_points`` per segment.
``along="graph"``
    The shortest path through the particles' neighbour graph (thesis 4.4.12) through anchors
    given as particle indices or as k-means on-data centres; one map per visited particle
    (``max_maps`` thins a long path evenly, always keeping the anchors).

k-means anchors are strung into a chain (:func:`cryoscape.analysis.trajectories.order_anchors`:
from the end of their first principal axis, always to the nearest unvisited one).

Output folder (default ``RUN/traverse.EPOCH.ALONG``): ``z_values.txt`` (latents of the maps, one
per line), ``vol_000.mrc`` ..., ``anchors.txt``; for graph paths also ``path_indices.txt`` and
``z_path.txt`` (every visited particle and its latent) and ``map_indices.txt`` (the particle of
each map); ``trajectory.png``, ``maps.png``, ``map_views.png`` (isosurfaces and central slices), ``maps.cxc`` (ChimeraX), ``report.html``,
``config.yaml``, ``traverse.log``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cryoscape.analysis.latent import compute_pca, kmeans_on_data, load_latents, pc_traversal
from cryoscape.analysis.maps import MapOptions, MapSet
from cryoscape.analysis.trajectories import GraphPath, graph_traversal, linear_trajectory, order_anchors
from cryoscape.errors import InputError
from cryoscape.report.html import Figure, Section, write_html_report

__all__ = ["TraverseOptions", "TraversalResult", "traverse_run", "thin_path", "ALONG"]

log = logging.getLogger(__name__)

ALONG = ("pc", "line", "graph")


@dataclass
class TraversalResult:
    """What :func:`traverse_run` made.

    Attributes
    ----------
    outdir, report
        Output folder and its ``report.html``.
    latents
        ``(M, zdim)`` latents of the maps, in path order.
    map_indices
        ``(M,)`` particle index of each map (graph paths), else ``None``.
    path
        The full graph path (graph traversal), else ``None``.
    anchor_latents
        ``(A, zdim)`` the anchors (pc: the two ends).
    maps
        The maps (``None`` with ``skip_vol``).
    """

    outdir: Path
    report: Path
    epoch: int
    latents: np.ndarray
    anchor_latents: np.ndarray
    map_indices: np.ndarray | None = None
    path: GraphPath | None = None
    maps: MapSet | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _read_anchor_latents(path: str | os.PathLike, zdim: int) -> np.ndarray:
    from cryoscape.train.volumes import read_latents

    return read_latents(path, zdim=zdim)


def thin_path(path: GraphPath, max_maps: int | None) -> np.ndarray:
    """Positions along ``path.indices`` to make maps at: all, or ~``max_maps`` evenly spaced plus the anchors."""
    L = path.indices.size
    if max_maps is None or L <= max_maps:
        return np.arange(L)
    if max_maps < 2:
        raise InputError(f"--max-maps {max_maps} cannot hold both ends of the path; pass 2 or more.")
    even = np.round(np.linspace(0, L - 1, max_maps)).astype(np.int64)
    return np.unique(np.concatenate([even, path.anchor_positions]))


@dataclass
class TraverseOptions:
    """What ``cryoscape traverse`` makes (one object instead of 20 threaded keyword arguments).

    Attributes
    ----------
    along
        ``"pc"``, ``"line"`` or ``"graph"``.
    epoch
        0-based epoch (``None``: the latest with latents).
    pc, n_points, percentiles
        PC traversal: which PC (1-based), how many maps, between which percentiles; for
        ``line``: points per segment.
    anchors
        Particle indices (0-based, as in ``z.EPOCH.npy``) to pass through (line, graph).
    anchor_file
        Latents to pass through (line only): .txt (one per line), .npy or .pkl.
    kmeans_anchors
        Use the on-data centres of k-means with this many clusters as anchors (line, graph).
    avg_neighbors, max_neighbors
        The neighbour graph's target mean and maximum number of neighbours.
    max_maps
        Graph paths: make at most about this many maps (evenly along the path, anchors kept).
    skip_vol
        Latents and plots only.
    seed
        Seed of the k-means anchors.
    maps
        Box, low-pass, hand, device and precision of the maps.
    map_views
        Draw the maps' isosurfaces and central slices into the report and write ``maps.cxc``.
    """

    along: str = "pc"
    epoch: int | None = None
    pc: int = 1
    n_points: int = 10
    percentiles: tuple[float, float] = (5.0, 95.0)
    anchors: Sequence[int] | None = None
    anchor_file: str | os.PathLike | None = None
    kmeans_anchors: int | None = None
    avg_neighbors: float = 5.0
    max_neighbors: int = 10
    max_maps: int | None = None
    skip_vol: bool = False
    seed: int = 0
    maps: MapOptions = field(default_factory=MapOptions)
    map_views: bool = True

    def validate(self) -> None:
        """Raise :class:`InputError` (one sentence) for a kind without its anchors, or anchors it cannot take."""
        if self.along not in ALONG:
            raise InputError(f"--along {self.along!r} is not a trajectory kind; pass one of {', '.join(ALONG)}.")
        given = sum(x is not None for x in (self.anchors, self.anchor_file, self.kmeans_anchors))
        if self.along == "pc" and given:
            raise InputError("--along pc runs along a principal component and takes no anchors; pass --pc N, or "
                             "--along line/graph with the anchors.")
        if self.along != "pc" and given != 1:
            raise InputError(f"--along {self.along} needs exactly one of --anchors, --anchor-z (line only) and "
                             "--kmeans-anchors.")
        if self.along == "graph" and self.anchor_file is not None:
            raise InputError("graph traversal runs through particles: pass --anchors (particle indices) or "
                             "--kmeans-anchors, not --anchor-z.")

    def record(self) -> dict[str, Any]:
        """Plain values for ``config.yaml``."""
        plain = {k: v for k, v in vars(self).items() if k != "maps"}
        plain["percentiles"] = list(self.percentiles)
        plain["anchors"] = None if self.anchors is None else [int(a) for a in self.anchors]
        return {**plain, **self.maps.record()}


def traverse_run(
    run_dir: str | os.PathLike,
    options: TraverseOptions,
    *,
    outdir: str | os.PathLike | None = None,
    latents: tuple[np.ndarray, int] | None = None,
    progress: bool = True,
    arguments: dict[str, Any] | None = None,
) -> TraversalResult:
    """Latents and maps along a trajectory of a ``cryoscape train`` run (module docstring).

    Parameters
    ----------
    options
        The trajectory and its maps (:class:`TraverseOptions`).
    outdir
        Output folder (default ``RUN/traverse.EPOCH.ALONG``).
    latents
        ``(z, epoch)`` to use instead of the run's ``z.EPOCH.npy`` (the dashboard's ``--z``).
    arguments
        What to record in ``config.yaml`` (default: the options).
    """
    from cryoscape.io.run_folder import attach_log_file, detach_log_file, write_config

    opts = options
    opts.validate()
    run = Path(os.path.abspath(run_dir))  # absolute: the report's links are made relative to it
    z, epoch = latents if latents is not None else load_latents(run, opts.epoch)
    out = Path(os.path.abspath(outdir)) if outdir is not None else run / f"traverse.{epoch}.{opts.along}"
    out.mkdir(parents=True, exist_ok=True)
    record = dict(arguments) if arguments is not None else dict(run=str(run), **opts.record())
    write_config(out, "traverse", record, analysed_epoch=epoch, n_particles=int(z.shape[0]), zdim=int(z.shape[1]))
    handler = attach_log_file(out / "traverse.log")
    try:
        return _traverse(run, out, z, epoch, opts, progress=progress)
    finally:
        detach_log_file(handler)


def _anchor_latents(z: np.ndarray, opts: TraverseOptions) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(anchor particle indices or None, anchor latents)`` of a line or graph trajectory; ``(None, None)`` for pc."""
    n, zdim = z.shape
    if opts.along == "pc":
        return None, None
    anchor_idx: np.ndarray | None = None
    if opts.anchors is not None:
        anchor_idx = np.asarray(opts.anchors, dtype=np.int64).ravel()
        bad = anchor_idx[(anchor_idx < 0) | (anchor_idx >= n)]
        if bad.size:
            raise InputError(f"anchor {int(bad[0])} is not a particle index of this run (0 to {n - 1}); "
                             "pass --anchors within that range.")
        anchor_lat = z[anchor_idx]
    elif opts.kmeans_anchors is not None:
        if opts.kmeans_anchors < 2:
            raise InputError(f"--kmeans-anchors {opts.kmeans_anchors} gives fewer than 2 anchors; pass 2 or more.")
        km = kmeans_on_data(z, opts.kmeans_anchors, seed=opts.seed)
        anchor_idx = km.center_indices[order_anchors(z[km.center_indices])]
        anchor_lat = z[anchor_idx]
        log.info("anchors: on-data centres of k-means (k = %d), in path order: particles %s",
                 opts.kmeans_anchors, anchor_idx.tolist())
    else:
        anchor_lat = _read_anchor_latents(opts.anchor_file, zdim)
    if anchor_lat.shape[0] < 2:
        raise InputError(f"a {opts.along} trajectory needs at least 2 anchors, got {anchor_lat.shape[0]}.")
    return anchor_idx, anchor_lat


def _traverse(run: Path, out: Path, z: np.ndarray, epoch: int, opts: TraverseOptions, *,
              progress: bool) -> TraversalResult:
    from cryoscape.analysis.maps import generate_maps, load_map_model

    n, zdim = z.shape
    along = opts.along
    pca = compute_pca(z) if n >= 2 else None
    info: dict[str, Any] = {}
    anchor_idx, anchor_lat = _anchor_latents(z, opts)
    path: GraphPath | None = None
    map_indices = None
    if along == "pc":
        coords, latents = pc_traversal(pca, opts.pc, n_points=opts.n_points, low_percentile=opts.percentiles[0],
                                       high_percentile=opts.percentiles[1])
        anchor_lat = latents[[0, -1]]
        np.savetxt(out / "pc_coordinates.txt", coords, fmt="%.6g")
        info["pc"] = opts.pc
    elif along == "line":
        latents = linear_trajectory(anchor_lat, n_points=opts.n_points)
    else:
        path = graph_traversal(z, anchor_idx, avg_neighbors=opts.avg_neighbors, max_neighbors=opts.max_neighbors)
        g = path.graph
        log.info("neighbour graph: %d particles, threshold %.4g, %.2f neighbours on average (at most %d); "
                 "path of %d particles, length %.4g", g.n_nodes, g.threshold, g.avg_neighbors, g.max_degree,
                 path.indices.size, path.lengths[-1])
        info.update(threshold=g.threshold, avg_neighbors=g.avg_neighbors, max_degree=g.max_degree,
                    path_particles=int(path.indices.size), path_length=float(path.lengths[-1]))
        np.savetxt(out / "path_indices.txt", path.indices, fmt="%d")
        np.savetxt(out / "z_path.txt", z[path.indices], fmt="%.6g")
        map_indices = path.indices[thin_path(path, opts.max_maps)]
        np.savetxt(out / "map_indices.txt", map_indices, fmt="%d")
        latents = z[map_indices]
    np.savetxt(out / "z_values.txt", latents, fmt="%.6g")
    np.savetxt(out / "anchors.txt", anchor_idx if anchor_idx is not None else anchor_lat,
               fmt="%d" if anchor_idx is not None else "%.6g")

    maps = None
    if not opts.skip_vol:
        model = load_map_model(run, epoch=epoch, device=opts.maps.device)
        if model.zdim != zdim:
            raise InputError(f"{run}: the decoder of epoch {epoch} has zdim {model.zdim} but the latents have "
                             f"{zdim} columns; pass a matching --epoch.", path=run)
        maps = generate_maps(model, latents, out, **opts.maps.generate_kwargs(), progress=progress,
                             write_z_values=False)
    report = _write_report(run, out, z, epoch, opts, pca=pca, latents=latents, anchor_lat=anchor_lat, path=path,
                           maps=maps, info=info)
    return TraversalResult(outdir=out, report=report, epoch=epoch, latents=latents, anchor_latents=anchor_lat,
                           map_indices=map_indices, path=path, maps=maps, info=info)


def _write_report(run: Path, out: Path, z: np.ndarray, epoch: int, opts: TraverseOptions, *, pca, latents: np.ndarray,
                  anchor_lat: np.ndarray, path: GraphPath | None, maps: MapSet | None, info: dict[str, Any]) -> Path:
    """The trajectory's plots, map pictures, ChimeraX file and ``report.html``."""
    from cryoscape.report import plots
    from cryoscape.report.analyze import map_set_views

    zdim = z.shape[1]
    figures = []
    title = {"pc": f"PC{opts.pc} traversal", "line": "straight-line trajectory", "graph": "graph traversal"}[opts.along]
    if zdim == 1:
        figures.append(Figure(plots.plot_traversal_positions(z[:, 0], latents[:, 0], out / "trajectory.png",
                                                             xlabel="z", title=title),
                              "Latent histogram; dashed lines: the maps' positions along the path"))
    else:
        to_pc = lambda v: (np.asarray(v, dtype=np.float64) - pca.mean) @ pca.components[:2].T  # noqa: E731
        figures.append(Figure(plots.plot_trajectory(pca.projections[:, :2], to_pc(latents), out / "trajectory.png",
                                                    anchor_xy=to_pc(anchor_lat), xlabel="PC1", ylabel="PC2",
                                                    title=title),
                              "The path (coloured from start to end) over the particles on PC1-PC2; stars: anchors"))
    links: list[tuple[Any, str]] = [(out / "z_values.txt", "latents of the maps (z_values.txt)"),
                                    (out / "anchors.txt", "anchors")]
    if path is not None:
        links += [(out / "path_indices.txt", "particles on the path"), (out / "z_path.txt", "their latents")]
    if maps is not None:
        figures.append(Figure(plots.plot_map_projections(maps.projections, out / "maps.png"),
                              "Projections along z of the maps, in path order"))
        if opts.map_views:
            figures.append(map_set_views(maps.paths, out / "map_views.png", out / "maps.cxc",
                                         titles=[str(i) for i in range(len(maps.paths))],
                                         what=f"maps along the {title}"))
            links.append((out / "maps.cxc", "ChimeraX: the maps as a volume series (maps.cxc)"))
        links += [(p, p.name) for p in maps.paths]
    paragraphs = [f"{latents.shape[0]} map latents along a {title} of run {run}, epoch {epoch}."]
    if path is not None:
        paragraphs.append(
            f"Neighbour graph: particles closer than {info['threshold']:.4g} are neighbours "
            f"({info['avg_neighbors']:.2f} on average, at most {info['max_degree']}); Dijkstra's shortest path "
            f"visits {info['path_particles']} particles over a latent length of {info['path_length']:.4g}.")
    return write_html_report(out / "report.html", title=f"cryoscape traverse: {run.name}, epoch {epoch}",
                             subtitle=title, sections=[Section(title[0].upper() + title[1:], paragraphs=paragraphs,
                                                               figures=figures, links=links)])
