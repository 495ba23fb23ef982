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
        ``(n, K, 2L, 2L)`` ``p(k, s | I_m)`` (below ``e^-60`` on invalid shifts and far-off poses).
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

    ``template_ft`` and ``energy`` come from :func:`template_terms`.  A one-off call of
    :class:`PatchEStep` (which keeps its buffers between batches); the posterior is a fresh tensor.
    """
    res = PatchEStep(template_ft, energy, sigma2=sigma2, rho0=rho0)(patches)
    res.posterior = res.posterior.clone()
    return res


LOG_FLOOR = 60.0


class PatchEStep:
    """The E-step of one micrograph's templates, applied batch after batch with reused buffers.

    Memory traffic dominates this kernel: the ``(n, K, 2L, 2L)`` arrays are written once by the
    inverse FFT and then updated in place, and they are allocated once per micrograph rather than
    once per batch (fresh multi-megabyte arrays cost a page fault per 4 KiB on first touch, which
    tripled the time per (patch, rotation)).  The expected residual uses
    ``c - e/2 = sigma^2 (log w - log prior)`` instead of keeping ``c``.  The posterior returned by
    :meth:`__call__` is a view of a buffer, valid until the next call.
    """

    def __init__(self, template_ft: torch.Tensor, energy: torch.Tensor, *, sigma2: float, rho0: float):
        K, L = template_ft.shape[0], energy.shape[-1] // 2
        self.K, self.L, self.sigma2 = K, L, float(sigma2)
        self.log_prior = math.log((1.0 - rho0) / (K * (2 * L - 1) ** 2))
        self.log_empty = math.log(rho0)
        self.conj_ft = template_ft.conj().resolve_conj()
        # e / (2 sigma^2) - log prior, and a huge value on invalid shifts (exp -> 0, p log w -> 0)
        valid = valid_shift_mask(L, device=energy.device)
        self.offset = (energy * (0.5 / sigma2) - self.log_prior).masked_fill_(~valid, 1e30)
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _views(self, n: int, J: int):
        if self._buffers is None or self._buffers[1].numel() < n * J * 4 * self.L**2:
            L, dev, dt = self.L, self.offset.device, self.offset.dtype
            self._buffers = (torch.empty(n * J * 2 * L * (L + 1), dtype=self.conj_ft.dtype, device=dev),
                             torch.empty(n * J * 4 * L * L, dtype=dt, device=dev),
                             torch.empty(n * J * 4 * L * L, dtype=dt, device=dev))
        L = self.L
        shapes = ((n, J, 2 * L, L + 1), (n, J, 2 * L, 2 * L), (n, J, 2 * L, 2 * L))
        return tuple(b[: math.prod(shape)].view(shape) for b, shape in zip(self._buffers, shapes))

    def __call__(self, patches: torch.Tensor, rotation_index: torch.Tensor | None = None,
                 log_unseen: torch.Tensor | None = None) -> EStepResult:
        """Posteriors of ``(n, L, L)`` patches over all ``K`` rotations, or over ``rotation_index``
        ``(n, J)`` (a different list of rotations per patch: the local search of a coarse-to-fine
        E-step; the posterior is then ``(n, J, 2L, 2L)``).  ``log_unseen`` ``(n,)`` is the log of
        ``1 + r`` with ``r`` the (estimated) likelihood of the rotations left out relative to those
        kept: it is taken off the empty state's log weight, so that ``p_empty`` (and the ``rho0``
        update) still weighs "empty" against every rotation; the mass ``r / (1 + r)`` of the
        non-empty states that belongs to the rotations left out is not assigned to any of them."""
        n, L = patches.shape[0], self.L
        J = self.K if rotation_index is None else rotation_index.shape[1]
        prod, logw, posterior = self._views(n, J)
        conj_ft = self.conj_ft[None] if rotation_index is None else self.conj_ft[rotation_index]
        torch.mul(padded_rfft(patches)[:, None], conj_ft, out=prod)
        torch.fft.irfft2(prod, s=(2 * L, 2 * L), out=logw)
        logw.mul_(1.0 / self.sigma2).sub_(self.offset if rotation_index is None else self.offset[rotation_index])
        log_empty = self.log_empty if log_unseen is None else self.log_empty - log_unseen.to(logw.dtype)
        top = logw.reshape(n, -1).amax(1).clamp_(min=log_empty) if log_unseen is None else \
            torch.maximum(logw.reshape(n, -1).amax(1), log_empty)
        # floor at e^-60 of the best: exp of far smaller numbers (and of the huge negative values on
        # invalid shifts) takes a slow underflow path, 10-40x the cost of exp itself; mass lost < 1e-18
        logw.sub_(top[:, None, None, None]).clamp_(min=-LOG_FLOOR)
        torch.exp(logw, out=posterior)
        z = posterior.reshape(n, -1).sum(1) + torch.exp(log_empty - top)
        posterior.mul_((1.0 / z)[:, None, None, None])
        lse = top + torch.log(z)  # log of (kept + empty / (1 + r)); the likelihood adds back log(1 + r)
        p_empty = torch.exp(log_empty - lse)
        # sum p (log w - log prior) with log w shifted by top: add back (1 - p_empty)(top - log prior)
        p_logw = logw.mul_(posterior).reshape(n, -1).sum(1) + (1 - p_empty) * (top - self.log_prior)
        norm2 = patches.reshape(n, -1).square().sum(1)
        log_likelihood = (lse if log_unseen is None else lse + log_unseen) - norm2 / (2 * self.sigma2) - 0.5 * L * L * math.log(2 * math.pi * self.sigma2)
        return EStepResult(posterior, p_empty, log_likelihood, norm2 - 2 * self.sigma2 * p_logw)


def backprojection_sums(
    patches: torch.Tensor, posterior: torch.Tensor, *, min_mass: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-step sums of a batch of patches: ``b_k`` ``(K, L, L)`` and ``wbar_k`` ``(K,)``.

    ``b_k(v) = sum_m sum_s p_m(k, s) I_m(v + s)`` (template coordinates) and
    ``wbar_k = sum_m sum_s p_m(k, s) a(s)`` with ``a`` the visible fraction.  (Patch, rotation)
    pairs whose posterior mass is below ``min_mass`` are skipped, which saves most of the work
    once the posteriors are peaked.
    """
    K, L = posterior.shape[1], patches.shape[-1]
    b_ft, wbar = backprojection_sums_ft(patches, posterior, min_mass=min_mass)
    return torch.fft.irfft2(b_ft, s=(2 * L, 2 * L))[:, :L, :L].contiguous(), wbar


def backprojection_sums_ft(
    patches: torch.Tensor, posterior: torch.Tensor, *, min_mass: float = 1e-6, out: torch.Tensor | None = None,
    rotation_index: torch.Tensor | None = None, n_rotations: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`backprojection_sums` before the inverse FFT: ``(K, 2L, L+1)`` sums added to ``out`` if given.

    Summing in Fourier space over all batches of a micrograph leaves one inverse FFT per rotation
    per micrograph instead of one per batch.  With ``rotation_index`` ``(n, J)`` the posterior is
    over each patch's own rotations (:class:`PatchEStep` local search) and is added to rotation
    ``rotation_index[m, j]`` of the ``n_rotations``.
    """
    n, L = posterior.shape[0], patches.shape[-1]
    K = posterior.shape[1] if rotation_index is None else int(n_rotations)
    frac = visible_fraction(L, device=posterior.device, dtype=posterior.dtype)
    b_ft = out if out is not None else torch.zeros(K, 2 * L, L + 1, dtype=torch.complex64 if patches.dtype == torch.float32
                                                    else torch.complex128, device=patches.device)
    i_ft = padded_rfft(patches)
    index = rotation_index if rotation_index is not None else torch.arange(K, device=posterior.device).expand(n, K)
    per_pair = torch.einsum("njyx,yx->nj", posterior, frac).reshape(-1)
    wbar = posterior.new_zeros(K).index_add_(0, index.reshape(-1), per_pair)
    pairs = torch.nonzero(posterior.sum((2, 3)) > min_mass)  # (patch, rotation) pairs that carry mass
    if len(pairs) == 0:
        return b_ft, wbar
    if rotation_index is not None or len(pairs) < 0.75 * n * K:  # transform only the pairs that matter
        p_ft = torch.fft.rfft2(posterior[pairs[:, 0], pairs[:, 1]]).conj_physical_().mul_(i_ft[pairs[:, 0]])
        b_ft.index_add_(0, index[pairs[:, 0], pairs[:, 1]], p_ft)
        return b_ft, wbar
    p_ft = torch.fft.rfft2(posterior).conj_physical_()
    for m in range(n):  # a sum of products per patch (complex einsum is ~10x slower on CPU)
        b_ft.addcmul_(p_ft[m], i_ft[m])
    return b_ft, wbar


__all__ += ["backprojection_sums", "backprojection_sums_ft", "PatchEStep"]

