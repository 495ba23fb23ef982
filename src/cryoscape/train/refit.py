"""Refit: the decoder's maps re-estimated in closed form from all images at the final latents.

An Adam-trained voxel decoder stops where its last steps left it: the shells the data barely
determine keep the noise the steps put there, most of all in the heterogeneity components, and
its maps then score below one consensus map of the same images.  With known poses and every
image's latent fixed, the maps of a decoder that is linear in its voxels are one regularised
least-squares problem away (the basis: :meth:`cryoscape.models.basis.StructuralBasis.refit`,
solved with a gold-standard Wiener prior by :mod:`cryoscape.models.subspace_fit`).  The training
loop calls :func:`refit_decoder` after every ``--refit-every``-th epoch and after the last
(``--refit``, the default for a decoder that ``wants_refit``, with known poses), before the epoch's
checkpoint is written: the refits between epochs give the encoder cleaner maps to learn against,
at one sampled latent per image (:func:`sampled_latents`, what the loss feeds the decoder); the last
one gives the run's maps, at the epoch's posterior means.  It is logged with its
own time and not counted in the epoch's training time.

After the final refit, :func:`refine_latents` re-estimates every image's latent against the
refitted maps and the maps are refitted once more at those latents (``--refit-latents``, on by
default, for decoders that score many latents at once: :meth:`~cryoscape.models.base.VolumeDecoder.latent_errors`).
The encoder's latent carries its amortisation gap (one network for all images at low SNR); the
decoder's own likelihood over candidate latents, drawn from the run's latents themselves (the
empirical prior, so the candidates' weights are their likelihoods alone), gives each image's
posterior mean and variance: one E step of EM in latent space, at the cost of one more pass over
the data (README "Choosing a decoder" has the measured gain).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from cryoscape.train.latent_search import posterior_moments
from cryoscape.train.warm_start import posed_slices

__all__ = ["latent_posteriors", "refine_latents", "refit_decoder", "sampled_latents"]

log = logging.getLogger(__name__)


def refit_decoder(decoder, dataset, pixels, latents: np.ndarray | None, *, final: bool = True,
                  batch_size: int = 64, domain: str = "fourier",
                  device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """Call ``decoder.refit`` with every image of ``dataset`` (which yields posed batches) and its
    row of ``latents (N, zdim)`` (``None``: homogeneous); ``final``: the run's last refit.
    ``None`` when the decoder does not want it.  Returns the hook's summary plus ``seconds``."""
    if not decoder.wants_refit:
        return None
    t0 = time.perf_counter()
    z_all = None if latents is None else torch.as_tensor(np.asarray(latents), dtype=torch.float32, device=device)
    order = np.arange(len(dataset))

    def batches():
        slices = posed_slices(dataset, pixels, order, batch_size=batch_size, domain=domain, device=device)
        return ((c, t, ctf, w, None if z_all is None else z_all[torch.as_tensor(i, device=device)])
                for c, t, ctf, w, i in slices)

    summary = dict(decoder.refit(batches, z_all, final=final) or {})
    summary["seconds"] = time.perf_counter() - t0
    if "skipped" in summary:
        log.warning("refit skipped: %s; the maps stay as trained (--no-refit silences this)", summary["skipped"])
        return summary
    fsc = summary.get("fsc_half")
    where = ""
    if fsc is not None:
        fsc = torch.as_tensor(fsc)
        below = (fsc[1:, 0] < 0.143).nonzero()
        nyquist = pixels.box_size // 2
        if below.numel() and int(below[0, 0]) + 1 <= nyquist:
            where = f"; the mean map's half-set FSC falls below 0.143 at shell {int(below[0, 0]) + 1} of {nyquist}"
        else:
            where = "; the mean map's half-set FSC stays above 0.143 to Nyquist"
    if summary.get("component_shell") is not None:
        where += (f"; the components are solved to shell {summary['component_shell']} (the memory budget of the "
                  f"per-voxel sums), the mean map alone beyond it")
    log.info("refit: the decoder's maps re-solved from %d images at fixed latents (%d components, %d correction "
             "passes) in %.1f s%s", summary.get("n_images", len(order)), summary.get("n_components", 0),
             summary.get("corrections", 0), summary["seconds"], where)
    return summary


def sampled_latents(mean: np.ndarray | None, logvar: np.ndarray | None, *, seed: int) -> np.ndarray | None:
    """One draw ``mean + exp(logvar / 2) * eps`` per image (``None`` when homogeneous): the latents
    the training objective feeds the decoder.  A refit *between* epochs solves the maps at these, so
    that they minimise what the encoder trains against: fitted at the posterior means instead, a
    direction in which the means barely vary (an encoder that has not yet used its latent) got basis
    volumes fitted over that tiny range, and the next epoch's sampled latents, which vary by about one
    in every direction, extrapolated them into maps that raised the loss a hundredfold (README)."""
    if mean is None:
        return None
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(mean.shape).astype(np.float32)
    return (mean + np.exp(0.5 * np.asarray(logvar, dtype=np.float32)) * noise).astype(np.float32)


def refine_latents(decoder, dataset, pixels, latents: np.ndarray, *, n_candidates: int = 512, batch_size: int = 64,
                   domain: str = "fourier", device: torch.device | str = "cpu",
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, variance)``, each ``(N, zdim)``, of the latent of every image of ``dataset`` (posed
    batches) under the decoder (:func:`latent_posteriors`)."""
    batches = posed_slices(dataset, pixels, np.arange(len(latents)), batch_size=batch_size, domain=domain,
                           device=device)
    return latent_posteriors(decoder, batches, latents, n_candidates=n_candidates, seed=seed, device=device)


@torch.no_grad()
def latent_posteriors(decoder, batches, latents: np.ndarray, *, n_candidates: int = 512, seed: int = 0,
                      device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, variance)`` ``(N, zdim)`` of each image's latent: the posterior over ``n_candidates``
    of the rows of ``latents`` (drawn without replacement with ``seed``, the same on every process:
    the run's own latents are the prior), weighted by each image's likelihood under the decoder
    with the noise power estimated per batch
    (:func:`~cryoscape.train.latent_search.posterior_moments`).  ``batches`` yields
    ``(coords, target, ctf, pixel_weights, indices)`` as :func:`posed_slices`.  ``None`` when the
    decoder has no :meth:`~cryoscape.models.base.VolumeDecoder.latent_errors`."""
    z = np.asarray(latents, dtype=np.float32)
    pick = np.random.default_rng(seed).choice(len(z), size=min(int(n_candidates), len(z)), replace=False)
    candidates = torch.as_tensor(z[np.sort(pick)], device=device)
    log_prior = -0.5 * candidates.square().sum(-1)  # passed as the proposal: the candidates are drawn
    mean, var = np.empty_like(z), np.empty_like(z)  # from the prior, so their weights are likelihoods
    was_training = decoder.training
    decoder.eval()
    try:
        for coords, target, ctf, weights, idx in batches:
            errors = decoder.latent_errors(coords, target, ctf, weights, candidates)
            if errors is None:
                return None
            n_pixels = float((weights > 0).sum())
            B = errors.shape[0]
            m, v = posterior_moments((errors / n_pixels).float(), candidates.expand(B, -1, -1),
                                     log_prior.expand(B, -1), n_pixels)
            mean[idx], var[idx] = m.cpu().numpy(), v.cpu().numpy()
    finally:
        decoder.train(was_training)
    return mean, var
