"""``cryoscape select`` from the command line: criteria, outputs, the PNG and clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import yaml

from cryoscape.cli.main import main
from cryoscape.io.star import read_star_blocks

N = 60


@pytest.fixture()
def run(tmp_path) -> Path:
    """A 60-particle .star, and a run folder trained on its even rows with two latent blobs."""
    data = tmp_path / "data"
    data.mkdir()
    with mrcfile.new(data / "stack.mrcs") as m:
        m.set_data(np.zeros((N, 6, 6), np.float32))
    optics = ("data_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n_rlnImagePixelSize #3\n"
              "_rlnImageSize #4\n_rlnVoltage #5\n_rlnSphericalAberration #6\n_rlnAmplitudeContrast #7\n"
              "opticsGroup1 1 2.0 6 300 2.7 0.1\n\n")
    rows = "".join(f"{i + 1}@stack.mrcs 1 {i}.5 {i % 4}\n" for i in range(N))
    (data / "particles.star").write_text(
        optics + "data_particles\n\nloop_\n_rlnImageName #1\n_rlnOpticsGroup #2\n_rlnAngleRot #3\n_rlnGroupNumber #4\n"
        + rows)
    ind = np.arange(0, N, 2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    np.savetxt(run_dir / "ind.txt", ind, fmt="%d")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"training": {
        "particles": str(data / "particles.star"), "ind": str(run_dir / "ind.txt"), "first": None}}))
    rng = np.random.default_rng(0)
    z = np.where((np.arange(len(ind)) < 10)[:, None], [3.0, 3.0], [-3.0, -3.0]) + 0.2 * rng.normal(size=(len(ind), 2))
    np.save(run_dir / "z.4.npy", z.astype(np.float32))
    return run_dir


def test_select_polygon_writes_star_indices_and_png(run, tmp_path, capsys):
    poly = tmp_path / "poly.txt"
    poly.write_text("# a square around the first blob, in latent coordinates (--embedding z)\n"
                    "0 0\n6 0\n6 6\n0 6\n")
    out = tmp_path / "sel" / "blob.star"
    assert main(["select", str(run), "--polygon", str(poly), "--embedding", "z", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "selected 10 of 30 particles" in printed
    rows = np.arange(0, 20, 2)  # positions 0..9 -> even rows 0..18
    with open(out.with_suffix(".ind.pkl"), "rb") as f:
        np.testing.assert_array_equal(pickle.load(f), rows)
    blocks = read_star_blocks(out)
    assert blocks["particles"]["rlnAngleRot"].tolist() == [r + 0.5 for r in rows]
    assert blocks["optics"]["rlnImagePixelSize"].tolist() == [2.0]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_select_kmeans_inverted_to_text_and_cs(run, tmp_path):
    out = tmp_path / "rest.txt"
    assert main(["select", str(run), "--kmeans", "2", "--cluster", "0", "--invert-selection", "-o", str(out),
                 "--no-plot"]) == 0
    picked = np.loadtxt(out, dtype=np.int64)
    # one blob, as original rows: either the first ten even rows or the other twenty
    assert picked.tolist() in (list(range(0, 20, 2)), list(range(20, N, 2)))
    assert (tmp_path / "rest.star").is_file() and not (tmp_path / "rest.png").exists()
    # the same particles as a .cs built from the STAR rows
    assert main(["select", str(run), "--ind", str(run / "ind.txt"), "--train-ind", str(run / "ind.txt"),
                 "-o", str(tmp_path / "x.cs"), "--no-plot"]) == 2  # ind.txt holds rows up to 58, not positions < 30
    np.savetxt(tmp_path / "pos.txt", [0, 29], fmt="%d")
    assert main(["select", str(run), "--ind", str(tmp_path / "pos.txt"), "-o", str(tmp_path / "x.cs"),
                 "--no-plot"]) == 0
    records = np.load(tmp_path / "x.cs")
    assert records["blob/idx"].tolist() == [0, 58]


def test_select_errors_are_one_sentence(run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert main(["select", str(run), "--interactive", "-o", str(tmp_path / "a.star")]) == 2
    err = capsys.readouterr().err
    assert "no display" in err and "--polygon FILE" in err and "Traceback" not in err
    assert main(["select", str(run), "-o", str(tmp_path / "a.star")]) == 2
    assert "exactly one selection criterion" in capsys.readouterr().err
    assert main(["select", str(run), "--gmm", "2", "-o", str(tmp_path / "a.star")]) == 2
    assert "pass --component" in capsys.readouterr().err
    assert main(["select", str(run), "--outliers", "--epoch", "3", "-o", str(tmp_path / "a.star")]) == 2
    assert "epochs with z.EPOCH.npy: 4" in capsys.readouterr().err
    assert main(["select", str(run), "--outliers", "--norm-percentile", "100", "-o", str(tmp_path / "a.star")]) == 2
    assert "selection is empty" in capsys.readouterr().err


def test_select_absolute_paths_points_at_the_stacks(run, tmp_path):
    """--absolute-paths writes rlnImageName with the stack's absolute path; the default keeps the input's name."""
    np.savetxt(tmp_path / "pos.txt", [1, 2], fmt="%d")
    kept, absolute = tmp_path / "elsewhere" / "kept.star", tmp_path / "elsewhere" / "abs.star"
    common = ["select", str(run), "--ind", str(tmp_path / "pos.txt"), "--no-plot"]
    assert main(common + ["-o", str(kept)]) == 0
    assert main(common + ["-o", str(absolute), "--absolute-paths"]) == 0
    stack = (tmp_path / "data" / "stack.mrcs").resolve()
    names = read_star_blocks(absolute)["particles"]["rlnImageName"].tolist()
    parsed = [(int(n.split("@")[0]), n.split("@")[1]) for n in names]
    assert parsed == [(3, str(stack)), (5, str(stack))]  # rows 2 and 4 of the file, 1-based slices
    assert read_star_blocks(kept)["particles"]["rlnImageName"].tolist() != names
