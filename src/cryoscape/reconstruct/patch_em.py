"""Kernels of the approximate EM over micrograph patches (seed 004): E-step and M-step sums.

The patch model
---------------
A micrograph is cut into non-overlapping ``L x L`` patches.  Patch ``m`` holds at most one
(possibly partial) projection: ``I_m = crop_L( place_s( t_k ) ) + noise``, where ``t_k`` is the
``L x L`` CTF-corrupted projection of the volume at rotation ``k`` (its array origin at index
``L // 2``, fourier/fft.py), ``place_s`` puts the template's top-left pixel at patch pixel
``s = (sy, sx)``, ``-(L-1) <= sy, sx <= L-1``, and ``crop_L`` keeps the patch's pixels.  With
probability ``rho0`` the patch is empty; otherwise every ``(k, s)`` is equally likely, i.e.
``(1 - rho0) / (K (2L-1)^2)``.  Noise is white Gaussian of variance ``sigma^2``.

On the ``2L x 2L`` grid of the seed, shift ``s`` sits at ``s mod 2L``; the index ``L`` along either
axis puts the template wholly outside the patch (an empty patch), so those cells carry no
probability here and emptiness is the separate state of probability ``rho0``.

E-step by FFT
-------------
``||I - crop(place_s t)||^2 = ||I||^2 - 2 c_k(s) + e_k(s)`` with the cross term
``c_k(s) = sum_u I(u) t_k(u - s)`` and the visible energy ``e_k(s) = sum_{u in patch} t_k(u - s)^2``.
With the patch and the template zero-padded to ``2L`` (top-left), ``c_k = IFFT(FFT(I) conj FFT(t_k))``
on the ``2L`` grid for every shift at once (no wrap-around reaches a valid shift), and ``e_k`` is the
same correlation between the patch's indicator and ``t_k^2``.  Log posteriors

    log w(k, s) = (c_k(s) - e_k(s) / 2) / sigma^2 + log((1 - rho0) / (K (2L-1)^2)),
    log w(empty) = log rho0,

are normalised with logsumexp (log domain throughout), and the patch log-likelihood is
``logsumexp(log w) - ||I||^2 / (2 sigma^2) - L^2 / 2 log(2 pi sigma^2)``.

M-step sums
-----------
For rotation ``k`` the weighted least squares needs ``b_k(v) = sum_m sum_s p_m(k, s) I_m(v + s)``
(the data brought back into template coordinates, zero where not visible): one more correlation,
``IFFT(FFT(I) conj FFT(p))``, summed over patches in Fourier space before the inverse transform.
Its Gram operator is a visibility-weighted projector, ``sum p(k, s) diag(vis_s)``; the solver
(reconstruct/micrograph_em.py) replaces ``vis_s`` by its mean, the visible fraction
``a(s) = (L - |sy|)(L - |sx|) / L^2``, which makes the normal equations diagonal on the Fourier grid.
Over the (up to four) patches that cut one particle the visible pieces add up to the whole
template and their fractions to one, so the approximation is exact in that sum whenever
neighbouring patches agree on the particle's pose.

Kernels take device and dtype from their inputs; all tensors are ``[..., y, x]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "padded_rfft",
    "valid_shift_mask",
    "visible_fraction",
    "template_terms",
    "EStepResult",
    "patch_posteriors",
    "shift_grid_pixel",
]


def padded_rfft(x: torch.Tensor) -> torch.Tensor:
    """``rfft2`` of ``(..., L, L)`` arrays zero-padded to ``2L`` at the bottom/right."""
    L = x.shape[-1]
    return torch.fft.rfft2(x, s=(2 * L, 2 * L))


def shift_grid_pixel(L: int, *, device=None) -> torch.Tensor:
    """``(2L, 2L, 2)`` shift ``(sy, sx)`` of each cell of the ``2L`` grid (index ``i`` is ``i`` or ``i - 2L``)."""
    i = torch.arange(2 * L, device=device)
    s = torch.where(i < L, i, i - 2 * L)
    return torch.stack(torch.meshgrid(s, s, indexing="ij"), dim=-1)


def valid_shift_mask(L: int, *, device=None) -> torch.Tensor:
    """``(2L, 2L)`` True on the ``(2L-1)^2`` shifts that show part of the template."""
    i = torch.arange(2 * L, device=device)
    ok = i != L
    return ok[:, None] & ok[None, :]


def visible_fraction(L: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(2L, 2L)`` fraction of the template inside the patch at each shift (0 at invalid cells)."""
    s = shift_grid_pixel(L, device=device).abs().to(dtype)
    frac = ((L - s[..., 0]) * (L - s[..., 1])).clamp(min=0) / (L * L)
    return frac * valid_shift_mask(L, device=device)


def template_terms(templates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FFT of ``(K, L, L)`` templates on the ``2L`` grid and their visible energy ``e_k(s)`` ``(K, 2L, 2L)``.

    The energy is computed in float64 and clamped at zero: FFT round-off leaves values of order
    ``1e-7 * ||t||^2`` where the visible part of the template is blank, and a negative energy would
    read as a better-than-perfect fit once divided by a small ``sigma^2``.
    """
    L = templates.shape[-1]
    t_ft = padded_rfft(templates)
    t64 = templates.double()
    box_ft = padded_rfft(torch.ones(L, L, dtype=torch.float64, device=templates.device))
    energy = torch.fft.irfft2(box_ft * padded_rfft(t64 * t64).conj(), s=(2 * L, 2 * L)).clamp_(min=0)
    return t_ft, energy.to(templates.dtype)


@dataclass
class EStepResult:
    """Posteriors of a batch of patches and the sums the M-step needs.

    Attributes
    ----------
    posterior
        ``(n, K, 2L, 2L)`` ``p(k, s | I_m)`` (zero on invalid shifts).
    p_empty
        ``(n,)`` posterior probability that the patch is empty.
    log_likelihood
        ``(n,)`` ``log p(I_m)`` under the current model.
    expected_residual
        ``(n,)`` ``E ||I_m - model||^2`` under the posterior (for the noise update).
    """

    posterior: torch.Tensor
    p_empty: torch.Tensor
    log_likelihood: torch.Tensor
    expected_residual: torch.Tensor


def patch_posteriors(
    patches: torch.Tensor,
    template_ft: torch.Tensor,
    energy: torch.Tensor,
    *,
    sigma2: float,
    rho0: float,
) -> EStepResult:
    """E-step for ``(n, L, L)`` patches against ``K`` templates (see the module docstring).

    ``template_ft`` and ``energy`` come from :func:`template_terms`.  Memory traffic dominates,
    so the ``(n, K, 2L, 2L)`` array is written by the inverse FFT and then updated in place; the
    expected residual uses ``c - e/2 = sigma^2 (log w - log prior)`` instead of keeping ``c``.
    """
    n, L = patches.shape[0], patches.shape[-1]
    K = template_ft.shape[0]
    log_prior = math.log((1.0 - rho0) / (K * (2 * L - 1) ** 2))
    # offset = e / (2 sigma^2) - log prior, and a huge value on invalid shifts (exp -> 0, p log w -> 0)
    offset = (energy * (0.5 / sigma2) - log_prior).masked_fill(~valid_shift_mask(L, device=patches.device), 1e30)
    logw = torch.fft.irfft2(padded_rfft(patches)[:, None] * template_ft.conj()[None], s=(2 * L, 2 * L))
    logw.mul_(1.0 / sigma2).sub_(offset)
    log_empty = math.log(rho0)
    top = logw.reshape(n, -1).amax(1).clamp(min=log_empty)
    logw.sub_(top[:, None, None, None])
    posterior = torch.exp(logw)
    z = posterior.reshape(n, -1).sum(1) + torch.exp(log_empty - top)
    posterior.div_(z[:, None, None, None])
    lse = top + torch.log(z)
    p_empty = torch.exp(log_empty - lse)
    # sum p (log w - log prior) with log w shifted by top: add back (1 - p_empty)(top - log prior)
    p_logw = torch.bmm(posterior.reshape(n, 1, -1), logw.reshape(n, -1, 1)).reshape(n)
    p_logw = p_logw + (1 - p_empty) * (top - log_prior)
    norm2 = patches.reshape(n, -1).square().sum(1)
    log_likelihood = lse - norm2 / (2 * sigma2) - 0.5 * L * L * math.log(2 * math.pi * sigma2)
    return EStepResult(posterior, p_empty, log_likelihood, norm2 - 2 * sigma2 * p_logw)


def backprojection_sums(
    patches: torch.Tensor, posterior: torch.Tensor, *, min_mass: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-step sums of a batch of patches: ``b_k`` ``(K, L, L)`` and ``wbar_k`` ``(K,)``.

    ``b_k(v) = sum_m sum_s p_m(k, s) I_m(v + s)`` (template coordinates) and
    ``wbar_k = sum_m sum_s p_m(k, s) a(s)`` with ``a`` the visible fraction.  Rotations whose
    posterior mass over the batch is below ``min_mass`` are skipped (their sums are zero),
    which saves most of the work once the posteriors are peaked.
    """
    n, K, L = posterior.shape[0], posterior.shape[1], patches.shape[-1]
    wbar = (posterior * visible_fraction(L, device=posterior.device, dtype=posterior.dtype)).sum((0, 2, 3))
    mass = posterior.sum((0, 2, 3))
    keep = torch.nonzero(mass > min_mass).reshape(-1)
    b = patches.new_zeros(K, L, L)
    if len(keep):
        p_ft = torch.fft.rfft2(posterior[:, keep]).conj_physical_()
        i_ft = padded_rfft(patches)
        b_ft = p_ft[0].mul_(i_ft[0])  # a sum of products per patch (complex einsum is ~10x slower on CPU)
        for m in range(1, n):
            b_ft.addcmul_(p_ft[m], i_ft[m])
        b[keep] = torch.fft.irfft2(b_ft, s=(2 * L, 2 * L))[:, :L, :L]
    return b, wbar


__all__.append("backprojection_sums")
