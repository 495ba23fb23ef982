"""``cryoscape analyze`` and ``cryoscape traverse`` from the command line on a tiny trained run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from cryoscape.cli.main import main
from cryoscape.io.mrc import read_mrc

SMALL = ["--dec-layers", "1", "--dec-dim", "16", "--enc-layers", "1", "--enc-dim", "16", "-b", "16",
         "--lr", "1e-3", "--no-progress", "--device", "cpu", "--norm-images", "64"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_analyze")
    data = root / "sim"
    assert main(["simulate", "-o", str(data), "-n", "64", "-D", "12", "--snr", "1", "--heterogeneity", "discrete",
                 "--n-classes", "2", "--seed", "2", "--oversampling", "1"]) == 0
    out = root / "run"
    assert main(["train", str(data / "particles.star"), "-o", str(out), "--zdim", "3", "-n", "2", *SMALL]) == 0
    return out


def test_analyze_writes_labels_maps_and_report(run, capsys):
    code = main(["analyze", str(run), "--ksample", "4", "--pc", "1", "--n-per-pc", "3", "--skip-umap",
                 "--device", "cpu", "--no-progress", "--box-size", "8"])
    assert code == 0
    out = run / "analysis.1"
    assert str(out / "report.html") in capsys.readouterr().out
    labels = np.load(out / "kmeans4" / "labels.npy")
    assert labels.shape == (64,) and set(labels.tolist()) == {0, 1, 2, 3}
    maps = sorted((out / "kmeans4").glob("vol_*.mrc")) + sorted((out / "pc1").glob("vol_*.mrc"))
    assert len(maps) == 7
    volume, pixel = read_mrc(maps[0])
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert volume.shape == (8, 8, 8) and pixel == pytest.approx(config["data"]["pixel_size_angstrom"] * 12 / 8)
    assert not (out / "pc2").exists() and not (out / "umap.npy").exists()
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["command"] == "analyze" and recorded["arguments"]["ksample"] == 4


def test_traverse_pc_line_and_graph(run, tmp_path):
    z = np.load(run / "z.1.npy")
    assert main(["traverse", str(run), "--along", "pc", "--pc", "2", "-n", "4", "-o", str(tmp_path / "pc"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert len(list((tmp_path / "pc").glob("vol_*.mrc"))) == 4
    np.savetxt(tmp_path / "ends.txt", z[[3, 40]])
    assert main(["traverse", str(run), "--along", "line", "--anchor-z", str(tmp_path / "ends.txt"), "-n", "5",
                 "-o", str(tmp_path / "line"), "--skip-vol"]) == 0
    line = np.loadtxt(tmp_path / "line" / "z_values.txt")
    np.testing.assert_allclose(line[[0, -1]], z[[3, 40]], rtol=1e-5, atol=1e-6)
    assert line.shape == (5, 3)

    from scipy.sparse.csgraph import connected_components

    from cryoscape.analysis.trajectories import build_neighbour_graph

    _, part = connected_components(build_neighbour_graph(z).adjacency, directed=False)
    members = np.flatnonzero(part == np.bincount(part).argmax())
    a, b = int(members[0]), int(members[-1])
    assert main(["traverse", str(run), "--along", "graph", "--anchors", str(a), str(b), "-o", str(tmp_path / "graph"),
                 "--device", "cpu", "--no-progress"]) == 0
    path = np.loadtxt(tmp_path / "graph" / "path_indices.txt", dtype=np.int64, ndmin=1)
    assert path[0] == a and path[-1] == b
    assert len(list((tmp_path / "graph").glob("vol_*.mrc"))) == path.size
    np.testing.assert_allclose(np.loadtxt(tmp_path / "graph" / "z_values.txt", ndmin=2), z[path], rtol=1e-5, atol=1e-6)


def test_errors_are_one_line(run, tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cryoscape analyze: error:") and "\n" not in err
    assert main(["traverse", str(run), "--along", "graph", "--anchors", "1", "99999", "--skip-vol"]) == 2
    assert "0 to 63" in capsys.readouterr().err
    assert main(["traverse", str(run), "--along", "line", "--skip-vol"]) == 2
    assert "exactly one of --anchors" in capsys.readouterr().err
    assert main(["traverse", str(run), "--along", "pc", "--anchors", "1", "2", "--skip-vol"]) == 2
    assert "takes no anchors" in capsys.readouterr().err


def test_relative_run_path_gives_working_report_links(run, tmp_path, monkeypatch):
    import shutil

    local = tmp_path / "copy"
    shutil.copytree(run, local, ignore=shutil.ignore_patterns("analysis.*"))
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "copy", "--ksample", "2", "--pc", "1", "--skip-umap", "--skip-vol", "--no-progress"]) == 0
    out = local / "analysis.1"
    sources = re.findall(r'(?:src|href)="([^"]+)"', (out / "report.html").read_text())
    assert "figures/pca_scatter.png" in sources
    assert all((out / s).exists() for s in sources), sources
