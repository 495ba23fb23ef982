"""``cryoscape select`` as a pipeline: the interactive lasso, the selection, and a picture of it.

The lasso (:func:`draw_polygon`) opens a matplotlib window on the 2-D embedding; the user
encircles particles and closes the window.  It needs a display and an interactive matplotlib
backend; without one it stops with a message saying how to pass a polygon file instead.  The
drawn polygon is saved next to the output (``<name>.polygon.txt``) so the selection can be
repeated with ``--polygon``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cryoscape.analysis.selection import (
    Selection,
    load_embedding,
    pca_embedding,
    read_run_latents,
    select_from_run,
    write_polygon,
)
from cryoscape.errors import InputError

__all__ = ["LassoSession", "display_available", "draw_polygon", "plot_selection", "run_select"]

log = logging.getLogger(__name__)

_NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}


def display_available() -> tuple[bool, str]:
    """Whether an interactive matplotlib window can open: ``(ok, reason when not)``."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display is available (DISPLAY is not set)"
    import matplotlib

    backend = str(matplotlib.get_backend()).lower()
    if backend in _NON_INTERACTIVE or "inline" in backend:
        return False, f"matplotlib's backend '{backend}' cannot open windows"
    return True, ""


class LassoSession:
    """A lasso on a scatter plot of ``points``; :attr:`vertices` holds the last loop drawn.

    Parameters
    ----------
    figure
        The matplotlib figure to draw in (a pyplot figure for a window; any figure in tests).
    points
        ``(N, 2)`` embedding.
    axis_label
        Prefix of the axis labels (``PC`` gives ``PC1``, ``PC2``).
    """

    def __init__(self, figure, points: np.ndarray, *, axis_label: str = "PC"):
        from matplotlib.widgets import LassoSelector

        self.points = np.asarray(points, dtype=np.float64)
        self.vertices: np.ndarray | None = None
        self.axes = figure.add_subplot(1, 1, 1)
        self.scatter = self.axes.scatter(self.points[:, 0], self.points[:, 1], s=2, c="0.4", alpha=0.5,
                                         rasterized=True)
        self.axes.set_xlabel(f"{axis_label}1")
        self.axes.set_ylabel(f"{axis_label}2")
        self.axes.set_title("draw a loop around the particles to select; close the window when done",
                            fontsize="small")
        self.selector = LassoSelector(self.axes, onselect=self.on_select)

    def on_select(self, vertices) -> None:
        """Keep the loop and colour the points inside it."""
        from matplotlib.path import Path as PolygonPath

        self.vertices = np.asarray(vertices, dtype=np.float64)
        inside = PolygonPath(self.vertices).contains_points(self.points)
        colours = np.where(inside[:, None], np.array([[0.84, 0.15, 0.16, 1.0]]), np.array([[0.4, 0.4, 0.4, 0.5]]))
        self.scatter.set_facecolors(colours)
        self.axes.set_title(f"{int(inside.sum())} of {len(self.points)} particles inside; close the window to "
                            "accept, or draw again", fontsize="small")
        self.axes.figure.canvas.draw_idle()


def _require_display() -> None:
    ok, reason = display_available()
    if not ok:
        raise InputError(f"--interactive needs a window but {reason}; run it on a desktop (or with ssh -X), or "
                         "write the polygon's vertices (one 'x y' a line, in the embedding's coordinates) to a file "
                         "and pass --polygon FILE.")


def draw_polygon(points: np.ndarray, *, axis_label: str = "PC") -> np.ndarray:
    """Open a window with the embedding and return the ``(M, 2)`` loop the user drew.

    Raises
    ------
    InputError
        No display / no interactive backend, or the window was closed without drawing.
    """
    _require_display()
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(7, 6))
    session = LassoSession(figure, points, axis_label=axis_label)
    plt.show()
    plt.close(figure)
    if session.vertices is None or len(session.vertices) < 3:
        raise InputError("the lasso window was closed without a loop; draw around the particles before closing it.")
    return session.vertices


def plot_selection(points: np.ndarray, selected: np.ndarray, path: str | os.PathLike, *,
                   axis_label: str = "PC", polygon: np.ndarray | None = None, title: str = "") -> Path:
    """Scatter of the embedding with the selected positions highlighted (PNG at ``path``)."""
    from matplotlib.figure import Figure

    from cryoscape.io.writers import atomic_write

    points = np.asarray(points, dtype=np.float64)
    mask = np.zeros(len(points), dtype=bool)
    mask[np.asarray(selected, dtype=np.int64)] = True
    fig = Figure(figsize=(5.2, 4.4), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(points[~mask, 0], points[~mask, 1], s=2, c="0.65", alpha=0.5, rasterized=True,
               label=f"not selected ({int((~mask).sum())})")
    ax.scatter(points[mask, 0], points[mask, 1], s=2, c="tab:red", alpha=0.7, rasterized=True,
               label=f"selected ({int(mask.sum())})")
    if polygon is not None:
        closed = np.concatenate([polygon, polygon[:1]])
        ax.plot(closed[:, 0], closed[:, 1], color="k", linewidth=0.8)
    ax.set_xlabel(f"{axis_label}1")
    ax.set_ylabel(f"{axis_label}2")
    if title:
        ax.set_title(title, fontsize="small")
    ax.legend(fontsize="small", markerscale=4, loc="best")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def run_select(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    interactive: bool = False,
    embedding: str = "pc",
    epoch: int | None = None,
    plot: bool = True,
    seed: int = 0,
    **options: Any,
) -> Selection:
    """Everything ``cryoscape select`` does: lasso (if asked), selection, files, and a PNG.

    ``options`` are the keyword arguments of
    :func:`cryoscape.analysis.selection.select_from_run` (``particles``, ``datadir``,
    ``train_ind``) and of :func:`cryoscape.analysis.selection.choose_particles` (the criterion).
    The PNG ``<out stem>.png`` shows the selection in the embedding (the first two principal
    components of the latents unless a polygon was drawn in another embedding).
    """
    out = Path(out)
    if interactive:
        if options.get("polygon") is not None:
            raise InputError("pass either --interactive or --polygon, not both.")
        _require_display()  # before the (possibly slow) embedding is computed
        z = read_run_latents(run_dir, epoch=epoch).z
        points, label = load_embedding(embedding, z, seed=seed)
        vertices = draw_polygon(points, axis_label=label)
        polygon_path = out.with_suffix(".polygon.txt")
        write_polygon(polygon_path, vertices, comment=f"drawn in the {embedding} embedding of {run_dir}")
        log.info("saved the drawn polygon to %s (repeat with --polygon %s --embedding %s)", polygon_path,
                 polygon_path, embedding)
        options["polygon"] = vertices
        embedding = points  # type: ignore[assignment]
    drawn_label = label if interactive else ""
    selection = select_from_run(run_dir, out, epoch=epoch, embedding=embedding, seed=seed, **options)
    if drawn_label:
        selection.embedding_label = drawn_label
    if plot:
        if selection.embedding is not None:
            points, label = selection.embedding, selection.embedding_label or "embedding"
        else:
            points, label = pca_embedding(read_run_latents(run_dir, epoch=epoch).z, 2)[0], "PC"
        png = out.with_suffix(".png") if out.suffix.lower() != ".png" else out.with_suffix(".selection.png")
        plot_selection(points, selection.positions, png, axis_label=label, polygon=selection.polygon,
                       title=f"{len(selection.positions)} of {selection.n_particles}: {selection.description}")
        selection.paths["plot"] = png
    return selection
