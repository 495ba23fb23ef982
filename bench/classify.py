#!/usr/bin/env python
"""Benchmark: ``cryoscape classify`` against RELION's 3D classification (``relion_refine --K 4``).

What it compares
----------------
A 4-class simulated set (the built-in molecule at hinge 0, 20, 40 and 60 degrees; D = 64,
SNR 0.1; 2,000 images by default) with its true poses, classified into K = 4 classes without
alignment (ours ``--no-align``, RELION ``--skip_align``) from the consensus map (our
backprojection of all images), 25 iterations at most, T = 4, 2 threads each, on this machine in one
run.  Figures: wall time, adjusted Rand index of the classes against the truth, class sizes.  The
ratio RELION wall time / ours is printed last.

Usage::

    /work/main/.venv/bin/python bench/classify.py
    /work/main/.venv/bin/python bench/classify.py --n-images 1200
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cryoscape_command, print_figure, print_note, run_timed, thread_env, tool_version  # noqa: E402
from refine import machine_notes  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench/classify"))
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def ari(star: Path, truth: np.ndarray) -> tuple[float, list[int]]:
    import starfile
    from sklearn.metrics import adjusted_rand_score

    labels = starfile.read(star)["particles"]["rlnClassNumber"].to_numpy()
    return float(adjusted_rand_score(truth, labels)), np.bincount(labels)[1:].tolist()


def main(argv=None) -> int:
    args = parse_args(argv)
    env = thread_env(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / f"data_n{args.n_images}"
    if not (data / "particles.star").exists():
        run_timed([*cryoscape_command(), "simulate", "-o", data, "-n", args.n_images, "-D", 64, "--snr", 0.1,
                   "--heterogeneity", "discrete", "--n-classes", 4, "--hinge-range-deg", 0, 60, "--seed", 3],
                  log_path=args.workdir / "simulate.log", env=env)
    consensus = args.workdir / "consensus"
    run_timed([*cryoscape_command(), "backproject", data / "particles.star", "-o", consensus, "--no-progress"],
              log_path=args.workdir / "consensus.log", env=env)
    truth = np.load(data / "ground_truth.npz")["state_index"]
    machine_notes(args.threads)
    print_note(f"{args.n_images} images of 4 hinge classes, D=64, SNR 0.1; "
               f"cryoscape {tool_version(cryoscape_command(), env)}")
    ours_dir = args.workdir / "cryoscape"
    shutil.rmtree(ours_dir, ignore_errors=True)
    ours = run_timed([*cryoscape_command(), "classify", data / "particles.star", "-K", 4, "--initial-map",
                      consensus / "map.mrc", "-o", ours_dir, "--no-align"], log_path=args.workdir / "cryoscape.log",
                     env=env)
    if ours.returncode != 0:
        print_note(f"cryoscape classify failed:\n{ours.tail()}")
        return 1
    score, sizes = ari(ours_dir / "particles.star", truth)
    print_figure("cryoscape wall time", ours.wall_s, "s", fmt=".0f")
    print_figure("cryoscape adjusted Rand index", score, fmt=".3f")
    print_note(f"cryoscape class sizes {sizes}")
    if not shutil.which("relion_refine"):
        print_note("relion_refine not found (scripts/testdeps/relion.sh installs it): no RELION figures")
        return 0
    rel_dir = args.workdir / "relion"
    shutil.rmtree(rel_dir, ignore_errors=True)
    rel_dir.mkdir(parents=True)
    relion = run_timed(["relion_refine", "--i", "particles.star", "--o", rel_dir / "run", "--ref",
                        consensus / "map.mrc", "--ini_high", 40, "--K", 4, "--iter", 25, "--tau2_fudge", 4,
                        "--particle_diameter", 200, "--ctf", "--skip_align", "--flatten_solvent", "--zero_mask",
                        "--norm", "--scale", "--j", args.threads, "--pool", 30, "--pad", 2,
                        "--dont_combine_weights_via_disc", "--firstiter_cc"],
                       log_path=args.workdir / "relion.log", env=env, cwd=data)
    print_note("relion command: " + " ".join(str(c) for c in relion.command))
    if relion.returncode != 0:
        print_note(f"relion_refine failed:\n{relion.tail()}")
        return 1
    score, sizes = ari(rel_dir / "run_it025_data.star", truth)
    print_figure("relion wall time", relion.wall_s, "s", fmt=".0f")
    print_figure("relion adjusted Rand index", score, fmt=".3f")
    print_note(f"relion class sizes {sizes}")
    print_figure("wall time ratio relion/cryoscape", relion.wall_s / ours.wall_s)
    import os

    print_note("load average at end (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
