"""Atomic models written by a Cryofold run: per epoch (train), per latent (volumes) and along a
path (traverse: one multi-model PDB), with the reference's residue names and numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryoscape.cli.main import main
from cryoscape.simulate.atomic_structures import read_residue_tables
from cryoscape.train.volumes import load_trained_model

PDB = Path(__file__).resolve().parents[1] / "data" / "1A8O.pdb"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic_outputs")
    sim, out = root / "sim", root / "run"
    assert main(["simulate", "--molecule", str(PDB), "--bond-rotation-deg", "0", "60", "--atomic-states", "4",
                 "-o", str(sim), "-n", "160", "-D", "32", "--pixel-size", "2.0", "--snr", "1"]) == 0
    assert main(["train", str(sim / "particles.star"), "--decoder", "atomic", "--reference", str(PDB), "--zdim", "1",
                 "--dec-layers", "1", "--dec-dim", "32", "--enc-dim", "32", "-n", "2", "-o", str(out),
                 "--no-progress", "--lr", "1e-3"]) == 0
    return out


def _ca(path: Path) -> np.ndarray:
    return np.stack([t.ca_angstrom for t in read_residue_tables(path)])


def test_every_saved_epoch_has_its_model(run):
    decoder, _, _ = load_trained_model(run)
    z = np.load(run / "z.1.npy")
    table = read_residue_tables(run / "model.1.pdb")[0]
    assert len(table) == 70 and table.residue_name[:2] == ["MSE", "ASP"] and table.residue_number[0] == 151
    expected = decoder.model_angstrom(torch.as_tensor(np.median(z, axis=0)))[:70]
    assert np.abs(table.ca_angstrom - expected).max() < 2e-3


def test_volumes_write_one_model_per_latent(run, tmp_path):
    assert main(["volumes", str(run), "--z-values", "-2", "2", "-o", str(tmp_path)]) == 0
    decoder, _, _ = load_trained_model(run)
    for i, z in enumerate((-2.0, 2.0)):
        expected = decoder.model_angstrom(torch.tensor([z]))[:70]
        assert np.abs(_ca(tmp_path / f"vol_{i:03d}.pdb")[0] - expected).max() < 2e-3
    assert np.abs(_ca(tmp_path / "vol_000.pdb") - _ca(tmp_path / "vol_001.pdb")).max() > 1e-3  # z moves atoms


def test_traverse_writes_the_path_as_one_multi_model_file(run, tmp_path):
    assert main(["traverse", str(run), "--along", "pc", "-o", str(tmp_path), "--no-progress"]) == 0
    singles = sorted(tmp_path.glob("vol_*.pdb"))
    trajectory = _ca(tmp_path / "models.pdb")
    assert len(trajectory) == len(singles) >= 2
    for m, path in enumerate(singles):
        assert np.array_equal(trajectory[m], _ca(path)[0])


def test_the_last_half_of_a_cryofold_run_searches_the_latents(run):
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["training"]["latent_search_start"] == 1  # 2 epochs: the second searches (Cryofold's default)
    log = (run / "run.log").read_text()
    assert "epoch 2: latents searched against the decoder" in log and "epoch 1: latents searched" not in log
