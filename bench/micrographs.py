"""Micrograph EM vs pick-then-reconstruct on the same micrographs and the same initial map.

For each SNR (per pixel of the particle boxes, simulate/micrographs.py) the same particles (positions,
rotations, CTF; one seed) are simulated with fresh noise; both methods start from the built-in molecule
at another hinge angle (40 degrees; truth 0), low-passed to 40 A, and run through the command line:

    cryoscape micrograph-em MICS/micrographs.star --initial-map INIT --box-size D --reference TRUTH \
        --schedule ...                          # the EM
    cryoscape micrograph-em ... --baseline pick --picks-per-micrograph N   # template matching + backprojection

Each run's iterations.tsv gives the FSC to the truth (0.5 crossing and AUC) per iteration and the wall
time; the script prints one line per (SNR, method) and the AUC ratio EM / pick last, writes
bench/results/micrographs_<tag>.txt (with the CPU's name) and docs/images/micrograph_fsc.png.

``--part timing`` instead simulates 100 micrographs of 1024^2 at D=64 and runs one iteration of each
stage of the default schedule and of a full-box stage (64:0:1:0.25) over all of them, end to end
through the command line (reading, Fourier-cropping and caching the micrographs, templates, E- and
M-steps, checkpoints), and writes bench/results/micrographs_<tag>_timing.txt.

    /work/main/.venv/bin/python bench/micrographs.py [--quick] [--snrs 1 0.1 0.03 0.01] [--part fsc|timing]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ("(micrograph-em defaults: --coarse-box auto, i.e. level-0 stages of box >= 32 first score every rotation "
            "at half the box, then 16 most probable + 48 sampled rotation pairs per patch at the full box)")
PY = str(ROOT / ".venv" / "bin" / "python")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_name  # noqa: E402


def cli(*args: str, fresh: bool = False) -> float:
    """Run one cryoscape command on 2 threads; its wall time in seconds (``fresh``: empty -o folder first)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    if fresh and "-o" in args:
        shutil.rmtree(args[args.index("-o") + 1], ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([PY, "-m", "cryoscape.cli.main", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def read_log(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")]


def make_data(work: Path, args, name: str = "init.mrc") -> tuple[Path, float]:
    import numpy as np
    import torch

    from cryoscape.fourier.filters import lowpass_filter
    from cryoscape.io.mrc import write_mrc
    from cryoscape.simulate.ensembles import _render_hinge
    from cryoscape.simulate.molecule import default_pixel_size_angstrom

    pixel = default_pixel_size_angstrom(args.box)
    init = lowpass_filter(torch.from_numpy(_render_hinge(40.0, args.box, pixel, 3 * pixel)), 40.0, pixel, ndim=3)
    write_mrc(work / name, init.numpy().astype(np.float32), pixel_size_angstrom=pixel)
    return work / name, pixel


def initial_fsc(init: Path, work: Path, args) -> dict:
    """FSC of the initial map to the truth (the same truth at every SNR): 0.5 crossing and AUC."""
    import torch

    from cryoscape.io.mrc import read_mrc
    from cryoscape.reconstruct.micrograph_em import compare_to_reference

    truth, pixel = read_mrc(work / f"mics_snr{args.snrs[0]:g}" / "gt_volumes" / "vol_000.mrc")
    return compare_to_reference(torch.from_numpy(read_mrc(init)[0]), torch.from_numpy(truth), float(pixel))


def iteration_timing(work: Path, args) -> list[str]:
    """One iteration of each stage of ``args.timing_schedule`` (by default the default schedule's and a
    full-box stage) over the first ``args.timing_micrographs`` of 100 (or more) micrographs of 1024^2 at
    D=64 (``args.em_options`` passed on, e.g. ``--coarse-box 16``)."""
    n, D = args.timing_micrographs, 64
    mics, out = work / f"timing_mics_{max(n, 100)}", work / f"timing_em_{n}"
    if not (mics / "micrographs.star").is_file():
        cli("simulate", "micrographs", "-o", str(mics), "--n-micrographs", str(max(n, 100)),
            "--micrograph-size", "1024", "-D", str(D), "--particles-per-micrograph", "30", "--hinge-angle-deg", "0",
            "--snr", "0.1", "--seed", "2")
    init, _ = make_data(work, SimpleNamespace(box=D), name="init64.mrc")
    schedule = args.timing_schedule
    wall = cli("micrograph-em", str(mics / "micrographs.star"), "--initial-map", str(init), "--box-size", str(D),
               "-o", str(out), "--schedule", *schedule, "--no-progress", "--first", str(n), *args.em_options.split(),
               fresh=True)
    log = read_log(out / "iterations.tsv")
    lines = [f"timing: {n} micrographs of 1024^2, D={D}, 30 particles each, SNR 0.1; one iteration per stage "
             f"({' '.join(schedule)}) {args.em_options or DEFAULTS}, 2 threads, float32, end to end through the command line"]
    previous = 0.0
    for row, stage in zip(log, schedule):
        lines.append(f"stage {stage} (box {row['box']:.0f}, {row['n_rotations']:.0f} rotations, "
                     f"{row['n_patches']:.0f} patches): {row['wall_s'] - previous:.1f} s for the iteration")
        previous = row["wall_s"]
    lines.append(f"command wall time (scale fit, caching, {len(schedule)} iterations, checkpoints): {wall:.1f} s")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("fsc", "timing"), default="fsc")
    parser.add_argument("--workdir", default="/tmp/cryoscape-bench-micrographs")
    parser.add_argument("--snrs", type=float, nargs="+", default=[1.0, 0.1, 0.03, 0.01])
    parser.add_argument("--box", type=int, default=32)
    parser.add_argument("--n-micrographs", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--per-micrograph", type=int, default=28)
    parser.add_argument("--schedule", nargs="+", default=["32:0:20:0.5"])
    parser.add_argument("--em-options", default="", help="more micrograph-em options for the EM")
    parser.add_argument("--pick-iterations", type=int, default=3)
    parser.add_argument("--timing-micrographs", type=int, default=100)
    parser.add_argument("--timing-schedule", nargs="+", help="stages timed by --part timing (one iteration each)",
                        default=["16:0:1:1", "32:0:1:0.5", "32:1:1:0.25", "64:0:1:0.25"])
    parser.add_argument("--tag", default="run")
    parser.add_argument("--resume", action="store_true", help="continue interrupted EM runs, keep finished pick runs")
    parser.add_argument("--quick", action="store_true", help="2 SNRs, 2 micrographs, 2 iterations")
    args = parser.parse_args()
    if args.quick:
        args.snrs, args.n_micrographs, args.schedule, args.pick_iterations = [1.0, 0.03], 2, ["16:0:2:0.5"], 1
        args.timing_micrographs = 4
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.part == "timing":
        lines = [f"# cpu: {machine_name()}", *iteration_timing(work, args)]
        name = f"micrographs_{args.tag}_timing.txt"
    else:
        lines = run_fsc(work, args)
        name = f"micrographs_{args.tag}.txt"
    print("\n".join(lines[-4:]))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / name).write_text("\n".join(lines) + "\n")
    return 0


def run_fsc(work: Path, args) -> list[str]:
    """EM and pick on the same micrographs at each SNR; the result lines (the plot is written too)."""
    init, pixel = make_data(work, args)
    for snr in args.snrs:
        mics = work / f"mics_snr{snr:g}"
        if not (mics / "micrographs.star").is_file():
            cli("simulate", "micrographs", "-o", str(mics), "--n-micrographs", str(args.n_micrographs),
                "--micrograph-size", str(args.size), "-D", str(args.box), "--particles-per-micrograph",
                str(args.per_micrograph), "--hinge-angle-deg", "0", "--snr", f"{snr:g}", "--seed", "1")
    start = initial_fsc(init, work, args)
    lines = [f"# cpu: {machine_name()}; 2 threads; box {args.box} ({pixel} A/pixel), {args.n_micrographs} micrographs of "
             f"{args.size}^2 with {args.per_micrograph} separated particles; initial map: hinge 40 deg low-passed "
             f"to 40 A (truth: hinge 0 deg; FSC=0.5 at {start['res_0.5_angstrom']:.1f} A, AUC {start['fsc_auc']:.3f}); "
             f"EM schedule {' '.join(args.schedule)} {args.em_options or DEFAULTS} (SO(3) grid turned each iteration unless "
             f"--grid fixed); pick: {args.pick_iterations} rounds, {args.per_micrograph} picks per micrograph "
             f"(fixed grid)"]
    print(lines[0], flush=True)
    curves = {}
    for snr in args.snrs:
        mics = work / f"mics_snr{snr:g}"
        truth = mics / "gt_volumes" / "vol_000.mrc"
        common = [str(mics / "micrographs.star"), "--initial-map", str(init), "--box-size", str(args.box),
                  "--reference", str(truth), "--no-progress"]
        em_dir, pick_dir = work / f"em_snr{snr:g}", work / f"pick_snr{snr:g}"
        resume = ["--resume"] if args.resume and (em_dir / "checkpoint.pt").is_file() else []
        cli("micrograph-em", *common, "-o", str(em_dir), "--schedule", *args.schedule, *args.em_options.split(),
            *resume, fresh=not resume)
        if not (args.resume and (pick_dir / "map.mrc").is_file()):
            cli("micrograph-em", *common, "-o", str(pick_dir), "--baseline", "pick", "--iterations",
                str(args.pick_iterations), "--picks-per-micrograph", str(args.per_micrograph), fresh=True)
        em, pick = read_log(em_dir / "iterations.tsv"), read_log(pick_dir / "iterations.tsv")
        curves[snr] = (em, pick)
        for name, log in (("micrograph-em", em), ("pick", pick)):
            last = log[-1]
            line = (f"snr {snr:g} {name}: FSC AUC {last['fsc_auc']:.3f}, FSC=0.5 at {last['fsc_0.5_angstrom']:.1f} A "
                    f"after {len(log)} iterations, {last['wall_s']:.0f} s; per iteration AUC "
                    + " ".join(f"{r['fsc_auc']:.3f}" for r in log))
            print(line, flush=True)
            lines.append(line)
    for snr, (em, pick) in curves.items():
        lines.append(f"ratio FSC AUC micrograph-em / pick at snr {snr:g}: "
                     f"{em[-1]['fsc_auc'] / max(pick[-1]['fsc_auc'], 1e-9):.2f}")
    plot(curves, ROOT / "docs" / "images" / "micrograph_fsc.png", lines[0], init_auc=start["fsc_auc"])
    return lines


def plot(curves: dict, path: Path, title: str, init_auc: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (snr, (em, pick)) in enumerate(curves.items()):
        c = colors[i % len(colors)]
        for log, style, name in ((em, "-o", "micrograph EM"), (pick, "--s", "pick + backproject")):
            axes[0].plot([r["iteration"] for r in log], [r["fsc_auc"] for r in log], style, color=c,
                         label=f"{name}, SNR {snr:g}")
            axes[1].plot([r["wall_s"] for r in log], [r["fsc_auc"] for r in log], style, color=c)
    if init_auc is not None:
        for ax in axes:
            ax.axhline(init_auc, color="grey", lw=1, ls=":", label="initial map" if ax is axes[0] else None)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("wall time (s, 2 shared cores)")
    for ax in axes:
        ax.set_ylabel("FSC AUC to the truth")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title[2:120], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
