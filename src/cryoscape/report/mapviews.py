"""Pictures of the maps themselves: shaded isosurfaces, central slices, and ChimeraX command files.

The HTML reports link to ``.mrc`` files that need a molecular viewer; these pictures let the report
alone show the states.  Everything is numpy/scipy/matplotlib (no OpenGL, no display):

* :func:`render_isosurface` ray-casts the surface ``volume == level``: each image pixel takes the
  first crossing of the level along the viewing ray (with linear interpolation between voxels for a
  smooth depth), shaded by the angle between the light and the surface normal, the normalised
  gradient of the density there (Lambert's law plus a little depth cueing).  The view is rotated
  about the box centre (the voxel at ``D//2``, see DESIGN.md) by ``elevation_deg`` about x and
  ``azimuth_deg`` about z; at ``(0, 0)`` the viewer looks along +z onto the x-y plane, as the
  reports' projections "along z" do.
* :func:`central_slices` are the planes through the origin voxel, ``[D//2, :, :]`` (x-y),
  ``[:, D//2, :]`` (x-z) and ``[:, :, D//2]`` (y-z).
* :func:`isosurface_level` picks one level for a set of maps (Otsu's threshold of their voxels, the
  level that best splits them into two classes, density and solvent), so the maps of a set are
  compared at the same level, in the pictures and in the ChimeraX file.
* :func:`write_chimerax_script` writes a ``.cxc`` that opens a map set as a volume series at that
  level.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["isosurface_level", "isosurface_mesh", "render_isosurface", "central_slices", "plot_map_views",
           "write_chimerax_script", "write_map_set_views"]

# ChimeraX's default map colour (light lavender), used for the shaded surfaces
SURFACE_RGB = np.array([0.70, 0.70, 1.00])


def isosurface_level(volumes: np.ndarray, *, max_voxels: int = 2_000_000, bins: int = 256) -> float:
    """One isosurface level for maps ``(..., n, n, n)``: Otsu's threshold of their voxel values.

    At most ``max_voxels`` voxels (every k-th) enter the histogram.
    """
    values = np.asarray(volumes, dtype=np.float64).ravel()
    values = values[:: max(1, values.size // max_voxels)]
    values = values[np.isfinite(values)]
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return hi
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    s0 = np.cumsum(counts * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def isosurface_mesh(volume: np.ndarray, level: float, *, step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of the surface ``volume == level`` (marching cubes, scikit-image).

    Returns ``(vertices (V, 3) as (x, y, z) voxel coordinates, faces (F, 3) vertex indices)``; both
    empty when the level lies outside the map's range.  ``step`` > 1 samples every step-th voxel
    (coarser and faster for large boxes).
    """
    from skimage.measure import marching_cubes

    v = np.asarray(volume, dtype=np.float32)
    if not float(v.min()) < level < float(v.max()):
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    verts, faces, _, _ = marching_cubes(v, level=level, step_size=max(1, int(step)), allow_degenerate=False)
    return verts[:, ::-1].astype(np.float32), faces.astype(np.int32)


def _rotated(volume: np.ndarray, elevation_deg: float, azimuth_deg: float) -> np.ndarray:
    """``volume`` resampled in the rotated frame (linear interpolation, zeros outside)."""
    from scipy.ndimage import affine_transform

    if elevation_deg == 0 and azimuth_deg == 0:
        return volume
    e, a = np.deg2rad(elevation_deg), np.deg2rad(azimuth_deg)
    # axes are (z, y, x): rotation about x mixes z and y, about z mixes y and x
    rx = np.array([[np.cos(e), -np.sin(e), 0], [np.sin(e), np.cos(e), 0], [0, 0, 1]])
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    matrix = rz @ rx
    centre = np.array(volume.shape, dtype=np.float64) // 2
    return affine_transform(volume, matrix, offset=centre - matrix @ centre, order=1, mode="constant", cval=0.0)


def render_isosurface(volume: np.ndarray, level: float, *, elevation_deg: float = 20.0,
                      azimuth_deg: float = 30.0) -> np.ndarray:
    """Shaded picture ``(n, n, 3)`` in [0, 1] of the surface ``volume == level`` (module docstring).

    ``volume`` is ``(n, n, n)`` indexed [z, y, x]; row ``i`` of the picture is ``y = i`` (draw it with
    ``origin="lower"``); pixels whose ray never reaches the level are white.
    """
    v = _rotated(np.asarray(volume, dtype=np.float32), elevation_deg, azimuth_deg)
    inside = v >= level
    hit = inside.any(axis=0)
    first = np.argmax(inside, axis=0)  # index along z of the first voxel at or above the level
    rows, cols = np.nonzero(hit)
    k = first[rows, cols]
    before = np.maximum(k - 1, 0)
    v0, v1 = v[before, rows, cols], v[k, rows, cols]
    frac = np.where((k > 0) & (v1 > v0), (level - v0) / np.where(v1 > v0, v1 - v0, 1.0), 0.0)
    depth = before + np.clip(frac, 0.0, 1.0)
    gz, gy, gx = np.gradient(v)
    normal = -np.stack([gz[k, rows, cols], gy[k, rows, cols], gx[k, rows, cols]], axis=1)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    light = np.array([-1.0, 0.45, -0.35])  # from the viewer's side (-z), a little from above left
    light /= np.linalg.norm(light)
    diffuse = np.clip(normal @ light, 0.0, 1.0)
    n = v.shape[0]
    shade = (0.22 + 0.78 * diffuse) * (1.0 - 0.35 * depth / max(n - 1, 1))
    image = np.ones(v.shape[1:] + (3,), dtype=np.float64)
    image[rows, cols] = np.clip(shade[:, None] * SURFACE_RGB[None], 0.0, 1.0)
    return image


def central_slices(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The x-y, x-z and y-z planes through the origin voxel ``D//2`` of ``volume (n, n, n)``."""
    v = np.asarray(volume)
    c = [s // 2 for s in v.shape]
    return v[c[0]], v[:, c[1], :], v[:, :, c[2]]


def _grey(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (plane - lo) / (hi - lo) if hi > lo else np.zeros_like(plane)
    return np.repeat(np.clip(scaled, 0.0, 1.0)[..., None], 3, axis=-1)


def plot_map_views(volumes: np.ndarray, path: str | os.PathLike, *, level: float | None = None,
                   titles: Sequence[str] | None = None, columns: int = 5) -> Path:
    """Gallery of maps ``(M, n, n, n)``: per map, its isosurface at ``level`` and its three central slices.

    Each map is a 2 x 2 block (surface | x-y slice / x-z slice | y-z slice); slices are grey-scaled
    to the map's own range.  ``level`` defaults to :func:`isosurface_level` of the whole set.
    """
    from cryoscape.report.plots import _figure, _save

    vols = np.asarray(volumes, dtype=np.float32)
    m, n = vols.shape[0], vols.shape[-1]
    level = isosurface_level(vols) if level is None else float(level)
    cols = max(1, min(columns, m))
    rows = int(np.ceil(m / cols))
    pad, gap = max(2, n // 8), max(4, n // 3)
    block = 2 * n + pad
    canvas = np.ones((rows * (block + gap) + pad, cols * (block + pad) + pad, 3))
    corners = []
    for i in range(m):
        r, c = divmod(i, cols)
        y0, x0 = gap + r * (block + gap), pad + c * (block + pad)
        corners.append((y0, x0))
        lo, hi = float(vols[i].min()), float(vols[i].max())
        xy, xz, yz = central_slices(vols[i])
        # each panel flipped so that its second axis increases upwards (the canvas is drawn top-down)
        panels = [render_isosurface(vols[i], level), _grey(xy, lo, hi), _grey(xz, lo, hi), _grey(yz, lo, hi)]
        for j, panel in enumerate(panels):
            py, px = y0 + (j // 2) * (n + pad), x0 + (j % 2) * (n + pad)
            canvas[py : py + n, px : px + n] = panel[::-1]
    fig = _figure(1.6 * cols + 0.3, 1.6 * rows * (block + gap) / block + 0.3)
    ax = fig.add_subplot()
    ax.imshow(canvas, interpolation="nearest", origin="upper")
    for i, (y0, x0) in enumerate(corners):
        ax.text(x0 + block / 2, y0 - gap * 0.15, titles[i] if titles is not None else str(i), ha="center",
                va="bottom", fontsize=7)
    ax.set_title(f"isosurface at {level:.3g} | central slices x-y / x-z | y-z", fontsize=8)
    ax.set_axis_off()
    return _save(fig, path)


def write_chimerax_script(path: str | os.PathLike, maps: Sequence[str | os.PathLike], *, level: float,
                          title: str = "") -> Path:
    """A ChimeraX command file that opens ``maps`` as one volume series (``#1``) at ``level``.

    Map paths are written relative to the script's folder, so the folder can be moved as a whole;
    run it from there (``cd FOLDER; chimerax maps.cxc``).  ``vseries play #1`` then plays the series.
    """
    from cryoscape.io.writers import atomic_write

    path = Path(path)
    base = path.parent.resolve()
    names = [Path(os.path.relpath(Path(p).resolve(), base)).as_posix() for p in maps]
    quoted = " ".join(f'"{name}"' if " " in name else name for name in names)
    lines = [f"# {title or 'cryoscape maps'}: {len(names)} map(s) as a volume series at level {level:.6g}",
             "# run from this folder: chimerax " + path.name + "   (then: vseries play #1 loop true)",
             f"open {quoted} format mrc vseries true" if len(names) > 1 else f"open {quoted} format mrc",
             f"volume #1 level {level:.6g} style surface",
             "view"]
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_map_set_views(paths: Sequence[str | os.PathLike], figure: str | os.PathLike, chimerax: str | os.PathLike, *,
                        titles: Sequence[str] | None = None, what: str = "") -> tuple[Path, float]:
    """Read one map set, draw :func:`plot_map_views` into ``figure`` and write its ``.cxc``; ``(figure, level)``."""
    from cryoscape.analysis.maps import read_map_set

    volumes = read_map_set([Path(p) for p in paths])
    level = isosurface_level(volumes)
    write_chimerax_script(chimerax, paths, level=level, title=what)
    return plot_map_views(volumes, figure, level=level, titles=titles), level
