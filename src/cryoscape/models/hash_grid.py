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
clamped to it.  The arithmetic is ``torch`` gathers and products, so it runs (and differentiates) on
CPU and CUDA alike; on a CPU with numba the same arithmetic runs as compiled loops that take the
points themselves (:class:`_CompiledGrid`, tested equal to the PyTorch path).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cryoscape.models import sparse_kernels

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
        if sparse_kernels.usable(self.tables, u) and sparse_kernels.hash_grid_compiles(u.dtype):
            levels = sparse_kernels.grid_levels(self.resolutions, self.table_size, u.dtype)  # a few tiny arrays
            out = _CompiledGrid.apply(self.tables, u, levels)
        else:
            # levels grow finer, so the dense ones come first: two vectorised groups, in level order
            parts = [self._group(u, start, stop, dense) for start, stop, dense in self._groups if stop > start]
            out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        return out.reshape(*lead, self.out_features)

    def _group(self, u: torch.Tensor, start: int, stop: int, dense: bool) -> torch.Tensor:
        """Features ``(M, G F)`` of the levels ``start:stop`` (all dense or all hashed), vectorised over them."""
        res = self.level_res[start:stop].to(u.dtype)  # (G,)
        pos = u.unsqueeze(1) * res[:, None]  # (M, G, 3)
        base = torch.minimum(pos.detach().floor(), (res - 1)[:, None])
        frac = pos - base
        M, G = u.shape[0], stop - start
        table = self.tables.reshape(-1, self.features_per_level)
        rows = self._rows(base.to(torch.int32), start, stop, dense).reshape(M * G, 8)
        out = _Trilinear.apply(table, rows, frac.reshape(M * G, 3), G)
        return out.reshape(M, G * self.features_per_level)

    def _rows(self, base: torch.Tensor, start: int, stop: int, dense: bool) -> torch.Tensor:
        """Table rows ``(M, G, 2, 2, 2)`` int64 (``[z, y, x]`` corners) of the cells at ``base`` ``(M, G, 3)``
        (PyTorch; int32 arithmetic, whose wrapped products keep the hash's low bits)."""
        levels = torch.arange(start, stop, device=base.device, dtype=torch.int32)
        ib = base.unsqueeze(-1) + self.offsets01  # (M, G, 3, 2) integer corners per axis
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
        # int64: a gradient's index_add_ takes a ~20x slower CPU path for int32 indices
        return (rows + (levels * self.table_size)[:, None, None, None]).long()


def _corner_weights(frac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trilinear weights ``(N, 8)`` of the corners in ``[z, y, x]`` binary order for cell fractions
    ``(N, 3)`` (x, y, z), and the per-axis pairs ``(N, 2)`` (lower, upper corner) they are made of."""
    wx, wy, wz = (torch.stack([1 - frac[:, a], frac[:, a]], -1) for a in range(3))
    weights = (wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :]).reshape(-1, 8)
    return weights, wx, wy, wz


class _Trilinear(torch.autograd.Function):
    """``out[n] = sum_c weights(frac[n])_c * table[rows[n, c]]``: the gather of one cell's 8 corners.

    Inputs: ``table`` ``(R, F)``, ``rows`` ``(N, 8)`` int64 (corners in ``[z, y, x]`` binary order),
    ``frac`` ``(N, 3)`` the point's position in its cell (x, y, z).  Written out (forward: one
    ``embedding_bag``; backward: the table's gradient by one ``index_add_``, the position's from the
    corner differences) because autograd through the broadcast products of the weights spent most
    of a CryoFormer step on the CPU in reductions of ``(N, 8, F)`` temporaries.  ``n_levels``: the
    entries are ``n = m * n_levels + level``, each level's rows in its own block of the table.  The
    path for GPUs and for CPUs without numba; CPUs with numba run :class:`_CompiledGrid`.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor, frac: torch.Tensor, n_levels: int) -> torch.Tensor:
        ctx.n_levels = int(n_levels)
        ctx.save_for_backward(table, rows, frac)
        weights = _corner_weights(frac)[0]
        return torch.nn.functional.embedding_bag(rows, table, per_sample_weights=weights.to(table.dtype),
                                                 mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        table, rows, frac = ctx.saved_tensors
        grad = grad.to(table.dtype).contiguous()
        want_table, want_frac = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        g_table = g_frac = None
        weights, wx, wy, wz = _corner_weights(frac)
        if want_table:
            contributions = (grad[:, None, :] * weights[:, :, None].to(grad.dtype)).reshape(-1, grad.shape[-1])
            g_table = torch.zeros_like(table).index_add_(0, rows.reshape(-1), contributions)
        if want_frac:
            # s_c = table[rows_c] . grad; d out / d frac_axis = sum over corners of s_c times the other
            # two axes' weights, with sign + for the upper corner along the axis and - for the lower
            s = (table.index_select(0, rows.reshape(-1)).reshape(*rows.shape, -1) * grad[:, None, :]).sum(-1)
            s = s.reshape(-1, 2, 2, 2).to(weights.dtype)  # [n, z, y, x]
            dx = s[..., 1] - s[..., 0]  # (N, 2z, 2y)
            dy = s[:, :, 1, :] - s[:, :, 0, :]  # (N, 2z, 2x)
            dz = s[:, 1] - s[:, 0]  # (N, 2y, 2x)
            g_frac = torch.stack([
                (dx * wz[:, :, None] * wy[:, None, :]).sum((1, 2)),
                (dy * wz[:, :, None] * wx[:, None, :]).sum((1, 2)),
                (dz * wy[:, :, None] * wx[:, None, :]).sum((1, 2)),
            ], -1)
        return g_table, None, g_frac, None


class _CompiledGrid(torch.autograd.Function):
    """The whole grid (every level, from the points) as compiled CPU loops
    (:func:`cryoscape.models.sparse_kernels.hash_grid` and ``hash_grid_gradients``): the cells,
    corner rows and weights are recomputed in each direction, a block of points at a time, instead
    of stored for the batch.
    Inputs: ``tables`` ``(L, T, F)``, ``u`` ``(M, 3)`` in the unit cube; output ``(M, L F)``."""

    @staticmethod
    def forward(ctx, tables: torch.Tensor, u: torch.Tensor, levels: sparse_kernels.GridLevels) -> torch.Tensor:
        ctx.levels = levels
        ctx.save_for_backward(tables, u)
        return sparse_kernels.hash_grid(tables.reshape(-1, tables.shape[-1]), u, levels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tables, u = ctx.saved_tensors
        g_table, g_u = sparse_kernels.hash_grid_gradients(
            tables.reshape(-1, tables.shape[-1]), u, grad.to(tables.dtype).contiguous(), ctx.levels,
            want_table=ctx.needs_input_grad[0], want_u=ctx.needs_input_grad[1])
        return None if g_table is None else g_table.reshape(tables.shape), g_u, None
