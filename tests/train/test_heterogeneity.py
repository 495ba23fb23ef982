"""Heterogeneous training recovers the simulated heterogeneity: a hinge angle (continuous) and
discrete classes.  The hinge run is in the default suite (about half a minute on 2 CPU cores);
the discrete one is slow.

Settings shared by these runs (and why): decoder and encoder 128 x 2, batch 8, lr 1e-3 (latent
learning is limited by the number of optimiser steps, so small batches help), beta 0.05.  On
these small, clean datasets the default beta = 1/zdim over-weights the KL term (it is tuned for
real data at SNR ~0.01-0.1, where the noise dominates the squared error) and the posterior
collapses to the prior (KL ~ 0.01 nats, no correlation with the hinge).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from cryoscape.train.config import TrainConfig
from cryoscape.train.loop import run_training

from .conftest import simulate

VAE = dict(decoder="neural_field", dec_layers=2, dec_dim=128, enc_layers=2, enc_dim=128, encoder="resmlp", lr=1e-3, beta=0.05,
           progress=False, checkpoint_every=100)


def _spearman(run, dataset, epoch):
    z = np.load(run / f"z.{epoch}.npy")
    truth = np.load(dataset / "ground_truth.npz")["coordinate"]
    return abs(spearmanr(z[:, 0], truth).statistic)


def test_hinge_latent_follows_the_hinge_angle(sim_root, tmp_path):
    """1000 images of 32 px (SNR 1), 10 epochs: |Spearman(z, hinge angle)| > 0.9.

    Measured with the default gaussian encoding: 0.95 after 10 epochs both in float32 and with
    bfloat16 mixed precision (0.92 after 8); the previous default encoding, geom_lowf, reached
    0.92 only after 10 epochs.  A latent that ignores the hinge gives |rho| ~ 0.03.
    """
    data = simulate(sim_root, "hinge32", n=1000, D=32, snr="1", heterogeneity="hinge", seed=2)
    config = TrainConfig(particles=str(data / "particles.star"), zdim=1, num_epochs=10, batch_size=8, **VAE)
    run_training(config, tmp_path / "run")
    assert _spearman(tmp_path / "run", data, 9) > 0.9


@pytest.mark.slow
def test_discrete_classes_separate_in_latent_space(sim_root, tmp_path):
    """1000 images of 32 px (SNR 1), 3 hinge classes (0, 30, 60 degrees), zdim 1, 14 epochs: k-means
    (k=3) on z recovers the classes, ARI > 0.9 (measured 0.93 from epoch 11 on with the gaussian
    encoding; geom_lowf needed 20 epochs for 0.94)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    data = simulate(sim_root, "discrete32", n=1000, D=32, snr="1", heterogeneity="discrete", seed=3,
                    extra=("--n-classes", "3"))
    epochs = 14
    config = TrainConfig(particles=str(data / "particles.star"), zdim=1, num_epochs=epochs, batch_size=8, **VAE)
    run_training(config, tmp_path / "run")
    z = np.load(tmp_path / "run" / f"z.{epochs - 1}.npy")
    labels = KMeans(3, n_init=10, random_state=0).fit_predict(z)
    truth = np.load(data / "ground_truth.npz")["state_index"]
    assert adjusted_rand_score(truth, labels) > 0.9

