#!/usr/bin/env python
"""Benchmark: ``cryoscape refine`` against RELION's 3D auto-refine (``relion_refine --auto_refine``).

What it compares
----------------
Both tools refine the same simulated homogeneous set (the built-in molecule at hinge 10 degrees,
D = 64, SNR 0.1, shifts up to 3 pixels; 5,000 images by default) from the same initial map (the
molecule at hinge 50 degrees, low-passed to 40 A by each tool: our ``--ini-high 40``, RELION's
``--ini_high 40``), on this machine in one run, with 2 threads each (OMP/MKL = 2 for ours;
RELION splits random halves only under MPI, so ``mpirun -n 3 relion_refine_mpi --j 1``: a leader
that hands out work and two followers of one thread).  Figures: wall time of the whole command, final gold-standard resolution
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
    relion_auto_refine_command,
    run_timed,
    thread_env,
    tool_version,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench/refine"))
    p.add_argument("--n-images", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--relion-timeout", type=int, metavar="SECONDS",
                   help="stop RELION after this long (no RELION figures then, and the note says so)")
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


def pose_figures(label: str, star: Path, truth_star: Path, datadir: Path) -> tuple:
    """Median rotation and shift errors; returns ``(rotations, shifts, true rotations, true shifts)``."""
    from cryoscape.geometry.align import pose_errors
    from cryoscape.io.particles import load_particles

    ours = load_particles(star, datadir=datadir)
    truth = load_particles(truth_star)
    err = pose_errors(ours.rotations, truth.rotations, ours.shifts_pixel, truth.shifts_pixel, flip=False,
                      fit_map_shift=True)
    print_figure(f"{label} median rotation error", err["angle_deg_median"], "deg")
    print_figure(f"{label} median shift error (map shift removed)", err["translation_pixel_median"], "px")
    return ours.rotations, ours.shifts_pixel, truth.rotations, truth.shifts_pixel


def superposed(volume, poses) -> "np.ndarray":
    """``volume`` brought into the truth's frame: ``V(G X + s)`` with ``G`` the global rotation
    that maps the refined poses onto the true ones and ``s`` the map's off-centre shift fitted from
    the shifts (cryoscape.geometry.align; a refinement is defined only up to both), trilinear."""
    import numpy as np
    import torch
    from scipy import ndimage

    from cryoscape.geometry.align import _fit_map_shift, align_rotation_sets

    R_pred, t_pred, R_true, t_true = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in poses)
    G, _, _ = align_rotation_sets(R_pred, R_true, flip=False)
    s = _fit_map_shift(R_true, t_pred - t_true).numpy()
    D = volume.shape[-1]
    x = np.stack(np.meshgrid(*[np.arange(D) - D // 2] * 3, indexing="ij")[::-1], 0).reshape(3, -1)  # (x, y, z)
    X = G.numpy() @ x + s[:, None]
    return ndimage.map_coordinates(volume, X[::-1] + D // 2, order=1).reshape(D, D, D).astype(volume.dtype)


def map_figures(label: str, volume_path: Path, truth: Path, resolution_angstrom: float, poses=None) -> None:
    volume, pixel = read_map(volume_path)
    gt, _ = read_map(truth)
    cmp = compare_to_reference(volume, gt, pixel_size_angstrom=pixel)
    print_figure(f"{label} gold-standard resolution", resolution_angstrom, "A")
    print_figure(f"{label} FSC AUC to ground truth (as written)", cmp["auc"], fmt=".3f")
    if poses is not None:
        cmp = compare_to_reference(superposed(volume, poses), gt, pixel_size_angstrom=pixel)
        print_figure(f"{label} FSC AUC to ground truth (superposed by the poses' global rotation and map shift)",
                     cmp["auc"], fmt=".3f")


def relion_resolution(model_star: Path) -> float:
    from cryoscape.io.star import read_star_blocks

    value = read_star_blocks(model_star)["model_general"]["rlnCurrentResolution"]
    return float(getattr(value, "iloc", [value])[0])  # a key-value block gives a scalar


def machine_notes(threads: int) -> None:
    """CPU model (lscpu), threads and the load average, as comment lines."""
    import os
    import subprocess

    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    print_note(f"CPU: {model}, {os.cpu_count()} cores; {threads} threads per tool (RELION --j, OMP/MKL for ours)")
    print_note("load average at start (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())


def main(argv=None) -> int:
    args = parse_args(argv)
    env = thread_env(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data, initial = simulate(args.workdir, args.n_images, env)
    truth = data / "gt_volumes" / "vol_000.mrc"
    machine_notes(args.threads)
    print_note(f"{args.n_images} images, D=64, SNR 0.1; cryoscape {tool_version(cryoscape_command(), env)}")
    ours_dir = args.workdir / "cryoscape"
    shutil.rmtree(ours_dir, ignore_errors=True)
    ours = run_timed([*cryoscape_command(), "refine", data / "particles.star", "--initial-map", initial,
                      "-o", ours_dir, "--ini-high", 40], log_path=args.workdir / "cryoscape.log", env=env)
    if ours.returncode != 0:
        print_note(f"cryoscape refine failed:\n{ours.tail()}")
        return 1
    print_figure("cryoscape wall time", ours.wall_s, "s", fmt=".0f")
    _print_iterations(ours_dir / "iterations.tsv")
    res = _resolution_from_fsc_txt(ours_dir / "fsc.txt")
    poses = pose_figures("cryoscape", ours_dir / "particles.star", data / "particles.star", data)
    map_figures("cryoscape", ours_dir / "map.mrc", truth, res, poses)
    if not (shutil.which("relion_refine_mpi") and shutil.which("mpirun")):
        print_note("relion_refine not found (scripts/testdeps/relion.sh installs it): no RELION figures")
        return 0
    rel_dir = args.workdir / "relion"
    shutil.rmtree(rel_dir, ignore_errors=True)
    rel_dir.mkdir(parents=True)
    limit = ["timeout", args.relion_timeout] if args.relion_timeout else []
    command = relion_auto_refine_command(args.threads, "particles.star", rel_dir / "run", initial,
                                         ini_high_angstrom=40, particle_diameter_angstrom=200, healpix_order=2,
                                         local_healpix_order=4, offset_range_pixel=5, offset_step_pixel=2,
                                         extra=["--firstiter_cc"])
    relion = run_timed([*limit, *command], log_path=args.workdir / "relion.log", env=env, cwd=data, check=False)
    print_note("relion command: " + " ".join(str(c) for c in relion.command))
    if relion.returncode == 124:
        print_note(f"relion_refine did not finish within {args.relion_timeout} s (stopped)")
        return relion_unfinished(rel_dir, truth, data)
    if relion.returncode != 0:
        print_note(f"relion_refine failed:\n{relion.tail()}")
        return 1
    print_figure("relion wall time", relion.wall_s, "s", fmt=".0f")
    poses = pose_figures("relion", rel_dir / "run_data.star", data / "particles.star", data)
    map_figures("relion", rel_dir / "run_class001.mrc", truth, relion_resolution(rel_dir / "run_model.star"), poses)
    print_figure("wall time ratio relion/cryoscape", relion.wall_s / ours.wall_s)
    import os

    print_note("load average at end (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
    return 0


def relion_unfinished(rel_dir: Path, truth: Path, data: Path) -> int:
    """Figures of the last iteration RELION completed (its half-maps averaged), labelled so."""
    import numpy as np

    from cryoscape.io.mrc import write_mrc

    done = sorted(rel_dir.glob("run_it[0-9][0-9][0-9]_data.star"))
    if not done:
        print_note("relion_refine completed no iteration: no RELION figures")
        return 1
    it = done[-1].name[len("run_it"):len("run_it") + 3]
    print_note(f"relion figures below are of its last completed iteration {int(it)} (unconverged)")
    halves = [read_map(rel_dir / f"run_it{it}_half{h}_class001.mrc") for h in (1, 2)]
    joined = rel_dir / f"run_it{it}_joined.mrc"
    write_mrc(joined, (0.5 * (halves[0][0] + halves[1][0])).astype(np.float32), pixel_size_angstrom=halves[0][1])
    resolution = relion_resolution(rel_dir / f"run_it{it}_half1_model.star")
    poses = pose_figures(f"relion iteration {int(it)}", done[-1], data / "particles.star", data)
    map_figures(f"relion iteration {int(it)}", joined, truth, resolution, poses)
    return 0


def _print_iterations(path: Path) -> None:
    """Our per-iteration log, as comment lines."""
    for line in path.read_text().splitlines():
        print_note("iterations.tsv: " + line.replace("\t", " "))


def _resolution_from_fsc_txt(path: Path) -> float:
    import numpy as np

    from cryoscape.fourier.fsc import resolution_at_threshold

    table = np.loadtxt(path)  # frequency (cycles/pixel), frequency (1/A), resolution (A), fsc
    f = resolution_at_threshold(table[:, 0], table[:, -1], 0.143)
    pixel = table[1, 0] / table[1, 1]
    return float(pixel / f) if f > 0 else float("inf")


if __name__ == "__main__":
    sys.exit(main())
