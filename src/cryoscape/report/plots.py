"""Plots of latent analyses (matplotlib, written to PNG files).

Every function draws one figure into a file and closes it.  The non-interactive ``Agg`` canvas
is created explicitly per figure (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), so these
functions never touch pyplot's global state or the user's chosen backend, work without a
display, and importing this module has no side effects.

Large datasets: scatter plots draw at most ``max_points`` (50k) particles, drawn at random
with a fixed seed (the density is shown faithfully by the hexbin plots, which use every
particle); points are rasterised so that a PNG of 500k points stays fast to write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "plot_latent_histogram",
    "plot_scatter",
    "plot_hexbin",
    "plot_joint",
    "plot_latent_marginals",
    "plot_explained_variance",
    "plot_learning_curve",
    "plot_cluster_sizes",
    "plot_map_projections",
    "plot_trajectory",
    "plot_traversal_positions",
]

MAX_POINTS = 50_000


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    from cryoscape.io.writers import atomic_write

    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def _subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _marker_size(n: int) -> float:
    return float(np.clip(8000.0 / max(n, 1), 0.3, 15.0))


def _cluster_colors(k: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def plot_latent_histogram(values: np.ndarray, path: str | os.PathLike, *, labels: np.ndarray | None = None,
                          marks: np.ndarray | None = None, mark_labels: Sequence[str] | None = None,
                          xlabel: str = "z", title: str = "", bins: int = 100) -> Path:
    """Histogram of a 1-D latent (zdim 1, or one PC); stacked by cluster when ``labels`` are given.

    ``marks`` are positions drawn as vertical lines (e.g. on-data centres, traversal points).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    fig = _figure(6, 3.6)
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(values, bins=bins)
    if labels is not None:
        k = int(labels.max()) + 1
        colors = _cluster_colors(k)
        ax.hist([values[labels == c] for c in range(k)], bins=edges, stacked=True, color=colors,
                label=[f"cluster {c}" for c in range(k)])
        if k <= 12:
            ax.legend(fontsize=7, ncols=2)
    else:
        ax.hist(values, bins=edges, color="C0")
    if marks is not None:
        for i, m in enumerate(np.ravel(marks)):
            ax.axvline(m, color="k", lw=0.8, ls="--")
            if mark_labels is not None:
                ax.annotate(mark_labels[i], (m, 1), xycoords=("data", "axes fraction"), fontsize=7,
                            ha="center", va="bottom")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("particles")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_scatter(xy: np.ndarray, path: str | os.PathLike, *, labels: np.ndarray | None = None,
                 centers: np.ndarray | None = None, xlabel: str = "", ylabel: str = "", title: str = "",
                 max_points: int = MAX_POINTS) -> Path:
    """2-D scatter of particles, coloured by cluster ``labels`` when given.

    ``centers`` ``(k, 2)`` are marked and numbered (cluster ``i`` at row ``i``).
    """
    xy = np.asarray(xy, dtype=np.float64)
    idx = _subsample(xy.shape[0], max_points)
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    s = _marker_size(idx.size)
    if labels is not None:
        k = int(labels.max()) + 1
        colors = np.asarray(_cluster_colors(k))
        ax.scatter(xy[idx, 0], xy[idx, 1], s=s, c=colors[labels[idx]], linewidths=0, rasterized=True)
    else:
        ax.scatter(xy[idx, 0], xy[idx, 1], s=s, c="C0", alpha=0.5, linewidths=0, rasterized=True)
    if centers is not None:
        centers = np.asarray(centers, dtype=np.float64)
        ax.scatter(centers[:, 0], centers[:, 1], s=30, c="k", marker="x", linewidths=1.2)
        for i, (x, y) in enumerate(centers):
            ax.annotate(str(i), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=8,
                        fontweight="bold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    note = f" ({idx.size} of {xy.shape[0]} shown)" if idx.size < xy.shape[0] else ""
    if title or note:
        ax.set_title(title + note, fontsize=10)
    return _save(fig, path)


def plot_hexbin(xy: np.ndarray, path: str | os.PathLike, *, xlabel: str = "", ylabel: str = "",
                title: str = "", gridsize: int = 50) -> Path:
    """Density of particles as hexagonal bins (log colour scale), every particle counted."""
    xy = np.asarray(xy, dtype=np.float64)
    fig = _figure(5.6, 4.6)
    ax = fig.add_subplot()
    hb = ax.hexbin(xy[:, 0], xy[:, 1], gridsize=gridsize, bins="log", cmap="viridis", mincnt=1, linewidths=0)
    fig.colorbar(hb, ax=ax, label="particles")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_joint(xy: np.ndarray, path: str | os.PathLike, *, xlabel: str = "", ylabel: str = "", title: str = "",
               gridsize: int = 50, bins: int = 80) -> Path:
    """Hexbin density of two coordinates with their marginal histograms above and to the right."""
    xy = np.asarray(xy, dtype=np.float64)
    fig = _figure(5.6, 5.6)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4))
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    ax.hexbin(xy[:, 0], xy[:, 1], gridsize=gridsize, bins="log", cmap="viridis", mincnt=1, linewidths=0)
    top.hist(xy[:, 0], bins=bins, color="C0")
    right.hist(xy[:, 1], bins=bins, color="C0", orientation="horizontal")
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    top.set_ylabel("particles", fontsize=8)
    right.set_xlabel("particles", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        top.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_latent_marginals(z: np.ndarray, path: str | os.PathLike, *, prefix: str = "z",
                          max_points: int = 5_000) -> Path:
    """Distribution of every latent coordinate (or PC) as one violin each, side by side.

    The kernel density estimates use at most ``max_points`` particles drawn at random.
    """
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    d = z.shape[1]
    sample = z[_subsample(z.shape[0], max_points)]
    fig = _figure(max(4.0, 0.55 * d + 1.5), 3.4)
    ax = fig.add_subplot()
    parts = ax.violinplot([sample[:, j] for j in range(d)], positions=np.arange(1, d + 1), showmedians=True,
                          showextrema=False, widths=0.8)
    for body in parts["bodies"]:
        body.set_alpha(0.6)
    ax.set_xticks(np.arange(1, d + 1), [f"{prefix}{j + 1}" for j in range(d)])
    ax.set_ylabel("value")
    return _save(fig, path)


def plot_explained_variance(ratio: np.ndarray, path: str | os.PathLike) -> Path:
    """Bar chart of the fraction of latent variance per PC, with the cumulative fraction."""
    ratio = np.asarray(ratio, dtype=np.float64)
    x = np.arange(1, ratio.size + 1)
    fig = _figure(5, 3.4)
    ax = fig.add_subplot()
    ax.bar(x, ratio, color="C0", label="per PC")
    ax.plot(x, np.cumsum(ratio), "o-", color="C1", ms=3, label="cumulative")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(x)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_learning_curve(history: Sequence[dict[str, Any]], path: str | os.PathLike, *,
                        mark_epoch: int | None = None) -> Path:
    """Training loss per epoch (and its squared-error and KL parts when recorded).

    ``mark_epoch`` (0-based) is drawn as a vertical line: the epoch being analysed.
    """
    epochs = np.array([h.get("epoch", i) for i, h in enumerate(history)], dtype=np.float64)
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    ax.plot(epochs, [h["loss"] for h in history], "o-", color="C0", ms=3, label="loss")
    if any("error" in h for h in history):
        ax.plot(epochs, [h.get("error", np.nan) for h in history], "s--", color="C1", ms=2, label="squared error")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if mark_epoch is not None:
        ax.axvline(mark_epoch, color="0.5", ls=":", lw=1, label=f"analysed (epoch {mark_epoch})")
    ax.set_xlabel("epoch (0-based)")
    ax.set_ylabel("loss")
    if any(h.get("kl", 0) for h in history):
        ax2 = ax.twinx()
        ax2.plot(epochs, [h.get("kl", np.nan) for h in history], "^:", color="C2", ms=3, label="KL")
        ax2.set_ylabel("KL divergence (nats)")
        ax2.legend(loc="upper center", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_cluster_sizes(counts: np.ndarray, path: str | os.PathLike) -> Path:
    """Bar chart of particles per cluster."""
    counts = np.asarray(counts)
    k = counts.size
    fig = _figure(max(4.0, 0.3 * k + 2), 3.2)
    ax = fig.add_subplot()
    ax.bar(np.arange(k), counts, color=_cluster_colors(k))
    ax.set_xlabel("cluster")
    ax.set_ylabel("particles")
    ax.set_xticks(np.arange(k))
    ax.tick_params(axis="x", labelsize=7)
    return _save(fig, path)


def plot_map_projections(projections: np.ndarray, path: str | os.PathLike, *, titles: Sequence[str] | None = None,
                         axis: int = 0, columns: int = 10) -> Path:
    """Montage of map projections ``(M, 3, n, n)`` (sums along z, y, x), showing the one along ``axis``.

    Each panel is scaled to its own range (so shapes, not absolute densities, are compared); the
    panels are tiled into one image, which draws much faster than one axes per map.
    """
    proj = np.asarray(projections, dtype=np.float64)[:, axis]
    m, n = proj.shape[0], proj.shape[-1]
    cols = max(1, min(columns, m))
    rows = int(np.ceil(m / cols))
    pad = max(1, n // 16)
    gap = max(pad, n // 4)  # room above each panel for its title
    tile = np.full((rows * (n + gap) + pad, cols * (n + pad) + pad), np.nan)
    corners = []
    for i in range(m):
        lo, hi = proj[i].min(), proj[i].max()
        r, c = divmod(i, cols)
        y0, x0 = gap + r * (n + gap), pad + c * (n + pad)
        corners.append((y0, x0))
        # flipped so that y increases upwards within each panel (the image is drawn top-down)
        tile[y0 : y0 + n, x0 : x0 + n] = ((proj[i] - lo) / (hi - lo) if hi > lo else 0.0)[::-1]
    fig = _figure(1.25 * cols + 0.3, 1.25 * rows * (n + gap) / n + 0.2)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["gray"].with_extremes(bad="white")
    ax.imshow(tile, cmap=cmap, vmin=0, vmax=1, interpolation="nearest", origin="upper")
    for i, (y0, x0) in enumerate(corners):
        ax.text(x0 + n / 2, y0 - gap * 0.15, titles[i] if titles is not None else str(i), ha="center", va="bottom",
                fontsize=7)
    ax.set_axis_off()
    return _save(fig, path)


def plot_trajectory(xy: np.ndarray, path_xy: np.ndarray, path: str | os.PathLike, *,
                    anchor_xy: np.ndarray | None = None, xlabel: str = "", ylabel: str = "",
                    title: str = "", max_points: int = MAX_POINTS) -> Path:
    """A trajectory ``path_xy (L, 2)`` drawn over the particles ``xy (N, 2)`` (grey).

    ``xy`` may be ``None`` (no background).  ``anchor_xy`` are marked with numbered stars.
    """
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    if xy is not None:
        xy = np.asarray(xy, dtype=np.float64)
        idx = _subsample(xy.shape[0], max_points)
        ax.scatter(xy[idx, 0], xy[idx, 1], s=_marker_size(idx.size), c="0.7", linewidths=0, rasterized=True)
    p = np.asarray(path_xy, dtype=np.float64)
    ax.plot(p[:, 0], p[:, 1], "-", color="C3", lw=1.2)
    ax.scatter(p[:, 0], p[:, 1], s=10, c=np.arange(p.shape[0]), cmap="plasma", zorder=3, linewidths=0)
    if anchor_xy is not None:
        a = np.atleast_2d(np.asarray(anchor_xy, dtype=np.float64))
        ax.scatter(a[:, 0], a[:, 1], s=80, marker="*", c="k", zorder=4)
        for i, (x, y) in enumerate(a):
            ax.annotate(str(i), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_traversal_positions(values: np.ndarray, positions: np.ndarray, path: str | os.PathLike, *,
                             xlabel: str = "", title: str = "", bins: int = 100) -> Path:
    """Histogram of the particles' coordinate with the traversal's positions marked (numbered)."""
    return plot_latent_histogram(values, path, marks=positions,
                                 mark_labels=[str(i) for i in range(len(positions))],
                                 xlabel=xlabel, title=title, bins=bins)
