"""A built-in test molecule: a helical body with a smaller domain that swings about a hinge.

The molecule is made procedurally and deterministically (a fixed seed, no downloads), one
pseudo-atom per residue at the C-alpha position:

* a **body**, an ellipsoid of semi-axes 42 x 32 x 27 angstroms packed with right-handed
  alpha helices (rise 1.5 A and 100 degrees per residue, radius 2.3 A) on a hexagonal lattice of
  10 A spacing, consecutive helices joined by short loops (~3.8 A between residues);
* a small **knob** of three helices on the body (it breaks the ellipsoid's mirror symmetries);
* a **moving domain** (about 19% of the mass), an ellipsoid of 26 x 20 x 17 A packed the same
  way, joined to the body by a linker that passes through the hinge point.

``hinge_molecule(angle_deg)`` rotates the moving domain (and the linker half on its side) by
``angle_deg`` about the hinge axis through the hinge point (``rotation_about_axis``, right-hand
rule).  Helices are chiral and the domains are placed off every axis, so the molecule has no
symmetry (poses are unique) and differs from its mirror image.  About 1400 pseudo-atoms (pairs
closer than 2.5 A are thinned), weight 1.0 each; it spans about 130 A (no atom is more than 78 A
from the origin at any angle in 0-60 degrees), so ``default_pixel_size_angstrom(64)`` = 3.906 A
gives a 250 A box that it fills to 50-60%.  Over 0-60 degrees the moving domain's centre
travels ~27 A.

Coordinates are in angstroms, ``(x, y, z)``, relative to a fixed origin (the centroid at the
middle of the default range, 30 degrees), the same for every angle, so that maps of different
angles are superposed on the body.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from cryoscape.geometry.rotations import rotation_about_axis

__all__ = [
    "HINGE_ANGLE_RANGE_DEG",
    "HINGE_EXTENT_ANGSTROM",
    "hinge_molecule",
    "hinge_axis",
    "default_pixel_size_angstrom",
]

HINGE_ANGLE_RANGE_DEG = (0.0, 60.0)
"""Default range of hinge angles."""

HINGE_EXTENT_ANGSTROM = 150.0
"""Diameter budgeted for the molecule over its hinge range (its largest extent plus margin)."""

_SEED = 20240611
_RISE = 1.5  # angstrom per residue along a helix axis
_TWIST = math.radians(100.0)  # per residue
_HELIX_RADIUS = 2.3
_HELIX_SPACING = 10.0
_CA_STEP = 3.8

# layout (angstroms, before the final centring)
_BODY_CENTER = np.array([0.0, 0.0, 0.0])
_BODY_AXES = np.array([42.0, 32.0, 27.0])
_BODY_DIRECTION = np.array([0.35, 0.9, 0.25])
_KNOB_CENTER = np.array([-30.0, -22.0, 19.0])
_KNOB_AXES = np.array([11.0, 9.0, 9.0])
_KNOB_DIRECTION = np.array([0.8, -0.2, 0.55])
_HINGE_POINT = np.array([37.0, 13.0, 5.0])
_HINGE_AXIS = np.array([0.2, 0.3, 1.0])
_DOMAIN_CENTER = _HINGE_POINT + np.array([27.0, 7.0, 0.0])
_DOMAIN_AXES = np.array([26.0, 20.0, 17.0])
_DOMAIN_DIRECTION = np.array([-0.3, 0.5, 0.8])


def _unit(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64) / np.linalg.norm(v)


def _frame(direction: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-handed orthonormal frame ``(u, v, d)`` with ``u x v = d``."""
    d = _unit(direction)
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = _unit(np.cross(helper, d))
    v = np.cross(d, u)
    return u, v, d


def _helix(start: np.ndarray, direction: np.ndarray, n_residues: int, phase: float) -> np.ndarray:
    """``(n, 3)`` C-alpha positions of a right-handed alpha helix starting at ``start``."""
    u, v, d = _frame(direction)
    i = np.arange(n_residues)
    phi = phase + _TWIST * i
    return (
        start[None, :]
        + (_RISE * i)[:, None] * d[None, :]
        + _HELIX_RADIUS * (np.cos(phi)[:, None] * u[None, :] + np.sin(phi)[:, None] * v[None, :])
    )


def _loop(a: np.ndarray, b: np.ndarray, bulge: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Residues strictly between ``a`` and ``b`` on a bowed path (~3.8 A apart, slightly jittered)."""
    mid = 0.5 * (a + b) + bulge
    # quadratic Bezier a -> mid -> b; its length is estimated from a fine polyline
    t = np.linspace(0.0, 1.0, 200)[:, None]
    curve = (1 - t) ** 2 * a + 2 * (1 - t) * t * mid + t**2 * b
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))])
    n = max(int(round(arc[-1] / _CA_STEP)) - 1, 0)
    if n == 0:
        return np.zeros((0, 3))
    targets = np.linspace(0.0, arc[-1], n + 2)[1:-1]
    pts = np.stack([np.interp(targets, arc, curve[:, k]) for k in range(3)], axis=1)
    return pts + rng.normal(scale=0.4, size=pts.shape)


def _fill_ellipsoid(
    center: np.ndarray, axes: np.ndarray, direction: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Pack an ellipsoid with up-down helices on a hexagonal lattice, joined by loops (one chain)."""
    u, v, d = _frame(direction)
    reach = float(axes.max())
    rows = []
    n_lat = int(math.ceil(reach / _HELIX_SPACING)) + 1
    for j in range(-n_lat, n_lat + 1):
        row = []
        for i in range(-n_lat, n_lat + 1):
            a = (i + 0.5 * (j % 2)) * _HELIX_SPACING
            b = j * _HELIX_SPACING * math.sqrt(3.0) / 2.0
            q = center + a * u + b * v + rng.normal(scale=0.6, size=3)
            # chord of the ellipsoid |(q + t d - c) / axes| = 1 along d
            p0 = (q - center) / axes
            dd = d / axes
            A, B, C = dd @ dd, 2 * p0 @ dd, p0 @ p0 - 1.0
            disc = B * B - 4 * A * C
            if disc <= 0:
                continue
            t0 = (-B - math.sqrt(disc)) / (2 * A) + 2.0
            t1 = (-B + math.sqrt(disc)) / (2 * A) - 2.0
            if t1 - t0 < 9.0:
                continue
            row.append((q, t0, t1))
        if row:
            rows.append(row if len(rows) % 2 == 0 else row[::-1])  # snake through the lattice
    chain: list[np.ndarray] = []
    sign = 1.0
    for q, t0, t1 in (h for row in rows for h in row):
        tilt = _unit(d + rng.normal(scale=0.08, size=3))
        n_res = int((t1 - t0) / _RISE) + 1
        if sign > 0:
            start, hdir = q + t0 * d, tilt
        else:
            start, hdir = q + t1 * d, -tilt
        helix = _helix(start, hdir, n_res, phase=rng.uniform(0, 2 * math.pi))
        if chain:
            prev = chain[-1][-1]
            outward = _unit(0.5 * (prev + helix[0]) - center + 1e-6) * 3.0
            chain.append(_loop(prev, helix[0], outward + sign * 2.0 * d, rng))
        chain.append(helix)
        sign = -sign
    return np.concatenate(chain, axis=0)


@functools.lru_cache(maxsize=1)
def _design() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(coords, weights, moving)`` at angle 0 before centring; ``moving`` marks the swinging part."""
    rng = np.random.default_rng(_SEED)
    body = _fill_ellipsoid(_BODY_CENTER, _BODY_AXES, _BODY_DIRECTION, rng)
    knob = _fill_ellipsoid(_KNOB_CENTER, _KNOB_AXES, _KNOB_DIRECTION, rng)
    domain = _fill_ellipsoid(_DOMAIN_CENTER, _DOMAIN_AXES, _DOMAIN_DIRECTION, rng)
    # linker: body's nearest residue -> hinge point -> domain's nearest residue
    b_end = body[np.argmin(np.linalg.norm(body - _HINGE_POINT, axis=1))]
    d_end = domain[np.argmin(np.linalg.norm(domain - _HINGE_POINT, axis=1))]
    side = _unit(np.cross(_HINGE_AXIS, d_end - b_end)) * 2.0
    linker_a = _loop(b_end, _HINGE_POINT, side, rng)
    linker_b = _loop(_HINGE_POINT, d_end, -side, rng)
    parts = [body, knob, linker_a, _HINGE_POINT[None, :], linker_b, domain]
    moving = [False, False, False, False, True, True]
    coords = np.concatenate(parts, axis=0)
    flags = np.concatenate([np.full(len(p), m) for p, m in zip(parts, moving)])
    # drop the later atom of every pair closer than 2.5 A (loops crossing helices)
    from scipy.spatial import cKDTree

    pairs = cKDTree(coords).query_pairs(2.5, output_type="ndarray")
    keep = np.ones(len(coords), dtype=bool)
    keep[np.unique(pairs.max(axis=1))] = False
    coords, flags = coords[keep], flags[keep]
    weights = np.ones(len(coords))
    return coords, weights, flags


def hinge_axis() -> tuple[np.ndarray, np.ndarray]:
    """The hinge as ``(point, unit direction)`` in the coordinates :func:`hinge_molecule` returns."""
    return _HINGE_POINT - _origin(), _unit(_HINGE_AXIS)


def _rotate_domain(coords: np.ndarray, moving: np.ndarray, angle_deg: float) -> np.ndarray:
    M = rotation_about_axis(_unit(_HINGE_AXIS), math.radians(angle_deg))
    out = coords.copy()
    out[moving] = (coords[moving] - _HINGE_POINT) @ np.asarray(M).T + _HINGE_POINT
    return out


@functools.lru_cache(maxsize=1)
def _origin() -> np.ndarray:
    coords, weights, moving = _design()
    mid = 0.5 * (HINGE_ANGLE_RANGE_DEG[0] + HINGE_ANGLE_RANGE_DEG[1])
    rotated = _rotate_domain(coords, moving, mid)
    return (weights[:, None] * rotated).sum(0) / weights.sum()


def hinge_molecule(
    angle_deg: float = 0.0, *, return_moving: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pseudo-atoms of the built-in molecule with its moving domain swung by ``angle_deg``.

    Parameters
    ----------
    angle_deg
        Hinge angle in degrees (right-hand rule about :func:`hinge_axis`); the default range is
        :data:`HINGE_ANGLE_RANGE_DEG`, but any angle works.
    return_moving
        Also return the ``(n,)`` boolean mask of the atoms that move with the domain.

    Returns
    -------
    coords_angstrom : (n, 3) float64
        ``(x, y, z)`` in angstroms, relative to a fixed origin (the same for every angle).
    weights : (n,) float64
        One per pseudo-atom.
    moving : (n,) bool, only with ``return_moving``
    """
    coords, weights, moving = _design()
    out = _rotate_domain(coords, moving, float(angle_deg)) - _origin()
    if return_moving:
        return out, weights.copy(), moving.copy()
    return out, weights.copy()


def default_pixel_size_angstrom(box_size: int, *, fill_fraction: float = 0.6) -> float:
    """Pixel size at which the built-in molecule spans ``fill_fraction`` of a ``box_size`` box.

    ``HINGE_EXTENT_ANGSTROM / (fill_fraction * box_size)`` rounded to 3 decimals: 3.906 A at
    ``D = 64``, 1.953 A at ``D = 128``.
    """
    return round(HINGE_EXTENT_ANGSTROM / (fill_fraction * box_size), 3)
