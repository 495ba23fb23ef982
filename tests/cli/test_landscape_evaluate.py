"""``cryoscape landscape`` and ``cryoscape evaluate`` on one real (tiny) trained run of a simulated dataset."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
import yaml

from cryoscape.cli.main import main
from cryoscape.io.mrc import read_mrc, write_mrc
from cryoscape.train.config import TrainConfig
from cryoscape.train.loop import run_training
from cryoscape.train.volumes import load_trained_model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("landscape_cli")
    data = root / "sim"
    assert main(["simulate", "-o", str(data), "-n", "64", "-D", "16", "--snr", "1", "--heterogeneity", "discrete",
                 "--n-classes", "2", "--seed", "0", "--oversampling", "1"]) == 0
    run = root / "run"
    config = TrainConfig(particles=str(data / "particles.star"), zdim=2, num_epochs=2, dec_layers=1, dec_dim=16,
                         enc_layers=1, enc_dim=16, batch_size=16, lr=1e-2, progress=False, checkpoint_every=1)
    run_training(config, run)
    return run


@pytest.fixture(scope="module")
def sim(tiny_run):
    return tiny_run.parent / "sim"


def test_landscape_command_writes_maps_from_the_decoder_and_a_report(tiny_run, capsys, tmp_path):
    # a 2-epoch model makes a spike at the centre, so the default half-maximum mask would hold a voxel or
    # two: pass a ball at the training box (16), resampled to the landscape box (8)
    grid = np.indices((16, 16, 16)) - 8
    write_mrc(tmp_path / "ball.mrc", (np.sqrt((grid**2).sum(0)) <= 6).astype(np.float32))
    code = main(["landscape", str(tiny_run), "--sketch-size", "10", "--box-size", "8", "--mlp-samples", "8",
                 "--mlp-epochs", "5", "-M", "2", "--pcs", "3", "--mask", str(tmp_path / "ball.mrc"), "--pc-maps", "3",
                 "--write-sketch-maps",
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    assert "landscape of 64 particles from 10 sketch maps" in capsys.readouterr().out
    out = tiny_run / "landscape.1"  # the latest epoch (0-based)
    summary = yaml.safe_load((out / "summary.yaml").read_text())
    assert summary["sketch_size"] == 10 and summary["box_size"] == 8 and summary["n_particles"] == 64
    assert sum(summary["clusters"]["particles"]) == 64 and sum(summary["clusters"]["volumes"]) == 10
    # sketch maps are the decoder's maps at the sketch latents, at box 8 with the pixel size scaled
    decoder, _, _ = load_trained_model(tiny_run)
    z = np.load(tiny_run / "z.1.npy")
    sketch = np.loadtxt(out / "sketch_indices.txt", dtype=np.int64)
    vol, pixel = read_mrc(out / "sketch" / "vol_003.mrc")
    expected = decoder.eval_volume(torch.as_tensor(z[sketch[3]]), box_size=8).numpy()
    np.testing.assert_allclose(vol, expected, rtol=1e-5, atol=1e-6)
    assert pixel == pytest.approx(15.625 * 16 / 8, rel=1e-5)
    mask, _ = read_mrc(out / "mask.mrc")
    assert mask.sum() == 123  # the lattice points within 3 voxels of the centre (radius 6 at box 16)
    with open(out / "cluster_labels.pkl", "rb") as f:
        assert pickle.load(f).shape == (64,)
    assert np.load(out / "landscape_pcs.npy").shape == (64, 3)
    # the report shows every figure it names (write_html_report refuses missing ones)
    html = (out / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert {"landscape.png", "sketch_pcs.png", "explained_variance.png", "cluster_counts.png"} <= set(images)
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in images)
    assert "landscape.log" in {p.name for p in out.iterdir()} and (out / "config.yaml").is_file()


def test_landscape_bad_options_are_one_sentence(tiny_run, capsys, tmp_path):
    assert main(["landscape", str(tiny_run), "--metric", "cosine", "-o", str(tmp_path / "x")]) == 2
    assert "Ward linkage needs the euclidean metric" in capsys.readouterr().err
    assert main(["landscape", str(tiny_run), "--epoch", "9", "-o", str(tmp_path / "x")]) == 2
    assert "epoch 9" in capsys.readouterr().err


def test_evaluate_command_scores_the_decoder_maps_against_the_truth(tiny_run, sim, capsys):
    from cryoscape.analysis.evaluate import load_ground_truth, per_image_fsc

    assert main(["evaluate", str(tiny_run), "--truth", str(sim), "--n-images", "5", "--device", "cpu",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "per-image FSC (5 images)" in printed and "ARI" in printed
    out = tiny_run / "evaluate.1"
    table = np.loadtxt(out / "per_image_fsc.txt")
    assert table.shape == (5, 11)
    np.testing.assert_array_equal(table[:, 1], [0, 16, 32, 47, 63])  # evenly spaced dataset rows
    # the first image's AUC is the FSC of the decoder's map at its latent against its state's true map
    gt = load_ground_truth(sim)
    decoder, _, _ = load_trained_model(tiny_run)
    z = np.load(tiny_run / "z.1.npy")
    vol = decoder.eval_volume(torch.as_tensor(z[16])).numpy()
    expected = per_image_fsc([vol], [gt.volume(gt.state_index[16])], truth_box_pixel=(16, gt.pixel_size_angstrom))
    assert table[1, 4] == pytest.approx(float(expected.auc[0]), rel=1e-4)
    assert 0 < table[:, 4].min() and table[:, 4].max() <= 1
    saved = yaml.safe_load((out / "evaluation.yaml").read_text())
    assert saved["source"]["epoch"] == 1 and saved["n_particles"] == 64
    assert -1 <= saved["clusters"]["adjusted_rand_index"] <= 1
    html = (out / "report.html").read_text()
    assert "Per-image FSC" in html and "per_image_fsc.png" in html and "Clusters against the true classes" in html


def test_evaluate_relative_output_folder(tiny_run, sim, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(tiny_run), "--truth", str(sim), "--n-images", "2", "-o", "ev", "--no-progress",
                 "--device", "cpu", "--poses", str(sim / "poses.pkl")]) == 0
    html = (tmp_path / "ev" / "report.html").read_text()
    assert 'src="per_image_fsc.png"' in html  # figure paths relative to the report, wherever it was started
    assert "Poses" in html and 'src="pose_errors.png"' in html
    saved = yaml.safe_load((tmp_path / "ev" / "evaluation.yaml").read_text())
    assert saved["poses"]["angle_deg_median"] < 1e-4  # the true poses


def test_evaluate_errors(tiny_run, sim, tmp_path, capsys):
    assert main(["evaluate", "--truth", str(sim)]) == 2
    assert "pass a run folder" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_run), "--truth", str(tmp_path)]) == 2
    assert "ground_truth.npz" in capsys.readouterr().err


def test_evaluate_poses_against_a_reference_refinement(sim, tmp_path, capsys):
    """Real-data mode: poses (a cryoDRGN poses.pkl of a turned map, a subset by --ind) against a
    RELION .star refinement; the global turn is found, the errors are the ones we added."""
    from cryoscape.geometry.rotations import rotation_about_axis

    truth = np.load(sim / "ground_truth.npz")
    rows = np.arange(0, 64, 2)
    G = rotation_about_axis(np.array([0.0, 1.0, 1.0]), 2.0)
    noise = rotation_about_axis(np.array([1.0, 0.0, 0.0]), np.radians(np.where(rows % 4 == 0, 2.0, 4.0)))
    R = noise @ truth["rotations"][rows] @ G.T  # every pose off by 2 or 4 degrees, in a turned frame
    with open(tmp_path / "poses.pkl", "wb") as f:
        pickle.dump((R.astype(np.float32), truth["shifts_pixel"][rows] / 16), f)
    with open(tmp_path / "ind.pkl", "wb") as f:
        pickle.dump(rows, f)
    out = tmp_path / "eval"
    assert main(["evaluate", "--poses", str(tmp_path / "poses.pkl"), "--reference-poses", str(sim / "particles.star"),
                 "--ind", str(tmp_path / "ind.pkl"), "--box-size", "16", "-o", str(out)]) == 0
    assert "rotation error" in capsys.readouterr().out
    poses = yaml.safe_load((out / "evaluation.yaml").read_text())["poses"]
    assert poses["n_particles"] == 32 and not poses["handedness_flipped"]
    assert 2.0 < poses["angle_deg_median"] < 4.1 and poses["angle_deg_mean"] == pytest.approx(3.0, abs=0.25)
    assert poses["translation_pixel_median"] < 0.01
    assert main(["evaluate", "--poses", str(tmp_path / "poses.pkl"), "-o", str(out)]) == 2
    assert "--reference-poses" in capsys.readouterr().err
