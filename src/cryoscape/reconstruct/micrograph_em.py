"""Reconstruction directly from micrographs: approximate EM over patches (seed 004).

What one iteration does (kernels in reconstruct/patch_em.py)
------------------------------------------------------------
1. Project the current volume (box ``L`` of the current stage) at the ``K`` rotations of an SO(3)
   grid (geometry/so3_grid.py); per micrograph, multiply by its CTF to get ``K`` templates.
2. E-step: every ``L x L`` patch of the (downsampled) micrograph against every template at every
   one of the ``(2L-1)^2`` shifts by FFT cross-correlation on the ``2L`` grid, plus the "empty"
   state of probability ``rho0``; posteriors in the log domain.
3. M-step: the posterior-weighted data of each rotation brought back into template coordinates
   (``b_k``), its CTF-weighted Fourier slice and the visible-fraction-weighted ``CTF^2`` are inserted
   into a 3-D Fourier grid (2x oversampled, trilinear, reconstruct/backproject.py's accumulator)
   and the weighted least-squares volume is the Wiener-regularised ratio.  The basis is the voxel
   grid of the stage's box (its Fourier coefficients up to the stage's Nyquist frequency), not the
   paper's spherical-Bessel basis; the visibility weights are replaced by their mean (exact over
   the pieces of one particle; see patch_em.py).  ``rho0`` becomes the mean posterior mass on
   "empty", and ``sigma^2`` the expected squared residual per pixel.

Frequency marching: stages of increasing box ``L`` (the micrographs are Fourier-cropped by
``D / L``, so the band limit is ``2 * pixel * D / L`` angstroms) and finer rotation grids; each
stage starts from the last stage's map, zero-padded in Fourier space.  Stochastic variant: a
stage's ``fraction`` of the patches, drawn anew each iteration, enters each E-step, and the M-step's
Fourier sums are by default the mean over all the stage's iterations so far (a step of ``1 / t``, the
stochastic-approximation schedule), or a running average over about ``1 / fraction`` iterations (see
:func:`em_iteration`).  With the constant step the low-SNR maps drifted away from their best over the
iterations; with ``1 / t`` each iteration moves the map less than the last.
After each M-step the map is moved by the whole-voxel shift that aligns it with the previous map
(:func:`recentre`), since the likelihood cannot tell a shifted map from shifted particles.

Turned grid: by default every iteration turns the stage's SO(3) grid (and the parent grid of the
coarse-to-fine search) as a whole by a random rotation from the run's generator.  On one fixed grid
each particle's pose is rounded to the same grid point at every iteration, and the map settles
towards one that fits the rounded poses rather than the data (the maps drifted away from the truth
over the iterations); turned grids round differently each time, so the rounding errors average out
in the running sums of the stochastic M-step.

Cost: an iteration does two complex FFTs of ``2L x 2L`` per patch and pair of rotations (two real
correlations per complex FFT, patch_em.py), i.e. about ``2 K`` times the number of pixels of the
downsampled micrographs (whole-micrograph correlation costs the same; patches keep memory bounded
and need no masking).  M-step FFTs are skipped for (patch, pair)s without posterior mass, and
stages at SO(3) level >= 1 search rotations coarse to fine (:class:`LocalSearch`).  By default
(``coarse_box`` None, :func:`stage_coarse_box`) level-0 stages of box >= 32 first score every rotation
on micrographs Fourier-cropped to half the box, then at the full box only each patch's most probable
rotation pairs and a weighted uniform sample of the others (keeping only the most probable ones made
the posteriors too hard and the low-SNR maps drift).  Downsampled micrographs are cached on disk per stage
(``cache/``) and read one micrograph at a time, so memory is one micrograph's patches times a batch
of rotations.

Scale: the initial map's amplitude is fitted first (maximum likelihood over powers of two on a
few micrographs), since a template far too strong or too weak makes every patch look empty.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cryoscape.errors import InputError
from cryoscape.fourier.ctf import ctf_images_from_table
from cryoscape.fourier.fft import ifft2_center
from cryoscape.fourier.fsc import fourier_shell_correlation, frequency_to_angstrom, fsc_auc, resolution_at_threshold
from cryoscape.fourier.resample import upsample_volume
from cryoscape.fourier.slicing import prepare_projection_volume, project_prepared, scatter_trilinear, slice_coordinates
from cryoscape.geometry.so3_grid import so3_grid
from cryoscape.io.micrographs import MicrographTable, micrograph_shape, read_micrograph
from cryoscape.reconstruct.backproject import FourierAccumulator, reconstruct_from_accumulator
from cryoscape.reconstruct.patch_em import PatchEStep, backprojection_sums_ft, template_terms, unpack_sums

__all__ = [
    "Stage",
    "default_schedule",
    "MicrographPatches",
    "downsample_micrograph",
    "EMState",
    "stage_rotations",
    "em_iteration",
    "fit_initial_scale",
    "compare_to_reference",
    "recentre",
    "reorient",
    "rotate_volume",
    "run_micrograph_em",
    "LocalSearch",
    "local_search",
    "stage_coarse_box",
]

log = logging.getLogger("cryoscape.micrograph_em")


@dataclass(frozen=True)
class Stage:
    """One frequency-marching stage: box ``L``, SO(3) grid level, iterations, patch fraction.

    Levels are those of geometry/so3_grid.py (0: 576 rotations, 30 degrees; 1: 4608, 15 degrees);
    level -1 is a 72-rotation, 60-degree grid (HEALPix nside 1, 6 in-plane angles) for boxes of a
    few pixels.
    """

    box_size: int
    so3_level: int
    iterations: int
    fraction: float = 1.0


def default_schedule(box_size: int, iterations: int = 20) -> list[Stage]:
    """The seed's 5 / 5 / 10 split of iterations over three band limits, scaled to ``iterations``.

    Boxes ``D/4``, ``D/2``, ``D/2`` (even, at least 8) with SO(3) levels 0, 0, 1 (30, 30, 15 degrees)
    and patch fractions 1, 0.5, 0.25, so that the costly last stage sees fresh patches each iteration.
    """
    def even(x: float) -> int:
        return max(8, int(round(x / 2)) * 2)

    n1 = max(1, round(iterations / 4))
    n2 = max(1, round(iterations / 4))
    n3 = max(1, iterations - n1 - n2)
    return [
        Stage(min(box_size, even(box_size / 4)), 0, n1, 1.0),
        Stage(min(box_size, even(box_size / 2)), 0, n2, 0.5),
        Stage(min(box_size, even(box_size / 2)), 1, n3, 0.25),
    ]


def downsample_micrograph(micrograph: torch.Tensor, out_shape: tuple[int, int]) -> torch.Tensor:
    """Fourier-crop a real ``(H, W)`` micrograph to ``out_shape`` (pixel values kept, as fourier/resample.py)."""
    H, W = micrograph.shape
    Hs, Ws = out_shape
    if (Hs, Ws) == (H, W):
        return micrograph.clone()
    spec = torch.fft.rfft2(micrograph)
    rows = torch.cat([spec[: Hs // 2], spec[H - (Hs - Hs // 2) :]], dim=0)[:, : Ws // 2 + 1]
    return torch.fft.irfft2(rows, s=(Hs, Ws)) * (Hs * Ws / (H * W))


class MicrographPatches:
    """The micrographs of a :class:`MicrographTable` cut into ``D x D`` patches, per stage box ``L``.

    The top-left ``(H // D) D x (W // D) D`` pixels of each micrograph are used (the remainder is
    less than a patch).  Micrographs are mean-subtracted, Fourier-cropped to ``L / D`` and cached
    as ``cache_dir/L{L}/{g}.npy``; :meth:`patches` reads one micrograph's ``(n, L, L)`` patches.
    """

    def __init__(self, table: MicrographTable, box_size: int, cache_dir: str | os.PathLike, *, use_ctf: bool = True):
        self.table, self.box_size, self.cache_dir, self.use_ctf = table, int(box_size), Path(cache_dir), use_ctf
        self._ctf = None
        if use_ctf:
            ctf = table.require_ctf()
            fields = {f.name: getattr(ctf, f.name) for f in dataclasses.fields(ctf)}
            self._ctf = SimpleNamespace(**fields, b_factor_angstrom2=np.asarray(table.b_factor_angstrom2, np.float64))
        pixels = np.asarray(table.pixel_size_angstrom, dtype=np.float64)
        if np.ptp(pixels) > 1e-3 * pixels.max():
            raise InputError("holds micrographs of different pixel sizes; process one pixel size at a time.",
                             path=table.source_path)
        self.pixel_size_angstrom = float(pixels[0])
        self.grids = []
        for path in table.paths:
            H, W = micrograph_shape(path)
            if H < box_size or W < box_size:
                raise InputError(f"is {W}x{H} pixels, smaller than the box of {box_size}; pass a smaller --box-size.", path=path)
            self.grids.append((H // box_size, W // box_size))

    def __len__(self) -> int:
        return len(self.grids)

    def n_patches(self, g: int) -> int:
        return self.grids[g][0] * self.grids[g][1]

    def patches(self, g: int, L: int) -> torch.Tensor:
        """``(n, L, L)`` float32 patches of micrograph ``g`` at stage box ``L`` (row-major patch order)."""
        ny, nx = self.grids[g]
        path = self.cache_dir / f"L{L}" / f"{g}.npy"
        if path.is_file():
            small = torch.from_numpy(np.load(path))
        else:
            D = self.box_size
            mic = torch.from_numpy(read_micrograph(self.table.paths[g])[: ny * D, : nx * D].astype(np.float32))
            mic = mic - mic.median()  # background level (particles are a minority of the pixels)
            small = downsample_micrograph(mic.double(), (ny * L, nx * L)).float()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, small.numpy())
            os.replace(tmp, path)
        return small.reshape(ny, L, nx, L).permute(0, 2, 1, 3).reshape(ny * nx, L, L)

    def pixel_size_at(self, L: int) -> float:
        return self.pixel_size_angstrom * self.box_size / L

    def ctf_image(self, g: int, L: int, *, device=None) -> torch.Tensor:
        """``(L, L)`` centred CTF of micrograph ``g`` at the stage's pixel size (ones without CTF)."""
        if not self.use_ctf:
            return torch.ones(L, L, device=device)
        return ctf_images_from_table(self._ctf, self.pixel_size_at(L), L, np.array([g]), device=device)[0]

    def ctf_at(self, g: int, freqs_cycles_per_pixel: torch.Tensor, L: int) -> torch.Tensor:
        """CTF of micrograph ``g`` at ``(P, 2)`` frequencies (cycles per stage pixel)."""
        if not self.use_ctf:
            return torch.ones(freqs_cycles_per_pixel.shape[0], device=freqs_cycles_per_pixel.device)
        return ctf_images_from_table(self._ctf, self.pixel_size_at(L), L, np.array([g]),
                                     device=freqs_cycles_per_pixel.device,
                                     freqs_cycles_per_pixel=freqs_cycles_per_pixel)[0]


@dataclass
class EMState:
    """Everything needed to continue a run: the map of the current stage and the parameters."""

    volume: torch.Tensor
    stage_index: int = 0
    iteration_in_stage: int = 0
    rho0: float = 0.5
    sigma2: float = 1.0
    history: list = field(default_factory=list)
    rng_state: dict | None = None
    sums: torch.Tensor | None = None
    half_volumes: torch.Tensor | None = None


def stage_rotations(level: int, *, device=None) -> torch.Tensor:
    """``(K, 3, 3)`` rotations of an SO(3) grid level (see :class:`Stage`)."""
    if level < 0:
        return so3_grid(0, base_nside=1, base_n_psi=6, device=device)[0]
    return so3_grid(level, device=device)[0]


def _templates_ft(volume: torch.Tensor, rotations: torch.Tensor, L: int, batch: int = 512) -> torch.Tensor:
    prepared = prepare_projection_volume(volume, oversampling=2)
    parts = [project_prepared(prepared, rotations[i : i + batch], box_size=L, return_fourier=True)
             for i in range(0, len(rotations), batch)]
    return torch.cat(parts)


def _patch_batch(K: int, L: int, memory_bytes: int) -> int:
    """Patches per E-step batch: the three ``(n, K, 2L, 2L)`` buffers within ``memory_bytes``, and
    at most about 16 MiB each, where small-FFT batches run fastest (measured on CPU)."""
    per_patch = K * 4 * L * L * 4 * 3  # FFT product, log weights, posterior (float32)
    return max(1, min(int(memory_bytes // per_patch), int(3 * 16 * 1024**2 // per_patch)))


@dataclass
class _Sums:
    p_empty: float = 0.0
    log_likelihood: float = 0.0
    residual: float = 0.0
    n_patches: int = 0


@dataclass
class LocalSearch:
    """Coarse-to-fine rotations: each patch is first scored against the templates of a first pass, and
    only the stage's rotation pairs that its ``n_parents`` most probable units point to are scored at
    the stage's grid and box (the others get probability zero, as in RELION's adaptive oversampling).

    At SO(3) level ``>= 1`` the first pass is the parent level and ``children`` is ``(K_parent, 8)``,
    indices into the stage's rotations; with ``children`` None the first pass scores the stage's own
    rotations and its units are the stage's rotation pairs.  ``box_size`` is the first pass's box:
    below the stage's box it runs on the Fourier-cropped micrographs (a band-limited first pass, a
    quarter of the cost per rotation at half the box).

    ``n_sampled`` (with ``children`` None): besides its ``n_parents`` most probable pairs, each patch
    scores ``n_sampled`` pairs drawn uniformly (``generator``) from the others, each standing for
    ``(J - n_parents) / n_sampled`` of them (a stratified importance sample; :func:`_sampled_estep`).
    Keeping only the most probable pairs makes the posteriors nearly hard where the first pass cannot
    tell the rotations apart (at low SNR it ranks them almost at random) and the maps drifted; the
    sample keeps the E-step's sums unbiased over the pairs left out."""

    rotations: torch.Tensor
    children: torch.Tensor | None
    n_parents: int
    proj_ft: torch.Tensor | None = None
    box_size: int | None = None
    n_sampled: int = 0
    generator: torch.Generator | None = None


AUTO_COARSE_MIN_BOX = 32


def stage_coarse_box(stage: Stage, coarse_box: int | None) -> int:
    """The ``coarse_box`` a stage runs with: as given, or with None (``--coarse-box auto``) half the stage's box
    for stages at SO(3) level <= 0 of box >= ``AUTO_COARSE_MIN_BOX``, and 0 (no band-limited pass) otherwise."""
    if coarse_box is not None:
        return int(coarse_box)
    return stage.box_size // 2 if stage.so3_level <= 0 and stage.box_size >= AUTO_COARSE_MIN_BOX else 0


def coarse_box_for(L: int, coarse_box: int | None) -> int:
    """The first-pass box of a stage of box ``L``: ``coarse_box`` (even) when it is below ``L``, else ``L``."""
    return L if not coarse_box or coarse_box >= L else max(4, int(coarse_box) // 2 * 2)


def local_search(volume: torch.Tensor, level: int, L: int, n_parents: int | None,
                 turn: torch.Tensor | None = None, *, coarse_box: int | None = 0,
                 rotations: torch.Tensor | None = None, n_pairs: int | None = None, n_sampled: int = 0,
                 generator: torch.Generator | None = None) -> LocalSearch | None:
    """The :class:`LocalSearch` of a stage, or None for an exhaustive search.

    Level ``>= 1`` with ``n_parents``: the parent level, turned by ``turn`` ``(3, 3)`` as
    :func:`em_iteration` turns the stage's grid.  Level ``<= 0`` with a first-pass box below ``L``
    (:func:`coarse_box_for`) and ``n_pairs``: the stage's own ``rotations`` at that box, keeping the
    ``n_pairs`` most probable rotation pairs per patch and ``n_sampled`` drawn from the others
    (:class:`LocalSearch`).
    """
    Lc = coarse_box_for(L, coarse_box)
    first = volume
    if Lc < L:  # a projection sums L voxels of size D / L: keep the templates' pixel values
        from cryoscape.fourier.resample import downsample_volume

        first = downsample_volume(volume, Lc) * (L / Lc)
    if level >= 1 and n_parents:
        from cryoscape.geometry.so3_grid import so3_grid_children, so3_grid_resolution

        parents, ids = so3_grid(level - 1, device=volume.device)
        if turn is not None:
            parents = parents @ turn
        n_psi = so3_grid_resolution(level)[1]
        child = so3_grid_children(ids)
        children = child[..., 0] * n_psi + child[..., 1]
        n_parents = min(int(n_parents), len(parents))
        return LocalSearch(parents, children, n_parents, _templates_ft(first, parents, Lc), Lc)
    if level <= 0 and Lc < L and n_pairs and rotations is not None and 2 * (int(n_pairs) + n_sampled) < len(rotations):
        return LocalSearch(rotations, None, int(n_pairs), _templates_ft(first, rotations, Lc), Lc, int(n_sampled),
                           generator)
    return None


@dataclass
class _FirstPass:
    """A micrograph's first-pass terms: packed templates, energies, search, patches, noise variance."""

    t_ft: torch.Tensor
    energy: torch.Tensor
    search: LocalSearch
    patches: torch.Tensor
    sigma2: float

    def kept_pairs(self, estep: PatchEStep, start: int, stop: int):
        """``(pair_index (n, J), log_unseen (n,) or None)`` of patches ``start:stop`` (see :class:`PatchEStep`);
        with ``search.n_sampled`` the sampled pairs come last, as ``J_all + pair`` (:func:`_sampled_estep`)."""
        first = estep(self.patches[start:stop])
        n, search = stop - start, self.search
        mass = torch.view_as_real(first.posterior).sum((2, 3)).reshape(n, -1)  # per rotation
        if search.children is None and search.n_sampled:  # the most probable pairs and a uniform sample of the rest
            pair_mass = mass.reshape(n, -1, 2).sum(-1)
            J_all = pair_mass.shape[1]
            top = pair_mass.topk(search.n_parents, dim=1).indices
            draw = torch.rand(n, J_all, generator=search.generator).to(mass.device).scatter_(1, top, -1.0)
            return torch.cat([top, draw.topk(search.n_sampled, dim=1).indices + J_all], 1), None
        if search.children is None:  # units are the stage's rotation pairs
            kept, index = mass.reshape(n, -1, 2).sum(-1).topk(search.n_parents, dim=1)
        else:
            kept, top = mass[:, : self.energy.shape[0]].topk(search.n_parents, dim=1)
            index = (search.children[top][..., 0::2] // 2).reshape(n, -1)
        kept = kept.sum(1).clamp(min=1e-30)
        return index, torch.log1p(((1 - first.p_empty) - kept).clamp(min=0) / kept)


def _estep_micrograph(patches, t_ft, energy, *, sigma2, rho0, batch, sums: _Sums, m_step: bool = True,
                      parents: _FirstPass | None = None):
    """E-step (and M-step sums) for one micrograph's patches; returns ``(B (K, L, L), wbar (K,))``.

    ``parents`` turns on the coarse-to-fine search (:class:`LocalSearch`); the stage's rotations are
    scored in pairs ``(2j, 2j + 1)`` (two in-plane angles), the unit of :class:`PatchEStep`.
    """
    K, L = energy.shape[0], patches.shape[-1]
    estep = PatchEStep(t_ft, energy, sigma2=sigma2, rho0=rho0)
    J_all = estep.n_pairs
    coarse = None if parents is None else PatchEStep(parents.t_ft, parents.energy, sigma2=parents.sigma2, rho0=rho0)
    if parents is not None and parents.search.n_sampled:
        estep = _sampled_estep(estep, parents.search)
    b_ft, W = None, patches.new_zeros(K)
    for start in range(0, len(patches), batch):
        chunk, index, unseen = patches[start : start + batch], None, None
        if coarse is not None:
            index, unseen = parents.kept_pairs(coarse, start, start + len(chunk))
        res = estep(chunk, index, unseen)
        sums.p_empty += float(res.p_empty.sum())
        sums.log_likelihood += float(res.log_likelihood.double().sum())
        sums.residual += float(res.expected_residual.double().sum())
        sums.n_patches += len(chunk)
        if m_step:
            b_ft, w = backprojection_sums_ft(chunk, res.posterior, n_rotations=K, out=b_ft,
                                             pair_index=None if index is None else index % J_all)
            W += w
    if b_ft is None:
        return patches.new_zeros(K, L, L), W
    return unpack_sums(b_ft, K, L), W


def _sampled_estep(estep: PatchEStep, search: LocalSearch) -> PatchEStep:
    """``estep`` with every rotation pair ``j`` present twice: as ``j`` (a patch's most probable pairs) and as
    ``J + j``, its prior weight multiplied by ``(J - n_parents) / n_sampled`` (a pair of the uniform sample
    stands for that many pairs left out), so that the normalised posterior over a patch's kept and sampled
    pairs and "empty" estimates the exhaustive one without bias from the pairs left out."""
    weight = (estep.n_pairs - search.n_parents) / search.n_sampled
    estep.packed_conj = torch.cat([estep.packed_conj, estep.packed_conj])
    estep.offset = torch.cat([estep.offset, estep.offset - math.log(weight)])
    return estep


def _first_pass(source: MicrographPatches, g: int, chosen: torch.Tensor, search: LocalSearch, L: int,
                sigma2: float, patches: torch.Tensor, ctf: torch.Tensor) -> _FirstPass:
    """The first pass of micrograph ``g``'s ``chosen`` patches: at the stage's box, or band-limited."""
    Lc = search.box_size or L
    if Lc < L:
        patches, ctf = source.patches(g, Lc)[chosen].to(patches.device), source.ctf_image(g, Lc, device=patches.device)
        sigma2 = sigma2 * (Lc / L) ** 2  # white noise after Fourier cropping
    t_ft, energy = template_terms(ifft2_center(search.proj_ft * ctf).real)
    return _FirstPass(t_ft, energy, search, patches, sigma2)


def _choose(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    if fraction >= 1.0:
        return np.arange(n)
    k = max(1, int(round(fraction * n)))
    return np.sort(rng.choice(n, size=k, replace=False))


def em_iteration(
    volume: torch.Tensor,
    source: MicrographPatches,
    stage: Stage,
    *,
    rho0: float,
    sigma2: float,
    rng: np.random.Generator,
    regularization: float | str = 0.1,
    memory_bytes: int = 512 * 1024**2,
    micrographs: np.ndarray | None = None,
    previous_sums: torch.Tensor | None = None,
    progress: bool = False,
    align_rotation: bool = False,
    local_parents: int | None = None,
    half_volumes: torch.Tensor | None = None,
    turn_grid: bool = False,
    coarse_box: int | None = 0,
    coarse_pairs: int | None = None,
    coarse_sampled: int = 0,
    step: float | None = None,
) -> tuple[torch.Tensor, float, float, dict]:
    """One E- and M-step at ``stage``; returns ``(volume, rho0, sigma2, statistics)``.

    With a patch fraction ``f < 1`` the M-step's Fourier sums are a running average (stochastic
    approximation, step ``f``) of ``previous_sums`` and this iteration's sums scaled by ``1 / f``, so
    that the map rests on about the last ``1 / f`` iterations' patches rather than on one minibatch;
    ``statistics["sums"]`` holds the new average for the next iteration.  ``regularization="fsc"``
    sums even- and odd-numbered micrographs apart and filters the map by their FSC (see :func:`_m_step`);
    with ``half_volumes`` ``(2, L, L, L)`` as well, micrograph ``g`` is aligned against half-map ``g % 2``
    (gold standard) and ``statistics["half_volumes"]`` holds the new half-maps.  ``turn_grid`` turns the
    rotation grid by a random rotation drawn from ``rng`` (see the module docstring).  ``local_parents``,
    ``coarse_box`` (None: :func:`stage_coarse_box`), ``coarse_pairs`` and ``coarse_sampled`` set the
    coarse-to-fine search (:func:`local_search`; the sample is drawn with a generator seeded from ``rng``).  ``step``
    replaces ``f`` as the running average's step (e.g. ``1 / t`` at the stage's ``t``-th iteration: the
    mean of all its iterations' sums).
    """
    from tqdm.auto import tqdm

    device, L = volume.device, stage.box_size
    rotations, turn = _stage_grid(stage, rng, turn_grid, device)
    K = len(rotations)
    halves = 2 if (regularization == "fsc" or half_volumes is not None) and len(source) >= 2 else 1
    references = [volume] if half_volumes is None or halves < 2 else list(half_volumes)
    proj_ft = [_templates_ft(v, rotations, L) for v in references]
    acc = FourierAccumulator(L, n_sets=halves, oversampling=2, device=device)
    freqs = acc.frequencies_cycles_per_pixel
    num = torch.zeros(halves, K, freqs.shape[0], dtype=torch.complex64, device=device)
    den = torch.zeros(halves, K, freqs.shape[0], device=device)
    coarse_box = stage_coarse_box(stage, coarse_box)
    generator = None
    if coarse_sampled and coarse_box and stage.so3_level <= 0:
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    local = [local_search(v, stage.so3_level, L, local_parents, turn, coarse_box=coarse_box, rotations=rotations,
                          n_pairs=coarse_pairs, n_sampled=coarse_sampled, generator=generator) for v in references]
    batch, parents = _patch_batch(K, L, memory_bytes), None
    if local[0] is not None:
        search = local[0]
        fine = 2 * (search.n_parents + search.n_sampled) if search.children is None else 8 * search.n_parents
        batch = min(_patch_batch(len(search.rotations), search.box_size, memory_bytes),
                    _patch_batch(fine, L, memory_bytes))
    sums = _Sums()
    order = np.arange(len(source)) if micrographs is None else micrographs
    for g in tqdm(order, desc=f"E-step L={L} K={K}", disable=not progress, leave=False, dynamic_ncols=True):
        chosen = torch.from_numpy(_choose(source.n_patches(int(g)), stage.fraction, rng))
        patches = source.patches(int(g), L)[chosen].to(device)
        ctf = source.ctf_image(int(g), L, device=device)
        r = int(g) % len(references)  # with independent half-maps, each half is aligned against its own map
        t_ft, energy = template_terms(ifft2_center(proj_ft[r] * ctf).real)
        if local[r] is not None:
            parents = _first_pass(source, int(g), chosen, local[r], L, sigma2, patches, ctf)
        B, W = _estep_micrograph(patches, t_ft, energy, sigma2=sigma2, rho0=rho0, batch=batch, sums=sums,
                                 parents=parents)
        c = source.ctf_at(int(g), freqs, L)
        num[int(g) % halves] += acc.transform(B) * c
        den[int(g) % halves] += W[:, None] * (c * c)[None]
    result = _m_step(acc, rotations, num, den, stage=stage, previous_sums=previous_sums, step=step,
                     regularization=regularization, pixel_size_angstrom=source.pixel_size_at(L))
    return _iteration_outcome(result, sums, acc, volume, references, source, K=K, L=L, sigma2=sigma2,
                              align_rotation=align_rotation)


def _stage_grid(stage: Stage, rng: np.random.Generator, turn_grid: bool,
                device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stage's SO(3) grid, turned by a random rotation drawn from ``rng`` when ``turn_grid``
    (module docstring); returns ``(rotations, turn or None)``."""
    rotations = stage_rotations(stage.so3_level, device=device)
    if not turn_grid:
        return rotations, None
    from scipy.spatial.transform import Rotation

    turn = torch.as_tensor(Rotation.random(random_state=rng).as_matrix(), dtype=rotations.dtype, device=device)
    return rotations @ turn, turn


def _iteration_outcome(result, sums, acc, volume, references, source, *, K, L, sigma2, align_rotation):
    """:func:`em_iteration`'s return value from its M-step ``result`` and E-step ``sums``: the new map
    (recentred, optionally reoriented), ``rho0``, ``sigma2`` and the statistics."""
    n = max(sums.n_patches, 1)
    stats = {"n_patches": sums.n_patches, "n_rotations": K, "log_likelihood_per_patch": sums.log_likelihood / n,
             "sums": acc.sums.clone()}
    if result.fsc is not None:
        stats["half_fsc_0.5_angstrom"] = float(result.fsc["res_0.5_angstrom"])
        stats["half_fsc_auc"] = half_fsc_score(result.fsc["fsc"], source.box_size)
    new_rho0 = float(np.clip(sums.p_empty / n, 1e-4, 1 - 1e-4))
    new_sigma2 = max(sums.residual / (n * L * L), 1e-12 * sigma2)
    new = recentre(result.volume.to(volume.dtype), volume)
    if align_rotation:
        new, stats["turn_deg"] = reorient(new, volume)
    if len(references) == 2 and result.half_maps is not None:
        stats["half_volumes"] = torch.stack([recentre(result.half_maps[h].to(volume.dtype), references[h])
                                             for h in range(2)])
    return new, new_rho0, new_sigma2, stats


def half_fsc_score(fsc: torch.Tensor, box_size: int) -> float:
    """Area under a half-map FSC curve ``(L//2 + 1,)`` on the shells of the full box ``D`` (shells beyond the
    stage's band and negative correlations count as 0), so that stages of different boxes compare."""
    curve = torch.as_tensor(fsc, dtype=torch.float64)[1:].nan_to_num(0.0).clamp(min=0)
    return float(curve.sum() / (box_size // 2))


def _m_step(acc: FourierAccumulator, rotations, num, den, *, stage: Stage, previous_sums, regularization,
            pixel_size_angstrom: float, step: float | None = None):
    """Insert each rotation's summed slice ``(num, den)`` per half-set and solve the weighted least squares.

    ``regularization`` is a Wiener constant relative to the mean weight, or ``"fsc"``: the two
    half-sets (micrographs split by parity) are solved apart and the full map is Wiener-filtered
    with the spectral SNR their FSC implies (reconstruct/backproject.py), so shells that the data
    do not support are damped instead of feeding noise into the next E-step's templates.
    """
    keep = torch.nonzero(den.sum((0, 2)) > 0).reshape(-1)
    if len(keep) == 0:
        raise InputError("every patch was judged empty; check the initial map matches the micrographs "
                         "(box, pixel size, contrast) or lower --rho0.")
    coords = slice_coordinates(rotations[keep], acc.coordinates)
    for h in range(acc.n_sets):
        stacked = torch.stack([num[h].real[keep], num[h].imag[keep], den[h][keep]], dim=-1)
        scatter_trilinear(acc.sums[h : h + 1], coords, stacked)
        acc.count[h] += int(bool(den[h].sum() > 0))
    if stage.fraction < 1:
        acc.sums /= stage.fraction
    step = stage.fraction if step is None else float(step)
    if step < 1 and previous_sums is not None and previous_sums.shape == acc.sums.shape:
        acc.sums.mul_(step).add_(previous_sums.to(acc.sums.device), alpha=1 - step)
    return reconstruct_from_accumulator(acc, regularization=regularization, gridding_correction=True,
                                        pixel_size_angstrom=pixel_size_angstrom)


def recentre(volume: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``volume`` moved by the whole-voxel shift that best aligns it to ``previous`` (cross-correlation peak).

    Shifting the map and every particle's shift together leaves the likelihood unchanged, so only
    this keeps the map in the frame of the initial map (and inside the M-step's spherical mask).
    """
    L = volume.shape[-1]
    xcorr = torch.fft.irfftn(torch.fft.rfftn(volume) * torch.fft.rfftn(previous).conj(), s=volume.shape)
    shift = np.unravel_index(int(torch.argmax(xcorr)), xcorr.shape)
    shift = tuple(int(a) if a < L // 2 else int(a) - L for a in shift)
    return torch.roll(volume, shifts=tuple(-a for a in shift), dims=(0, 1, 2)) if any(shift) else volume


def rotate_volume(volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``(B, L, L, L)`` copies of a ``(L, L, L)`` map turned by ``(B, 3, 3)`` rotations about its centre (trilinear)."""
    L = volume.shape[-1]
    axis = (torch.arange(L, device=volume.device, dtype=volume.dtype) - L // 2) / (L / 2)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")[::-1], dim=-1)  # (z, y, x, [x, y, z])
    coords = torch.einsum("bij,zyxj->bzyxi", rotations.to(volume.dtype), grid) + 1.0 / L  # centre at index L // 2
    out = torch.nn.functional.grid_sample(volume.expand(len(rotations), 1, L, L, L), coords, mode="bilinear",
                                          padding_mode="zeros", align_corners=False)
    return out[:, 0]


def reorient(volume: torch.Tensor, previous: torch.Tensor, *, max_angle_deg: float = 20.0,
             steps_deg: tuple[float, ...] = (10.0, 3.0, 1.0)) -> tuple[torch.Tensor, float]:
    """``volume`` turned by the small rotation that best correlates it with ``previous``, and its angle (degrees).

    Like :func:`recentre` for shifts: a map turned as a whole, with every particle's rotation turned
    back, has the same likelihood, and on a discrete rotation grid nothing pins that gauge from one
    iteration to the next.  Off by default (``--reorient``): on the benchmark's micrographs it did not
    raise the FSC to the truth (README, "From micrographs").  Searched coarse to fine over rotation
    vectors: a cube of ``max_angle_deg`` at the first step, then +-1 step around the best at each finer one.
    """
    from cryoscape.geometry.rotations import rotvec_to_matrix

    best, span = torch.zeros(3, dtype=torch.float64), max_angle_deg
    ref = previous / previous.norm().clamp(min=1e-30)
    for step in steps_deg:
        n = int(span // step)
        offsets = torch.arange(-n, n + 1, dtype=torch.float64) * step
        cube = torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3)
        candidates = best + torch.deg2rad(cube)
        turned = rotate_volume(volume, rotvec_to_matrix(candidates).to(volume.device))
        score = (turned * ref).sum((1, 2, 3)) / turned.flatten(1).norm(dim=1).clamp(min=1e-30)
        best, span = candidates[int(torch.argmax(score))], step
    angle = float(torch.rad2deg(best.norm()))
    if angle < 0.5 * steps_deg[-1]:
        return volume, 0.0
    return rotate_volume(volume, rotvec_to_matrix(best[None]).to(volume.device))[0], angle


def fit_initial_scale(
    volume: torch.Tensor, source: MicrographPatches, stage: Stage, *, rho0: float, sigma2: float,
    n_patches: int = 64, memory_bytes: int = 512 * 1024**2,
) -> float:
    """The power of two ``a`` maximising the likelihood of the first ``n_patches`` patches under ``a * volume``."""
    L = stage.box_size
    rotations = stage_rotations(stage.so3_level, device=volume.device)
    proj_ft = _templates_ft(volume, rotations, L)
    batch = _patch_batch(len(rotations), L, memory_bytes)
    scores: dict[int, float] = {}
    for exponent in [*range(-12, 13, 2), None, None]:
        if exponent is None:  # refine around the best even exponent
            best = max(scores, key=scores.get)
            exponent = next((e for e in (best - 1, best + 1) if e not in scores), best)
        if exponent in scores:
            continue
        a = 2.0**exponent
        sums, left, g = _Sums(), n_patches, 0
        while left > 0 and g < len(source):
            templates = a * ifft2_center(proj_ft * source.ctf_image(g, L, device=volume.device)).real
            t_ft, energy = template_terms(templates)
            patches = source.patches(g, L)[:left].to(volume.device)
            _estep_micrograph(patches, t_ft, energy, sigma2=sigma2, rho0=rho0, batch=batch, sums=sums, m_step=False)
            left, g = left - len(patches), g + 1
        scores[exponent] = sums.log_likelihood
    return 2.0 ** max(scores, key=scores.get)


def compare_to_reference(volume: torch.Tensor, reference: torch.Tensor, pixel_size_angstrom: float) -> dict:
    """FSC of ``volume`` (upsampled to the reference's box) to ``reference``: curve, 0.5 resolution, AUC."""
    D = reference.shape[-1]
    v = volume if volume.shape[-1] == D else upsample_volume(volume, D)
    freqs, curve = fourier_shell_correlation(v.double().cpu(), reference.double().cpu())
    res = resolution_at_threshold(freqs, curve, 0.5)
    return {"freqs": freqs, "fsc": curve, "fsc_auc": float(fsc_auc(curve)),
            "res_0.5_angstrom": float(frequency_to_angstrom(res, pixel_size_angstrom))}


# ----------------------------------------------------------------------------------------------
# the run: stages, per-iteration log, checkpoints
# ----------------------------------------------------------------------------------------------
CHECKPOINT_NAME = "checkpoint.pt"
LOG_COLUMNS = ("iteration", "stage", "box", "band_limit_angstrom", "n_rotations", "n_patches", "rho0", "sigma",
               "log_likelihood_per_patch", "half_fsc_0.5_angstrom", "half_fsc_auc", "turn_deg", "fsc_0.5_angstrom",
               "fsc_auc", "wall_s")


def save_checkpoint(path: Path, state: EMState, schedule: list[Stage]) -> None:
    """Write the state atomically (temporary file, then ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    payload |= {"volume": state.volume.cpu(), "schedule": [dataclasses.asdict(s) for s in schedule]}
    if state.half_volumes is not None:
        payload["half_volumes"] = state.half_volumes.cpu()
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, schedule: list[Stage], device) -> EMState:
    """The state saved by :func:`save_checkpoint`; the schedule must be the same."""
    if not path.is_file():
        raise InputError(f"{path} was not found; run without --resume first (or pass the output folder of a run).")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("schedule") != [dataclasses.asdict(s) for s in schedule]:
        raise InputError(f"{path} was written with another stage schedule; resume with the same options.")
    payload.pop("schedule")
    payload["volume"] = payload["volume"].to(device)
    if payload.get("half_volumes") is not None:
        payload["half_volumes"] = payload["half_volumes"].to(device)
    return EMState(**payload)


def _write_log(path: Path, history: list[dict]) -> None:
    lines = ["\t".join(LOG_COLUMNS)]
    for row in history:
        lines.append("\t".join(f"{row.get(c, float('nan')):.6g}" if isinstance(row.get(c), float) else str(row.get(c, "nan"))
                               for c in LOG_COLUMNS))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _start_stage(state: EMState, old: Stage | None, new: Stage) -> None:
    """Carry the map and the noise level from one stage's box to the next."""
    if old is None or old.box_size == new.box_size:
        return
    # a projection sums L voxels of size D / L: keep the templates' values when L grows
    state.volume = upsample_volume(state.volume, new.box_size) * (old.box_size / new.box_size)
    if state.half_volumes is not None:
        state.half_volumes = torch.stack([upsample_volume(v, new.box_size) for v in state.half_volumes]) * (
            old.box_size / new.box_size)
    state.sigma2 *= (new.box_size / old.box_size) ** 2  # white noise after Fourier cropping


def _record(state: EMState, stage: Stage, source, stats: dict, reference, started: float) -> dict:
    pixel = source.pixel_size_at(stage.box_size)
    row = {"iteration": len(state.history) + 1, "stage": state.stage_index + 1, "box": stage.box_size,
           "band_limit_angstrom": 2 * pixel, "n_rotations": stats["n_rotations"], "n_patches": stats["n_patches"],
           "rho0": state.rho0, "sigma": math.sqrt(state.sigma2),
           "log_likelihood_per_patch": stats["log_likelihood_per_patch"], "wall_s": time.perf_counter() - started}
    row |= {k: stats[k] for k in ("half_fsc_0.5_angstrom", "half_fsc_auc", "turn_deg") if k in stats}
    if reference is not None:
        cmp = compare_to_reference(state.volume, reference, source.pixel_size_angstrom)
        row["fsc_0.5_angstrom"], row["fsc_auc"] = cmp["res_0.5_angstrom"], cmp["fsc_auc"]
    log.info("iteration %d (stage %d, box %d, %.1f A, K=%d, %d patches): rho0 %.3f, sigma %.4g, log-lik/patch %.6g%s, %.1f s",
             row["iteration"], row["stage"], stage.box_size, row["band_limit_angstrom"], row["n_rotations"],
             row["n_patches"], state.rho0, row["sigma"], row["log_likelihood_per_patch"],
             f", FSC=0.5 at {row['fsc_0.5_angstrom']:.1f} A (AUC {row['fsc_auc']:.3f})" if reference is not None else "",
             row["wall_s"])
    return row


def _initial_state(initial: torch.Tensor, source: MicrographPatches, schedule: list[Stage], *, rho0: float,
                   sigma: float | None, memory_bytes: int) -> EMState:
    from cryoscape.fourier.resample import downsample_volume

    first = schedule[0]
    L = first.box_size
    volume = initial if L == initial.shape[-1] else downsample_volume(initial, L)
    sample = torch.cat([source.patches(g, L) for g in range(min(4, len(source)))])
    sigma2 = float(sample.var()) if sigma is None else (sigma * L / source.box_size) ** 2
    scale = fit_initial_scale(volume, source, first, rho0=rho0, sigma2=sigma2, memory_bytes=memory_bytes)
    log.info("initial map scaled by %g (maximum likelihood over powers of two); sigma %.4g at box %d", scale,
             math.sqrt(sigma2), L)
    return EMState(volume=volume * scale, rho0=rho0, sigma2=sigma2)


def run_micrograph_em(
    table: MicrographTable,
    initial_map: torch.Tensor,
    *,
    box_size: int,
    out_dir: str | os.PathLike,
    schedule: list[Stage] | None = None,
    reference: torch.Tensor | None = None,
    rho0: float = 0.5,
    sigma: float | None = None,
    regularization: float | str = 0.1,
    local_parents: int | None = 24,
    coarse_box: int | None = None,
    coarse_pairs: int | None = 16,
    coarse_sampled: int = 48,
    average: str = "all",
    align_rotation: bool = False,
    independent_halves: bool = False,
    turn_grid: bool = True,
    use_ctf: bool = True,
    seed: int = 0,
    resume: bool = False,
    device: torch.device | str = "cpu",
    memory_bytes: int = 512 * 1024**2,
    progress: bool = False,
) -> EMState:
    """Run the micrograph EM and write ``map.mrc``, ``iterations.tsv``, ``fsc.txt`` and ``checkpoint.pt``.

    ``initial_map`` and ``reference`` are ``(D, D, D)`` at the micrographs' pixel size; ``sigma``
    fixes the noise level of the full-size micrographs' pixels (estimated when None).
    ``independent_halves`` keeps one half-map per half-set of micrographs, each aligned against its own (the
    log gains their FSC; with ``regularization="fsc"`` it filters the map); ``turn_grid`` turns the SO(3) grid
    every iteration (module docstring); ``average="all"`` makes each stage's M-step sums the mean over all
    its iterations so far, ``"window"`` a running average over about ``1 / fraction`` of them;
    ``local_parents``, ``coarse_box`` (None: half the box of level-0 stages of box >= 32, :func:`stage_coarse_box`;
    0: off), ``coarse_pairs`` and ``coarse_sampled`` set the coarse-to-fine search (:func:`local_search`).
    """
    out = Path(out_dir)
    schedule = schedule or default_schedule(box_size)
    source = MicrographPatches(table, box_size, out / "cache", use_ctf=use_ctf)
    device = torch.device(device)
    initial_map = initial_map.to(device=device, dtype=torch.float32)
    if resume:
        state = load_checkpoint(out / CHECKPOINT_NAME, schedule, device)
    else:
        state = _initial_state(initial_map, source, schedule, rho0=rho0, sigma=sigma, memory_bytes=memory_bytes)
    rng = np.random.default_rng(seed)
    if state.rng_state is not None:
        rng.bit_generator.state = state.rng_state
    started = time.perf_counter() - (state.history[-1]["wall_s"] if state.history else 0.0)
    if independent_halves and len(source) >= 2 and state.half_volumes is None and not state.history:
        state.half_volumes = torch.stack([state.volume, state.volume])
    while state.stage_index < len(schedule):
        stage = schedule[state.stage_index]
        while state.iteration_in_stage < stage.iterations:
            state.volume, state.rho0, state.sigma2, stats = em_iteration(
                state.volume, source, stage, rho0=state.rho0, sigma2=state.sigma2, rng=rng,
                regularization=regularization, memory_bytes=memory_bytes, previous_sums=state.sums,
                progress=progress, local_parents=local_parents, align_rotation=align_rotation,
                coarse_box=coarse_box, coarse_pairs=coarse_pairs, coarse_sampled=coarse_sampled, half_volumes=state.half_volumes,
                turn_grid=turn_grid, step=1.0 / (state.iteration_in_stage + 1) if average == "all" else None)
            state.sums = stats.pop("sums").cpu()
            if state.half_volumes is not None:
                state.half_volumes = stats.pop("half_volumes")
            if sigma is not None:  # a given noise level stays fixed (in the stage's pixels)
                state.sigma2 = (sigma * stage.box_size / box_size) ** 2
            state.iteration_in_stage += 1
            state.history.append(_record(state, stage, source, stats, reference, started))
            state.rng_state = rng.bit_generator.state
            save_checkpoint(out / CHECKPOINT_NAME, state, schedule)
            _write_log(out / "iterations.tsv", state.history)
        state.stage_index += 1
        state.iteration_in_stage, state.sums = 0, None
        if state.stage_index < len(schedule):
            _start_stage(state, stage, schedule[state.stage_index])
        save_checkpoint(out / CHECKPOINT_NAME, state, schedule)
    _write_final_map(out, state.volume, box_size, source.pixel_size_angstrom, reference)
    return state


def _write_final_map(out: Path, volume: torch.Tensor, box_size: int, pixel_size_angstrom: float,
                     reference: torch.Tensor | None) -> None:
    """``map.mrc`` at the full box (upsampled from the last stage's) and, given the truth, ``fsc.txt``."""
    from cryoscape.fourier.fsc import write_fsc_txt
    from cryoscape.io.mrc import write_mrc

    final = volume if volume.shape[-1] == box_size else upsample_volume(volume, box_size)
    write_mrc(out / "map.mrc", final.cpu().numpy(), pixel_size_angstrom=pixel_size_angstrom)
    if reference is not None:
        cmp = compare_to_reference(final, reference, pixel_size_angstrom)
        write_fsc_txt(out / "fsc.txt", cmp["freqs"], cmp["fsc"], pixel_size_angstrom)
