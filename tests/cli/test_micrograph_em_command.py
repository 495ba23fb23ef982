"""`cryoscape micrograph-em` (and `simulate micrographs`) end to end on tiny micrographs."""

import csv

import numpy as np
import pytest

from cryoscape.cli.main import main
from cryoscape.io.mrc import read_mrc


@pytest.fixture(scope="module")
def mics(tmp_path_factory):
    out = tmp_path_factory.mktemp("mics") / "sim"
    assert main(["simulate", "micrographs", "-o", str(out), "--n-micrographs", "2", "--micrograph-size", "256",
                 "-D", "32", "--particles-per-micrograph", "6", "--snr", "inf", "--seed", "3",
                 "--hinge-angle-deg", "0"]) == 0
    return out


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_em_writes_map_log_and_resumes_after_an_interruption(mics, tmp_path, monkeypatch):
    import cryoscape.reconstruct.micrograph_em as mem

    args = ["micrograph-em", str(mics / "micrographs.star"), "--initial-map", str(mics / "gt_volumes/vol_000.mrc"),
            "--box-size", "32", "-o", str(tmp_path / "run"), "--schedule", "8:-1:2:0.5", "--reference",
            str(mics / "gt_volumes/vol_000.mrc"), "--no-progress"]
    original, calls = mem.em_iteration, []

    def interrupted(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(mem, "em_iteration", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert len(_rows(tmp_path / "run" / "iterations.tsv")) == 1
    monkeypatch.setattr(mem, "em_iteration", original)
    assert main(args + ["--resume"]) == 0
    rows = _rows(tmp_path / "run" / "iterations.tsv")
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert all(0 < float(r["rho0"]) < 1 and float(r["n_patches"]) == 64 for r in rows)  # half of 2 x 8 x 8 patches
    assert float(rows[-1]["fsc_auc"]) > 0.15  # box 8, 60-degree grid: a toy (0.189 measured)
    volume, pixel = read_mrc(tmp_path / "run" / "map.mrc")
    assert volume.shape == (32, 32, 32) and np.isfinite(volume).all()
    # the resumed run draws the same patches and grid turns as one uninterrupted run
    whole = [a if a != str(tmp_path / "run") else str(tmp_path / "whole") for a in args]
    assert main(whole) == 0
    np.testing.assert_allclose(read_mrc(tmp_path / "whole" / "map.mrc")[0], volume, rtol=0, atol=1e-5 * np.abs(volume).max())


def test_pick_baseline_finds_the_particles_of_noiseless_micrographs(mics, tmp_path):
    out = tmp_path / "pick"
    assert main(["micrograph-em", str(mics / "micrographs.star"), "--initial-map", str(mics / "gt_volumes/vol_000.mrc"),
                 "--box-size", "32", "-o", str(out), "--baseline", "pick", "--iterations", "1",
                 "--picks-per-micrograph", "6", "--no-progress"]) == 0
    picks, truth = np.load(out / "picks.npz"), np.load(mics / "ground_truth.npz")
    assert len(picks["micrograph_index"]) == 12
    hits = 0
    for g, pos in zip(picks["micrograph_index"], picks["positions_pixel"]):
        mine = truth["positions_pixel"][truth["micrograph_index"] == g]
        hits += np.abs(mine - pos).max(1).min() <= 2
    assert hits >= 10


def test_bad_input_is_one_sentence(mics, tmp_path, capsys):
    star = tmp_path / "noctf.star"
    star.write_text(f"data_\nloop_\n_rlnMicrographName #1\n_rlnMicrographPixelSize #2\n{mics}/micrographs/mic_0000.mrc 7.8\n")
    code = main(["micrograph-em", str(star), "--initial-map", str(mics / "gt_volumes/vol_000.mrc"), "--box-size", "32",
                 "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "CTF" in err and "Traceback" not in err
    code = main(["micrograph-em", str(mics / "micrographs.star"), "--initial-map", str(mics / "gt_volumes/vol_000.mrc"),
                 "--box-size", "33", "-o", str(tmp_path / "y")])
    assert code == 2 and "--box-size 33" in capsys.readouterr().err


def test_half_sets_and_reorient_are_logged(mics, tmp_path):
    out = tmp_path / "halves"
    assert main(["micrograph-em", str(mics / "micrographs.star"), "--initial-map", str(mics / "gt_volumes/vol_000.mrc"),
                 "--box-size", "32", "-o", str(out), "--schedule", "8:-1:1", "--regularization", "fsc", "--reorient",
                 "--reference", str(mics / "gt_volumes/vol_000.mrc"), "--no-progress"]) == 0
    row = _rows(out / "iterations.tsv")[0]
    assert 0 < float(row["half_fsc_0.5_angstrom"]) < 200 and 0 <= float(row["turn_deg"]) < 30
    assert float(row["fsc_auc"]) > 0.2


def test_band_limited_first_pass_and_the_average_options_run(mics, tmp_path):
    """--coarse-box / --coarse-pairs / --average window reach the run (config.yaml), and a stage of box 16 with a
    first pass at box 8 runs through two iterations from the true map on noiseless micrographs."""
    out, truth = tmp_path / "coarse", str(mics / "gt_volumes/vol_000.mrc")
    assert main(["micrograph-em", str(mics / "micrographs.star"), "--initial-map", truth,
                 "--box-size", "32", "-o", str(out), "--schedule", "16:-1:2:0.5", "--coarse-box", "8",
                 "--coarse-pairs", "8", "--average", "window", "--reference", truth, "--no-progress"]) == 0
    config = (out / "config.yaml").read_text()
    assert "coarse_box: 8" in config and "average: window" in config
    rows = _rows(out / "iterations.tsv")
    assert len(rows) == 2 and float(rows[-1]["fsc_auc"]) > 0.2
