#!/usr/bin/env python
"""Benchmark: ``cryoscape analyze`` against cryoDRGN's ``cryodrgn analyze``, end to end on the CPU.

What it compares
----------------
Both tools analyse a run of their own, trained briefly (``--epochs``, default 2) on the same
simulated dataset (``cryoscape simulate --heterogeneity hinge --snr 0.1``, D = ``--box``, default
64, ``--n-images`` 2000) with the same architecture (zdim 8, encoder and decoder 256 x 3, batch
8): so both analyses see the same number of particles, latent dimension, box and network size.
Each analysis is asked for the same work, cryoDRGN's defaults: PCA, UMAP, k-means with
``--ksample 20`` maps at the on-data centres, ``--pc 2`` principal components with
``--n-per-pc 10`` maps each (40 maps of D^3), and the plots; cryoDRGN also writes its Jupyter
notebooks, ours its HTML report.  Commands, one after the other, never in parallel::

    cryodrgn analyze RUN E --ksample 20 --pc 2 --n-per-pc 10 -o OUT         (E: last epoch, 1-based)
    cryoscape analyze RUN --epoch E-1 --ksample 20 --pc 2 --n-per-pc 10 -o OUT --no-progress

Ours runs twice: with its defaults (maps in bfloat16 where the CPU has AVX512-BF16, which it
reports) and with ``--no-amp`` (float32 throughout, like cryoDRGN on a CPU), so the speed-up
that does not come from lower precision is visible on its own.

Figures: whole-command wall time of each (child process, ``os.wait4``), peak RSS, seconds per
map (ours: the "wrote N map(s) ... in X s" lines of analyze.log; cryoDRGN: its eval_vol
"Finished in" lines over the number of maps; both include writing the .mrc files), UMAP time
(cryoDRGN: from its log's timestamps, 1 s resolution; ours runs UMAP in a background process,
so its UMAP cost is what it waited for it), and the speed ratio cryoDRGN time / ours.

Large latent sets (``--large N``, default 500000; 0 to skip): ours only.  A run folder holding the
trained model's files (symbolic links) and ``z.E.npy`` replaced by N synthetic latents (a mixture
of 10 anisotropic Gaussians in 8-D, scaled like the trained latents) is analysed with the same
options, maps included.  cryoDRGN's analyze fits UMAP on all N particles, which takes of the order
of an hour at 500k on 2 cores, so it is left out unless ``--large-peer`` is given.

Threads: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads`` (2) and ``NUMBA_NUM_THREADS`` =
``--threads`` for both, ``OMP_WAIT_POLICY=PASSIVE``, GPUs hidden.  The load average at the start and
end is printed: on a shared machine single-run ratios vary by tens of per cent.

Usage::

    /work/main/.venv/bin/python bench/analyze.py [--workdir /tmp/cryoscape-bench] [--repeats 1]

Trained runs and the dataset are reused from ``--workdir`` when their parameters match.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import re
import resource
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    best_of,
    cryoscape_command,
    ensure_cryodrgn,
    print_figure,
    print_note,
    run_timed,
    simulate_dataset,
    thread_env,
    tool_version,
)

ARCH_OURS = ["--decoder", "neural_field", "--zdim", "8", "--enc-dim", "256", "--enc-layers", "3", "--dec-dim", "256",
             "--dec-layers", "3", "--encoder", "resmlp"]
ARCH_DRGN = ["--zdim", "8", "--enc-dim", "256", "--enc-layers", "3", "--dec-dim", "256", "--dec-layers", "3"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench"))
    p.add_argument("--cryodrgn", default=None, help="cryodrgn executable or its venv (default /tmp/cryodrgn-venv)")
    p.add_argument("--box", type=int, default=64, help="box size of the dataset [64]")
    p.add_argument("--n-images", type=int, default=2000, help="particles [2000]")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of both runs [2]")
    p.add_argument("--ksample", type=int, default=20)
    p.add_argument("--pc", type=int, default=2)
    p.add_argument("--n-per-pc", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=Path, default=None,
                   help="folder with trained cryodrgn/ and cryoscape/ runs of the same settings to reuse (e.g. "
                        "bench/train.py's WORKDIR/runs/train_D64_n2000_e2); default: train them here")
    p.add_argument("--repeats", type=int, default=1, help="runs of each analysis; the fastest counts [1]")
    p.add_argument("--large", type=int, default=500_000, help="synthetic latents for ours alone [500000; 0: skip]")
    p.add_argument("--large-peer", action="store_true", help="also run cryodrgn analyze on the large set (slow)")
    p.add_argument("--no-fp32", dest="fp32", action="store_false", help="skip ours with --no-amp")
    p.add_argument("--save", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for the results file analyze_DATE.txt [bench/results]")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- runs
def train_runs(args, env, exe: Path) -> tuple[Path, Path, Path]:
    """(dataset, cryoDRGN run, our run), trained once and reused while the parameters match."""
    data, _ = simulate_dataset(args.workdir / f"hinge_D{args.box}_n{args.n_images}", box_size=args.box,
                               n_images=args.n_images, snr=0.1, heterogeneity="hinge", env=env)
    if args.runs is not None:
        drgn, ours = args.runs / "cryodrgn", args.runs / "cryoscape"
        if not ((drgn / f"weights.{args.epochs}.pkl").exists() and (ours / f"z.{args.epochs - 1}.npy").exists()):
            raise SystemExit(f"{args.runs} lacks cryodrgn/weights.{args.epochs}.pkl or cryoscape/z.{args.epochs - 1}.npy")
        print_note(f"reusing the trained runs in {args.runs}")
        return data, drgn, ours
    root = args.workdir / "runs" / f"analyze_D{args.box}_n{args.n_images}_e{args.epochs}"
    stamp = root / "bench_params.json"
    params = dict(box=args.box, n_images=args.n_images, epochs=args.epochs, arch=ARCH_OURS)
    drgn, ours = root / "cryodrgn", root / "cryoscape"
    done = (drgn / f"weights.{args.epochs}.pkl").exists() and (ours / "checkpoint.pt").exists()
    if done and stamp.exists() and json.loads(stamp.read_text()) == params:
        print_note(f"reusing trained runs in {root}")
        return data, drgn, ours
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    print_note(f"training both tools for {args.epochs} epoch(s) on {data} (not timed)")
    run_timed([str(exe), "train_vae", str(data / "particles.mrcs"), "--poses", str(data / "poses.pkl"),
               "--ctf", str(data / "ctf.pkl"), "-o", str(drgn), *ARCH_DRGN, "-n", str(args.epochs), "-b", "8",
               "--seed", "0", "--no-analysis"], log_path=root / "cryodrgn_train.log", env=env)
    run_timed([*cryoscape_command(), "train", str(data / "particles.mrcs"), "--poses", str(data / "poses.pkl"),
               "--ctf", str(data / "ctf.pkl"), "-o", str(ours), *ARCH_OURS, "-n", str(args.epochs), "-b", "8",
               "--no-progress"], log_path=root / "cryoscape_train.log", env=env)
    stamp.write_text(json.dumps(params))
    return data, drgn, ours


def large_run(args, ours: Path, drgn: Path) -> tuple[Path, Path]:
    """Run folders (ours, cryoDRGN's) holding the trained models and ``args.large`` synthetic latents."""
    epoch = args.epochs - 1
    z = np.load(ours / f"z.{epoch}.npy")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, z.shape[1])) * z.std(0) * 1.5 + z.mean(0)
    widths = rng.uniform(0.2, 0.6, size=(10, z.shape[1])) * z.std(0)
    which = rng.integers(0, 10, args.large)
    big = (centres[which] + widths[which] * rng.normal(size=(args.large, z.shape[1]))).astype(np.float32)
    out = args.workdir / "runs" / f"analyze_large_{args.large}"
    if out.exists():
        shutil.rmtree(out)
    mine, theirs = out / "cryoscape", out / "cryodrgn"
    mine.mkdir(parents=True)
    theirs.mkdir(parents=True)
    for name in ("checkpoint.pt", f"weights.{epoch}.pt", "config.yaml"):
        if (ours / name).exists():
            (mine / name).symlink_to((ours / name).resolve())
    np.save(mine / f"z.{epoch}.npy", big)
    for p in drgn.iterdir():
        if p.name.endswith(".pkl") and p.name.startswith("z."):
            continue
        if p.is_file():
            (theirs / p.name).symlink_to(p.resolve())
    with open(theirs / f"z.{args.epochs}.pkl", "wb") as f:
        pickle.dump(big, f)
    return mine, theirs


def run_with_cpu(cmd, **kwargs):
    """:func:`common.run_timed` plus the CPU seconds (user + system) of the command and every process it
    started and waited for (e.g. our UMAP child): the change in ``RUSAGE_CHILDREN`` around it.  CPU time
    depends much less than wall time on what else runs on a shared machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = run_timed(cmd, **kwargs)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return res


# --------------------------------------------------------------------------- logs
def _stamp(line: str) -> dt.datetime | None:
    m = re.search(r"\((\d\d-\w{3}-\d{4} \d\d:\d\d:\d\d)\)", line)
    return dt.datetime.strptime(m.group(1), "%d-%b-%Y %H:%M:%S") if m else None


def drgn_breakdown(log: Path) -> dict:
    """Seconds spent generating maps (eval_vol "Finished in" lines), maps made, and UMAP time."""
    text = log.read_text(errors="replace")
    maps_s = sum(int(h) * 3600 + int(m) * 60 + float(s)
                 for h, m, s in re.findall(r"\(eval_vol\.py\).*?Finished in (\d+):(\d\d):(\d\d(?:\.\d+)?)", text))
    n_maps = sum(int(n) for n in re.findall(r"Generating (\d+) volumes", text))
    umap_s = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Running UMAP" in line:
            start = _stamp(line)
            for later in lines[i + 1 :]:
                end = _stamp(later)
                if end is not None:
                    umap_s = (end - start).total_seconds()
                    break
    return dict(maps_s=maps_s, n_maps=n_maps, umap_s=umap_s)


def ours_breakdown(outdir: Path) -> dict:
    text = (outdir / "analyze.log").read_text(errors="replace")
    hits = re.findall(r"wrote (\d+) map\(s\) .*? in ([\d.]+) s", text)
    stages = re.findall(r"analysis done in [\d.]+ s \((.*?)\)", text)
    parts = {}
    if stages:
        for item in stages[-1].split(", "):
            name, value, _ = item.split(" ")
            parts[name] = float(value)
    return dict(maps_s=sum(float(s) for _, s in hits), n_maps=sum(int(n) for n, _ in hits),
                umap_s=parts.get("umap"), stages=parts, bf16="bfloat16" in text)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    env = thread_env(args.threads)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["NUMBA_NUM_THREADS"] = str(args.threads)
    exe = ensure_cryodrgn(args.cryodrgn)
    args.workdir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    tee = _Tee(lines)
    sys.stdout = tee
    try:
        print_note("cryoscape analyze vs cryodrgn analyze, same machine, CPU only, one after another")
        print_note(f"cryoscape: {tool_version(cryoscape_command(), env)}; cryodrgn: {tool_version([exe], env)}")
        print_note(f"threads: OMP/MKL/NUMBA = {args.threads}, OMP_WAIT_POLICY=PASSIVE, CUDA hidden; "
                   f"work: --ksample {args.ksample} --pc {args.pc} --n-per-pc {args.n_per_pc}, UMAP on")
        print_note("load average at start (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
        data, drgn_run, ours_run = train_runs(args, env, exe)
        print_note(f"data: {args.n_images} images of D={args.box} (hinge, SNR 0.1) in {data}; runs: zdim 8, "
                   f"256x3 encoder and decoder, {args.epochs} epoch(s)")
        work = ["--ksample", str(args.ksample), "--pc", str(args.pc), "--n-per-pc", str(args.n_per_pc)]
        res_dir = args.workdir / "runs" / "analyze_out"
        results = {}
        configs = [("cryodrgn", None), ("cryoscape", []), *([("cryoscape --no-amp", ["--no-amp"])] if args.fp32 else [])]
        for r in range(args.repeats):
            for name, extra in configs:
                out = res_dir / f"{name.replace(' ', '_')}_{r}"
                if out.exists():
                    shutil.rmtree(out)
                if extra is None:
                    cmd = [str(exe), "analyze", str(drgn_run), str(args.epochs), *work, "-o", str(out)]
                else:
                    cmd = [*cryoscape_command(), "analyze", str(ours_run), "--epoch", str(args.epochs - 1), *work,
                           "-o", str(out), "--no-progress", *extra]
                if r == 0:
                    print_note(f"{name} command: {' '.join(cmd)}")
                res = run_with_cpu(cmd, log_path=res_dir / f"{name.replace(' ', '_')}_{r}.log", env=env)
                res.breakdown = (drgn_breakdown(res.log_path) if extra is None else ours_breakdown(out))
                results.setdefault(name, []).append(res)
        best = {name: best_of(runs) for name, runs in results.items()}
        for name, res in best.items():
            b = res.breakdown
            print_figure(f"{name} whole-command wall time", res.wall_s, "s")
            print_figure(f"{name} whole-command CPU time (user + system, all its processes)", res.cpu_s, "s")
            print_figure(f"{name} peak RSS", res.peak_rss_mb, "MB", fmt=".0f")
            if b["n_maps"]:
                print_figure(f"{name} seconds per map (D={args.box}, {b['n_maps']} maps)", b["maps_s"] / b["n_maps"],
                             "s", fmt=".3f")
            if b.get("umap_s") is not None:
                label = "UMAP (waited for, background process)" if name != "cryodrgn" else "UMAP"
                print_figure(f"{name} {label}", b["umap_s"], "s", fmt=".1f")
            if name != "cryodrgn":
                print_note(f"{name} stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in b["stages"].items())
                           + ("; maps in bfloat16" if b["bf16"] else "; maps in float32"))
        if args.large:
            mine, theirs = large_run(args, ours_run, drgn_run)
            out = res_dir / f"cryoscape_large_{args.large}"
            if out.exists():
                shutil.rmtree(out)
            cmd = [*cryoscape_command(), "analyze", str(mine), "--epoch", str(args.epochs - 1), *work, "-o", str(out),
                   "--no-progress"]
            print_note(f"large: {args.large} synthetic latents (10 Gaussians, 8-D); command: {' '.join(cmd)}")
            res = run_with_cpu(cmd, log_path=res_dir / f"cryoscape_large_{args.large}.log", env=env)
            b = ours_breakdown(out)
            print_figure(f"cryoscape {args.large} particles whole-command wall time", res.wall_s, "s")
            print_figure(f"cryoscape {args.large} particles CPU time", res.cpu_s, "s")
            print_figure(f"cryoscape {args.large} particles peak RSS", res.peak_rss_mb, "MB", fmt=".0f")
            print_note(f"cryoscape {args.large} particles stages: "
                       + ", ".join(f"{k} {v:.1f} s" for k, v in b["stages"].items()))
            if args.large_peer:
                out = res_dir / f"cryodrgn_large_{args.large}"
                if out.exists():
                    shutil.rmtree(out)
                cmd = [str(exe), "analyze", str(theirs), str(args.epochs), *work, "-o", str(out)]
                res_d = run_timed(cmd, log_path=res_dir / f"cryodrgn_large_{args.large}.log", env=env)
                print_figure(f"cryodrgn {args.large} particles whole-command wall time", res_d.wall_s, "s")
                print_figure(f"speed ratio cryodrgn/cryoscape at {args.large} particles", res_d.wall_s / res.wall_s,
                             fmt=".2f")
        print_note("load average at end (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
        d = best["cryodrgn"]
        if "cryoscape --no-amp" in best:
            print_figure("speed ratio (whole command) cryodrgn/cryoscape --no-amp", d.wall_s / best["cryoscape --no-amp"].wall_s)
            s = best["cryoscape --no-amp"].breakdown
            print_figure("speed ratio (seconds per map) cryodrgn/cryoscape --no-amp",
                         (d.breakdown["maps_s"] / d.breakdown["n_maps"]) / (s["maps_s"] / s["n_maps"]))
        o = best["cryoscape"].breakdown
        print_figure("CPU time ratio (whole command) cryodrgn/cryoscape", d.cpu_s / best["cryoscape"].cpu_s)
        print_figure("speed ratio (seconds per map) cryodrgn/cryoscape",
                     (d.breakdown["maps_s"] / d.breakdown["n_maps"]) / (o["maps_s"] / o["n_maps"]))
        print_figure("speed ratio (whole command) cryodrgn/cryoscape", d.wall_s / best["cryoscape"].wall_s)
    finally:
        sys.stdout = tee.stream
    args.save.mkdir(parents=True, exist_ok=True)
    path = args.save / f"analyze_{dt.date.today().isoformat()}.txt"
    path.write_text("\n".join(lines) + "\n")
    print(f"# saved {path}")
    return 0


class _Tee:
    """Print to the terminal and keep the lines for the results file."""

    def __init__(self, lines: list[str]):
        self.stream = sys.stdout
        self.lines = lines
        self.buffer = ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.lines.append(line)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


if __name__ == "__main__":
    sys.exit(main())
