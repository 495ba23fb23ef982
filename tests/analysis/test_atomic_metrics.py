"""Atomic-model metrics (analysis/atomic.py) and `cryoscape evaluate` of an atomic run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from cryoscape.analysis.atomic import ca_rmse_angstrom, percent_within, score_models, volume_nmse
from cryoscape.cli.main import main

PDB = Path(__file__).resolve().parents[1] / "data" / "1A8O.pdb"


def test_rmse_within_and_nmse_by_hand():
    truth = np.zeros((4, 3))
    pred = truth + np.array([[1.0, 2.0, 2.0], [0, 0, 0], [0, 0, 4.0], [0, 0, 0]])  # distances 3, 0, 4, 0
    assert ca_rmse_angstrom(pred, truth) == pytest.approx(np.sqrt((9 + 16) / 4))
    assert percent_within(pred, truth) == 75.0
    t = np.random.default_rng(0).normal(size=(8, 8, 8))
    assert volume_nmse(3.0 * t, t) == pytest.approx(0.0, abs=1e-12)  # scale-free
    noisy = t + 0.5 * np.random.default_rng(1).normal(size=t.shape)
    assert 0.15 < volume_nmse(noisy, t) < 0.25


def test_score_models_against_a_shifted_copy(tmp_path):
    import gemmi

    s = gemmi.read_structure(str(PDB))
    s.remove_waters()
    for cra in s[0].all():
        cra.atom.pos = gemmi.Position(cra.atom.pos.x + 2.0, cra.atom.pos.y, cra.atom.pos.z)
    shifted = tmp_path / "shifted.pdb"
    s.write_pdb(str(shifted))
    scores = score_models(shifted, PDB)
    assert scores["mean_ca_rmse_angstrom"] == pytest.approx(2.0, abs=1e-3)
    assert scores["mean_percent_within"] == 100.0 and scores["n_residues"] == 70


def test_evaluate_reports_atomic_metrics_of_a_run(tmp_path, capsys):
    sim, run = tmp_path / "sim", tmp_path / "run"
    assert main(["simulate", "--molecule", str(PDB), "-o", str(sim), "-n", "200", "-D", "32", "--pixel-size", "2.0",
                 "--snr", "1"]) == 0
    assert main(["train", str(sim / "particles.star"), "--decoder", "atomic", "--reference", str(PDB), "-n", "1",
                 "-o", str(run), "--no-progress"]) == 0
    assert main(["evaluate", str(run), "--truth", str(sim), "--true-model", str(PDB), "-o", str(tmp_path / "ev"),
                 "--no-progress", "--n-images", "4"]) == 0
    assert "C-alpha RMSE" in capsys.readouterr().out
    atomic = yaml.safe_load((tmp_path / "ev" / "evaluation.yaml").read_text())["atomic"]
    assert atomic["mean_ca_rmse_angstrom"] < 1.0  # started at the true model
    assert atomic["mean_percent_within"] > 95.0
    assert 0.0 < atomic["mean_volume_nmse"] < 0.6
    assert (tmp_path / "ev" / "atomic" / "state_000.pdb").is_file()
