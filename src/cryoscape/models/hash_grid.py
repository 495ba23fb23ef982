"""Multi-resolution hash-grid encoding (Instant-NGP, Mueller et al. 2022) in plain PyTorch.

A point ``u`` of the unit cube ``[0, 1]^3`` is encoded by ``L`` levels.  Level ``l`` is a cubic
lattice of resolution ``N_l = floor(N_min * b^l)`` cells per side, with
``b = exp((ln N_max - ln N_min) / (L - 1))``; each lattice corner owns a learnable vector of ``F``
features in a table of ``T`` rows.  The level's feature at ``u`` is the trilinear interpolation of
the features of the 8 corners of the cell holding ``u``; the encoding is the concatenation over the
levels, ``(..., L * F)``.

Corner -> row: a level whose ``(N_l + 1)^3`` corners fit in the table indexes them densely
(``x + y (N_l + 1) + z (N_l + 1)^2``, no collisions); a finer level hashes them with Instant-NGP's
spatial hash ``(x * 1) xor (y * 2654435761) xor (z * 805459861) mod T`` (``T`` a power of two, so
``mod`` is a bit mask and holds for the wrapped int64 products too).  Collisions are resolved by
the training gradient, as in the paper.

Properties (tests/models/test_hash_grid.py): the encoding is continuous in ``u`` (trilinear
weights are continuous across cell faces, where the two cells share the 4 corners of the face),
and at a lattice corner it equals that corner's table row exactly.  Points outside the cube are
clamped to it.  Everything is ``torch`` gathers and products, so it runs (and differentiates) on
CPU and CUDA alike; no custom kernel.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["HashGrid", "level_resolutions", "corner_rows"]

# Instant-NGP's primes, as the int32 two's-complement values with the same low 32 bits: the products
# wrap modulo 2^32, which keeps their low bits, and only the low log2(T) <= 31 bits are used
_PRIMES = (1, 2654435761 - (1 << 32), 805459861)


def level_resolutions(n_levels: int, base_resolution: int, max_resolution: int) -> list[int]:
    """Cells per side of each level: geometric from ``base_resolution`` to ``max_resolution``."""
    if n_levels < 1 or base_resolution < 1 or max_resolution < base_resolution:
        raise ValueError(f"need n_levels >= 1 and 1 <= base_resolution <= max_resolution, got "
                         f"{n_levels}, {base_resolution}, {max_resolution}")
    if n_levels == 1:
        return [int(base_resolution)]
    growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / (n_levels - 1))
    return [int(math.floor(base_resolution * growth ** level + 1e-9)) for level in range(n_levels)]


def corner_rows(corners: torch.Tensor, resolution: int, table_size: int) -> torch.Tensor:
    """Table rows of integer lattice corners ``(..., 3)`` (x, y, z) of a level of ``resolution`` cells."""
    side = resolution + 1
    if side ** 3 <= table_size:
        return corners[..., 0] + side * (corners[..., 1] + side * corners[..., 2])
    h = corners[..., 0] * _PRIMES[0]
    h = torch.bitwise_xor(h, corners[..., 1] * _PRIMES[1])
    h = torch.bitwise_xor(h, corners[..., 2] * _PRIMES[2])
    return torch.bitwise_and(h, table_size - 1)


class HashGrid(nn.Module):
    """``(..., 3)`` points of ``[0, 1]^3`` -> ``(..., n_levels * features_per_level)`` features.

    Parameters
    ----------
    n_levels, features_per_level, log2_table_size, base_resolution, max_resolution
        ``L``, ``F``, ``log2 T``, ``N_min``, ``N_max`` (module docstring).  CryoFormer's defaults are
        16 levels of 2 features, ``T = 2^15``, ``N_min = 16``.
    init_scale
        Table entries start uniform in ``[-init_scale, init_scale]`` (Instant-NGP: 1e-4).
    """

    def __init__(self, *, n_levels: int = 16, features_per_level: int = 2, log2_table_size: int = 15,
                 base_resolution: int = 16, max_resolution: int = 512, init_scale: float = 1e-4):
        super().__init__()
        self.resolutions = level_resolutions(n_levels, base_resolution, max_resolution)
        self.n_levels, self.features_per_level = int(n_levels), int(features_per_level)
        self.table_size = 1 << int(log2_table_size)
        self.tables = nn.Parameter(torch.empty(self.n_levels, self.table_size, self.features_per_level))
        nn.init.uniform_(self.tables, -init_scale, init_scale)
        self.register_buffer("level_res", torch.tensor(self.resolutions, dtype=torch.int32), persistent=False)
        self.register_buffer("offsets01", torch.tensor([0, 1], dtype=torch.int32), persistent=False)
        is_dense = [(res + 1) ** 3 <= self.table_size for res in self.resolutions]
        n_dense = sum(is_dense)
        assert all(is_dense[:n_dense]) and not any(is_dense[n_dense:])
        self._groups = [(0, n_dense, True), (n_dense, self.n_levels, False)]

    @property
    def out_features(self) -> int:
        return self.n_levels * self.features_per_level

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        lead = u.shape[:-1]
        u = u.reshape(-1, 3).clamp(0.0, 1.0)
        # levels grow finer, so the dense ones come first: two vectorised groups, in level order
        parts = [self._group(u, start, stop, dense) for start, stop, dense in self._groups if stop > start]
        out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        return out.reshape(*lead, self.out_features)

    def _group(self, u: torch.Tensor, start: int, stop: int, dense: bool) -> torch.Tensor:
        """Features ``(M, G F)`` of the levels ``start:stop`` (all dense or all hashed), vectorised over them."""
        levels = torch.arange(start, stop, device=u.device, dtype=torch.int32)
        res = self.level_res[start:stop].to(u.dtype)  # (G,)
        pos = u.unsqueeze(1) * res[:, None]  # (M, G, 3)
        base = torch.minimum(pos.detach().floor(), (res - 1)[:, None])
        frac = pos - base
        w = torch.stack([1 - frac, frac], -1)  # (M, G, 3, 2): per-axis weights of the lower/upper corner
        weights = (w[:, :, 2, :, None, None] * w[:, :, 1, None, :, None] * w[:, :, 0, None, None, :])
        ib = base.to(torch.int32).unsqueeze(-1) + self.offsets01  # (M, G, 3, 2) integer corners per axis
        ix, iy, iz = ib[:, :, 0], ib[:, :, 1], ib[:, :, 2]
        if dense:
            side = (self.level_res[start:stop] + 1)[:, None]
            iy, iz = iy * side, iz * side * side
            rows = iz[:, :, :, None, None] + iy[:, :, None, :, None] + ix[:, :, None, None, :]
        else:
            rows = torch.bitwise_xor(torch.bitwise_xor(iz[:, :, :, None, None] * _PRIMES[2],
                                                       iy[:, :, None, :, None] * _PRIMES[1]),
                                     ix[:, :, None, None, :] * _PRIMES[0])
            rows = torch.bitwise_and(rows, self.table_size - 1)
        rows = rows + (levels * self.table_size)[:, None, None, None]  # (M, G, 2, 2, 2): [z, y, x] corners
        M, G = u.shape[0], len(levels)
        table = self.tables.reshape(-1, self.features_per_level)
        # int64 rows: the backward's index_add_ takes a ~20x slower path for int32 indices on the CPU
        feats = table.index_select(0, rows.reshape(-1).long()).reshape(M, G, 8, self.features_per_level)
        out = (feats * weights.reshape(M, G, 8, 1).to(feats.dtype)).sum(2)
        return out.reshape(M, G * self.features_per_level)
