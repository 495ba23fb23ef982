"""The compiled CPU kernels of the sparse slice (models/sparse_kernels.py) against the PyTorch
path at a realistic size: corners, the tables' gradients (any number of row ranges) and the
backprojection, in float32 and float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoscape.models import sparse_kernels
from cryoscape.models.sparse_slice import (
    HermitianLattice,
    SparseSliceFunction,
    backproject_to_lattice,
    corner_codes_and_weights,
)

pytestmark = pytest.mark.skipif(not sparse_kernels.usable(torch.zeros(1)), reason="numba is not installed")


def _slices(D: int, B: int, gen: torch.Generator, dtype) -> torch.Tensor:
    """Central slices (index units) of the half-plane under random rotations, plus points
    outside the ball and the cube, on integer coordinates, and one non-finite point per image."""
    c = torch.arange(D, dtype=torch.float64) - D // 2
    ky, kx = torch.meshgrid(c, c, indexing="ij")
    k2 = torch.stack([kx, ky], -1).reshape(-1, 2)
    k2 = k2[(k2.norm(dim=-1) < D / 2) & ((k2[:, 0] > 0) | ((k2[:, 0] == 0) & (k2[:, 1] >= 0)))]
    q = torch.linalg.qr(torch.randn(B, 3, 3, generator=gen, dtype=torch.float64)).Q
    pts = k2 @ q[:, :2, :]
    far = (torch.rand(B, 40, 3, generator=gen, dtype=torch.float64) - 0.5) * 3 * D
    grid = torch.randint(-D // 2, D // 2, (B, 20, 3), generator=gen).double()
    odd = torch.full((B, 1, 3), float("nan"), dtype=torch.float64)
    return torch.cat([pts, far, grid, odd], 1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_corners_equal_the_pytorch_path(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    lat = HermitianLattice(16 + math.sqrt(3))
    pts = _slices(32, 4, gen, dtype)
    finite = torch.isfinite(pts).all(-1)
    got = sparse_kernels.corners(pts, *lat.lookups(), lat.L, lat.S)
    monkeypatch.setenv("CRYOSCAPE_SPARSE_KERNELS", "0")
    ref = corner_codes_and_weights(lat, pts[:, :-1])
    assert torch.equal(got[0][:, :-1], ref[0]) and torch.equal(got[1][:, :-1], ref[1])
    torch.testing.assert_close(got[2][:, :-1], ref[2], rtol=0, atol=4 * torch.finfo(dtype).eps)
    # a non-finite point reads nothing (weight 0), whatever the PyTorch path would do with it
    assert not finite[:, -1].any() and (got[2][:, -1] == 0).all()


@pytest.mark.parametrize("dtype,K,parts", [(torch.float32, 16, None), (torch.float64, 3, 1), (torch.float64, 3, 5),
                                           (torch.float32, 0, 3)])
def test_table_gradients_equal_the_pytorch_transpose(dtype, K, parts, monkeypatch):
    """Dense gradients of V_0 and the basis from the kernel (rows split into ``parts`` ranges, or
    one per thread) against the sort-and-embedding_bag transpose."""
    gen = torch.Generator().manual_seed(K + 2)
    lat = HermitianLattice(24.0)
    B = 6
    pts = _slices(48, B, gen, dtype)[:, :-1]
    index, sign, w = corner_codes_and_weights(lat, pts)
    tables = [torch.randn(lat.n_vox, 1, generator=gen, dtype=dtype) for _ in range(2)]
    tables += [torch.randn(lat.n_vox, K, generator=gen, dtype=dtype) if K else None for _ in range(2)]
    s = torch.randn(B, K, generator=gen, dtype=dtype) if K else None
    g = torch.randn(B, pts.shape[1], 2, generator=gen, dtype=dtype)
    got = sparse_kernels.table_gradients(tables[0], tables[2], s, index, w, sign, g[..., 0].contiguous(),
                                         g[..., 1].contiguous(), n_parts=parts)
    monkeypatch.setenv("CRYOSCAPE_SPARSE_KERNELS", "0")
    leaves = [None if t is None else t.clone().requires_grad_() for t in tables]
    out = SparseSliceFunction.apply(*leaves, s, index, w, sign, False, 2**24)
    out.backward(g)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, ref in zip(got, leaves):
        if ref is None:
            assert a is None
        else:
            torch.testing.assert_close(a, ref.grad, rtol=tol, atol=tol)
    # the origin's imaginary part gets nothing; untouched voxels get exact zeros
    origin = int(torch.nonzero((lat.coords == 0).all(-1))[0, 0])
    assert got[1][origin, 0] == 0
    touched = torch.zeros(lat.n_vox, dtype=torch.bool)
    touched[index[w != 0].long()] = True
    assert (got[0][~touched] == 0).all() and bool(touched.any()) and not bool(touched.all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backprojection_equals_the_pytorch_path(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(9)
    lat = HermitianLattice(20.0)
    pts = _slices(40, 5, gen, dtype)[:, :-1]
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    values = torch.randn(pts.shape[:2], generator=gen, dtype=cdtype)
    weights = torch.rand(pts.shape[:2], generator=gen, dtype=dtype)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("CRYOSCAPE_SPARSE_KERNELS", flag)
        num = torch.zeros(lat.n_vox, dtype=cdtype)
        wsum = torch.full((lat.n_vox,), 0.5, dtype=dtype)  # it adds to what is there
        backproject_to_lattice(lat, pts, values, weights, numerator=num, weight_sum=wsum)
        results.append((num, wsum))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(results[0][0], results[1][0], rtol=tol, atol=tol)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=tol, atol=tol)
    assert float(results[0][1].min()) == 0.5 and float(results[0][1].max()) > 1.0


def test_row_ranges_split_the_corners_evenly():
    gen = torch.Generator().manual_seed(4)
    lat = HermitianLattice(32.0)
    index, _, _ = corner_codes_and_weights(lat, _slices(64, 8, gen, torch.float32)[:, :-1])
    for parts in (1, 2, 3, 7):
        bounds = sparse_kernels._row_bounds(index, lat.n_vox, parts)
        assert bounds[0] == 0 and bounds[-1] == lat.n_vox and (np.diff(bounds) >= 0).all()
        counts = np.histogram(index.reshape(-1).numpy(), bins=bounds)[0]
        assert counts.max() < 1.25 * index.numel() / parts


def test_usable_only_for_cpu_tensors_of_one_float_precision(monkeypatch):
    f32, f64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    assert sparse_kernels.usable(f32, None, torch.zeros(2, dtype=torch.int32))
    assert not sparse_kernels.usable(f32, f64)
    assert not sparse_kernels.usable(f32.bfloat16())
    assert not sparse_kernels.usable(torch.zeros(2, device="meta"))
    monkeypatch.setenv("CRYOSCAPE_SPARSE_KERNELS", "0")
    assert not sparse_kernels.usable(f32)


def test_a_numba_failure_falls_back_to_the_pytorch_path_with_one_warning(monkeypatch, caplog):
    import numba

    monkeypatch.setattr(sparse_kernels, "_failure", None)

    def broken(*args):
        raise numba.core.errors.TypingError("cannot compile here")

    from cryoscape.models import _sparse_numba

    monkeypatch.setattr(_sparse_numba, "corners_kernel", broken)
    gen = torch.Generator().manual_seed(2)
    lat = HermitianLattice(8.0)
    pts = _slices(16, 2, gen, torch.float32)[:, :-1]
    with caplog.at_level("WARNING", logger="cryoscape.models.sparse_kernels"):
        got = corner_codes_and_weights(lat, pts)
        again = corner_codes_and_weights(lat, pts)
    assert "TypingError: cannot compile here" in caplog.text and caplog.text.count("PyTorch path") == 1
    assert not sparse_kernels.usable(torch.zeros(1))
    monkeypatch.setattr(sparse_kernels, "_failure", None)
    monkeypatch.setenv("CRYOSCAPE_SPARSE_KERNELS", "0")
    ref = corner_codes_and_weights(lat, pts)
    for a, b, r in zip(got, again, ref):
        assert torch.equal(a, r) and torch.equal(b, r)
