#!/usr/bin/env python
"""RELION 3.1's local auto-refine from perturbed poses: does the peer halve a 5-degree error?  (issue 15)

    .venv/bin/python bench/pose_relion_local.py DATA [--healpix-order 4] [--n-images N] [--timeout 5400]

DATA is a bench/cryoformer.py (or bench/oracle.py) hinge folder holding ``poses_perturbed_5deg_1px.pkl``
(bench/cryoformer.py ``perturb_poses``).  The same question bench/pose_local_refine.py asks of cryoscape's
classical engine, asked of the peer: RELION's ``relion_refine_mpi --auto_refine`` (gold-standard half-sets;
a leader and two one-thread followers, its equivalent of 2 threads) starts from the PERTURBED poses and a
``relion_reconstruct`` map made with them, and searches locally from the first iteration
(``--auto_local_healpix_order`` equal to ``--healpix_order``): RELION 3.1 then puts a Gaussian prior on each
Euler angle around the input pose, searched over +/- 3 sigma, whose sigma it sets itself to twice the
oversampled angular step (``--sigma_ang`` is overridden in 3.1's auto-refine): 3.75 degrees at order 4,
7.5 at order 3.  After RELION stops (converged, or at ``--timeout``), the median rotation and shift
errors of every iteration's ``run_itNNN_data.star`` against the true poses are printed, as given and with the
best global rotation removed.  Results in bench/results/poses_2026-12-05_relion_local.txt.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cryoscape_command,
    machine_name,
    print_note,
    relion_auto_refine_command,
    run_timed,
    thread_env,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench/relion_local"))
    p.add_argument("--n-images", type=int, help="only the first N images (default: all)")
    p.add_argument("--start-poses", default="poses_perturbed_5deg_1px.pkl",
                   help="poses file in DATA to start from [poses_perturbed_5deg_1px.pkl]; poses.pkl: the truth")
    p.add_argument("--healpix-order", type=int, default=4,
                   help="first angular sampling (4 = 3.75 deg, prior sigma 3.75 deg) [4]")
    p.add_argument("--ini-high", type=float, default=20.0, help="low-pass of the first reference (A) [20]")
    p.add_argument("--particle-diameter", type=float, default=200.0, help="mask diameter (A) [200]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=int, default=5400, help="stop RELION after this many seconds [5400]")
    return p.parse_args(argv)


def prepare(args, env) -> Path:
    """The starting poses as a RELION STAR file (absolute image paths) and RELION's map made with them."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    star = args.workdir / "start.star"
    command = [*cryoscape_command(), "import", args.data / "particles.star", "--poses",
               args.data / args.start_poses, "--out-star", star, "--absolute-paths"]
    if args.n_images:
        np.savetxt(args.workdir / "first.txt", np.arange(args.n_images), fmt="%d")
        command += ["--ind", args.workdir / "first.txt"]
    run_timed(command, log_path=args.workdir / "import.log", env=env)
    reference = args.workdir / "reference.mrc"
    run_timed(["relion_reconstruct", "--i", star, "--o", reference, "--ctf"],
              log_path=args.workdir / "reconstruct.log", env=env)
    return reference


def refine(args, reference: Path, env):
    """RELION's auto-refine with local searches from the start; its RunResult."""
    out = args.workdir / "relion"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = ["timeout", args.timeout, *relion_auto_refine_command(
        args.threads, args.workdir / "start.star", out / "run", reference, ini_high_angstrom=args.ini_high,
        particle_diameter_angstrom=args.particle_diameter, healpix_order=args.healpix_order,
        local_healpix_order=args.healpix_order, offset_range_pixel=3, offset_step_pixel=1)]
    result = run_timed(command, log_path=args.workdir / "relion.log", env=env, check=False)
    print_note("relion command: " + " ".join(str(c) for c in command))
    return result


def score(args, label: str, star: Path, truth) -> None:
    """One line: median rotation error as given and aligned, median shift error."""
    from cryoscape.geometry.align import pose_errors
    from cryoscape.io.particles import load_particles

    table = load_particles(star)
    index = np.arange(args.n_images or len(table))  # the STAR files hold the first N images, in order
    R_true, t_true = truth.rotations[index], truth.shifts_pixel[index]
    given = pose_errors(table.rotations, R_true, table.shifts_pixel, t_true, align=False)
    aligned = pose_errors(table.rotations, R_true, table.shifts_pixel, t_true, flip=False)
    print(f"{label}: median rotation error {given['angle_deg_median']:.2f} deg as given, "
          f"{aligned['angle_deg_median']:.2f} aligned; median shift error {given['translation_pixel_median']:.2f} px",
          flush=True)


def main(argv=None) -> int:
    from cryoscape.io.particles import load_particles

    args = parse_args(argv)
    if not (shutil.which("relion_refine_mpi") and shutil.which("mpirun")):
        print_note("relion_refine_mpi or mpirun not found (scripts/testdeps/relion.sh installs RELION): nothing to run")
        return 1
    env = thread_env(args.threads)
    print_note(f"{machine_name()}; {args.threads} threads (RELION: mpirun -n {args.threads + 1}, --j 1)")
    reference = prepare(args, env)
    truth = load_particles(args.data / "particles.star")
    score(args, f"input ({args.start_poses})", args.workdir / "start.star", truth)
    result = refine(args, reference, env)
    stopped = "stopped at --timeout" if result.returncode == 124 else f"exit status {result.returncode}"
    print_note(f"relion_refine: {result.wall_s:.0f} s, {stopped}")
    for star in sorted((args.workdir / "relion").glob("run_it[0-9][0-9][0-9]_data.star")):
        score(args, f"iteration {int(star.name[6:9])}", star, truth)
    final = args.workdir / "relion" / "run_data.star"
    if final.exists():
        score(args, "final (converged)", final, truth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
