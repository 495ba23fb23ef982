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


@njit(inline="always")
def _corner_weight(c, fx, fy, fz):  # pragma: no cover - compiled
    """Trilinear weight of corner ``c`` (``[z, y, x]`` in binary) at cell fractions ``(fx, fy, fz)``."""
    wz = fz if c >> 2 else 1.0 - fz
    wy = fy if (c >> 1) & 1 else 1.0 - fy
    wx = fx if c & 1 else 1.0 - fx
    return wz * wy * wx


@njit(parallel=True, cache=True, fastmath=_FAST)
def trilinear_table_gradient_kernel(rows, frac, grad, n_levels, g_table):  # pragma: no cover - compiled
    N, F = rows.shape[0], grad.shape[1]
    M = N // n_levels
    for level in prange(n_levels):  # a level's rows lie in its own block of the table: no shared writes
        for m in range(M):
            n = m * n_levels + level
            fx, fy, fz = frac[n, 0], frac[n, 1], frac[n, 2]
            for c in range(8):
                w = _corner_weight(c, fx, fy, fz)
                r = rows[n, c]
                for f in range(F):
                    g_table[r, f] += w * grad[n, f]


@njit(inline="always", fastmath=_FAST)
def _dot(table, r, grad, n, F):  # pragma: no cover - compiled
    acc = 0.0
    for f in range(F):
        acc += table[r, f] * grad[n, f]
    return acc


@njit(parallel=True, cache=True, fastmath=_FAST)
def trilinear_position_gradient_kernel(table, rows, frac, grad, g_frac):  # pragma: no cover - compiled
    N, F = rows.shape[0], table.shape[1]
    for n in prange(N):
        fx, fy, fz = frac[n, 0], frac[n, 1], frac[n, 2]
        r = rows[n]
        s0, s1, s2, s3 = _dot(table, r[0], grad, n, F), _dot(table, r[1], grad, n, F), \
            _dot(table, r[2], grad, n, F), _dot(table, r[3], grad, n, F)
        s4, s5, s6, s7 = _dot(table, r[4], grad, n, F), _dot(table, r[5], grad, n, F), \
            _dot(table, r[6], grad, n, F), _dot(table, r[7], grad, n, F)
        # s[c], c = 4 dz + 2 dy + dx; d/dfx = sum over (dz, dy) of (s[dz,dy,1] - s[dz,dy,0]) wz wy, etc.
        gz0, gz1, gy0, gy1, gx0, gx1 = 1.0 - fz, fz, 1.0 - fy, fy, 1.0 - fx, fx
        g_frac[n, 0] = ((s1 - s0) * gz0 * gy0 + (s3 - s2) * gz0 * gy1
                        + (s5 - s4) * gz1 * gy0 + (s7 - s6) * gz1 * gy1)
        g_frac[n, 1] = ((s2 - s0) * gz0 * gx0 + (s3 - s1) * gz0 * gx1
                        + (s6 - s4) * gz1 * gx0 + (s7 - s5) * gz1 * gx1)
        g_frac[n, 2] = ((s4 - s0) * gy0 * gx0 + (s5 - s1) * gy0 * gx1
                        + (s6 - s2) * gy1 * gx0 + (s7 - s3) * gy1 * gx1)


@njit(parallel=True, cache=True)
def hash_rows_kernel(base, n_levels, first_level, sides, dense, table_size, rows):  # pragma: no cover - compiled
    N = base.shape[0]
    mask = table_size - 1
    for n in prange(N):
        level = n % n_levels
        side = sides[level]
        offset = (first_level + level) * table_size
        bx, by, bz = base[n, 0], base[n, 1], base[n, 2]
        for c in range(8):  # corner order [z, y, x] in binary
            x, y, z = bx + (c & 1), by + ((c >> 1) & 1), bz + (c >> 2)
            if dense:
                r = x + side * (y + side * z)
            else:  # Instant-NGP's primes; int64 products keep the low bits of the uint32 ones
                r = (x ^ (y * 2654435761) ^ (z * 805459861)) & mask
            rows[n, c] = r + offset


@njit(parallel=True, cache=True, fastmath=_FAST)
def trilinear_forward_kernel(table, rows, frac, out):  # pragma: no cover - compiled
    N, F = rows.shape[0], table.shape[1]
    for n in prange(N):
        fx, fy, fz = frac[n, 0], frac[n, 1], frac[n, 2]
        for f in range(F):
            out[n, f] = 0.0
        for c in range(8):
            w = _corner_weight(c, fx, fy, fz)
            r = rows[n, c]
            for f in range(F):
                out[n, f] += w * table[r, f]
