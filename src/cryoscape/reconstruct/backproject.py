"""Voxel reconstruction from images with known poses and CTF: Fourier backprojection.

The image formation model (README, "Conventions") says the centred 2-D transform of image ``i``,
once its shift is undone, is ``X_i(k) = c_i(k) V(R_i^T k) + noise`` with ``c_i`` the CTF.  The
Wiener (MAP with a Gaussian prior) estimate of ``V`` on the voxel grid is

    V(k) = sum_i c_i X_i (k) / ( sum_i c_i^2 (k) + lambda(k) ),

where both sums are accumulated by trilinear insertion of every image's central slice into a
``D^3`` grid and ``lambda(k) = sigma^2 / tau^2(k)`` is the noise-to-signal power ratio.

The regulariser (documented choice)
-----------------------------------
* ``regularization=<float> r`` (default 1, the same meaning as cryoDRGN's ``--reg-weight``): a
  constant ``lambda = r * <W>`` with ``<W>`` the mean accumulated CTF^2 weight inside the Nyquist
  sphere (a white signal-to-noise prior).  On simulated data this maximises the FSC to the truth.
* ``regularization="fsc"``: RELION-style.  The two half-sets are first solved with a small
  provisional ``lambda``; their FSC gives the spectral SNR of each half-map,
  ``SSNR_half = FSC / (1 - FSC)`` and of the full map ``SSNR_full = 2 FSC / (1 - FSC)``; then
  ``lambda(k) = <W>_shell(k) / SSNR(k)`` with ``<W>_shell`` the mean weight over the Fourier shell
  of ``k``.  Noise-only shells are suppressed, which gives cleaner maps to look at but a slightly
  lower FSC to the truth.

Interpolation, gridding correction, mask
----------------------------------------
Trilinear insertion convolves the Fourier grid with a one-voxel tent, which multiplies the map by
``sinc^2(x / Dp)`` along each axis (``Dp`` the Fourier grid size; 0.4 at the box edge without
oversampling).  ``gridding_correction=True`` divides it out, giving exact amplitudes (noiseless
projections are recovered with FSC > 0.99 to half Nyquist at ``oversampling=2``), but it
amplifies noise towards the box edge just as much; left off (the default) the taper acts as a
soft mask on the noise.  ``sphere_mask_radius_fraction`` (default 0.45) multiplies the map and
the half-maps by a soft sphere of that radius (times ``D``, cosine edge of ``0.05 D``), like the
particle-diameter mask of RELION; the half-map FSC is computed on the masked half-maps.

Only the half-plane ``ky > 0`` (plus the ``ky = 0, kx >= 0`` half-line) of every image is
inserted, inside the circle of radius ``D/2``; Friedel symmetry ``V(-k) = conj V(k)`` fills the
rest at the end.  This halves the work and yields exactly the full-plane sums (the DC term is
counted twice in both the numerator and the weight, which leaves their ratio unchanged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from cryoscape.fourier.fft import ifft3_center, mirror_frequencies
from cryoscape.fourier.filters import radial_average, radial_profile_to_grid
from cryoscape.fourier.fsc import gold_standard_fsc
from cryoscape.fourier.grids import grid_2d_index, radius_3d_index
from cryoscape.fourier.masks import soft_spherical_mask_3d
from cryoscape.fourier.shift import phase_shift_coords
from cryoscape.fourier.slicing import scatter_trilinear, slice_coordinates

__all__ = [
    "FourierAccumulator",
    "half_plane_coordinates",
    "solve_wiener",
    "fsc_regularizer",
    "split_halves",
    "BackprojectionResult",
    "reconstruct_from_accumulator",
    "backproject_images",
    "origin_first_padded",
    "gridding_correction",
    "expand_symmetry",
]

log = logging.getLogger(__name__)


def half_plane_coordinates(D: int, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels inserted per image: the half-plane ``kx > 0`` (plus ``kx = 0, ky >= 0``) inside the
    circle of radius ``D/2``.

    Returns ``(coords (P, 2) as (kx, ky) index units, rfft_index (P,))`` where ``rfft_index`` is
    each pixel's position in the flattened ``(D, D//2 + 1)`` output of ``torch.fft.rfft2`` applied
    to an image whose origin sits at index 0 (see :func:`origin_first_padded`).
    """
    grid = grid_2d_index(D, device=device).reshape(-1, 2)
    x, y = grid[:, 0], grid[:, 1]
    keep = ((x > 0) | ((x == 0) & (y >= 0))) & (grid.norm(dim=-1) < D / 2)
    coords = grid[keep]
    kx, ky = coords[:, 0].long(), coords[:, 1].long()
    rfft_index = (ky % D) * (D // 2 + 1) + kx
    return coords, rfft_index


def origin_first_padded(images: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Zero-pad ``(B, D, D)`` images to ``padded_size`` with the origin (index ``D//2``) moved to 0.

    This is ``ifftshift(pad(images))`` built with four block copies instead of a padded copy
    and a roll, so the unshifted FFT can be applied directly.
    """
    B, D = images.shape[0], images.shape[-1]
    h, n = D // 2, D - D // 2
    out = images.new_zeros(B, padded_size, padded_size)
    out[:, :n, :n] = images[:, h:, h:]
    out[:, :n, padded_size - h :] = images[:, h:, :h]
    out[:, padded_size - h :, :n] = images[:, :h, h:]
    out[:, padded_size - h :, padded_size - h :] = images[:, :h, :h]
    return out


@dataclass
class FourierAccumulator:
    """Running sums ``sum c X`` (real, imaginary) and ``sum c^2`` for one or more particle sets.

    ``sums[h]`` is a ``(D, D, D, 3)`` buffer for half-set ``h``; its memory does not depend on
    the number of images, so any dataset streams through it.
    """

    box_size: int
    n_sets: int = 2
    oversampling: int = 1
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    band_radius: float | None = None
    sums: torch.Tensor = field(init=False)
    count: torch.Tensor = field(init=False)

    @property
    def padded_size(self) -> int:
        """Side of the Fourier grid: ``oversampling * box_size``."""
        return self.oversampling * self.box_size

    def __post_init__(self) -> None:
        D = self.padded_size
        self.sums = torch.zeros(self.n_sets, D, D, D, 3, device=self.device, dtype=self.dtype)
        self.count = torch.zeros(self.n_sets, dtype=torch.long)
        coords, self._rfft_index = half_plane_coordinates(D, device=self.device)
        if self.band_radius is not None:  # insert only the pixels inside this radius (padded-grid units)
            keep = coords.norm(dim=-1) < self.band_radius
            coords, self._rfft_index = coords[keep], self._rfft_index[keep]
        self._coords = coords.to(self.dtype)

    @property
    def coordinates(self) -> torch.Tensor:
        """``(P, 2)`` inserted pixels ``(kx, ky)`` in index units of the padded grid."""
        return self._coords

    @property
    def frequencies_cycles_per_pixel(self) -> torch.Tensor:
        """``(P, 2)`` frequencies ``(kx, ky)`` of the inserted pixels (for evaluating the CTF)."""
        return self._coords / self.padded_size

    def transform(self, images: torch.Tensor, shifts_pixel: torch.Tensor | None = None) -> torch.Tensor:
        """Fourier coefficients ``(B, P)`` of real ``(B, D, D)`` images at the inserted pixels.

        The images are zero-padded to the padded grid and, given ``shifts_pixel`` (RELION sign,
        pixels), translated so the particle centre moves to the box centre.
        """
        B, Dp = images.shape[0], self.padded_size
        spectrum = torch.fft.rfft2(origin_first_padded(images, Dp))
        values = spectrum.reshape(B, -1)[:, self._rfft_index]
        if shifts_pixel is not None:
            values = phase_shift_coords(values, self._coords, shifts_pixel, Dp)
        return values

    def add(
        self,
        values: torch.Tensor,
        rotations: torch.Tensor,
        *,
        ctf: torch.Tensor | None = None,
        sets: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Insert the slices of a batch of images (weighted insertion for EM: see ``weights``).

        Parameters
        ----------
        values
            ``(B, P)`` complex Fourier coefficients at :attr:`coordinates` (from :meth:`transform`).
        rotations
            ``(B, 3, 3)`` poses.
        ctf
            ``(B, P)`` CTF at :attr:`frequencies_cycles_per_pixel`, or ``None`` for perfect images.
        sets
            ``(B,)`` index of the half-set of each image (default all in set 0).
        weights
            ``(B,)`` or ``(B, P)`` factors on both sums (default 1): the EM M-step inserts each
            image at each of its poses with weight ``posterior / sigma^2(|k|)``.
        """
        B = values.shape[0]
        if ctf is None:
            stacked = torch.stack([values.real, values.imag, torch.ones_like(values.real)], dim=-1)
        else:
            c = ctf.to(values.real.dtype)
            stacked = torch.stack([c * values.real, c * values.imag, c * c], dim=-1)
        if weights is not None:
            w = weights.to(stacked.dtype)
            stacked = stacked * (w[:, None, None] if w.dim() == 1 else w[..., None])
        coords = slice_coordinates(rotations.to(self.dtype), self._coords)  # (B, P, 3)
        if sets is None:
            sets = torch.zeros(B, dtype=torch.long)
        sets = sets.to(dtype=torch.long)
        scatter_trilinear(self.sums, coords, stacked.to(self.dtype), offsets=sets)
        self.count += torch.bincount(sets.cpu(), minlength=self.n_sets)

    def merge_(self, other: "FourierAccumulator") -> None:
        """Add another accumulator's sums (e.g. from another process) into this one."""
        self.sums += other.sums.to(self.sums.device)
        self.count += other.count

    def apply_symmetry_(self, group: torch.Tensor | np.ndarray) -> None:
        """Symmetrise the sums in place: ``S(k) <- sum_g S(g k)`` for the ``(G, 3, 3)`` point group
        (geometry/symmetry.py), sampled trilinearly.  A map with ``V(g X) = V(X)`` has
        ``V(g k) = V(k)`` in Fourier space, so this is every image inserted at all its symmetry
        mates ``R g`` at the cost of one resampling per group element (RELION symmetrises its
        Fourier sums the same way)."""
        from cryoscape.fourier.grids import grid_3d_index
        from cryoscape.fourier.slicing import sample_trilinear

        G = torch.as_tensor(np.asarray(group), dtype=self.dtype, device=self.sums.device)
        if len(G) == 1:
            return
        Dp = self.padded_size
        k = grid_3d_index(Dp, device=self.sums.device, dtype=self.dtype)  # (Dp, Dp, Dp, 3) as (x, y, z)
        out = torch.zeros_like(self.sums)
        for g in G:
            coords = k @ g.T  # g k
            for s in range(self.n_sets):
                out[s] += sample_trilinear(self.sums[s], coords)
        self.sums = out

    def symmetrized(self, index: int | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Numerator (complex) and weight of set(s) ``index`` with Friedel symmetry applied.

        Returns ``(numerator (..., Dp, Dp, Dp) complex128, weight (..., Dp, Dp, Dp) float64)``.
        """
        s = self.sums[index].to(torch.float64)
        num = torch.complex(s[..., 0], s[..., 1])
        weight = s[..., 2]
        num = num + mirror_frequencies(num, ndim=3).conj()
        weight = weight + mirror_frequencies(weight, ndim=3)
        return num, weight


def gridding_correction(D: int, padded_size: int, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """``(D, D, D)`` real-space image of the trilinear kernel on a ``padded_size`` Fourier grid.

    Trilinear insertion convolves the Fourier grid with a tent of one voxel, which multiplies the
    real-space map by ``sinc^2(x / Dp)`` along each axis; reconstructions are divided by it.
    """
    x = (torch.arange(D, device=device, dtype=dtype) - D // 2) / padded_size
    a = torch.sinc(x) ** 2
    return a[:, None, None] * a[None, :, None] * a[None, None, :]


def solve_wiener(
    numerator: torch.Tensor,
    weight: torch.Tensor,
    regularizer: torch.Tensor | float,
    *,
    box_size: int | None = None,
    correct_gridding: bool = True,
) -> torch.Tensor:
    """Real-space map from ``numerator / (weight + regularizer)`` on a (padded) Fourier grid.

    The map is cropped to the central ``box_size`` voxels (default: the grid size) and, with
    ``correct_gridding``, divided by the :func:`gridding_correction`.  Voxels with zero weight
    are set to zero.
    """
    Dp = weight.shape[-1]
    D = Dp if box_size is None else box_size
    reg = torch.as_tensor(regularizer, dtype=weight.dtype, device=weight.device)
    volume_ft = numerator / (weight + reg).clamp(min=torch.finfo(weight.dtype).tiny)
    volume_ft = torch.where(weight > 0, volume_ft, torch.zeros_like(volume_ft))
    volume = ifft3_center(volume_ft).real
    a = Dp // 2 - D // 2
    volume = volume[a : a + D, a : a + D, a : a + D]
    if correct_gridding:
        volume = volume / gridding_correction(D, Dp, device=volume.device, dtype=volume.dtype)
    return volume


def _mean_weight_in_sphere(weight: torch.Tensor) -> torch.Tensor:
    D = weight.shape[-1]
    inside = radius_3d_index(D, device=weight.device, dtype=weight.dtype) < D / 2
    return weight[..., inside].mean(dim=-1)


def _shell_mean_weight(weight: torch.Tensor) -> torch.Tensor:
    """``<W>_shell(k)`` spread back onto the grid, floored so it is never zero inside."""
    D = weight.shape[-1]
    profile = radial_average(weight, ndim=3)
    floor = 1e-6 * profile.max().clamp(min=1e-30)
    return radial_profile_to_grid(profile.clamp(min=floor), D, ndim=3)


def fsc_regularizer(weight: torch.Tensor, ssnr: torch.Tensor) -> torch.Tensor:
    """``lambda(k) = <W>_shell(k) / SSNR(k)`` on the (padded) grid of ``weight``.

    Parameters
    ----------
    weight
        ``(Dp, Dp, Dp)`` accumulated ``sum c^2``.
    ssnr
        ``(D//2 + 1,)`` spectral SNR per shell of the unpadded box ``D`` (clamped to
        ``[1e-3, 1e4]``); it is interpolated onto the ``Dp//2 + 1`` shells of the padded grid.
    """
    Dp = weight.shape[-1]
    n = ssnr.shape[-1]
    scale = (n - 1) / (Dp // 2)  # padded shell s is unpadded shell s * scale
    shells = np.arange(Dp // 2 + 1) * scale
    profile = np.interp(shells, np.arange(n), ssnr.detach().cpu().double().numpy())
    profile = torch.as_tensor(profile, dtype=weight.dtype, device=weight.device).clamp(1e-3, 1e4)
    ssnr_grid = radial_profile_to_grid(profile, Dp, ndim=3)
    return _shell_mean_weight(weight) / ssnr_grid


def solve_fsc_prior(num: torch.Tensor, weight: torch.Tensor, solve, fsc_of, tau2_fudge: float = 1.0):
    """Full map and half-maps with RELION's gold-standard prior: the spectral SNR per shell comes
    from the FSC of lightly regularised half-maps (``SSNR = FSC / (1 - FSC)`` per half, twice that
    for the full map), so the prior is measured on the current data and does not shrink from one
    iteration to the next.  ``num``/``weight`` ``(2, Dp, Dp, Dp)``; ``solve(num, weight, reg)``
    and ``fsc_of(halves) -> dict`` as in :func:`reconstruct_from_accumulator`.
    Returns ``(volume, halves)``."""
    provisional = torch.stack([solve(num[h], weight[h], 1e-3 * _shell_mean_weight(weight[h])) for h in range(2)])
    curve = fsc_of(provisional)["fsc"].to(torch.float64).clamp(-0.999, 0.999)
    ssnr_half = (curve / (1 - curve)).clamp(min=0)
    halves = torch.stack(
        [solve(num[h], weight[h], fsc_regularizer(weight[h], ssnr_half) / tau2_fudge) for h in range(2)]
    )
    volume = solve(num.sum(0), weight.sum(0), fsc_regularizer(weight.sum(0), 2 * ssnr_half) / tau2_fudge)
    return volume, halves


def split_halves(n: int, *, seed: int = 0) -> np.ndarray:
    """Random balanced assignment of ``n`` particles to half-sets 0 and 1."""
    rng = np.random.default_rng(seed)
    sets = np.zeros(n, dtype=np.int64)
    sets[rng.permutation(n)[n // 2 :]] = 1
    return sets


@dataclass
class BackprojectionResult:
    """A reconstruction: full map, half-maps, and the gold-standard FSC between the halves."""

    volume: torch.Tensor
    half_maps: torch.Tensor | None
    fsc: dict | None
    n_particles: int
    regularization: str


def reconstruct_from_accumulator(
    acc: FourierAccumulator,
    *,
    regularization: str | float = 1.0,
    gridding_correction: bool = False,
    sphere_mask_radius_fraction: float | None = 0.45,
    pixel_size_angstrom: float | None = None,
    fsc_mask: torch.Tensor | None = None,
    tau2_fudge: float = 1.0,
) -> BackprojectionResult:
    """Solve for the full map and (with two non-empty sets) the half-maps and their FSC.

    See the module docstring for the regulariser, the gridding correction and the sphere mask.
    Without two non-empty half-sets, ``"fsc"`` falls back to the constant regulariser 1.
    ``tau2_fudge`` is RELION's ``T`` (``--tau2_fudge``): the ``"fsc"`` prior's signal power is
    multiplied by it, i.e. ``lambda(k)`` divided (1 for refinement; larger trusts the data more).
    """
    D = acc.box_size
    num, weight = acc.symmetrized(slice(None))
    num_all, weight_all = num.sum(0), weight.sum(0)
    two_halves = acc.n_sets == 2 and bool((acc.count > 0).all())
    if regularization == "fsc" and not two_halves:
        regularization = 1.0
    sphere = None
    if sphere_mask_radius_fraction:
        sphere = soft_spherical_mask_3d(
            D, sphere_mask_radius_fraction * D, edge_width_pixel=0.05 * D, dtype=torch.float64
        ).to(num.device)

    def solve(n: torch.Tensor, w: torch.Tensor, reg) -> torch.Tensor:
        v = solve_wiener(n, w, reg, box_size=D, correct_gridding=gridding_correction)
        return v if sphere is None else v * sphere

    def fsc_of(halves: torch.Tensor) -> dict:
        return gold_standard_fsc(
            halves[0], halves[1], mask=fsc_mask, pixel_size_angstrom=pixel_size_angstrom
        )

    halves, fsc = None, None
    if regularization == "fsc":
        volume, halves = solve_fsc_prior(num, weight, solve, fsc_of, tau2_fudge)
        label = "fsc"
    else:
        r = float(regularization)
        if r <= 0:
            raise ValueError(f"a constant regularization must be positive, got {r}")
        if two_halves:
            halves = torch.stack(
                [solve(num[h], weight[h], r * _mean_weight_in_sphere(weight[h])) for h in range(2)]
            )
        volume = solve(num_all, weight_all, r * _mean_weight_in_sphere(weight_all))
        label = f"constant {r:g}"
    if halves is not None:
        fsc = fsc_of(halves)
    return BackprojectionResult(
        volume=volume.to(torch.float32),
        half_maps=None if halves is None else halves.to(torch.float32),
        fsc=fsc,
        n_particles=int(acc.count.sum()),
        regularization=label,
    )


def backproject_images(
    read_batch: Callable[[np.ndarray], np.ndarray],
    *,
    box_size: int,
    rotations: np.ndarray,
    shifts_pixel: np.ndarray | None = None,
    ctf_batch: Callable[[np.ndarray, torch.Tensor], torch.Tensor] | None = None,
    sets: np.ndarray | None = None,
    oversampling: int = 1,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    invert_contrast: bool = True,
    progress: bool = True,
) -> FourierAccumulator:
    """Stream images through a :class:`FourierAccumulator` in batches.

    Parameters
    ----------
    read_batch
        ``indices (b,) -> images (b, D, D)`` float32, e.g. ``ParticleImages.read``.
    rotations, shifts_pixel
        ``(N, 3, 3)`` and ``(N, 2)`` poses of the N images to insert (RELION shift sign: the
        particle centre sits at the box centre minus the shift).
    ctf_batch
        ``(indices, freqs (P, 2) cycles/pixel) -> (b, P)`` CTF values at the given frequencies
        for the given images, or ``None`` for no CTF.
    oversampling
        Fourier grid refinement (zero padding in real space): 1 is fast; 2 makes trilinear
        interpolation accurate enough for noiseless data (with the gridding correction), at 4x
        the work and 8x the memory.
    invert_contrast
        Negate the images first (default), as extracted particles are white (see the README:
        our CTF is negative at low frequency, so protein density must appear dark).
    sets
        ``(N,)`` half-set of each image (0/1), or ``None`` for a single set.
    """
    from tqdm import tqdm

    n = len(rotations)
    acc = FourierAccumulator(
        box_size, n_sets=1 if sets is None else 2, oversampling=oversampling, device=device
    )
    freqs = acc.frequencies_cycles_per_pixel
    bar = tqdm(total=n, unit="img", desc="backproject", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        images = torch.as_tensor(read_batch(idx), device=device, dtype=torch.float32)
        if invert_contrast:
            images = -images
        shifts = None
        if shifts_pixel is not None:
            shifts = torch.as_tensor(shifts_pixel[idx], device=device, dtype=torch.float32)
        values = acc.transform(images, shifts)
        ctf = None if ctf_batch is None else ctf_batch(idx, freqs)
        rot = torch.as_tensor(rotations[idx], device=device, dtype=torch.float32)
        acc.add(values, rot, ctf=ctf, sets=None if sets is None else torch.as_tensor(sets[idx]))
        bar.update(len(idx))
    bar.close()
    return acc


def choose_half_sets(table, split: str, *, seed: int = 0) -> np.ndarray:
    """Half-set (0/1) of every particle of a table.

    ``split`` is ``"random"`` (balanced, seeded), ``"star"`` (RELION's ``rlnRandomSubset`` 1/2,
    cryoSPARC's ``alignments3D/split`` 0/1), or a path to an index file (.npy/.pkl/.txt) listing
    the rows of half-set 0 (the others form half-set 1).
    """
    from cryoscape.errors import InputError
    from cryoscape.io.particles import load_indices

    n = len(table)
    if split == "random":
        return split_halves(n, seed=seed)
    if split == "star":
        rows, records = table.star_rows, table.cs_records
        if rows is not None and "rlnRandomSubset" in rows.columns:
            sets = rows["rlnRandomSubset"].to_numpy().astype(np.int64) - 1
        elif records is not None and "alignments3D/split" in (records.dtype.names or ()):
            sets = records["alignments3D/split"].astype(np.int64)
        else:
            raise InputError(
                "has no half-set column (rlnRandomSubset or alignments3D/split); "
                "use --split random or pass a file of half-1 indices.",
                path=table.source_path,
            )
        if not np.isin(sets, (0, 1)).all():
            raise InputError(
                "has half-set labels other than 1 and 2; use --split random.", path=table.source_path
            )
        return sets
    first = load_indices(split, n_particles=n)
    sets = np.ones(n, dtype=np.int64)
    sets[first] = 0
    return sets


def backproject_particles(
    table,
    *,
    batch_size: int = 256,
    split: str = "random",
    seed: int = 0,
    oversampling: int = 1,
    regularization: str | float = 1.0,
    gridding_correction: bool = False,
    sphere_mask_radius_fraction: float | None = 0.45,
    use_ctf: bool = True,
    invert_contrast: bool = True,
    fsc_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    symmetry: str | None = None,
) -> BackprojectionResult:
    """Reconstruct a voxel map (and half-maps) from a particle table with poses and CTF.

    Images are read lazily in batches (memory bounded by the batch and the ``(2 D)^3`` grids).
    ``table`` is a :class:`cryoscape.io.particles.ParticleTable`; see :func:`choose_half_sets`
    for ``split`` and the module docstring for ``regularization``.  ``symmetry`` (e.g. ``"C4"``,
    ``"I"``) symmetrises the sums with that point group (:meth:`FourierAccumulator.apply_symmetry_`).
    """
    from cryoscape.data.images import ParticleImages
    from cryoscape.fourier.ctf import ctf_images_from_table

    table.require_poses()
    if use_ctf:
        table.require_ctf()
        table.require_pixel_size()
    images = ParticleImages(
        table.image_paths, table.image_indices, box_size=table.box_size, table_path=table.source_path
    )
    D = images.box_size
    sets = choose_half_sets(table, split, seed=seed)
    ctf_batch = None
    if use_ctf:
        def ctf_batch(idx: np.ndarray, freqs: torch.Tensor) -> torch.Tensor:
            return ctf_images_from_table(
                table.ctf, table.pixel_size_angstrom, D, idx, device=device, freqs_cycles_per_pixel=freqs
            )

    log.info("backprojecting %d particles of box %d (oversampling %d)", len(table), D, oversampling)
    acc = backproject_images(
        images.read,
        box_size=D,
        rotations=table.rotations,
        shifts_pixel=table.shifts_pixel,
        ctf_batch=ctf_batch,
        sets=sets,
        oversampling=oversampling,
        batch_size=batch_size,
        device=device,
        invert_contrast=invert_contrast,
        progress=progress,
    )
    if symmetry:
        from cryoscape.geometry.symmetry import symmetry_group

        acc.apply_symmetry_(symmetry_group(symmetry))
    pixel = float(np.nanmedian(table.pixel_size_angstrom)) if use_ctf else None
    return reconstruct_from_accumulator(
        acc,
        regularization=regularization,
        gridding_correction=gridding_correction,
        sphere_mask_radius_fraction=sphere_mask_radius_fraction,
        pixel_size_angstrom=pixel,
        fsc_mask=fsc_mask,
    )


def write_backprojection(out_dir, result: BackprojectionResult, *, pixel_size_angstrom: float | None) -> dict:
    """Write ``map.mrc``, ``half1.mrc``/``half2.mrc``, ``fsc.txt`` and ``fsc.png`` into ``out_dir``.

    Returns a summary dict (resolutions, particle count) that is also logged.
    """
    from pathlib import Path

    from cryoscape.fourier.fsc import plot_fsc, write_fsc_txt
    from cryoscape.io.mrc import write_mrc

    out = Path(out_dir)
    pixel = pixel_size_angstrom if pixel_size_angstrom and np.isfinite(pixel_size_angstrom) else 1.0
    write_mrc(out / "map.mrc", result.volume.cpu().numpy(), pixel_size_angstrom=pixel)
    summary = {"n_particles": result.n_particles, "regularization": result.regularization}
    if result.half_maps is not None:
        for h in range(2):
            write_mrc(out / f"half{h + 1}.mrc", result.half_maps[h].cpu().numpy(), pixel_size_angstrom=pixel)
    if result.fsc is not None:
        freqs, curve = result.fsc["freqs"], result.fsc["fsc"]
        write_fsc_txt(out / "fsc.txt", freqs, curve, pixel_size_angstrom)
        plot_fsc(freqs, {"half-map FSC": curve}, out / "fsc.png", pixel_size_angstrom=pixel_size_angstrom)
        for key in ("res_0.143", "res_0.5", "res_0.143_angstrom", "res_0.5_angstrom"):
            if key in result.fsc:
                summary[key] = float(result.fsc[key])
    log.info("backprojection summary: %s", summary)
    return summary


def expand_symmetry(table, symmetry: str):
    """The particles of ``table`` repeated once per element ``g`` of the point group, with poses
    ``R g`` (RELION's ``relion_particle_symmetry_expand``): particle ``i`` copy ``j`` is row
    ``i * |G| + j``; every other column is repeated."""
    from cryoscape.geometry.symmetry import symmetry_group

    table.require_poses()
    group = symmetry_group(symmetry)
    rows = np.repeat(np.arange(len(table)), len(group))
    expanded = table.subset(rows)
    expanded.rotations = (table.rotations[:, None] @ group[None]).reshape(-1, 3, 3)
    return expanded
