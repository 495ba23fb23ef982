"""Datasets from atomic trajectories (simulate/atomic_structures.py, simulate/atomic_trajectory.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryoscape.cli.main import main
from cryoscape.io.mrc import read_mrc
from cryoscape.simulate.atomic_structures import (
    bond_rotation_models,
    heavy_atoms,
    read_residue_tables,
    read_structure,
    residue_table,
)

PDB = Path(__file__).resolve().parents[1] / "data" / "1A8O.pdb"


def test_coarse_graining_of_1a8o():
    t = residue_table(read_structure(PDB)[0])
    assert len(t) == 70 and t.residue_name[:3] == ["MSE", "ASP", "ILE"] and t.residue_number[0] == 151
    gly = [i for i, n in enumerate(t.residue_name) if n == "GLY"]
    assert gly and np.all(t.sidechain_electrons[gly] == 0)
    assert np.allclose(t.sidechain_angstrom[gly], t.ca_angstrom[gly])
    assert np.all(t.backbone_electrons >= 27)  # N + CA + C + O = 7 + 6 + 6 + 8
    d = np.linalg.norm(np.diff(t.ca_angstrom, axis=0), axis=1)
    assert np.all(np.abs(d - 3.8) < 0.1)


def test_bond_rotation_is_rigid_on_each_side_of_the_bond():
    s = read_structure(PDB)
    zero, turned = bond_rotation_models(s, angles_deg=[0.0, 50.0])
    a0, _ = heavy_atoms(s[0])
    a1, _ = heavy_atoms(zero)
    a2, _ = heavy_atoms(turned)
    assert np.array_equal(a0, a1)  # 0 degrees leaves the model as it is
    moved = np.linalg.norm(a2 - a0, axis=1) > 1e-3
    assert 0.3 < moved.mean() < 0.7  # about half the chain turns
    fixed = ~moved
    for part in (moved, fixed):  # distances within each rigid part are kept
        p0, p2 = a0[part][::7], a2[part][::7]
        assert np.allclose(np.linalg.norm(p0[:, None] - p0[None], axis=-1),
                           np.linalg.norm(p2[:, None] - p2[None], axis=-1), atol=1e-3)
    ca = residue_table(turned).ca_angstrom
    assert np.all(np.abs(np.linalg.norm(np.diff(ca, axis=0), axis=1) - 3.8) < 0.1)  # the chain stays bonded


def test_simulate_bond_rotation_writes_true_coordinates(tmp_path):
    out, hom = tmp_path / "traj", tmp_path / "hom"
    common = ["-n", "40", "-D", "32", "--pixel-size", "2.0", "--snr", "0.1"]
    assert main(["simulate", "--molecule", str(PDB), "--bond-rotation-deg", "0", "60", "--atomic-states", "5",
                 "-o", str(out), *common]) == 0
    assert main(["simulate", "--molecule", str(PDB), "-o", str(hom), *common]) == 0
    gt = np.load(out / "gt_atomic.npz")
    assert gt["ca_angstrom"].shape == (5, 70, 3)
    assert np.allclose(gt["angles_deg"], [0, 15, 30, 45, 60])
    tables = read_residue_tables(out / "gt_models.pdb")
    assert len(tables) == 5
    assert np.allclose(tables[3].ca_angstrom - gt["origin_angstrom"], gt["ca_angstrom"][3], atol=2e-3)
    # state 0 is the reference itself, rendered exactly as `simulate --molecule` renders it
    assert np.array_equal(read_mrc(out / "gt_volumes/vol_000.mrc")[0], read_mrc(hom / "gt_volumes/vol_000.mrc")[0])
    rmsd = np.sqrt(np.square(gt["ca_angstrom"][4] - gt["ca_angstrom"][0]).sum(-1).mean())
    assert rmsd > 5.0  # measured 7.0 A over 60 degrees
    truth = np.load(out / "ground_truth.npz")
    assert str(truth["kind"]) == "trajectory" and truth["state_index"].max() <= 4


def test_bond_rotation_needs_an_atomic_model(tmp_path, capsys):
    assert main(["simulate", "--bond-rotation-deg", "0", "30", "-o", str(tmp_path / "x"), "--pixel-size", "2"]) == 2
    assert "--molecule" in capsys.readouterr().err
