"""3-D auto-refinement by expectation-maximisation with gold-standard half-sets (RELION's scheme).

One iteration (lecture seed 000; /work/shared/notes/classical_em.md):

1. **E-step** per half-set against its own half-map (:mod:`cryoscape.classical.em`): posterior
   of every image over the pose grid, global search at first, local around the previous pose
   from ``local_from_level`` on (a window of one step of ``local_window_level``, 3.75 degrees,
   refined level by level), band-limited to the current resolution plus ``band_margin_shells``.
   From the second iteration on the references are multiplied by a solvent mask made from the
   last joined map (``auto_mask``: low-passed to ``mask_lowpass_angstrom``, thresholded, dilated
   by ``mask_dilate_pixel``, soft edge of ``mask_edge_pixel``;
   :func:`cryoscape.reconstruct.postprocess.solvent_mask`), RELION's ``--solvent_mask``: the
   solvent's noise otherwise enters every likelihood (the molecule fills a few percent of the
   box, the spherical mask 40 %).  The mask hugs the density (10 A, 1 pixel, 3 pixels rather than
   postprocess's looser 15 A, 3, 6): every voxel of noise it lets through is compared with every
   image, while density it trims at 10 A costs only the faint outer edge.
2. **M-step**: each image is inserted at its significant poses with weight
   ``posterior / sigma^2(|k|)`` (:class:`cryoscape.reconstruct.backproject.FourierAccumulator`);
   the half-maps are MAP estimates with the per-shell prior ``tau^2`` from their FSC times ``T``
   (``tau2_fudge``).  The per-shell noise power ``sigma^2`` is the mean residual power at each
   image's best pose.
3. **Schedule**: the half-map FSC (0.143) sets the next band; when the resolution stops
   improving by ``min_improvement_shells`` the angular grid is refined by one level (and the shift
   step halves); at ``max_level`` ``finest_level_iterations`` (4) iterations without improvement
   in which the median pose change is below the grid spacing end the run.

The state after each iteration is written atomically (``checkpoint.pt``), so a run resumes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cryoscape.fourier.filters import lowpass_filter
from cryoscape.fourier.shift import phase_shift_coords
from cryoscape.geometry.rotations import rotation_angle_between
from cryoscape.geometry.symmetry import symmetry_group
from cryoscape.geometry.so3_grid import base_grid_spacing_deg
from cryoscape.reconstruct.postprocess import solvent_mask
from cryoscape.reconstruct.backproject import (
    FourierAccumulator,
    reconstruct_from_accumulator,
    split_halves,
)
from cryoscape.classical.em import Reference, SearchSchedule, estimate_scale, search_batch

__all__ = ["RefineSettings", "ImageSource", "CentredImages", "RefineState", "refine", "noise_spectrum_from_images"]

log = logging.getLogger(__name__)


@dataclass
class RefineSettings:
    """Options of :func:`refine` (defaults follow RELION's 3D auto-refine where they apply)."""

    initial_lowpass_angstrom: float = 40.0
    max_iterations: int = 20
    tau2_fudge: float = 1.0
    start_level: int = 2
    coarse_level: int = 1
    max_level: int = 5
    local_from_level: int = 3
    local_window_level: int = 3
    auto_mask: bool = True
    mask_lowpass_angstrom: float = 10.0
    mask_dilate_pixel: float = 1.0
    mask_edge_pixel: float = 3.0
    pose_change_tolerance_deg: float | None = None
    finest_level_iterations: int = 4
    offset_range_pixel: float = 3.0
    offset_step_pixel: float = 1.0
    band_margin_shells: float = 3.0
    min_improvement_shells: float = 0.5
    coarse_radius: float = 12.0
    sphere_mask_fraction: float = 0.45
    batch_size: int = 64
    seed: int = 0
    symmetry: str = "C1"
    final_pose_pass: bool = True
    final_pose_max_poses: int = 64
    final_pose_reference: str = "joined"


class ImageSource:
    """Images and CTFs of a particle set as half-plane Fourier coefficients (oversampling 1).

    ``read(indices) -> (B, D, D)`` float32 images; ``ctf(indices, freqs) -> (B, P)`` or ``None``.
    Its images are read (and transformed) at every :meth:`batch`: the data set may be larger than
    memory.  ``centred`` is False: the callers shift each batch to its particles' centres.
    """

    centred = False

    def __init__(self, read: Callable[[np.ndarray], np.ndarray], box_size: int, *, ctf=None,
                 invert_contrast: bool = True, device: torch.device | str = "cpu", band_radius: float | None = None):
        self.read, self.box_size, self._ctf, self.invert = read, int(box_size), ctf, invert_contrast
        self.device, self.band_radius = torch.device(device), band_radius
        probe = FourierAccumulator(self.box_size, n_sets=1, device="cpu", band_radius=band_radius)
        self.coords = probe.coordinates  # (P, 2)
        self._rfft_index = probe._rfft_index
        radius = self.coords.norm(dim=-1)
        self.shell = radius.round().long().clamp(max=self.box_size // 2)

    def band_limited(self, radius: float | None) -> "ImageSource":
        """The same images at the pixels inside ``radius`` (Fourier pixels) only: an E-step that
        uses no higher frequency costs that fraction of the pixels (RELION's adaptive image size)."""
        return ImageSource(self.read, self.box_size, ctf=self._ctf, invert_contrast=self.invert, device=self.device,
                           band_radius=radius)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images_ft (B, P) complex64, ctf (B, P) float32)`` of the given particles."""
        images = torch.as_tensor(self.read(indices), dtype=torch.float32)
        if self.invert:
            images = -images
        from cryoscape.reconstruct.backproject import origin_first_padded

        spectrum = torch.fft.rfft2(origin_first_padded(images, self.box_size))
        values = spectrum.reshape(len(indices), -1)[:, self._rfft_index]
        if self._ctf is None:
            ctf = torch.ones(values.shape, dtype=torch.float32)
        else:
            ctf = self._ctf(indices, self.coords / self.box_size).to(torch.float32)
        return values, ctf

    def subset(self, members: np.ndarray) -> "ImageSource":
        """The images ``members`` as a source of their own (index ``i`` reads ``members[i]``)."""
        members = np.asarray(members)
        ctf = None if self._ctf is None else (lambda idx, freqs: self._ctf(members[idx], freqs))
        return ImageSource(lambda idx: self.read(members[idx]), self.box_size, ctf=ctf,
                           invert_contrast=self.invert, device=self.device, band_radius=self.band_radius)


class CentredImages:
    """Every image's half-plane coefficients, already shifted to its particle's centre, and its
    CTF, held in memory: the source of EM iterations whose poses and shifts stay fixed
    (``classify --no-align``), which would otherwise read, transform, evaluate the CTF and shift
    every image again at every iteration.  Same interface as :class:`ImageSource` (``batch``,
    ``band_limited``, ``subset``, ``coords``, ``shell``, ``box_size``, ``band_radius``), with
    ``centred`` True: callers must not shift its batches again.

    Build with :meth:`from_source`, which declines (returns ``None``) above a memory budget so
    larger data sets keep streaming.
    """

    centred = True

    def __init__(self, values: torch.Tensor, ctf: torch.Tensor, box_size: int, band_radius: float | None,
                 full: "CentredImages | None" = None):
        self.values, self.ctf_values, self.box_size, self.band_radius = values, ctf, int(box_size), band_radius
        probe = FourierAccumulator(self.box_size, n_sets=1, device="cpu", band_radius=band_radius)
        self.coords = probe.coordinates
        self.shell = self.coords.norm(dim=-1).round().long().clamp(max=self.box_size // 2)
        self._full = self if full is None else full  # the widest band held, for band_limited()

    @classmethod
    def from_source(cls, source: ImageSource, shifts_pixel, *, max_bytes: float,
                    batch_size: int = 256) -> "CentredImages | None":
        """Read ``source`` once and centre every image by ``shifts_pixel (N, 2)``; ``None`` when
        the coefficients and CTFs (12 bytes per pixel) would exceed ``max_bytes``."""
        n, P = len(shifts_pixel), len(source.coords)
        if n * P * 12 > max_bytes:
            return None
        shifts = torch.as_tensor(np.asarray(shifts_pixel), dtype=torch.float32)
        values = torch.empty(n, P, dtype=torch.complex64)
        ctf = torch.empty(n, P, dtype=torch.float32)
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            x, c = source.batch(idx)
            values[idx] = phase_shift_coords(x, source.coords, shifts[idx], source.box_size)
            ctf[idx] = c
        return cls(values, ctf, source.box_size, source.band_radius)

    @property
    def nbytes(self) -> int:
        """Memory held by the widest band (the narrower ones are copies of part of it)."""
        return self._full.values.numel() * 8 + self._full.ctf_values.numel() * 4

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centred images_ft (B, P) complex64, ctf (B, P) float32)`` of the given particles
        (views for a run of consecutive indices, as EM's batches are)."""
        indices = np.asarray(indices)
        if len(indices) and np.array_equal(indices, np.arange(indices[0], indices[0] + len(indices))):
            rows = slice(int(indices[0]), int(indices[0]) + len(indices))
            return self.values[rows], self.ctf_values[rows]
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.values[idx], self.ctf_values[idx]

    def band_limited(self, radius: float | None) -> "CentredImages":
        """The pixels inside ``radius`` only (a subset of the widest band held: it must lie inside it)."""
        full = self._full
        if radius is None or (full.band_radius is not None and radius >= full.band_radius):
            return full
        keep = full.coords.norm(dim=-1) < radius
        return CentredImages(full.values[:, keep], full.ctf_values[:, keep], full.box_size, radius, full=full)

    def subset(self, members: np.ndarray) -> "CentredImages":
        """The images ``members`` (copied: index ``i`` is ``members[i]``), with the same bands."""
        idx = torch.as_tensor(np.asarray(members), dtype=torch.long)
        full = self._full
        root = CentredImages(full.values[idx], full.ctf_values[idx], full.box_size, full.band_radius)
        return root if self is full else root.band_limited(self.band_radius)


def noise_spectrum_from_images(source: ImageSource, indices: np.ndarray, *, batch_size: int = 256) -> torch.Tensor:
    """Initial ``sigma^2`` per shell: the images' mean power per shell (mostly noise at low SNR)."""
    n = source.box_size // 2 + 1
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    for start in range(0, len(indices), batch_size):
        x, _ = source.batch(indices[start : start + batch_size])
        power = (x.real.square() + x.imag.square()).to(torch.float64).sum(0)
        total.index_add_(0, source.shell, power)
        count.index_add_(0, source.shell, torch.full_like(power, len(x[:, 0])))
    return (total / count.clamp_min(1)).clamp_min(1e-12).to(torch.float32)


@dataclass
class RefineState:
    """Everything a run needs to continue (saved in ``checkpoint.pt``)."""

    iteration: int
    level: int
    local: bool
    half_maps: torch.Tensor  # (2, D, D, D) float32
    sigma2: torch.Tensor  # (D//2 + 1,)
    rotations: torch.Tensor  # (N, 3, 3)
    shifts_pixel: torch.Tensor  # (N, 2)
    best_ids: torch.Tensor  # (N, 2) at ``ids_level``
    ids_level: int
    max_probability: torch.Tensor  # (N,)
    sets: np.ndarray  # (N,) half-set
    band_radius: float
    best_resolution_shell: float = 0.0
    stalls: int = 0
    reference_mask: torch.Tensor | None = None  # (D, D, D) solvent mask of the E-step's references
    history: list = field(default_factory=list)
    converged: bool = False
    final_map: torch.Tensor | None = None
    fsc: dict | None = None
    poses_polished: bool = False

    def save(self, path: Path) -> None:
        """Write atomically (temporary file, then rename)."""
        tmp = path.with_suffix(".tmp")
        torch.save(asdict(self), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "RefineState":
        return cls(**torch.load(path, weights_only=False))


def _estep_half(source, ref, indices, state, schedule, acc, half, residual, pixels_inv_sigma2, bs):
    """E-step of one half-set and its insertion into ``acc``; updates the state's poses in place."""
    band = source.coords.norm(dim=-1) < state.band_radius
    coords_b = source.coords[band]
    for start in range(0, len(indices), bs):
        idx = indices[start : start + bs]
        x, ctf = source.batch(idx)
        post = search_batch(
            ref, x[:, band], ctf[:, band], pixels_inv_sigma2[band], coords_b, schedule,
            prior_shifts_pixel=state.shifts_pixel[idx], prior_rotations=state.rotations[idx],
        )
        _insert(acc, source, x, ctf, post, pixels_inv_sigma2, half)
        _accumulate_residual(residual, source, ref, x, ctf, post)
        t = torch.as_tensor(idx)
        mean_rotation, mean_shift = post.mean_pose()
        state.rotations[t] = mean_rotation.to(state.rotations.dtype)
        state.shifts_pixel[t] = mean_shift.to(state.shifts_pixel.dtype)
        state.best_ids[t] = post.best_ids
        state.max_probability[t] = post.weights[:, 0]


def _insert(acc, source, x, ctf, post, inv_sigma2, half) -> None:
    """Weighted insertion of every (image, significant pose) pair."""
    B, M = post.weights.shape
    img, pose = (post.weights > 0).nonzero(as_tuple=True)
    values = phase_shift_coords(x[img], source.coords, post.shifts_pixel[img, pose], source.box_size)
    weights = post.weights[img, pose][:, None] * inv_sigma2[None, :]
    acc.add(values, post.rotations[img, pose], ctf=ctf[img], sets=torch.full((len(img),), half), weights=weights)


def _accumulate_residual(residual, source, ref, x, ctf, post) -> None:
    """Add ``|X_t - c S|^2`` at each image's best pose to the per-shell sums ``residual (2, S)``."""
    s = ref.slices(post.rotations[:, 0], source.coords)
    xt = phase_shift_coords(x, source.coords, post.shifts_pixel[:, 0], source.box_size)
    diff = xt - ctf * s
    power = (diff.real.square() + diff.imag.square()).to(torch.float64).sum(0)
    residual[0].index_add_(0, source.shell, power)
    residual[1].index_add_(0, source.shell, torch.full_like(power, x.shape[0]))


def _schedule_for(state: RefineState, settings: RefineSettings) -> SearchSchedule:
    return SearchSchedule(
        level=state.level, local=state.local, coarse_level=settings.coarse_level,
        local_start_level=min(settings.local_window_level, state.level - 1),
        offset_range_pixel=settings.offset_range_pixel, offset_step_pixel=settings.offset_step_pixel,
        coarse_radius=min(settings.coarse_radius, state.band_radius),
    )


def initial_state(source: ImageSource, n: int, initial_map: torch.Tensor, pixel_size_angstrom: float,
                  settings: RefineSettings, *, initial_shifts_pixel: np.ndarray | None = None) -> RefineState:
    """Low-pass the initial map, put it on the data's grey scale, split the halves, estimate sigma^2."""
    D = source.box_size
    volume = lowpass_filter(initial_map.to(torch.float32), settings.initial_lowpass_angstrom, pixel_size_angstrom,
                            ndim=3)
    rng = np.random.default_rng(settings.seed)
    sample = np.sort(rng.choice(n, size=min(n, 1000), replace=False))
    sigma2 = noise_spectrum_from_images(source, sample)
    x, ctf = source.batch(sample[:200])
    radius = D * pixel_size_angstrom / settings.initial_lowpass_angstrom
    scale = estimate_scale(Reference.from_volume(volume), x, ctf, source.coords, radius=max(radius, 4.0),
                           offset_range_pixel=settings.offset_range_pixel)
    log.info("initial map scaled by %.4g to the data's grey scale", scale)
    volume = volume * scale
    shifts = torch.zeros(n, 2) if initial_shifts_pixel is None else torch.as_tensor(initial_shifts_pixel,
                                                                                    dtype=torch.float32)
    return RefineState(
        iteration=0, level=settings.start_level, local=False, half_maps=torch.stack([volume, volume]),
        sigma2=sigma2, rotations=torch.eye(3).repeat(n, 1, 1), shifts_pixel=shifts.clone(),
        best_ids=torch.zeros(n, 2, dtype=torch.long), ids_level=settings.start_level,
        max_probability=torch.zeros(n), sets=split_halves(n, seed=settings.seed),
        band_radius=min(D / 2, radius + settings.band_margin_shells),
    )


def run_iteration(source: ImageSource, state: RefineState, settings: RefineSettings, pixel_size_angstrom: float,
                  *, progress: Callable[[int], None] | None = None) -> dict:
    """One E- and M-step; updates ``state`` and returns the iteration's summary."""
    started = time.perf_counter()
    D = source.box_size
    previous = state.rotations.clone()
    schedule = _schedule_for(state, settings)
    acc = FourierAccumulator(D, n_sets=2)
    residual = torch.zeros(2, D // 2 + 1, dtype=torch.float64)
    inv_sigma2 = (1.0 / state.sigma2)[source.shell]
    for half in range(2):
        reference = state.half_maps[half]
        ref = Reference.from_volume(reference if state.reference_mask is None else reference * state.reference_mask)
        indices = np.flatnonzero(state.sets == half)
        _estep_half(source, ref, indices, state, schedule, acc, half, residual, inv_sigma2, settings.batch_size)
        if progress:
            progress(len(indices))
    state.ids_level = state.level
    if settings.symmetry.upper() != "C1":  # the E-step searched all of SO(3); the M-step symmetrises
        acc.apply_symmetry_(symmetry_group(settings.symmetry))
    result = reconstruct_from_accumulator(acc, regularization="fsc", tau2_fudge=settings.tau2_fudge,
                                          sphere_mask_radius_fraction=settings.sphere_mask_fraction,
                                          pixel_size_angstrom=pixel_size_angstrom)
    state.half_maps = result.half_maps
    state.final_map, state.fsc = result.volume, result.fsc
    if settings.auto_mask:
        mask = solvent_mask(result.volume, pixel_size_angstrom, lowpass_angstrom=settings.mask_lowpass_angstrom,
                            dilate_pixel=settings.mask_dilate_pixel, edge_width_pixel=settings.mask_edge_pixel)
        state.reference_mask = mask if float(mask.sum()) >= 1.0 else None  # an empty map gives no mask
    state.sigma2 = (residual[0] / residual[1].clamp_min(1)).clamp_min(1e-12).to(torch.float32)
    res_shell = float(result.fsc["res_0.143"]) * D
    change = rotation_angle_between(previous.double(), state.rotations.double())
    summary = {
        "iteration": state.iteration + 1, "level": state.level, "local": state.local,
        "spacing_deg": base_grid_spacing_deg(state.level), "band_radius": state.band_radius,
        "resolution_angstrom": float(result.fsc["res_0.143_angstrom"]), "resolution_shell": res_shell,
        "median_pose_change_deg": float(torch.rad2deg(change).median()),
        "mean_max_probability": float(state.max_probability.mean()),
        "seconds": time.perf_counter() - started,
    }
    _advance(state, settings, res_shell, D, summary["median_pose_change_deg"])
    state.iteration += 1
    state.history.append(summary)
    return summary


def _advance(state: RefineState, settings: RefineSettings, res_shell: float, D: int, pose_change_deg: float) -> None:
    """The schedule: next band, finer grid when the resolution stalls, convergence.

    At the finest level the run ends after ``finest_level_iterations`` iterations without a
    resolution gain in which the median pose change was also below ``pose_change_tolerance_deg``
    (default: the grid spacing), or after that many and at least four whatever the poses do.
    Iterations there no longer move the resolution but still sharpen the poses a little, which
    is why more than two are run."""
    improved = res_shell > state.best_resolution_shell + settings.min_improvement_shells
    state.best_resolution_shell = max(state.best_resolution_shell, res_shell)
    state.band_radius = min(D / 2, state.best_resolution_shell + settings.band_margin_shells)
    if improved:
        state.stalls = 0
        return
    if state.level < settings.max_level:
        state.level += 1
        state.local = state.level >= settings.local_from_level
        state.stalls = 0
        return
    tolerance = settings.pose_change_tolerance_deg
    if tolerance is None:
        tolerance = base_grid_spacing_deg(state.level)
    state.stalls += 1
    needed = settings.finest_level_iterations
    state.converged = (state.stalls >= needed and pose_change_deg < tolerance) or state.stalls >= max(4, needed)


def refine(source: ImageSource, n: int, initial_map: torch.Tensor, pixel_size_angstrom: float,
           settings: RefineSettings, *, checkpoint: Path | None = None, resume: bool = False,
           initial_shifts_pixel: np.ndarray | None = None, on_iteration=None) -> RefineState:
    """Run (or resume) a refinement to convergence or ``max_iterations``; see the module docstring."""
    if resume and checkpoint is not None and checkpoint.exists():
        state = RefineState.load(checkpoint)
        log.info("resuming after iteration %d", state.iteration)
    else:
        state = initial_state(source, n, initial_map, pixel_size_angstrom, settings,
                              initial_shifts_pixel=initial_shifts_pixel)
    while not state.converged and state.iteration < settings.max_iterations:
        summary = run_iteration(source, state, settings, pixel_size_angstrom)
        log.info("iteration %d: %s", summary["iteration"],
                 ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
        if checkpoint is not None:
            state.save(checkpoint)
        if on_iteration is not None:
            on_iteration(state, summary)
    if settings.final_pose_pass and not state.poses_polished and state.iteration > 0:
        _final_pose_pass(source, state, settings)
        log.info("final pose pass: posterior-mean poses over up to %d poses per image", settings.final_pose_max_poses)
        if checkpoint is not None:
            state.save(checkpoint)
    return state


def _final_pose_pass(source: ImageSource, state: RefineState, settings: RefineSettings) -> None:
    """The written poses: one more E-step of every image against the final maps (the last
    iteration searched against the maps before them), each pose the posterior mean over up to
    ``final_pose_max_poses`` poses of the last pass instead of the few the insertion keeps.

    The reference is the joined map (``final_pose_reference="joined"``, twice the images of a
    half-map, so less noise to fit the poses to) or each half-set's own half-map (``"half"``).
    The maps are not changed, so their FSC stays gold-standard: the written poses come after it."""
    schedule = replace(_schedule_for(state, settings), max_poses=settings.final_pose_max_poses, min_pose_weight=0.0)
    inv_sigma2 = (1.0 / state.sigma2)[source.shell]
    band = source.coords.norm(dim=-1) < state.band_radius
    for half in range(2):
        volume = state.final_map if settings.final_pose_reference == "joined" else state.half_maps[half]
        ref = Reference.from_volume(volume if state.reference_mask is None else volume * state.reference_mask)
        indices = np.flatnonzero(state.sets == half)
        for start in range(0, len(indices), settings.batch_size):
            idx = indices[start : start + settings.batch_size]
            x, ctf = source.batch(idx)
            post = search_batch(ref, x[:, band], ctf[:, band], inv_sigma2[band], source.coords[band], schedule,
                                prior_shifts_pixel=state.shifts_pixel[idx], prior_rotations=state.rotations[idx])
            rotations, shifts = post.mean_pose()
            t = torch.as_tensor(idx)
            state.rotations[t] = rotations.to(state.rotations.dtype)
            state.shifts_pixel[t] = shifts.to(state.shifts_pixel.dtype)
    state.poses_polished = True

