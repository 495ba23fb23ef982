"""The FFT E-step and M-step sums of reconstruct/patch_em.py against brute-force loops over shifts."""

import math

import pytest
import torch

from cryoscape.reconstruct.patch_em import backprojection_sums, patch_posteriors, template_terms


def _place(template: torch.Tensor, sy: int, sx: int) -> torch.Tensor:
    """The patch seen when the template's top-left pixel sits at (sy, sx): crop of the placed template."""
    L = template.shape[-1]
    out = torch.zeros(L, L, dtype=template.dtype)
    for y in range(L):
        for x in range(L):
            ty, tx = y - sy, x - sx
            if 0 <= ty < L and 0 <= tx < L:
                out[y, x] = template[ty, tx]
    return out


def _brute_force(patches, templates, sigma2, rho0):
    n, L = patches.shape[0], patches.shape[-1]
    K = templates.shape[0]
    shifts = [(sy, sx) for sy in range(-(L - 1), L) for sx in range(-(L - 1), L)]
    log_prior = math.log((1 - rho0) / (K * len(shifts)))
    out_logw, out_ll = [], []
    for m in range(n):
        terms, where = [], []
        for k in range(K):
            for sy, sx in shifts:
                resid = patches[m] - _place(templates[k], sy, sx)
                terms.append(-resid.square().sum() / (2 * sigma2) + log_prior)
                where.append((k, sy % (2 * L), sx % (2 * L)))
        empty = -patches[m].square().sum() / (2 * sigma2) + math.log(rho0)
        allw = torch.stack(terms + [empty])
        lse = torch.logsumexp(allw, 0)
        post = torch.zeros(K, 2 * L, 2 * L, dtype=patches.dtype)
        for value, (k, iy, ix) in zip(terms, where):
            post[k, iy, ix] = torch.exp(value - lse)
        out_logw.append((post, torch.exp(empty - lse)))
        out_ll.append(lse - 0.5 * L * L * math.log(2 * math.pi * sigma2))
    return out_logw, torch.stack(out_ll)


@pytest.mark.parametrize("L", [3, 4])
def test_fft_estep_equals_brute_force_loop_over_shifts(L):
    g = torch.Generator().manual_seed(L)
    templates = torch.randn(L - 1, L, L, generator=g, dtype=torch.float64)  # an even and an odd number
    patches = torch.randn(3, L, L, generator=g, dtype=torch.float64)
    patches[0] += _place(templates[1], 1, -2 if L > 3 else -1)  # one patch holds a partial particle
    sigma2, rho0 = 0.7, 0.3
    t_ft, energy = template_terms(templates)
    fast = patch_posteriors(patches, t_ft, energy, sigma2=sigma2, rho0=rho0)
    slow, slow_ll = _brute_force(patches, templates, sigma2, rho0)
    for m, (post, p_empty) in enumerate(slow):
        torch.testing.assert_close(fast.posterior[m], post, rtol=1e-9, atol=1e-12)
        assert float(fast.p_empty[m]) == pytest.approx(float(p_empty), rel=1e-9)
    torch.testing.assert_close(fast.log_likelihood, slow_ll, rtol=1e-10, atol=1e-10)
    total = fast.posterior.sum((1, 2, 3)) + fast.p_empty
    torch.testing.assert_close(total, torch.ones(3, dtype=torch.float64))


def test_expected_residual_and_backprojection_sums_match_loops():
    L, K = 4, 2
    g = torch.Generator().manual_seed(7)
    templates = torch.randn(K, L, L, generator=g, dtype=torch.float64)
    patches = torch.randn(2, L, L, generator=g, dtype=torch.float64)
    t_ft, energy = template_terms(templates)
    res = patch_posteriors(patches, t_ft, energy, sigma2=2.0, rho0=0.2)
    b, wbar = backprojection_sums(patches, res.posterior, min_mass=0.0)
    exp_b = torch.zeros(K, L, L, dtype=torch.float64)
    exp_w = torch.zeros(K, dtype=torch.float64)
    exp_resid = torch.zeros(2, dtype=torch.float64)
    for m in range(2):
        exp_resid[m] += res.p_empty[m] * patches[m].square().sum()
        for k in range(K):
            for sy in range(-(L - 1), L):
                for sx in range(-(L - 1), L):
                    p = res.posterior[m, k, sy % (2 * L), sx % (2 * L)]
                    model = _place(templates[k], sy, sx)
                    exp_resid[m] += p * (patches[m] - model).square().sum()
                    # data back in template coordinates: b(v) += p * I(v + s) where visible
                    for vy in range(L):
                        for vx in range(L):
                            y, x = vy + sy, vx + sx
                            if 0 <= y < L and 0 <= x < L:
                                exp_b[k, vy, vx] += p * patches[m, y, x]
                    exp_w[k] += p * (L - abs(sy)) * (L - abs(sx)) / L**2
    torch.testing.assert_close(res.expected_residual, exp_resid, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, exp_b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(wbar, exp_w, rtol=1e-9, atol=1e-12)


def test_local_estep_over_per_patch_rotation_lists_matches_the_full_one():
    """The coarse-to-fine E-step's local search: each patch scored over its own rotation pairs only."""
    from cryoscape.reconstruct.patch_em import PatchEStep, backprojection_sums_ft, unpack_posterior, unpack_sums

    L, K = 4, 6
    g = torch.Generator().manual_seed(11)
    templates = torch.randn(K, L, L, generator=g, dtype=torch.float64)
    patches = torch.randn(3, L, L, generator=g, dtype=torch.float64)
    pairs = torch.tensor([[0, 2], [2, 1], [1, 0]])  # pair j holds rotations 2j, 2j + 1
    rotations = torch.stack([pairs * 2, pairs * 2 + 1], -1).reshape(3, -1)
    t_ft, energy = template_terms(templates)
    full = patch_posteriors(patches, t_ft, energy, sigma2=1.5, rho0=0.3)
    local = PatchEStep(t_ft, energy, sigma2=1.5, rho0=0.3)(patches, pairs)
    post = unpack_posterior(local.posterior, 4)
    for m in range(3):  # same odds against "empty" for the rotations kept
        torch.testing.assert_close(post[m] / local.p_empty[m], full.posterior[m, rotations[m]] / full.p_empty[m])
    dense = torch.zeros_like(full.posterior)
    for m in range(3):
        dense[m, rotations[m]] = post[m]
    b_ft, wbar = backprojection_sums_ft(patches, local.posterior, n_rotations=K, pair_index=pairs)
    b_dense, w_dense = backprojection_sums(patches, dense, min_mass=0.0)
    torch.testing.assert_close(unpack_sums(b_ft, K, L), b_dense)
    torch.testing.assert_close(wbar, w_dense)


def test_backprojection_sums_skip_only_pairs_without_mass():
    L, K = 4, 6
    g = torch.Generator().manual_seed(3)
    patches = torch.randn(3, L, L, generator=g, dtype=torch.float64)
    posterior = torch.rand(3, K, 2 * L, 2 * L, generator=g, dtype=torch.float64)
    posterior[:, 1:] *= 1e-9  # most pairs below min_mass: the pruned path
    pruned, w = backprojection_sums(patches, posterior, min_mass=1e-3)
    kept = posterior.clone()
    kept[:, 1:] = 0
    dense, w_dense = backprojection_sums(patches, kept, min_mass=0.0)
    torch.testing.assert_close(pruned, dense)
    torch.testing.assert_close(w, backprojection_sums(patches, posterior, min_mass=0.0)[1])
