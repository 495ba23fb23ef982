"""The E-step of classical MAP refinement: posterior weights of images over a pose grid.

Model (lecture seed 000, "Classical cryo-EM reconstruction"; /work/shared/notes/classical_em.md)
-------------------------------------------------------------------------------------------------
``X_i(k) = c_i(k) V(R^T k) e^{+2 pi i k.t / D} + N_i(k)`` with complex Gaussian noise of per-shell
power ``sigma^2(|k|) = E|N(k)|^2``.  For a real image the independent coefficients are those of a
half-plane, so over the half-plane pixels ``k`` inside the current band limit

    log p(X_i | R, t) = - sum_k |X_i(k) e^{-2 pi i k.t / D} - c_i(k) S_R(k)|^2 / sigma^2(k) + const,

``S_R(k) = V(R^T (kx, ky, 0))`` the central slice.  (In real space this is
``-sum_x (x_i - proj)^2 / (2 s^2)`` with ``sigma^2 = D^2 s^2``.)  :func:`log_likelihoods` evaluates
it for a batch of images, a set of rotations and a set of shifts as two matrix products,
``|A - B|^2 = |A|^2 + |B|^2 - 2 Re conj(B) A``: the cross term of every (image x shift, rotation)
pair is one real GEMM of ``[Re Z, Im Z]`` with ``[Re S, Im S]``, the slice norm another
(``c^2 / sigma^2`` against ``|S|^2``).

Why a package of its own (classical/, ranked between posesearch/ and train/)
---------------------------------------------------------------------------
DESIGN.md puts EM refinement under reconstruct/ (rank 4), but the E-step reads its slices from
posesearch's :class:`~cryoscape.posesearch.lattice.FourierLattice` (trilinear reads through
``grid_sample``, about 10x faster on a CPU than gathering corners, and the kernel the pose search
already uses), and posesearch/ (rank 5) sits above reconstruct/.  So the engine lives one rank
above posesearch and below train (which may then use refined poses).  The weighted insertion and
the MAP solve stay in :mod:`cryoscape.reconstruct.backproject`.  posesearch/search.py drives a
*decoder* to one best pose per image; EM needs the full posterior with per-shell noise weights,
so only the two GEMMs of the expansion are written here.

Search (adaptive oversampling, RELION's scheme)
-----------------------------------------------
* **Global**: every rotation of the SO(3) grid at ``coarse_level`` (15 degrees at level 1) times a
  shift grid around each image's prior centre, scored on a coarse band (``coarse_radius``); the
  rotations holding ``significance`` (99.9 %) of each image's posterior mass (at most
  ``max_significant``) are kept, and their 8 children on the grid twice as fine are scored with a
  3 x 3 shift grid of half the step, level by level down to the current ``level``.
* **Local**: the grid cells at ``local_start_level`` (default ``level - 1``) holding the previous
  pose and that pose turned by ``local_steps`` grid steps about 26 axes (uniform prior inside
  that window; see :func:`local_candidates`) replace the global pass, with a 3 x 3 shift grid
  around the previous shift; then children level by level down to ``level`` as above.
* The posterior of the last pass, over (rotation, shift), is what the M-step inserts: the poses
  holding ``significance`` of the mass (at most ``max_poses``), renormalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryoscape.fourier.shift import phase_shift_coords
from cryoscape.fourier.slicing import prepare_projection_volume
from cryoscape.geometry.so3_grid import (
    so3_grid,
    so3_grid_children,
    so3_grid_resolution,
    base_grid_spacing_deg,
    locate_in_so3_grid,
    so3_grid_rotations,
    translation_grid,
)
from cryoscape.geometry.rotations import rotvec_to_matrix
from cryoscape.posesearch.lattice import FourierLattice

__all__ = [
    "Reference",
    "SearchSchedule",
    "BatchPosterior",
    "log_likelihoods",
    "cross_and_norm",
    "estimate_scale",
    "significant",
    "local_candidates",
    "search_batch",
]


@dataclass
class Reference:
    """A map prepared for slicing: the centred FT of the map zero-padded 2x (gridding-corrected),
    held as a :class:`~cryoscape.posesearch.lattice.FourierLattice` of 2 points per Fourier pixel.

    Slices are read at ``R^T (kx, ky, 0)`` (index units of ``D``), the continuous transform of the
    map at frequency ``k / D``: the value a ``D``-box projection has at pixel ``k``.
    """

    lattice: FourierLattice
    box_size: int

    @classmethod
    def from_volume(cls, volume: torch.Tensor, *, radius_index: float | None = None) -> "Reference":
        """Prepare a real ``(D, D, D)`` map; with ``radius_index`` only the lattice that slices
        up to that radius (index units of ``D``) read is kept (a band-limited E-step: a smaller
        array stays in the CPU's caches; beyond the radius slices read 0)."""
        D = int(volume.shape[-1])
        ft = prepare_projection_volume(volume.to(torch.float32), oversampling=2).to(torch.complex64)
        ft = ft[1:, 1:, 1:]  # drop the -Nyquist planes: odd side 2D - 1, origin at D - 1
        radius = D / 2 - 1
        if radius_index is not None and 2 * radius_index + 2 < D - 1:
            half = int(math.ceil(2 * radius_index)) + 2  # lattice points (2 per pixel) trilinear reads can touch
            ft = ft[D - 1 - half : D + half, D - 1 - half : D + half, D - 1 - half : D + half]
            radius = float(radius_index)
        values = torch.stack([ft.real, ft.imag])[None].contiguous()
        return cls(lattice=FourierLattice(values=values, oversampling=2.0, radius_index=radius), box_size=D)

    def slices(self, rotations: torch.Tensor, coords_index: torch.Tensor) -> torch.Tensor:
        """``(..., 3, 3)`` rotations x ``(P, 2)`` pixels (index units of ``D``) -> ``(..., P)`` complex64.

        For a :meth:`stack` of ``n`` maps ``rotations`` is ``(n, ..., 3, 3)``: map ``i`` is read at ``rotations[i]``."""
        return self.lattice.sample_slices(rotations.to(torch.float32), coords_index)

    @classmethod
    def stack(cls, references: list["Reference"]) -> "Reference":
        """Several prepared maps of one box and band as one lattice of ``n`` volumes: their slices
        at the same poses come from one ``grid_sample`` call, which a CPU runs in parallel over
        the volumes (over one volume it runs on one thread)."""
        first = references[0].lattice
        values = torch.cat([r.lattice.values for r in references])
        return cls(lattice=FourierLattice(values=values, oversampling=first.oversampling, radius_index=first.radius_index),
                   box_size=references[0].box_size)


@dataclass(frozen=True)
class SearchSchedule:
    """What one E-step searches.

    Attributes
    ----------
    level
        SO(3) grid level of the final pass (1 = 15, 2 = 7.5, 3 = 3.75, 4 = 1.9 degrees).
    local
        Search around each image's previous best pose (see the module docstring) instead of the
        whole grid.
    coarse_level
        Level of the global pass.
    offset_range_pixel, offset_step_pixel
        Global shift grid around each image's prior centre (``+-range`` in steps of ``step``);
        the step halves with every level after ``coarse_level``.
    coarse_radius
        Band (Fourier pixels) of the global pass; later passes use the full band.
    local_start_level, local_steps
        Level of the window of a local search and its half-width in grid steps (default: one
        step at ``level - 1``).  The window must hold the pose's uncertainty, which at low SNR
        stays near 2 degrees however fine the grid: a window one step of a fine level wide
        keeps the truth out and lets a pose move by only a step per iteration.
    significance, max_significant, max_poses, min_pose_weight
        Posterior mass kept when pruning, caps on rotations refined / poses returned, and the
        smallest weight a returned pose may have (lighter ones are dropped and the rest
        renormalised: inserting them costs as much as a heavy pose and changes the map by less
        than the noise).
    """

    level: int = 2
    local: bool = False
    coarse_level: int = 1
    offset_range_pixel: float = 3.0
    offset_step_pixel: float = 1.0
    coarse_radius: float = 12.0
    significance: float = 0.999
    max_significant: int = 6
    max_poses: int = 8
    min_pose_weight: float = 0.01
    local_start_level: int | None = None
    local_steps: int = 1

    def offset_step_at(self, level: int) -> float:
        """Shift step of a pass at ``level`` (pixels)."""
        return self.offset_step_pixel * 0.5 ** max(0, level - self.coarse_level)


@dataclass
class BatchPosterior:
    """Posterior of a batch of images over the poses of the last pass (best first)."""

    rotations: torch.Tensor  # (B, M, 3, 3)
    shifts_pixel: torch.Tensor  # (B, M, 2), RELION sign
    weights: torch.Tensor  # (B, M), rows sum to 1 (0 for padding)
    best_ids: torch.Tensor  # (B, 2) grid id of the best pose at ``level``
    log_evidence: torch.Tensor  # (B,) log sum over the last pass (up to a per-image constant)
    level: int

    def mean_pose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior-mean pose ``(B, 3, 3), (B, 2)``: the weighted sum of the rotation matrices
        projected onto SO(3) (chordal L2 mean) and the weighted mean shift.  On noisy images it
        is closer to the truth than the single most probable grid point."""
        m = (self.weights[..., None, None] * self.rotations).sum(1).double()
        u, _, vt = torch.linalg.svd(m)
        d = torch.sign(torch.linalg.det(u @ vt))
        u = torch.cat([u[..., :2], u[..., 2:] * d[:, None, None]], dim=-1)
        shifts = (self.weights[..., None] * self.shifts_pixel).sum(1)
        return (u @ vt).to(self.rotations.dtype), shifts


def log_likelihoods(
    images_ft: torch.Tensor,
    ctf: torch.Tensor,
    inv_sigma2: torch.Tensor,
    slices: torch.Tensor,
    shifts_pixel: torch.Tensor,
    coords_index: torch.Tensor,
    box_size: int,
) -> torch.Tensor:
    """``log p(X_i | R_c, t)`` (module docstring) for every image, rotation and shift.

    Parameters
    ----------
    images_ft, ctf
        ``(B, P)`` complex image coefficients and real CTF at the pixels ``coords_index``.
    inv_sigma2
        ``(P,)`` or ``(B, P)`` inverse noise power.
    slices
        ``(C, P)`` slices shared by the batch, or ``(B, C, P)`` slices per image.
    shifts_pixel
        ``(T, 2)`` shifts (RELION sign) shared by the batch.
    coords_index
        ``(P, 2)`` pixel frequencies in index units; ``box_size`` is ``D``.

    Returns
    -------
    ``(B, C, T)`` float32.
    """
    cross, norm, x_norm = cross_and_norm(images_ft, ctf, inv_sigma2, slices, shifts_pixel, coords_index, box_size)
    return 2.0 * cross - norm.unsqueeze(-1) - x_norm[:, None, None]


def cross_and_norm(images_ft, ctf, inv_sigma2, slices, shifts_pixel, coords_index, box_size):
    """The three terms of :func:`log_likelihoods`: ``Re sum conj(c S) X_t / sigma^2`` ``(B, C, T)``,
    ``sum c^2 |S|^2 / sigma^2`` ``(B, C)`` and ``sum |X|^2 / sigma^2`` ``(B,)``."""
    w = inv_sigma2.to(torch.float32).expand_as(ctf)
    c = ctf.to(torch.float32)
    z = phase_shift_coords(images_ft.unsqueeze(1), coords_index, shifts_pixel, box_size)  # (B, T, P)
    z = z * (c * w).unsqueeze(1)
    z_parts = torch.cat([z.real, z.imag], dim=-1)  # (B, T, 2P)
    s_parts = torch.cat([slices.real, slices.imag], dim=-1).to(torch.float32)  # (.., C, 2P)
    power = slices.real.square() + slices.imag.square()
    a = c * c * w  # (B, P)
    x_norm = ((images_ft.real.square() + images_ft.imag.square()) * w).sum(-1)  # (B,)
    if slices.dim() == 2:
        B, T, P2 = z_parts.shape
        cross = (z_parts.reshape(B * T, P2) @ s_parts.T).reshape(B, T, -1).transpose(1, 2)
        norm = a @ power.T  # (B, C)
    else:
        cross = torch.bmm(s_parts, z_parts.transpose(1, 2))  # (B, C, T)
        norm = torch.einsum("bcp,bp->bc", power, a)
    return cross, norm, x_norm


def significant(log_mass: torch.Tensor, *, significance: float, max_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates holding ``significance`` of each row's posterior mass, best first.

    ``log_mass`` is ``(B, N)`` (``-inf`` for excluded entries).  Returns ``(index (B, K), keep (B, K)
    bool)`` with ``K = min(max_count, N)`` columns, enough for the row that needs the most; the
    best entry is always kept.
    """
    K = min(int(max_count), log_mass.shape[1])
    top, index = log_mass.topk(K, dim=1)
    prob = torch.softmax(log_mass, dim=1).gather(1, index)
    before = torch.cumsum(prob, dim=1) - prob
    keep = (before < significance) & torch.isfinite(top)
    keep[:, 0] = True
    n = int(keep.sum(1).max())
    return index[:, :n], keep[:, :n]


def local_candidates(prior_rotations: torch.Tensor, level: int, steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid ids at ``level`` around each prior pose: the cells holding ``R_prior`` itself and
    ``R_prior`` turned by ``1..steps`` grid steps about each of 26 axes (the 3 x 3 x 3 cube of
    directions).

    Returns ``(ids (B, 1 + 26 steps, 2), keep (B, 1 + 26 steps) bool)``; duplicates (two turns
    landing in one cell) are not kept, so every cell counts once in the posterior.  Neighbours are
    found through the rotations rather than through HEALPix neighbour lists because the in-plane
    index of two neighbouring pixels need not describe nearby rotations (their frames differ).
    """
    axes = torch.stack(torch.meshgrid(*([torch.tensor([-1.0, 0.0, 1.0])] * 3), indexing="ij"), -1).reshape(-1, 2 + 1)
    axes = axes[axes.norm(dim=-1) > 0]
    step = math.radians(base_grid_spacing_deg(level))
    unit = axes / axes.norm(dim=-1, keepdim=True)
    turns = torch.cat([torch.eye(3)[None]] + [rotvec_to_matrix(unit * step * k) for k in range(1, steps + 1)])
    R = prior_rotations.to(torch.float64)[:, None] @ turns.to(torch.float64)[None]  # (B, 1 + 26 steps, 3, 3)
    ids = locate_in_so3_grid(R, level)
    _, n_psi = so3_grid_resolution(level)
    key = ids[..., 0] * n_psi + ids[..., 1]
    ordered, order = key.sort(dim=1)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    keep = torch.ones_like(repeat)
    keep.scatter_(1, order, ~repeat)
    return ids, keep


_GRID_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _full_grid(level: int) -> tuple[torch.Tensor, torch.Tensor]:
    if level not in _GRID_CACHE:
        _GRID_CACHE[level] = so3_grid(level)
    return _GRID_CACHE[level]


def _global_pass(ref, x, ctf, inv_sigma2, coords, centres, schedule, chunk: int = 512):
    """Score the whole grid at ``coarse_level`` on the coarse band; return kept ids and new centres."""
    D = ref.box_size
    radius = coords.norm(dim=-1)
    band = radius < min(schedule.coarse_radius, float(radius.max()) + 1)
    cb, xb, ctfb, wb = coords[band], x[:, band], ctf[:, band], inv_sigma2[..., band]
    rotations, ids = _full_grid(schedule.coarse_level)
    n = int(round(2 * schedule.offset_range_pixel / schedule.offset_step_pixel)) + 1
    offsets = translation_grid(schedule.offset_step_pixel * n / 2, n)
    xc = phase_shift_coords(xb, cb, centres, D)
    lse, best_t = [], []
    for start in range(0, len(rotations), chunk):
        s = ref.slices(rotations[start : start + chunk], cb)
        ll = log_likelihoods(xc, ctfb, wb, s, offsets, cb, D)  # (B, c, T)
        lse.append(torch.logsumexp(ll, dim=2))
        best_t.append(ll.argmax(dim=2))
    lse, best_t = torch.cat(lse, 1), torch.cat(best_t, 1)
    index, keep = significant(lse, significance=schedule.significance, max_count=schedule.max_significant)
    new_centres = centres + offsets[best_t.gather(1, index[:, :1])[:, 0]]
    return ids[index], keep, new_centres


def _refine_pass(ref, x, ctf, inv_sigma2, coords, centres, cand_ids, cand_keep, level, step):
    """Score candidate ids (B, C, 2) at ``level`` with a 3 x 3 shift grid of ``step`` around the centres."""
    D = ref.box_size
    rotations = so3_grid_rotations(cand_ids, level)
    s = ref.slices(rotations, coords)  # (B, C, P)
    offsets = translation_grid(1.5 * step, 3)
    xc = phase_shift_coords(x, coords, centres, D)
    ll = log_likelihoods(xc, ctf, inv_sigma2, s, offsets, coords, D)
    ll = ll.masked_fill(~cand_keep[:, :, None], -math.inf)
    return ll, rotations, offsets


def search_batch(
    ref: Reference,
    images_ft: torch.Tensor,
    ctf: torch.Tensor,
    inv_sigma2: torch.Tensor,
    coords_index: torch.Tensor,
    schedule: SearchSchedule,
    *,
    prior_shifts_pixel: torch.Tensor,
    prior_rotations: torch.Tensor | None = None,
) -> BatchPosterior:
    """One E-step for a batch: global or local search down to ``schedule.level`` (module docstring).

    ``images_ft``/``ctf`` ``(B, P)`` at ``coords_index`` (the current band); ``prior_shifts_pixel``
    ``(B, 2)`` centre the shift search; ``prior_rotations`` ``(B, 3, 3)`` (the previous poses) are
    needed for a local search.
    """
    centres = prior_shifts_pixel.to(torch.float32)
    if schedule.local:
        if prior_rotations is None:
            raise ValueError("a local search needs the previous poses (prior_rotations)")
        start = schedule.level - 1 if schedule.local_start_level is None else min(schedule.local_start_level,
                                                                                    schedule.level)
        ids, keep = local_candidates(prior_rotations, start, schedule.local_steps)
        ll, _, offsets = _refine_pass(ref, images_ft, ctf, inv_sigma2, coords_index, centres, ids, keep, start,
                                      schedule.offset_step_at(start))
        lse = torch.logsumexp(ll, dim=2)
        index, keep = significant(lse, significance=schedule.significance, max_count=schedule.max_significant)
        centres = centres + offsets[ll.gather(1, index[:, :1, None].expand(-1, 1, ll.shape[2]))[:, 0].argmax(-1)]
        ids = ids.gather(1, index[..., None].expand(-1, -1, 2))
    else:
        ids, keep, centres = _global_pass(ref, images_ft, ctf, inv_sigma2, coords_index, centres, schedule)
        start = schedule.coarse_level
    for level in range(start + 1, schedule.level + 1):
        children = so3_grid_children(ids).flatten(-3, -2)  # (B, K*8, 2)
        ckeep = keep[:, :, None].expand(-1, -1, 8).reshape(keep.shape[0], -1)
        ll, rotations, offsets = _refine_pass(ref, images_ft, ctf, inv_sigma2, coords_index, centres, children,
                                              ckeep, level, schedule.offset_step_at(level))
        if level < schedule.level:
            lse = torch.logsumexp(ll, dim=2)
            index, keep = significant(lse, significance=schedule.significance, max_count=schedule.max_significant)
            best_t = ll.gather(1, index[:, :1, None].expand(-1, 1, ll.shape[2]))[:, 0].argmax(-1)
            centres = centres + offsets[best_t]
            ids = children.gather(1, index[..., None].expand(-1, -1, 2))
    if schedule.level == start:  # no refinement pass ran: score the starting candidates themselves
        ll, rotations, offsets = _refine_pass(ref, images_ft, ctf, inv_sigma2, coords_index, centres, ids, keep,
                                              start, schedule.offset_step_at(start))
        children = ids
    return _posterior(ll, rotations, offsets, centres, children, schedule)


def _posterior(ll, rotations, offsets, centres, ids, schedule) -> BatchPosterior:
    """Keep the poses holding ``significance`` of the last pass's mass (at most ``max_poses``)."""
    B, C, T = ll.shape
    flat = ll.reshape(B, C * T)
    index, keep = significant(flat, significance=schedule.significance, max_count=schedule.max_poses)
    weights = torch.softmax(flat.gather(1, index).masked_fill(~keep, -math.inf), dim=1)
    weights = torch.where(weights >= schedule.min_pose_weight, weights, torch.zeros_like(weights))
    weights[:, 0] = weights[:, 0].clamp_min(1e-12)  # the best pose always stays
    weights = weights / weights.sum(1, keepdim=True)
    ci, ti = index // T, index % T
    rot = rotations.gather(1, ci[:, :, None, None].expand(-1, -1, 3, 3))
    shifts = centres[:, None, :] + offsets[ti]
    best = ids.gather(1, ci[:, :1, None].expand(-1, 1, 2))[:, 0]
    return BatchPosterior(rotations=rot, shifts_pixel=shifts, weights=weights, best_ids=best,
                          log_evidence=torch.logsumexp(flat, dim=1), level=schedule.level)


def estimate_scale(ref: Reference, images_ft, ctf, coords_index, *, level: int = 1, radius: float = 10.0,
                   offset_range_pixel: float = 3.0, chunk: int = 512) -> float:
    """Least-squares grey scale ``a`` of a reference against a few images (``V -> a V``).

    An initial map from another program has an arbitrary scale, and the likelihood needs the
    absolute one (RELION's first-iteration problem).  Each image's pose is found by the
    scale-free correlation ``Re<cS, X> / |cS|`` on the grid at ``level`` (band ``radius``), then
    ``a = sum cross / sum norm`` over those best poses.
    """
    D = ref.box_size
    band = coords_index.norm(dim=-1) < radius
    cb, xb, cf = coords_index[band], images_ft[:, band], ctf[:, band]
    ones = torch.ones(cb.shape[0])
    rotations, _ = _full_grid(level)
    offsets = translation_grid(offset_range_pixel + 0.5, 2 * int(offset_range_pixel) + 1)
    best_cc = torch.full((xb.shape[0],), -math.inf)
    best_cross = torch.zeros(xb.shape[0])
    best_norm = torch.ones(xb.shape[0])
    for start in range(0, len(rotations), chunk):
        cross, norm, _ = cross_and_norm(xb, cf, ones, ref.slices(rotations[start : start + chunk], cb), offsets, cb, D)
        cross, t = cross.max(dim=2)
        cc = cross / norm.clamp_min(1e-30).sqrt()
        value, c = cc.max(dim=1)
        better = value > best_cc
        best_cc = torch.where(better, value, best_cc)
        best_cross = torch.where(better, cross.gather(1, c[:, None])[:, 0], best_cross)
        best_norm = torch.where(better, norm.gather(1, c[:, None])[:, 0], best_norm)
    return float(best_cross.sum() / best_norm.sum().clamp_min(1e-30))
