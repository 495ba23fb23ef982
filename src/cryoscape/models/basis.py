"""Voxel "structural basis" decoder with sparse Fourier backpropagation (seed 003, eq. 3).

    V(k; z) = V_0(k) + sum_{j=1..K} s_j(z) V_j(k)

``V_0 .. V_K`` are complex Fourier volumes on the integer frequency lattice, stored only inside
the Nyquist ball and only once per Friedel pair (the compact Hermitian lattice of
:mod:`cryoscape.models.sparse_slice`); ``s(z)`` is a small residual MLP.  A homogeneous decoder
(``zdim == 0``) is ``V_0`` alone.  It is a learned *linear subspace* of maps (like 3DVA), trained
end to end with the amortised encoder: heterogeneity that does not fit in ``K`` dimensions
(large rigid-body motions, many independent parts) is approximated by its best ``K``-dimensional
projection, where a neural field has no such limit.

Values between lattice points are trilinear interpolations of the 8 corners around them
(:func:`cryoscape.models.sparse_slice.sparse_slice`): training reads and updates only the voxels
that the batch's central slices touch, so a step costs ``pixels x 8 x (K+1)`` multiply-adds per
image instead of a coordinate MLP per pixel.

Parameters, their scale and their learning rates
-------------------------------------------------
``mean_real, mean_imag (n_vox, 1)`` hold ``V_0`` (initialised to 0) and ``basis_real,
basis_imag (n_vox, K)`` the basis (``N(0, 1) * init_scale``: tiny, so the subspace grows from
the data).  The represented coefficient is the stored value times a fixed per-shell amplitude (a
buffer, 1 until :meth:`StructuralBasis.set_data_spectrum` is called by the training loop with
the data's per-shell RMS amplitude, the ``sigma_bar`` of seed 003 eq. 5).  Map coefficients span
orders of magnitude between low and high frequencies while Adam moves every parameter by about
its learning rate, so this preconditioning puts all shells on one footing (seed 003 sec. 4.3
divides the data by ``sigma_bar`` for the same reason).

Three choices keep the per-image maps as clean as a consensus map while the latent space is still
uninformative (measured on the 2000-image SNR 0.1 hinge set of bench/train.py, 2 epochs,
per-image FSC AUC; a homogeneous ``V_0`` alone reaches 0.73; these figures predate the warm start
below and were measured from zero at batch 8, lr 1e-4):

* ``s(z)`` is *standardised* by running statistics (mean and standard deviation over the training
  batches, like batch normalisation without its affine part), so ``V_0`` is the mean map and the
  product ``s_j V_j`` has no free scale for Adam to inflate.  Without it the raw ``s`` drifted to
  +-15 and the mean map was spread over all 17 volumes.
* The basis learns ``basis_lr_scale`` times slower than ``V_0``: Adam moves every stored value by
  about its learning rate however small its gradient, so while ``s(z)`` carries no information the
  16 basis volumes random-walk as fast as ``V_0`` learns and add their noise to every map (0.65 at
  the same rate, 0.73 at 0.01x).  Too slow and the hinge is never learnt (0.1x learns it).
* The voxels train at ``voxel_lr_scale x --lr`` (their own parameter groups,
  :meth:`StructuralBasis.optimizer_param_groups`).

Warm start and signal preconditioning (known poses)
---------------------------------------------------
Adam moves every stored value by about its learning rate per step, so from zero the shells a
noisy data set barely determines are neither converged nor clean after an epoch or two, and the
16 basis volumes random-walk in them.  Before the first epoch of a new run the training loop
calls :meth:`StructuralBasis.warm_start` (train/warm_start.py): ``V_0`` becomes the Wiener
backprojection of the data (two half-sets, SSNR from their FSC), and the per-shell amplitude
becomes that map's RMS, the *signal* amplitude, so steps shrink where the signal is weak.
Measured on the bench set above (batch 8, lr 1e-4, default scales): 0.657 from zero, 0.737 with
the warm start alone, 0.762 with both; the warm-started map before training scores 0.772 and
backprojection 0.781 (cryoDRGN after 2 epochs: 0.750).  With the defaults of ``cryoscape train``
(batch 64, lr 1e-3; train/config.py) 0.756, at 900-1000 img/s.

Optional regularisation (off by default)
----------------------------------------
``power_prior``: ``r`` of a Fourier-power (ridge) prior on the map coefficients, added to the loss
through :meth:`StructuralBasis.regularization_loss` and scaled so that ``r`` means what
backprojection's regulariser means (a homogeneous map converges to ``cryoscape backproject``'s
Wiener estimate with the same ``r``).  A voxel map fitted to noisy images without it over-fits:
on a 1000-image, SNR 1 test set the exact least-squares map scores 0.87 (sphere-masked FSC AUC to
the truth) against backprojection's 0.93, and 0.93 with ``r = 3``.
``solvent_mask_radius_fraction``: every ``mask_every`` optimiser steps every volume is multiplied
in real space by a soft sphere of that radius (fraction of the box; cosine edge of ``0.05 D``)
(:meth:`StructuralBasis.after_optimizer_step`); the solvent around the particle is then zero in
every generated map.

Refit (known poses)
-------------------
After every ``--refit-every`` epochs and the last, the training loop calls :meth:`StructuralBasis.
refit` (train/refit.py): with every image's ``s(z)`` fixed, the volumes are re-solved in closed
form with a gold-standard Wiener prior per component and shell, the components confined to a
real-space mask of where they vary (``refit_mask``, ``refit_mask_shell``, ``refit_mask_threshold``),
and at high SNR the final refit corrects its gridding approximation (``refit_corrections``); see
:mod:`cryoscape.models.subspace_fit` and the README for what it changes.

Gradients: dense by default (a zero buffer per table with the touched rows filled, then torch's
fused Adam); ``sparse_grad=True`` gives ``torch.sparse_coo`` gradients over the touched voxels,
updated lazily by :class:`cryoscape.models.sparse_slice.RowSparseAdam`.  On CPUs the dense path
is faster at D = 64 and 128 (a fused pass over every voxel costs less than scattered row updates
of the 20-30 % of voxels a batch of 8 touches); the sparse one keeps the optimiser's work
proportional to the batch for large boxes.

Scale of :meth:`StructuralBasis.eval_volume`: the same as the neural field's (module docstring
of :mod:`cryoscape.models.neural_field`): lattice values are the centred unnormalised FFT of
the map, smaller boxes crop frequencies and multiply by ``(n / D)^3``.  Generating a map is one
``(n_vox, K) x (K,)`` product, one gather into the ``rfft`` half-grid and one inverse real FFT.
Voxels beyond the Nyquist shell (``round(|k| D) > radius``) are left out of generated maps.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from cryoscape.models.base import VolumeDecoder, register_decoder
from cryoscape.models.layers import ResidualMLP
from cryoscape.models.sparse_slice import (
    DEFAULT_MAX_ELEMENTS,
    HermitianLattice,
    backproject_to_lattice,
    corner_codes_and_weights,
    sparse_slice,
    split_codes,
)
from cryoscape.models.subspace_fit import SubspaceSums, correct_subspace, solve_subspace, ssnr_from_halves, whitening

__all__ = ["StructuralBasis", "refit_bands", "refit_budget_bytes", "refit_bytes"]

#: Lattice points farther than this from the largest training frequency are never a corner.
_CORNER_REACH = math.sqrt(3.0) + 1e-3
#: Largest memory the refit's per-voxel sums and solutions may take (:func:`refit_bytes`; with all 17
#: components a D = 256 basis would need ~20 GiB: its components are then solved up to the shell
#: that fits, :func:`refit_bands`; D = 128 needs ~2.6 GiB), and at most this fraction of the
#: machine's memory (:func:`refit_budget_bytes`).
_REFIT_MAX_BYTES = 8 * 2**30
_REFIT_MAX_MEMORY_FRACTION = 1 / 3

#: Weight of one batch in the running statistics of s(z).
_S_STATS_MOMENTUM = 0.01


def refit_bytes(n_vox: int, n_comp: int) -> int:
    """Memory of a refit's per-voxel sums: half-set Gram triangles (float64) plus data sums,
    solutions and residual sums (complex128); the per-voxel solves run in blocks and add little.
    ``n_comp`` counts the mean map and the whitened components the refit solves (directions in
    which the mixing weights do not vary are dropped first, so it is often below ``K + 1``)."""
    return int(n_vox) * (int(n_comp) * (int(n_comp) + 1) * 8 + 8 * int(n_comp) * 16)


def refit_budget_bytes() -> int:
    """The refit's memory budget: 8 GiB, or a third of the machine's physical memory where that is
    less (a 16 GB laptop: 5.3 GB), since the training process holds the decoder, its optimiser
    state and the refit's transients beside it (README: measured peaks)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: the fixed cap alone
        return _REFIT_MAX_BYTES
    return int(min(_REFIT_MAX_BYTES, _REFIT_MAX_MEMORY_FRACTION * physical))


def refit_bands(shell_counts: torch.Tensor, n_comp: int, max_bytes: int) -> int | None:
    """The outermost shell up to which a refit within ``max_bytes`` solves all ``n_comp`` columns,
    the mean map alone beyond it: the last shell when the whole refit fits (:func:`refit_bytes`),
    ``None`` when not even the lowest shell does.  ``shell_counts (S,)``: the lattice's voxels per
    shell.  A split refit holds both bands' sums and the assembled ``(n_vox, n_comp)`` solution."""
    counts = shell_counts.long()
    total = int(counts.sum())
    if refit_bytes(total, n_comp) <= max_bytes:
        return len(counts) - 1
    fits = [shell for shell, inner in enumerate(counts.cumsum(0).tolist())
            if refit_bytes(inner, n_comp) + refit_bytes(total - inner, 1) + total * n_comp * 16 <= max_bytes]
    return fits[-1] if fits else None


@register_decoder("basis")
class StructuralBasis(VolumeDecoder):
    """``V(k; z) = V_0(k) + sum_j s_j(z) V_j(k)`` on a compact Hermitian voxel lattice.

    Parameters
    ----------
    box_size
        Training box ``D``.
    zdim
        Latent dimension; 0 for a homogeneous map (``V_0`` only).
    n_basis
        ``K``, the number of basis volumes (ignored when ``zdim == 0``).
    layers, width
        Hidden residual layers and width of the mixing MLP ``s(z)`` (``--dec-layers``,
        ``--dec-dim``).
    activation
        Activation of the mixing MLP.
    radius
        Largest frequency modelled, in index units (default ``D / 2``, Nyquist); lattice points
        within ``radius + sqrt(3)`` are stored so every trilinear corner of a point inside the
        ball exists.
    init_scale
        Standard deviation of the initial basis volumes (``V_0`` starts at 0).
    voxel_lr_scale
        Learning rate of ``V_0`` relative to ``--lr``.
    basis_lr_scale
        Learning rate of ``V_1 .. V_K`` relative to ``V_0``'s (see the module docstring).
    power_prior
        Strength ``r`` of the Fourier-power prior (0: off); see the module docstring.
    solvent_mask_radius_fraction, mask_every
        Real-space solvent mask of all volumes every ``mask_every`` steps (``None``: off).
    sparse_grad
        Sparse gradients of the voxel tables, updated by ``RowSparseAdam`` (lazy Adam), instead
        of dense ones and the run's fused Adam.
    max_elements
        Bound on the floats gathered at once when gradients flow to the slice coordinates
        (pose refinement).
    """

    domain = "fourier"

    def __init__(
        self,
        *,
        box_size: int,
        zdim: int = 0,
        n_basis: int = 16,
        layers: int = 3,
        width: int = 256,
        activation: str = "gelu",
        radius: float | None = None,
        init_scale: float = 1e-6,
        voxel_lr_scale: float = 10.0,
        basis_lr_scale: float = 0.1,
        power_prior: float = 0.0,
        solvent_mask_radius_fraction: float | None = None,
        mask_every: int = 50,
        sparse_grad: bool = False,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        refit_mask: bool = True,
        refit_mask_shell: float = 8.0,
        refit_mask_threshold: float = 0.2,
        refit_corrections: int = 2,
    ):
        super().__init__(box_size=box_size, zdim=zdim)
        radius = self.box_size / 2 if radius is None else float(radius)
        self._check_options(n_basis=n_basis, radius=radius, solvent_mask_radius_fraction=solvent_mask_radius_fraction,
                            voxel_lr_scale=voxel_lr_scale, basis_lr_scale=basis_lr_scale, power_prior=power_prior,
                            refit_mask_threshold=refit_mask_threshold, refit_corrections=refit_corrections)
        self.n_basis = int(n_basis) if self.zdim > 0 else 0
        self.config.update(
            n_basis=int(n_basis),
            layers=int(layers),
            width=int(width),
            activation=activation,
            radius=float(radius),
            init_scale=float(init_scale),
            voxel_lr_scale=float(voxel_lr_scale),
            basis_lr_scale=float(basis_lr_scale),
            power_prior=float(power_prior),
            solvent_mask_radius_fraction=None if solvent_mask_radius_fraction is None
            else float(solvent_mask_radius_fraction),
            mask_every=int(mask_every),
            sparse_grad=bool(sparse_grad),
            max_elements=int(max_elements),
            refit_mask=bool(refit_mask),
            refit_mask_shell=float(refit_mask_shell),
            refit_mask_threshold=float(refit_mask_threshold),
            refit_corrections=int(refit_corrections),
        )
        self.radius = float(radius)
        self.max_elements = int(max_elements)
        self.lattice = HermitianLattice(self.radius + _CORNER_REACH)
        n_vox = self.lattice.n_vox
        self.mean_real = nn.Parameter(torch.zeros(n_vox, 1))
        self.mean_imag = nn.Parameter(torch.zeros(n_vox, 1))
        if self.n_basis:
            self.basis_real = nn.Parameter(torch.randn(n_vox, self.n_basis) * float(init_scale))
            self.basis_imag = nn.Parameter(torch.randn(n_vox, self.n_basis) * float(init_scale))
            self.mlp = ResidualMLP(self.zdim, self.n_basis, layers=int(layers), width=int(width),
                                   activation=activation)
        else:
            self.basis_real = self.basis_imag = None
            self.mlp = None
        # per-shell amplitude (index units, shell = round |c|) and mean CTF^2, set from the data
        self.register_buffer("shell_amplitude", torch.ones(self.lattice.L + 2))
        self.register_buffer("mean_ctf_squared", torch.tensor(0.5))
        # running statistics that standardise s(z) (see mixing_weights)
        self.register_buffer("s_mean", torch.zeros(self.n_basis))
        self.register_buffer("s_var", torch.ones(self.n_basis))
        self.register_buffer("s_stats_started", torch.tensor(False))
        shells = self.lattice.coords.double().norm(dim=-1).round().long()
        self.register_buffer("_voxel_shell", shells, persistent=False)
        self.register_buffer("_table", self.lattice.table, persistent=False)
        self.register_buffer("_coords", self.lattice.coords, persistent=False)
        self._origin_index = int((self.lattice.coords == 0).all(-1).nonzero()[0, 0])
        self._eval_cache: dict[tuple[int, str], tuple] = {}
        self._amplitude_cache: tuple | None = None
        self._corner_amplitude_cache: tuple | None = None
        self._steps = 0

    def _check_options(self, *, n_basis: int, radius: float, solvent_mask_radius_fraction: float | None,
                       voxel_lr_scale: float, basis_lr_scale: float, power_prior: float,
                       refit_mask_threshold: float = 0.2, refit_corrections: int = 2) -> None:
        """One ValueError sentence for an option out of range."""
        if self.zdim < 0:
            raise ValueError(f"zdim must be >= 0, got {self.zdim}")
        if self.zdim > 0 and int(n_basis) < 1:
            raise ValueError(f"n_basis must be at least 1, got {n_basis}")
        if not radius > 0:
            raise ValueError(f"radius must be positive, got {radius}")
        if solvent_mask_radius_fraction is not None and not 0 < float(solvent_mask_radius_fraction) <= 0.5:
            raise ValueError(f"solvent_mask_radius_fraction must be in (0, 0.5], got {solvent_mask_radius_fraction}")
        for name, value in (("voxel_lr_scale", voxel_lr_scale), ("basis_lr_scale", basis_lr_scale)):
            if not float(value) > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not float(power_prior) >= 0:
            raise ValueError(f"power_prior must not be negative, got {power_prior}")
        if not 0 < float(refit_mask_threshold) <= 1 or int(refit_corrections) < 0:
            raise ValueError("refit_mask_threshold must be in (0, 1] and refit_corrections >= 0, got "
                             f"{refit_mask_threshold} and {refit_corrections}")

    # ------------------------------------------------------------------------------------------
    # training hooks (declared on VolumeDecoder; called by train/model.py and train/trainer.py)
    # ------------------------------------------------------------------------------------------
    wants_data_spectrum = True
    wants_warm_start = True
    wants_refit = True

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups: ``V_0`` at ``voxel_lr_scale``, the basis at ``voxel_lr_scale *
        basis_lr_scale`` (both sparse when ``sparse_grad``), the mixing MLP at ``lr_scale`` 1."""
        c = self.config
        groups: list[dict[str, Any]] = [
            {"params": [self.mean_real, self.mean_imag], "lr_scale": c["voxel_lr_scale"], "sparse": c["sparse_grad"]},
        ]
        if self.n_basis:
            groups.append({"params": [self.basis_real, self.basis_imag],
                           "lr_scale": c["voxel_lr_scale"] * c["basis_lr_scale"], "sparse": c["sparse_grad"]})
            groups.append({"params": list(self.mlp.parameters()), "lr_scale": 1.0})
        return groups

    @torch.no_grad()
    def set_data_spectrum(self, shell_rms: torch.Tensor, *, mean_ctf_squared: float | None = None) -> None:
        """Precondition the voxels by the data's per-shell RMS amplitude.

        ``shell_rms`` is ``(n,)`` for the 2-D shells ``0 .. n-1`` (index units, ``round |k|``) in
        the units of the training data (seed 003 eq. 5's ``sigma_bar``,
        :func:`cryoscape.train.noise.estimate_noise_spectrum`).  Shells beyond ``n - 1`` take the
        last value; non-finite or non-positive entries take the nearest valid one.  Called by the
        training loop before the first step of a new run (the amplitude is in the state dict, so
        a resumed run keeps it).  The represented map is scaled by the change, so call it before
        training, not after.  ``mean_ctf_squared`` (the data's mean ``c^2``) sets the scale of the
        power prior.
        """
        if mean_ctf_squared is not None and math.isfinite(mean_ctf_squared) and mean_ctf_squared > 0:
            self.mean_ctf_squared.fill_(float(mean_ctf_squared))
        a = torch.as_tensor(shell_rms, dtype=torch.float64).flatten().cpu()
        good = torch.isfinite(a) & (a > 0)
        if not bool(good.any()):
            return
        idx = torch.arange(a.numel())
        good_idx = idx[good]
        a = a[good_idx[(idx[:, None] - good_idx[None, :]).abs().argmin(dim=1)]]
        n = self.shell_amplitude.numel()
        full = torch.cat([a, a[-1:].expand(max(0, n - a.numel()))])[:n]
        self.shell_amplitude.copy_(full.to(self.shell_amplitude))

    @torch.no_grad()
    def warm_start(self, slices) -> dict[str, Any]:
        """Set ``V_0`` to the Wiener-filtered backprojection of the data (known poses).

        ``slices`` yields ``(coords, target, ctf, pixel_weights)``: slice frequencies ``(B, P, 3)``
        (cycles per pixel), the observed coefficients ``(B, P)`` complex in the loss's units, the
        CTF ``(B, P)`` (``None``: 1) and the likelihood's pixel weights ``(P,)``, i.e. exactly what
        the loss compares ``c V`` with.  Images alternate between two half-sets; their half-map FSC
        per shell gives the SSNR, and the map is ``sum w c X / (sum w c^2 + <W>_shell /
        SSNR_shell)`` on the compact lattice (the gridding estimate, cf. :mod:`cryoscape.reconstruct.
        backproject`), stored divided by the per-shell amplitude, which becomes this map's
        per-shell RMS (the signal's amplitude; the basis is redrawn at ``init_scale`` in those
        units).  See "Warm start" in the module docstring; a training-loop hook, called before the
        first epoch of a new run (train/warm_start.py).

        Returns ``{"n_images", "fsc_half"}`` (the per-shell half-map FSC, for the log).
        """
        n_vox = self.lattice.n_vox
        device = self._table.device
        num = torch.zeros(2, n_vox, dtype=torch.complex128, device=device)
        wsum = torch.zeros(2, n_vox, dtype=torch.float64, device=device)
        lattice = self._lattice()
        n_images = 0
        for coords, target, ctf, pixel_weights in slices:
            c = torch.ones(target.shape, device=device) if ctf is None else ctf.float()
            pw = pixel_weights.to(device, torch.float32)
            points = coords.float() * self.box_size
            values = target.to(torch.complex64) * (c * pw)
            for h in (0, 1):
                sel = slice((h - n_images) % 2, None, 2)  # image n_images + b goes to half (n_images + b) % 2
                backproject_to_lattice(lattice, points[sel], values[sel], c[sel].square() * pw,
                                       numerator=num[h], weight_sum=wsum[h])
            n_images += int(target.shape[0])
        if n_images < 2:
            raise ValueError("the warm start needs at least two images")
        shells = self._voxel_shell
        n_shells = int(shells.max()) + 1

        def per_shell(x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(n_shells, dtype=torch.float64, device=device).index_add_(0, shells, x)

        halves = num / wsum.clamp_min(1e-30)
        halves = torch.where(wsum > 0, halves, torch.zeros_like(halves))
        # the full map has twice each half's data: SSNR = 2 FSC / (1 - FSC)
        fsc, ssnr = ssnr_from_halves(halves[0].unsqueeze(-1), halves[1].unsqueeze(-1), shells, n_shells)
        fsc, ssnr = fsc[:, 0], ssnr[:, 0]
        total_w, total_n = wsum.sum(0), num.sum(0)
        counts = per_shell(torch.ones_like(total_w)).clamp_min(1)
        mean_w = per_shell(total_w) / counts
        reg = (mean_w / ssnr)[shells]
        volume = total_n / (total_w + reg).clamp_min(1e-30)
        volume[self._origin_index] = volume[self._origin_index].real.clone()
        # precondition by the signal: the per-shell RMS of this (Wiener-filtered) map replaces the
        # data's RMS of set_data_spectrum, so Adam's steps of about lr x amplitude stay small in
        # shells the data barely determine (measured in the module docstring)
        rms = (per_shell(volume.abs().square()) / counts).sqrt()
        last = min(int(math.floor(self.radius)), n_shells - 1)
        rms[last + 1:] = rms[last]
        self.set_data_spectrum(rms.clamp_min(1e-3 * float(rms[1:].max()) if n_shells > 1 else 1e-30))
        if self.basis_real is not None:  # fresh basis at init_scale in the new units
            self.basis_real.normal_().mul_(self.config["init_scale"])
            self.basis_imag.normal_().mul_(self.config["init_scale"])
        amp = self._voxel_amplitude().double()
        self.mean_real[:, 0] = (volume.real / amp).to(self.mean_real.dtype)
        self.mean_imag[:, 0] = (volume.imag / amp).to(self.mean_imag.dtype)
        return {"n_images": n_images, "fsc_half": fsc.float().cpu()}

    @torch.no_grad()
    def refit(self, slices, latents: torch.Tensor | None, *, final: bool = True) -> dict[str, Any]:
        """Replace ``V_0 .. V_K`` by their regularised least-squares fit at fixed latents.

        The mixing weights ``s(z)`` of every image stay as trained; in their principal, whitened
        axes ``u`` the maps are solved per voxel with a gold-standard Wiener prior per component
        and shell (:mod:`cryoscape.models.subspace_fit`), then turned back into ``V_0`` and the
        ``K`` basis volumes so that ``V_0 + s(z) . V`` is the fitted map for every ``z``; then
        ``refit_corrections`` passes over the data (only in the ``final`` refit, the ones between
        epochs serve the latents, and only when the data resolve the mean map to Nyquist) correct
        the gridding approximation with the residuals of the exact (trilinear) model.  The
        per-shell amplitude (the preconditioning) is kept.  ``slices`` and ``latents`` as in
        :meth:`VolumeDecoder.refit`.

        Its per-voxel sums are held within 8 GiB or a third of the machine's memory
        (:func:`refit_budget_bytes`, :func:`refit_bands`): where all the components
        would not fit (D >= ~190-230 by the components kept) they are solved up to the outermost
        shell that fits and the mean map alone beyond it, the components there set to zero.
        Returns ``{"n_images", "n_components", "component_shell", "fsc_half", "corrections"}``
        (``component_shell``: that shell, ``None`` when the components reach the last shell; the
        half-set FSC per shell and component, zero for the components beyond it; the correction
        passes made), or ``{"skipped": reason}`` when not even the lowest shell's components fit
        beside the mean map's sums (D >= ~440 with 16 components; the trained maps stay).
        """
        was_training = self.training
        self.eval()
        try:
            return self._refit(slices, latents, final=final)
        finally:
            self.train(was_training)

    def _refit(self, slices, latents: torch.Tensor | None, *, final: bool) -> dict[str, Any]:
        mean = white = None
        if self.mlp is not None:
            s_all = self.mixing_weights(torch.as_tensor(latents, dtype=torch.float32, device=self._table.device))
            mean, white = whitening(s_all)
        n_comp = 1 + (0 if white is None else white.shape[1])
        bands = self._refit_bands(n_comp)
        if bands is None:
            return {"skipped": f"not even the lowest shell's components fit in {refit_budget_bytes() / 2**30:.1f} GiB "
                               f"of per-voxel sums ({self.lattice.n_vox} voxels, the mean map and {n_comp - 1} "
                               f"component{'' if n_comp == 2 else 's'})"}
        sums = self._refit_pass(slices(), [band.sums(with_gram=True) for band in bands], mean, white, residual=False)
        fits = [band.solve(part) for band, part in zip(bands, sums)]
        fsc = torch.zeros(int(self._voxel_shell.max()) + 1, n_comp, dtype=torch.float64)
        for band, (_, band_fsc, _) in zip(bands, fits):
            fsc[band.shells, : band.n_comp] = band_fsc[band.shells].cpu()
        corrections = self.config["refit_corrections"] if final and self._resolved_to_nyquist(fsc) else 0
        x = [fit[0] for fit in fits]
        for _ in range(corrections):
            self._store_subspace(self._assemble(bands, x, n_comp), mean, white)
            residuals = self._refit_pass(slices(), [band.sums(with_gram=False) for band in bands], mean, white,
                                         residual=True)
            x = [correct_subspace(xb, s, r, fit[2], component_mask=band.mask)
                 for band, xb, s, r, fit in zip(bands, x, sums, residuals, fits)]
        self._store_subspace(self._assemble(bands, x, n_comp), mean, white)
        return {"n_images": sums[0].n_images, "n_components": n_comp - 1,
                "component_shell": bands[0].last_shell if len(bands) > 1 else None,
                "fsc_half": fsc.float(), "corrections": corrections}

    def _refit_bands(self, n_comp: int) -> list[_RefitBand] | None:
        """The voxels solved with all ``n_comp`` columns and, when they do not all fit in the memory
        budget, the outer ones solved for the mean map alone (:func:`refit_bands`)."""
        shells = self._voxel_shell
        counts = torch.bincount(shells.cpu())
        last = refit_bands(counts, n_comp, refit_budget_bytes())
        if last is None:
            return None
        masked = self.config["refit_mask"] and n_comp > 1
        if last >= len(counts) - 1:
            return [_RefitBand(self, None, n_comp, _ComponentMask(self) if masked else None)]
        inner = (shells <= last).nonzero().squeeze(-1)
        outer = (shells > last).nonzero().squeeze(-1)
        return [_RefitBand(self, inner, n_comp, _ComponentMask(self, inner) if masked else None),
                _RefitBand(self, outer, 1, None)]

    def _assemble(self, bands: list[_RefitBand], x: list[torch.Tensor], n_comp: int) -> torch.Tensor:
        """The bands' solutions as one ``(n_vox, n_comp)`` table (zero where a band solves fewer columns)."""
        if len(bands) == 1:
            return x[0]
        full = torch.zeros(self.lattice.n_vox, n_comp, dtype=x[0].dtype, device=x[0].device)
        for band, xb in zip(bands, x):
            full[band.voxels, : band.n_comp] = xb
        return full

    def _resolved_to_nyquist(self, fsc: torch.Tensor) -> bool:
        """Whether the mean map's half-set FSC is >= 0.5 at the outermost modelled shell: only then
        (high SNR) does the gridding blur, not the noise, limit the refit.  At SNR 0.1 the
        correction passes undo the blur's damping of the noise too (README: lower per-image AUC)."""
        last = min(int(math.floor(self.radius)), fsc.shape[0] - 1)
        return bool(fsc[last, 0] >= 0.5)

    def _refit_pass(self, batches, sums: list[SubspaceSums], mean, white, *, residual: bool) -> list[SubspaceSums]:
        """Accumulate one pass of ``batches`` into every one of ``sums`` (the bands of
        :meth:`_refit_bands`): the data (``residual=False``) or the residuals of the current maps
        under the exact forward model (``residual=True``)."""
        lattice = self._lattice()
        n_comp = max(part.n_comp for part in sums)
        for coords, target, ctf, pixel_weights, z in batches:
            c = torch.ones(target.shape, device=target.device) if ctf is None else ctf.float()
            pw = pixel_weights.to(target.device, torch.float32)
            index, imag_sign, w = corner_codes_and_weights(lattice, coords.double() * self.box_size)
            a = torch.ones(target.shape[0], n_comp, dtype=torch.float64, device=target.device)
            if white is not None:
                a[:, 1:] = (self.mixing_weights(z).double() - mean) @ white
            data = target.to(torch.complex64)
            if residual:
                data = data - c * self(coords, z).to(torch.complex64)
            for part in sums:
                part.add(index, w, imag_sign, data * (c * pw), c.square() * pw, a)
        return sums

    def _store_subspace(self, x: torch.Tensor, mean: torch.Tensor | None, white: torch.Tensor | None) -> None:
        """Write a solution ``x (n_vox, K'+1)`` in whitened components into ``V_0`` and the basis."""
        amp = self._voxel_amplitude().double().unsqueeze(-1)
        mean_map = x[:, 0].clone()
        if white is not None:
            basis = x[:, 1:] @ white.T.to(x.dtype)  # (n_vox, K): s . V = u . x[:, 1:] + const
            mean_map = mean_map - basis @ mean.to(x.dtype)
            self.basis_real.copy_(basis.real / amp)
            self.basis_imag.copy_(basis.imag / amp)
        mean_map[self._origin_index] = mean_map[self._origin_index].real.clone()
        self.mean_real.copy_(mean_map.real.unsqueeze(-1) / amp)
        self.mean_imag.copy_(mean_map.imag.unsqueeze(-1) / amp)

    @torch.no_grad()
    def latent_errors(self, coords: torch.Tensor, target: torch.Tensor, ctf: torch.Tensor | None,
                      pixel_weights: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor | None:
        """``(B, C)`` squared errors of a posed batch at ``C`` candidate latents (the hook of
        :meth:`VolumeDecoder.latent_errors`).  The map is linear in the mixing weights, so the
        candidates cost one slice of each of the ``K + 1`` volumes per image and a ``K x K``
        quadratic form each: ``|r_0 - A s|^2 = |r_0|^2 - 2 Re(A^H r_0) . s + s . Re(A^H A) s`` with
        ``r_0`` the residual of ``V_0`` and ``A`` the CTF-weighted slices of ``V_1 .. V_K``
        (weighted by ``pixel_weights``).  ``None`` when homogeneous."""
        if self.mlp is None:
            return None
        B = coords.shape[0]
        dtype = self.mean_real.dtype
        with torch.autocast(device_type=coords.device.type, enabled=False):
            index, imag_sign, w = self._slice_corners(coords, dtype)

            def sliced(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
                return sparse_slice(re.contiguous(), im.contiguous(), None, None, None, index, w, imag_sign,
                                    max_elements=self.max_elements).to(torch.complex128)

            c = 1.0 if ctf is None else ctf.reshape(B, -1).to(torch.float64)
            pw = pixel_weights.to(target.device, torch.float64)
            r0 = target.reshape(B, -1).to(torch.complex128) - c * sliced(self.mean_real, self.mean_imag)
            A = torch.stack([c * sliced(self.basis_real[:, k:k + 1], self.basis_imag[:, k:k + 1])
                             for k in range(self.n_basis)], dim=-1)  # (B, P, K)
            weighted = A.conj() * pw[None, :, None]
            h = torch.einsum("bpk,bp->bk", weighted, r0).real
            gram = torch.einsum("bpk,bpl->bkl", weighted, A).real
            s = self.mixing_weights(candidates.to(self._table.device)).double()  # (C, K)
            e0 = (pw * r0.abs().square()).sum(-1)
            return e0[:, None] - 2.0 * h @ s.T + torch.einsum("ck,bkl,cl->bc", s, gram, s)

    def regularization_loss(self, *, n_images: int) -> torch.Tensor | None:
        """The Fourier-power (ridge) prior per image, ``None`` when ``power_prior`` is 0.

        ``r <c^2> / n_vox * sum_j sum_k |V_j(k)|^2`` with ``r = power_prior`` and ``<c^2>`` the
        data's mean CTF^2: added to the batch mean of the per-pixel squared error, this is the MAP
        objective whose solution for a homogeneous map is backprojection's Wiener estimate
        ``sum c X / (sum c^2 + r <W>)`` (:mod:`cryoscape.reconstruct.backproject`, ``<W>`` the
        mean accumulated CTF^2 weight of a voxel), i.e. ``r`` means what backprojection's
        regulariser means.  (Per image the loss weighs a pixel by ``1 / n_circle``, a stored voxel
        stands for two grid voxels, and ``<W> = N n_circle <c^2> / (2 n_vox)``.)  ``n_images`` is
        not needed: both terms are per-image averages.  The basis volumes are those that ``s``
        (standardised, unit variance over the data) multiplies, so each gets the same prior.
        """
        lam = self.config["power_prior"]
        if not lam:
            return None
        a2 = self._voxel_amplitude().square().unsqueeze(-1)
        total = sum((t.square() * a2).sum() for t in self._tables())
        return total * (lam * self.mean_ctf_squared / self.lattice.n_vox)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Every ``mask_every`` steps, apply the solvent mask (when enabled)."""
        if self.config["solvent_mask_radius_fraction"] is None:
            return
        self._steps += 1
        if self._steps % max(1, self.config["mask_every"]) == 0:
            self.apply_solvent_mask()

    @torch.no_grad()
    def apply_solvent_mask(self) -> None:
        """Multiply every volume by the soft sphere of ``solvent_mask_radius_fraction`` in real space."""
        from cryoscape.fourier.masks import soft_spherical_mask_3d

        frac = self.config["solvent_mask_radius_fraction"]
        if frac is None:
            return
        L = self.lattice.L
        # The odd cube holding every stored voxel: its inverse FFT samples the same D-periodic map
        # on n points per D pixels, so the sphere's radius is frac * n of those points.
        n = 2 * L + 1
        mask = soft_spherical_mask_3d(n, frac * n, edge_width_pixel=0.05 * n, device=self._table.device,
                                      dtype=torch.float64)
        amp = self._voxel_amplitude().double()
        codes = self._cube_codes(L)
        c = self._coords
        for re, im in ((self.mean_real, self.mean_imag), (self.basis_real, self.basis_imag)):
            if re is None:
                continue
            for j in range(re.shape[1]):
                values = torch.complex(re[:, j].double(), im[:, j].double()) * amp
                cube = self._values_from_codes(values, codes)
                vol = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(cube))).real * mask
                back = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(vol)))
                back = back[c[:, 2] + L, c[:, 1] + L, c[:, 0] + L] / amp
                re[:, j] = back.real.to(re.dtype)
                im[:, j] = back.imag.to(im.dtype)

    def _slice_corners(self, coords: torch.Tensor, dtype: torch.dtype):
        """``(index, imag_sign, weights)`` of the trilinear corners of slice points ``coords (B, ..., 3)``
        (cycles per pixel) on the stored lattice, with the per-voxel amplitude folded into the weights."""
        points = coords.reshape(coords.shape[0], -1, 3).to(dtype) * self.box_size
        return corner_codes_and_weights(self._lattice(), points, corner_factors=self._corner_amplitude(dtype))

    def _lattice_to_real(self, values: torch.Tensor) -> torch.Tensor:
        """``(C, n, n, n)`` real maps of lattice values ``(n_vox, C)`` on the odd cube ``n = 2L + 1``
        that holds every stored voxel (the same ``D``-periodic maps sampled on ``n`` points per
        ``D`` pixels; array ``[z, y, x]``, origin at the centre).  One component at a time, so that
        one complex cube is held beside the real results (at D = 128 all 16 at once held ~3 GB)."""
        codes = self._cube_codes(self.lattice.L)
        return torch.stack([torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(
            self._values_from_codes(values[:, j], codes)))).real for j in range(values.shape[1])])

    def _real_to_lattice(self, maps: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`_lattice_to_real`: ``(C, n, n, n)`` -> ``(n_vox, C)`` complex."""
        L, c = self.lattice.L, self._coords
        columns = []
        for m in maps:  # one component at a time, as _lattice_to_real
            spectrum = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(m)))
            columns.append(spectrum[c[:, 2] + L, c[:, 1] + L, c[:, 0] + L])
        return torch.stack(columns, -1)

    # ------------------------------------------------------------------------------------------
    def _tables(self) -> list[torch.Tensor]:
        return [t for t in (self.mean_real, self.mean_imag, self.basis_real, self.basis_imag) if t is not None]

    def _voxel_amplitude(self) -> torch.Tensor:
        """``(n_vox,)`` amplitude of every voxel, cached until ``shell_amplitude`` changes."""
        a = self.shell_amplitude
        key = (a.device, a.dtype, a._version, id(a))
        if self._amplitude_cache is None or self._amplitude_cache[0] != key:
            self._amplitude_cache = (key, a[self._voxel_shell.clamp(max=a.numel() - 1)])
        return self._amplitude_cache[1]

    def _corner_amplitude(self, dtype: torch.dtype) -> torch.Tensor:
        """The lattice's cube table of validity times voxel amplitude and the imaginary sign
        (``corner_factors`` of :func:`corner_codes_and_weights`), cached until the amplitude changes."""
        a = self.shell_amplitude
        key = (a.device, a.dtype, a._version, id(a), dtype, id(self._table))
        cached = self._corner_amplitude_cache
        if cached is None or cached[0] != key:
            index, factors = self._lattice().lookups()
            scaled = factors.clone()
            scaled[:, 0] *= self._voxel_amplitude().float().index_select(0, index)
            cached = (key, scaled.to(dtype))
            self._corner_amplitude_cache = cached
        return cached[1]

    def _lattice(self) -> HermitianLattice:
        self.lattice.table = self._table  # follow .to(device)
        self.lattice.coords = self._coords
        return self.lattice

    def _cube_codes(self, L: int) -> torch.Tensor:
        """Codes of the centred cube ``[-L, L]^3`` (array ``[z, y, x]``)."""
        r = torch.arange(-L, L + 1, device=self._table.device)
        zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
        return self._lattice().codes_at(torch.stack([xx, yy, zz], dim=-1))

    @staticmethod
    def _values_from_codes(values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        index, sign, valid = split_codes(codes, values.real.dtype)
        v = values[index]
        return torch.complex(v.real * valid, v.imag * (sign * valid))


    @torch.no_grad()
    def _update_s_stats(self, s: torch.Tensor) -> None:
        """Running mean and variance of the raw mixing weights over the training batches
        (exponential averages, weight ``_S_STATS_MOMENTUM`` per batch; the first batch sets them)."""
        s = s.float()
        if self.process_sum is not None:  # data-parallel: the statistics of the whole batch
            K = s.shape[1]
            sums = self.process_sum(torch.cat([s.new_tensor([s.shape[0]]), s.sum(0), s.square().sum(0)]))
            mean = sums[1:1 + K] / sums[0]
            var = (sums[1 + K:] / sums[0] - mean.square()).clamp_min(0) if float(sums[0]) > 1 else None
        else:
            mean = s.mean(0)
            var = s.var(0, unbiased=False) if s.shape[0] > 1 else None
        if not bool(self.s_stats_started):
            self.s_mean.copy_(mean)
            if var is not None:
                self.s_var.copy_(var.clamp_min(1e-12))
            self.s_stats_started.fill_(True)
            return
        self.s_mean.lerp_(mean, _S_STATS_MOMENTUM)
        if var is not None:
            self.s_var.lerp_(var, _S_STATS_MOMENTUM)

    def mixing_weights(self, z: torch.Tensor | None, batch: int = 1) -> torch.Tensor | None:
        """``(B, K)`` standardised weights ``s(z)`` of ``V_1 .. V_K`` (``None`` when homogeneous).

        ``s = (MLP(z) - running mean) / running std``; in training mode (with gradients on) each
        call first updates the running statistics with the batch.  (Measured alternatives: the
        batch's own statistics, as batch normalisation, gave cleaner maps after 2 epochs, 0.68
        against 0.66 per-image AUC, but learnt the hinge of tests/train/test_basis_training.py far
        more slowly, |rho| 0.30 against 0.85 after 10-12 epochs; centring alone let ``s`` grow,
        0.60 and 0.19.)
        """
        if self.mlp is None:
            return None
        dtype = self.mean_real.dtype
        s = self.mlp(z.to(self.mlp.input.weight.dtype)).to(dtype)
        if self.training and torch.is_grad_enabled():
            self._update_s_stats(s.detach())
        s = (s - self.s_mean.to(dtype)) * self.s_var.to(dtype).clamp_min(1e-12).rsqrt()
        if s.shape[0] == 1 and batch > 1:
            s = s.expand(batch, -1)
        return s

    # ------------------------------------------------------------------------------------------
    def forward(self, coords: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Values at frequencies ``coords (B, P, 3)`` (cycles per training pixel) for latents ``z``.

        ``z`` is ``(B, zdim)`` (or ``(1, zdim)``, broadcast), ``None`` when ``zdim == 0``.
        Returns ``(B, P)`` complex64 (complex128 for float64 parameters); extra point axes
        ``(B, ..., 3)`` are allowed.  Differentiable in the voxels, the MLP, ``z`` and ``coords``
        (so pose refinement works).  Runs outside autocast: gathers gain nothing from bfloat16.
        """
        if coords.shape[-1] != 3 or coords.dim() < 2:
            raise ValueError(f"coords must have shape (B, P, 3), got {tuple(coords.shape)}")
        B = coords.shape[0]
        point_shape = coords.shape[1:-1]
        z = self.check_latent(z, B)
        dtype = self.mean_real.dtype
        with torch.autocast(device_type=coords.device.type, enabled=False):
            s = self.mixing_weights(z, B)
            index, imag_sign, w = self._slice_corners(coords, dtype)
            out = sparse_slice(
                self.mean_real, self.mean_imag, self.basis_real, self.basis_imag, s, index, w, imag_sign,
                sparse_grad=self.config["sparse_grad"], max_elements=self.max_elements,
            )
        return out.reshape(B, *point_shape)

    # ------------------------------------------------------------------------------------------
    def _eval_plan(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict]:
        """How to fill the ``irfftn`` half-grid ``(n, n, n//2 + 1)`` (origin first on every axis)
        with one gather: cached for the last box and device.

        Returns ``(index, positions, alias, buffers)``: ``index`` points every half-grid point into the
        table ``[v, -v, conj v, -conj v, 0]`` of :meth:`eval_volume` (``4 n_vox`` is the zero:
        beyond the modelled shells).  The sign undoes the origin-first layout of even boxes
        (``fftshift`` of the output is a factor ``(-1)^(kx+ky+kz)`` on the spectrum); odd boxes
        are shifted after the transform.  For even ``n``, ``positions`` and ``alias`` (indices into
        the same table) list the points with a coordinate at Nyquist: there ``Re(ifftn)`` of the
        full centred grid (the neural field's convention) sees the mean of the point with every
        Nyquist coordinate at ``-n/2`` and the one with all at ``+n/2``.  ``buffers`` holds the
        reusable table and half-grid of :meth:`eval_volume`.
        """
        key = (n, str(self._table.device))
        if key in self._eval_cache:
            return self._eval_cache[key]
        device = self._table.device
        lattice = self._lattice()
        n_vox = lattice.n_vox
        i = torch.arange(n, device=device)
        f = torch.where(i < n - n // 2, i, i - n)  # FFT order: 0, 1, ..., -2, -1
        zz, yy, xx = torch.meshgrid(f, f, torch.arange(n // 2 + 1, device=device), indexing="ij")
        pts = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
        keep = pts.double().norm(dim=-1).round() <= self.radius
        even = n % 2 == 0
        parity = (pts.sum(-1) % 2) if even else torch.zeros_like(pts[:, 0])

        def table_index(points: torch.Tensor, par: torch.Tensor) -> torch.Tensor:
            code = lattice.codes_at(points)
            voxel = code.clamp(min=0) >> 2
            conj = (code & 3) == 1
            out = (2 * conj.long() + par) * n_vox + voxel
            return torch.where(code >= 0, out, torch.full_like(out, 4 * n_vox))

        positions = alias = None
        grid = pts
        if even:
            nyquist = pts.abs() == n // 2
            on = nyquist.any(-1) & keep
            grid = torch.where(nyquist, torch.full_like(pts, -(n // 2)), pts)
            positions = on.nonzero().squeeze(-1)
            flipped = torch.where(nyquist, -grid, grid)[positions]
            alias = table_index(flipped, parity[positions])
        index = torch.where(keep, table_index(grid, parity), torch.full_like(pts[:, 0], 4 * n_vox))
        self._eval_cache = {key: (index, positions, alias, {})}
        return self._eval_cache[key]

    @torch.no_grad()
    def lattice_values(self, z: torch.Tensor | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(n_vox,)`` complex coefficients of the map for one latent ``(zdim,)`` at the stored
        voxels (written into ``out``, a complex ``(n_vox,)`` tensor, when given)."""
        re, im = self.mean_real[:, 0], self.mean_imag[:, 0]
        dtype = re.dtype
        if out is None:
            out = torch.empty(re.shape[0], dtype=torch.complex128 if dtype == torch.float64 else torch.complex64,
                              device=re.device)
        parts = torch.view_as_real(out)
        amp = self._voxel_amplitude().to(dtype)
        if self.mlp is not None:
            z = self.check_latent(torch.as_tensor(z, device=re.device, dtype=torch.float32).reshape(1, -1), 1)
            s = self.mixing_weights(z, 1)[0]
            scratch = torch.empty_like(re)
            for k, (mean, basis) in enumerate(((re, self.basis_real), (im, self.basis_imag))):
                torch.addmv(mean, basis, s, out=scratch)  # contiguous output: the BLAS path
                torch.mul(scratch, amp, out=parts[:, k])
        else:
            self.check_latent(None if z is None else torch.as_tensor(z).reshape(1, -1), 1)
            torch.mul(re, amp, out=parts[:, 0])
            torch.mul(im, amp, out=parts[:, 1])
        parts[self._origin_index, 1] = 0  # F(0) is real
        return out

    @torch.no_grad()
    def eval_volume(self, z: torch.Tensor | None = None, *, box_size: int | None = None) -> torch.Tensor:
        """Real-space map ``(n, n, n)`` float32 ``[z, y, x]`` for one latent (scale: module docstring).

        One weighted sum of the basis, one gather into the ``irfftn`` half-grid (:meth:`_eval_plan`),
        one inverse real FFT; equal to ``Re(ifft3_center)`` of the full centred grid of lattice
        values.  The table and half-grid buffers are kept between calls (cached with the plan):
        allocating tens of MB afresh for every map costs more than the arithmetic.
        """
        n = int(box_size) if box_size is not None else self.box_size
        if n < 1:
            raise ValueError(f"box_size must be positive, got {box_size}")
        index, positions, alias, buffers = self._eval_plan(n)
        n_vox = self.lattice.n_vox
        ctype = torch.complex128 if self.mean_real.dtype == torch.float64 else torch.complex64
        if buffers.get("table") is None or buffers["table"].dtype != ctype:
            buffers["table"] = torch.zeros(4 * n_vox + 1, dtype=ctype, device=index.device)
            buffers["half"] = torch.empty(index.shape[0], dtype=ctype, device=index.device)
        table, half = buffers["table"], buffers["half"]
        values = self.lattice_values(z, out=table[:n_vox])
        torch.neg(values, out=table[n_vox : 2 * n_vox])
        torch.view_as_real(table[2 * n_vox : 3 * n_vox]).copy_(torch.view_as_real(values.conj().resolve_conj()))
        torch.neg(table[2 * n_vox : 3 * n_vox], out=table[3 * n_vox : 4 * n_vox])
        torch.index_select(table, 0, index, out=half)
        if positions is not None and positions.numel():
            half[positions] = 0.5 * (half[positions] + table.index_select(0, alias))
        volume = torch.fft.irfftn(half.view(n, n, n // 2 + 1), s=(n, n, n))
        if n % 2:
            volume = torch.fft.fftshift(volume)
        if n != self.box_size:
            volume = volume * (n / self.box_size) ** 3
        return volume.to(torch.float32)

    def extra_repr(self) -> str:
        c = self.config
        return (f"zdim={self.zdim}, K={self.n_basis}, voxels={self.lattice.n_vox} (radius {self.radius:g}), "
                f"mlp {c['width']}x{c['layers']}, sparse_grad={c['sparse_grad']}")


class _ComponentMask:
    """Soft real-space mask of the region where a refit's components vary (``solve_subspace``'s
    ``component_mask``): the voxel-wise RMS of the components ``1..K`` (whitened, so the RMS is the
    standard deviation of the map over the data), low-passed to ``refit_mask_shell`` and averaged
    over the two halves, thresholded at ``refit_mask_threshold`` of its maximum, dilated and
    softened (:func:`cryoscape.fourier.masks.threshold_mask`).  ``voxels``: the lattice indices of
    the rows of the solutions it is given (a band of a split refit; ``None``: all voxels).  Maps go
    to real space one component at a time, so it holds one cube per component at most once (at
    D = 256 all 16 at once held ~2.3 GB per copy)."""

    def __init__(self, decoder: StructuralBasis, voxels: torch.Tensor | None = None):
        self.decoder, self.voxels = decoder, voxels
        self.mask: torch.Tensor | None = None

    def _real(self, column: torch.Tensor) -> torch.Tensor:
        """One component's ``(n, n, n)`` real map from its rows ``(n_rows,)`` (zero off ``voxels``)."""
        if self.voxels is not None:
            whole = torch.zeros(self.decoder.lattice.n_vox, dtype=column.dtype, device=column.device)
            column = whole.index_copy_(0, self.voxels, column)
        return self.decoder._lattice_to_real(column.unsqueeze(-1))[0]

    def estimate(self, halves: list[torch.Tensor]) -> None:
        from cryoscape.fourier.masks import threshold_mask

        d = self.decoder
        shells = d._voxel_shell if self.voxels is None else d._voxel_shell[self.voxels]
        low = shells <= d.config["refit_mask_shell"]
        power = None
        for j in range(1, halves[0].shape[1]):
            real = self._real(sum(h[:, j] * low for h in halves) / len(halves))
            power = real.square() if power is None else power.add_(real.square())
        rms = power.sqrt()
        threshold = d.config["refit_mask_threshold"] * float(rms.max())
        self.mask = threshold_mask(rms, threshold=threshold, dilate_pixel=3.0, edge_width_pixel=3.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return x
        out = x.clone()
        for j in range(1, x.shape[1]):
            column = self.decoder._real_to_lattice((self._real(x[:, j]) * self.mask).unsqueeze(0))[:, 0]
            out[:, j] = column if self.voxels is None else column[self.voxels]
        return out


class _RefitBand:
    """Voxels a refit solves with ``n_comp`` columns: ``voxels`` (lattice indices; ``None``: all),
    the shells they make up and the component mask they are solved with."""

    def __init__(self, decoder: StructuralBasis, voxels: torch.Tensor | None, n_comp: int,
                 mask: _ComponentMask | None):
        self.decoder, self.voxels, self.n_comp, self.mask = decoder, voxels, n_comp, mask
        self.voxel_shells = decoder._voxel_shell if voxels is None else decoder._voxel_shell[voxels]
        self.shells = torch.unique(self.voxel_shells).cpu()

    @property
    def last_shell(self) -> int:
        return int(self.shells[-1])

    def sums(self, *, with_gram: bool) -> SubspaceSums:
        return SubspaceSums(self.decoder.lattice.n_vox, self.n_comp, device=self.decoder._table.device,
                            with_gram=with_gram, voxels=self.voxels)

    def solve(self, sums: SubspaceSums) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, fsc, tau)`` of :func:`~cryoscape.models.subspace_fit.solve_subspace` on this band."""
        return solve_subspace(sums, self.voxel_shells, component_mask=self.mask)
