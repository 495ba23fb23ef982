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
It also times the E-step kernel and prints the cost of one EM iteration of the default schedule's first
stage over 100 micrographs of 1024^2 at D=64, computed from the measured throughput.

    /work/main/.venv/bin/python bench/micrographs.py [--quick] [--snrs 1 0.1 0.03 0.01]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return platform.processor() or "unknown"


def cli(*args: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    t = time.perf_counter()
    subprocess.run([PY, "-m", "cryoscape.cli.main", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def read_log(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")]


def make_data(work: Path, args) -> tuple[Path, Path]:
    import numpy as np
    import torch

    from cryoscape.fourier.filters import lowpass_filter
    from cryoscape.io.mrc import write_mrc
    from cryoscape.simulate.ensembles import _render_hinge
    from cryoscape.simulate.molecule import default_pixel_size_angstrom

    pixel = default_pixel_size_angstrom(args.box)
    init = lowpass_filter(torch.from_numpy(_render_hinge(40.0, args.box, pixel, 3 * pixel)), 40.0, pixel, ndim=3)
    write_mrc(work / "init.mrc", init.numpy().astype(np.float32), pixel_size_angstrom=pixel)
    return work / "init.mrc", pixel


def initial_auc(init: Path, work: Path, args) -> float:
    """FSC AUC of the initial map to the truth (the same truth at every SNR)."""
    import torch

    from cryoscape.io.mrc import read_mrc
    from cryoscape.reconstruct.micrograph_em import compare_to_reference

    truth = read_mrc(work / f"mics_snr{args.snrs[0]:g}" / "gt_volumes" / "vol_000.mrc")[0]
    return compare_to_reference(torch.from_numpy(read_mrc(init)[0]), torch.from_numpy(truth), 1.0)["fsc_auc"]


def kernel_throughput() -> float:
    """Measured seconds per (patch, rotation) pair of the E-step + M-step kernels at L = 16."""
    import torch

    from cryoscape.reconstruct.patch_em import backprojection_sums, patch_posteriors, template_terms

    torch.set_num_threads(2)
    L, K, n = 16, 576, 8
    t_ft, energy = template_terms(torch.randn(K, L, L))
    patches = torch.randn(n, L, L)
    patch_posteriors(patches, t_ft, energy, sigma2=1.0, rho0=0.5)
    start = time.perf_counter()
    for _ in range(3):
        res = patch_posteriors(patches, t_ft, energy, sigma2=1.0, rho0=0.5)
        backprojection_sums(patches, res.posterior, min_mass=0.0)
    return (time.perf_counter() - start) / (3 * n * K)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/cryoscape-bench-micrographs")
    parser.add_argument("--snrs", type=float, nargs="+", default=[1.0, 0.1, 0.03, 0.01])
    parser.add_argument("--box", type=int, default=32)
    parser.add_argument("--n-micrographs", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--per-micrograph", type=int, default=28)
    parser.add_argument("--schedule", nargs="+", default=["16:0:4:0.5"])
    parser.add_argument("--pick-iterations", type=int, default=3)
    parser.add_argument("--tag", default="run")
    parser.add_argument("--quick", action="store_true", help="2 SNRs, 2 micrographs, 2 iterations")
    args = parser.parse_args()
    if args.quick:
        args.snrs, args.n_micrographs, args.schedule, args.pick_iterations = [1.0, 0.03], 2, ["16:0:2:0.5"], 1
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    init, pixel = make_data(work, args)
    lines = [f"# cpu: {cpu_name()}; 2 threads; box {args.box} ({pixel} A/pixel), {args.n_micrographs} micrographs of "
             f"{args.size}^2 with {args.per_micrograph} separated particles; initial map: hinge 40 deg low-passed "
             f"to 40 A (truth: hinge 0 deg); EM schedule {' '.join(args.schedule)}; pick: "
             f"{args.pick_iterations} rounds, {args.per_micrograph} picks per micrograph"]
    print(lines[0], flush=True)
    curves = {}
    for snr in args.snrs:
        mics = work / f"mics_snr{snr:g}"
        if not (mics / "micrographs.star").is_file():
            cli("simulate", "micrographs", "-o", str(mics), "--n-micrographs", str(args.n_micrographs),
                "--micrograph-size", str(args.size), "-D", str(args.box), "--particles-per-micrograph",
                str(args.per_micrograph), "--hinge-angle-deg", "0", "--snr", f"{snr:g}", "--seed", "1")
        truth = mics / "gt_volumes" / "vol_000.mrc"
        common = [str(mics / "micrographs.star"), "--initial-map", str(init), "--box-size", str(args.box),
                  "--reference", str(truth), "--no-progress"]
        em_dir, pick_dir = work / f"em_snr{snr:g}", work / f"pick_snr{snr:g}"
        cli("micrograph-em", *common, "-o", str(em_dir), "--schedule", *args.schedule)
        cli("micrograph-em", *common, "-o", str(pick_dir), "--baseline", "pick", "--iterations",
            str(args.pick_iterations), "--picks-per-micrograph", str(args.per_micrograph))
        em, pick = read_log(em_dir / "iterations.tsv"), read_log(pick_dir / "iterations.tsv")
        curves[snr] = (em, pick)
        for name, log in (("micrograph-em", em), ("pick", pick)):
            last = log[-1]
            line = (f"snr {snr:g} {name}: FSC AUC {last['fsc_auc']:.3f}, FSC=0.5 at {last['fsc_0.5_angstrom']:.1f} A "
                    f"after {len(log)} iterations, {last['wall_s']:.0f} s")
            print(line, flush=True)
            lines.append(line)
    per_pair = kernel_throughput()
    pairs = 100 * (1024 // 64) ** 2 * 576  # default first stage at D=64: L=16, 576 rotations, all patches
    line = (f"E+M kernels at L=16: {per_pair * 1e6:.1f} us per (patch, rotation); one first-stage iteration over 100 "
            f"micrographs of 1024^2 at D=64 (25600 patches x 576 rotations): {pairs * per_pair / 60:.1f} min "
            f"(fraction 1), {0.25 * pairs * per_pair / 60:.1f} min (fraction 0.25)")
    print(line)
    lines.append(line)
    for snr, (em, pick) in curves.items():
        line = f"ratio FSC AUC micrograph-em / pick at snr {snr:g}: {em[-1]['fsc_auc'] / max(pick[-1]['fsc_auc'], 1e-9):.2f}"
        print(line)
        lines.append(line)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"micrographs_{args.tag}.txt").write_text("\n".join(lines) + "\n")
    plot(curves, ROOT / "docs" / "images" / "micrograph_fsc.png", lines[0], init_auc=initial_auc(init, work, args))
    return 0


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
