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
def _cell_rows(ux, uy, uz, res, res_minus_one, side, dense, offset, mask):  # pragma: no cover - compiled
    """The 8 table rows (``[z, y, x]`` corner order) and the fractions of the cell holding ``u`` in a level
    of ``res`` cells per side whose block starts at ``offset``: the arithmetic of HashGrid's PyTorch path
    (positions in ``u``'s precision; dense rows, or Instant-NGP's hash, whose int64 products keep the low
    bits of the uint32 ones).  Written out corner by corner: a loop over the corners ran 3x slower."""
    px, py, pz = ux * res, uy * res, uz * res
    fbx, fby, fbz = min(np.floor(px), res_minus_one), min(np.floor(py), res_minus_one), min(np.floor(pz), res_minus_one)
    bx, by, bz = np.int64(fbx), np.int64(fby), np.int64(fbz)
    if dense:
        r0 = offset + bx + side * (by + side * bz)
        r2, r4 = r0 + side, r0 + side * side
        r6 = r4 + side
        r1, r3, r5, r7 = r0 + 1, r2 + 1, r4 + 1, r6 + 1
    else:
        y0, y1 = by * 2654435761, (by + 1) * 2654435761
        z0, z1 = bz * 805459861, (bz + 1) * 805459861
        x0, x1 = bx, bx + 1
        r0, r1 = offset + ((x0 ^ y0 ^ z0) & mask), offset + ((x1 ^ y0 ^ z0) & mask)
        r2, r3 = offset + ((x0 ^ y1 ^ z0) & mask), offset + ((x1 ^ y1 ^ z0) & mask)
        r4, r5 = offset + ((x0 ^ y0 ^ z1) & mask), offset + ((x1 ^ y0 ^ z1) & mask)
        r6, r7 = offset + ((x0 ^ y1 ^ z1) & mask), offset + ((x1 ^ y1 ^ z1) & mask)
    return r0, r1, r2, r3, r4, r5, r6, r7, px - fbx, py - fby, pz - fbz


@njit(parallel=True, cache=True, fastmath=_FAST)
def hash_grid_forward_kernel(table, u, res, res_minus_one, sides, dense, table_size, out):  # pragma: no cover
    M, L, F = u.shape[0], res.shape[0], table.shape[1]
    mask = table_size - 1
    for m in prange(M):
        ux, uy, uz = u[m, 0], u[m, 1], u[m, 2]
        for level in range(L):
            r0, r1, r2, r3, r4, r5, r6, r7, fx, fy, fz = _cell_rows(
                ux, uy, uz, res[level], res_minus_one[level], sides[level], dense[level], level * table_size, mask)
            gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
            w00, w01, w10, w11 = gz * gy, gz * fy, fz * gy, fz * fy
            o = level * F
            for f in range(F):
                out[m, o + f] = (w00 * (gx * table[r0, f] + fx * table[r1, f])
                                 + w01 * (gx * table[r2, f] + fx * table[r3, f])
                                 + w10 * (gx * table[r4, f] + fx * table[r5, f])
                                 + w11 * (gx * table[r6, f] + fx * table[r7, f]))


@njit(parallel=True, cache=True, fastmath=_FAST)
def hash_grid_table_gradient_kernel(u, grad, res, res_minus_one, sides, dense, table_size, level_bounds,
                                    g_table):  # pragma: no cover - compiled
    M, F = u.shape[0], g_table.shape[1]
    mask = table_size - 1
    for t in prange(level_bounds.shape[0] - 1):  # a level's rows are its own block: no shared writes
        for m in range(M):
            ux, uy, uz = u[m, 0], u[m, 1], u[m, 2]
            for level in range(level_bounds[t], level_bounds[t + 1]):
                r0, r1, r2, r3, r4, r5, r6, r7, fx, fy, fz = _cell_rows(
                    ux, uy, uz, res[level], res_minus_one[level], sides[level], dense[level], level * table_size, mask)
                gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
                w00, w01, w10, w11 = gz * gy, gz * fy, fz * gy, fz * fy
                o = level * F
                for f in range(F):
                    g = grad[m, o + f]
                    a, b = gx * g, fx * g
                    g_table[r0, f] += w00 * a
                    g_table[r1, f] += w00 * b
                    g_table[r2, f] += w01 * a
                    g_table[r3, f] += w01 * b
                    g_table[r4, f] += w10 * a
                    g_table[r5, f] += w10 * b
                    g_table[r6, f] += w11 * a
                    g_table[r7, f] += w11 * b


@njit(inline="always", fastmath=_FAST)
def _dot(table, r, grad, m, o, F):  # pragma: no cover - compiled
    acc = 0.0
    for f in range(F):
        acc += table[r, f] * grad[m, o + f]
    return acc


@njit(parallel=True, cache=True, fastmath=_FAST)
def hash_grid_position_gradient_kernel(table, u, grad, res, res_minus_one, sides, dense, table_size,
                                       g_u):  # pragma: no cover - compiled
    M, L, F = u.shape[0], res.shape[0], table.shape[1]
    mask = table_size - 1
    for m in prange(M):
        ux, uy, uz = u[m, 0], u[m, 1], u[m, 2]
        gux = guy = guz = 0.0
        for level in range(L):
            r0, r1, r2, r3, r4, r5, r6, r7, fx, fy, fz = _cell_rows(
                ux, uy, uz, res[level], res_minus_one[level], sides[level], dense[level], level * table_size, mask)
            o = level * F
            s0, s1, s2, s3 = _dot(table, r0, grad, m, o, F), _dot(table, r1, grad, m, o, F), \
                _dot(table, r2, grad, m, o, F), _dot(table, r3, grad, m, o, F)
            s4, s5, s6, s7 = _dot(table, r4, grad, m, o, F), _dot(table, r5, grad, m, o, F), \
                _dot(table, r6, grad, m, o, F), _dot(table, r7, grad, m, o, F)
            # s[c], c = 4 dz + 2 dy + dx; d/dfx = sum over (dz, dy) of (s[dz,dy,1] - s[dz,dy,0]) wz wy, etc.;
            # d frac / d u = res (the cell's corner is held fixed)
            gz0, gz1, gy0, gy1, gx0, gx1 = 1.0 - fz, fz, 1.0 - fy, fy, 1.0 - fx, fx
            r = res[level]
            gux += r * ((s1 - s0) * gz0 * gy0 + (s3 - s2) * gz0 * gy1 + (s5 - s4) * gz1 * gy0 + (s7 - s6) * gz1 * gy1)
            guy += r * ((s2 - s0) * gz0 * gx0 + (s3 - s1) * gz0 * gx1 + (s6 - s4) * gz1 * gx0 + (s7 - s5) * gz1 * gx1)
            guz += r * ((s4 - s0) * gy0 * gx0 + (s5 - s1) * gy0 * gx1 + (s6 - s2) * gy1 * gx0 + (s7 - s3) * gy1 * gx1)
        g_u[m, 0], g_u[m, 1], g_u[m, 2] = gux, guy, guz
