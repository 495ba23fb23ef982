"""Latent search: each image's latent refined against the decoder (an EM step in latent space).

Why
---
An amortised encoder maps an image to ``q(z | image)`` in one pass.  At low SNR its means for
neighbouring states overlap, so the decoder at one latent is fitted to images of several states
and averages them (regression dilution), and the latents written out are only as good as the
encoder.  In the last ``latent_search_epochs`` epochs of a run (``--latent-search-epochs``; by
default the decoder's :attr:`~cryoscape.models.base.VolumeDecoder.latent_search_fraction` of them;
the first searching epoch is fixed when the run starts, so a run resumed with more epochs goes on
searching) the engine replaces the encoder's latent, for the decoder's update and in ``z.E.npy``,
by the posterior mean of the latent under the decoder itself: the E step of EM, with the
encoder's amortisation gap removed.

What
----
For an image ``X`` and candidate latents ``z_g``::

    log p(z_g | X) = -n_circle * err(z_g) / (2 v) + log N(z_g; 0, I) - log r(z_g) + const

``err(z)`` is the image's mean squared error over the circle (train/likelihood.py) with the
decoder at ``z``, so ``n_circle * err / (2 v)`` is its negative Gaussian log-likelihood for white
noise of power ``v`` per coefficient; ``v`` is estimated from the batch itself, as the mean over its
images of their smallest error over the candidates (a fitted model's error is the noise).  ``r``
is the density the candidates were drawn from (constant for a grid).

Candidates (:meth:`LatentSearch.candidates`):

* ``zdim == 1``: a **global** grid of ``points`` values over the previous epoch's latents (their
  0.5-99.5 percentiles widened by 10 % of that range each side; ``[-3, 3]`` without them), so an
  image may move anywhere along the path;
* ``zdim > 1``: a **local** search: the encoder's mean plus ``points - 1`` fixed quasi-random
  offsets (a scrambled Sobol sequence mapped to a normal of twice the encoder's standard
  deviation), weighted by the ratio of prior to proposal density (self-normalised importance
  sampling).

The step's loss (:meth:`LatentSearch.loss`) is the decoder's error at the posterior means
(detached: the decoder's M step) plus, for the encoder, the Gaussian negative log-likelihood of
those means under ``q`` divided by ``n_circle``: the encoder learns to predict the searched latents
(it keeps ordering new images), and its KL term is reported in the log but not optimised.  The
latents of the epoch are the posterior means and ``z_logvar`` the log posterior variances.

Cost: ``points`` forward passes of the decoder per batch without gradients, only in the search
epochs (README "Atomic models" has the measured cost and gain).  Data-parallel
runs search each process's images; ``v`` is then the process's estimate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from cryoscape.models.vae import kl_divergence

__all__ = ["LatentSearch", "first_search_epoch", "fixed_latent_search", "posterior_moments"]

#: the grid of a 1-D search spans the previous latents' 0.5-99.5 percentiles plus this share of
#: their range on each side (an image of a state beyond the extremes can still move out)
GRID_PADDING = 0.1
#: standard deviation of the local search's offsets, in encoder standard deviations
LOCAL_SPREAD = 2.0


def first_search_epoch(latent_search_epochs: int | None, default_fraction: float, num_epochs: int) -> int:
    """The first epoch (0-based) that searches, or -1 for none: the last ``latent_search_epochs``
    of ``num_epochs``, or (``None``) the decoder's ``latent_search_fraction`` of them, rounded."""
    n = latent_search_epochs
    if n is None:
        n = int(math.floor(default_fraction * num_epochs + 0.5))
    n = max(0, min(int(n), num_epochs))
    return num_epochs - n if n > 0 else -1


def fixed_latent_search(config):
    """``config`` (a :class:`~cryoscape.train.config.TrainConfig`) with ``latent_search_start`` fixed
    from ``latent_search_epochs`` and the decoder's default when it is unset (at the start of a run),
    so a run resumed with more epochs goes on searching from the same epoch."""
    if config.latent_search_start is not None:
        return config
    from cryoscape.models.base import decoder_class, decoder_names

    if config.decoder not in decoder_names():  # the model's builder says so in one sentence
        return config
    start = first_search_epoch(config.latent_search_epochs, decoder_class(config.decoder).latent_search_fraction,
                               config.num_epochs)
    return dataclasses.replace(config, latent_search_start=start)


def posterior_moments(errors: torch.Tensor, candidates: torch.Tensor, log_proposal: torch.Tensor,
                      n_circle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, variance)`` ``(B, zdim)`` of the latent posterior over ``candidates (B, G, zdim)``
    from their ``errors (B, G)`` (module docstring; ``log_proposal (B, G)``: ``log r``)."""
    best = errors.min(dim=1, keepdim=True).values
    noise = best.mean().clamp_min(1e-12)
    log_prior = -0.5 * candidates.square().sum(-1)
    logits = -n_circle * (errors - best) / (2.0 * noise) + log_prior - log_proposal
    weights = torch.softmax(logits, dim=1)[..., None]  # (B, G, 1)
    mean = (weights * candidates).sum(1)
    var = (weights * (candidates - mean[:, None]).square()).sum(1)
    return mean, var


@dataclass
class LatentSearch:
    """The search of one epoch (module docstring): ``points`` candidates per image, and for
    ``zdim == 1`` the grid's range ``(low, high)``."""

    zdim: int
    points: int = 32
    grid_range: tuple[float, float] = (-3.0, 3.0)

    @classmethod
    def for_epoch(cls, zdim: int, points: int, previous_latents: np.ndarray | None) -> "LatentSearch":
        """The search of an epoch, its 1-D grid spanning ``previous_latents`` ``(N, zdim)`` (or ``None``)."""
        if points < 2:
            raise ValueError(f"a latent search needs at least 2 points, got {points}")
        search = cls(zdim=int(zdim), points=int(points))
        if zdim == 1 and previous_latents is not None and len(previous_latents) > 1:
            low, high = np.percentile(np.asarray(previous_latents, dtype=np.float64)[:, 0], [0.5, 99.5])
            pad = GRID_PADDING * max(float(high - low), 1e-3)
            search.grid_range = (float(low - pad), float(high + pad))
        return search

    def candidates(self, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(candidates (B, G, zdim), log proposal density (B, G))`` for encoder outputs ``(B, zdim)``."""
        B = mu.shape[0]
        if self.zdim == 1:
            grid = torch.linspace(*self.grid_range, self.points, device=mu.device, dtype=mu.dtype)
            return grid[None, :, None].expand(B, -1, -1), torch.zeros(B, self.points, device=mu.device)
        eps = _quasi_normal(self.points - 1, self.zdim).to(mu.device, mu.dtype)  # (G - 1, zdim)
        eps = torch.cat([torch.zeros(1, self.zdim, device=mu.device, dtype=mu.dtype), eps])
        # a posterior is no wider than the N(0, I) prior: an encoder's runaway variance (its KL is
        # not trained in searching epochs) must not scatter the candidates over the whole space
        scale = LOCAL_SPREAD * torch.exp(0.5 * logvar.clamp(max=0.0))[:, None, :]  # (B, 1, zdim)
        cands = mu[:, None, :] + scale * eps[None]
        log_r = -0.5 * eps.square().sum(-1)[None] - torch.log(scale).sum(-1)  # up to a constant
        return cands, log_r

    @torch.no_grad()
    def search(self, errors_at: Callable[[torch.Tensor], torch.Tensor], mu: torch.Tensor, logvar: torch.Tensor,
               n_circle: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(mean, variance)`` of each image's latent; ``errors_at(z (B, zdim))`` gives the
        images' ``(B,)`` errors with the decoder at ``z``."""
        cands, log_r = self.candidates(mu.detach(), logvar.detach())
        errors = torch.stack([errors_at(cands[:, g].contiguous()) for g in range(cands.shape[1])], dim=1)
        return posterior_moments(errors.float(), cands, log_r, n_circle)

    def loss(self, image_loss, batch, decoder, rotations: torch.Tensor, target: torch.Tensor, mu: torch.Tensor,
             logvar: torch.Tensor, *, share: float = 1.0) -> dict[str, torch.Tensor]:
        """The step's loss parts, as :class:`~cryoscape.train.objective.ImageLoss` returns them, with
        the searched latents as ``mu`` and their log posterior variances as ``logvar``."""
        n_circle = image_loss.pixels.n_circle

        def errors_at(z):
            return image_loss.errors(decoder, batch, rotations, target, z)

        z, var = self.search(errors_at, mu, logvar, n_circle)
        error = errors_at(z).mean()
        encoder_nll = 0.5 * ((z - mu).square() / logvar.exp() + logvar).sum(-1).mean()
        loss = error + encoder_nll / n_circle
        scaled = loss * share if share != 1.0 else loss
        kl = kl_divergence(mu.detach(), logvar.detach()).mean()
        return {"loss": scaled, "objective": loss, "error": error, "kl": kl, "mu": z,
                "logvar": torch.log(var.clamp_min(1e-12))}


def _quasi_normal(n: int, dim: int) -> torch.Tensor:
    """``n`` fixed quasi-random standard-normal points in ``dim`` dimensions (scrambled Sobol, seed 0)."""
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=0)
    u = engine.draw(n).double().clamp(1e-6, 1 - 1e-6)
    return (math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)).float()
