#!/usr/bin/env python
"""Benchmark: homogeneous ab initio, ``cryoscape abinit`` against cryoDRGN's ``abinit_homo_old``
(cryoDRGN2, the thesis's hierarchical pose search) and ``abinit`` (cryoDRGN-AI, 4.x's default).

What it compares
----------------
All tools reconstruct the same simulated dataset without poses (``cryoscape simulate``: the
built-in molecule, homogeneous, D = 64, 10 000 images, SNR 0.1, defocus 1-2.5 um, shifts uniform in
+-``--shift-max`` pixels) on this machine's CPU, one after another, each under the same wall-clock
budget (``--max-minutes``; a tool still running then is stopped and judged on what it wrote), with
the same thread settings (``OMP_NUM_THREADS=MKL_NUM_THREADS=--threads``, ``OMP_WAIT_POLICY=PASSIVE``,
GPU hidden).  Every tool searches the same shift range and grid (``--t-extent``, 7 x 7 points),
frequency band 12 -> 32 Fourier pixels, 15-degree base grid, 256 x 3 networks, its own defaults
otherwise (cryoDRGN2: batch 16, lr 1e-4, Hartley decoder with Gaussian features, search every 5
epochs, 10 000 random-pose warm-up images; cryoDRGN-AI: its own schedule; ours: the schedule of
``OURS_DEFAULT`` below, with a 128 x 3 decoder).

Measured
--------
Every epoch's poses (ours ``poses.E.npz``, cryoDRGN ``pose.E.pkl``) are compared with the true
poses after the best global rotation and handedness (:mod:`cryoscape.analysis.pose_accuracy`):
median and mean squared Frobenius error (thesis Table 5.2), median angle, and median shift error
after removing a global map offset.  The time of an epoch is the modification time of its pose
file minus the tool's start (so start-up, data loading and warm-up count).  From these:

* time to reach each median-Frobenius target (``--targets``; 0.05 is about 9 degrees);
* final pose errors of each tool within the budget;
* FSC of the last map to the truth (map turned by the pose alignment's rotation and hand, then
  shifted to the best cross-correlation; sign checked), where it crosses 0.5.

The ratio printed last is ours / cryoDRGN2's time to the tightest target both reached; the goal
is at most 0.5 (the same or better accuracy in at most half the time).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    compare_to_reference,
    cryoscape_command,
    ensure_cryodrgn,
    print_figure,
    print_note,
    read_map,
    simulate_dataset,
    thread_env,
    tool_version,
)

OURS, OLD, AI = "cryoscape", "cryodrgn abinit_homo_old", "cryodrgn abinit"
# 8 epochs: searches at 0, 2, 4, 6, a model reset before epoch 3, one final fixed-pose epoch; a
# 128-wide decoder (an ab initio consensus needs less capacity than heterogeneity; cryoDRGN keeps
# its 256 x 3 default)
OURS_DEFAULT = ("-n 8 --search-every 2 --reset-epochs 3 --final-epochs 1 --pretrain 4000 --search-chunk 128 "
                "--dec-dim 128 --lr 1e-3")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench"),
                   help="data and runs (datasets are reused when their parameters match)")
    p.add_argument("--cryodrgn", default=None, help="cryodrgn executable or its venv [/tmp/cryodrgn-venv]")
    p.add_argument("--quick", action="store_true",
                   help="2000 images, 12 minutes per tool, abinit_homo_old only (~40 min in all)")
    p.add_argument("--n-images", type=int, default=10000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--shift-max", type=float, default=3.0, help="true shifts uniform in +-this (pixels) [3]")
    p.add_argument("--t-extent", type=float, default=6.0, help="searched shift range +- pixels, every tool [6]")
    p.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock budget per tool [60]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tools", nargs="+", default=[OURS, OLD, AI], choices=[OURS, OLD, AI],
                   metavar="TOOL", help=f"any of: '{OURS}' '{OLD}' '{AI}'")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05, 0.03],
                   help="median squared-Frobenius targets [0.5 0.2 0.1 0.05 0.03]")
    p.add_argument("--ours-args", default=None,
                   help=f"our schedule and network as one string [{OURS_DEFAULT}]")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- commands
def commands(args, exe: Path, data: Path, runs: Path) -> dict[str, tuple[list[str], Path]]:
    common_data = [str(data / "particles.mrcs"), "--ctf", str(data / "ctf.pkl")]
    t = ["--t-extent", f"{args.t_extent:g}", "--t-ngrid", "7"]
    ours_sched = (args.ours_args or OURS_DEFAULT).split()
    out = {
        OURS: [*cryoscape_command(), "abinit", *common_data, "-o", str(runs / "cryoscape"), *ours_sched, *t,
               "--k-min", "12", "--k-max", "32", "--base-grid", "15", "--no-progress"],
        OLD: [str(exe), "abinit_homo_old", *common_data, "-o", str(runs / "cryodrgn_old"), *t,
              "--l-start", "12", "--l-end", "32", "--base-healpy", "2", "--seed", "0"],
        AI: [str(exe), "abinit", *common_data, "-o", str(runs / "cryodrgn_ai"), "--zdim", "0", *t,
             "--l-start", "12", "--l-end", "32", "--base-healpy", "2", "--seed", "0", "--no-analysis",
             "--max-threads", str(args.threads)],
    }
    return {name: (cmd, Path(cmd[cmd.index("-o") + 1])) for name, cmd in out.items() if name in args.tools}


def run_with_budget(command: list[str], log_path: Path, env, budget_s: float) -> tuple[float, float, bool, int]:
    """Run ``command`` (own process group) until it ends or ``budget_s`` passes.

    Returns ``(start time, wall seconds, stopped by the budget, exit status)``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        start = time.time()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=budget_s)
            stopped = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
            stopped = True
    return start, time.time() - start, stopped, code


# --------------------------------------------------------------------------- poses
def pose_files(run_dir: Path, tool: str) -> list[tuple[int, Path]]:
    pattern = r"poses\.(\d+)\.npz" if tool == OURS else r"pose\.(\d+)\.pkl"
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := re.fullmatch(pattern, p.name))]
    return sorted(found)


def read_tool_poses(path: Path, tool: str, box: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotations and shifts in pixels.  cryoDRGN2 (``abinit_homo_old``) stores shifts as box
    fractions (poses.pkl convention); cryoDRGN-AI's ``abinit`` stores pixels."""
    if tool == OURS:
        with np.load(path) as npz:
            return npz["rotations"], npz["shifts_pixel"]
    with open(path, "rb") as f:
        obj = pickle.load(f)
    R = np.asarray(obj[0], dtype=np.float64)
    t = None if len(obj) < 2 or obj[1] is None else np.asarray(obj[1], dtype=np.float64)
    if t is not None and tool == OLD:
        t = t * box
    return R, t


def evaluate_epochs(run_dir: Path, tool: str, start: float, truth, box: int) -> list[dict]:
    from cryoscape.analysis.pose_accuracy import compare_poses

    rows = []
    for epoch, path in pose_files(run_dir, tool):
        try:
            R, t = read_tool_poses(path, tool, box)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError):
            continue  # a file cut short by the budget
        if len(R) != len(truth["rotations"]):
            continue
        acc = compare_poses(R, truth["rotations"], t, None if t is None else truth["shifts_pixel"],
                            fit_map_shift=True)
        rows.append({"epoch": epoch, "seconds": path.stat().st_mtime - start, "accuracy": acc,
                     **acc.summary()})
    return rows


# --------------------------------------------------------------------------- maps
def last_map(run_dir: Path, tool: str) -> tuple[int, Path] | None:
    found = [(int(m.group(1)), p) for p in run_dir.glob("reconstruct.*.mrc")
             if (m := re.fullmatch(r"reconstruct\.(\d+)\.mrc", p.name))]
    return max(found) if found else None


def map_quality(run_dir: Path, tool: str, row: dict, truth_map: np.ndarray, pixel: float) -> dict | None:
    found = last_map(run_dir, tool)
    if found is None:
        return None
    epoch, path = found
    volume, _ = read_map(path)
    acc = row["accuracy"]
    from cryoscape.analysis.pose_accuracy import map_in_reference_frame

    aligned = map_in_reference_frame(volume, acc.global_rotation, acc.handedness_flipped, truth_map)
    q = compare_to_reference(aligned, truth_map, pixel_size_angstrom=pixel)
    if q["correlation"] < 0:  # an inverted map
        q = compare_to_reference(-aligned, truth_map, pixel_size_angstrom=pixel)
        q["negated"] = True
    q["epoch"] = epoch
    return q


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.n_images = min(args.n_images, 2000)
        args.max_minutes = min(args.max_minutes, 12.0)
        if args.tools == [OURS, OLD, AI]:
            args.tools = [OURS, OLD]
        if args.ours_args is None:
            args.ours_args = "-n 10 --search-every 3 --final-epochs 1 --pretrain 2000 --search-chunk 500"
    env = thread_env(args.threads)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    exe = ensure_cryodrgn(args.cryodrgn)
    name = f"abinit_D{args.box}_n{args.n_images}_s{args.shift_max:g}"
    data, sim = simulate_dataset(args.workdir / name, box_size=args.box, n_images=args.n_images, snr=args.snr,
                                 shift_max_pixel=args.shift_max, env=env)
    truth = dict(np.load(data / "ground_truth.npz"))
    truth_map, pixel = read_map(data / "gt_volumes" / "vol_000.mrc")
    runs = args.workdir / "runs" / name
    print_note(f"homogeneous ab initio: {OURS} vs {OLD} (cryoDRGN2) and {AI} (cryoDRGN-AI), same data, same machine, "
               f"CPU only, one after another, {args.max_minutes:g} min budget each")
    print_note(f"versions: {tool_version(cryoscape_command())}; {tool_version([str(exe)])}")
    print_note(f"data: {args.n_images} images, D={args.box}, {pixel:.3f} A/pixel, SNR {args.snr:g}, shifts "
               f"+-{args.shift_max:g} px, {data}" + ("" if sim is None else f" (simulated in {sim.wall_s:.0f} s)"))
    print_note(f"threads: OMP_NUM_THREADS=MKL_NUM_THREADS={args.threads}, OMP_WAIT_POLICY=PASSIVE; CUDA hidden; "
               f"load average at start {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    results = {}
    for tool, (command, run_dir) in commands(args, exe, data, runs).items():
        print_note(f"{tool} command: {' '.join(command)}")
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        start, wall, stopped, code = run_with_budget(command, runs / f"{run_dir.name}.log", env, args.max_minutes * 60)
        rows = evaluate_epochs(run_dir, tool, start, truth, args.box)
        status = "stopped by the budget" if stopped else f"finished (exit {code})"
        print_note(f"{tool}: {status} after {wall / 60:.1f} min, {len(rows)} epochs with poses; "
                   f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        for r in rows:
            print_note(f"  {tool} epoch {r['epoch']} at {r['seconds']:.0f} s: median Frobenius "
                       f"{r['rotation_frobenius_median']:.4f}, mean {r['rotation_frobenius_mean']:.3f}, median angle "
                       f"{r['angle_deg_median']:.2f} deg, median shift error {r.get('translation_pixel_median', float('nan')):.2f} px")
        quality = map_quality(run_dir, tool, rows[-1], truth_map, pixel) if rows else None
        results[tool] = dict(rows=rows, wall=wall, stopped=stopped, quality=quality)

    # ---- figures
    for tool, r in results.items():
        rows = r["rows"]
        if not rows:
            print_figure(f"{tool} final median rotation error (squared Frobenius)", "no poses within the budget")
            continue
        last = rows[-1]
        print_figure(f"{tool} final median rotation error (squared Frobenius, epoch {last['epoch']})",
                     last["rotation_frobenius_median"], fmt=".4f")
        print_figure(f"{tool} final mean rotation error (squared Frobenius)", last["rotation_frobenius_mean"], fmt=".4f")
        print_figure(f"{tool} final median angle error", last["angle_deg_median"], "deg", fmt=".2f")
        if "translation_pixel_median" in last:
            print_figure(f"{tool} final median shift error (global map offset removed)",
                         last["translation_pixel_median"], "px", fmt=".2f")
        best = min(rows, key=lambda x: x["rotation_frobenius_median"])
        print_figure(f"{tool} best median rotation error (epoch {best['epoch']}, at {best['seconds']:.0f} s)",
                     best["rotation_frobenius_median"], fmt=".4f")
        q = r["quality"]
        if q is not None:
            print_figure(f"{tool} map FSC=0.5 to truth (epoch {q['epoch']} map, aligned{', negated' if q.get('negated') else ''})",
                         f"{q['res_0_5_angstrom']:.1f} A ({q['res_0_5_cycles_per_pixel']:.3f} cycles/pixel)")
        print_figure(f"{tool} wall time used", r["wall"] / 60, "min", fmt=".1f")
        for target in args.targets:
            hit = next((x for x in rows if x["rotation_frobenius_median"] <= target), None)
            print_figure(f"{tool} time to median rotation error <= {target:g}",
                         "not reached" if hit is None else f"{hit['seconds']:.0f} s (epoch {hit['epoch']})")

    def time_to(tool, target):
        rows = results.get(tool, {}).get("rows", [])
        hit = next((x for x in rows if x["rotation_frobenius_median"] <= target), None)
        return None if hit is None else hit["seconds"]

    final_ratio = None
    for peer in (AI, OLD):
        if peer not in results or OURS not in results:
            continue
        for target in args.targets:
            a, b = time_to(OURS, target), time_to(peer, target)
            if a is not None and b is not None:
                print_figure(f"time ratio {OURS}/{peer} to median rotation error <= {target:g}", a / b, fmt=".3f")
                if peer == OLD:
                    final_ratio = (target, a / b)
            elif a is not None:
                bound = a / (results[peer]["wall"])
                print_figure(f"time ratio {OURS}/{peer} to median rotation error <= {target:g}",
                             f"< {bound:.3f} ({peer} did not reach it in {results[peer]['wall'] / 60:.0f} min)")
                if peer == OLD and final_ratio is None:
                    final_ratio = (target, f"< {bound:.3f}")
    if final_ratio is not None:
        target, value = final_ratio
        text = value if isinstance(value, str) else f"{value:.3f}"
        print_figure(f"time ratio {OURS}/{OLD} to the tightest target both reached (median Frobenius <= {target:g}); "
                     "goal <= 0.5", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
