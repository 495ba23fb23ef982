"""Latent analysis on synthetic latents with known structure: PCA, PC traversal, k-means on-data
centres, UMAP with subsampling."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from cryoscape.analysis.latent import (
    available_latent_epochs,
    compute_pca,
    compute_umap,
    kmeans_on_data,
    load_latents,
    nearest_particles,
    pc_traversal,
)
from cryoscape.errors import InputError


def _blobs(n=1500, k=3, zdim=4, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(k, zdim))
    truth = rng.integers(0, k, n)
    return (centres[truth] + spread * rng.normal(size=(n, zdim))).astype(np.float32), truth


def test_load_latents_picks_the_latest_epoch(tmp_path):
    for e in (0, 2, 10):
        np.save(tmp_path / f"z.{e}.npy", np.full((5, 3), e, np.float32))
    np.save(tmp_path / "z_logvar.10.npy", np.zeros((5, 3), np.float32))
    assert available_latent_epochs(tmp_path) == [0, 2, 10]
    z, epoch = load_latents(tmp_path)
    assert epoch == 10 and z.shape == (5, 3) and (z == 10).all()
    assert load_latents(tmp_path, 2)[1] == 2
    with pytest.raises(InputError, match="epochs with z.EPOCH.npy: 0, 2, 10"):
        load_latents(tmp_path, 1)
    with pytest.raises(InputError, match="not a folder"):
        load_latents(tmp_path / "nothing")


def test_pca_reconstructs_and_orders_by_variance():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    scales = np.array([5.0, 2.0, 0.5])
    z = (rng.normal(size=(4000, 3)) * scales) @ basis.T + np.array([1.0, -2.0, 3.0])
    pca = compute_pca(z)
    np.testing.assert_allclose(pca.mean + pca.projections @ pca.components, z, atol=1e-4)
    np.testing.assert_allclose(pca.explained_variance_ratio, scales**2 / (scales**2).sum(), rtol=0.05)
    # PC1 is the direction of largest spread (up to sign)
    assert abs(pca.components[0] @ basis[:, 0]) > 0.99
    # sign convention: the longer tail of every PC's projections is on the positive side
    assert ((pca.projections.astype(np.float64) ** 3).mean(0) >= 0).all()


def test_pc_traversal_spans_the_percentiles_along_the_axis():
    z, _ = _blobs(zdim=3)
    pca = compute_pca(z)
    coords, latents = pc_traversal(pca, 2, n_points=7, low_percentile=10, high_percentile=90)
    lo, hi = np.percentile(pca.projections[:, 1], [10, 90])
    np.testing.assert_allclose(coords, np.linspace(lo, hi, 7), rtol=1e-6)
    back = (latents - pca.mean) @ pca.components.T
    np.testing.assert_allclose(back[:, 1], coords, atol=1e-4)
    np.testing.assert_allclose(back[:, [0, 2]], 0, atol=1e-4)
    with pytest.raises(InputError, match="3 principal component"):
        pc_traversal(pca, 4)


def test_kmeans_on_data_centres_are_the_nearest_particles():
    z, truth = _blobs(k=4, zdim=5)
    km = kmeans_on_data(z, 4)
    assert adjusted_rand_score(truth, km.labels) == pytest.approx(1.0)
    assert km.counts.sum() == z.shape[0] and km.counts.tolist() == np.bincount(km.labels).tolist()
    d = ((z[:, None, :].astype(np.float64) - km.centers[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(km.center_indices, d.argmin(0))
    # centres are the means of their clusters
    for c in range(4):
        np.testing.assert_allclose(km.centers[c], z[km.labels == c].mean(0), atol=1e-5)
    # the mini-batch path (used above 100k particles) finds the same partition
    km2 = kmeans_on_data(z, 4, minibatch_above=100)
    assert adjusted_rand_score(km.labels, km2.labels) == pytest.approx(1.0)
    with pytest.raises(InputError, match="distinct latents"):
        kmeans_on_data(np.zeros((10, 2), np.float32), 3)


def test_nearest_particles_matches_brute_force_across_chunks():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(1000, 3))
    points = rng.normal(size=(7, 3))
    brute = ((z[:, None] - points[None]) ** 2).sum(-1).argmin(0)
    np.testing.assert_array_equal(nearest_particles(z, points, chunk=64), brute)


def test_umap_separates_blobs_and_places_the_unfitted_particles_with_their_blob():
    """UMAP fitted on 600 of 2000 particles: the 1400 interpolated ones land among their own blob."""
    z, truth = _blobs(n=2000, k=3, zdim=6, spread=0.5, seed=4)
    res = compute_umap(z, fit_max=600, seed=0, n_epochs=100)
    assert res.embedding.shape == (2000, 2) and np.isfinite(res.embedding).all()
    assert res.subsampled and res.fit_indices.size == 600
    fitted = np.zeros(2000, bool)
    fitted[res.fit_indices] = True
    # nearest fitted neighbour in the embedding has the same blob for (almost) every unfitted particle
    e = res.embedding
    d = ((e[~fitted][:, None] - e[fitted][None]) ** 2).sum(-1)
    same = truth[fitted][d.argmin(1)] == truth[~fitted]
    assert same.mean() > 0.99
    # and the blobs are separate in the embedding: k-means on it recovers them
    assert adjusted_rand_score(truth, kmeans_on_data(e, 3).labels) > 0.95
