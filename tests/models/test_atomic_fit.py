"""Homogeneous Cryofold fits of 1A8O (thesis Table 7.1 rows "Exact" and "Uniform[6 A]"), from the
command line: ``cryoscape simulate --molecule 1A8O.pdb`` then ``cryoscape train --decoder atomic``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryoscape.analysis.atomic import ca_rmse_angstrom, percent_within
from cryoscape.cli.main import main
from cryoscape.simulate.atomic_structures import read_structure, residue_table
from cryoscape.train.volumes import load_trained_model

PDB = Path(__file__).resolve().parents[1] / "data" / "1A8O.pdb"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("atomic_fit") / "sim"
    assert main(["simulate", "--molecule", str(PDB), "-o", str(out), "-n", "1000", "-D", "40", "--pixel-size", "1.5",
                 "--snr", "0.1", "--seed", "3"]) == 0
    return out


def _fit(dataset: Path, out: Path, epochs: int, *extra: str) -> tuple[float, float, float]:
    """Train and return (initial C-alpha RMSE, final C-alpha RMSE, % within 3 A) against the true model."""
    assert main(["train", str(dataset / "particles.star"), "--decoder", "atomic", "--reference", str(PDB),
                 "-n", str(epochs), "-o", str(out), "--no-progress", "--seed", "0", *extra]) == 0
    decoder, _, _ = load_trained_model(out)
    true_ca = residue_table(read_structure(PDB)[0]).ca_angstrom
    K = len(true_ca)
    start = decoder.config["reference"]
    import torch

    from cryoscape.models.base import build_decoder

    initial = build_decoder("atomic", **decoder.config).model_angstrom()[:K]
    final = decoder.model_angstrom()[:K]
    assert start["residue_name"][0] == "MSE"
    assert torch.isfinite(decoder.sigma_angstrom).all()
    return ca_rmse_angstrom(initial, true_ca), ca_rmse_angstrom(final, true_ca), percent_within(final, true_ca)


#: Table 7.1's rows with the thesis's restraints only (bonds, side chains): Cryofold's default local-geometry
#: restraint holds the reference's (here the true model's) local distances, which would tell a perturbed start the truth
THESIS_RESTRAINTS = ("--decoder-opt", "local_strength=0")


def test_exact_initialisation_stays_within_one_angstrom(dataset, tmp_path):
    initial, final, within = _fit(dataset, tmp_path / "exact", 3, *THESIS_RESTRAINTS)
    assert initial < 1e-3  # float32 copies of the reference
    assert final < 1.0  # measured 0.61 A (thesis Table 7.1: 0.843 A)
    assert within > 95.0  # measured 100 % (thesis 99.29 %)


def test_uniform_six_angstrom_noise_improves_by_a_third(dataset, tmp_path):
    initial, final, within = _fit(dataset, tmp_path / "u6", 6, "--decoder-opt", "perturb_angstrom=6", *THESIS_RESTRAINTS)
    assert 5.5 < initial < 7.0  # measured 6.29 A (thesis 6.50 A)
    assert final < 0.67 * initial  # measured 6.29 -> 3.22 A, 54 % within 3 A (thesis 6.50 -> 3.19 A, 53.19 %)
    assert within > 35.0


def test_reference_without_the_atomic_decoder_is_one_clear_error(dataset, tmp_path, capsys):
    code = main(["train", str(dataset / "particles.star"), "--reference", str(PDB), "-o", str(tmp_path / "x")])
    assert code == 2
    assert "--decoder atomic" in capsys.readouterr().err


def test_default_reference_is_the_builtin_hinge_molecule():
    from cryoscape.models.base import build_decoder
    from cryoscape.simulate.molecule import default_pixel_size_angstrom, hinge_molecule

    decoder = build_decoder("atomic", box_size=64)
    coords, _ = hinge_molecule(0.0)
    assert decoder.pixel_size_angstrom == default_pixel_size_angstrom(64)
    assert np.abs(decoder.model_angstrom()[: len(coords)] - coords).max() < 1e-3


def test_resumed_run_equals_the_uninterrupted_one(dataset, tmp_path):
    common = [str(dataset / "particles.star"), "--decoder", "atomic", "--reference", str(PDB), "--no-progress",
              "--first", "200"]
    assert main(["train", *common, "-n", "2", "-o", str(tmp_path / "straight")]) == 0
    assert main(["train", *common, "-n", "1", "-o", str(tmp_path / "split")]) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "-n", "2", "--no-progress"]) == 0
    a, _, _ = load_trained_model(tmp_path / "straight")
    b, _, _ = load_trained_model(tmp_path / "split")
    assert np.array_equal(a.model_angstrom(), b.model_angstrom())
    assert (tmp_path / "split" / "model.1.pdb").read_text() == (tmp_path / "straight" / "model.1.pdb").read_text()
