#!/usr/bin/env python
"""Benchmark: ``cryoscape backproject`` against cryoDRGN's ``cryodrgn backproject_voxel`` and
RELION's ``relion_reconstruct`` (a second peer when RELION is installed: scripts/testdeps/relion.sh).

What it compares
----------------
Both tools reconstruct a voxel map (plus half-maps and their FSC) from the same simulated
particle stack, poses and CTF (``particles.mrcs`` + ``poses.pkl`` + ``ctf.pkl`` written by
``cryoscape simulate``, homogeneous, SNR 0.1), on this machine, in the same run, with the same
thread settings (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``, torch's default intra-op
pool, GPU hidden).  Each tool runs as a child process; wall time covers the whole command
(start-up, reading, backprojection, half-maps, FSC, writing), peak RSS is the child's
``ru_maxrss``.  Ours runs twice: with its defaults (oversampling 1, no gridding correction, soft
sphere mask, constant regulariser) and in its exact mode (``--oversampling 2 --gridding-correction``).
Our simulated stacks have the contrast of extracted particles (white), so both tools run with
their default contrast inversion.

Quality is the FSC of each map to the ground-truth volume: resolution at FSC = 0.5 and the area
under the curve (mean ``|FSC|`` over shells 1..D/2), unmasked and inside a soft mask made from the
ground truth.  The masked figure compares the density itself; the unmasked one also counts the
noise left in the solvent (cryoDRGN and our default both skip the gridding correction, so the map
fades towards the box edge, which acts as a soft mask on that noise; see bench/README.md).

Convention cross-check (full run, or ``--conventions``): cryoDRGN reading our ``poses.pkl`` /
``ctf.pkl`` must give a good map (rotation, translation sign/units, CTF layout agree), controls
with the translation negated and the rotation transposed must fail, and cryoDRGN's own STAR
parsers (``parse_pose_star``, ``parse_ctf_star``) run on our ``particles.star`` must reproduce our
pickles.

Memory check (full run): ours on the D=128 stack with a small batch, images loaded into memory
(the default for small stacks) and read lazily (forced), peak RSS against the stack size on disk.

Usage::

    /work/main/.venv/bin/python bench/backproject.py            # ~10 min on 2 busy cores
    /work/main/.venv/bin/python bench/backproject.py --quick    # D=64, 1000 images, ~2 min

The speed ratio lines (cryoscape images/s over cryoDRGN images/s) are printed last.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import sys
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    best_of,
    compare_to_reference,
    cryoscape_command,
    ensure_cryodrgn,
    print_figure,
    print_note,
    read_map,
    run_timed,
    simulate_dataset,
    soft_mask_from_reference,
    thread_env,
    tool_version,
)

# Forces ParticleImages to read lazily (the CLI loads stacks under 2 GiB into memory).
LAZY_WRAPPER = (
    "import sys, cryoscape.data.images as m\n"
    "init = m.ParticleImages.__init__\n"
    "def lazy_init(self, *a, **k):\n"
    "    k['in_memory'] = False\n"
    "    init(self, *a, **k)\n"
    "m.ParticleImages.__init__ = lazy_init\n"
    "from cryoscape.cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench"),
                   help="datasets and outputs (datasets are reused when parameters match)")
    p.add_argument("--cryodrgn", default=None,
                   help="cryodrgn executable or its venv (default /tmp/cryodrgn-venv, created if missing)")
    p.add_argument("--quick", action="store_true",
                   help="D=64 and 1000 images only, no memory check or convention check (~2 min)")
    p.add_argument("--n-images-64", type=int, default=5000, help="images at D=64 [5000]")
    p.add_argument("--n-images", "--n-images-128", dest="n_images_128", type=int, default=2000,
                   help="images at D=128 [2000]")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads for every tool [2]")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per command, interleaved; the fastest is kept [1] (3 for steadier ratios)")
    p.add_argument("--conventions", action=argparse.BooleanOptionalAction, default=None,
                   help="run the convention cross-check (default: on, off with --quick)")
    p.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=None,
                   help="run the lazy-reader memory check (default: on, off with --quick)")
    p.add_argument("--memory-batch-size", type=int, default=64,
                   help="batch size of the memory check [64]")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- runs
RELION = "relion_reconstruct"


def cryodrgn_backproject(exe: Path, data: Path, out: Path, *, poses: Path | None = None,
                         ctf: Path | None = None, extra: list[str] = ()) -> list[str]:
    """The cryoDRGN command used throughout (its defaults, contrast inversion included)."""
    return [str(exe), "backproject_voxel", str(data / "particles.mrcs"),
            "--poses", str(poses or data / "poses.pkl"), "--ctf", str(ctf or data / "ctf.pkl"),
            "-o", str(out), *extra]


def backproject_arguments(data: Path, out: Path, extra: list[str] = ()) -> list[str]:
    """Arguments of ``cryoscape`` for our run on the same inputs as cryoDRGN's."""
    return ["backproject", str(data / "particles.mrcs"),
            "--poses", str(data / "poses.pkl"), "--ctf", str(data / "ctf.pkl"),
            "-o", str(out), "--no-progress", *extra]


EXACT = "cryoscape --oversampling 2 --gridding-correction"


def cryoscape_backproject(data: Path, out: Path, extra: list[str] = ()) -> list[str]:
    return [*cryoscape_command(), *backproject_arguments(data, out, extra)]


def timed_rounds(commands: dict, logs: dict, outdirs: dict, env, repeats: int) -> dict:
    """Run every command ``repeats`` times, interleaved (the order rotates each round), each into
    a fresh output folder; keep each command's fastest run (the least disturbed by other load)."""
    names = list(commands)
    runs = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            shutil.rmtree(outdirs[name], ignore_errors=True)
            runs[name].append(run_timed(commands[name], log_path=logs[name], env=env))
    return {name: best_of(runs[name]) for name in names}


def in_tool_seconds(log: Path, tool: str) -> float | None:
    """The tool's own account of its time, from its log (None if absent).

    cryoDRGN: its "Backprojected N images in Xs" (from the start of its main, so it includes
    reading the stack, but not the half-maps' solve and FSC).  Ours: from the last
    "backprojecting" line of run.log to the "summary" line after it (reading excluded, solve
    and FSC included).
    """
    text = log.read_text(errors="replace") if log.exists() else ""
    if tool == "cryodrgn":
        m = re.findall(r"Backprojected [\d,]+ images in ([\d.]+)s", text)
        return float(m[-1]) if m else None
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) INFO .*?(backprojecting|summary)",
                        text, flags=re.M)
    starts = [i for i, (_, kind) in enumerate(stamps) if kind == "backprojecting"]
    if not starts or starts[-1] + 1 >= len(stamps):
        return None
    t0, t1 = (datetime.strptime(stamps[i][0], "%Y-%m-%d %H:%M:%S,%f") for i in (starts[-1], starts[-1] + 1))
    return (t1 - t0).total_seconds()


def report_quality(label: str, volume, gt, mask, pixel):
    un = compare_to_reference(volume, gt, pixel_size_angstrom=pixel)
    ma = compare_to_reference(volume, gt, pixel_size_angstrom=pixel, mask=mask)
    print_figure(f"{label} FSC0.5 to ground truth",
                 f"{un['res_0_5_cycles_per_pixel']:.3f} cycles/pixel ({un['res_0_5_angstrom']:.2f} A)")
    print_figure(f"{label} FSC AUC to ground truth", un["auc"], fmt=".3f")
    print_figure(f"{label} masked FSC0.5 to ground truth",
                 f"{ma['res_0_5_cycles_per_pixel']:.3f} cycles/pixel ({ma['res_0_5_angstrom']:.2f} A)")
    print_figure(f"{label} masked FSC AUC to ground truth", ma["auc"], fmt=".3f")
    print_figure(f"{label} real-space correlation to ground truth", un["correlation"], fmt=".3f")
    return un, ma


def benchmark_box(args, env, exe: Path, box: int, n_images: int) -> dict:
    """Simulate (or reuse) one dataset, run both tools, print their figures."""
    data, sim = simulate_dataset(args.workdir / f"white_D{box}_n{n_images}", box_size=box,
                                 n_images=n_images, snr=args.snr, env=env)
    print_note(f"D={box}: {n_images} images, SNR {args.snr}, data {data}"
               + ("" if sim is None else f" (simulated in {sim.wall_s:.0f} s)"))
    runs_dir = args.workdir / "runs" / f"D{box}_n{n_images}"
    configs = {
        "cryodrgn": cryodrgn_backproject(exe, data, runs_dir / "cryodrgn"),
        "cryoscape": cryoscape_backproject(data, runs_dir / "cryoscape"),
        EXACT: cryoscape_backproject(
            data, runs_dir / "cryoscape_exact", ["--oversampling", "2", "--gridding-correction"]),
    }
    maps = {"cryodrgn": runs_dir / "cryodrgn" / "backproject.mrc",
            "cryoscape": runs_dir / "cryoscape" / "map.mrc",
            EXACT: runs_dir / "cryoscape_exact" / "map.mrc"}
    if shutil.which("relion_reconstruct"):
        # RELION resolves image names from its working directory: give it absolute ones
        absolute = runs_dir / "relion_input.star"
        run_timed([*cryoscape_command(), "import", data / "particles.star", "--out-star", absolute,
                   "--absolute-paths"], log_path=runs_dir / "relion_import.log", env=env)
        out = runs_dir / "relion" / "map.mrc"
        configs[RELION] = ["sh", "-c", f"mkdir -p '{out.parent}' && exec relion_reconstruct --i '{absolute}' "
                                        f"--o '{out}' --ctf"]
        maps[RELION] = out
        print_note(f"RELION command: relion_reconstruct --i {absolute} --o {out} --ctf")
    print_note(f"cryoDRGN command: {' '.join(configs['cryodrgn'])}")
    print_note(f"cryoscape command: {' '.join(configs['cryoscape'])}")
    logs = {name: runs_dir / f"{name.replace(' ', '_').replace('--', '')}.log" for name in configs}
    runs = timed_rounds(configs, logs, {n: m.parent for n, m in maps.items()}, env, args.repeats)

    gt, pixel = read_map(data / "gt_volumes" / "vol_000.mrc")
    mask = soft_mask_from_reference(gt)
    result = {"runs": runs}
    for name, run in runs.items():
        label = f"{name} D={box}"
        print_figure(f"{label} images/s", n_images / run.wall_s, fmt=".1f")
        print_figure(f"{label} wall time", run.wall_s, "s", fmt=".1f")
        own = (in_tool_seconds(run.log_path, "cryodrgn") if name == "cryodrgn"
               else in_tool_seconds(maps[name].parent / "run.log", "cryoscape"))
        if own is not None:
            print_figure(f"{label} in-tool time (see README)", own, "s", fmt=".1f")
        print_figure(f"{label} peak RSS", run.peak_rss_mb, "MB", fmt=".0f")
        volume, _ = read_map(maps[name])
        result[name] = report_quality(label, volume, gt, mask, pixel)
        if name == EXACT:
            # cryoDRGN's tent kernel on a D-grid without gridding correction leaves its map
            # multiplied by about sinc^2(x/D) per axis; the same window on ours, for comparison
            windowed = compare_to_reference(volume * apodisation_window(box), gt,
                                            pixel_size_angstrom=pixel)
            print_figure(f"{label} FSC0.5 / AUC to ground truth with cryoDRGN-like apodisation",
                         f"{windowed['res_0_5_cycles_per_pixel']:.3f} / {windowed['auc']:.3f}")
    return result


def apodisation_window(box: int) -> np.ndarray:
    """``sinc^2(x / D)`` along each axis: the real-space image of a one-voxel tent on a D-grid."""
    a = np.sinc((np.arange(box) - box // 2) / box) ** 2
    return a[:, None, None] * a[None, :, None] * a[None, None, :]


# --------------------------------------------------------------------------- conventions
def check_conventions(args, env, exe: Path) -> None:
    """cryoDRGN on our pickles (plus failing controls) and cryoDRGN's STAR parsers on our STAR."""
    data, _ = simulate_dataset(args.workdir / "white_shifted_D64_n1000", box_size=64, n_images=1000,
                               snr=args.snr, shift_max_pixel=4.0, env=env)
    out = args.workdir / "runs" / "conventions"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print_note(f"convention check on {data} (D=64, 1000 images, shifts uniform in [-4, 4] px)")
    gt, pixel = read_map(data / "gt_volumes" / "vol_000.mrc")
    mask = soft_mask_from_reference(gt)
    rot, trans = pickle.load(open(data / "poses.pkl", "rb"))
    ctf = np.asarray(pickle.load(open(data / "ctf.pkl", "rb")))

    # controls: negated translation, transposed rotation
    pickle.dump((rot, -trans), open(out / "poses_negated_trans.pkl", "wb"))
    pickle.dump((np.swapaxes(rot, -1, -2), trans), open(out / "poses_transposed_rot.pkl", "wb"))

    # cryoDRGN's own STAR parsers on our STAR (with and without --ps 0: a STAR without
    # rlnPhaseShift would make parse_ctf_star write NaN; ours writes the column)
    star = data / "particles.star"
    run_timed([exe, "parse_pose_star", star, "-o", out / "poses_from_star.pkl"],
              log_path=out / "parse_pose_star.log", env=env)
    run_timed([exe, "parse_ctf_star", star, "-o", out / "ctf_from_star_nops.pkl"],
              log_path=out / "parse_ctf_star_nops.log", env=env)
    run_timed([exe, "parse_ctf_star", star, "-o", out / "ctf_from_star.pkl", "--ps", "0"],
              log_path=out / "parse_ctf_star.log", env=env)
    rot2, trans2 = pickle.load(open(out / "poses_from_star.pkl", "rb"))
    ctf2 = np.asarray(pickle.load(open(out / "ctf_from_star.pkl", "rb")))
    ctf2_nops = np.asarray(pickle.load(open(out / "ctf_from_star_nops.pkl", "rb")))
    print_figure("STAR->cryoDRGN rotation max |difference| vs our poses.pkl",
                 float(np.abs(rot2 - rot).max()), fmt=".2e")
    print_figure("STAR->cryoDRGN translation max |difference| vs our poses.pkl",
                 float(np.abs(trans2 - trans).max() * 64), "pixel", fmt=".2e")
    print_figure("STAR->cryoDRGN CTF max |difference| per column (D, Apix, dfU, dfV, ang, kV, Cs, w, ps)",
                 " ".join(f"{x:.2g}" for x in np.abs(ctf2 - ctf).max(axis=0)))
    print_figure("STAR->cryoDRGN CTF phase-shift column without --ps 0 has NaN",
                 str(bool(np.isnan(ctf2_nops[:, 8]).any())))

    cases = {
        "cryodrgn our pkl": dict(),
        "cryodrgn STAR-parsed pkl": dict(poses=out / "poses_from_star.pkl", ctf=out / "ctf_from_star.pkl"),
        "cryodrgn control trans negated": dict(poses=out / "poses_negated_trans.pkl"),
        "cryodrgn control rotation transposed": dict(poses=out / "poses_transposed_rot.pkl"),
    }
    print_note("cryoDRGN runs below use --no-half-maps (only the full map is scored)")
    for name, kw in cases.items():
        tag = name.replace(" ", "_")
        run_timed(cryodrgn_backproject(exe, data, out / tag, extra=["--no-half-maps"], **kw),
                  log_path=out / f"{tag}.log", env=env)
        volume, _ = read_map(out / tag / "backproject.mrc")
        m = compare_to_reference(volume, gt, pixel_size_angstrom=pixel, mask=mask)
        mirrored = compare_to_reference(volume, gt[::-1].copy(), pixel_size_angstrom=pixel, mask=mask)
        print_figure(f"convention {name}: masked FSC0.5 / AUC / correlation / AUC vs mirrored GT",
                     f"{m['res_0_5_cycles_per_pixel']:.3f} / {m['auc']:.3f} / "
                     f"{m['correlation']:+.3f} / {mirrored['auc']:.3f}")

    # contrast: both tools invert by default; told not to, the map must come out negative
    tag = "cryodrgn_uninvert"
    run_timed(cryodrgn_backproject(exe, data, out / tag, extra=["--no-half-maps", "--uninvert-data"]),
              log_path=out / f"{tag}.log", env=env)
    volume, _ = read_map(out / tag / "backproject.mrc")
    m = compare_to_reference(volume, gt, pixel_size_angstrom=pixel)
    print_figure("convention cryodrgn with --uninvert-data: real-space correlation to GT (expect -)",
                 m["correlation"], fmt="+.3f")

    # ours from the STAR file (shifts from rlnOriginX/YAngst), for reference
    run_timed([*cryoscape_command(), "backproject", star, "-o", out / "cryoscape_star", "--no-progress"],
              log_path=out / "cryoscape_star.log", env=env)
    volume, _ = read_map(out / "cryoscape_star" / "map.mrc")
    m = compare_to_reference(volume, gt, pixel_size_angstrom=pixel, mask=mask)
    print_figure("convention cryoscape from particles.star: masked FSC0.5 / AUC / correlation",
                 f"{m['res_0_5_cycles_per_pixel']:.3f} / {m['auc']:.3f} / {m['correlation']:+.3f}")


# --------------------------------------------------------------------------- memory
def check_memory(args, env, box: int, n_images: int) -> None:
    """Ours with a small batch: stack in memory (default below 2 GiB) vs read lazily (forced)."""
    data = args.workdir / f"white_D{box}_n{n_images}"
    stack_mb = (data / "particles.mrcs").stat().st_size / 1024**2
    out = args.workdir / "runs" / f"memory_D{box}"
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--batch-size", str(args.memory_batch_size)]
    grid_mb = 2 * box**3 * 3 * 4 / 1024**2
    print_note(f"memory check: ours on D={box}, {n_images} images, {' '.join(extra)}; "
               f"accumulator grids 2 x {box}^3 x 3 float32 = {grid_mb:.0f} MB; RSS = anon + file")
    print_figure(f"stack size on disk D={box}", stack_mb, "MB", fmt=".0f")
    runs = {
        "stack in memory (default)": run_timed(
            cryoscape_backproject(data, out / "auto", extra), log_path=out / "auto.log", env=env,
            poll_memory=True),
        "read lazily (forced)": run_timed(
            [sys.executable, "-c", LAZY_WRAPPER, *backproject_arguments(data, out / "lazy", extra)],
            log_path=out / "lazy.log", env=env, poll_memory=True),
    }
    for name, run in runs.items():
        label = f"cryoscape D={box} batch {args.memory_batch_size}, {name}"
        print_figure(f"{label}: peak RSS", run.peak_rss_mb, "MB", fmt=".0f")
        print_figure(f"{label}: peak anonymous RSS", run.peak_anon_mb, "MB", fmt=".0f")
        print_figure(f"{label}: peak file-backed RSS", run.peak_file_mb, "MB", fmt=".0f")
        print_figure(f"{label}: images/s", n_images / run.wall_s, fmt=".1f")
    saved = runs["stack in memory (default)"].peak_anon_mb - runs["read lazily (forced)"].peak_anon_mb
    print_figure(f"anonymous memory saved by lazy reading / stack size D={box}", saved / stack_mb)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.n_images_64 = 1000
    conventions = (not args.quick) if args.conventions is None else args.conventions
    memory = (not args.quick) if args.memory_check is None else args.memory_check
    env = thread_env(args.threads)
    exe = ensure_cryodrgn(args.cryodrgn)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print_note("cryoscape backproject vs cryodrgn backproject_voxel, same data, same machine, CPU only")
    print_note(f"cryoscape: {tool_version(cryoscape_command(), env)}; cryodrgn: {tool_version([exe], env)}")
    print_note(f"threads: OMP_NUM_THREADS=MKL_NUM_THREADS={args.threads} for both (torch default "
               f"intra-op pool); CUDA hidden; wall time of the whole command, best of {args.repeats}")

    boxes = [(64, args.n_images_64)] + ([] if args.quick else [(128, args.n_images_128)])
    print_note("load average at start (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
    results = {box: benchmark_box(args, env, exe, box, n) for box, n in boxes}
    if conventions:
        check_conventions(args, env, exe)
    if memory:
        check_memory(args, env, *boxes[-1])

    print_note("load average at end (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
    for box, res in results.items():
        drgn = res["runs"]["cryodrgn"].wall_s
        print_figure(f"speed ratio {EXACT}/cryodrgn at D={box}", drgn / res["runs"][EXACT].wall_s)
    for box, res in results.items():
        if RELION in res["runs"]:
            print_figure(f"speed ratio cryoscape/relion_reconstruct at D={box}",
                         res["runs"][RELION].wall_s / res["runs"]["cryoscape"].wall_s)
    for box, res in results.items():
        print_figure(f"speed ratio cryoscape/cryodrgn at D={box}",
                     res["runs"]["cryodrgn"].wall_s / res["runs"]["cryoscape"].wall_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
