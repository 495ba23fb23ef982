"""Heterogeneous Cryofold on the 1-D bond-rotation motion of 1A8O (thesis 7.4.2): the latent
orders the images along the motion and the models along it have the true C-alphas (slow).  The
run uses Cryofold's defaults, so its last 6 epochs search the latents against the model
(train/latent_search.py) and the local-geometry restraint holds the chain's shape
(models/_atomic_restraints.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryoscape.analysis.atomic import atomic_metrics_along_path, median_latent_per_state
from cryoscape.cli.main import main
from cryoscape.train.volumes import load_trained_model

PDB = Path(__file__).resolve().parents[1] / "data" / "1A8O.pdb"


@pytest.mark.slow
def test_bond_rotation_latent_and_path_coordinates(tmp_path):
    from scipy.stats import spearmanr

    sim, run = tmp_path / "sim", tmp_path / "run"
    assert main(["simulate", "--molecule", str(PDB), "--bond-rotation-deg", "0", "60", "-n", "1500", "-D", "40",
                 "--pixel-size", "1.5", "--snr", "0.3", "-o", str(sim), "--seed", "1"]) == 0
    assert main(["train", str(sim / "particles.star"), "--decoder", "atomic", "--reference", str(PDB), "--zdim", "1",
                 "-n", "12", "--beta", "0.05", "--lr", "5e-4", "--decoder-opt", "centre_lr_scale=40",
                 "--decoder-opt", "global_lr_scale=20", "-o", str(run), "--no-progress"]) == 0
    truth = np.load(sim / "ground_truth.npz")
    gt = np.load(sim / "gt_atomic.npz")
    z = np.load(run / "z.11.npy")
    rho = abs(spearmanr(z[:, 0], truth["coordinate"]).statistic)
    decoder, _, _ = load_trained_model(run)
    states = truth["state_index"]
    path = atomic_metrics_along_path(decoder, median_latent_per_state(z, states, len(gt["ca_angstrom"])),
                                     gt["ca_angstrom"])
    print(f"|Spearman| {rho:.3f}; C-alpha RMSE per state {np.round(path['ca_rmse_angstrom'], 2).tolist()}")
    assert rho > 0.95  # measured 0.981 (0.975 without the local restraint, 0.952 before the latent search)
    assert path["mean_ca_rmse_angstrom"] < 1.0  # 0.68 A (1.39 A without the local restraint, 1.43 A before the search)
    assert path["max_ca_rmse_angstrom"] < 1.5  # 0.97 A (2.24 A without the local restraint, 2.40 A before the search)
    # the far end moved: without the offsets its model would be 7 A from the truth
    end_motion = np.sqrt(np.square(gt["ca_angstrom"][-1] - gt["ca_angstrom"][0]).sum(-1).mean())
    assert end_motion > 6.5 and path["ca_rmse_angstrom"][-1] < 0.5 * end_motion
