"""The numba loops of :mod:`cryoscape.models.sparse_kernels` (see there), in a module of their own
so that numba is imported only when a kernel first runs, not by every import of the decoders."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

#: LLVM may reorder and fuse float operations (vectorised sums), but not assume finite values
_FAST = {"reassoc", "contract", "nsz", "arcp"}

#: what a failing compilation raises
NumbaError = numba.core.errors.NumbaError


def set_threads(n: int) -> int:
    """Use ``n`` threads (at most numba's own limit); returns the number used."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


@njit(parallel=True, cache=True)
def corners_kernel(points, index_table, factors, L, S, index, sign, w):  # pragma: no cover - compiled
    N = points.shape[0]
    for p in prange(N):
        px, py, pz = points[p, 0], points[p, 1], points[p, 2]
        finite = abs(px) < 1e9 and abs(py) < 1e9 and abs(pz) < 1e9  # also False for NaN
        if not finite:
            px = py = pz = 0.0
        bx, by, bz = np.floor(px), np.floor(py), np.floor(pz)
        fx, fy, fz = px - bx, py - by, pz - bz
        ix, iy, iz = int(bx), int(by), int(bz)
        inside = finite and -L - 1 <= ix <= L and -L - 1 <= iy <= L and -L - 1 <= iz <= L
        qx = min(max(ix, -L - 1), L) + L + 1
        qy = min(max(iy, -L - 1), L) + L + 1
        qz = min(max(iz, -L - 1), L) + L + 1
        flat0 = (qz * S + qy) * S + qx
        gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
        for c in range(8):  # corner order (dz, dy, dx) in binary, as corner_codes_and_weights
            dz, dy, dx = c >> 2, (c >> 1) & 1, c & 1
            flat = flat0 + dz * S * S + dy * S + dx
            index[p, c] = index_table[flat]
            sign[p, c] = factors[flat, 1]
            f = factors[flat, 0] if inside else 0.0
            wz = fz if dz else gz
            wy = fy if dy else gy
            wx = fx if dx else gx
            w[p, c] = wz * wy * wx * f

@njit(parallel=True, cache=True, fastmath=_FAST)
def gradient_kernel(index, w, sign, g_re, g_im, s, per_image, gm_re, gm_im, gb_re, gb_im, bounds):  # pragma: no cover
    K = gb_re.shape[1]
    N = index.shape[0]  # a multiple of per_image
    for t in prange(bounds.shape[0] - 1):
        lo, hi = bounds[t], bounds[t + 1]
        for i in range(lo, hi):
            gm_re[i] = 0.0
            gm_im[i] = 0.0
            for k in range(K):
                gb_re[i, k] = 0.0
                gb_im[i, k] = 0.0
        gs_re = np.empty(K, dtype=gb_re.dtype)
        gs_im = np.empty(K, dtype=gb_im.dtype)
        for b in range(N // per_image):  # image by image: no division per point
            for p in range(b * per_image, (b + 1) * per_image):
                gr = g_re[p]
                gi = g_im[p]
                ready = False
                for c in range(8):
                    i = index[p, c]
                    if i < lo or i >= hi:
                        continue
                    wr = w[p, c]
                    if wr == 0.0:
                        continue
                    if not ready:
                        for k in range(K):
                            gs_re[k] = gr * s[b, k]
                            gs_im[k] = gi * s[b, k]
                        ready = True
                    wi = wr * sign[p, c]
                    gm_re[i] += wr * gr
                    gm_im[i] += wi * gi
                    for k in range(K):
                        gb_re[i, k] += wr * gs_re[k]
                        gb_im[i, k] += wi * gs_im[k]

@njit(parallel=True, cache=True, fastmath=_FAST)
def backproject_kernel(index, w, sign, v_re, v_im, weight, num_re, num_im, wsum, bounds):  # pragma: no cover
    N = index.shape[0]
    for t in prange(bounds.shape[0] - 1):
        lo, hi = bounds[t], bounds[t + 1]
        for p in range(N):
            for c in range(8):
                i = index[p, c]
                if i < lo or i >= hi:
                    continue
                wr = w[p, c]
                num_re[i] += wr * v_re[p]
                num_im[i] += wr * sign[p, c] * v_im[p]
                wsum[i] += wr * weight[p]


#: points per block of the hash-grid loops: a block's corner rows and fractions (11 x 4-8 KiB) stay in L1/L2
_CHUNK = 1024


@njit(cache=True, fastmath=_FAST)
def _level_cells(u_t, lo, n, level, res_all, one, sides, dense_all, table_size, rows, frac):  # pragma: no cover - compiled
    """Points ``lo .. lo + n`` of ``u_t`` ``(3, M)`` in level ``level`` (of ``res`` cells per side, its block
    of the table starting at ``level * table_size``): their 8 corner rows ``rows`` ``(8, n)`` (``[z, y, x]``
    corner order) and cell fractions ``frac`` ``(3, n)``.  The arithmetic of HashGrid's PyTorch path
    (positions in ``u``'s precision; dense rows, or Instant-NGP's hash, whose int64 products keep the
    low bits of the uint32 ones).  A loop of its own, over a block of points, so that the compiler vectorises it."""
    res, side, dense = res_all[level], sides[level], dense_all[level]
    res_minus_one = res - one  # in the positions' dtype, as the PyTorch path's
    offset, mask = level * table_size, table_size - 1
    ux, uy, uz = u_t[0], u_t[1], u_t[2]
    for i in range(n):
        px, py, pz = ux[lo + i] * res, uy[lo + i] * res, uz[lo + i] * res
        fbx, fby = min(np.floor(px), res_minus_one), min(np.floor(py), res_minus_one)
        fbz = min(np.floor(pz), res_minus_one)
        frac[0, i], frac[1, i], frac[2, i] = px - fbx, py - fby, pz - fbz
        # clamped as integers too: a NaN position (a diverged run) must not index outside the table
        top = side - 2
        bx, by, bz = min(max(np.int64(fbx), 0), top), min(max(np.int64(fby), 0), top), min(max(np.int64(fbz), 0), top)
        if dense:
            r0 = offset + bx + side * (by + side * bz)
            r4 = r0 + side * side
            rows[0, i], rows[1, i], rows[2, i], rows[3, i] = r0, r0 + 1, r0 + side, r0 + side + 1
            rows[4, i], rows[5, i], rows[6, i], rows[7, i] = r4, r4 + 1, r4 + side, r4 + side + 1
        else:
            y0, z0 = by * 2654435761, bz * 805459861
            y1, z1, x1 = y0 + 2654435761, z0 + 805459861, bx + 1
            rows[0, i], rows[1, i] = offset + ((bx ^ y0 ^ z0) & mask), offset + ((x1 ^ y0 ^ z0) & mask)
            rows[2, i], rows[3, i] = offset + ((bx ^ y1 ^ z0) & mask), offset + ((x1 ^ y1 ^ z0) & mask)
            rows[4, i], rows[5, i] = offset + ((bx ^ y0 ^ z1) & mask), offset + ((x1 ^ y0 ^ z1) & mask)
            rows[6, i], rows[7, i] = offset + ((bx ^ y1 ^ z1) & mask), offset + ((x1 ^ y1 ^ z1) & mask)


@njit(cache=True, fastmath=_FAST)
def _gather(table, f, rows, frac, n, one, out, lo, col):  # pragma: no cover - compiled
    """``out[lo + i, col]`` = the trilinear blend of feature ``f`` of ``table`` ``(R, F)`` at the block's cells."""
    for i in range(n):
        fx, fy, fz = frac[0, i], frac[1, i], frac[2, i]
        gx, gy, gz = one - fx, one - fy, one - fz
        out[lo + i, col] = (gz * gy * (gx * table[rows[0, i], f] + fx * table[rows[1, i], f])
                            + gz * fy * (gx * table[rows[2, i], f] + fx * table[rows[3, i], f])
                            + fz * gy * (gx * table[rows[4, i], f] + fx * table[rows[5, i], f])
                            + fz * fy * (gx * table[rows[6, i], f] + fx * table[rows[7, i], f]))


@njit(parallel=True, cache=True, fastmath=_FAST)
def hash_grid_forward_kernel(table, u_t, res, sides, dense, table_size, one, rows_kind,
                             out):  # pragma: no cover - compiled
    M, L, F = u_t.shape[1], res.shape[0], table.shape[1]
    for block in prange((M + _CHUNK - 1) // _CHUNK):
        rows, frac = np.empty((8, _CHUNK), rows_kind.dtype), np.empty((3, _CHUNK), u_t.dtype)
        lo = block * _CHUNK
        n = min(M - lo, _CHUNK)
        for level in range(L):
            _level_cells(u_t, lo, n, level, res, one, sides, dense, table_size, rows, frac)
            for f in range(F):
                _gather(table, f, rows, frac, n, one, out, lo, level * F + f)


@njit(cache=True, fastmath=_FAST)
def _scatter(g_table, rows, frac, n, one, grad, lo, col):  # pragma: no cover - compiled
    """:func:`_gather` transposed, every feature of a point at once (its 8 weights computed once, and the
    features of a row share a cache line): ``g_table[rows[c, i], f] += w_c(i) grad[lo + i, col + f]``."""
    F = g_table.shape[1]
    for i in range(n):
        fx, fy, fz = frac[0, i], frac[1, i], frac[2, i]
        gx, gy, gz = one - fx, one - fy, one - fz
        w00, w01, w10, w11 = gz * gy, gz * fy, fz * gy, fz * fy
        r0, r1, r2, r3 = rows[0, i], rows[1, i], rows[2, i], rows[3, i]
        r4, r5, r6, r7 = rows[4, i], rows[5, i], rows[6, i], rows[7, i]
        for f in range(F):
            g = grad[lo + i, col + f]
            a, b = gx * g, fx * g
            g_table[r0, f] += w00 * a
            g_table[r1, f] += w00 * b
            g_table[r2, f] += w01 * a
            g_table[r3, f] += w01 * b
            g_table[r4, f] += w10 * a
            g_table[r5, f] += w10 * b
            g_table[r6, f] += w11 * a
            g_table[r7, f] += w11 * b


@njit(parallel=True, cache=True, fastmath=_FAST)
def hash_grid_table_gradient_kernel(u_t, grad, res, sides, dense, table_size, one, rows_kind,
                                    level_bounds, g_table):  # pragma: no cover - compiled
    M, F = u_t.shape[1], g_table.shape[1]
    for t in prange(level_bounds.shape[0] - 1):  # a level's rows are its own block: no shared writes
        rows, frac = np.empty((8, _CHUNK), rows_kind.dtype), np.empty((3, _CHUNK), u_t.dtype)
        for lo in range(0, M, _CHUNK):
            n = min(M - lo, _CHUNK)
            for level in range(level_bounds[t], level_bounds[t + 1]):
                _level_cells(u_t, lo, n, level, res, one, sides, dense, table_size, rows, frac)
                _scatter(g_table, rows, frac, n, one, grad, lo, level * F)


@njit(cache=True, fastmath=_FAST)
def _corner_dots(table, f, rows, n, grad, lo, col, dots):  # pragma: no cover - compiled
    """``dots[c, i] += table[rows[c, i], f] * grad[lo + i, col]``: feature ``f``'s share of the corners'
    dot products with the output's gradient."""
    for i in range(n):
        g = grad[lo + i, col]
        for c in range(8):
            dots[c, i] += table[rows[c, i], f] * g


@njit(cache=True, fastmath=_FAST)
def _position_terms(dots, frac, n, res, one, g_u):  # pragma: no cover - compiled
    """Add one level's ``d out / d u`` terms to ``g_u`` ``(3, n)``: with ``s_c`` the corner dots
    (``c = 4 dz + 2 dy + dx``), ``d/dfx = sum over (dz, dy) of (s[dz,dy,1] - s[dz,dy,0]) wz wy`` (and so
    on), and ``d frac / d u = res`` (the cell's corner is held fixed)."""
    for i in range(n):
        s0, s1, s2, s3 = dots[0, i], dots[1, i], dots[2, i], dots[3, i]
        s4, s5, s6, s7 = dots[4, i], dots[5, i], dots[6, i], dots[7, i]
        fx, fy, fz = frac[0, i], frac[1, i], frac[2, i]
        gx, gy, gz = one - fx, one - fy, one - fz
        g_u[0, i] += res * ((s1 - s0) * gz * gy + (s3 - s2) * gz * fy + (s5 - s4) * fz * gy + (s7 - s6) * fz * fy)
        g_u[1, i] += res * ((s2 - s0) * gz * gx + (s3 - s1) * gz * fx + (s6 - s4) * fz * gx + (s7 - s5) * fz * fx)
        g_u[2, i] += res * ((s4 - s0) * gy * gx + (s5 - s1) * gy * fx + (s6 - s2) * fy * gx + (s7 - s3) * fy * fx)


@njit(parallel=True, cache=True, fastmath=_FAST)
def hash_grid_position_gradient_kernel(table, u_t, grad, res, sides, dense, table_size, one,
                                       rows_kind, g_u_t):  # pragma: no cover - compiled
    M, L, F = u_t.shape[1], res.shape[0], table.shape[1]
    for block in prange((M + _CHUNK - 1) // _CHUNK):
        rows, frac = np.empty((8, _CHUNK), rows_kind.dtype), np.empty((3, _CHUNK), u_t.dtype)
        dots, g_u = np.empty((8, _CHUNK), u_t.dtype), np.zeros((3, _CHUNK), u_t.dtype)
        lo = block * _CHUNK
        n = min(M - lo, _CHUNK)
        for level in range(L):
            _level_cells(u_t, lo, n, level, res, one, sides, dense, table_size, rows, frac)
            dots[:] = 0.0
            for f in range(F):
                _corner_dots(table, f, rows, n, grad, lo, level * F + f, dots)
            _position_terms(dots, frac, n, res[level], one, g_u)
        for a in range(3):
            for i in range(n):
                g_u_t[a, lo + i] = g_u[a, i]
