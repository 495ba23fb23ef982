"""Image encoders ``q(z | image)`` of the VAE (thesis 3.1.3) and the tilt-pair encoder (3.7.2).

An encoder maps real-space particle images ``(B, D, D)`` (already normalised by the data
pipeline) to the mean and log-variance of a diagonal Gaussian over the latent ``z``.  It is
built from a *trunk* (image -> feature vector) and a *head* (features -> ``2 * zdim``):

``mlp`` / ``resmlp``
    The pixels inside a disc of radius ``mask_radius_fraction * D / 2`` around the image centre
    (index ``D // 2``) are flattened and fed to an MLP ``width x layers`` (size convention in
    :mod:`cryoscape.models.layers`); ``resmlp`` uses residual hidden layers (as cryoDRGN's
    encoder), ``mlp`` plain ones.  The head is one ``Linear(width, 2 zdim)``, so the whole
    encoder is exactly an MLP of that size.
``conv``
    A small CNN: the disc-masked image goes through ``layers + 1`` stride-2 3x3 convolutions
    (channels 32, 64, ... capped at ``width``) with ReLU, an adaptive average pool to 4 x 4
    (so any box from 32 to 256 and beyond works, odd or even) and ``Linear(16 C, width)``.

:class:`TiltPairEncoder` (thesis 3.7.2) encodes an image and its tilted partner with one shared
trunk, concatenates the two feature vectors and maps them to ``(mu, logvar)`` with a second MLP,
so the latent is encouraged to be invariant to the viewing direction.

Every encoder keeps its keyword arguments in ``config`` (with a ``"type"`` key) so that
``build_encoder(encoder.config)`` rebuilds it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cryoscape.fourier.masks import circular_mask_2d
from cryoscape.models.layers import ResidualMLP, make_activation

__all__ = ["ENCODER_KINDS", "LOGVAR_CAP", "ImageEncoder", "TiltPairEncoder", "bounded_logvar", "build_encoder"]

ENCODER_KINDS = ("mlp", "resmlp", "conv")
_CONV_POOL = 4
#: log-variance above which an encoder's output saturates (a posterior ~2.7x wider than the prior)
LOGVAR_CAP = 2.0


def bounded_logvar(raw: torch.Tensor, cap: float = LOGVAR_CAP) -> torch.Tensor:
    """``raw`` below ``cap``, ``cap + tanh(raw - cap)`` above it: at most ``cap + 1``.

    A Gaussian posterior is never wider than its N(0, 1) prior, so any log-variance above 0 is
    a miss of the encoder; the cap only stops the rare runaway output, whose latent, sampled far
    outside the prior, spikes the KL and the decoder's loss for a whole epoch (README, "Training").
    Below the cap the output is untouched (bit for bit), above it the gradient still flows.
    """
    return torch.where(raw > cap, cap + torch.tanh(raw - cap), raw)


class _ConvTrunk(nn.Module):
    """Stride-2 CNN + adaptive pooling: ``(B, D, D)`` -> ``(B, width)``."""

    def __init__(self, *, blocks: int, width: int, activation: str):
        super().__init__()
        convs = []
        c_in = 1
        for i in range(blocks):
            c_out = min(32 * 2**i, max(width, 32))
            convs += [nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1), make_activation(activation)]
            c_in = c_out
        self.convs = nn.Sequential(*convs)
        self.pool = nn.AdaptiveAvgPool2d(_CONV_POOL)
        self.fc = nn.Linear(c_in * _CONV_POOL**2, width)
        self.act = make_activation(activation)
        self.out_dim = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.convs(images[:, None]))
        return self.act(self.fc(h.flatten(1)))


class _ImageTrunk(nn.Module):
    """Masked pixels -> feature vector of ``width`` (the part shared by both encoders)."""

    def __init__(self, *, box_size: int, kind: str, layers: int, width: int, mask_radius_fraction: float,
                 activation: str, lowpass_fraction: float | None = None):
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"unknown encoder kind {kind!r}; choose one of {list(ENCODER_KINDS)}")
        if box_size < 2:
            raise ValueError(f"box_size must be at least 2, got {box_size}")
        if not mask_radius_fraction > 0:
            raise ValueError(f"mask_radius_fraction must be positive, got {mask_radius_fraction}")
        if lowpass_fraction is not None and not 0 < float(lowpass_fraction) <= 1:
            raise ValueError(f"lowpass_fraction must be in (0, 1] (of Nyquist), got {lowpass_fraction}")
        self.box_size = int(box_size)
        self.kind = kind
        self.lowpass = lowpass_fraction is not None and float(lowpass_fraction) < 1
        if self.lowpass:
            ky = torch.fft.fftfreq(self.box_size).abs().unsqueeze(-1)
            kx = torch.fft.rfftfreq(self.box_size).unsqueeze(0)
            radius = (kx.square() + ky.square()).sqrt() / 0.5  # fraction of Nyquist
            self.register_buffer("lowpass_filter", (radius <= float(lowpass_fraction)).to(torch.float32),
                                 persistent=False)
        mask = circular_mask_2d(self.box_size, mask_radius_fraction * self.box_size / 2)
        # Flat indices of the pixels read by the MLP encoders (row-major [y, x]).
        self.register_buffer("pixel_indices", torch.nonzero(mask.flatten()).flatten(), persistent=False)
        self.register_buffer("mask", mask.to(torch.float32), persistent=False)
        if kind == "conv":
            self.net = _ConvTrunk(blocks=int(layers) + 1, width=int(width), activation=activation)
        else:
            self.net = ResidualMLP(
                self.n_pixels, None, layers=int(layers), width=int(width), activation=activation,
                residual=(kind == "resmlp"),
            )
        self.out_dim = int(width)

    @property
    def n_pixels(self) -> int:
        """Number of pixels inside the disc (the MLP input size)."""
        return int(self.pixel_indices.numel())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        D = self.box_size
        if images.dim() != 3 or images.shape[-2:] != (D, D):
            raise ValueError(f"encoder expects images of shape (B, {D}, {D}), got {tuple(images.shape)}")
        x = images.to(self.mask.dtype)
        if self.lowpass:  # the encoder reads the low frequencies only (see ImageEncoder)
            x = torch.fft.irfft2(torch.fft.rfft2(x) * self.lowpass_filter, s=(D, D))
        if self.kind == "conv":
            return self.net(x * self.mask)
        return self.net(x.reshape(x.shape[0], D * D).index_select(1, self.pixel_indices))


class ImageEncoder(nn.Module):
    """``q(z | image)``: real-space images ``(B, D, D)`` -> ``(mu, logvar)``, each ``(B, zdim)``.

    Parameters
    ----------
    box_size
        Image box ``D`` (the encoder's input size; may differ from the decoder's).
    zdim
        Latent dimension (>= 1).
    kind
        ``"mlp"``, ``"resmlp"`` or ``"conv"`` (module docstring).
    layers, width
        Size, ``width x layers`` (for ``conv``: ``layers + 1`` stride-2 blocks, head width).
    mask_radius_fraction
        Radius of the disc of pixels read, as a fraction of ``D / 2``; ``>= sqrt(2)`` reads all.
    activation
        Activation name.
    lowpass_fraction
        When set (< 1), the images are low-passed to this fraction of Nyquist (a sharp disc in
        Fourier space) before the disc of pixels is read: at low SNR the high frequencies are
        almost all noise, and a conformational change shows at low resolution first.
    """

    def __init__(
        self,
        *,
        box_size: int,
        zdim: int,
        kind: str = "resmlp",
        layers: int = 3,
        width: int = 256,
        mask_radius_fraction: float = 1.0,
        activation: str = "relu",
        lowpass_fraction: float | None = None,
    ):
        super().__init__()
        if zdim < 1:
            raise ValueError(f"an encoder needs zdim >= 1, got {zdim}")
        self.zdim = int(zdim)
        self.config: dict[str, Any] = {
            "type": "image",
            "box_size": int(box_size),
            "zdim": self.zdim,
            "kind": kind,
            "layers": int(layers),
            "width": int(width),
            "mask_radius_fraction": float(mask_radius_fraction),
            "activation": activation,
            "lowpass_fraction": None if lowpass_fraction is None else float(lowpass_fraction),
        }
        self.trunk = _ImageTrunk(
            box_size=int(box_size), kind=kind, layers=int(layers), width=int(width),
            mask_radius_fraction=float(mask_radius_fraction), activation=activation, lowpass_fraction=lowpass_fraction,
        )
        self.head = nn.Linear(self.trunk.out_dim, 2 * self.zdim)

    @property
    def n_pixels(self) -> int:
        """Number of pixels read (inside the disc)."""
        return self.trunk.n_pixels

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, D, D)`` -> ``(mu (B, zdim), logvar (B, zdim))``."""
        out = self.head(self.trunk(images))
        return out[:, : self.zdim], bounded_logvar(out[:, self.zdim :])


class TiltPairEncoder(nn.Module):
    """Two-stage encoder for tilt pairs (thesis 3.7.2).

    Stage 1 encodes each image of a pair with the same trunk (shared weights) to a
    ``width``-vector; stage 2, an MLP ``width x head_layers`` on the concatenated pair, outputs
    ``(mu, logvar)``.  (The thesis used an 8-layer stage 1 with 128 outputs and a 2-layer
    stage 2 with input 256.)

    Parameters
    ----------
    box_size, zdim, kind, layers, width, mask_radius_fraction, activation
        As :class:`ImageEncoder`, for the shared stage 1.
    head_layers
        Hidden layers of stage 2 (its width is ``width``).
    """

    def __init__(
        self,
        *,
        box_size: int,
        zdim: int,
        kind: str = "resmlp",
        layers: int = 3,
        width: int = 256,
        mask_radius_fraction: float = 1.0,
        activation: str = "relu",
        head_layers: int = 2,
        lowpass_fraction: float | None = None,
    ):
        super().__init__()
        if zdim < 1:
            raise ValueError(f"an encoder needs zdim >= 1, got {zdim}")
        self.zdim = int(zdim)
        self.config: dict[str, Any] = {
            "type": "tilt_pair",
            "box_size": int(box_size),
            "zdim": self.zdim,
            "kind": kind,
            "layers": int(layers),
            "width": int(width),
            "mask_radius_fraction": float(mask_radius_fraction),
            "activation": activation,
            "lowpass_fraction": None if lowpass_fraction is None else float(lowpass_fraction),
            "head_layers": int(head_layers),
        }
        self.trunk = _ImageTrunk(
            box_size=int(box_size), kind=kind, layers=int(layers), width=int(width),
            mask_radius_fraction=float(mask_radius_fraction), activation=activation, lowpass_fraction=lowpass_fraction,
        )
        self.head = ResidualMLP(
            2 * self.trunk.out_dim, 2 * self.zdim, layers=int(head_layers), width=int(width), activation=activation
        )

    @property
    def n_pixels(self) -> int:
        return self.trunk.n_pixels

    def forward(self, images: torch.Tensor, tilted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images, tilted (B, D, D)`` -> ``(mu, logvar)``, each ``(B, zdim)``."""
        if tilted.shape != images.shape:
            raise ValueError(f"tilted images {tuple(tilted.shape)} must match images {tuple(images.shape)}")
        B = images.shape[0]
        features = self.trunk(torch.cat([images, tilted], dim=0))  # one pass through shared weights
        out = self.head(torch.cat([features[:B], features[B:]], dim=-1))
        return out[:, : self.zdim], bounded_logvar(out[:, self.zdim :])


_ENCODER_TYPES = {"image": ImageEncoder, "tilt_pair": TiltPairEncoder}


def build_encoder(config: dict[str, Any]) -> ImageEncoder | TiltPairEncoder:
    """Rebuild an (untrained) encoder from its ``config`` (``"type"``: ``"image"`` or ``"tilt_pair"``)."""
    config = dict(config)
    kind = config.pop("type", "image")
    if kind not in _ENCODER_TYPES:
        raise ValueError(f"unknown encoder type {kind!r}; choose one of {sorted(_ENCODER_TYPES)}")
    return _ENCODER_TYPES[kind](**config)
