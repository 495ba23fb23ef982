"""``analyze_run`` end to end: on a trained 3-class model it finds the classes, and every file it
writes agrees with the numbers it computed."""

from __future__ import annotations

import pickle
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cryoscape.errors import InputError
from cryoscape.io.mrc import read_mrc
from cryoscape.report.analyze import AnalyzeOptions, analyze_run


def test_kmeans_finds_the_three_classes(three_class_dataset, three_class_analysis):
    """ARI between k-means (k = 3) on the latents and the simulated classes > 0.9 (measured 0.98)."""
    truth = np.load(three_class_dataset / "ground_truth.npz")["state_index"]
    labels = three_class_analysis.kmeans.labels
    assert adjusted_rand_score(truth, labels) > 0.9
    # the written labels are the computed ones, in both formats
    kdir = three_class_analysis.outdir / "kmeans3"
    np.testing.assert_array_equal(np.load(kdir / "labels.npy"), labels)
    with open(kdir / "labels.pkl", "rb") as f:
        np.testing.assert_array_equal(pickle.load(f), labels)


def test_kmeans_maps_look_like_their_classes(three_class_dataset, three_class_analysis):
    """The map at each on-data centre correlates best with the ground-truth map of its cluster's majority class."""
    truth = np.load(three_class_dataset / "ground_truth.npz")["state_index"]
    gt = [read_mrc(p)[0].astype(np.float64) for p in sorted((three_class_dataset / "gt_volumes").glob("vol_*.mrc"))]
    res = three_class_analysis
    for c, path in enumerate(res.kmeans_maps.paths):
        volume, pixel = read_mrc(path)
        assert volume.shape == (16, 16, 16) and pixel == pytest.approx(4.0)
        majority = np.bincount(truth[res.kmeans.labels == c], minlength=3).argmax()
        corr = [np.corrcoef(volume.ravel(), g.ravel())[0, 1] for g in gt]
        assert int(np.argmax(corr)) == majority, corr
    # z_values.txt holds the on-data centres' latents, nearest to the k-means centres
    kdir = res.outdir / "kmeans3"
    idx = np.loadtxt(kdir / "centers_ind.txt", dtype=np.int64)
    np.testing.assert_allclose(np.loadtxt(kdir / "z_values.txt", ndmin=2), res.z[idx], rtol=1e-5, atol=1e-6)
    centers = np.loadtxt(kdir / "centers.txt", ndmin=2)
    d = ((res.z[:, None, :] - centers[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx, d.argmin(0))


def test_pca_and_pc_traversal_files(three_class_analysis):
    res = three_class_analysis
    out = res.outdir
    proj = np.load(out / "z_pca.npy")
    comps = np.loadtxt(out / "pca_components.txt", ndmin=2)
    mean = np.loadtxt(out / "pca_mean.txt")
    np.testing.assert_allclose(mean + proj @ comps, res.z, atol=1e-4)
    assert np.loadtxt(out / "pca_explained_variance.txt").sum() == pytest.approx(1.0)
    for pc in (1, 2):
        z_pc = np.loadtxt(out / f"pc{pc}" / "z_values.txt", ndmin=2)
        coords = (z_pc - mean) @ comps.T
        lo, hi = np.percentile(proj[:, pc - 1], [5, 95])
        np.testing.assert_allclose(coords[:, pc - 1], np.linspace(lo, hi, 3), atol=1e-4)
        np.testing.assert_allclose(np.delete(coords, pc - 1, axis=1), 0, atol=1e-4)
        assert len(res.pc_maps[pc].paths) == 3
    umap = np.load(out / "umap.npy")
    assert umap.shape == (res.z.shape[0], 2) and np.isfinite(umap).all()


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "td":
            self._in_td = True
            self.cells.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self.cells[-1] += data


def test_report_lists_plots_cluster_table_and_maps(three_class_analysis):
    res = three_class_analysis
    text = res.report.read_text()
    parser = _Collect()
    parser.feed(text)
    names = {Path(s).name for s in parser.images}
    for expected in ("pca_scatter.png", "pca_density.png", "umap_scatter.png", "umap_density.png", "kmeans_pca.png",
                     "kmeans_umap.png", "kmeans_maps.png", "pc1_maps.png", "learning_curve.png", "z_marginals.png"):
        assert expected in names
    for src in parser.images + parser.links:
        assert not Path(src).is_absolute() and (res.outdir / src).is_file(), src
    for path in res.kmeans_maps.paths:
        assert path.relative_to(res.outdir).as_posix() in parser.links
    # cluster table: 5 cells per cluster, particle counts add up to N
    counts = [int(parser.cells[5 * c + 1]) for c in range(3)]
    assert counts == res.kmeans.counts.tolist() and sum(counts) == res.z.shape[0]
    assert re.search(r"epoch 4", text)


def test_zdim_1_uses_histograms_and_recovers_clusters(tmp_path):
    """A zdim-1 run (latents only, no weights: --skip-vol) gets histograms, no scatter or UMAP."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 3000)
    z = (np.array([-2.0, 0.0, 2.5])[truth] + 0.3 * rng.normal(size=3000)).astype(np.float32)[:, None]
    run = tmp_path / "run"
    run.mkdir()
    np.save(run / "z.0.npy", z + 5)
    np.save(run / "z.1.npy", z)
    res = analyze_run(run, AnalyzeOptions(ksample=3, n_pcs=2, skip_vol=True), progress=False)
    assert res.epoch == 1 and res.outdir == run / "analysis.1"
    assert adjusted_rand_score(truth, res.kmeans.labels) > 0.95
    assert res.umap is None and not (res.outdir / "umap.npy").exists()
    assert list(res.pc_coordinates) == [1]  # one latent dimension, one PC
    figures = sorted(p.name for p in (res.outdir / "figures").glob("*.png"))
    assert "z_histogram.png" in figures and "kmeans_histogram.png" in figures
    assert not any("scatter" in f or "umap" in f for f in figures)
    assert "Learning curve" not in res.report.read_text()  # no checkpoint in this folder


def test_bad_inputs_are_one_sentence(tmp_path):
    with pytest.raises(InputError, match="holds no z.EPOCH.npy"):
        analyze_run(tmp_path, progress=False)
    np.save(tmp_path / "z.0.npy", np.zeros((10, 2), np.float32))
    with pytest.raises(InputError, match="no latents for epoch 3"):
        analyze_run(tmp_path, AnalyzeOptions(epoch=3), progress=False)
    bad = np.zeros((10, 2), np.float32)
    bad[4, 1] = np.nan
    np.save(tmp_path / "z.1.npy", bad)
    with pytest.raises(InputError, match="NaN"):
        analyze_run(tmp_path, progress=False)


@pytest.mark.slow
def test_finishes_on_500k_particles(tmp_path):
    """500k latents (zdim 8, 10 clusters), no maps: k-means finds the clusters and UMAP covers every
    particle (fitted on 20k, the rest placed by neighbours) in a few minutes on 2 CPU cores."""
    import time

    rng = np.random.default_rng(0)
    n = 500_000
    truth = rng.integers(0, 10, n)
    centres = rng.normal(scale=3.0, size=(10, 8))
    z = (centres[truth] + rng.normal(size=(n, 8)) * 0.4).astype(np.float32)
    run = tmp_path / "run"
    run.mkdir()
    np.save(run / "z.0.npy", z)
    start = time.perf_counter()
    res = analyze_run(run, AnalyzeOptions(ksample=10, skip_vol=True), progress=False)
    seconds = time.perf_counter() - start
    assert adjusted_rand_score(truth, res.kmeans.labels) > 0.95
    umap = np.load(res.outdir / "umap.npy")
    assert umap.shape == (n, 2) and np.isfinite(umap).all()
    assert np.load(res.outdir / "umap_fit_indices.npy").size == 20_000
    assert seconds < 900, res.seconds


def test_umap_falls_back_to_this_process_when_the_child_fails(tmp_path, monkeypatch):
    import sys

    from cryoscape.analysis.latent import UMAPResult
    from cryoscape.report import analyze as pipeline

    calls = []

    def fake_umap(z, **kwargs):
        calls.append(kwargs)
        return UMAPResult(embedding=np.zeros((z.shape[0], 2), np.float32), fit_indices=np.arange(z.shape[0]))

    monkeypatch.setattr(pipeline, "compute_umap", fake_umap)
    z = np.ones((5, 3), np.float32)
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the child exits with status 1
    job = pipeline._UMAPJob(tmp_path, 0, z, tmp_path, fit_max=7, seed=3, background=True)
    assert job.background
    assert job.result().embedding.shape == (5, 2) and calls == [{"fit_max": 7, "seed": 3}]
    assert not job.background and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))  # cannot start at all
    job = pipeline._UMAPJob(tmp_path, 0, z, tmp_path, fit_max=7, seed=3, background=True)
    assert not job.background and job.result().embedding.shape == (5, 2) and len(calls) == 2


def test_umap_ran_in_the_background(three_class_analysis):
    log = (three_class_analysis.outdir / "analyze.log").read_text()
    assert "in a background process" in log
    assert not list(three_class_analysis.outdir.glob(".umap*"))
