"""Latent search against the decoder (train/latent_search.py): the posterior it computes against
analytic Gaussian posteriors, which epochs search (options, decoder defaults, old runs), and a
training run whose last epoch searches: its latents, its log and an exact resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoscape.models.atomic import AtomicDecoder
from cryoscape.models.base import VolumeDecoder
from cryoscape.train.checkpoint import load_checkpoint
from cryoscape.train.config import TrainConfig
from cryoscape.train.latent_search import LatentSearch, first_search_epoch, fixed_latent_search, posterior_moments
from cryoscape.train.loop import resume_training, run_training

N_CIRCLE = 200.0


def quadratic_errors(z: torch.Tensor, centre: torch.Tensor, curvature: float, noise: float) -> torch.Tensor:
    """``(B,)`` errors ``noise + curvature |z - centre|^2``: a Gaussian likelihood in ``z``."""
    return noise + curvature * (z - centre).square().sum(-1)


def gaussian_posterior(centre: torch.Tensor, curvature: float, noise: float) -> tuple[torch.Tensor, float]:
    """Mean and variance of ``exp(-n_circle err / (2 noise)) N(z; 0, I)`` for :func:`quadratic_errors`."""
    precision_likelihood = N_CIRCLE * curvature / noise
    precision = precision_likelihood + 1.0
    return centre * precision_likelihood / precision, 1.0 / precision


def test_grid_posterior_of_a_quadratic_error_is_the_gaussian_posterior():
    centre = torch.tensor([[-1.5], [0.3], [2.0]])
    curvature, noise = 0.02, 1.0
    search = LatentSearch(zdim=1, points=401, grid_range=(-4.0, 4.0))
    mean, var = search.search(lambda z: quadratic_errors(z, centre, curvature, noise), centre * 0, centre * 0,
                              N_CIRCLE)
    want_mean, want_var = gaussian_posterior(centre, curvature, noise)
    assert torch.allclose(mean, want_mean, atol=2e-3)
    assert torch.allclose(var, torch.full_like(var, want_var), rtol=0.02)
    assert want_mean.abs().max() < centre.abs().max()  # the prior pulls towards 0: the test can tell


def test_local_search_in_two_dimensions_recovers_the_gaussian_posterior():
    centre = torch.tensor([[0.8, -0.4], [-1.0, 1.2]])
    curvature, noise = 0.01, 1.0
    want_mean, want_var = gaussian_posterior(centre, curvature, noise)
    # an encoder near the answer with a standard deviation near the posterior's
    mu, logvar = want_mean + 0.1, torch.full_like(centre, math.log(want_var))
    search = LatentSearch(zdim=2, points=512)
    cands, _ = search.candidates(mu, logvar)
    assert cands.shape == (2, 512, 2) and torch.equal(cands[:, 0], mu)  # the encoder's mean is a candidate
    mean, var = search.search(lambda z: quadratic_errors(z, centre, curvature, noise), mu, logvar, N_CIRCLE)
    assert torch.allclose(mean, want_mean, atol=0.03)
    assert torch.allclose(var, torch.full_like(var, want_var), rtol=0.15)
    # without the proposal's density in the weights the mean is pulled towards the encoder's
    errors = quadratic_errors(cands, centre[:, None], curvature, noise)
    naive, _ = posterior_moments(errors, cands, torch.zeros(2, 512), N_CIRCLE)
    assert (naive - want_mean).abs().max() > 2 * (mean - want_mean).abs().max()


def test_local_candidates_stay_within_the_priors_spread_when_the_encoder_is_unsure():
    """An encoder log-variance far above the prior's (seen once in a searching epoch: 15) would spread
    the candidates over hundreds of prior widths; the proposal is capped at the prior's width, and
    the answer is still the Gaussian posterior."""
    centre = torch.tensor([[0.5, -0.5]])
    curvature, noise = 0.01, 1.0
    mu, wild = torch.zeros(1, 2), torch.full((1, 2), 15.0)
    search = LatentSearch(zdim=2, points=512)
    cands, _ = search.candidates(mu, wild)
    capped, _ = search.candidates(mu, torch.zeros(1, 2))
    assert torch.equal(cands, capped) and float(cands.abs().max()) < 10.0
    mean, _ = search.search(lambda z: quadratic_errors(z, centre, curvature, noise), mu, wild, N_CIRCLE)
    want_mean, _ = gaussian_posterior(centre, curvature, noise)
    assert torch.allclose(mean, want_mean, atol=0.05)


def test_one_dimensional_grid_spans_the_previous_latents():
    rng = np.random.default_rng(0)
    previous = rng.uniform(-1.0, 2.0, size=(5000, 1)).astype(np.float32)
    low, high = LatentSearch.for_epoch(1, 16, previous).grid_range
    assert low == pytest.approx(-1.3, abs=0.03) and high == pytest.approx(2.3, abs=0.03)
    assert LatentSearch.for_epoch(1, 16, None).grid_range == (-3.0, 3.0)
    with pytest.raises(ValueError, match="at least 2"):
        LatentSearch.for_epoch(1, 1, previous)


def test_which_epochs_search():
    assert first_search_epoch(None, 0.5, 6) == 3 and first_search_epoch(None, 0.5, 5) == 2
    assert first_search_epoch(2, 0.5, 6) == 4 and first_search_epoch(0, 0.5, 6) == -1
    assert first_search_epoch(None, 0.0, 6) == -1 and first_search_epoch(9, 0.0, 6) == 0
    assert VolumeDecoder.latent_search_fraction == 0.0 and AtomicDecoder.latent_search_fraction == 0.5
    assert fixed_latent_search(TrainConfig(decoder="atomic", num_epochs=6)).latent_search_start == 3
    assert fixed_latent_search(TrainConfig(num_epochs=6)).latent_search_start == -1  # the neural field: none
    assert fixed_latent_search(TrainConfig(num_epochs=6, latent_search_epochs=2)).latent_search_start == 4
    old = TrainConfig(decoder="atomic", num_epochs=6).to_dict()
    del old["latent_search_epochs"], old["latent_search_start"]
    assert TrainConfig.from_dict(old).latent_search_start == -1  # a run saved before the search never searches
    for bad, match in ((dict(latent_search_epochs=-1), "--latent-search-epochs"),
                       (dict(latent_search_points=1), "--latent-search-points")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad).validate()


def test_cli_options_reach_the_config():
    from cryoscape.cli.main import build_parser
    from cryoscape.cli.train import _config_from_args

    args = build_parser().parse_args(["train", "p.star", "--zdim", "1", "--latent-search-epochs", "2",
                                      "--latent-search-points", "16"])
    config = _config_from_args(args)
    assert (config.latent_search_epochs, config.latent_search_points) == (2, 16)


def tiny_config(dataset, **overrides) -> TrainConfig:
    options = dict(particles=str(dataset / "particles.star"), decoder="neural_field", zdim=1, dec_layers=1, dec_dim=16, enc_layers=1,
                   enc_dim=16, batch_size=16, lr=1e-3, progress=False, checkpoint_every=1, n_normalization_images=64,
                   latent_search_points=8)
    options.update(overrides)
    return TrainConfig(**options)


def test_last_epoch_searches_writes_its_latents_and_resumes_exactly(tiny_dataset, tmp_path):
    straight = run_training(tiny_config(tiny_dataset, num_epochs=2, latent_search_epochs=1), tmp_path / "straight")
    z0, z1 = (np.load(tmp_path / "straight" / f"z.{e}.npy") for e in (0, 1))
    lv1 = np.load(tmp_path / "straight" / "z_logvar.1.npy")
    grid = LatentSearch.for_epoch(1, 8, z0)
    low, high = grid.grid_range
    assert low - 1e-6 <= z1.min() and z1.max() <= high + 1e-6  # posterior means over the grid
    assert not np.allclose(z1, z0, atol=1e-3)
    assert np.all(np.exp(lv1) <= ((high - low) / 2) ** 2)  # posterior variances within the grid
    assert "latents searched against the decoder" in (tmp_path / "straight" / "run.log").read_text()
    assert straight.history[1]["kl"] > 0 and np.isfinite(straight.history[1]["loss"])
    # stopped after epoch 0 and resumed: the same weights and latents (the grid from the saved z.0.npy)
    run_training(tiny_config(tiny_dataset, num_epochs=1, latent_search_epochs=1, latent_search_start=1),
                 tmp_path / "resumed")
    resumed = resume_training(tmp_path / "resumed", num_epochs=2)
    assert resumed.epochs_done == 2
    a, b = (load_checkpoint(tmp_path / r / "checkpoint.pt") for r in ("straight", "resumed"))
    for key in ("decoder", "encoder"):
        for name, value in a[key]["state"].items():
            assert torch.equal(value, b[key]["state"][name]), name
    assert np.array_equal(z1, np.load(tmp_path / "resumed" / "z.1.npy"))
    assert a["config"]["latent_search_start"] == 1
