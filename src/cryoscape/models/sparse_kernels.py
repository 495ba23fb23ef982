"""Compiled CPU kernels (numba) for the sparse slice op of :mod:`cryoscape.models.sparse_slice` and
the trilinear gather of the hash grid (:mod:`cryoscape.models.hash_grid`, end of this docstring).

The pure-PyTorch op is built from library calls: finding a point's corners takes two cube-table
gathers and a dozen element-wise passes, and the transpose (the tables' gradients) sorts the
batch's corners by voxel and runs ``embedding_bag`` backwards.  On a CPU each of those passes
streams tens of megabytes at D = 128; the sort alone is an eighth of a training step.  Two loops
do the same arithmetic in one pass each:

* :func:`corners` -- every slice point's 8 trilinear corners (compact index, imaginary sign,
  weight) from the same cube tables (:meth:`HermitianLattice.lookups`);
* :func:`table_gradients` (and :func:`backproject`, the same for data) -- the transpose: every
  corner adds its weight times its point's factor (``g`` for ``V_0``, ``g s`` for the basis) to
  its voxel's row.  Each thread owns one contiguous range of rows, the ranges chosen to hold
  about equal numbers of the batch's corners; every thread reads all corners and applies those
  in its range, so no two threads write one row and nothing is sorted.  The dense gradient
  tables are zeroed by the same threads.

The forward gather stays ``embedding_bag`` (its optimised kernel was faster than a numba loop:
35 against 43 ms at D = 128, batch 64).  Measured at D = 128, batch 64, 2 threads: corners 36 ->
12 ms, tables' gradients 110 -> 60 ms.

Results equal the PyTorch path's to float rounding (tests/models/test_sparse_kernels.py).
:func:`usable` decides: CPU tensors of one float dtype (float32 or float64), numba importable,
and ``CRYOSCAPE_SPARSE_KERNELS`` not ``0``.  Threads: ``torch.get_num_threads()`` (so
``OMP_NUM_THREADS`` bounds both).  The loops live in ``_sparse_numba.py``, imported (with numba)
when a kernel first runs; they compile on first use (about a second each, cached on disk by numba
next to that file when it is writable).  Should numba fail (say, it cannot compile on some
platform), one warning is logged and the PyTorch path runs from then on.  GPUs use the PyTorch
path.

The hash grid (CryoFormer's spatial features) gathers 8 corners per point and level: in PyTorch
its cells, corner rows, weights and their gradients are a dozen broadcast passes over ``(N, 8, F)``
temporaries.  :func:`hash_grid` and :func:`hash_grid_gradients` take the points themselves and
recompute every level's cells, corner rows and weights a block of 1024 points at a time, into
scratch arrays that stay in cache, so nothing of size ``(N, 8)`` is written to memory (an earlier
version stored the rows: 64 bytes per point and level, streamed three times per step).  Their
effect on CryoFormer's training speed is in the README.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["usable", "corners", "table_gradients", "backproject", "GridLevels", "grid_levels", "hash_grid",
           "hash_grid_gradients", "hash_grid_compiles"]

#: at most this many row ranges (threads) in the transposes: every one reads all the corners
_MAX_PARTS = 16

log = logging.getLogger(__name__)

#: numba is installed (it comes with umap-learn; without it everything runs the PyTorch path); it
#: is imported with the loops (models/_sparse_numba.py) when a kernel first runs
_HAVE_NUMBA = importlib.util.find_spec("numba") is not None
#: why the kernels were switched off after a numba error (None while they work)
_failure: str | None = None


def _loops():
    """The compiled loops (imports numba on first use)."""
    from cryoscape.models import _sparse_numba

    return _sparse_numba


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can run on ``tensors``: all on the CPU, the floating ones of one dtype
    (float32 or float64), numba present and working, and ``CRYOSCAPE_SPARSE_KERNELS`` not ``0``."""
    if _failure is not None or os.environ.get("CRYOSCAPE_SPARSE_KERNELS", "1") == "0" or not _HAVE_NUMBA:
        return False
    dtype = None
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu":
            return False
        if t.is_floating_point():
            if t.dtype not in (torch.float32, torch.float64) or (dtype is not None and t.dtype != dtype):
                return False
            dtype = t.dtype
    return True


def _threads() -> int:
    return _loops().set_threads(torch.get_num_threads())


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _fallback_on_numba_error(fn):
    """A kernel entry point that, should numba fail (it cannot compile on this platform, say),
    logs one warning, switches the kernels off for the process and returns ``None``, so that the
    caller runs the PyTorch path."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        global _failure
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if not isinstance(err, _loops().NumbaError):
                raise
            _failure = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
            log.warning("the compiled sparse-slice kernels failed (%s); using the PyTorch path from now on", _failure)
            return None

    return run


def _row_bounds(index: torch.Tensor, n_rows: int, n_parts: int) -> np.ndarray:
    """Split rows ``0 .. n_rows`` into ``n_parts`` contiguous ranges holding about equal numbers of
    the corners ``index`` (from a sample of them), as ``n_parts + 1`` boundaries."""
    bounds = np.empty(n_parts + 1, dtype=np.int64)
    bounds[0], bounds[-1] = 0, n_rows
    if n_parts > 1:
        flat = index.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 8192)].to(torch.float64)
        q = torch.quantile(sample, torch.linspace(0, 1, n_parts + 1, dtype=torch.float64)[1:-1])
        bounds[1:-1] = np.clip(q.round().long().numpy(), 0, n_rows)
        bounds[1:-1].sort()
    return bounds


@_fallback_on_numba_error
def corners(points: torch.Tensor, index_table: torch.Tensor, factor_table: torch.Tensor, L: int, S: int):
    """``(index int32, imag_sign, weights)``, each ``(..., 8)``, of ``points (..., 3)``: the same as
    :func:`cryoscape.models.sparse_slice.corner_codes_and_weights` (without gradients)."""
    shape = (*points.shape[:-1], 8)
    flat = _np(points.reshape(-1, 3))
    n = flat.shape[0]
    index = torch.empty(n, 8, dtype=torch.int32)
    sign = torch.empty(n, 8, dtype=points.dtype)
    w = torch.empty(n, 8, dtype=points.dtype)
    _threads()
    _loops().corners_kernel(flat, _np(index_table), _np(factor_table.to(points.dtype)), int(L), int(S),
                            index.numpy(), sign.numpy(), w.numpy())
    return index.view(shape), sign.view(shape), w.view(shape)


@_fallback_on_numba_error
def table_gradients(M_re, B_re, s, index, w, imag_sign, g_re, g_im, *, n_parts: int | None = None):
    """Dense gradients ``(dM_re, dM_im, dB_re, dB_im)`` of the tables (shapes of ``M_re`` and
    ``B_re``; the basis ones ``None`` without a basis) for output gradients ``g_re, g_im (B, P)``.
    ``n_parts``: row ranges (default one per thread, at most 16)."""
    Bn, P, C = index.shape
    N = Bn * P
    n_vox = M_re.shape[0]
    K = 0 if B_re is None else B_re.shape[1]
    dtype = M_re.dtype
    gm_re = torch.empty(n_vox, 1, dtype=dtype)
    gm_im = torch.empty(n_vox, 1, dtype=dtype)
    gb_re = torch.empty(n_vox if K else 1, K, dtype=dtype)
    gb_im = torch.empty(n_vox if K else 1, K, dtype=dtype)
    s_np = _np(s) if K else np.zeros((Bn, 0), dtype=gm_re.numpy().dtype)
    flat = index.reshape(N, C)
    threads = _threads()
    bounds = _row_bounds(flat, n_vox, min(threads, _MAX_PARTS) if n_parts is None else n_parts)
    _loops().gradient_kernel(_np(flat), _np(w.reshape(N, C)), _np(imag_sign.reshape(N, C)),
                             _np(g_re.reshape(N)), _np(g_im.reshape(N)), s_np, max(P, 1),
                             gm_re.numpy().reshape(-1), gm_im.numpy().reshape(-1), gb_re.numpy(), gb_im.numpy(),
                             bounds)
    if not K:
        return gm_re, gm_im, None, None
    return gm_re, gm_im, gb_re, gb_im


@_fallback_on_numba_error
def backproject(index, w, imag_sign, values: torch.Tensor, weights: torch.Tensor, *, numerator: torch.Tensor,
                weight_sum: torch.Tensor) -> bool:
    """Add ``w * values`` (imaginary parts signed) and ``w * weights`` of every corner to
    ``numerator (n_vox,)`` complex and ``weight_sum (n_vox,)`` real, in place (the transpose of
    the gather; corners ``(N, 8)``).  Returns ``True`` (``None`` after a numba error: nothing added)."""
    C = index.shape[-1]
    index, w, imag_sign = index.reshape(-1, C), w.reshape(-1, C), imag_sign.reshape(-1, C)
    dtype = weight_sum.dtype
    v = values.reshape(-1)
    parts = torch.view_as_real(numerator)
    if parts.dtype != dtype or not parts.is_contiguous() or not weight_sum.is_contiguous():
        raise ValueError("backproject: numerator and weight_sum must be contiguous and of one precision")
    bounds = _row_bounds(index, weight_sum.shape[0], min(_threads(), _MAX_PARTS))
    _loops().backproject_kernel(_np(index), _np(w.to(dtype)), _np(imag_sign.to(dtype)), _np(v.real.to(dtype)),
                                _np(v.imag.to(dtype)), _np(weights.reshape(-1).to(dtype)), parts[:, 0].numpy(),
                                parts[:, 1].numpy(), weight_sum.numpy(), bounds)
    return True


class GridLevels(NamedTuple):
    """A hash grid's levels as the loops take them: cells per side ``res`` (float, the positions'
    dtype), corners per side ``sides`` (int64), ``dense`` (bool: indexed densely, else hashed), the
    rows per level ``table_size`` (each level's block of the table), ``one`` (1 in the positions'
    dtype, so that the weights and ``res - 1`` stay in it) and ``rows_kind`` (an empty array of the
    row index type: int32 while every row fits it)."""

    res: np.ndarray
    sides: np.ndarray
    dense: np.ndarray
    table_size: int
    one: np.generic
    rows_kind: np.ndarray


def grid_levels(resolutions: list[int], table_size: int, dtype: torch.dtype) -> GridLevels:
    """:class:`GridLevels` of levels of ``resolutions`` cells per side, for positions of ``dtype``."""
    res = torch.tensor(resolutions, dtype=dtype).numpy()
    sides = np.asarray(resolutions, dtype=np.int64) + 1
    rows_kind = np.empty(0, np.int32 if len(resolutions) * table_size < 2 ** 31 else np.int64)
    return GridLevels(res, sides, sides ** 3 <= table_size, int(table_size), res.dtype.type(1), rows_kind)


def _level_bounds(n_levels: int, n_parts: int) -> np.ndarray:
    """Levels ``0 .. n_levels`` split into at most ``n_parts`` contiguous ranges, as boundaries."""
    return np.unique(np.linspace(0, n_levels, min(n_parts, n_levels) + 1).round().astype(np.int64))


def hash_grid(table: torch.Tensor, u: torch.Tensor, levels: GridLevels) -> torch.Tensor:
    """The hash grid's features ``(M, L F)`` at points ``u`` ``(M, 3)`` of the unit cube
    (:class:`cryoscape.models.hash_grid.HashGrid`), ``table`` ``(L T, F)``.  Blocks of points, level by
    level: the cells' corner rows and fractions in one vectorised loop, then one gather per feature
    (the points are passed axis-major, so that the first loop vectorises)."""
    _threads()
    out = torch.empty(u.shape[0], len(levels.res) * table.shape[1], dtype=table.dtype)
    _loops().hash_grid_forward_kernel(_np(table), _np(u.t()), *levels, out.numpy())
    return out


def hash_grid_gradients(table: torch.Tensor, u: torch.Tensor, grad: torch.Tensor, levels: GridLevels, *,
                        want_table: bool, want_u: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`hash_grid` transposed: the gradients of ``table`` and ``u`` for the output's ``grad``
    ``(M, L F)``.  Two loops, each run only when its gradient is wanted: the table's, the levels split
    between the threads (a level's rows are its own block, so no write is shared and nothing is
    sorted), and the positions', by blocks of points as the forward."""
    loops = _loops()
    threads = _threads()
    g_table = g_u = None
    u_t, grad = _np(u.t()), _np(grad)
    if want_table:
        g_table = torch.zeros_like(table)
        bounds = _level_bounds(len(levels.res), threads)
        loops.hash_grid_table_gradient_kernel(u_t, grad, *levels, bounds, g_table.numpy())
    if want_u:
        g_u_t = torch.empty(3, u.shape[0], dtype=u.dtype)
        loops.hash_grid_position_gradient_kernel(_np(table), u_t, grad, *levels, g_u_t.numpy())
        g_u = g_u_t.t().contiguous()
    return g_table, g_u


@functools.lru_cache(maxsize=None)
def hash_grid_compiles(dtype: torch.dtype) -> bool:
    """Whether the hash grid's three loops compile and run for positions of ``dtype`` (tried once on
    a tiny grid; after a numba error, one warning and ``False``, so the grid keeps its PyTorch path)."""
    return _try_hash_grid(dtype) is not None


@_fallback_on_numba_error
def _try_hash_grid(dtype: torch.dtype) -> bool:
    levels = grid_levels([2, 4], 64, dtype)
    table, u = torch.zeros(128, 2, dtype=dtype), torch.full((3, 3), 0.5, dtype=dtype)
    out = hash_grid(table, u, levels)
    hash_grid_gradients(table, u, torch.ones_like(out), levels, want_table=True, want_u=True)
    return True
