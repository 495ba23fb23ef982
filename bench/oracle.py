#!/usr/bin/env python
"""Benchmark: the decoders against oracles that know the answer (issue 19), float32 by default.

For a simulated continuous dataset with known truth, after training, every method is scored on
``--fsc-images`` images evenly spaced over the images it saw (library: cryoscape.analysis.oracle):

* per-image FSC AUC of the map at the image's latent against the truth of its state (CryoBench);
* the same AUC inside a mask of the region where the truth maps vary (voxel-wise standard
  deviation of all truth maps, thresholded at 10 % of its maximum, dilated 2 voxels, 3-voxel
  raised-cosine edge: ``cryoscape.fourier.masks.variability_mask``);
* |Spearman rho| of the latents' PC1 with the true coordinate;
* training images/s (the sum of the per-epoch training times in each tool's log).

The methods: ``cryoscape train --decoder D`` for each of ``--decoders`` (zdim ``--zdim``, encoder
MLP 256 x 3, decoder 3 layers of each decoder's default width (the neural field's 128, the basis's
mixing MLP 256), each decoder's default batch and learning rate, ``--no-amp`` unless ``--amp``),
cryoDRGN 4.3.1 ``train_vae`` (encoder and decoder 256 x 3, batch 8, float32: its CPU default) and
two oracles from the same images with their true poses and CTF: (a) one consensus backprojection
of all images and (b) ``--bins`` backprojections of the images binned by their true coordinate
(equal-width bins), each Wiener-filtered with its half-map FSC.  An image is scored against the
consensus map, and against the map of its own bin.

Datasets (``--datasets``): ``hinge``, the built-in molecule's hinge (``cryoscape simulate
--heterogeneity hinge``, 40 states over 0-60 degrees), and ``1a8o``, a bond rotation of a real
protein (tests/data/1A8O.pdb, the CA-C bond of its middle residue turned 0-60 degrees over 20
states; ``cryoscape simulate --molecule 1A8O.pdb --bond-rotation-deg 0 60``, a 64 A box: 1 A pixels
at D = 64, atoms rendered at 3 pixels' resolution), both at ``-D`` and
``--snr`` with ``-n`` images.  A run may see only the first N images and fewer epochs
(``--images-for DECODER=N``, ``--epochs-for DECODER=E``, ``DECODER`` being a decoder name or
``cryodrgn``); its oracles are then rebuilt from the same first N images.  ``--reuse NAME`` scores
a run that an earlier invocation finished, or resumes an unfinished cryoDRGN run from its last
checkpoint (cryoDRGN's 8000 x 20 takes over an hour on 2 cores: run it once, then reuse it beside new
runs of ours).  ``--amp --emulate-bf16`` measures the accuracy of
mixed precision on a CPU without bfloat16 (bench/bf16_emulation.py; its times mean nothing).

Run under the shared lock (the issue's settings: -n 8000 --epochs 20; a run's time is printed)::

    flock /tmp/cryoscape-heavy.lock .venv/bin/python bench/oracle.py --datasets hinge \\
        --epochs-for neural_field=2 --images-for neural_field=2000 | tee bench/results/oracle_DATE.txt
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cryoscape_command,
    ensure_cryodrgn,
    machine_name,
    print_figure,
    print_note,
    run_timed,
    simulate_dataset,
    thread_env,
    tool_version,
)
from train import decode_maps, last_latents, training_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PDB = ROOT / "tests" / "data" / "1A8O.pdb"
DRGN = "cryodrgn"
ARCH = ["--enc-dim", "256", "--enc-layers", "3", "--dec-layers", "3"]
DRGN_ARCH = [*ARCH, "--dec-dim", "256"]  # ours: each decoder's default width (--train-opt NAME:--dec-dim=W)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench-oracle"))
    p.add_argument("--datasets", nargs="+", default=["hinge", "1a8o"], choices=["hinge", "1a8o"])
    p.add_argument("-n", "--n-images", type=int, default=8000)
    p.add_argument("-D", "--box-size", type=int, default=64)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=20, help="epochs of every run without --epochs-for [20]")
    p.add_argument("--zdim", type=int, default=8)
    p.add_argument("--decoders", nargs="*", default=["basis", "neural_field"],
                   help="decoders run at their defaults (none: only the --variant runs)")
    p.add_argument("--epochs-for", action="append", default=[], metavar="NAME=E",
                   help="epochs of one run (a decoder name or cryodrgn); repeatable")
    p.add_argument("--images-for", action="append", default=[], metavar="NAME=N",
                   help="train one run on the first N images only; repeatable")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=DECODER:KEY=VALUE[,KEY=VALUE]",
                   help="one more run of DECODER labelled LABEL with these --decoder-opt settings, e.g. "
                        "'nf_band07=neural_field:band_fraction=0.7'; repeatable")
    p.add_argument("--decoder-opt", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="an extra --decoder-opt KEY=VALUE for run NAME (a decoder or a variant label); repeatable")
    p.add_argument("--train-opt", action="append", default=[], metavar="NAME:OPTION",
                   help="an extra cryoscape train option for decoder NAME, e.g. 'basis:--lr=3e-3'; repeatable")
    p.add_argument("--cryodrgn", action=argparse.BooleanOptionalAction, default=True,
                   help="also train cryoDRGN 4.3.1 (give it few epochs with --epochs-for cryodrgn=E) [on]")
    p.add_argument("--cryodrgn-venv", default="/tmp/venv-cryodrgn")
    p.add_argument("--reuse", action="append", default=[], metavar="NAME",
                   help="score run NAME (a decoder, variant or cryodrgn) from its folder in --workdir when that "
                        "ends at the asked epoch, instead of training it again (an unfinished cryodrgn run "
                        "resumes from its last checkpoint); repeatable")
    p.add_argument("--amp", action="store_true", help="our runs in mixed precision (default: float32, --no-amp)")
    p.add_argument("--emulate-bf16", action="store_true",
                   help="with --amp on a CPU without bfloat16: our runs through bench/bf16_emulation.py, which "
                        "computes bfloat16 products in float32 and rounds them (their accuracy is bfloat16's, "
                        "their time is not)")
    p.add_argument("--bins", type=int, default=10, help="bins of the binned oracle [10]")
    p.add_argument("--fsc-images", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="every tool on the GPU (default: CPU, GPU hidden)")
    return p.parse_args(argv)


def per_run(entries: list[str], cast=int) -> dict[str, object]:
    """``["a=1", "b=2"]`` -> ``{"a": 1, "b": 2}``."""
    out = {}
    for entry in entries:
        key, _, value = entry.partition("=")
        out[key] = cast(value)
    return out


def simulate(name: str, args, env) -> Path:
    """The dataset ``name`` (reused when it exists with the same parameters)."""
    if name == "hinge":
        data, _ = simulate_dataset(args.workdir / f"hinge_D{args.box_size}_n{args.n_images}_snr{args.snr}",
                                   box_size=args.box_size, n_images=args.n_images, snr=args.snr,
                                   heterogeneity="hinge", env=env)
        return data
    data = args.workdir / f"1a8o_D{args.box_size}_n{args.n_images}_snr{args.snr}"
    if not (data / "gt_atomic.npz").exists():
        run_timed([*cryoscape_command(), "simulate", "--molecule", str(PDB), "--bond-rotation-deg", "0", "60",
                   "-n", str(args.n_images), "-D", str(args.box_size), "--pixel-size", f"{64.0 / args.box_size:g}",
                   "--snr", str(args.snr), "--seed", "0",
                   "-o", str(data)], log_path=args.workdir / f"{data.name}.simulate.log", env=env)
    return data


def run_specs(args) -> dict[str, tuple[str, list[str]]]:
    """``{label: (decoder or cryodrgn, decoder options)}`` of every training of a dataset."""
    runs = {d: (d, []) for d in args.decoders}
    for entry in args.variant:
        label, _, rest = entry.partition("=")
        decoder, _, options = rest.partition(":")
        runs[label] = (decoder, [kv for kv in options.split(",") if kv])
    if args.cryodrgn:
        runs[DRGN] = (DRGN, [])
    return runs


def train_command(name: str, data: Path, out: Path, args, epochs: int, n_images: int, exe: Path,
                  decoder: str | None = None, options: list[str] = ()) -> list[str]:
    """The training command of run ``name`` (a decoder, or cryodrgn) on the first ``n_images``;
    ``decoder`` and ``options`` (--decoder-opt KEY=VALUE) for a variant run."""
    common = ["--poses", str(data / "poses.pkl"), "--ctf", str(data / "ctf.pkl"), "--zdim", str(args.zdim),
              "-n", str(epochs)]
    if name == DRGN:
        ind = out.parent / f"first_{n_images}.pkl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(ind, "wb") as f:
            pickle.dump(np.arange(n_images), f)
        return [str(exe), "train_vae", str(data / "particles.mrcs"), *common, *DRGN_ARCH, "-o", str(out), "-b", "8",
                "--seed", "0", "--no-analysis", "--ind", str(ind)]
    extra = ["--amp"] if args.amp else ["--no-amp"]
    for kv in options:
        extra += ["--decoder-opt", kv]
    for entry in args.decoder_opt:
        target, _, kv = entry.partition(":")
        extra += ["--decoder-opt", kv] if target == name else []
    for entry in args.train_opt:
        target, _, option = entry.partition(":")
        extra += option.split("=", 1) if target == name else []
    cli = [sys.executable, str(Path(__file__).with_name("bf16_emulation.py"))] if args.emulate_bf16 \
        else cryoscape_command()
    return [*cli, "train", str(data / "particles.mrcs"), *common, *ARCH, "-o", str(out),
            "--decoder", decoder or name, "--encoder", "resmlp", "--first", str(n_images), "--no-progress", *extra]


def decoder_maps(run_dir: Path, z: np.ndarray) -> tuple[list[np.ndarray], float]:
    """Maps of our trained decoder at the latents ``z`` (in this process) and seconds per map."""
    import torch

    from cryoscape.train.volumes import load_trained_model

    decoder, _, _ = load_trained_model(run_dir)
    start = time.perf_counter()
    with torch.no_grad():
        maps = [decoder.eval_volume(torch.as_tensor(row, dtype=torch.float32)).float().numpy() for row in z]
    return maps, (time.perf_counter() - start) / max(1, len(z))


def finished(run_dir: Path, tool: str, epochs: int) -> bool:
    """Whether ``run_dir`` ends at epoch ``epochs``: its latents, and none of a later epoch (ours count
    from 0, cryoDRGN's from 1)."""
    def latents(epoch: int) -> Path:
        return run_dir / (f"z.{epoch}.pkl" if tool == DRGN else f"z.{epoch - 1}.npy")

    return latents(epochs).exists() and not latents(epochs + 1).exists()


def train_or_reuse(name: str, command: list[str], epochs: int, run_dir: Path, log: Path, tool: str, env,
                   reuse: bool) -> float:
    """Train run ``name`` afresh; with ``reuse``, take its finished folder as it is, or resume an
    unfinished cryoDRGN run from its last checkpoint (``--load latest``).  The whole command's seconds
    (nan unless trained afresh).  A resumed run's log holds the earlier log too, so that its training
    time counts every finished epoch."""
    if reuse and finished(run_dir, tool, epochs):
        print_note(f"{name}: scoring the finished run in {run_dir} (--reuse); its training time is read from {log}; "
                   f"the command above is today's, the run's own options are in {run_dir / 'config.yaml'}")
        return float("nan")
    if reuse and tool == DRGN and any(run_dir.glob("weights.*.pkl")):
        print_note(f"{name}: resuming the unfinished run in {run_dir} from its last checkpoint (--reuse)")
        earlier = log.read_bytes() if log.exists() else b""
        run_timed([*command, "--load", "latest"], log_path=log, env=env)
        log.write_bytes(earlier + log.read_bytes())
        return float("nan")
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_timed(command, log_path=log, env=env).wall_s


def score_run(name: str, command: list[str], epochs: int, run_dir: Path, ctx: dict, exe: Path, env,
              reuse: bool = False) -> dict:
    """Train run ``name`` (or, with ``reuse``, take or finish its earlier folder), decode its maps at
    the evaluated images' latents, and score them."""
    from cryoscape.analysis.oracle import score_maps

    log = run_dir.parent / f"{run_dir.name}.log"
    tool = DRGN if name == DRGN else "cryoscape"
    wall_s = train_or_reuse(name, command, epochs, run_dir, log, tool, env, reuse)
    seconds = training_seconds(run_dir, log, tool)
    epoch, z = last_latents(run_dir, tool)
    index = ctx["index"][len(z)]
    if name == DRGN:
        paths, decode_s = decode_maps(DRGN, exe, run_dir, epoch, z[index], run_dir.parent / f"{run_dir.name}_maps",
                                      box=ctx["box"], train_box=ctx["box"], env=env)
        from cryoscape.io.mrc import read_mrc

        maps, per_map_s = [read_mrc(p)[0] for p in paths], decode_s / len(paths)
    else:
        maps, per_map_s = decoder_maps(run_dir, z[index])
    scores = score_maps(maps, ctx["truth"].state_index[index], ctx["truth"], ctx["mask"], z=z)
    return dict(scores=scores, images=len(z), epochs=epochs, train_s=seconds,
                speed=len(z) * epochs / seconds if seconds else float("nan"),
                wall_s=wall_s, map_s=per_map_s)


def oracle_runs(data: Path, ctx: dict, n_images: int, n_bins: int) -> dict[str, dict]:
    """The consensus and binned oracles from the first ``n_images`` images, scored on their images."""
    from cryoscape.analysis.oracle import coordinate_bins, oracle_reconstructions, score_maps
    from cryoscape.io.particles import load_particles

    truth, index = ctx["truth"], ctx["index"][n_images]
    table = load_particles(data / "particles.mrcs", poses_path=data / "poses.pkl", ctf_path=data / "ctf.pkl")
    table = table.subset(np.arange(n_images))
    bins = coordinate_bins(truth.coordinate[:n_images], n_bins)
    start = time.perf_counter()
    consensus, per_bin = oracle_reconstructions(table, bins)
    seconds = time.perf_counter() - start
    states = truth.state_index[index]
    found = {"consensus": score_maps([consensus] * len(index), states, truth, ctx["mask"]),
             f"{n_bins}-bin oracle": score_maps([per_bin[b] for b in bins[index]], states, truth, ctx["mask"])}
    return {f"{k} ({n_images} images)": dict(scores=v, images=n_images, epochs=0, wall_s=seconds,
                                             speed=float("nan"), train_s=None, map_s=None)
            for k, v in found.items()}


def benchmark_dataset(name: str, args, env, exe: Path) -> dict[str, dict]:
    from cryoscape.analysis.evaluate import evenly_spaced_indices, load_ground_truth
    from cryoscape.analysis.oracle import truth_variability_mask

    data = simulate(name, args, env)
    truth = load_ground_truth(data)
    mask = truth_variability_mask(truth)
    epochs, images = per_run(args.epochs_for), per_run(args.images_for)
    runs = run_specs(args)
    sizes = sorted({min(images.get(r, args.n_images), args.n_images) for r in runs} or {args.n_images})
    ctx = dict(truth=truth, mask=mask, box=truth.box_size,
               index={n: evenly_spaced_indices(n, args.fsc_images) for n in sizes})
    print_note(f"{name}: {len(truth)} images, D={truth.box_size}, {truth.pixel_size_angstrom:.3f} A/pixel, "
               f"{truth.n_states} states, SNR {args.snr}; coordinate {truth.coordinate_name}; data {data}")
    print_note(f"{name}: variability mask {mask.sum():.0f} voxels (sum of the soft mask) of {truth.box_size ** 3}")
    results = {}
    for n in sizes:
        results.update(oracle_runs(data, ctx, n, args.bins))
    runs_dir = args.workdir / "runs" / name
    for run, (decoder, options) in runs.items():
        n, e = min(images.get(run, args.n_images), args.n_images), epochs.get(run, args.epochs)
        command = train_command(run, data, runs_dir / run, args, e, n, exe, decoder, options)
        print_note(f"{name} {run} command: {' '.join(command)}")
        results[run] = score_run(run, command, e, runs_dir / run, ctx, exe, env, reuse=run in args.reuse)
        report_line(name, run, results[run])
    for key, r in results.items():
        if r["epochs"] == 0:
            report_line(name, key, r)
    return results


def report_line(dataset: str, method: str, r: dict) -> None:
    s = r["scores"]
    label = f"{dataset} {method}"
    print_figure(f"{label} per-image FSC AUC (mean of {len(s.auc)})", float(np.mean(s.auc)), fmt=".3f")
    print_figure(f"{label} masked per-image FSC AUC (moving region)", float(np.mean(s.masked_auc)), fmt=".3f")
    if s.spearman is not None:
        print_figure(f"{label} |Spearman rho| latent PC1 vs truth", s.spearman, fmt=".3f")
    if s.negated:
        print_note(f"{label}: maps correlated negatively with the truth; their negatives were scored")
    if r["epochs"]:
        print_figure(f"{label} training images/s ({r['images']} images x {r['epochs']} epochs)", r["speed"],
                     fmt=".1f")
        print_figure(f"{label} training time (from its log) / whole command", f"{r['train_s']:.0f} / "
                     f"{r['wall_s']:.0f}", "s")
    else:
        print_figure(f"{label} reconstruction time (consensus and all bins)", r["wall_s"], "s", fmt=".0f")


def print_table(all_results: dict[str, dict[str, dict]]) -> None:
    print_note("dataset | method | images x epochs | AUC | masked AUC | |rho| | training img/s")
    for dataset, results in all_results.items():
        for method, r in results.items():
            s = r["scores"]
            rho = "-" if s.spearman is None else f"{s.spearman:.3f}"
            speed = "-" if not r["epochs"] else f"{r['speed']:.1f}"
            print_note(f"{dataset} | {method} | {r['images']} x {r['epochs']} | {np.mean(s.auc):.3f} | "
                       f"{np.mean(s.masked_auc):.3f} | {rho} | {speed}")


def print_ratios(all_results: dict[str, dict[str, dict]]) -> None:
    """Each decoder's training images/s and per-image AUC over cryoDRGN's (same data, this run)."""
    for dataset, results in all_results.items():
        if DRGN not in results:
            continue
        peer = results[DRGN]
        for method, r in results.items():
            if method == DRGN or not r["epochs"]:
                continue
            print_figure(f"{dataset} speed ratio (training images/s) {method}/cryodrgn", r["speed"] / peer["speed"])
            print_figure(f"{dataset} per-image FSC AUC ratio {method}/cryodrgn ({r['epochs']} vs {peer['epochs']} "
                         f"epochs)", float(np.mean(r["scores"].auc) / np.mean(peer["scores"].auc)), fmt=".3f")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.emulate_bf16 and not args.amp:
        raise SystemExit("--emulate-bf16 emulates --amp's bfloat16 products: give --amp too")
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = thread_env(args.threads, gpu=args.gpu)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    exe = ensure_cryodrgn(args.cryodrgn_venv) if args.cryodrgn else Path("cryodrgn")
    print_note(f"{machine_name(args.gpu)}, {args.threads} threads; ours "
               f"{'mixed precision (--amp)' if args.amp else 'float32 (--no-amp)'}"
               f"{', bfloat16 products emulated (bench/bf16_emulation.py: accuracy only)' if args.emulate_bf16 else ''}"
               ", cryoDRGN "
               f"{'its GPU default' if args.gpu else 'float32'}")
    print_note(f"cryoscape: {tool_version(cryoscape_command(), env)}"
               + (f"; cryodrgn: {tool_version([exe], env)}" if args.cryodrgn else ""))
    print_note(f"settings: {args.n_images} images, D={args.box_size}, SNR {args.snr}, zdim {args.zdim}, "
               f"{args.epochs} epochs; per run: epochs {args.epochs_for or '-'}, images {args.images_for or '-'}, "
               f"decoder options {args.decoder_opt or '-'}, train options {args.train_opt or '-'}")
    print_note("load average at start (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
    start = time.perf_counter()
    all_results = {name: benchmark_dataset(name, args, env, exe) for name in args.datasets}
    print_note("load average at end (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
    print_table(all_results)
    print_ratios(all_results)
    print_note(f"bench wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
