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
