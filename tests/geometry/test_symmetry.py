"""Point groups: sizes, closure, axes, and RELION's conventions (relion_particle_symmetry_expand)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from cryoscape.geometry.symmetry import parse_symmetry, symmetry_group

SIZES = {"C1": 1, "C4": 4, "C7": 7, "D1": 2, "D3": 6, "D6": 12, "T": 12, "O": 24, "I": 60, "I1": 60, "I2": 60,
         "I3": 60, "I4": 60}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_groups_are_closed_rotation_groups_of_the_right_size(name):
    G = symmetry_group(name)
    assert len(G) == SIZES[name]
    assert np.allclose(G @ G.transpose(0, 2, 1), np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(G), 1.0)
    products = (G[:, None] @ G[None]).reshape(-1, 9)
    dist = np.abs(products[:, None, :] - G.reshape(1, -1, 9)).max(-1)
    assert (dist.min(1) < 1e-8).all()  # closed under products


def test_axis_conventions():
    def has(G, axis, n):
        a = np.asarray(axis, float) / np.linalg.norm(axis)
        c, s = np.cos(2 * np.pi / n), np.sin(2 * np.pi / n)
        K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
        R = np.eye(3) + s * K + (1 - c) * K @ K
        return np.abs(G - R).max((1, 2)).min() < 1e-8
    assert has(symmetry_group("C5"), (0, 0, 1), 5)
    assert has(symmetry_group("D4"), (1, 0, 0), 2)
    assert has(symmetry_group("O"), (0, 1, 0), 4)
    assert has(symmetry_group("I2"), (0, 0, 1), 2) and has(symmetry_group("I2"), (1, 0, 1.618034), 5)
    assert has(symmetry_group("I3"), (0, 0, 1), 5) and has(symmetry_group("I3"), (0, 1, 0), 2)


def test_unknown_symmetry_names_the_choices():
    with pytest.raises(ValueError, match="unknown symmetry"):
        parse_symmetry("X2")
    assert parse_symmetry("i") == ("I2", 0)


@pytest.mark.skipif(shutil.which("relion_particle_symmetry_expand") is None,
                    reason="RELION is not installed (scripts/testdeps/relion.sh installs it)")
@pytest.mark.parametrize("name", ["C4", "D3", "T", "O", "I", "I1", "I3", "I4"])
def test_groups_equal_relions_symmetry_expansion(name, tmp_path):
    """One particle at the identity pose, expanded by RELION: the poses it writes, read through
    our STAR reader, are exactly our group's matrices."""
    import starfile

    from cryoscape.io.star import _eulers_to_matrices

    optics = {"rlnOpticsGroup": [1], "rlnImagePixelSize": [1.0], "rlnImageSize": [32], "rlnImageDimensionality": [2],
              "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]}
    particles = {"rlnImageName": ["000001@p.mrcs"], "rlnAngleRot": [0.0], "rlnAngleTilt": [0.0],
                 "rlnAnglePsi": [0.0], "rlnOriginXAngst": [0.0], "rlnOriginYAngst": [0.0], "rlnOpticsGroup": [1],
                 "rlnDefocusU": [10000.0], "rlnDefocusV": [10000.0], "rlnDefocusAngle": [0.0]}
    import pandas as pd

    starfile.write({"optics": pd.DataFrame(optics), "particles": pd.DataFrame(particles)}, tmp_path / "one.star")
    subprocess.run(["relion_particle_symmetry_expand", "--i", str(tmp_path / "one.star"), "--o",
                    str(tmp_path / "exp.star"), "--sym", name], check=True, capture_output=True)
    rows = starfile.read(tmp_path / "exp.star")["particles"]
    relion = _eulers_to_matrices(rows[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64))
    ours = symmetry_group(name)
    assert len(relion) == len(ours)
    dist = np.abs(relion[:, None].reshape(-1, 1, 9) - ours.reshape(1, -1, 9)).max(-1)
    assert (dist.min(1) < 1e-4).all()
