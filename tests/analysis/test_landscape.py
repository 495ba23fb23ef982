"""Landscape analysis (thesis ch. 6): sketch, masks, volume PCA, clustering, the MLP, and the pipeline."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cryoscape.analysis.landscape import (
    LandscapeOptions,
    cluster_volumes,
    compute_landscape,
    load_latent_to_pc_mlp,
    pc_traversal_values,
    read_mask,
    sketch_latents,
    train_latent_to_pc_mlp,
    union_threshold_mask,
    volume_pca,
)
from cryoscape.errors import InputError
from cryoscape.io.mrc import read_mrc, write_mrc

D = 20


@pytest.fixture(scope="module")
def hinge_maps():
    """12 maps of the built-in hinge molecule, hinge angle 2.5 ... 57.5 degrees."""
    from cryoscape.simulate.ensembles import hinge_ensemble
    from cryoscape.simulate.molecule import default_pixel_size_angstrom

    pixel = default_pixel_size_angstrom(D)
    ens = hinge_ensemble(box_size=D, pixel_size_angstrom=pixel, resolution_angstrom=2 * pixel, n_states=12)
    return ens.volumes.astype(np.float32), np.asarray(ens.state_values, dtype=np.float64)


def hinge_generator(maps: np.ndarray, angles: np.ndarray):
    """A stand-in decoder: z[0] is the hinge angle / 60; maps are interpolated linearly between states."""

    def generate(z: np.ndarray) -> np.ndarray:
        a = float(np.clip(z[0] * 60.0, angles[0], angles[-1]))
        j = int(np.clip(np.searchsorted(angles, a) - 1, 0, len(angles) - 2))
        t = (a - angles[j]) / (angles[j + 1] - angles[j])
        return (1 - t) * maps[j] + t * maps[j + 1]

    return generate


def test_pca_of_hinge_maps_puts_the_angle_on_pc1(hinge_maps):
    maps, angles = hinge_maps
    mask = union_threshold_mask(maps)
    x = maps.reshape(len(maps), -1)[:, mask.reshape(-1)]
    pca = volume_pca(x, 5)
    assert abs(spearmanr(pca.scores[:, 0], angles).statistic) > 0.9
    assert pca.explained_variance_ratio[0] > pca.explained_variance_ratio[1]
    # orthonormal components; scores reproduce the centred maps' projections
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(len(pca.components)), atol=1e-8)
    np.testing.assert_allclose(pca.transform(x), pca.scores, atol=1e-6 * np.abs(pca.scores).max())
    blocked = volume_pca(x, 5, block_columns=7)  # the column blocks give the same answer
    np.testing.assert_allclose(blocked.components, pca.components, atol=1e-10)
    # variances agree with scikit-learn's PCA
    from sklearn.decomposition import PCA

    ref = PCA(n_components=5).fit(x.astype(np.float64))
    np.testing.assert_allclose(pca.explained_variance, ref.explained_variance_, rtol=1e-6)
    np.testing.assert_allclose(np.abs(pca.scores), np.abs(ref.transform(x)), rtol=1e-5, atol=1e-8)


def test_union_threshold_mask_and_user_mask(tmp_path):
    a = np.zeros((6, 6, 6))
    b = np.zeros((6, 6, 6))
    a[1, 1, 1], a[2, 2, 2] = 10.0, 4.0  # 4 < 0.5 * 10: out
    b[3, 3, 3], b[4, 4, 4] = 1.0, 0.6
    mask = union_threshold_mask([a, b], threshold=0.5)
    assert sorted(map(tuple, np.argwhere(mask))) == [(1, 1, 1), (3, 3, 3), (4, 4, 4)]
    # a user mask at another box is resampled to the same field of view
    big = np.zeros((12, 12, 12), np.float32)
    big[:6] = 1.0  # lower half along z
    write_mrc(tmp_path / "m.mrc", big)
    small = read_mask(tmp_path / "m.mrc", 6)
    assert small.shape == (6, 6, 6) and small[:3].all() and not small[3:].any()
    write_mrc(tmp_path / "zero.mrc", np.zeros((6, 6, 6), np.float32))
    with pytest.raises(InputError, match="no voxel above 0.5"):
        read_mask(tmp_path / "zero.mrc", 6)


def test_sketch_is_on_data_and_nearest_to_centres():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 3)).astype(np.float32)
    sk = sketch_latents(z, 20, seed=1)
    assert sk.indices.shape == (20,) and len(np.unique(sk.indices)) == 20
    assert sk.labels.shape == (300,)
    for c in range(20):
        members = np.flatnonzero(sk.labels == c)
        d = np.linalg.norm(z[members] - sk.centres[c], axis=1)
        assert sk.indices[c] == members[np.argmin(d)]
    assert len(sketch_latents(z[:5], 50).indices) == 5  # k reduced to N


def test_agglomerative_clusters_separate_states_and_are_ordered():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 50)) * 10
    sizes = [5, 20, 10]
    x = np.concatenate([c + rng.normal(size=(s, 50)) for c, s in zip(centres, sizes)])
    truth = np.repeat([0, 1, 2], sizes)
    for linkage, metric in (("ward", "euclidean"), ("average", "cosine"), ("complete", "l1")):
        labels = cluster_volumes(x, 3, linkage=linkage, metric=metric)
        # numbered by size: the 20-member state is cluster 0, the 10-member one cluster 1
        np.testing.assert_array_equal(labels, np.repeat([2, 0, 1], sizes))
    weights = np.where(truth == 0, 100.0, 1.0)  # few maps holding many particles come first
    assert cluster_volumes(x, 3, weights=weights)[0] == 0
    with pytest.raises(InputError, match="Ward linkage needs the euclidean"):
        LandscapeOptions(linkage="ward", metric="cosine").validate()


def test_mlp_learns_a_smooth_map(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.uniform(-2, 2, size=(300, 2)).astype(np.float32)
    v = np.stack([np.sin(z[:, 0]) * 5, z[:, 1] ** 2 - z[:, 0]], axis=1)
    fit = train_latent_to_pc_mlp(z, v, epochs=30, seed=0)
    assert fit.val_r2.min() > 0.9
    assert len(fit.val_true) == 75  # 3:1 split
    assert fit.val_loss[fit.best_epoch] == min(fit.val_loss)
    again = train_latent_to_pc_mlp(z, v, epochs=30, seed=0)
    np.testing.assert_allclose(again.val_pred, fit.val_pred)  # seeded, and the global RNG is not used
    torch.save({"config": fit.model.config, "state": fit.model.state_dict()}, tmp_path / "mlp.pt")
    np.testing.assert_allclose(load_latent_to_pc_mlp(tmp_path / "mlp.pt").predict(z[:5]), fit.model.predict(z[:5]))


def test_traversal_values_span_percentiles():
    s = np.arange(101.0)
    np.testing.assert_allclose(pc_traversal_values(s, 3), [5.0, 50.0, 95.0])


def test_landscape_pipeline_on_a_hinge(hinge_maps, tmp_path):
    maps, angles = hinge_maps
    rng = np.random.default_rng(3)
    n = 240
    angle = rng.uniform(angles[0], angles[-1], n)
    z = np.stack([angle / 60.0, rng.normal(size=n)], axis=1).astype(np.float32)  # 2nd latent: nuisance
    options = LandscapeOptions(sketch_size=40, n_pcs=4, n_clusters=3, mlp_samples=80, mlp_epochs=60,
                               traversal_points=5, traversal_pcs=2, seed=0)
    out = tmp_path / "landscape"
    res = compute_landscape(hinge_generator(maps, angles), z, out, options=options, pixel_size_angstrom=3.0)

    # PC1 of the sketch maps, and the MLP landscape of every particle, follow the hinge angle
    assert abs(spearmanr(res.pca.scores[:, 0], angle[res.sketch.indices]).statistic) > 0.9
    assert abs(spearmanr(res.landscape_pcs[:, 0], angle).statistic) > 0.9
    assert res.mlp.val_r2[0] > 0.8
    np.testing.assert_allclose(np.load(out / "landscape_pcs.npy"), res.landscape_pcs)

    # files: mask, eigenvolumes zero outside it, maps along PC1 = mean + s * eigenvolume
    mask, pixel = read_mrc(out / "mask.mrc")
    assert pixel == pytest.approx(3.0) and (mask > 0.5).sum() == res.mask.sum()
    eig, _ = read_mrc(out / "pca" / "eigenvol_01.mrc")
    assert np.all(eig[mask < 0.5] == 0)
    assert np.sum(eig.astype(np.float64) ** 2) == pytest.approx(1.0, rel=1e-4)
    mean, _ = read_mrc(out / "mean.mrc")
    np.testing.assert_allclose(mean, np.mean([hinge_generator(maps, angles)(q) for q in z[res.sketch.indices]], 0),
                               rtol=1e-5, atol=1e-5)
    values = np.loadtxt(out / "pca" / "pc1" / "pc_values.txt")
    first, _ = read_mrc(out / "pca" / "pc1" / "vol_000.mrc")
    np.testing.assert_allclose(first, mean + values[0] * eig, rtol=1e-4, atol=1e-4)
    assert len(list((out / "pca" / "pc2").glob("vol_*.mrc"))) == 5 and not (out / "pca" / "pc3").exists()

    # clusters: particle lists partition the particles, and agree with cluster_labels.pkl
    with open(out / "cluster_labels.pkl", "rb") as f:
        labels = pickle.load(f)
    assert labels.shape == (n,)
    seen = []
    for c in range(3):
        with open(out / "clusters" / f"cluster_{c:02d}.ind.pkl", "rb") as f:
            members = pickle.load(f)
        np.testing.assert_array_equal(members, np.flatnonzero(labels == c))
        seen.extend(members.tolist())
    assert sorted(seen) == list(range(n))
    assert res.cluster_particle_counts.tolist() == sorted(res.cluster_particle_counts.tolist(), reverse=True)
    # the clusters of the sketch maps are contiguous stretches of the hinge
    along = res.volume_clusters[np.argsort(angle[res.sketch.indices])]
    assert np.count_nonzero(np.diff(along)) == 2
    # the temporary memory-mapped stack is gone
    assert not any(p.name.startswith(".sketch_volumes") for p in out.iterdir())


def test_landscape_with_user_mask(hinge_maps, tmp_path):
    maps, angles = hinge_maps
    user = np.zeros((D, D, D), np.float32)
    user[:, :, D // 2:] = 1.0
    write_mrc(tmp_path / "half.mrc", user)
    z = np.linspace(0.05, 0.95, 30)[:, None].astype(np.float32)
    res = compute_landscape(hinge_generator(maps, angles), z, tmp_path / "out",
                            options=LandscapeOptions(sketch_size=12, n_pcs=2, n_clusters=2, mlp_samples=10,
                                                     mlp_epochs=5, mask=str(tmp_path / "half.mrc")))
    np.testing.assert_array_equal(res.mask, user > 0.5)
