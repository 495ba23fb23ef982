#!/usr/bin/env python
"""Hard EM from perturbed poses, with class maps, cross-fitting or sharpened maps: what holds the pose error?  (issue 15)

    .venv/bin/python bench/pose_hard_em.py DATA [--rounds 3] [--classes K] [--labels truth|Z.npy] [--folds F]
                                           [--sharpen-oracle] [--start true|POSES.pkl] [--local-steps 1]

DATA is a bench/oracle.py hinge folder holding ``poses_perturbed_5deg_1px.pkl`` (bench/cryoformer.py
``perturb_poses``).  Every round backprojects the images at their current poses and moves each image to its
posterior-mean pose in a local search against that map (cryoscape's classical E-step, classical/em.py
``search_batch``: a window of one level-2 step around the pose, refined to level 4, 1.9 degrees; shifts on a
1-px grid of +/- 2 px; band 32 Fourier pixels).  Plain hard EM stops near 4.3 degrees from a 5-degree start
(bench/results/poses_2026-12-05_limits.txt, section 5).  The options test three explanations of that fixed point:

* ``--classes K``: one map per class, each image searched against its own class's map, the classes being K
  equal-count bins along the hinge's true coordinate (``--labels truth``) or along the first principal
  component of a run's latents (``--labels run/z.E.npy``): is it the hinge's motion blurring one map?
* ``--folds F``: each image searched against maps built without its fold (cross-fitting): is it each image's
  own noise in the map, holding it where it was put?
* ``--sharpen-oracle``: each map's Fourier shells rescaled to the amplitudes of the same images' map at the
  TRUE poses: is it the high-frequency amplitude the 5-degree blur removes?

``--start true`` starts from the true poses (what one round gives with perfect poses, and where the rounds go
from there); ``--start poses_perturbed_2.5deg_0.5px.pkl`` from another perturbation of them.  After each round the
median rotation error (as given) and shift error against the truth are printed.  Results in
bench/results/poses_2026-12-05_hard_em.txt and poses_2026-12-05_em_starts.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryoscape.classical.em import Reference, SearchSchedule, estimate_scale, search_batch
from cryoscape.classical.refine import noise_spectrum_from_images
from cryoscape.classical.runs import source_from_table
from cryoscape.fourier.fft import fft3_center
from cryoscape.fourier.filters import apply_fourier_filter, radial_average, radial_profile_to_grid
from cryoscape.geometry.align import pose_errors
from cryoscape.io.particles import load_particles
from cryoscape.reconstruct.backproject import backproject_particles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_name  # noqa: E402

BAND_PIXEL = 32.0
CHUNK = 64


def class_labels(data: str, labels_from: str, n_classes: int) -> np.ndarray:
    """``(N,)`` class of every image: equal-count bins along the true coordinate or a run's first latent PC."""
    if labels_from == "truth":
        c = np.load(f"{data}/ground_truth.npz")["coordinate"]
    else:
        z = np.load(labels_from)
        z = z - z.mean(0)
        c = z @ np.linalg.svd(z, full_matrices=False)[2][0]
    return np.minimum((np.argsort(np.argsort(c)) * n_classes) // len(c), n_classes - 1)


def sharpen_like(volume: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``volume`` with each Fourier shell's mean amplitude rescaled to ``target``'s (ratio capped at 20)."""
    mean_a, mean_b = (radial_average(fft3_center(v.double()).abs(), ndim=3) for v in (volume, target))
    ratio = (mean_b / mean_a.clamp(min=1e-12)).clamp(max=20.0)
    weights = radial_profile_to_grid(ratio, volume.shape[0], ndim=3)
    return apply_fourier_filter(volume.double(), weights, ndim=3).float()


def e_step(source, table, members: np.ndarray, volume: torch.Tensor, schedule: SearchSchedule,
           inv_sigma2: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Posterior-mean rotations ``(M, 3, 3)`` and shifts ``(M, 2)`` of ``members`` against ``volume``."""
    band = source.coords.norm(dim=-1) < BAND_PIXEL
    ref = Reference.from_volume(volume.float())
    scale = estimate_scale(ref, *source.batch(members[:200]), source.coords)
    rotations, shifts = [], []
    for start in range(0, len(members), CHUNK):
        idx = members[start:start + CHUNK]
        x, ctf = source.batch(idx)
        post = search_batch(ref, x[:, band] / scale, ctf[:, band], inv_sigma2[band] * scale ** 2, source.coords[band],
                            schedule, prior_shifts_pixel=torch.as_tensor(table.shifts_pixel[idx], dtype=torch.float32),
                            prior_rotations=torch.as_tensor(table.rotations[idx], dtype=torch.float32))
        R, t = post.mean_pose()
        rotations.append(R.double().numpy())
        shifts.append(t.double().numpy())
    return np.concatenate(rotations), np.concatenate(shifts)


def one_round(source, table, labels, args, schedule, inv_sigma2, true_maps) -> None:
    """Every (class, fold): backproject the builders at their current poses, then move the fold's images."""
    R_new, t_new = np.empty_like(table.rotations), np.empty_like(table.shifts_pixel)
    for k in range(args.classes):
        members_k = np.flatnonzero(labels == k)
        for f in range(args.folds):
            searched = members_k[members_k % args.folds == f]
            builders = members_k[members_k % args.folds != f] if args.folds > 1 else members_k
            volume = backproject_particles(table.subset(builders), progress=False, regularization=1.0).volume
            if args.sharpen_oracle:
                volume = sharpen_like(volume, true_maps[k])
            R_new[searched], t_new[searched] = e_step(source, table, searched, volume, schedule, inv_sigma2)
    table.rotations, table.shifts_pixel = R_new, t_new


def errors(table, truth) -> str:
    """Median rotation error (degrees, as given) and shift error (pixels) against the truth."""
    angle = pose_errors(table.rotations, truth.rotations, align=False)["angle_deg_median"]
    shift = float(np.median(np.linalg.norm(table.shifts_pixel - truth.shifts_pixel, axis=1)))
    return f"rotation {angle:.2f} deg, shift {shift:.2f} px"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--classes", type=int, default=1)
    p.add_argument("--labels", default="truth", help="truth, or a run's z.E.npy")
    p.add_argument("--folds", type=int, default=1)
    p.add_argument("--sharpen-oracle", action="store_true")
    p.add_argument("--start", default="poses_perturbed_5deg_1px.pkl",
                   help="'true', or a poses.pkl in DATA (bench/cryoformer.py perturb_poses) [%(default)s]")
    p.add_argument("--local-steps", type=int, default=1, help="window half-width in level-2 steps (7.5 deg)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    truth = load_particles(f"{args.data}/particles.star")
    start = "poses.pkl" if args.start == "true" else args.start
    table = load_particles(f"{args.data}/particles.star", poses_path=f"{args.data}/{start}")
    labels = class_labels(args.data, args.labels, args.classes)
    source = source_from_table(table)
    inv_sigma2 = (1.0 / noise_spectrum_from_images(source, np.arange(0, len(table), max(1, len(table) // 1000))))
    inv_sigma2 = inv_sigma2[source.shell]
    schedule = SearchSchedule(level=4, local=True, local_start_level=2, local_steps=args.local_steps,
                              offset_range_pixel=2, offset_step_pixel=1, max_poses=64, min_pose_weight=0.0)
    true_maps = {k: backproject_particles(truth.subset(np.flatnonzero(labels == k)), progress=False,
                                          regularization=1.0).volume for k in range(args.classes)
                 } if args.sharpen_oracle else {}
    print(f"# {machine_name()}; {args.data}: {len(table)} images; {vars(args)}")
    print(f"start: {errors(table, truth)}", flush=True)
    for r in range(args.rounds):
        t0 = time.perf_counter()
        one_round(source, table, labels, args, schedule, inv_sigma2, true_maps)
        print(f"round {r + 1}: {errors(table, truth)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
