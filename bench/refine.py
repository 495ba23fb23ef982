#!/usr/bin/env python
"""Benchmark: ``cryoscape refine`` against RELION's 3D auto-refine (``relion_refine --auto_refine``).

What it compares
----------------
Both tools refine the same simulated homogeneous set (the built-in molecule at hinge 10 degrees,
D = 64, SNR 0.1, shifts up to 3 pixels; 5,000 images by default) from the same initial map (the
molecule at hinge 50 degrees, low-passed to 40 A by each tool: our ``--ini-high 40``, RELION's
``--ini_high 40``), on this machine in one run, with 2 threads each (RELION ``--j 2``,
OMP/MKL = 2 for ours).  Figures: wall time of the whole command, final gold-standard resolution
(each tool's own half-map FSC at 0.143), FSC AUC of the final map to the truth, median rotation
error (after the best global alignment) and median shift error against the simulated poses.
The ratio RELION wall time / ours is printed last.

Usage::

    /work/main/.venv/bin/python bench/refine.py               # 5,000 images (RELION takes a while)
    /work/main/.venv/bin/python bench/refine.py --n-images 1000
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    compare_to_reference,
    cryoscape_command,
    print_figure,
    print_note,
    read_map,
    run_timed,
    thread_env,
    tool_version,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench/refine"))
    p.add_argument("--n-images", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def simulate(workdir: Path, n: int, env) -> tuple[Path, Path]:
    """The data (hinge 10) and the initial map (hinge 50), reused when present."""
    data, init = workdir / f"data_n{n}", workdir / "init"
    for folder, hinge, count, seed, shift in ((data, 10, n, 1, 3), (init, 50, 2, 2, 0)):
        if not (folder / "particles.star").exists():
            run_timed([*cryoscape_command(), "simulate", "-o", folder, "-n", count, "-D", 64, "--snr", 0.1,
                       "--heterogeneity", "discrete", "--n-classes", 1, "--hinge-range-deg", hinge - 10, hinge + 10,
                       "--seed", seed, "--shift-max-pixel", shift], log_path=workdir / f"{folder.name}.log", env=env)
    return data, init / "gt_volumes" / "vol_000.mrc"


def pose_figures(label: str, star: Path, truth_star: Path, datadir: Path) -> None:
    from cryoscape.geometry.align import pose_errors
    from cryoscape.io.particles import load_particles

    ours = load_particles(star, datadir=datadir)
    truth = load_particles(truth_star)
    err = pose_errors(ours.rotations, truth.rotations, ours.shifts_pixel, truth.shifts_pixel, flip=False,
                      fit_map_shift=True)
    print_figure(f"{label} median rotation error", err["angle_deg_median"], "deg")
    print_figure(f"{label} median shift error (map shift removed)", err["translation_pixel_median"], "px")


def map_figures(label: str, volume_path: Path, truth: Path, resolution_angstrom: float) -> None:
    volume, pixel = read_map(volume_path)
    gt, _ = read_map(truth)
    cmp = compare_to_reference(volume, gt, pixel_size_angstrom=pixel)
    print_figure(f"{label} gold-standard resolution", resolution_angstrom, "A")
    print_figure(f"{label} FSC AUC to ground truth", cmp["auc"], fmt=".3f")


def relion_resolution(model_star: Path) -> float:
    from cryoscape.io.star import read_star_blocks

    general = read_star_blocks(model_star)["model_general"]
    return float(general["rlnCurrentResolution"].iloc[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    env = thread_env(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data, initial = simulate(args.workdir, args.n_images, env)
    truth = data / "gt_volumes" / "vol_000.mrc"
    print_note(f"{args.n_images} images, D=64, SNR 0.1; cryoscape {tool_version(cryoscape_command(), env)}")
    ours_dir = args.workdir / "cryoscape"
    shutil.rmtree(ours_dir, ignore_errors=True)
    ours = run_timed([*cryoscape_command(), "refine", data / "particles.star", "--initial-map", initial,
                      "-o", ours_dir, "--ini-high", 40], log_path=args.workdir / "cryoscape.log", env=env)
    print_figure("cryoscape wall time", ours.wall_s, "s", fmt=".0f")
    res = _resolution_from_fsc_txt(ours_dir / "fsc.txt")
    map_figures("cryoscape", ours_dir / "map.mrc", truth, res)
    pose_figures("cryoscape", ours_dir / "particles.star", data / "particles.star", data)
    if not shutil.which("relion_refine"):
        print_note("relion_refine not found (scripts/testdeps/relion.sh installs it): no RELION figures")
        return 0
    rel_dir = args.workdir / "relion"
    shutil.rmtree(rel_dir, ignore_errors=True)
    rel_dir.mkdir(parents=True)
    relion = run_timed(["relion_refine", "--i", "particles.star", "--o", rel_dir / "run", "--ref", initial,
                        "--ini_high", 40, "--auto_refine", "--split_random_halves", "--particle_diameter", 200,
                        "--ctf", "--flatten_solvent", "--zero_mask", "--oversampling", 1, "--healpix_order", 2,
                        "--auto_local_healpix_order", 4, "--offset_range", 5, "--offset_step", 2, "--sym", "C1",
                        "--low_resol_join_halves", 40, "--norm", "--scale", "--j", args.threads, "--pool", 30,
                        "--pad", 2, "--dont_combine_weights_via_disc", "--firstiter_cc"],
                       log_path=args.workdir / "relion.log", env=env, cwd=data)
    print_figure("relion wall time", relion.wall_s, "s", fmt=".0f")
    map_figures("relion", rel_dir / "run_class001.mrc", truth, relion_resolution(rel_dir / "run_model.star"))
    pose_figures("relion", rel_dir / "run_data.star", data / "particles.star", data)
    print_figure("wall time ratio relion/cryoscape", relion.wall_s / ours.wall_s)
    return 0


def _resolution_from_fsc_txt(path: Path) -> float:
    import numpy as np

    from cryoscape.fourier.fsc import resolution_at_threshold

    table = np.loadtxt(path)  # frequency (cycles/pixel), frequency (1/A), resolution (A), fsc
    f = resolution_at_threshold(table[:, 0], table[:, -1], 0.143)
    pixel = table[1, 0] / table[1, 1]
    return float(pixel / f) if f > 0 else float("inf")


if __name__ == "__main__":
    sys.exit(main())
