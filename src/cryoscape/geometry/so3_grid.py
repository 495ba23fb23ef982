"""Multi-resolution grids on SO(3) and on in-plane shifts, for hierarchical pose search.

SO(3) grid (tested in tests/geometry/test_so3_grid.py)
-------------------------------------------------------
SO(3) is sampled as a product of a HEALPix grid on the sphere of viewing directions and a
regular grid of in-plane angles on each fibre of the Hopf fibration SO(3) -> S^2.  Level ``L``
has

* ``nside = base_nside * 2**L`` HEALPix, ``12 nside^2`` directions, NESTED ordering, so that the
  children of pixel ``p`` at level ``L + 1`` are ``4p, 4p+1, 4p+2, 4p+3``;
* ``n_psi = base_n_psi * 2**L`` in-plane angles ``psi_j = (j + 1/2) 2 pi / n_psi``, so that the
  children of ``j`` are ``2j, 2j+1`` and lie inside ``j``'s interval;
* ``12 nside^2 n_psi`` rotations; each has the id ``(pixel, psi index)`` and 8 children.

Spacing: the directions are about ``sqrt(4 pi / (12 nside^2))`` radians apart (58.6 / nside
degrees) and the in-plane angles ``360 / n_psi`` degrees.  With the defaults
(``base_nside=2, base_n_psi=12``):

=====  =====  =====  ==========  ==============
level  nside  n_psi  rotations   spacing (deg)
=====  =====  =====  ==========  ==============
0      2      12     576         30
1      4      24     4 608       15  (cryoDRGN2's default base grid)
2      8      48     36 864      7.5
3      16     96     294 912     3.75
=====  =====  =====  ==========  ==============

Start a search at level 1 for a 15-degree base grid, or at level 2 for 7.5 degrees.

From an id to a rotation.  With the pose convention of :mod:`cryoscape.geometry.rotations`
(a volume point ``X`` appears at image point ``(R X)_xy``; the viewing direction is the third row
of ``R``, ``R^T e_z``), the grid point ``(p, j)`` at level ``L`` is

    R = Rz(psi_j) T_p,

where ``Rz`` is the passive in-plane rotation and ``T_p`` is a *frame* of pixel ``p``: a rotation
with ``T_p^T e_z = d_p``, the HEALPix centre of ``p`` at colatitude ``theta`` and longitude
``phi``.  So the viewing direction of every grid point is exactly its pixel centre.  At level 0,
``T_p = Ry(theta) Rz(phi)``, i.e. the grid point is RELION's ``(rot, tilt, psi) = (phi, theta,
psi_j)``.  At finer levels a child pixel's frame is its parent's frame carried along the great
circle from the parent's centre to the child's centre, ``T_c = T_parent G``, with ``G`` the
smallest rotation taking ``d_c`` to ``d_parent``.  A plain Euler section (``psi`` measured from
the ``rot``/``phi`` meridian at every level) twists the in-plane angle by ``dphi cos(theta)``
between a pixel and its children, which near the poles moves children out of their parent's cell;
carrying the frame has no such twist, so children stay within about half a parent spacing of
their parent (tested), and the nearest fine grid point of any rotation descends from one of its
few (<= 4) nearest coarse points: a search that keeps the best few points and subdivides them
does not lose the optimum.  (With the plain Euler section about 3% of rotations need more than
their 3 nearest coarse points; with carried frames 0.1-0.2%.)  The ``psi`` samples on each fibre are equally spaced, and HEALPix pixels
have equal area, so every grid cell has the same Haar measure.

Translation grid
----------------
``translation_grid(extent, n)`` is ``n x n`` shifts ``(x, y)`` in pixels, the centres of ``n``
equal cells spanning ``[-extent, extent]`` on each axis (spacing ``2 extent / n``; 0 is on the
grid for odd ``n``).  ``translation_grid_children(centres, extent_pixel=extent, n)`` puts the same
grid, at half the extent and so twice the resolution, around each centre.
"""

from __future__ import annotations

import math

import healpy
import numpy as np
import torch

from cryoscape.geometry.rotations import euler_relion_to_matrix, rotvec_to_matrix

__all__ = [
    "so3_grid_resolution",
    "so3_grid_size",
    "base_grid_spacing_deg",
    "so3_grid",
    "so3_grid_rotations",
    "so3_grid_children",
    "locate_in_so3_grid",
    "translation_grid",
    "translation_grid_children",
]

DEFAULT_BASE_NSIDE = 2
DEFAULT_BASE_N_PSI = 12


def _check_level(level: int, base_nside: int, base_n_psi: int) -> None:
    if int(level) != level or level < 0:
        raise ValueError(f"level must be a non-negative integer, got {level}")
    if base_nside < 1 or base_nside & (base_nside - 1):
        raise ValueError(f"base_nside must be a power of 2 (NESTED HEALPix), got {base_nside}")
    if base_n_psi < 1:
        raise ValueError(f"base_n_psi must be positive, got {base_n_psi}")


def so3_grid_resolution(
    level: int, *, base_nside: int = DEFAULT_BASE_NSIDE, base_n_psi: int = DEFAULT_BASE_N_PSI
) -> tuple[int, int]:
    """``(nside, n_psi)`` of the SO(3) grid at ``level``: ``(base_nside 2^L, base_n_psi 2^L)``."""
    _check_level(level, base_nside, base_n_psi)
    return base_nside << level, base_n_psi << level


def so3_grid_size(
    level: int, *, base_nside: int = DEFAULT_BASE_NSIDE, base_n_psi: int = DEFAULT_BASE_N_PSI
) -> int:
    """Number of rotations at ``level``: ``12 nside^2 n_psi`` (576 at level 0 with the defaults)."""
    nside, n_psi = so3_grid_resolution(level, base_nside=base_nside, base_n_psi=base_n_psi)
    return 12 * nside * nside * n_psi


def base_grid_spacing_deg(
    level: int, *, base_nside: int = DEFAULT_BASE_NSIDE, base_n_psi: int = DEFAULT_BASE_N_PSI
) -> float:
    """Approximate angular spacing of the grid at ``level`` in degrees.

    The larger of the direction spacing ``sqrt(4 pi / (12 nside^2))`` and the in-plane spacing
    ``360 / n_psi``: 30, 15, 7.5, ... degrees for levels 0, 1, 2, ... with the defaults.
    """
    nside, n_psi = so3_grid_resolution(level, base_nside=base_nside, base_n_psi=base_n_psi)
    direction = math.degrees(math.sqrt(4 * math.pi / (12 * nside * nside)))
    return max(direction, 360.0 / n_psi)


# ----------------------------------------------------------------------------------------------
# pixel frames
# ----------------------------------------------------------------------------------------------
def _pixel_directions(nside: int, pixels: np.ndarray) -> torch.Tensor:
    """``(..., 3)`` float64 unit vectors of NESTED HEALPix pixel centres."""
    x, y, z = healpy.pix2vec(nside, pixels, nest=True)
    return torch.from_numpy(np.stack([np.asarray(x), np.asarray(y), np.asarray(z)], axis=-1))


def _rotation_taking(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest active rotation ``G`` with ``G a = b`` for unit vectors (not antipodal)."""
    axis = torch.cross(a, b, dim=-1)
    sin = axis.norm(dim=-1)
    cos = (a * b).sum(-1)
    angle = torch.atan2(sin, cos)
    scale = torch.where(sin > 1e-300, angle / sin.clamp_min(1e-300), torch.ones_like(sin))
    return rotvec_to_matrix(axis * scale[..., None])


def _pixel_frames(pixels: np.ndarray, level: int, base_nside: int) -> torch.Tensor:
    """``(..., 3, 3)`` float64 frames ``T_p`` of NESTED pixels at ``level`` (module docstring)."""
    pixels = np.asarray(pixels, dtype=np.int64)
    unique, inverse = np.unique(pixels.reshape(-1), return_inverse=True)
    frames = _unique_pixel_frames(unique, level, base_nside)
    return frames[torch.from_numpy(inverse.reshape(-1))].reshape(*pixels.shape, 3, 3)


def _unique_pixel_frames(pixels: np.ndarray, level: int, base_nside: int) -> torch.Tensor:
    base = pixels >> (2 * level)
    theta, phi = healpy.pix2ang(base_nside, base, nest=True)
    zeros = np.zeros_like(np.asarray(theta, dtype=np.float64))
    eulers = np.stack([np.degrees(phi), np.degrees(theta), zeros], axis=-1)
    frames = euler_relion_to_matrix(torch.from_numpy(eulers))
    for lev in range(1, level + 1):
        child = pixels >> (2 * (level - lev))
        parent = child >> 2
        d_child = _pixel_directions(base_nside << lev, child)
        d_parent = _pixel_directions(base_nside << (lev - 1), parent)
        frames = frames @ _rotation_taking(d_child, d_parent)
    return frames


def _in_plane(psi: torch.Tensor) -> torch.Tensor:
    """Passive ``Rz(psi)``, float64."""
    c, s = torch.cos(psi), torch.sin(psi)
    o, z = torch.ones_like(psi), torch.zeros_like(psi)
    return torch.stack([c, s, z, -s, c, z, z, z, o], dim=-1).reshape(*psi.shape, 3, 3)


# ----------------------------------------------------------------------------------------------
# public SO(3) grid
# ----------------------------------------------------------------------------------------------
def so3_grid_rotations(
    ids: torch.Tensor,
    level: int,
    *,
    base_nside: int = DEFAULT_BASE_NSIDE,
    base_n_psi: int = DEFAULT_BASE_N_PSI,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rotations of grid points.

    Parameters
    ----------
    ids
        ``(..., 2)`` integer ids ``(pixel, psi index)`` at ``level``.
    level
        Grid level (see the module docstring for the resolution of each level).
    base_nside, base_n_psi
        Resolution of level 0.
    dtype, device
        Of the result; ``device`` defaults to that of ``ids``.

    Returns
    -------
    ``(..., 3, 3)`` pose matrices ``R = Rz(psi_j) T_p``; the third row of ``R`` is the pixel's
    centre direction.
    """
    nside, n_psi = so3_grid_resolution(level, base_nside=base_nside, base_n_psi=base_n_psi)
    ids = torch.as_tensor(ids)
    if ids.shape[-1:] != (2,):
        raise ValueError(f"ids must have shape (..., 2), got {tuple(ids.shape)}")
    device = ids.device if device is None else device
    ids_np = ids.detach().cpu().numpy().astype(np.int64)
    pixels, psi_index = ids_np[..., 0], ids_np[..., 1]
    if pixels.size and (pixels.min() < 0 or pixels.max() >= 12 * nside * nside):
        raise ValueError(f"pixel ids must lie in [0, {12 * nside * nside}) at level {level}")
    if psi_index.size and (psi_index.min() < 0 or psi_index.max() >= n_psi):
        raise ValueError(f"psi ids must lie in [0, {n_psi}) at level {level}")
    frames = _pixel_frames(pixels, level, base_nside)
    psi = (torch.from_numpy(psi_index).to(torch.float64) + 0.5) * (2 * math.pi / n_psi)
    return (_in_plane(psi) @ frames).to(dtype=dtype, device=device)


def so3_grid(
    level: int,
    *,
    base_nside: int = DEFAULT_BASE_NSIDE,
    base_n_psi: int = DEFAULT_BASE_N_PSI,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole SO(3) grid at ``level``.

    Returns
    -------
    rotations
        ``(M, 3, 3)`` pose matrices, ``M = 12 nside^2 n_psi``.
    ids
        ``(M, 2)`` int64 ``(pixel, psi index)``, pixel-major: row ``p * n_psi + j`` is ``(p, j)``.
    """
    nside, n_psi = so3_grid_resolution(level, base_nside=base_nside, base_n_psi=base_n_psi)
    pixels = torch.arange(12 * nside * nside, dtype=torch.int64)
    psis = torch.arange(n_psi, dtype=torch.int64)
    ids = torch.stack(torch.meshgrid(pixels, psis, indexing="ij"), dim=-1).reshape(-1, 2)
    rotations = so3_grid_rotations(
        ids, level, base_nside=base_nside, base_n_psi=base_n_psi, dtype=dtype, device=device
    )
    return rotations, ids.to(device=device)


def so3_grid_children(ids: torch.Tensor) -> torch.Tensor:
    """Ids at level ``L + 1`` of the 8 children of ids at level ``L``.

    Parameters
    ----------
    ids
        ``(..., 2)`` integer ``(pixel, psi index)``.

    Returns
    -------
    ``(..., 8, 2)``: pixels ``4p .. 4p+3`` (major) times psi indices ``2j, 2j+1`` (minor).
    Flatten with ``.flatten(-3, -2)`` to get a list of candidates.
    """
    ids = torch.as_tensor(ids)
    pix = ids[..., 0, None, None] * 4 + torch.arange(4, device=ids.device)[:, None]
    psi = ids[..., 1, None, None] * 2 + torch.arange(2, device=ids.device)[None, :]
    pix, psi = torch.broadcast_tensors(pix, psi)
    return torch.stack([pix, psi], dim=-1).reshape(*ids.shape[:-1], 8, 2)


def locate_in_so3_grid(
    rotations: torch.Tensor,
    level: int,
    *,
    base_nside: int = DEFAULT_BASE_NSIDE,
    base_n_psi: int = DEFAULT_BASE_N_PSI,
) -> torch.Tensor:
    """Id of the grid cell that contains each rotation (not always the nearest grid point).

    The pixel is the HEALPix pixel of the viewing direction ``R^T e_z``.  The in-plane angle is
    read after carrying the pixel's frame to that direction along the great circle; it is found
    level by level, choosing at each level the nearer of the two in-plane children of the
    previous level's index, so the id at level ``L + 1`` is always a child of the id at level
    ``L``, and a grid point is located at its own id.

    Parameters
    ----------
    rotations
        ``(..., 3, 3)`` pose matrices.

    Returns
    -------
    ``(..., 2)`` int64 ids ``(pixel, psi index)`` at ``level``, on the device of ``rotations``.
    """
    nside, _ = so3_grid_resolution(level, base_nside=base_nside, base_n_psi=base_n_psi)
    R = torch.as_tensor(rotations)
    R64 = R.detach().to(device="cpu", dtype=torch.float64)
    direction = R64[..., 2, :]
    direction = direction / direction.norm(dim=-1, keepdim=True)
    d = direction.numpy()
    finest = np.asarray(healpy.vec2pix(nside, d[..., 0], d[..., 1], d[..., 2], nest=True), dtype=np.int64)
    psi_index = None
    for lev in range(level + 1):
        pixels = finest >> (2 * (level - lev))
        n_psi = base_n_psi << lev
        step = 2 * math.pi / n_psi
        frames = _pixel_frames(pixels, lev, base_nside)
        frames_here = frames @ _rotation_taking(direction, _pixel_directions(base_nside << lev, pixels))
        M = R64 @ frames_here.transpose(-1, -2)  # = Rz(psi), passive
        psi = torch.remainder(torch.atan2(M[..., 0, 1], M[..., 0, 0]), 2 * math.pi)
        if psi_index is None:
            psi_index = torch.floor(psi / step).to(torch.int64).clamp_(0, n_psi - 1)
            continue
        first = 2 * psi_index
        candidates = torch.stack([first, first + 1], dim=-1)
        offset = psi[..., None] - (candidates.to(torch.float64) + 0.5) * step
        circular = torch.remainder(offset + math.pi, 2 * math.pi) - math.pi
        psi_index = torch.gather(candidates, -1, circular.abs().argmin(dim=-1, keepdim=True))[..., 0]
    ids = torch.stack([torch.from_numpy(finest), psi_index], dim=-1)
    return ids.to(R.device)


# ----------------------------------------------------------------------------------------------
# translations
# ----------------------------------------------------------------------------------------------
def translation_grid(
    extent_pixel: float,
    n_per_axis: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(n_per_axis^2, 2)`` shifts ``(x, y)`` in pixels: cell centres of ``[-extent, extent]^2``.

    Along each axis the points are ``(i - (n - 1)/2) * 2 extent / n`` for ``i = 0 .. n-1``
    (spacing ``2 extent / n``, symmetric about 0, containing 0 for odd ``n``).  Row
    ``iy * n + ix`` holds ``(x_ix, y_iy)``.
    """
    if n_per_axis < 1:
        raise ValueError(f"n_per_axis must be positive, got {n_per_axis}")
    if extent_pixel < 0:
        raise ValueError(f"extent_pixel must be non-negative, got {extent_pixel}")
    step = 2.0 * extent_pixel / n_per_axis
    coords = (torch.arange(n_per_axis, dtype=torch.float64) - (n_per_axis - 1) / 2) * step
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2).to(dtype=dtype, device=device)


def translation_grid_children(
    centres: torch.Tensor, *, extent_pixel: float, n_per_axis: int
) -> torch.Tensor:
    """Local refinement grids: ``translation_grid(extent_pixel / 2, n_per_axis)`` around each centre.

    Parameters
    ----------
    centres
        ``(..., 2)`` shifts ``(x, y)`` in pixels, e.g. the best shifts found on the coarser grid.
    extent_pixel
        Extent of the *coarser* grid; the children span half of it (twice the resolution).  For
        the next refinement pass ``extent_pixel / 2``.
    n_per_axis
        Points per axis, as in the coarser grid.

    Returns
    -------
    ``(..., n_per_axis^2, 2)`` shifts, dtype and device of ``centres``.
    """
    centres = torch.as_tensor(centres)
    if not centres.is_floating_point():
        centres = centres.to(torch.get_default_dtype())
    offsets = translation_grid(extent_pixel / 2, n_per_axis, dtype=centres.dtype, device=centres.device)
    return centres[..., None, :] + offsets
