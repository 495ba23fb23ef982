"""Point-group symmetry: Cn, Dn, T, O, I (I1-I4) with RELION's axis conventions.

A map with symmetry group ``G`` satisfies ``V(g X) = V(X)`` for every ``g`` in ``G`` (world
coordinates ``X = (x, y, z)``).  With the pose convention of :mod:`cryoscape.geometry.rotations`
(``image(x) = integral V(R^T x)``), the poses ``R g`` all give the same image, so symmetry
expansion of a particle replaces ``R`` by ``{R g}``.

Axis conventions (those of RELION, checked against ``relion_particle_symmetry_expand`` in
tests/geometry/test_symmetry.py when RELION is installed):

=====  ====================================================================================
Cn     n-fold axis along z
Dn     n-fold along z, a 2-fold along x
T      3-fold along z, a 2-fold along (0, sqrt(2/3), sqrt(1/3))
O      4-folds along x, y and z
I1     2-folds along x, y, z; 5-folds in the yz plane, e.g. (0, 0.526, 0.851)
I2     2-folds along x, y, z; 5-folds in the xz plane, e.g. (0.526, 0, 0.851)  (``I``, RELION's default)
I3     5-fold along z, 2-fold along y; a 5-fold at azimuth -36 degrees
I4     5-fold along z, 2-fold along y; a 5-fold at azimuth 0 degrees
=====  ====================================================================================

Each group is built as the closure of its generators (rotation matrices, float64).
"""

from __future__ import annotations

import math
import re

import numpy as np

__all__ = ["symmetry_group", "parse_symmetry", "SYMMETRY_HELP"]

SYMMETRY_HELP = "point group: C1 (none), Cn, Dn, T, O, I (= I2), I1, I2, I3, I4 (RELION's conventions)"

# polar angle of the icosahedron's 5-folds next to a 5-fold on z: arctan(2)
_ICOSA_POLAR = math.atan(2.0)
# in the 222 settings a 5-fold lies along (0, 1, phi) (I1) or (1, 0, phi) (I2), phi the golden ratio
_PHI = (1.0 + math.sqrt(5.0)) / 2.0


def _axis_rotation(axis, angle_rad: float) -> np.ndarray:
    """Active rotation by ``angle_rad`` about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * K + (1 - math.cos(angle_rad)) * K @ K


def _fold(axis, n: int) -> np.ndarray:
    return _axis_rotation(axis, 2 * math.pi / n)


def _closure(generators: list[np.ndarray], expected: int) -> np.ndarray:
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                m = h @ g
                if not any(np.abs(m - e).max() < 1e-6 for e in group):
                    group.append(m)
                    new.append(m)
        frontier = new
        if len(group) > expected:
            raise AssertionError(f"generators close to more than {expected} elements")
    if len(group) != expected:
        raise AssertionError(f"generators close to {len(group)} elements, expected {expected}")
    return np.stack(group)


def _icosahedral(kind: str) -> list[np.ndarray]:
    s, c = math.sin(_ICOSA_POLAR), math.cos(_ICOSA_POLAR)
    if kind == "I1":
        return [_fold((1, 0, 0), 2), _fold((0, 0, 1), 2), _fold((0, 1.0, _PHI), 5)]
    if kind == "I2":
        return [_fold((1, 0, 0), 2), _fold((0, 0, 1), 2), _fold((1.0, 0, _PHI), 5)]
    if kind == "I3":
        az = math.radians(-36.0)
        return [_fold((0, 0, 1), 5), _fold((s * math.cos(az), s * math.sin(az), c), 5)]
    if kind == "I4":
        return [_fold((0, 0, 1), 5), _fold((s, 0, c), 5)]
    raise ValueError(kind)


def parse_symmetry(name: str) -> tuple[str, int]:
    """``("C", 4)``, ``("D", 3)``, ``("T", 0)``, ``("O", 0)``, ``("I2", 0)`` ... from a RELION
    symmetry name (case-insensitive); ``ValueError`` with the accepted names otherwise."""
    text = name.strip().upper()
    m = re.fullmatch(r"([CD])(\d+)", text)
    if m and int(m.group(2)) >= 1:
        return m.group(1), int(m.group(2))
    if text in ("T", "O"):
        return text, 0
    if text == "I":
        return "I2", 0
    if text in ("I1", "I2", "I3", "I4"):
        return text, 0
    raise ValueError(f"unknown symmetry {name!r}; use {SYMMETRY_HELP}")


def symmetry_group(name: str) -> np.ndarray:
    """``(|G|, 3, 3)`` float64 rotation matrices of the point group ``name`` (identity first)."""
    kind, n = parse_symmetry(name)
    if kind == "C":
        return _closure([_fold((0, 0, 1), n)], n) if n > 1 else np.eye(3)[None]
    if kind == "D":
        gens = [_fold((1, 0, 0), 2)] + ([_fold((0, 0, 1), n)] if n > 1 else [])
        return _closure(gens, 2 * n)
    if kind == "T":
        return _closure([_fold((0, 0, 1), 3), _fold((0, math.sqrt(2 / 3), math.sqrt(1 / 3)), 2)], 12)
    if kind == "O":
        return _closure([_fold((0, 0, 1), 4), _fold((1, 0, 0), 4)], 24)
    return _closure(_icosahedral(kind), 60)
