"""The baseline of the micrograph EM: pick particles by template matching, then backproject.

Each iteration
--------------
1. Templates: projections of the current map at the rotations of the 30-degree SO(3) grid
   (geometry/so3_grid.py level 0), times each micrograph's CTF, at half the box (micrographs
   Fourier-cropped by 2, as in the first stages of the EM).
2. Matching: the whole (mean-subtracted) micrograph is cross-correlated with every template by FFT;
   the score of a position is the best correlation over rotations divided by the template's norm
   (the matched filter under white noise), and the best rotation is kept as the pick's pose.
3. Picks: local maxima taken greedily by score, at least ``D`` apart (Chebyshev), either the
   ``picks_per_micrograph`` best or those above ``median + threshold * 1.4826 * MAD`` of the score map.
4. Reconstruction: the ``D x D`` boxes around the picks (full resolution) are backprojected with
   the picked poses and their micrograph's CTF (reconstruct/backproject.py, Wiener constant 1).

The picks carry poses, so no separate refinement runs; iterating re-picks with the improved map
(iteration 1 picks with the initial map).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from cryoscape.fourier.fft import ifft2_center
from cryoscape.fourier.resample import downsample_volume
from cryoscape.fourier.slicing import prepare_projection_volume, project_prepared
from cryoscape.geometry.so3_grid import so3_grid
from cryoscape.io.micrographs import MicrographTable, write_coordinates_star
from cryoscape.reconstruct.backproject import backproject_images, reconstruct_from_accumulator
from cryoscape.reconstruct.micrograph_em import (
    MicrographPatches,
    _write_log,
    compare_to_reference,
    downsample_micrograph,
)

__all__ = ["match_templates", "pick_peaks", "pick_micrograph", "run_pick_baseline"]

log = logging.getLogger("cryoscape.micrograph_em")


def match_templates(micrograph: torch.Tensor, templates: torch.Tensor, *, batch: int = 64):
    """Best normalised correlation over templates at every position, and the best template's index.

    ``micrograph`` is ``(H, W)``; ``templates`` ``(K, L, L)`` with origin at index ``L // 2``.  Position
    ``(y, x)`` of the result scores a template centred on pixel ``(y, x)``.
    """
    H, W = micrograph.shape
    L = templates.shape[-1]
    spec = torch.fft.rfft2(micrograph)
    best = torch.full((H, W), -math.inf, device=micrograph.device)
    arg = torch.zeros(H, W, dtype=torch.long, device=micrograph.device)
    norms = templates.reshape(len(templates), -1).norm(dim=1).clamp(min=1e-30)
    for start in range(0, len(templates), batch):
        t = templates[start : start + batch] / norms[start : start + batch, None, None]
        t_ft = torch.fft.rfft2(t, s=(H, W))
        corr = torch.fft.irfft2(spec[None] * t_ft.conj(), s=(H, W))
        # template top-left at (y, x) means its centre at (y + L//2, x + L//2)
        corr = torch.roll(corr, shifts=(L // 2, L // 2), dims=(-2, -1))
        value, index = corr.max(0)
        better = value > best
        best = torch.where(better, value, best)
        arg = torch.where(better, index + start, arg)
    return best, arg


def pick_peaks(score: torch.Tensor, *, min_distance: int, border: int, count: int | None, threshold: float) -> np.ndarray:
    """``(n, 2)`` ``(y, x)`` peaks taken greedily by score, ``min_distance`` apart, ``border`` from the edges."""
    s = score.clone()
    H, W = s.shape
    s[:border], s[H - border :], s[:, :border], s[:, W - border :] = -math.inf, -math.inf, -math.inf, -math.inf
    valid = s[torch.isfinite(s)]
    median = valid.median()
    cut = float(median + threshold * 1.4826 * (valid - median).abs().median())
    peaks = []
    limit = count if count is not None else H * W
    while len(peaks) < limit:
        flat = int(torch.argmax(s))
        y, x = divmod(flat, W)
        value = float(s[y, x])
        if not math.isfinite(value) or (count is None and value < cut):
            break
        peaks.append((y, x))
        s[max(0, y - min_distance + 1) : y + min_distance, max(0, x - min_distance + 1) : x + min_distance] = -math.inf
    return np.array(peaks, dtype=np.int64).reshape(-1, 2)


def pick_micrograph(source: MicrographPatches, g: int, proj_ft: torch.Tensor, L: int, *, count, threshold):
    """Picks ``(n, 2)`` ``(y, x)`` in full-size pixels and their template indices for micrograph ``g``."""
    from cryoscape.io.micrographs import read_micrograph

    D = source.box_size
    mic = torch.from_numpy(read_micrograph(source.table.paths[g])).double()
    mic = mic - mic.median()
    H, W = mic.shape
    Hs, Ws = (H * L) // D, (W * L) // D
    small = downsample_micrograph(mic[: Hs * D // L, : Ws * D // L], (Hs, Ws)).float().to(proj_ft.device)
    templates = ifft2_center(proj_ft * source.ctf_image(g, L, device=proj_ft.device)).real
    score, arg = match_templates(small, templates)
    peaks = pick_peaks(score, min_distance=L, border=L // 2 + 1, count=count, threshold=threshold)
    index = arg[peaks[:, 0], peaks[:, 1]].cpu().numpy() if len(peaks) else np.zeros(0, np.int64)
    return peaks * (D // L), index


def _extract(path: str, centres_yx: np.ndarray, D: int) -> np.ndarray:
    from cryoscape.io.micrographs import read_micrograph

    mic = read_micrograph(path)
    mic = mic - np.median(mic)
    H, W = mic.shape
    boxes = []
    for y, x in centres_yx:
        y0, x0 = int(y) - D // 2, int(x) - D // 2
        box = np.zeros((D, D), np.float32)
        ys, xs = slice(max(0, y0), min(H, y0 + D)), slice(max(0, x0), min(W, x0 + D))
        box[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = mic[ys, xs]
        boxes.append(box)
    return np.stack(boxes) if boxes else np.zeros((0, D, D), np.float32)


def _pick_all(volume, source, *, count, threshold, device, progress, turn=None):
    from tqdm.auto import tqdm

    D = source.box_size
    L = D // 2
    rotations = so3_grid(0, device=device)[0]
    if turn is not None:  # the grid turned as a whole (see run_pick_baseline)
        rotations = rotations @ torch.as_tensor(turn, dtype=rotations.dtype, device=device)
    prepared = prepare_projection_volume(downsample_volume(volume, L), oversampling=2)
    proj_ft = torch.cat([project_prepared(prepared, rotations[i : i + 256], box_size=L, return_fourier=True)
                         for i in range(0, len(rotations), 256)])
    boxes, poses, owners, centres = [], [], [], []
    for g in tqdm(range(len(source)), desc="picking", disable=not progress, leave=False):
        peaks, index = pick_micrograph(source, g, proj_ft, L, count=count, threshold=threshold)
        boxes.append(_extract(source.table.paths[g], peaks, D))
        poses.append(rotations[torch.as_tensor(index, dtype=torch.long, device=device)].cpu().numpy())
        owners.append(np.full(len(peaks), g))
        centres.append(peaks)
    return (np.concatenate(boxes), np.concatenate(poses).reshape(-1, 3, 3), np.concatenate(owners),
            np.concatenate(centres).reshape(-1, 2))


def _backproject(boxes, poses, owners, source, device) -> torch.Tensor:
    D = source.box_size

    def ctf_batch(idx, freqs):
        if not source.use_ctf:
            return torch.ones(len(idx), freqs.shape[0], device=freqs.device)
        return torch.stack([source.ctf_at(int(owners[i]), freqs, D) for i in idx])

    acc = backproject_images(lambda idx: boxes[idx], box_size=D, rotations=poses, ctf_batch=ctf_batch,
                             oversampling=2, device=device, invert_contrast=False, progress=False)
    return reconstruct_from_accumulator(acc, regularization=1.0, gridding_correction=True).volume


def run_pick_baseline(
    table: MicrographTable, initial_map: torch.Tensor, *, box_size: int, out_dir, iterations: int = 5,
    picks_per_micrograph: int | None = None, threshold: float = 4.0, reference: torch.Tensor | None = None,
    use_ctf: bool = True, device="cpu", progress: bool = False, turn_grid: bool = False, seed: int = 0,
) -> torch.Tensor:
    """Pick-then-reconstruct for ``iterations`` rounds; writes ``map.mrc``, ``iterations.tsv``, ``picks.npz``
    (the last round's picks: micrograph index, ``(x, y)`` centre in pixels, rotation) and ``picks.star``.

    ``turn_grid``: from the second round on, the 30-degree grid is turned by a random rotation (seeded), as
    the micrograph EM does by default (reconstruct/micrograph_em.py).  Off by default: at low SNR many picks
    are noise, and a fixed grid keeps the map nearer the initial one (README, "From micrographs").
    """
    from scipy.spatial.transform import Rotation

    from cryoscape.io.mrc import write_mrc

    out = Path(out_dir)
    source = MicrographPatches(table, box_size, out / "cache", use_ctf=use_ctf)
    volume = initial_map.to(device=device, dtype=torch.float32)
    history, started, rng = [], time.perf_counter(), np.random.default_rng(seed)
    for it in range(iterations):
        turn = Rotation.random(random_state=rng).as_matrix() if turn_grid and it > 0 else None
        boxes, poses, owners, centres = _pick_all(volume, source, count=picks_per_micrograph, threshold=threshold,
                                                  device=device, progress=progress, turn=turn)
        if len(boxes) == 0:
            log.info("iteration %d: no picks above the threshold; the map is unchanged", it + 1)
        else:
            volume = _backproject(boxes, poses, owners, source, device).to(device)
        row = {"iteration": it + 1, "stage": 1, "box": box_size, "band_limit_angstrom": 2 * source.pixel_size_angstrom,
               "n_rotations": 576, "n_patches": len(boxes), "wall_s": time.perf_counter() - started}
        if reference is not None:
            cmp = compare_to_reference(volume, reference, source.pixel_size_angstrom)
            row["fsc_0.5_angstrom"], row["fsc_auc"] = cmp["res_0.5_angstrom"], cmp["fsc_auc"]
        history.append(row)
        log.info("pick iteration %d: %d picks%s, %.1f s", it + 1, len(boxes),
                 f", FSC=0.5 at {row['fsc_0.5_angstrom']:.1f} A (AUC {row['fsc_auc']:.3f})" if reference is not None else "",
                 row["wall_s"])
        _write_log(out / "iterations.tsv", history)
    # the last round's picks: micrograph, centre (x, y) in pixels, pose
    np.savez(out / f".picks.{os.getpid()}.npz", micrograph_index=owners, positions_pixel=centres[:, ::-1],
             rotations=poses)
    os.replace(out / f".picks.{os.getpid()}.npz", out / "picks.npz")
    write_coordinates_star(out / "picks.star", table.names[owners], centres[:, ::-1], rotations=poses)
    write_mrc(out / "map.mrc", volume.cpu().numpy(), pixel_size_angstrom=source.pixel_size_angstrom)
    return volume
