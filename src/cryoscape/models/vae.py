"""The heterogeneous VAE (thesis 3.1.2-3.1.3): image encoder + latent-conditioned decoder.

The objective is the evidence lower bound, eq. 3.5:
``E_q[log p(image | z)] - KL(q(z | image) || N(0, I))`` with one reparameterised sample of ``z``.
The training loop owns the likelihood (slices, CTF, shifts); this module supplies the KL term,
the sampler and a container that keeps encoder and decoder together and rebuilds both from a
run folder's config.  A homogeneous model is just a decoder with ``zdim = 0``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from cryoscape.models.base import VolumeDecoder, build_saved_decoder
from cryoscape.models.encoders import ImageEncoder, TiltPairEncoder, build_encoder

__all__ = ["kl_divergence", "reparameterize", "VAEOutput", "HeterogeneousVAE", "build_vae"]


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag exp(logvar)) || N(0, I))`` per row: ``(B, zdim)`` -> ``(B,)``.

    ``0.5 * sum(mu^2 + exp(logvar) - 1 - logvar)`` over the last axis.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, generator: torch.Generator | None = None,
                   eps: torch.Tensor | None = None) -> torch.Tensor:
    """A sample ``mu + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` (drawn unless given), differentiable in
    ``mu, logvar``."""
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


class VAEOutput(NamedTuple):
    """What :meth:`HeterogeneousVAE.forward` returns."""

    values: torch.Tensor  # (B, P) decoder values at the coordinates
    z: torch.Tensor  # (B, zdim) latent used (sample, or mu when not sampling)
    mu: torch.Tensor  # (B, zdim)
    logvar: torch.Tensor  # (B, zdim)


class HeterogeneousVAE(nn.Module):
    """Encoder ``q(z | image)`` and decoder ``p(V | k, z)`` held together.

    Parameters
    ----------
    encoder
        :class:`ImageEncoder` or :class:`TiltPairEncoder` with the decoder's ``zdim``.
    decoder
        A registered :class:`VolumeDecoder` with ``zdim >= 1``.
    """

    def __init__(self, encoder: ImageEncoder | TiltPairEncoder, decoder: VolumeDecoder):
        super().__init__()
        if encoder.zdim != decoder.zdim:
            raise ValueError(f"encoder zdim {encoder.zdim} differs from decoder zdim {decoder.zdim}")
        if decoder.zdim < 1:
            raise ValueError("a heterogeneous VAE needs a decoder with zdim >= 1")
        self.encoder = encoder
        self.decoder = decoder
        self.zdim = decoder.zdim

    @property
    def tilt_pairs(self) -> bool:
        """Whether the encoder takes tilt pairs."""
        return isinstance(self.encoder, TiltPairEncoder)

    def encode(self, images: torch.Tensor, tilted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of ``q(z | image)``; pass ``tilted`` for a tilt-pair encoder."""
        if self.tilt_pairs:
            if tilted is None:
                raise ValueError("this VAE has a tilt-pair encoder; pass the tilted images too")
            return self.encoder(images, tilted)
        if tilted is not None:
            raise ValueError("this VAE's encoder takes single images; tilted images were given")
        return self.encoder(images)

    def forward(
        self,
        images: torch.Tensor,
        coords: torch.Tensor,
        *,
        tilted: torch.Tensor | None = None,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> VAEOutput:
        """Encode ``images``, draw ``z`` (or take ``mu`` if ``sample=False``), decode at ``coords (B, P, 3)``."""
        mu, logvar = self.encode(images, tilted)
        z = reparameterize(mu, logvar, generator=generator) if sample else mu
        return VAEOutput(self.decoder(coords, z), z, mu, logvar)

    @property
    def config(self) -> dict[str, Any]:
        """``{"encoder": encoder config, "decoder": {"name": ..., **decoder config}}`` (see :func:`build_vae`)."""
        return {"encoder": dict(self.encoder.config), "decoder": {"name": self.decoder.name, **self.decoder.config}}


def build_vae(config: dict[str, Any]) -> HeterogeneousVAE:
    """Rebuild an (untrained) :class:`HeterogeneousVAE` from ``vae.config``."""
    dec = dict(config["decoder"])
    name = dec.pop("name")
    return HeterogeneousVAE(build_encoder(config["encoder"]), build_saved_decoder(name, dec))
