"""Evaluation against the truth: numbers on cases with known answers, and the pipeline on a tiny dataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import yaml

from cryoscape.analysis.evaluate import (
    cluster_agreement,
    evaluate_against_truth,
    evenly_spaced_indices,
    latent_correlation,
    list_map_files,
    load_ground_truth,
    per_image_fsc,
    score_map_files,
)
from cryoscape.errors import InputError
from cryoscape.io.mrc import write_mrc


def blob_map(D: int, seed: int) -> np.ndarray:
    """A lumpy, chiral test map: a few random Gaussians."""
    rng = np.random.default_rng(seed)
    g = np.indices((D, D, D)).astype(np.float64) - D // 2
    v = np.zeros((D, D, D))
    for _ in range(5):
        c = rng.uniform(-D / 5, D / 5, 3)
        v += np.exp(-((g - c[:, None, None, None]) ** 2).sum(0) / (2 * (D / 12) ** 2))
    return v.astype(np.float32)


@pytest.mark.parametrize("D", [9, 10])
def test_maps_equal_to_truth_score_one_and_nyquist(D):
    truth = [blob_map(D, s) for s in range(3)]
    f = per_image_fsc(truth, truth, pixel_size_angstrom=2.0)
    np.testing.assert_allclose(f.auc, 1.0, atol=1e-9)
    np.testing.assert_allclose(f.res_0_5, 0.5)  # never below the threshold: Nyquist
    np.testing.assert_allclose(f.res_0_143, 0.5)
    np.testing.assert_allclose(f.angstrom(f.res_0_5), 4.0)  # 2 pixels
    np.testing.assert_allclose(f.correlation, 1.0, atol=1e-9)
    assert f.curves.shape == (3, D // 2 + 1) and f.box_size == D
    s = f.summary()
    assert s["auc_mean"] == pytest.approx(1.0) and s["res_0_5_angstrom_of_mean"] == pytest.approx(4.0)


def test_fsc_degrades_with_noise_and_detects_sign_and_hand():
    D = 16
    truth = blob_map(D, 0)
    rng = np.random.default_rng(1)
    aucs, res = [], []
    for sigma in (0.01, 0.1, 0.5):
        noisy = truth + sigma * truth.std() * rng.normal(size=truth.shape).astype(np.float32) * 10
        f = per_image_fsc([noisy], [truth])
        aucs.append(f.auc[0])
        res.append(f.res_0_5[0])
    assert aucs[0] > aucs[1] > aucs[2] and aucs[2] < 0.8
    assert res[0] >= res[1] >= res[2] and res[2] < 0.5
    f = per_image_fsc([-truth, truth[::-1].copy()], [truth, truth])
    assert f.correlation[0] == pytest.approx(-1.0) and f.auc[0] == pytest.approx(1.0)  # |FSC| hides the sign...
    assert f.auc_mirror[1] == pytest.approx(1.0) and f.auc[1] < 0.99  # ...the mirror check finds the hand


def test_truth_at_a_larger_box_is_fourier_cropped():
    big = blob_map(20, 3)
    from cryoscape.fourier.resample import downsample_volume
    import torch

    small = downsample_volume(torch.as_tensor(big), 10).numpy()
    f = per_image_fsc([small], [big], truth_box_pixel=(20, 1.5))
    assert f.box_size == 10 and f.pixel_size_angstrom == pytest.approx(3.0)
    assert f.auc[0] == pytest.approx(1.0, abs=1e-6)


def test_evenly_spaced_indices():
    idx = evenly_spaced_indices(1000, 100)
    assert len(idx) == 100 and idx[0] == 0 and idx[-1] == 999
    assert np.all(np.diff(idx) >= 9) and np.all(np.diff(idx) <= 11)
    np.testing.assert_array_equal(evenly_spaced_indices(7, 100), np.arange(7))


def test_latent_correlation_true_vs_shuffled():
    rng = np.random.default_rng(0)
    coordinate = rng.uniform(0, 60, 500)
    z = np.stack([np.sin(coordinate / 40.0) + 0.01 * rng.normal(size=500), rng.normal(size=500)], 1)
    good = latent_correlation(z * [1.0, 0.01], coordinate)
    assert good["spearman_pc1"] > 0.99 and good["best_dim"] == 0 and good["n"] == 500
    shuffled = latent_correlation(z[rng.permutation(500)], coordinate)
    assert shuffled["spearman_pc1"] < 0.15
    nan = latent_correlation(z, np.full(500, np.nan))
    assert np.isnan(nan["spearman_pc1"])


def test_cluster_agreement_perfect_renamed_and_random():
    truth = np.repeat([0, 1, 2], 50)
    perfect = cluster_agreement(np.choose(truth, [7, 3, 5]), truth)
    assert perfect["adjusted_rand_index"] == pytest.approx(1.0)
    assert perfect["normalized_mutual_info"] == pytest.approx(1.0)
    assert perfect["contingency"] == [[0, 0, 50], [50, 0, 0], [0, 50, 0]]  # columns: predicted 3, 5, 7
    random = cluster_agreement(np.random.default_rng(0).integers(0, 3, 150), truth)
    assert abs(random["adjusted_rand_index"]) < 0.05


# ------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def tiny_truth(tmp_path_factory):
    from cryoscape.cli.main import main

    out = tmp_path_factory.mktemp("eval") / "sim"
    assert main(["simulate", "-o", str(out), "-n", "40", "-D", "12", "--snr", "1", "--heterogeneity", "discrete",
                 "--n-classes", "3", "--seed", "0", "--oversampling", "1"]) == 0
    return out


def test_ground_truth_reading(tiny_truth):
    gt = load_ground_truth(tiny_truth)
    assert len(gt) == 40 and gt.n_states == 3 and gt.kind == "discrete" and gt.box_size == 12
    assert gt.volume(2).shape == (12, 12, 12)
    with pytest.raises(InputError, match="ground_truth.npz"):
        load_ground_truth(tiny_truth / "gt_volumes")


def test_pipeline_with_another_tools_latents_maps_and_ind(tiny_truth, tmp_path):
    gt = load_ground_truth(tiny_truth)
    ind = np.arange(0, 40, 2)  # the "tool" was trained on the even rows
    with open(tmp_path / "ind.pkl", "wb") as f:
        pickle.dump(ind, f)
    rng = np.random.default_rng(0)
    states = gt.state_index[ind]
    z = np.eye(3)[states] * 5 + 0.1 * rng.normal(size=(len(ind), 3))  # perfect classes in the latents
    with open(tmp_path / "z.pkl", "wb") as f:
        pickle.dump(z.astype(np.float32), f)
    out = tmp_path / "eval"

    # step 1: no maps yet -> the latents to decode are written, the FSC is skipped with a note
    ev = evaluate_against_truth(tiny_truth, z_path=tmp_path / "z.pkl", ind=tmp_path / "ind.pkl", n_images=6,
                                out_dir=out, progress=False)
    assert ev.fsc is None and any("eval_z.txt" in n for n in ev.notes)
    positions = evenly_spaced_indices(len(ind), 6)
    np.testing.assert_allclose(np.loadtxt(out / "eval_z.txt"), z[positions], rtol=1e-5)
    assert ev.clusters["adjusted_rand_index"] == pytest.approx(1.0)

    # step 2: the tool decoded them: here, exactly the true maps -> AUC 1
    maps = tmp_path / "maps"
    maps.mkdir()
    for j, p in enumerate(positions):
        write_mrc(maps / f"vol_{j:03d}.mrc", gt.volume(gt.state_index[ind[p]]),
                  pixel_size_angstrom=gt.pixel_size_angstrom)
    ev = evaluate_against_truth(tiny_truth, z_path=tmp_path / "z.pkl", ind=tmp_path / "ind.pkl", n_images=6,
                                maps_dir=maps, poses=tiny_truth / "poses.pkl", out_dir=out, progress=False)
    np.testing.assert_allclose(ev.fsc.auc, 1.0, atol=1e-6)
    np.testing.assert_allclose(ev.fsc.res_0_143, 0.5)
    assert ev.poses["angle_deg_median"] < 1e-4 and ev.poses["n_particles"] == 20  # of all 40 rows, 20 used
    assert ev.poses["translation_pixel_mean"] < 1e-6
    table = np.loadtxt(out / "per_image_fsc.txt")
    np.testing.assert_array_equal(table[:, 1], ind[positions])  # dataset rows of the evaluated images
    saved = yaml.safe_load((out / "evaluation.yaml").read_text())
    assert saved["per_image_fsc"]["auc_mean"] == pytest.approx(1.0)
    assert saved["clusters"]["adjusted_rand_index"] == pytest.approx(1.0)
    # a wrong map for one image lowers only that image
    write_mrc(maps / "vol_002.mrc", np.roll(gt.volume(gt.state_index[ind[positions[2]]]), 3, axis=0))
    f = score_map_files(list_map_files(maps), gt.state_index[ind[positions]], tiny_truth)
    assert f.auc[2] < 0.9 and np.delete(f.auc, 2) == pytest.approx(1.0)

    with pytest.raises(InputError, match="holds 6 maps but 5 images are evaluated"):
        evaluate_against_truth(tiny_truth, z_path=tmp_path / "z.pkl", ind=tmp_path / "ind.pkl", n_images=5,
                               maps_dir=maps, out_dir=out, progress=False)
    with pytest.raises(InputError, match="--ind with their rows"):
        evaluate_against_truth(tiny_truth, z_path=tmp_path / "z.pkl", out_dir=out, progress=False)


def test_poses_alone_and_maps_of_a_turned_frame(tiny_truth, tmp_path):
    """Ab initio output: poses and maps in another frame and hand.  The poses score ~0 error after
    the global alignment, and the maps are turned back by it before the FSC."""
    from cryoscape.analysis.pose_accuracy import map_in_reference_frame
    from cryoscape.geometry.rotations import rotation_about_axis

    gt = load_ground_truth(tiny_truth)
    G = rotation_about_axis(np.array([1.0, 2.0, -0.5]), 0.7)
    F = np.diag([1.0, 1.0, -1.0])
    R_pred = F @ (gt.rotations @ G.T) @ F  # the poses of the mirrored, turned map
    with open(tmp_path / "poses.pkl", "wb") as f:
        pickle.dump((R_pred.astype(np.float32), gt.shifts_pixel / gt.box_size), f)
    ev = evaluate_against_truth(tiny_truth, poses=tmp_path / "poses.pkl", out_dir=tmp_path / "p", progress=False)
    assert ev.fsc is None and ev.poses["handedness_flipped"] and ev.poses["rotation_frobenius_median"] < 1e-8
    assert not ev.notes

    # maps in that frame: V_pred(Y) = V_true((F G)^-1 Y); the inverse of map_in_reference_frame's turn
    positions = evenly_spaced_indices(len(gt), 4)
    maps = tmp_path / "maps"
    maps.mkdir()
    inverse = np.linalg.inv(F @ G)
    for j, p in enumerate(positions):
        truth = gt.volume(gt.state_index[p])
        write_mrc(maps / f"vol_{j:03d}.mrc", map_in_reference_frame(truth, inverse, False))
    turned = evaluate_against_truth(tiny_truth, poses=tmp_path / "poses.pkl", maps_dir=maps, n_images=4,
                                    out_dir=tmp_path / "m", progress=False)
    plain = score_map_files(list_map_files(maps), gt.state_index[positions], tiny_truth)
    assert any("turned into the truth's frame" in n for n in turned.notes)
    assert turned.fsc.auc.mean() > plain.auc.mean() + 0.1  # the turn back mattered
    assert turned.fsc.correlation.min() > 0.9
