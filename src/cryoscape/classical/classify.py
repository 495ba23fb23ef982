"""3-D classification by EM: K maps, class posteriors times pose posteriors (RELION's --K).

* **E-step**: for every image and class ``k``, the evidence ``log sum_pose p(X | V_k, pose)``:
  with ``align=False`` the pose is the input one (classes only, RELION's ``--skip_align``);
  otherwise a local search around the current pose (:func:`cryoscape.classical.em.search_batch`),
  or with ``global_align`` a search of all of SO(3) (coarse grid, then the significant
  rotations refined down to ``level``) for particles whose poses are not trusted.
  The class posterior is ``softmax_k(log pi_k + evidence_k)``.
* **M-step**: each image goes into every class with weight ``gamma_k x pose posterior /
  sigma^2``; each class map is a MAP estimate with the prior ``tau_k^2 = T x`` the power spectrum
  of the previous class map (``T`` = ``tau2_fudge``: 16 without alignment, measured; RELION's 4 with);
  ``pi_k`` is the mean class posterior; ``sigma^2`` is the residual power at the best class and pose.
* **Band**: the evidence uses frequencies up to ``highres_limit_angstrom`` (12 A by default, like
  RELION's ``--strict_highres_exp``): beyond it each class map is mostly its own noise, which
  draws images to whichever class overfitted most and empties others; the M-step uses all.
  With ``band_limited`` (default) every iteration but the last reads, slices and inserts only
  the pixels inside that band (RELION's adaptive image size: 42 % of the pixels at D = 64,
  3.9 A pixels; 4 hinge classes: the same ARI, 0.93, in less than half the time); the last
  iteration uses every pixel and regularises each class by its half-map FSC, so the written
  maps and their FSC reach beyond the band.
* **Fixed poses** (``align=False``): the images are read, transformed, CTF-evaluated and centred
  once and held in memory (:class:`~cryoscape.classical.refine.CentredImages`, up to
  ``image_memory_gib``; larger sets stream from disk every iteration), each class is sliced once
  per batch for both its evidence and the noise residual (all classes from one lattice), and all
  classes are inserted as channels of one buffer per iteration (:class:`SharedPoseSums`), each
  batch's scatter a sparse matrix built at the first band-limited iteration (:class:`FixedPoseOperators`).
  ``auto_mask`` multiplies the class maps by a solvent mask of the consensus map in the E-step
  (as refine does).  By default it is on with alignment, where it helps the pose search (two
  classes, global search at SNR 1: ARI 0.35 -> 0.84, tests), and off with fixed poses, where on
  the 4-class hinge set it lowered the adjusted Rand index (0.675 against 0.824 without;
  README, bench/results/classify_2026-12-03.txt).
* **Start**: without alignment (``start="auto"``) the classes come from repeated two-class
  splits of the largest group (:func:`_bisect_start`), then the K-class EM continues from them
  without annealing; with alignment (or ``start="random"``) the first iteration assigns images
  to classes at random (RELION's way of breaking the symmetry between identical starting
  references), class posteriors are tempered during the first ``anneal_iterations``, and of
  ``n_starts`` random starts the most likely continues.  The consensus map sets the first prior
  and the grey scale; a class that empties is re-seeded with half of the largest.  Each class is
  split into two random halves so every class map comes with an FSC.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cryoscape.classical.em import Reference, SearchSchedule, estimate_scale, log_likelihoods, search_batch
from cryoscape.classical.refine import CentredImages, ImageSource, noise_spectrum_from_images
from cryoscape.fourier.fft import fft3_center
from cryoscape.fourier.filters import lowpass_filter, radial_average, radial_profile_to_grid
from cryoscape.fourier.fsc import gold_standard_fsc
from cryoscape.fourier.masks import soft_spherical_mask_3d
from cryoscape.fourier.shift import phase_shift_coords
from cryoscape.fourier.slicing import ScatterOperator, scatter_trilinear, slice_coordinates
from cryoscape.geometry.symmetry import symmetry_group
from cryoscape.reconstruct.backproject import FourierAccumulator, solve_fsc_prior, solve_wiener
from cryoscape.reconstruct.postprocess import solvent_mask

__all__ = ["ClassifySettings", "ClassifyState", "classify"]

log = logging.getLogger(__name__)


@dataclass
class ClassifySettings:
    """Options of :func:`classify`."""

    n_classes: int = 4
    max_iterations: int = 25
    tau2_fudge: float | None = None
    align: bool = False
    global_align: bool = False
    level: int = 3
    offset_step_pixel: float = 1.0
    initial_lowpass_angstrom: float = 40.0
    sphere_mask_fraction: float = 0.45
    batch_size: int = 128
    seed: int = 0
    min_change: float = 0.002
    highres_limit_angstrom: float | None = 12.0
    anneal_temperature: float = 8.0
    anneal_iterations: int = 8
    n_starts: int = 3
    start: str = "auto"
    bisect_iterations: int = 12
    bisect_anneal_iterations: int = 4
    symmetry: str = "C1"
    auto_mask: bool | None = None
    mask_lowpass_angstrom: float = 15.0
    band_limited: bool = True
    final_full_band: bool = True
    image_memory_gib: float = 4.0

    @property
    def regularization_t(self) -> float:
        """RELION's ``T``: ``tau2_fudge``, by default 16 without alignment (measured: 4 hinge
        classes from the truth hold ARI 0.935 at 16 against 0.913 at RELION's 4, 0.875 at 1) and
        RELION's 4 with it."""
        if self.tau2_fudge is not None:
            return float(self.tau2_fudge)
        return 4.0 if self.align else 16.0

    @property
    def bisect(self) -> bool:
        """Whether the classes start from repeated two-class splits (``start``: ``"bisect"``,
        ``"random"``, or ``"auto"``: bisect without alignment, where it was measured)."""
        use = self.start == "bisect" or (self.start == "auto" and not self.align)
        return use and self.n_classes > 2

    @property
    def masked(self) -> bool:
        """Whether the E-step masks the class maps (``auto_mask``; by default with alignment only)."""
        return self.align if self.auto_mask is None else bool(self.auto_mask)


@dataclass
class ClassifyState:
    """Run state (saved atomically in ``checkpoint.pt``)."""

    iteration: int
    maps: torch.Tensor  # (K, D, D, D)
    populations: torch.Tensor  # (K,)
    sigma2: torch.Tensor
    probabilities: torch.Tensor  # (N, K) class posteriors
    rotations: torch.Tensor  # (N, 3, 3)
    shifts_pixel: torch.Tensor  # (N, 2)
    halves: np.ndarray  # (N,) 0/1 within each class, for the per-class FSC
    history: list = field(default_factory=list)
    fsc: list = field(default_factory=list)
    converged: bool = False
    full_band_done: bool = False
    reference_mask: torch.Tensor | None = None  # (D, D, D) solvent mask of the E-step's references

    def references(self, radius_index: float | None = None) -> list:
        """The class maps prepared for slicing (up to ``radius_index``), times the solvent mask when there is one."""
        mask = self.reference_mask
        return [Reference.from_volume(m if mask is None else m * mask, radius_index=radius_index) for m in self.maps]

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(asdict(self), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "ClassifyState":
        return cls(**torch.load(path, weights_only=False))


def _centred(source, x, shifts_pixel):
    """Batch ``x`` moved to its particles' centres (as it is when the source holds centred images)."""
    return x if source.centred else phase_shift_coords(x, source.coords, shifts_pixel.float(), source.box_size)


def _class_evidence(source, refs, idx, x, ctf, state, settings, inv_sigma2, band, stacked=None):
    """``(B, K)`` log evidence of each class and, with alignment, each class's pose posterior
    (on the pixels ``band``: frequencies up to the E-step's resolution limit); without alignment
    also each class's slices ``(B, P)`` at all of the source's pixels (``_add_residual`` reuses them),
    read from ``stacked`` (:meth:`Reference.stack` of ``refs``) when given."""
    if not settings.align:
        return _fixed_pose_evidence(source, stacked or Reference.stack(refs), idx, x, ctf, state, inv_sigma2, band)
    coords = source.coords[band]
    x, ctf, inv_sigma2 = x[:, band], ctf[:, band], inv_sigma2[band]
    evidence, posts = [], []
    for ref in refs:
        if settings.align:
            schedule = SearchSchedule(level=settings.level, local=not settings.global_align,
                                      offset_step_pixel=settings.offset_step_pixel)
            post = search_batch(ref, x, ctf, inv_sigma2, coords, schedule, prior_shifts_pixel=state.shifts_pixel[idx],
                                prior_rotations=state.rotations[idx])
            evidence.append(post.log_evidence)
            posts.append(post)
    return torch.stack(evidence, dim=1), posts, None


def _fixed_pose_evidence(source, stacked, idx, x, ctf, state, inv_sigma2, band):
    """:func:`_class_evidence` at each image's own pose (``--no-align``), all classes sliced in one call."""
    coords, D, K = source.coords[band], source.box_size, stacked.lattice.n_volumes
    everywhere = bool(band.all())
    xc = _centred(source, x, state.shifts_pixel[idx])
    if not everywhere:
        xc, ctf, inv_sigma2 = xc[:, band], ctf[:, band], inv_sigma2[band]
    rotations = state.rotations[idx]
    slices = stacked.slices(rotations.expand(K, *rotations.shape), source.coords)  # (K, B, P)
    evidence = []
    for s in slices:
        s = s[:, None] if everywhere else s[:, None, band]
        evidence.append(log_likelihoods(xc, ctf, inv_sigma2, s, torch.zeros(1, 2), coords, D)[:, 0, 0])
    return torch.stack(evidence, dim=1), [None] * K, slices


class SharedPoseSums:
    """Insertion of images that have one pose for every class (``--no-align``) into all ``K``
    classes at once: set ``2 k + half`` of ``acc`` gets ``gamma_k x`` what
    :meth:`FourierAccumulator.add` would add.

    The K classes' sums are scattered as ``3 K`` channels of one ``(2, D, D, D, 3 K)`` buffer, so
    the slice coordinates, the trilinear corners and the scatter indices are computed once per
    image instead of once per image and class; the buffer lives for one iteration and
    :meth:`fold` adds it to ``acc`` (per batch, its allocation and fold cost as much as the scatter).
    """

    def __init__(self, acc: FourierAccumulator, n_classes: int):
        self.acc, self.n_classes, self.buffer = acc, n_classes, None

    def add(self, values, rotations, ctf, gamma, halves, inv_sigma2, operator: ScatterOperator | None = None) -> None:
        """``values``/``ctf`` ``(B, P)`` at ``acc.coordinates``, already centred; ``gamma (B, K)``;
        ``halves (B,)``; ``inv_sigma2 (P,)``; ``operator``: the batch's slices as a
        :class:`~cryoscape.fourier.slicing.ScatterOperator` (images at fixed poses), else they
        are scattered corner by corner."""
        acc, K = self.acc, self.n_classes
        D = acc.padded_size
        if self.buffer is None:
            self.buffer = torch.zeros(2, D, D, D, 3 * K, dtype=acc.sums.dtype)
        c = ctf.to(torch.float32)
        base = torch.stack([c * values.real, c * values.imag, c * c], dim=-1) * inv_sigma2[None, :, None]
        stacked = (base[:, :, None, :] * gamma[:, None, :, None].to(base.dtype)).reshape(*base.shape[:2], 3 * K)
        if operator is None:
            coords = slice_coordinates(rotations.to(acc.dtype), acc.coordinates)
            scatter_trilinear(self.buffer, coords, stacked.to(acc.dtype), offsets=halves.long())
        else:
            operator.scatter(self.buffer.view(2 * D**3, 3 * K), stacked)
        acc.count += torch.bincount((2 * torch.arange(K)[None, :] + halves.long()[:, None]).reshape(-1),
                                    minlength=acc.n_sets)

    def fold(self) -> None:
        """Add the buffer into the accumulator's sets (once, after the last batch)."""
        if self.buffer is None:
            return
        for k in range(self.n_classes):
            for h in range(2):
                self.acc.sums[2 * k + h] += self.buffer[h, ..., 3 * k : 3 * k + 3]
        self.buffer = None


class FixedPoseOperators:
    """The :class:`~cryoscape.fourier.slicing.ScatterOperator` of each batch's slices, built at
    the first iteration and reused by the next ones (poses fixed), within ``max_bytes``."""

    def __init__(self, max_bytes: float):
        self.max_bytes, self.held_bytes, self._ops, self._source = max_bytes, 0, {}, None

    def get(self, source, start: int, rotations: torch.Tensor, halves: torch.Tensor) -> ScatterOperator | None:
        """The operator of the batch starting at ``start`` of ``source``, its images going to the
        half-sets ``halves`` (``None`` over the budget)."""
        if source is not self._source:
            self._ops, self.held_bytes, self._source = {}, 0, source
        if start not in self._ops:
            op = None
            if self.held_bytes + 110 * len(rotations) * len(source.coords) <= self.max_bytes:  # ~100 B per point
                coords = slice_coordinates(rotations.to(torch.float32), source.coords)
                op = ScatterOperator(coords, source.box_size, offsets=halves)
                self.held_bytes += op.nbytes
            self._ops[start] = op
        return self._ops[start]


def _insert(shared, source, x, ctf, gamma, posts, state, idx, inv_sigma2, operator=None) -> None:
    """Insert each image into each class with weight gamma_k (x pose posterior with alignment);
    ``shared``: the iteration's :class:`SharedPoseSums`; ``operator``: see :meth:`SharedPoseSums.add`."""
    acc = shared.acc
    halves = torch.as_tensor(state.halves[idx])
    # once classes firm up, scatter each image where it weighs (unless its slices' operator is held)
    dense = operator is not None or int((gamma > 1e-4).sum()) > 0.5 * gamma.numel()
    if dense and all(p is None for p in posts):
        values = _centred(source, x, state.shifts_pixel[idx])
        shared.add(values, state.rotations[idx], ctf, gamma, halves, inv_sigma2, operator)
        return
    for k in range(gamma.shape[1]):
        use = gamma[:, k] > 1e-4
        if not use.any():
            continue
        if posts[k] is None:
            rot = state.rotations[idx][use]
            weights = gamma[use, k]
            rows = use.nonzero()[:, 0]
            values = _centred(source, x[rows], state.shifts_pixel[idx][use])
        else:
            p = posts[k]
            img, pose = ((p.weights > 0) & use[:, None]).nonzero(as_tuple=True)
            rot, shifts = p.rotations[img, pose], p.shifts_pixel[img, pose]
            weights = gamma[img, k] * p.weights[img, pose]
            rows = img
            values = phase_shift_coords(x[rows], source.coords, shifts, source.box_size)
        acc.add(values, rot, ctf=ctf[rows], sets=2 * k + halves[rows],
                weights=weights[:, None] * inv_sigma2[None, :])


def _m_step(acc, state, settings, pixel_size_angstrom, *, fsc_prior: bool = False, with_fsc: bool = True):
    """Class maps and (``with_fsc``; band-limited iterations skip them) each class's half-map
    FSC.  The prior is RELION's for classification,
    ``tau_k^2 = T x`` the power spectrum of the previous class map; with ``fsc_prior`` (the
    last, full-band iteration after band-limited ones, whose maps hold nothing beyond the band)
    it comes from the FSC of the class's own half-maps, as in ``refine``."""
    K, D = settings.n_classes, acc.box_size
    sphere = soft_spherical_mask_3d(D, settings.sphere_mask_fraction * D, edge_width_pixel=0.05 * D,
                                    dtype=torch.float64)

    def solve(num, weight, reg):
        return solve_wiener(num, weight, reg, box_size=D, correct_gridding=False) * sphere

    def fsc_of(halves):
        return gold_standard_fsc(halves[0], halves[1], pixel_size_angstrom=pixel_size_angstrom)

    maps, fscs = [], []
    for k in range(K):
        num, weight = acc.symmetrized(slice(2 * k, 2 * k + 2))
        if fsc_prior:
            volume, halves = solve_fsc_prior(num, weight, solve, fsc_of)
        else:
            power = radial_average(fft3_center(state.maps[k].double()).abs().square(), ndim=3)
            tau2 = radial_profile_to_grid(power.clamp_min(power.max() * 1e-8), D, ndim=3)
            reg = 1.0 / (settings.regularization_t * tau2)
            volume = solve(num.sum(0), weight.sum(0), reg)
            halves = [solve(num[h], weight[h], reg / 2) for h in range(2)] if with_fsc else None
        maps.append(volume)
        if with_fsc:
            fscs.append(fsc_of(halves))
    return torch.stack(maps).float(), fscs


def initial_classify_state(source, n, initial_map, pixel_size_angstrom, settings, rotations, shifts_pixel):
    """Random first assignment, sigma^2 from the images, the consensus map on the data's scale."""
    rng = np.random.default_rng(settings.seed)
    sample = np.sort(rng.choice(n, size=min(n, 1000), replace=False))
    sigma2 = noise_spectrum_from_images(source, sample)
    volume = lowpass_filter(initial_map.float(), settings.initial_lowpass_angstrom, pixel_size_angstrom, ndim=3)
    x, ctf = source.batch(sample[:200])
    if settings.align:  # the poses may be poor: each image's best pose on a coarse grid
        scale = estimate_scale(Reference.from_volume(volume), x, ctf, source.coords)
    else:
        scale = _scale_at_poses(Reference.from_volume(volume), source, x, ctf, torch.as_tensor(rotations[sample[:200]]),
                                torch.as_tensor(shifts_pixel[sample[:200]]))
    volume = volume * scale
    mask = None
    if settings.masked:
        mask = solvent_mask(initial_map.float(), pixel_size_angstrom, lowpass_angstrom=settings.mask_lowpass_angstrom)
        mask = mask if float(mask.sum()) >= 1.0 else None
    assignment = rng.integers(0, settings.n_classes, n)
    probabilities = torch.nn.functional.one_hot(torch.as_tensor(assignment), settings.n_classes).float()
    return ClassifyState(
        iteration=0, maps=volume[None].repeat(settings.n_classes, 1, 1, 1),
        populations=torch.full((settings.n_classes,), 1.0 / settings.n_classes), sigma2=sigma2,
        probabilities=probabilities, rotations=torch.as_tensor(rotations, dtype=torch.float32),
        shifts_pixel=torch.as_tensor(shifts_pixel, dtype=torch.float32), halves=rng.integers(0, 2, n),
        reference_mask=mask,
    )


def _scale_at_poses(ref, source, x, ctf, rotations, shifts_pixel, *, radius: float = 10.0) -> float:
    """Least-squares grey scale ``a`` of ``ref`` against images at their own poses (``V -> a V``,
    below ``radius`` Fourier pixels): ``sum Re<c S, X> / sum |c S|^2``."""
    band = source.coords.norm(dim=-1) < radius
    cs = ctf[:, band] * ref.slices(rotations.float(), source.coords[band])
    xc = _centred(source, x, shifts_pixel)[:, band]
    return float((cs.conj() * xc).real.sum() / cs.abs().square().sum().clamp_min(1e-30))


def classify_iteration(source, state, settings, pixel_size_angstrom, *, fsc_prior: bool = False,
                       operators: FixedPoseOperators | None = None) -> dict:
    """One E- and M-step (the first uses the random assignment as its E-step); ``fsc_prior``:
    see :func:`_m_step`; ``operators``: the batches' insertion operators (fixed poses only)."""
    started = time.perf_counter()
    K, D, n = settings.n_classes, source.box_size, len(state.halves)
    refs = state.references(source.band_radius)
    stacked = None if settings.align else Reference.stack(refs)  # fixed poses: all classes in one lattice
    acc = FourierAccumulator(D, n_sets=2 * K, band_radius=source.band_radius)
    shared = SharedPoseSums(acc, K)
    inv_sigma2 = (1.0 / state.sigma2)[source.shell]
    residual = torch.zeros(2, D // 2 + 1, dtype=torch.float64)
    previous = state.probabilities.argmax(1)
    band = source.coords.norm(dim=-1) < _evidence_radius(settings, D, pixel_size_angstrom)
    new_prob = torch.empty_like(state.probabilities)
    scored = state.iteration > 0 or settings.align  # without alignment the start's assignment is the first E-step
    total_log_likelihood = 0.0 if scored else float("nan")
    for start in range(0, n, settings.batch_size):
        idx = np.arange(start, min(start + settings.batch_size, n))
        x, ctf = source.batch(idx)
        gamma, posts, slices = state.probabilities[idx], [None] * K, None
        if scored:
            evidence, posts, slices = _class_evidence(source, refs, idx, x, ctf, state, settings, inv_sigma2, band,
                                                      stacked)
            total_log_likelihood += float(torch.logsumexp(evidence + state.populations.log()[None], dim=1).sum())
            if state.iteration > 0:
                temperature = _temperature(state.iteration, settings)
                gamma = torch.softmax((evidence + state.populations.log()[None]) / temperature, 1)
        new_prob[idx] = gamma
        operator = None
        if operators is not None and not settings.align:
            operator = operators.get(source, start, state.rotations[idx], torch.as_tensor(state.halves[idx]))
        _insert(shared, source, x, ctf, gamma, posts, state, idx, inv_sigma2, operator)
        _add_residual(residual, source, refs, x, ctf, gamma, state, idx, posts, slices)
        if settings.align:
            _update_poses(state, idx, gamma, posts)
    shared.fold()
    if state.iteration < settings.max_iterations // 2 and _reseed_empty_classes(new_prob, settings, state.iteration):
        acc = _accumulate_hard(source, new_prob, state, settings, inv_sigma2)
    if settings.symmetry.upper() != "C1":
        acc.apply_symmetry_(symmetry_group(settings.symmetry))
    state.maps, state.fsc = _m_step(acc, state, settings, pixel_size_angstrom, fsc_prior=fsc_prior,
                                    with_fsc=source.band_radius is None or fsc_prior)
    state.probabilities = new_prob
    state.populations = (new_prob.sum(0) / new_prob.sum().clamp_min(1e-12)).clamp_min(1e-6)
    seen = residual[1] > 0  # a band-limited iteration keeps the other shells' estimate
    sigma2 = torch.where(seen, residual[0] / residual[1].clamp_min(1), state.sigma2.double())
    state.sigma2 = sigma2.clamp_min(1e-12).float()
    changed = float((new_prob.argmax(1) != previous).float().mean())
    state.iteration += 1
    state.converged = state.iteration > max(2, settings.anneal_iterations) and changed < settings.min_change
    summary = {"iteration": state.iteration, "changed_fraction": changed, "log_likelihood": total_log_likelihood,
               "populations": " ".join(f"{p:.3f}" for p in state.populations.tolist()),
               "resolutions_angstrom": " ".join(f"{f['res_0.143_angstrom']:.1f}" for f in state.fsc),
               "seconds": time.perf_counter() - started}
    state.history.append(summary)
    return summary


def _evidence_radius(settings: ClassifySettings, box_size: int, pixel_size_angstrom: float) -> float:
    """Radius (Fourier pixels) of the frequencies the class evidence uses (``highres_limit_angstrom``)."""
    if not settings.highres_limit_angstrom:
        return box_size / 2
    return box_size * pixel_size_angstrom / settings.highres_limit_angstrom


def _working_source(source: ImageSource, settings: ClassifySettings, pixel_size_angstrom: float) -> ImageSource:
    """The source the iterations before the last read: with ``band_limited`` only the evidence band."""
    if not settings.band_limited:
        return source
    return source.band_limited(_evidence_radius(settings, source.box_size, pixel_size_angstrom))


def _temperature(iteration: int, settings: ClassifySettings) -> float:
    """Deterministic annealing: class posteriors are tempered by ``1 / temperature``, falling
    linearly from ``anneal_temperature`` at the first E-step to 1 after ``anneal_iterations``.
    Started from near-identical maps, untempered EM commits images to classes after one
    iteration and often merges two true classes for good; soft early assignments let the maps
    drift apart along the data's main differences first."""
    if settings.anneal_iterations <= 1:
        return 1.0
    fraction = min(1.0, (iteration - 1) / (settings.anneal_iterations - 1))
    return settings.anneal_temperature + (1.0 - settings.anneal_temperature) * max(0.0, fraction)


def _reseed_empty_classes(prob: torch.Tensor, settings: ClassifySettings, iteration: int) -> bool:
    """Give a class that emptied (population below ``0.2 / K``) a random half of the images of the
    most populated class (in place, hard assignment).  EM from random subsets often merges two
    classes and lets another die; splitting the largest one lets the next iterations separate it
    (cryoSPARC re-seeds empty classes similarly).  Returns whether any class was re-seeded."""
    K = settings.n_classes
    reseeded = False
    gen = torch.Generator().manual_seed(settings.seed + 1000 * (iteration + 1))
    for k in range(K):
        population = prob.sum(0) / prob.sum().clamp_min(1e-12)
        if population[k] >= 0.2 / K:
            continue
        largest = int(population.argmax())
        members = (prob.argmax(1) == largest).nonzero()[:, 0]
        moved = members[torch.randperm(len(members), generator=gen)[: len(members) // 2]]
        prob[moved] = torch.nn.functional.one_hot(torch.tensor(k), K).float()
        log.info("class %d emptied: re-seeded with half of class %d (%d images)", k + 1, largest + 1, len(moved))
        reseeded = True
    return reseeded


def _accumulate_hard(source, prob, state, settings, inv_sigma2):
    """Insert every image with the given class probabilities at its current pose (after a re-seed)."""
    K, D, n = settings.n_classes, source.box_size, len(state.halves)
    acc = FourierAccumulator(D, n_sets=2 * K, band_radius=source.band_radius)
    shared = SharedPoseSums(acc, K)
    for start in range(0, n, settings.batch_size):
        idx = np.arange(start, min(start + settings.batch_size, n))
        x, ctf = source.batch(idx)
        _insert(shared, source, x, ctf, prob[idx], [None] * K, state, idx, inv_sigma2)
    shared.fold()
    return acc


def _update_poses(state, idx, gamma, posts) -> None:
    """With alignment, each image's pose becomes its posterior-mean pose in its most probable
    class (the next local search is centred on it; ``particles.star`` gets it)."""
    best = gamma.argmax(1)
    rows_idx = torch.as_tensor(idx)
    for k, post in enumerate(posts):
        rows = best == k
        if post is None or not rows.any():
            continue
        rotations, shifts = post.mean_pose()
        state.rotations[rows_idx[rows]] = rotations[rows].to(state.rotations.dtype)
        state.shifts_pixel[rows_idx[rows]] = shifts[rows].to(state.shifts_pixel.dtype)


def _add_residual(residual, source, refs, x, ctf, gamma, state, idx, posts, slices=None) -> None:
    """Per-shell residual power at each image's most probable class (and pose), for sigma^2;
    ``slices``: each class's slices at the images' own poses when already computed."""
    best = gamma.argmax(1)
    rot = state.rotations[idx].clone()
    shifts = state.shifts_pixel[idx].clone().float()
    s = torch.empty(x.shape, dtype=torch.complex64)
    for k, ref in enumerate(refs):
        rows = best == k
        if rows.any():
            if posts[k] is not None:
                rot[rows] = posts[k].rotations[rows, 0].to(rot.dtype)
                shifts[rows] = posts[k].shifts_pixel[rows, 0]
            s[rows] = slices[k][rows] if slices is not None else ref.slices(rot[rows], source.coords)
    diff = _centred(source, x, shifts) - ctf * s
    power = (diff.real.square() + diff.imag.square()).double().sum(0)
    residual[0].index_add_(0, source.shell, power)
    residual[1].index_add_(0, source.shell, torch.full_like(power, x.shape[0]))


def _bisect_start(source, n, initial_map, pixel_size_angstrom, settings, rotations, shifts_pixel) -> ClassifyState:
    """The first assignment by repeated two-class splits: the largest group so far is classified
    into two (annealed, ``bisect_iterations``) until there are ``K`` groups.

    A two-class split of random halves separates the data's largest difference reliably; K
    classes from random subsets at once often converge with two true classes merged and another
    split, or with one class absorbing part of its neighbour (4 hinge classes: ARI 0.83-0.88,
    against 0.93 from the splits).  The splits need every image: on a random half of that set
    they lost the finer split (ARI 0.82-0.88).  The K-class EM then starts from the groups,
    without annealing."""
    rotations, shifts_pixel = np.asarray(rotations), np.asarray(shifts_pixel)
    groups = [np.arange(n)]
    two = replace(settings, n_classes=2, n_starts=1, start="random", max_iterations=settings.bisect_iterations,
                  anneal_iterations=settings.bisect_anneal_iterations, final_full_band=False)
    while len(groups) < settings.n_classes:
        members = groups.pop(int(np.argmax([len(g) for g in groups])))
        split = classify(source.subset(members), len(members), initial_map, pixel_size_angstrom, two,
                         rotations=rotations[members], shifts_pixel=shifts_pixel[members])
        labels = split.probabilities.argmax(1).numpy()
        groups += [members[labels == 0], members[labels == 1]]
        log.info("bisecting start: %s", " ".join(str(len(g)) for g in groups))
    probabilities = torch.zeros(n, settings.n_classes)
    for k, group in enumerate(groups):
        probabilities[group, k] = 1.0
    state = initial_classify_state(source, n, initial_map, pixel_size_angstrom, settings, rotations, shifts_pixel)
    state.probabilities = probabilities
    return state


def _best_start(source, n, initial_map, pixel_size_angstrom, settings, rotations, shifts_pixel) -> ClassifyState:
    """Run ``n_starts`` random starts through the annealing iterations; keep the most likely.

    EM from random subsets ends in different local optima (two true classes merged, another
    split).  The starts are compared by the data log-likelihood of their maps and populations
    under one common noise spectrum (each start's own sigma^2 would favour the start that
    over-estimated it)."""
    if settings.n_starts <= 1:
        return initial_classify_state(source, n, initial_map, pixel_size_angstrom, settings, rotations, shifts_pixel)
    work = _working_source(source, settings, pixel_size_angstrom)
    states = []
    for start in range(settings.n_starts):
        trial = replace(settings, seed=settings.seed + start)
        state = initial_classify_state(source, n, initial_map, pixel_size_angstrom, trial, rotations, shifts_pixel)
        for _ in range(min(settings.anneal_iterations + 1, settings.max_iterations)):
            classify_iteration(work, state, trial, pixel_size_angstrom)
        states.append(state)
    sigma2 = torch.stack([s.sigma2 for s in states]).mean(0)
    scores = [_log_likelihood(work, s, settings, sigma2, pixel_size_angstrom) for s in states]
    log.info("starts' log-likelihoods under a common noise spectrum: %s", " ".join(f"{v:.1f}" for v in scores))
    return states[int(np.argmax(scores))]


def _log_likelihood(source, state, settings, sigma2, pixel_size_angstrom) -> float:
    """``sum_i log sum_k pi_k p(X_i | V_k)`` under the noise spectrum ``sigma2``."""
    D, n = source.box_size, len(state.halves)
    refs = state.references()
    inv_sigma2 = (1.0 / sigma2)[source.shell]
    band = source.coords.norm(dim=-1) < _evidence_radius(settings, D, pixel_size_angstrom)
    total = 0.0
    for start in range(0, n, settings.batch_size):
        idx = np.arange(start, min(start + settings.batch_size, n))
        x, ctf = source.batch(idx)
        evidence, _, _ = _class_evidence(source, refs, idx, x, ctf, state, settings, inv_sigma2, band)
        total += float(torch.logsumexp(evidence + state.populations.log()[None], dim=1).sum())
    return total


def classify(source: ImageSource, n: int, initial_map: torch.Tensor, pixel_size_angstrom: float,
             settings: ClassifySettings, *, rotations, shifts_pixel, checkpoint: Path | None = None,
             resume: bool = False, on_iteration=None) -> ClassifyState:
    """Run (or resume) a classification; see the module docstring."""
    if not settings.align and not source.centred:  # fixed poses: read and centre the images once
        held = CentredImages.from_source(source, shifts_pixel, max_bytes=settings.image_memory_gib * 2**30)
        source = source if held is None else held
    if resume and checkpoint is not None and checkpoint.exists():
        state = ClassifyState.load(checkpoint)
    elif settings.bisect:
        state = _bisect_start(source, n, initial_map, pixel_size_angstrom, settings, rotations, shifts_pixel)
    else:
        state = _best_start(source, n, initial_map, pixel_size_angstrom, settings, rotations, shifts_pixel)
    if settings.bisect:
        settings = replace(settings, anneal_iterations=1)
    work = _working_source(source, settings, pixel_size_angstrom)
    operators = None  # the band-limited iterations' insertion operators (fixed poses, images held)
    if source.centred and work is not source:
        operators = FixedPoseOperators(settings.image_memory_gib * 2**30 - source.nbytes)
    while not state.converged and state.iteration < settings.max_iterations - int(settings.final_full_band):
        _step(work, state, settings, pixel_size_angstrom, checkpoint, on_iteration, operators=operators)
    if settings.final_full_band and not state.full_band_done:
        state.full_band_done = True  # saved by the step below
        _step(source, state, settings, pixel_size_angstrom, checkpoint, on_iteration, fsc_prior=settings.band_limited)
    return state


def _step(source, state, settings, pixel_size_angstrom, checkpoint, on_iteration, *, fsc_prior=False,
          operators=None) -> None:
    """One iteration, its log line, the checkpoint and the caller's callback."""
    summary = classify_iteration(source, state, settings, pixel_size_angstrom, fsc_prior=fsc_prior,
                                 operators=operators)
    log.info("iteration %d: %s", summary["iteration"], summary)
    if checkpoint is not None:
        state.save(checkpoint)
    if on_iteration is not None:
        on_iteration(state, summary)
