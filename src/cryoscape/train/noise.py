"""Spectral noise estimate of the training data (seed 003 eq. 5) and the likelihood weights it gives.

The estimate
------------
At low signal-to-noise ratio the data's power in a Fourier shell is mostly noise, so the
CTF-corrected noise variance of shell ``r`` is estimated from the data and the CTF alone::

    sigma_bar^2(r) = sum_i sum_{k in shell r} w_k |X_i(k)|^2 / ( sum_i sum_{k in shell r} w_k c_i(k)^2 + eps )

over a random subset of the particles (``X_i`` the normalised training coefficients, ``c_i`` the
CTF, 1 without CTF; ``w_k`` the pixel weights of :mod:`cryoscape.data.training`, so the half-plane
stands for the whole circle; shells ``r = round(|k| D)``; ``eps`` a millionth of the largest
denominator).  Shifts do not change ``|X|``, so none are undone.  Where the signal is strong (the
lowest shells) ``sigma_bar^2`` also holds the signal power, so it over-estimates the noise there;
seed 003 accepts this, as do we.

Uses
----
* ``--noise-model spectral``: the squared error of every pixel is divided by its shell's
  ``sigma_bar^2`` (a Gaussian likelihood with coloured noise, seed 003 eq. 4 with ``P = 0``).  The
  weights are rescaled to average 1 over the circle ``|k| < D/2``, so the loss keeps the scale of
  the white model (for white noise the two are identical) and ``--beta`` keeps its meaning.
  :func:`spectral_pixel_weights` folds the factors into the training pixels' weights, so the
  objective of :mod:`cryoscape.train.likelihood` is otherwise unchanged.
* Decoders whose parameters live on a Fourier grid can be preconditioned by ``sigma_bar``
  (``decoder.set_data_spectrum``, see :mod:`cryoscape.models.basis`): seed 003 divides the data
  by it for the same reason, to put all shells on one numerical scale.

``--noise-model white`` (the default) weights all pixels equally, as before.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from cryoscape.data.training import FourierPixels

__all__ = ["NOISE_MODELS", "NoiseSpectrum", "estimate_noise_spectrum", "pixel_shells", "spectral_pixel_weights"]

log = logging.getLogger(__name__)

NOISE_MODELS = ("white", "spectral")


@dataclass
class NoiseSpectrum:
    """Per-shell estimate of seed 003 eq. 5.

    Attributes
    ----------
    shell_variance
        ``(D//2 + 1,)`` float64 ``sigma_bar^2`` of shells ``r = 0 .. D//2`` (index units, the
        shells of the training pixels), in normalised data units.  Shells with no CTF weight
        take the nearest estimated shell's value.
    n_images
        Images the estimate used.
    mean_ctf_squared
        Mean of ``c_i(k)^2`` over the images and the circle (1 without CTF).
    """

    shell_variance: np.ndarray
    n_images: int
    mean_ctf_squared: float = 1.0

    @property
    def shell_rms(self) -> np.ndarray:
        """``sigma_bar`` per shell."""
        return np.sqrt(self.shell_variance)

    def to_dict(self) -> dict:
        """YAML-safe dict."""
        return {"shell_variance": [float(v) for v in self.shell_variance], "n_images": int(self.n_images),
                "mean_ctf_squared": float(self.mean_ctf_squared)}

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSpectrum":
        return cls(np.asarray(d["shell_variance"], dtype=np.float64), int(d["n_images"]),
                   float(d.get("mean_ctf_squared", 1.0)))


def pixel_shells(pixels: FourierPixels) -> torch.Tensor:
    """``(P,)`` int64 shell ``round(|k| D)`` of every training pixel."""
    return torch.round(pixels.coords_index.double().norm(dim=-1)).long()


def estimate_noise_spectrum(
    dataset,
    *,
    n_images: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
) -> NoiseSpectrum:
    """``sigma_bar^2`` per shell from ``n_images`` random particles of a
    :class:`cryoscape.data.training.ParticleDataset` (normalisation fitted; see the module docstring)."""
    pixels = dataset.pixels
    D = pixels.box_size
    n_shells = D // 2 + 1
    shells = pixel_shells(pixels).clamp(max=n_shells - 1)
    weights = pixels.weights.double()
    n = len(dataset)
    rng = np.random.default_rng([int(seed), 0x5E5])
    chosen = np.sort(rng.choice(n, size=min(int(n_images), n), replace=False))
    power = torch.zeros(n_shells, dtype=torch.float64)
    ctf_power = torch.zeros(n_shells, dtype=torch.float64)
    for start in range(0, chosen.size, int(batch_size)):
        batch = dataset.get_batch(chosen[start : start + int(batch_size)])
        v = batch.values
        per_pixel = ((v.real.double() ** 2 + v.imag.double() ** 2).sum(0)) * weights
        power.index_add_(0, shells, per_pixel)
        if batch.ctf is None:
            c2 = torch.full_like(weights, float(v.shape[0]))
        else:
            c2 = (batch.ctf.double() ** 2).sum(0)
        ctf_power.index_add_(0, shells, c2 * weights)
    eps = 1e-6 * float(ctf_power.max()) if float(ctf_power.max()) > 0 else 1e-12
    variance = power / (ctf_power + eps)
    variance = _fill_invalid(variance, ctf_power > 0)
    log.info("spectral noise estimate (seed 003 eq. 5) from %d images: sigma^2 from %.3g (shell 1) to %.3g (shell %d)",
             chosen.size, float(variance[min(1, n_shells - 1)]), float(variance[-1]), n_shells - 1)
    mean_c2 = float(ctf_power.sum()) / max(float(weights.sum()) * chosen.size, 1e-30)
    return NoiseSpectrum(variance.numpy(), int(chosen.size), mean_c2)


def _fill_invalid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Replace entries that are not ``valid`` (or not finite and positive) by the nearest valid one."""
    good = valid & torch.isfinite(values) & (values > 0)
    if not bool(good.any()):
        return torch.ones_like(values)
    idx = torch.arange(values.numel())
    good_idx = idx[good]
    return values[good_idx[(idx[:, None] - good_idx[None, :]).abs().argmin(dim=1)]]


def spectral_pixel_weights(pixels: FourierPixels, spectrum: NoiseSpectrum) -> FourierPixels:
    """The training pixels with weights ``w_k / sigma_bar^2(r_k)``, rescaled to average 1 over the circle.

    ``sum_k w_k' = n_circle`` like the white weights, so :func:`cryoscape.train.likelihood.squared_error`
    stays a per-pixel mean.
    """
    variance = torch.as_tensor(spectrum.shell_variance, dtype=torch.float64, device=pixels.weights.device)
    shells = pixel_shells(pixels).to(variance.device).clamp(max=variance.numel() - 1)
    w = pixels.weights.double() / variance[shells]
    w = w * (pixels.n_circle / float(w.sum()))
    return dataclasses.replace(pixels, weights=w.to(pixels.weights.dtype))
