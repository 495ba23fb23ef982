"""Building blocks shared by the encoders and decoders: activations and the residual MLP.

Size convention ("width x layers", as in the thesis and cryoDRGN's ``--enc-dim/--enc-layers``):
an MLP ``256 x 3`` is an input layer ``Linear(in, 256)``, then **3** hidden ``256 -> 256``
layers, then an output layer ``Linear(256, out)``, ReLU after every layer but the last.  This is
how the thesis counts its published sizes: the "5 hidden layers of width 512" decoder of ch. 5
has 1,510,913 parameters at D = 128, which is ``(384+1)*512 + 5*(512+1)*512 + (512+1)*1``.
Hidden layers are residual, ``h <- act(Linear(h) + h)`` (thesis sec. 5.6.1: "residual
connections between layer input and output to whiten gradients"), unless ``residual=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "make_activation", "ResidualMLP"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


def make_activation(name: str) -> nn.Module:
    """Activation module by name (one of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class ResidualMLP(nn.Module):
    """``Linear(in, width)``, ``layers`` hidden ``width -> width`` layers, ``Linear(width, out)``.

    Parameters
    ----------
    in_dim, out_dim
        Input and output features.  ``out_dim=None`` drops the output layer (the module then
        returns the last hidden activations, ``width`` features: a feature extractor).
    layers
        Number of hidden ``width -> width`` layers (>= 0).
    width
        Hidden width.
    activation
        Name of the activation (:data:`ACTIVATIONS`).
    residual
        Use ``act(Linear(h) + h)`` in the hidden layers (default) or plain ``act(Linear(h))``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None,
        *,
        layers: int,
        width: int,
        activation: str = "relu",
        residual: bool = True,
    ):
        super().__init__()
        if layers < 0 or width < 1 or in_dim < 1:
            raise ValueError(f"invalid MLP size: in_dim={in_dim}, layers={layers}, width={width}")
        self.in_dim = int(in_dim)
        self.width = int(width)
        self.residual = bool(residual)
        self.input = nn.Linear(self.in_dim, self.width)
        self.hidden = nn.ModuleList(nn.Linear(self.width, self.width) for _ in range(int(layers)))
        self.output = nn.Linear(self.width, int(out_dim)) if out_dim is not None else None
        self.act = make_activation(activation)
        self.out_dim = int(out_dim) if out_dim is not None else self.width

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the MLP to ``x (B, ..., in_dim - e)``, optionally concatenated with ``extra (B, e)``.

        ``extra`` (a per-batch vector such as a latent ``z``) is logically concatenated to the
        features of every point of its batch element, but never materialised: the input layer is
        split as ``W x + W_e extra``, so the ``(B, P, e)`` broadcast copy is never built.
        """
        if extra is None:
            h = self.input(x)
        else:
            e = extra.shape[-1]
            d = self.in_dim - e
            if x.shape[-1] != d:
                raise ValueError(f"MLP expects {d} point features plus {e} extra, got {x.shape[-1]}")
            w = self.input.weight
            h = F.linear(x, w[:, :d], self.input.bias)
            he = F.linear(extra, w[:, d:])  # (B, width)
            h = h + he.reshape(he.shape[0], *([1] * (h.dim() - 2)), he.shape[-1])
        h = self.act(h)
        for lin in self.hidden:
            h = self.act(lin(h) + h) if self.residual else self.act(lin(h))
        return self.output(h) if self.output is not None else h
