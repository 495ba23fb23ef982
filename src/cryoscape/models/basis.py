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

Parameters and their scale
--------------------------
``voxels``: one real tensor ``(n_vox, 2, K+1)`` (real and imaginary parts; column 0 is ``V_0``,
initialised to 0; the basis columns to ``N(0, 1) * init_scale``, tiny, so that the subspace
grows from the data).  The represented coefficient is ``voxels * amplitude(|k|)``: a fixed
per-shell amplitude (a buffer, 1 until :meth:`StructuralBasis.set_data_spectrum` is called by the
training loop with the data's per-shell RMS amplitude, the ``sigma_bar`` of seed 003 eq. 5).
Map coefficients span orders of magnitude between low and high frequencies while Adam moves every
parameter by about its learning rate, so this preconditioning puts all shells on the same footing
(seed 003 sec. 4.3 does the same by dividing the data by ``sigma_bar``).  The voxels train with
their own learning rate ``voxel_lr_scale x --lr`` (:meth:`StructuralBasis.optimizer_param_groups`).

Optional regularisation (both off by default)
---------------------------------------------
``power_prior``: ``r`` of a Fourier-power (ridge) prior on the map coefficients, added to the loss
through :meth:`StructuralBasis.regularization_loss` and scaled so that ``r`` means what
backprojection's regulariser means (a homogeneous map converges to ``cryoscape backproject``'s
Wiener estimate with the same ``r``).  A voxel map fitted to noisy images without it over-fits:
on a 1000-image, SNR 1 test set the exact least-squares map scores 0.87 (sphere-masked FSC AUC to
the truth) against backprojection's 0.93, and 0.93 with ``r = 3``.  Needs ``sparse_grad=False``
(its gradient reaches every voxel).
``solvent_mask_radius_fraction``: every ``mask_every`` optimiser steps each basis map is
projected onto a soft sphere of that radius (fraction of the box; cosine edge of ``0.05 D``) in
real space (:meth:`StructuralBasis.after_optimizer_step`); the solvent around the particle is
then zero in every generated map.

Scale of :meth:`StructuralBasis.eval_volume`: the same as the neural field's (module docstring
of :mod:`cryoscape.models.neural_field`): lattice values are the centred unnormalised FFT of
the map, smaller boxes crop frequencies and multiply by ``(n / D)^3``.  Generating a map is one
``(n_vox, 2, K+1) x (K+1)`` product, one gather into the ``rfft`` half-grid and one inverse real
FFT.  Voxels beyond the Nyquist shell (``round(|k| D) > radius``) are left out of generated maps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cryoscape.models.base import VolumeDecoder, register_decoder
from cryoscape.models.layers import ResidualMLP
from cryoscape.models.sparse_slice import (
    DEFAULT_MAX_ELEMENTS,
    HermitianLattice,
    corner_codes_and_weights,
    sparse_slice,
    split_codes,
)

__all__ = ["StructuralBasis"]

#: Lattice points farther than this from the largest training frequency are never a corner.
_CORNER_REACH = math.sqrt(3.0) + 1e-3


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
        Learning rate of the voxels relative to ``--lr``.
    basis_scale
        ``beta``: the basis volumes are ``V_j = beta * (stored columns)``, so under Adam they move
        ``beta`` times slower than ``V_0`` (see the module docstring).
    power_prior
        Strength of the Fourier-power prior (0: off); see the module docstring.
    solvent_mask_radius_fraction, mask_every
        Real-space solvent mask projection of the basis maps (``None``: off).
    sparse_grad
        Give the voxel tables sparse gradients over the touched voxels, updated by
        ``torch.optim.SparseAdam`` (lazy Adam: only touched voxels move); ``False``: dense
        gradients and the run's Adam.
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
        voxel_lr_scale: float = 100.0,
        basis_scale: float = 1.0,
        power_prior: float = 0.0,
        solvent_mask_radius_fraction: float | None = None,
        mask_every: int = 50,
        sparse_grad: bool = True,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ):
        super().__init__(box_size=box_size, zdim=zdim)
        if self.zdim < 0:
            raise ValueError(f"zdim must be >= 0, got {zdim}")
        if self.zdim > 0 and int(n_basis) < 1:
            raise ValueError(f"n_basis must be at least 1, got {n_basis}")
        radius = self.box_size / 2 if radius is None else float(radius)
        if not radius > 0:
            raise ValueError(f"radius must be positive, got {radius}")
        if solvent_mask_radius_fraction is not None and not 0 < float(solvent_mask_radius_fraction) <= 0.5:
            raise ValueError(f"solvent_mask_radius_fraction must be in (0, 0.5], got {solvent_mask_radius_fraction}")
        if power_prior and sparse_grad:
            raise ValueError("power_prior needs dense voxel gradients; pass sparse_grad=False with it")
        if not voxel_lr_scale > 0:
            raise ValueError(f"voxel_lr_scale must be positive, got {voxel_lr_scale}")
        self.n_basis = int(n_basis) if self.zdim > 0 else 0
        self.config.update(
            n_basis=int(n_basis),
            layers=int(layers),
            width=int(width),
            activation=activation,
            radius=float(radius),
            init_scale=float(init_scale),
            voxel_lr_scale=float(voxel_lr_scale),
            basis_scale=float(basis_scale),
            power_prior=float(power_prior),
            solvent_mask_radius_fraction=None if solvent_mask_radius_fraction is None
            else float(solvent_mask_radius_fraction),
            mask_every=int(mask_every),
            sparse_grad=bool(sparse_grad),
            max_elements=int(max_elements),
        )
        self.radius = float(radius)
        self.max_elements = int(max_elements)
        self.lattice = HermitianLattice(self.radius + _CORNER_REACH)
        n_vox = self.lattice.n_vox
        K1 = self.n_basis + 1
        re = torch.zeros(n_vox, K1)
        im = torch.zeros(n_vox, K1)
        if self.n_basis:
            re[:, 1:] = torch.randn(n_vox, self.n_basis) * float(init_scale)
            im[:, 1:] = torch.randn(n_vox, self.n_basis) * float(init_scale)
        self.basis_real = nn.Parameter(re)
        self.basis_imag = nn.Parameter(im)
        self.mlp = (
            ResidualMLP(self.zdim, self.n_basis, layers=int(layers), width=int(width), activation=activation)
            if self.zdim > 0 else None
        )
        # per-shell amplitude (index units, shell = round |c|), set from the data by the loop
        n_shells = self.lattice.L + 2
        self.register_buffer("shell_amplitude", torch.ones(n_shells))
        self.register_buffer("mean_ctf_squared", torch.tensor(0.5))
        self.register_buffer("s_mean", torch.zeros(self.n_basis))
        self.register_buffer("s_mean_started", torch.tensor(False))
        shells = self.lattice.coords.double().norm(dim=-1).round().long()
        self.register_buffer("_voxel_shell", shells, persistent=False)
        self.register_buffer("_table", self.lattice.table, persistent=False)
        self.register_buffer("_coords", self.lattice.coords, persistent=False)
        self._eval_cache: dict[tuple[int, str], torch.Tensor] = {}
        self._amplitude_cache: tuple | None = None
        self._steps = 0


    # ------------------------------------------------------------------------------------------
    # hooks used by the training loop (generic: any decoder may define them; see train/loop.py)
    # ------------------------------------------------------------------------------------------
    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: the voxel tables (``lr_scale = voxel_lr_scale``, sparse
        gradients when ``sparse_grad``) and the mixing MLP (``lr_scale`` 1)."""
        groups: list[dict[str, Any]] = [{
            "params": [self.basis_real, self.basis_imag],
            "lr_scale": self.config["voxel_lr_scale"],
            "sparse": self.config["sparse_grad"],
        }]
        if self.mlp is not None:
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

    def regularization_loss(self, *, n_images: int) -> torch.Tensor | None:
        """The Fourier-power (ridge) prior per image, ``None`` when ``power_prior`` is 0.

        ``r <c^2> / n_vox * sum_j sum_k |V_j(k)|^2`` with ``r = power_prior`` and ``<c^2>`` the
        data's mean CTF^2: added to the batch mean of the per-pixel squared error, this is the MAP
        objective whose solution for a homogeneous map is backprojection's Wiener estimate
        ``sum c X / (sum c^2 + r <W>)`` (:mod:`cryoscape.reconstruct.backproject`, ``<W>`` the
        mean accumulated CTF^2 weight of a voxel), i.e. ``r`` means what backprojection's
        regulariser means.  (Per image the loss weighs a pixel by ``1 / n_circle``, a stored voxel
        stands for two grid voxels, and ``<W> = N n_circle <c^2> / (2 n_vox)``.)  ``n_images`` is
        not needed: both terms are per-image averages.
        """
        lam = self.config["power_prior"]
        if not lam:
            return None
        a2 = self._voxel_amplitude().square().unsqueeze(-1)
        total = (self.basis_real.square() * a2).sum() + (self.basis_imag.square() * a2).sum()
        return total * (lam * self.mean_ctf_squared / self.lattice.n_vox)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Every ``mask_every`` steps, project the basis onto the solvent mask (when enabled)."""
        if self.config["solvent_mask_radius_fraction"] is None:
            return
        self._steps += 1
        if self._steps % max(1, self.config["mask_every"]) == 0:
            self.apply_solvent_mask()

    @torch.no_grad()
    def apply_solvent_mask(self) -> None:
        """Multiply every basis map by the soft sphere of ``solvent_mask_radius_fraction`` in real space."""
        from cryoscape.fourier.masks import soft_spherical_mask_3d

        frac = self.config["solvent_mask_radius_fraction"]
        if frac is None:
            return
        L = self.lattice.L
        # The odd cube holding every stored voxel: its inverse FFT samples the same D-periodic map
        # on n points per D pixels, so the sphere's radius is frac * n of those points.
        n = 2 * L + 1
        device = self.basis_real.device
        mask = soft_spherical_mask_3d(n, frac * n, edge_width_pixel=0.05 * n, device=device, dtype=torch.float64)
        amp = self._voxel_amplitude().double()
        codes = self._cube_codes(L)
        c = self._coords
        for j in range(self.basis_real.shape[1]):
            values = torch.complex(self.basis_real[:, j].double(), self.basis_imag[:, j].double()) * amp
            cube = self._values_from_codes(values, codes)
            vol = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(cube))).real * mask
            back = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(vol)))
            back = back[c[:, 2] + L, c[:, 1] + L, c[:, 0] + L] / amp
            self.basis_real[:, j] = back.real.to(self.basis_real.dtype)
            self.basis_imag[:, j] = back.imag.to(self.basis_imag.dtype)

    # ------------------------------------------------------------------------------------------
    def _voxel_amplitude(self) -> torch.Tensor:
        """``(n_vox,)`` amplitude of every voxel, cached until ``shell_amplitude`` changes."""
        a = self.shell_amplitude
        key = (a.device, a.dtype, a._version, id(a))
        if self._amplitude_cache is None or self._amplitude_cache[0] != key:
            voxel = a[self._voxel_shell.clamp(max=a.numel() - 1)]
            self._amplitude_cache = (key, voxel)
        return self._amplitude_cache[1]

    def _lattice(self) -> HermitianLattice:
        self.lattice.table = self._table  # follows .to(device)
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

    def _check_z(self, z: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if self.zdim == 0:
            if z is not None and z.numel() > 0:
                raise ValueError("this decoder has zdim=0 (homogeneous) but a latent z was given")
            return None
        if z is None:
            raise ValueError(f"this decoder needs a latent z of dimension {self.zdim}")
        if z.dim() != 2 or z.shape[-1] != self.zdim:
            raise ValueError(f"z must have shape (B, {self.zdim}), got {tuple(z.shape)}")
        if z.shape[0] not in (1, batch) and batch != 1:
            raise ValueError(f"z has {z.shape[0]} rows but coords has batch size {batch}")
        return z

    def mixing_weights(self, z: torch.Tensor | None, batch: int = 1) -> torch.Tensor:
        """``(B, K+1)`` weights ``[1, beta s(z)]`` of the stored columns (ones ``(B, 1)`` when homogeneous)."""
        dtype = self.basis_real.dtype
        if self.mlp is None:
            return torch.ones(batch, 1, dtype=dtype, device=self.basis_real.device)
        s = self.mlp(z.to(self.mlp.input.weight.dtype)).to(dtype)
        if self.training and torch.is_grad_enabled():
            self._update_s_mean(s.detach())
        s = (s - self.s_mean.to(dtype)) * self.config["basis_scale"]
        if s.shape[0] == 1 and batch > 1:
            s = s.expand(batch, -1)
        return torch.cat([torch.ones(s.shape[0], 1, dtype=dtype, device=s.device), s], dim=1)

    @torch.no_grad()
    def _update_s_mean(self, s: torch.Tensor) -> None:
        """Running mean of the raw mixing weights over the training batches (momentum 0.99; the
        first batch sets it)."""
        mean = s.float().mean(0)
        if not bool(self.s_mean_started):
            self.s_mean.copy_(mean)
            self.s_mean_started.fill_(True)
        else:
            self.s_mean.lerp_(mean, 0.01)

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
        z = self._check_z(z, B)
        dtype = self.basis_real.dtype
        with torch.autocast(device_type=coords.device.type, enabled=False):
            s = self.mixing_weights(z, B)
            points = coords.reshape(B, -1, 3).to(dtype) * self.box_size
            index, imag_sign, w = corner_codes_and_weights(self._lattice(), points)
            w = w * self._voxel_amplitude().to(dtype)[index]
            out = sparse_slice(
                self.basis_real, self.basis_imag, s, index, w, imag_sign,
                sparse_grad=self.config["sparse_grad"], max_elements=self.max_elements,
            )
        return out.reshape(B, *point_shape)

    # ------------------------------------------------------------------------------------------
    def _rfft_codes(self, n: int) -> torch.Tensor:
        """Codes of the ``irfftn`` half-grid ``(n, n, n//2 + 1)`` (origin first on every axis),
        ``-1`` beyond the modelled shells; cached for the last box and device."""
        key = (n, str(self._table.device))
        if key not in self._eval_cache:
            device = self._table.device
            full = torch.arange(n, device=device)
            f = torch.where(full < n - n // 2, full, full - n)  # FFT order: 0, 1, ..., -2, -1
            fx = torch.arange(n // 2 + 1, device=device)
            zz, yy, xx = torch.meshgrid(f, f, fx, indexing="ij")
            pts = torch.stack([xx, yy, zz], dim=-1)
            codes = self._lattice().codes_at(pts)
            shell = (xx * xx + yy * yy + zz * zz).double().sqrt().round()
            codes = torch.where(shell <= self.radius, codes, torch.full_like(codes, -1))
            self._eval_cache = {key: codes.to(torch.int32)}
        return self._eval_cache[key]

    @torch.no_grad()
    def eval_volume(self, z: torch.Tensor | None = None, *, box_size: int | None = None) -> torch.Tensor:
        """Real-space map ``(n, n, n)`` float32 ``[z, y, x]`` for one latent (scale: module docstring).

        One weighted sum of the basis, one gather into the ``irfftn`` half-grid, one inverse
        real FFT.  (The ``+-Nyquist`` planes of even boxes: ``irfftn`` keeps the Hermitian part
        of its last-axis Nyquist plane, which for a lattice that is Hermitian by construction is
        the mean of the ``+N/2`` and ``-N/2`` voxels, the same as ``Re(ifftn)`` of the full
        centred grid.)
        """
        n = int(box_size) if box_size is not None else self.box_size
        if n < 1:
            raise ValueError(f"box_size must be positive, got {box_size}")
        device = self.basis_real.device
        if z is not None:
            z = torch.as_tensor(z, device=device, dtype=torch.float32).reshape(1, -1)
        z = self._check_z(z, 1)
        s = self.mixing_weights(z, 1)[0]
        amp = self._voxel_amplitude().to(s.dtype)
        re = torch.mv(self.basis_real, s) * amp
        im = torch.mv(self.basis_imag, s) * amp
        index, sign, valid = split_codes(self._rfft_codes(n).long(), re.dtype)
        half = torch.complex(re[index] * valid, im[index] * (sign * valid))
        volume = torch.fft.fftshift(torch.fft.irfftn(half, s=(n, n, n)))
        if n != self.box_size:
            volume = volume * (n / self.box_size) ** 3
        return volume.to(torch.float32).contiguous()

    def extra_repr(self) -> str:
        c = self.config
        return (f"zdim={self.zdim}, K={self.n_basis}, voxels={self.lattice.n_vox} (radius {self.radius:g}), "
                f"mlp {c['width']}x{c['layers']}, sparse_grad={c['sparse_grad']}")
