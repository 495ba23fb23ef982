"""The hash-grid encoding: exact at lattice corners, continuous across cells, dense and hashed levels."""

from __future__ import annotations

import pytest
import torch

from cryoscape.models import sparse_kernels
from cryoscape.models.hash_grid import HashGrid, _CompiledGrid, _Trilinear, corner_rows, level_resolutions


def _grid(**kw) -> HashGrid:
    torch.manual_seed(0)
    g = HashGrid(**kw)
    with torch.no_grad():
        g.tables.uniform_(-1, 1)  # large entries, so interpolation errors would show
    return g


def test_level_resolutions_are_geometric_from_base_to_max():
    res = level_resolutions(16, 16, 512)
    assert res[0] == 16 and res[-1] == 512 and res == sorted(res)
    assert level_resolutions(1, 8, 8) == [8]


def test_values_at_lattice_corners_are_the_table_rows_exactly():
    """At a corner of level l's lattice, level l's feature equals that corner's row (dense and hashed levels)."""
    for log2_t, res in ((15, 12), (6, 12)):  # 13^3 corners fit 2^15 rows (dense); 2^6 rows force hashing
        g = _grid(n_levels=1, features_per_level=3, log2_table_size=log2_t, base_resolution=res, max_resolution=res)
        corners = torch.tensor([[0, 0, 0], [12, 12, 12], [3, 7, 11], [11, 0, 5], [5, 5, 12]])
        out = g(corners.float() / res)
        rows = corner_rows(corners, res, g.table_size)
        torch.testing.assert_close(out, g.tables[0][rows], rtol=0, atol=1e-6)


def test_hashed_rows_differ_from_dense_rows_only_when_the_table_is_too_small():
    corners = torch.randint(0, 9, (100, 3))
    dense = corner_rows(corners, 8, 1 << 10)  # 9^3 = 729 <= 1024
    assert (dense == corners[:, 0] + 9 * (corners[:, 1] + 9 * corners[:, 2])).all()
    hashed = corner_rows(corners, 8, 1 << 6)
    assert hashed.min() >= 0 and hashed.max() < 64


def test_interpolation_is_continuous_across_cell_faces_and_linear_along_an_edge():
    g = _grid(n_levels=4, features_per_level=2, log2_table_size=8, base_resolution=4, max_resolution=32)
    torch.manual_seed(1)
    u = torch.rand(500, 3) * 0.98 + 0.01
    eps = 1e-5
    for axis in range(3):
        step = torch.zeros(3)
        step[axis] = eps
        jump = (g(u + step) - g(u - step)).abs().max()
        # features are Lipschitz with a constant ~ 2 * max|row| * max resolution: no jumps at faces
        assert jump < 2 * 2 * 32 * 2 * eps + 1e-6, float(jump)
    # along a lattice edge of one level the feature is the linear blend of the two corner rows
    g1 = _grid(n_levels=1, features_per_level=2, log2_table_size=15, base_resolution=8, max_resolution=8)
    t = torch.linspace(0, 1, 11)
    pts = torch.stack([(2 + t) / 8, torch.full_like(t, 3 / 8), torch.full_like(t, 5 / 8)], -1)
    a, b = g1(pts[:1]), g1(pts[-1:])
    torch.testing.assert_close(g1(pts), a + t[:, None] * (b - a), rtol=0, atol=1e-6)


def test_gradients_reach_the_rows_of_the_cell_and_the_points():
    g = _grid(n_levels=2, features_per_level=2, log2_table_size=10, base_resolution=4, max_resolution=8)
    u = torch.tensor([[0.3, 0.6, 0.2]], requires_grad=True)
    g(u).sum().backward()
    touched = (g.tables.grad.abs().sum(-1) > 0).sum(-1)
    assert touched.tolist() == [8, 8] and u.grad.abs().sum() > 0


def _features_and_gradients(g: HashGrid, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    g.zero_grad()
    u = u.clone().requires_grad_(True)
    out = g(u)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    return out.detach(), g.tables.grad.clone(), u.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_cpu_kernels_equal_the_pytorch_path(monkeypatch, dtype):
    """Features, and the tables' and positions' gradients: numba loops == PyTorch (dense and hashed levels)."""
    if not sparse_kernels.usable(torch.zeros(1)):
        pytest.skip("numba kernels unavailable")
    g = _grid(n_levels=6, features_per_level=2, log2_table_size=10, base_resolution=4, max_resolution=40).to(dtype)
    assert g._groups[0][1] > 0 and g._groups[1][1] > g._groups[1][0]  # both kinds of level present
    torch.manual_seed(2)
    u = torch.rand(3000, 3, dtype=dtype)
    compiled = _features_and_gradients(g, u)
    monkeypatch.setenv("CRYOSCAPE_SPARSE_KERNELS", "0")
    reference = _features_and_gradients(g, u)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(compiled, reference):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_a_nan_position_gives_nan_features_and_leaves_the_others_alone():
    """A diverged run's NaN point must not index outside the table (the compiled loops clamp the cell)."""
    if not sparse_kernels.usable(torch.zeros(1)):
        pytest.skip("numba kernels unavailable")
    g = _grid(n_levels=4, features_per_level=2, log2_table_size=8, base_resolution=4, max_resolution=32)
    u = torch.rand(50, 3)
    clean = g(u)
    u[7] = float("nan")
    out = g(u)
    assert torch.isnan(out[7]).all()
    keep = torch.arange(50) != 7
    torch.testing.assert_close(out[keep], clean[keep], rtol=0, atol=0)


def test_written_out_gradients_match_finite_differences():
    """The hand-written backwards pass gradcheck (float64): the PyTorch path's trilinear gather and, where
    numba runs, the compiled grid (tables' and positions' gradients, dense and hashed levels)."""
    torch.manual_seed(3)
    table = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)
    rows = torch.randint(0, 20, (12, 8)) + 20 * (torch.arange(12) % 2)[:, None]  # 2 levels, own blocks
    frac = (torch.rand(12, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, f: _Trilinear.apply(t, rows, f, 2), (table, frac))
    if not (sparse_kernels.usable(table) and sparse_kernels.hash_grid_compiles(torch.float64)):
        pytest.skip("numba kernels unavailable")
    g = _grid(n_levels=3, features_per_level=2, log2_table_size=6, base_resolution=2, max_resolution=8).double()
    assert [(r + 1) ** 3 <= g.table_size for r in g.resolutions] == [True, False, False]
    tables = g.tables.detach().clone().requires_grad_(True)
    u = (torch.rand(20, 3, dtype=torch.float64) * 0.98 + 0.01).requires_grad_(True)
    levels = sparse_kernels.grid_levels(g.resolutions, g.table_size, torch.float64)
    assert torch.autograd.gradcheck(lambda t, p: _CompiledGrid.apply(t, p, levels), (tables, u))
