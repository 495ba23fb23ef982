"""Classical local refinement from perturbed poses: does iterating search and reconstruction halve a 5-degree error?  (issue 15)

    .venv/bin/python bench/pose_local_refine.py DATA [--level 4] [--window-level 2] [--ini-high 20] [--iterations 5]

DATA is a bench/cryoformer.py (or bench/oracle.py) hinge folder holding ``poses_perturbed_5deg_1px.pkl``
(bench/cryoformer.py ``perturb_poses``).  The images are refined by cryoscape's classical EM engine
(classical/refine.py, gold-standard half-sets) starting from the PERTURBED poses and a backprojection made
with them, searching locally from the first iteration (a window of one step of ``--window-level`` around each
pose, refined down to ``--level``), instead of the global search a ``cryoscape refine`` run starts with.
After every iteration the median rotation error against the true poses is printed.  This is the ceiling of
"refine poses by searching against maps learnt from the poses one was given", the strategy the CryoFormer
refinement goal would need; results in bench/results/poses_2026-12-05_limits.txt.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cryoscape.classical.refine import RefineSettings, initial_state, run_iteration
from cryoscape.classical.runs import source_from_table
from cryoscape.geometry.align import pose_errors
from cryoscape.io.particles import load_particles
from cryoscape.reconstruct.backproject import backproject_particles


def median_error_deg(R: np.ndarray, R_true: np.ndarray) -> float:
    """Median rotation angle to the truth in degrees, as given (no global alignment)."""
    return float(pose_errors(np.asarray(R, dtype=np.float64), R_true, align=False)["angle_deg_median"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data")
    p.add_argument("--level", type=int, default=4, help="grid level of the first local searches (4 = 1.9 deg)")
    p.add_argument("--window-level", type=int, default=2, help="window: one step of this level (2 = 7.5 deg)")
    p.add_argument("--ini-high", type=float, default=20.0, help="low-pass of the first reference (A)")
    p.add_argument("--iterations", type=int, default=5)
    args = p.parse_args(argv)
    truth = load_particles(f"{args.data}/particles.star")
    table = load_particles(f"{args.data}/particles.star", poses_path=f"{args.data}/poses_perturbed_5deg_1px.pkl")
    pixel = float(np.median(table.pixel_size_angstrom))
    print(f"# {args.data}: {len(table)} images; input median rotation error "
          f"{median_error_deg(table.rotations, truth.rotations):.2f} deg")
    settings = RefineSettings(initial_lowpass_angstrom=args.ini_high, local_window_level=args.window_level,
                              start_level=args.level, local_from_level=1)
    source = source_from_table(table)
    state = initial_state(source, len(table), backproject_particles(table, progress=False).volume, pixel, settings,
                          initial_shifts_pixel=table.shifts_pixel)
    state.rotations, state.local = torch.as_tensor(table.rotations, dtype=torch.float32), True
    for _ in range(args.iterations):
        s = run_iteration(source, state, settings, pixel)
        print(f"iteration {s['iteration']}: level {s['level']}, band {s['band_radius']:.1f}, "
              f"resolution {s['resolution_angstrom']:.2f} A, median pose change {s['median_pose_change_deg']:.2f} deg, "
              f"median rotation error {median_error_deg(state.rotations.numpy(), truth.rotations):.2f} deg "
              f"({s['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
