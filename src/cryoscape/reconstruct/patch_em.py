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
    """Packed conjugate spectra ``(ceil(K/2), 2L, 2L)`` of ``(K, L, L)`` templates and their visible energy ``e_k(s)``.

    Pair ``j`` holds ``conj FFT(t_2j) + i conj FFT(t_2j+1)`` on the ``2L`` grid (templates zero-padded
    at the bottom/right), the factor :class:`PatchEStep` multiplies a patch's FFT by.  For real
    templates that is the unnormalised inverse FFT of ``t_2j + i t_2j+1``: one complex FFT per pair.
    A blank template is appended when ``K`` is odd.

    The energy ``e_k(s)``, the template's squared norm over the part of it that shift ``s`` leaves
    inside the patch, is a rectangle sum of ``t_k^2``: read off 2-D cumulative sums (float64), so
    it is exact and never negative (an FFT correlation leaves round-off of ``1e-7 ||t||^2`` where the
    visible part is blank, which a small ``sigma^2`` turns into a better-than-perfect fit).
    """
    K, L = templates.shape[0], templates.shape[-1]
    padded = torch.cat([templates, templates.new_zeros(1, L, L)]) if K % 2 else templates
    pairs = torch.complex(padded[0::2], padded[1::2])
    packed_conj = torch.fft.ifft2(pairs, s=(2 * L, 2 * L), norm="forward")
    t2 = templates.double().square()
    cum = torch.nn.functional.pad(t2.cumsum(-1).cumsum(-2), (1, 0, 1, 0))  # cum[y, x] = sum of t2[:y, :x]
    s = shift_grid_pixel(L, device=templates.device)[:, 0, 0]  # shift of each grid index (L: outside)
    lo = (-s).clamp(min=0).clamp(max=L)
    hi = (L - s).clamp(min=0).clamp(max=L)
    hi = torch.maximum(hi, lo)
    ly, hy, lx, hx = lo[:, None], hi[:, None], lo[None, :], hi[None, :]
    energy = cum[:, hy, hx] - cum[:, ly, hx] - cum[:, hy, lx] + cum[:, ly, lx]
    return packed_conj, energy.clamp_(min=0).to(templates.dtype)


@dataclass
class EStepResult:
    """Posteriors of a batch of patches and the sums the M-step needs.

    Attributes
    ----------
    posterior
        ``(n, K, 2L, 2L)`` ``p(k, s | I_m)`` (below ``e^-60`` on invalid shifts and far-off poses);
        :class:`PatchEStep` returns it packed, see :attr:`PatchEStep.__call__`.
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


def unpack_posterior(packed: torch.Tensor, K: int) -> torch.Tensor:
    """``(n, J, 2L, 2L)`` complex packed posteriors (rotation ``2j`` real, ``2j + 1`` imaginary) -> ``(n, K, 2L, 2L)``."""
    n, J, M = packed.shape[0], packed.shape[1], packed.shape[-1]
    return torch.view_as_real(packed).permute(0, 1, 4, 2, 3).reshape(n, 2 * J, M, M)[:, :K]


def pack_posterior(posterior: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_posterior` (a zero rotation appended when ``K`` is odd)."""
    n, K, M = posterior.shape[0], posterior.shape[1], posterior.shape[-1]
    if K % 2:
        posterior = torch.cat([posterior, posterior.new_zeros(n, 1, M, M)], 1)
    pairs = posterior.reshape(n, -1, 2, M, M)
    return torch.complex(pairs[:, :, 0], pairs[:, :, 1])


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
    :class:`PatchEStep`; the posterior is unpacked to ``(n, K, 2L, 2L)``.
    """
    res = PatchEStep(template_ft, energy, sigma2=sigma2, rho0=rho0)(patches)
    res.posterior = unpack_posterior(res.posterior, energy.shape[0]).clone()
    return res


LOG_FLOOR = 60.0


class PatchEStep:
    """The E-step of one micrograph's templates, applied batch after batch with reused buffers.

    Two rotations per FFT: the cross-correlations of a patch with two real templates are the real
    and imaginary parts of one complex inverse FFT of ``FFT(I) (conj T_2j + i conj T_2j+1)``; one
    complex ``2L x 2L`` FFT costs 4-9x less than two real-to-complex inverse FFTs of that size on CPU
    (MKL copies the input of every C2R transform).  So rotations are handled in pairs ``j`` and the
    log weights of a batch are the float view ``(n, J, 2L, 2L, 2)`` of a complex array.

    Memory traffic dominates what is left: arrays are written once by the FFT and then updated in
    place, and allocated once per micrograph rather than once per batch (fresh multi-megabyte
    arrays cost a page fault per 4 KiB on first touch).  The expected residual uses
    ``c - e/2 = sigma^2 (log w - log prior)`` instead of keeping ``c``.
    """

    def __init__(self, packed_conj: torch.Tensor, energy: torch.Tensor, *, sigma2: float, rho0: float):
        K, L = energy.shape[0], energy.shape[-1] // 2
        self.K, self.L, self.sigma2 = K, L, float(sigma2)
        self.log_prior = math.log((1.0 - rho0) / (K * (2 * L - 1) ** 2))
        self.log_empty = math.log(rho0)
        # e / (2 sigma^2) - log prior, and a huge value on invalid shifts (exp -> 0, p log w -> 0)
        valid = valid_shift_mask(L, device=energy.device)
        offset = (energy * (0.5 / sigma2) - self.log_prior).masked_fill_(~valid, 1e30)
        if K % 2:  # the blank last rotation of template_terms can never win
            offset = torch.cat([offset, torch.full_like(offset[:1], 1e30)])
        self.packed_conj = packed_conj * (1.0 / sigma2)  # (J, 2L, 2L), see template_terms; log w needs c / sigma^2
        self.offset = offset.reshape(-1, 2, 2 * L, 2 * L).permute(0, 2, 3, 1).contiguous()  # (J, 2L, 2L, 2)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_pairs(self) -> int:
        return self.packed_conj.shape[0]

    def _views(self, n: int, J: int):
        size = n * J * 4 * self.L**2
        if self._buffers is None or self._buffers[0].numel() < size:
            self._buffers = tuple(torch.empty(size, dtype=self.packed_conj.dtype, device=self.offset.device)
                                  for _ in range(2))
        shape = (n, J, 2 * self.L, 2 * self.L)
        return tuple(b[:size].view(shape) for b in self._buffers)

    def __call__(self, patches: torch.Tensor, pair_index: torch.Tensor | None = None,
                 log_unseen: torch.Tensor | None = None) -> EStepResult:
        """Packed posteriors ``(n, J, 2L, 2L)`` complex (rotation ``2j`` in the real part, ``2j + 1`` in
        the imaginary part) of ``(n, L, L)`` patches over all rotation pairs, or over ``pair_index``
        ``(n, J)`` (a different list of pairs per patch: the local search of a coarse-to-fine E-step).

        ``log_unseen`` ``(n,)`` is the log of ``1 + r`` with ``r`` the (estimated) likelihood of the
        rotations left out relative to those kept: it is taken off the empty state's log weight, so
        that ``p_empty`` (and the ``rho0`` update) still weighs "empty" against every rotation; the
        mass ``r / (1 + r)`` that belongs to the rotations left out is not assigned to any of them.
        The posterior is a view of a buffer, valid until the next call.
        """
        n, L = patches.shape[0], self.L
        J = self.n_pairs if pair_index is None else pair_index.shape[1]
        corr, packed = self._views(n, J)
        conj = self.packed_conj[None] if pair_index is None else self.packed_conj[pair_index]
        torch.mul(torch.fft.fft2(patches, s=(2 * L, 2 * L))[:, None], conj, out=packed)
        torch.fft.ifft2(packed, out=corr)
        logw, posterior = torch.view_as_real(corr), torch.view_as_real(packed)
        logw.sub_(self.offset if pair_index is None else self.offset[pair_index])
        log_empty = self.log_empty if log_unseen is None else self.log_empty - log_unseen.to(logw.dtype)
        top = torch.maximum(logw.reshape(n, -1).amax(1), torch.as_tensor(log_empty, dtype=logw.dtype))
        # floor at e^-60 of the best: exp of far smaller numbers (and of the huge negative values on
        # invalid shifts) takes a slow underflow path, 10-40x the cost of exp itself; mass lost < 1e-18
        logw.sub_(top[:, None, None, None, None]).clamp_(min=-LOG_FLOOR)
        torch.exp(logw, out=posterior)
        z = posterior.reshape(n, -1).sum(1) + torch.exp(log_empty - top)
        posterior.mul_((1.0 / z)[:, None, None, None, None])
        lse = top + torch.log(z)  # log of (kept + empty / (1 + r)); the likelihood adds back log(1 + r)
        p_empty = torch.exp(log_empty - lse)
        # sum p (log w - log prior) with log w shifted by top: add back (1 - p_empty)(top - log prior)
        p_logw = torch.bmm(logw.reshape(n, 1, -1), posterior.reshape(n, -1, 1)).reshape(n)  # one pass, no writes
        p_logw = p_logw + (1 - p_empty) * (top - self.log_prior)
        norm2 = patches.reshape(n, -1).square().sum(1)
        gauss = norm2 / (2 * self.sigma2) + 0.5 * L * L * math.log(2 * math.pi * self.sigma2)
        log_likelihood = (lse if log_unseen is None else lse + log_unseen) - gauss
        return EStepResult(packed, p_empty, log_likelihood, norm2 - 2 * self.sigma2 * p_logw)


def backprojection_sums(
    patches: torch.Tensor, posterior: torch.Tensor, *, min_mass: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-step sums of a batch of patches: ``b_k`` ``(K, L, L)`` and ``wbar_k`` ``(K,)``.

    ``b_k(v) = sum_m sum_s p_m(k, s) I_m(v + s)`` (template coordinates) and
    ``wbar_k = sum_m sum_s p_m(k, s) a(s)`` with ``a`` the visible fraction; ``posterior`` is
    ``(n, K, 2L, 2L)``.  (Patch, rotation pair)s whose posterior mass is below ``min_mass`` are
    skipped, which saves most of the work once the posteriors are peaked.
    """
    K, L = posterior.shape[1], patches.shape[-1]
    b_ft, wbar = backprojection_sums_ft(patches, pack_posterior(posterior), n_rotations=K + K % 2, min_mass=min_mass)
    return unpack_sums(b_ft, K, L), wbar[:K]


def unpack_sums(b_ft: torch.Tensor, K: int, L: int) -> torch.Tensor:
    """``(K, L, L)`` ``b_k`` from the packed Fourier sums of :func:`backprojection_sums_ft`."""
    b = torch.view_as_real(torch.fft.ifft2(b_ft))  # (J, 2L, 2L, 2): rotation 2j real, 2j + 1 imaginary
    return b.permute(0, 3, 1, 2).reshape(-1, 2 * L, 2 * L)[:K, :L, :L]


def backprojection_sums_ft(
    patches: torch.Tensor, posterior: torch.Tensor, *, n_rotations: int, min_mass: float = 1e-6,
    out: torch.Tensor | None = None, pair_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed M-step sums in Fourier space, ``(J, 2L, 2L)`` complex (added to ``out`` if given), and ``wbar``.

    ``posterior`` is packed as :class:`PatchEStep` returns it.  With ``Q = p_2j + i p_2j+1``,
    ``sum_s Q(s) I(v + s) = IFFT(FFT(I) conj FFT(conj Q))`` holds the two rotations' ``b`` in its real
    and imaginary parts, and ``conj FFT(conj Q)`` is the unnormalised inverse FFT of ``Q``: one
    complex FFT per pair.  Sums stay in Fourier space over all batches of a micrograph
    (:func:`unpack_sums` at the end).  With ``pair_index`` ``(n, J)`` the posterior is over each
    patch's own pairs and is added to pair ``pair_index[m, j]``.
    """
    n, L = posterior.shape[0], patches.shape[-1]
    J_all = (n_rotations + 1) // 2
    frac = visible_fraction(L, device=patches.device, dtype=patches.dtype).reshape(-1)
    b_ft = out if out is not None else torch.zeros(J_all, 2 * L, 2 * L, dtype=posterior.dtype, device=posterior.device)
    index = pair_index if pair_index is not None else torch.arange(J_all, device=posterior.device).expand(n, J_all)
    # one complex matrix product gives sum_s Q(s) a(s) = wbar_2j + i wbar_2j+1 and sum_s Q(s) (the pair's
    # mass in its real plus imaginary part): one pass over the posteriors instead of two reductions
    basis = torch.stack([frac, torch.ones_like(frac)], 1).to(posterior.dtype)
    both = (posterior.reshape(-1, 4 * L * L) @ basis).reshape(n, -1, 2)
    per_rotation = torch.view_as_real(both[..., 0])  # (n, J, 2)
    wbar = patches.new_zeros(J_all, 2).index_add_(0, index.reshape(-1), per_rotation.reshape(-1, 2)).reshape(-1)
    i_ft = torch.fft.fft2(patches, s=(2 * L, 2 * L))
    pairs = torch.nonzero(both[..., 1].real + both[..., 1].imag > min_mass)  # (patch, pair)s that carry mass
    if len(pairs) == 0:
        return b_ft, wbar[:n_rotations]
    if pair_index is not None or len(pairs) < 0.75 * n * J_all:  # transform only the pairs that matter
        q_ft = torch.fft.ifft2(posterior[pairs[:, 0], pairs[:, 1]], norm="forward").mul_(i_ft[pairs[:, 0]])
        b_ft.index_add_(0, index[pairs[:, 0], pairs[:, 1]], q_ft)
        return b_ft, wbar[:n_rotations]
    q_ft = torch.fft.ifft2(posterior, norm="forward")
    for m in range(n):  # a sum of products per patch (complex einsum is ~10x slower on CPU)
        b_ft.addcmul_(q_ft[m], i_ft[m])
    return b_ft, wbar[:n_rotations]


__all__ += ["backprojection_sums", "backprojection_sums_ft", "unpack_sums", "PatchEStep", "pack_posterior",
            "unpack_posterior"]
