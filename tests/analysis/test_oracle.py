"""The oracle of issue 19 (analysis/oracle.py) and the variability mask, on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from cryoscape.analysis.evaluate import load_ground_truth, masked_per_image_fsc, per_image_fsc
from cryoscape.analysis.oracle import coordinate_bins, oracle_reconstructions, score_maps, truth_variability_mask
from cryoscape.fourier.masks import variability_mask


def test_coordinate_bins_equal_width_known_answer():
    c = np.array([0.0, 0.9, 1.0, 2.5, 5.0, 9.99, 10.0])
    np.testing.assert_array_equal(coordinate_bins(c, 10), [0, 0, 1, 2, 5, 9, 9])
    np.testing.assert_array_equal(coordinate_bins(c, 1), 0)
    np.testing.assert_array_equal(coordinate_bins(np.full(4, 3.0), 5), 0)
    with pytest.raises(ValueError):
        coordinate_bins(np.array([0.0, np.nan]), 2)


def two_states(D: int = 24) -> np.ndarray:
    """A fixed ball and a small cube that is present in one state and absent in the other."""
    g = np.indices((D, D, D)) - D // 2
    ball = (np.sqrt((g ** 2).sum(0)) < D / 6).astype(np.float32)
    cube = np.zeros((D, D, D), np.float32)
    cube[2:6, 2:6, 2:6] = 1.0
    return np.stack([ball, ball + cube])


def test_variability_mask_covers_the_moving_part_only():
    vols = two_states()
    mask = variability_mask(vols, dilate_pixel=1.0, edge_width_pixel=2.0).numpy()
    assert mask.shape == vols.shape[1:] and mask.dtype == np.float32
    assert np.all(mask[2:6, 2:6, 2:6] == 1.0)          # the cube itself
    assert mask[1, 3, 3] == 1.0                        # within the 1-voxel dilation
    assert 0.0 < mask[0, 3, 3] < 1.0                   # 2 voxels out: on the soft edge (0.5 at the middle)
    assert mask[0, 3, 3] == pytest.approx(0.5, abs=1e-6)
    assert mask[12, 12, 12] == 0.0                     # the fixed ball is not in it
    assert np.all(mask[9:, 9:, 9:] == 0.0)
    with pytest.raises(ValueError, match="identical"):
        variability_mask(np.stack([vols[0], vols[0]]))


def test_masked_fsc_scores_the_region_only():
    vols = two_states()
    rng = np.random.default_rng(0)
    mask = variability_mask(vols, dilate_pixel=1.0, edge_width_pixel=2.0).numpy()
    # right inside the moving region, noise elsewhere
    estimate = np.where(mask > 0, vols[1], rng.normal(size=vols[1].shape).astype(np.float32))
    masked = masked_per_image_fsc([estimate], [vols[1]], mask)
    plain = per_image_fsc([estimate], [vols[1]])
    assert masked.auc[0] == pytest.approx(1.0, abs=1e-9)
    assert plain.auc[0] < 0.8
    with pytest.raises(ValueError, match="mask"):
        masked_per_image_fsc([estimate[:-1, :-1, :-1]], [vols[1][:-1, :-1, :-1]], mask)


@pytest.fixture(scope="module")
def tiny_hinge(tmp_path_factory):
    """400 images (D=16, SNR 10) of the built-in hinge at 2 states: 0 and 60 degrees."""
    from cryoscape.cli.main import main

    out = tmp_path_factory.mktemp("oracle") / "sim"
    assert main(["simulate", "-o", str(out), "-n", "400", "-D", "16", "--snr", "10", "--hinge-states", "2",
                 "--seed", "3", "--batch-size", "200"]) == 0
    return out


def test_binned_oracle_beats_consensus_in_the_moving_region(tiny_hinge):
    from cryoscape.io.particles import load_particles

    truth = load_ground_truth(tiny_hinge)
    table = load_particles(tiny_hinge / "particles.mrcs", poses_path=tiny_hinge / "poses.pkl",
                           ctf_path=tiny_hinge / "ctf.pkl")
    bins = coordinate_bins(truth.coordinate, 2)
    np.testing.assert_array_equal(bins, truth.state_index)  # 2 states, 2 bins: the bins are the states
    consensus, per_bin = oracle_reconstructions(table, bins)
    mask = truth_variability_mask(truth)
    assert 0 < mask.mean() < 0.5
    states = truth.state_index[:60]
    c = score_maps([consensus] * len(states), states, truth, mask)
    b = score_maps([per_bin[s] for s in bins[:60]], states, truth, mask)
    assert not b.negated and not c.negated
    # knowing the state: the moving part's FSC deficit (1 - AUC) at least 2.5x smaller, better maps overall
    assert 1 - c.masked_auc.mean() > 2.5 * (1 - b.masked_auc.mean())
    assert b.auc.mean() > c.auc.mean()
    assert b.masked_auc.mean() > 0.95
    # a latent that is the coordinate itself orders the images perfectly
    perfect = score_maps([per_bin[0]], [0], truth, mask, z=truth.coordinate[:, None] * np.ones((1, 3)))
    assert perfect.spearman == pytest.approx(1.0)
