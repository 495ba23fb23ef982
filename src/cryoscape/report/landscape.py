"""``cryoscape landscape``: the landscape analysis of a run, its plots and its HTML page.

:func:`run_landscape` computes (:func:`cryoscape.analysis.landscape.landscape_from_run`), draws
the figures of thesis chapter 6 into the output folder and writes ``report.html`` there:

* explained variance of the volume PCs (Fig. 6-5);
* the sketch maps in volume-PC space coloured by cluster (Fig. 6-3A), PC1/PC2 and PC2/PC3;
* maps along each PC (projections along z of ``mean + s * eigenvolume``) (Fig. 6-2A, B);
* cluster sizes in maps and in particles (Fig. 6-3B, C) and projections of the cluster means;
* the conformational landscape: density of every particle's ``phi(z)`` in PC1/PC2 (Fig. 6-2C);
* how well the MLP predicts held-out maps' PCs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from cryoscape.analysis.landscape import LandscapeOptions, LandscapeResult, landscape_from_run
from cryoscape.report.html import Figure, Section, Table, write_html_report

__all__ = ["plot_landscape", "write_landscape_report", "run_landscape"]

log = logging.getLogger(__name__)


def _save(fig, path: Path) -> Path:
    from cryoscape.io.writers import atomic_write

    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return path.resolve()  # the report takes relative figure paths as relative to itself


def _cluster_colours(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _projection(path: Path) -> np.ndarray:
    from cryoscape.io.mrc import read_mrc

    vol, _ = read_mrc(path)
    return vol.sum(axis=0)


def plot_landscape(result: LandscapeResult, folder: str | os.PathLike) -> dict[str, Path]:
    """Draw the landscape figures into ``folder``; returns name -> PNG path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name, draw in (("explained_variance", _plot_explained_variance), ("sketch_pcs", _plot_sketch_pcs),
                       ("cluster_counts", _plot_cluster_counts), ("landscape", _plot_particle_landscape),
                       ("mlp_validation", _plot_mlp_validation), ("pc_traversals", _plot_pc_traversals),
                       ("cluster_maps", _plot_cluster_maps)):
        fig = draw(result)
        if fig is not None:
            out[name] = _save(fig, folder / f"{name}.png")
    out.update(_map_views(result, folder))
    return out


def _plot_explained_variance(result: LandscapeResult):
    """Bar chart of each volume PC's fraction of variance, with the cumulative curve."""
    from matplotlib.figure import Figure as MplFigure

    ratio = result.pca.explained_variance_ratio
    fig = MplFigure(figsize=(4.8, 3.4), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    pcs = np.arange(1, len(ratio) + 1)
    ax.bar(pcs, ratio, color="tab:blue", label="per PC")
    ax.plot(pcs, np.cumsum(ratio), "o-", color="k", markersize=3, label="cumulative")
    ax.set_xlabel("volume PC")
    ax.set_ylabel("fraction of variance")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(pcs)
    ax.legend(fontsize="small")
    return fig


def _plot_sketch_pcs(result: LandscapeResult):
    """The sketch maps in volume-PC space (PC1/PC2, PC2/PC3), coloured by cluster; None with one PC."""
    from matplotlib.figure import Figure as MplFigure

    pca = result.pca
    L = pca.scores.shape[1]
    pairs = [(0, 1), (1, 2)] if L >= 3 else [(0, 1)] if L >= 2 else []
    if not pairs:
        return None
    colours = _cluster_colours(len(result.cluster_volume_counts))
    fig = MplFigure(figsize=(4.4 * len(pairs), 3.8), dpi=120)
    for j, (a, b) in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), j + 1)
        for c in range(len(colours)):
            sel = result.volume_clusters == c
            ax.scatter(pca.scores[sel, a], pca.scores[sel, b], s=10, color=colours[c], label=str(c))
        ax.set_xlabel(f"PC{a + 1}")
        ax.set_ylabel(f"PC{b + 1}")
    fig.axes[-1].legend(title="cluster", fontsize="x-small", markerscale=1.5, loc="best")
    fig.suptitle(f"{len(pca.scores)} sketch maps in volume-PC space", fontsize="small")
    return fig


def _plot_cluster_counts(result: LandscapeResult):
    """Sketch maps and particles per cluster."""
    from matplotlib.figure import Figure as MplFigure

    M = len(result.cluster_volume_counts)
    fig = MplFigure(figsize=(8.0, 3.0), dpi=120)
    for j, (counts, what) in enumerate(((result.cluster_volume_counts, "sketch maps"),
                                        (result.cluster_particle_counts, "particles"))):
        ax = fig.add_subplot(1, 2, j + 1)
        ax.bar(np.arange(M), counts, color=_cluster_colours(M))
        ax.set_xlabel("cluster")
        ax.set_ylabel(what)
        ax.set_xticks(np.arange(M))
    return fig


def _plot_particle_landscape(result: LandscapeResult):
    """Every particle's MLP-predicted volume PCs: a log-density hexbin (a histogram with one PC)."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(4.8, 4.0), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    v = result.landscape_pcs
    if result.pca.scores.shape[1] >= 2:
        from matplotlib.colors import LogNorm

        gridsize = int(np.clip(np.sqrt(len(v)) / 2, 10, 60))
        hb = ax.hexbin(v[:, 0], v[:, 1], gridsize=gridsize, norm=LogNorm(), cmap="viridis", mincnt=1)
        fig.colorbar(hb, ax=ax, label="particles")
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
    else:
        ax.hist(v[:, 0], bins=50, color="tab:blue")
        ax.set_xlabel("PC1")
        ax.set_ylabel("particles")
    ax.set_title(f"{len(v)} particles: MLP latent -> volume PCs", fontsize="small")
    return fig


def _plot_mlp_validation(result: LandscapeResult):
    """Held-out MLP predictions against the decoded maps' PCs (first three PCs)."""
    from matplotlib.figure import Figure as MplFigure

    shown = min(result.pca.scores.shape[1], 3)
    fig = MplFigure(figsize=(3.4 * shown, 3.2), dpi=120)
    for i in range(shown):
        ax = fig.add_subplot(1, shown, i + 1)
        t, p = result.mlp.val_true[:, i], result.mlp.val_pred[:, i]
        ax.scatter(t, p, s=6, color="tab:blue")
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", linewidth=0.8)
        ax.set_xlabel(f"PC{i + 1} of the decoded map")
        ax.set_ylabel("MLP prediction")
        ax.set_title(f"held out: R² = {result.mlp.val_r2[i]:.3f}", fontsize="small")
    return fig


def _plot_pc_traversals(result: LandscapeResult):
    """Projections of the maps along each PC, a row per PC; None without traversals."""
    from matplotlib.figure import Figure as MplFigure

    traversals = result.paths.get("traversals", {})
    if not traversals:
        return None
    rows = sorted(traversals)
    cols = max(len(traversals[r]) for r in rows)
    fig = MplFigure(figsize=(1.1 * cols, 1.2 * len(rows) + 0.3), dpi=120)
    for r_i, r in enumerate(rows):
        for c_i, path in enumerate(traversals[r]):
            ax = fig.add_subplot(len(rows), cols, r_i * cols + c_i + 1)
            ax.imshow(_projection(path), cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if c_i == 0:
                ax.set_ylabel(f"PC{r + 1}")
    fig.suptitle("projections along z of the maps along each PC (5th to 95th percentile)", fontsize="small")
    return fig


def _plot_cluster_maps(result: LandscapeResult):
    """Projections of the cluster mean maps with their particle counts; None without cluster maps."""
    from matplotlib.figure import Figure as MplFigure

    maps = result.paths.get("cluster_maps", [])
    if not maps:
        return None
    colours = _cluster_colours(len(result.cluster_volume_counts))
    cols = min(len(maps), 5)
    rows_n = int(np.ceil(len(maps) / cols))
    fig = MplFigure(figsize=(1.6 * cols, 1.75 * rows_n), dpi=120)
    for i, path in enumerate(maps):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        ax.imshow(_projection(path), cmap="gray", origin="lower")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"cluster {i}: {result.cluster_particle_counts[i]}", fontsize="x-small", color=colours[i])
    return fig


def _map_views(result: LandscapeResult, folder: Path) -> dict[str, Path]:
    """Isosurfaces and central slices of the cluster maps and of each PC's maps, with their ChimeraX files."""
    from cryoscape.report.mapviews import write_map_set_views

    out: dict[str, Path] = {}
    maps = result.paths.get("cluster_maps", [])
    if maps:
        out["cluster_map_views"], _ = write_map_set_views(
            maps, folder / "cluster_map_views.png", Path(maps[0]).parent / "maps.cxc",
            titles=[f"cluster {i}" for i in range(len(maps))], what="cluster mean maps")
    for i, paths in sorted(result.paths.get("traversals", {}).items()):
        if paths:
            out[f"pc{i + 1}_map_views"], _ = write_map_set_views(
                paths, folder / f"pc{i + 1}_map_views.png", Path(paths[0]).parent / "maps.cxc",
                titles=[str(j) for j in range(len(paths))], what=f"maps along volume PC{i + 1}")
    return out


def write_landscape_report(result: LandscapeResult, *, figures: dict[str, Path] | None = None) -> Path:
    """Write ``report.html`` in the result's folder (drawing the figures first when not given)."""
    out = result.out_dir
    figures = figures if figures is not None else plot_landscape(result, out)
    opts = result.options
    pca = result.pca
    L = pca.scores.shape[1]
    m = int(result.mask.sum())
    n_vox = result.mask.size
    N = result.n_particles

    def fig(name: str, caption: str) -> list[Figure]:
        return [Figure(figures[name], caption)] if name in figures else []

    settings = Table(
        ["setting", "value"],
        [["particles", N], ["sketch maps (k-means on the latents)", len(result.sketch.indices)],
         ["map box", f"{result.box_size} px, {result.pixel_size_angstrom:.4g} Å/px"],
         ["mask", f"{opts.mask or 'union of voxels above %g x each map maximum' % opts.mask_threshold}: "
                  f"{m} of {n_vox} voxels ({100 * m / n_vox:.1f} %)"],
         ["volume PCs", L], ["clustering", f"agglomerative, {opts.linkage} linkage, {opts.metric} metric, "
                                           f"{len(result.cluster_volume_counts)} clusters"],
         ["MLP training pairs", f"{len(result.sketch.indices)} sketch maps + {result.n_mlp_extra} more decoded maps "
                                f"(3:1 train/validation split)"],
         ["seed", opts.seed]],
    )
    variance = Table(["PC", "fraction of variance", "cumulative"],
                     [[i + 1, float(r), float(c)] for i, (r, c) in
                      enumerate(zip(pca.explained_variance_ratio, np.cumsum(pca.explained_variance_ratio)))])
    width = max(2, len(str(len(result.cluster_volume_counts) - 1)))
    cluster_rows = []
    links = []
    for c, (nv, npart) in enumerate(zip(result.cluster_volume_counts, result.cluster_particle_counts)):
        cluster_rows.append([c, int(nv), int(npart), f"{100 * npart / N:.1f} %"])
        links.append((f"clusters/cluster_{c:0{width}d}.mrc", f"cluster {c} mean map"))
        links.append((f"clusters/cluster_{c:0{width}d}.ind.pkl", f"cluster {c} particles (run order)"))
    pc_links = [(p.relative_to(out).as_posix(), p.name) for p in result.paths.get("eigenvolumes", [])]
    for i, paths in sorted(result.paths.get("traversals", {}).items()):
        pc_links.append((f"pca/pc{i + 1}/", f"maps along PC{i + 1} ({len(paths)} maps, values in pc_values.txt)"))
    r2 = ", ".join(f"PC{i + 1} {r:.3f}" for i, r in enumerate(result.mlp.val_r2[: min(L, 5)]))
    sections = [
        Section("Summary", [
            "The ensemble of maps of the trained model is summarised in volume space (thesis chapter 6): "
            "maps are decoded at the on-data latents nearest k-means centres (the sketch), masked, analysed "
            "by PCA and clustered; a small MLP maps every particle's latent to the volume PCs."],
            tables=[settings], links=[("summary.yaml", "all numbers (summary.yaml)"), ("mask.mrc", "mask"),
                                      ("mean.mrc", "mean sketch map")]),
        Section("Volume PCA", [
            "Principal components of the masked sketch maps. The maps along each PC are the mean map plus the "
            "eigenvolume times the 5th to 95th percentile of the sketch's scores."],
            figures=fig("explained_variance", "explained variance") + fig("sketch_pcs", "sketch maps by cluster")
            + fig("pc_traversals", "maps along the PCs")
            + sum((fig(f"pc{i + 1}_map_views", f"maps along PC{i + 1}: isosurfaces at one level (pca/pc{i + 1}/maps.cxc "
                       "opens them in ChimeraX) and central slices") for i in range(L)), []),
            tables=[variance], links=pc_links),
        Section("Clusters", [
            "Agglomerative clustering of the masked sketch maps; each particle belongs to the cluster of its "
            "sketch map. Clusters are numbered by particle count. Select a cluster's original particles with "
            "cryoscape select RUN --labels cluster_labels.pkl --cluster C -o cluster_C.star."],
            figures=fig("cluster_counts", "cluster sizes") + fig("cluster_maps", "cluster mean maps (projections)")
            + fig("cluster_map_views", "cluster mean maps: isosurfaces at one level (clusters/maps.cxc opens them in "
                                       "ChimeraX) and central slices"),
            tables=[Table(["cluster", "sketch maps", "particles", "share"], cluster_rows)],
            links=[("cluster_labels.pkl", "cluster of every particle")] + links),
        Section("Conformational landscape", [
            f"Every particle placed in volume-PC space by the MLP (held-out R²: {r2}). The density shows "
            "which conformations the particles populate; the axes are interpretable through the maps along "
            "each PC."],
            figures=fig("landscape", "landscape of all particles") + fig("mlp_validation", "MLP on held-out maps"),
            links=[("landscape_pcs.npy", "landscape coordinates of every particle"), ("mlp.pt", "the MLP")]),
    ]
    subtitle = f"{result.run_dir}, epoch {result.epoch}" if result.run_dir is not None else str(out)
    return write_html_report(out / "report.html", title="cryoscape landscape", subtitle=subtitle, sections=sections)


def run_landscape(
    run_dir: str | os.PathLike,
    *,
    epoch: int | None = None,
    out_dir: str | os.PathLike | None = None,
    options: LandscapeOptions | None = None,
    device: Any = "cpu",
    progress: bool = True,
) -> LandscapeResult:
    """Landscape analysis of a run, its figures and ``report.html`` (default folder ``RUN/landscape.EPOCH``)."""
    from cryoscape.io.run_folder import attach_log_file, detach_log_file, write_config

    opts = options or LandscapeOptions()
    opts.validate()
    if out_dir is None:  # RUN/landscape.EPOCH: the epoch is the checkpoint's
        from cryoscape.train.checkpoint import find_checkpoint, load_checkpoint

        e = int(load_checkpoint(find_checkpoint(run_dir, epoch))["epoch"])
        out_dir = Path(run_dir) / f"landscape.{e}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, "landscape", {"run": os.fspath(run_dir), "epoch": epoch, **vars(opts)})
    handler = attach_log_file(out / "landscape.log")
    try:
        result = landscape_from_run(run_dir, epoch=epoch, out_dir=out, options=opts, device=device,
                                    progress=progress)
        figures = plot_landscape(result, out)
        result.paths["report"] = write_landscape_report(result, figures=figures)
        log.info("landscape report: %s", result.paths["report"])
    finally:
        detach_log_file(handler)
    return result
