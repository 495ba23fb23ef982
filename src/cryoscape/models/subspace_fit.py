"""Closed-form, regularised fit of a linear subspace of maps at fixed latents (known poses).

For a decoder ``V(k; z) = V_0(k) + sum_j s_j(z) V_j(k)`` whose mixing weights ``s(z)`` are known
for every image, the maps that best explain the images are a linear least-squares problem.  In
the gridding approximation of backprojection (every pixel spreads onto its 8 trilinear corners
and the normal equations are diagonal across voxels, :func:`cryoscape.models.sparse_slice.
backproject_to_lattice`) it splits into one small ``(K+1) x (K+1)`` system per voxel::

    (sum_i W_iv a_i a_i^T + diag(tau_v)) x_v = sum_i B_iv a_i,      a_i = (1, u_i)

with ``W_iv`` the CTF^2 weight and ``B_iv`` the CTF-weighted data that image ``i`` backprojects
onto voxel ``v``.  ``u`` are the mixing weights turned to their principal axes and whitened
(unit variance, uncorrelated over the data), so that every component has a comparable prior.

The prior ``tau`` is a Wiener prior per component and shell, estimated like RELION's
gold-standard reconstruction: images alternate between two half-sets, each half is solved, the
per-component FSC between the halves gives the SSNR (``2 FSC / (1 - FSC)`` for the full data)
and ``tau = <W_jj>_shell / SSNR_j``.  A component that the two halves do not agree on is shrunk
to zero, so noise fitted into the heterogeneity components (what an Adam-trained basis keeps in
the high frequencies) is removed, while the mean map ``V_0`` becomes the Wiener-filtered
consensus.  The first solve of the halves uses the mean map's SSNR for every component.

Layouts: voxel tables are ``(n_vox, ...)`` on the decoder's compact lattice, shells ``(n_vox,)``
integer ``round(|k|)`` in index units, the weight Gram matrices stored as their upper triangles
``(n_vox, T)`` with ``T = (K+1)(K+2)/2``.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["SubspaceSums", "whitening", "solve_subspace", "correct_subspace", "ssnr_from_halves"]

# voxels per block of the per-voxel solves: (16384, 17, 17) float64 matrices are 38 MB
SOLVE_CHUNK_VOXELS = 16384


class SubspaceSums:
    """Half-set sums ``sum_i W_iv a_i a_i^T`` (upper triangle) and ``sum_i B_iv a_i`` per voxel.

    ``n_vox`` voxels, ``n_comp = K + 1`` components (the first, ``a = 1``, is the mean map).
    Sums are float64 (complex128) on ``device``; ``with_gram=False`` keeps only the data sums
    (what a correction pass of :func:`correct_subspace` needs).  ``voxels``: the indices, among
    the lattice's ``n_vox``, of the only voxels summed (row ``j`` holds voxel ``voxels[j]``; the
    images' other corners are dropped), so that a refit can solve its components on part of the
    lattice (``StructuralBasis.refit``'s memory budget); ``None``: all of them.
    """

    def __init__(self, n_vox: int, n_comp: int, device: torch.device | str = "cpu", *, with_gram: bool = True,
                 voxels: torch.Tensor | None = None):
        self.rows = None
        if voxels is not None:  # lattice index -> row, -1 for a voxel not summed
            self.rows = torch.full((int(n_vox),), -1, dtype=torch.long, device=device)
            self.rows[voxels.to(device)] = torch.arange(voxels.numel(), device=device)
            n_vox = voxels.numel()
        self.n_vox, self.n_comp = int(n_vox), int(n_comp)
        rows, cols = torch.triu_indices(self.n_comp, self.n_comp)
        self.tri_rows, self.tri_cols = rows.to(device), cols.to(device)
        T = rows.numel() if with_gram else 0
        self.gram = torch.zeros(2, self.n_vox, T, dtype=torch.float64, device=device)
        self.rhs = torch.zeros(2, self.n_vox, self.n_comp, dtype=torch.complex128, device=device)
        self.n_images = 0

    def add(self, index: torch.Tensor, corner_weights: torch.Tensor, imag_sign: torch.Tensor,
            values: torch.Tensor, weights: torch.Tensor, a: torch.Tensor) -> None:
        """Add a batch of images.

        ``index, corner_weights, imag_sign (B, P, 8)``: trilinear corners of each pixel's
        frequency (:func:`~cryoscape.models.sparse_slice.corner_codes_and_weights`); ``values
        (B, P)`` complex data times CTF and pixel weight; ``weights (B, P)`` CTF^2 times pixel
        weight; ``a (B, >= n_comp)`` every image's components (first column 1; columns beyond
        ``n_comp`` are not summed).  Image ``n`` of the whole stream goes to half-set ``n % 2``.
        """
        B = index.shape[0]
        a = a[:, : self.n_comp]
        if self.rows is not None:
            index = self.rows[index.long()]
            corner_weights = corner_weights * (index >= 0)
            index = index.clamp_min(0)
        half = (torch.arange(B, device=index.device) + self.n_images) % 2
        for h in (0, 1):
            sel = (half == h).nonzero().squeeze(-1)
            if sel.numel():
                self._add_half(h, index[sel], corner_weights[sel], imag_sign[sel], values[sel], weights[sel], a[sel])
        self.n_images += B

    def _add_half(self, h: int, index, cw, imag_sign, values, weights, a) -> None:
        B = index.shape[0]
        cw = cw.double()
        w = (cw * weights.double().unsqueeze(-1)).reshape(B, -1)
        v = values.to(torch.complex128).unsqueeze(-1)
        re = (cw * v.real).reshape(B, -1)
        im = (cw * imag_sign.double() * v.imag).reshape(B, -1)
        keep = w.reshape(-1) != 0
        # voxel-major keys: sorted unique keys are already the rows of a CSR matrix (n_vox, B)
        kind = torch.int32 if self.n_vox * B < 2 ** 31 else torch.long  # int32 sorts faster
        image = torch.arange(B, device=index.device, dtype=kind).unsqueeze(-1).expand_as(w)
        key = (index.reshape(B, -1).to(kind) * B + image).reshape(-1)[keep]
        unique, inverse = torch.unique(key, return_inverse=True)
        per = torch.zeros(unique.numel(), 3, dtype=torch.float64, device=index.device)
        per.index_add_(0, inverse, torch.stack([w.reshape(-1)[keep], re.reshape(-1)[keep], im.reshape(-1)[keep]], -1))
        voxel, col = unique // B, unique % B
        counts = torch.bincount(voxel.long(), minlength=self.n_vox)
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(kind)
        a = a.double()
        tri = a[:, self.tri_rows] * a[:, self.tri_cols]  # (B, T)

        # sums over images as sparse-dense products (BLAS-like), not a scatter of (K+1)(K+2)/2
        # values per entry, accumulated in place
        def matrix(values: torch.Tensor) -> torch.Tensor:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": this product is long stable
                warnings.simplefilter("ignore", UserWarning)
                return torch.sparse_csr_tensor(crow, col, values.contiguous(), (self.n_vox, B), check_invariants=False)

        if self.gram.shape[-1]:
            self.gram[h].addmm_(matrix(per[:, 0]), tri)
        parts = torch.view_as_real(self.rhs[h])
        parts[..., 0].addmm_(matrix(per[:, 1]), a)
        parts[..., 1].addmm_(matrix(per[:, 2]), a)

    def _triangles(self, h: int | None, voxels: slice = slice(None)) -> torch.Tensor:
        """The stored upper triangles ``(n, T)`` of half ``h`` (``None``: both halves) at ``voxels``."""
        return self.gram[0, voxels] + self.gram[1, voxels] if h is None else self.gram[h, voxels]

    def full_gram(self, h: int | None, voxels: slice = slice(None)) -> torch.Tensor:
        """``(n, K+1, K+1)`` symmetric Gram matrices of half ``h`` (``None``: both halves) at ``voxels``."""
        tri = self._triangles(h, voxels)
        G = torch.zeros(tri.shape[0], self.n_comp, self.n_comp, dtype=tri.dtype, device=tri.device)
        G[:, self.tri_rows, self.tri_cols] = tri
        G[:, self.tri_cols, self.tri_rows] = tri
        return G

    def gram_diagonal(self, h: int | None) -> torch.Tensor:
        """``(n_vox, K+1)`` diagonals of the Gram matrices of half ``h`` (``None``: both halves)."""
        return self._triangles(h)[:, (self.tri_rows == self.tri_cols).nonzero().squeeze(-1)]

    def solve(self, h: int | None, rhs: torch.Tensor, tau: torch.Tensor, *,
              chunk_voxels: int = SOLVE_CHUNK_VOXELS) -> torch.Tensor:
        """``(G_h + diag tau) x = rhs`` per voxel (``rhs (n_vox, C)`` complex, ``tau (n_vox, C)``).

        The Gram matrices are assembled from their stored triangles ``chunk_voxels`` voxels at a
        time, so the solve holds ``(chunk, C, C)`` matrices, never ``(n_vox, C, C)`` ones (at D=128
        with 17 components those are 2.4 GB each).
        """
        out = torch.empty_like(rhs)
        for start in range(0, self.n_vox, chunk_voxels):
            voxels = slice(start, start + chunk_voxels)
            out[voxels] = _solve(self.full_gram(h, voxels), rhs[voxels], tau[voxels])
        return out


def whitening(s: torch.Tensor, *, rel_tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean (K,), W (K, K'))`` with ``u = (s - mean) @ W`` uncorrelated and of unit variance
    over the rows of ``s (N, K)``, principal axes in decreasing variance; directions whose
    variance is below ``rel_tol`` of the largest are dropped (``K' <= K``)."""
    s = s.double()
    mean = s.mean(0)
    cov = torch.cov((s - mean).T).reshape(s.shape[1], s.shape[1])
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    keep = evals > rel_tol * evals[0].clamp_min(1e-300)
    return mean, evecs[:, keep] * evals[keep].rsqrt()


def _per_shell(x: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Sum over the voxels of every shell: ``x (n_vox, C)`` -> ``(n_shells, C)``."""
    return torch.zeros(n_shells, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, shells, x)


def _solve(G: torch.Tensor, rhs: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``(G + diag tau) x = rhs`` per voxel: ``G (n, C, C)``, ``rhs (n, C)`` complex, ``tau (n, C)``."""
    A = G + torch.diag_embed(tau)
    b = torch.stack([rhs.real, rhs.imag], dim=-1)
    floor = (1e-12 * A.diagonal(dim1=-2, dim2=-1).amax(-1)).clamp_min(1e-30)  # voxels no image touched: 0
    A = A + torch.eye(A.shape[-1], dtype=A.dtype, device=A.device) * floor[:, None, None]
    x = torch.linalg.solve(A, b)
    return torch.complex(x[..., 0], x[..., 1])


def ssnr_from_halves(x0: torch.Tensor, x1: torch.Tensor, shells: torch.Tensor, n_shells: int):
    """Per-shell, per-component FSC of two half solutions ``(n_vox, C)`` and the full data's SSNR
    ``2 FSC / (1 - FSC)`` (FSC capped at 0.999, SSNR floored at 1e-3); shared with the warm start."""
    cross = _per_shell((x0 * x1.conj()).real, shells, n_shells)
    power = (_per_shell(x0.abs().square(), shells, n_shells) * _per_shell(x1.abs().square(), shells, n_shells)).sqrt()
    fsc = (cross / power.clamp_min(1e-300)).clamp(-1.0, 0.999)
    return fsc, (2 * fsc / (1 - fsc)).clamp_min(1e-3)


def solve_subspace(sums: SubspaceSums, shells: torch.Tensor, *, rounds: int = 2,
                   component_mask=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The regularised solution ``(n_vox, K+1)`` complex of the full data, the per-shell,
    per-component half-set FSC ``(n_shells, K+1)`` of the last round and the prior ``tau (n_vox,
    K+1)`` of the full solve (module docstring).

    Round 0 gives every component the mean map's SSNR (its half-set FSC from the plain
    backprojection ``rhs_0 / W_00``); each further round solves the halves with the previous
    round's per-component SSNR and re-estimates it.  The full data is solved last.

    ``component_mask``: an object with ``estimate(halves)`` and ``apply(x)`` that confines the
    components ``1..K`` to a real-space region (where the maps vary): it is estimated from each
    round's half solutions, the components' FSC is computed inside it (as a masked FSC in
    RELION's post-processing: a heterogeneity confined to a small region has a far higher SSNR
    there than its shell average), and the final components are multiplied by it.
    """
    shells = shells.long()
    n_shells = int(shells.max()) + 1
    counts = _per_shell(torch.ones(shells.numel(), 1, dtype=torch.float64, device=shells.device), shells, n_shells)
    # (S, C); shells absent from a band of a split refit: 0
    diag_mean = _per_shell(sums.gram_diagonal(None), shells, n_shells) / counts.clamp_min(1)
    plain = [sums.rhs[h][:, :1] / sums.gram_diagonal(h)[:, :1].clamp_min(1e-300) for h in (0, 1)]
    fsc, ssnr = ssnr_from_halves(plain[0], plain[1], shells, n_shells)
    ssnr = ssnr.expand(-1, sums.n_comp)
    for _ in range(max(1, rounds)):
        # a half holds half the weight and half the SSNR: the same tau as the full data
        tau = (diag_mean / ssnr)[shells]
        x = [sums.solve(h, sums.rhs[h], tau) for h in (0, 1)]
        if component_mask is not None:
            component_mask.estimate(x)
            x = [component_mask.apply(part) for part in x]
        fsc, ssnr = ssnr_from_halves(x[0], x[1], shells, n_shells)
    tau = (diag_mean / ssnr)[shells]
    full = sums.solve(None, sums.rhs.sum(0), tau)
    return (full if component_mask is None else component_mask.apply(full)), fsc, tau


def correct_subspace(x: torch.Tensor, sums: SubspaceSums, residuals: SubspaceSums, tau: torch.Tensor, *,
                     component_mask=None) -> torch.Tensor:
    """One correction of the gridding approximation: ``x + (G + diag tau)^-1 (r - tau x)``.

    ``residuals`` holds the backprojected residuals ``sum_i a_i P_i^T c_i (X_i - c_i P_i V(x, a_i))``
    of the *exact* forward model (trilinear interpolation) at the current solution ``x``, so this
    is a Richardson step on ``(A + T) x = b`` preconditioned by its gridding approximation ``G +
    T`` (the per-voxel Gram matrices of ``sums``).  Its fixed point is the regularised solution of
    the exact model: at high SNR, where the gridding estimate's blur exceeds the noise, the
    corrected maps fit the images as closely as gradient descent on the same model would.
    """
    step = sums.solve(None, residuals.rhs.sum(0) - tau * x, tau)
    return x + (step if component_mask is None else component_mask.apply(step))
