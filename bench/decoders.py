#!/usr/bin/env python
"""Benchmark: the voxel basis decoder (``--decoder basis``) against our neural field and cryoDRGN.

What it compares
----------------
Three heterogeneous VAE trainings on the same simulated 1-D hinge dataset (``cryoscape simulate
--heterogeneity hinge --snr 0.1``: particles.mrcs + poses.pkl + ctf.pkl), on this machine's CPU,
in one run, one after the other, with the same thread settings (``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` = ``--threads``, ``OMP_WAIT_POLICY=PASSIVE``, GPU hidden), the same number of
epochs, latent dimension (8) and encoder (256 x 3), each at its default batch size (cryoDRGN and
the neural field 8, the basis 64: ``cryoscape train``'s per-decoder default; the basis is also
run at batch 8 and reported as the same-batch ratio; ``--batch-size`` forces one batch for all):

``cryoscape train --decoder basis``
    the structural basis (K = 16 voxel volumes, sparse Fourier backpropagation; its mixing MLP
    ``s(z)`` is 256 x 3 through ``--dec-dim/--dec-layers``), with its defaults (batch 64, lr 1e-3,
    the warm start from the backprojection: set-up before the first epoch, like the noise spectrum,
    so not in the epochs' times; it is reported on its own and in a second ratio that counts it);
``cryoscape train`` (``--decoder neural_field``)
    our coordinate MLP, 256 x 3, with its defaults;
``cryodrgn train_vae``
    cryoDRGN 4.3.1, encoder and decoder 256 x 3, its defaults.

Speed: training images/s = images x epochs / the sum of the per-epoch training times in each
tool's log (the training passes only), as in bench/train.py.  Quality (CryoBench-style
per-image FSC): ``--fsc-images`` evenly spaced images; each one's latent mean after the last epoch
is decoded by the tool's own command (``cryoscape volumes``, ``cryodrgn eval_vol``) and compared
with the ground truth of its state: AUC = mean |FSC| over shells 1..D/2 (at D = 128 the maps are
decoded at box 64 and compared with the truth cropped to 64, the first 32 of 64 shells, for all
three tools, as in bench/train.py).  Latents: Spearman |rho| of PC1 against the hinge angle.
Map generation: seconds per 128^3 map, ``decoder.eval_volume`` timed in a child process with the
same thread settings (best and median of ``--map-repeats`` maps, after one warm-up map) for the
trained basis and neural-field decoders of the D = 128 runs, plus each tool's whole
``volumes``/``eval_vol`` command time per map.

Usage::

    /work/main/.venv/bin/python bench/decoders.py           # D=64 (2000 images) and D=128 (1000), 2 epochs
    /work/main/.venv/bin/python bench/decoders.py --quick   # D=64, 1000 images, 1 epoch, 25 maps

The ratio lines are printed last: training images/s of the basis over the neural field's (target
>= 10 at D=64 and D=128), per-image FSC AUC of the basis over cryoDRGN's (target >= 1), and seconds
per 128^3 basis map (target <= 0.1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cryoscape_command,
    ensure_cryodrgn,
    print_figure,
    print_note,
    run_timed,
    simulate_dataset,
    thread_env,
    tool_version,
    warm_start_seconds,
)
from train import (  # noqa: E402  (the shared pieces of the training benchmark)
    cryodrgn_train,
    decode_maps,
    last_latents,
    latent_spearman,
    score_maps,
    score_maps_negated,
    training_seconds,
)

ENCODER = ["--enc-dim", "256", "--enc-layers", "3", "--encoder", "resmlp"]
DECODER_MLP = ["--dec-dim", "256", "--dec-layers", "3"]
DRGN = "cryodrgn"
BASIS = "cryoscape --decoder basis"
FIELD = "cryoscape --decoder neural_field"
BASIS_8 = "cryoscape --decoder basis -b 8"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench"),
                   help="datasets and outputs (datasets are reused when parameters match)")
    p.add_argument("--cryodrgn", default=None, help="cryodrgn executable or its venv (default /tmp/cryodrgn-venv)")
    p.add_argument("--quick", action="store_true", help="D=64, 1000 images, 1 epoch, 25 maps per tool")
    p.add_argument("--n-images-64", type=int, default=2000, help="images at D=64 [2000]")
    p.add_argument("--n-images-128", type=int, default=1000, help="images at D=128 [1000]")
    p.add_argument("--no-128", dest="box_128", action="store_false", help="D=64 only")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of every run [2]")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch for every tool (default: each tool's own default, cryoDRGN 8, neural "
                        "field 8, basis 64; the basis is also run at 8 for the same-batch ratio)")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads for every tool [2]")
    p.add_argument("--fsc-images", type=int, default=None, help="images scored by per-image FSC [100; 25 with --quick]")
    p.add_argument("--fsc-box-128", type=int, default=64, help="box the D=128 maps are decoded and scored at [64]")
    p.add_argument("--map-repeats", type=int, default=5, help="timed 128^3 basis maps (best kept) [5]")
    p.add_argument("--basis-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --decoder-opt for the basis run (repeatable)")
    p.add_argument("--basis-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="an extra basis run with these --decoder-opt settings (repeatable), e.g. "
                        "basis_lr_scale=0.01")
    p.add_argument("--reuse-cryodrgn", action="store_true",
                   help="reuse a finished cryodrgn run of the same data and settings in the runs folder (its "
                        "training time then comes from that earlier run's log, and is labelled so)")
    p.add_argument("--skip", action="append", default=[], choices=[DRGN, "field", "basis"],
                   help="leave a tool out (development only; the ratios need all three)")
    return p.parse_args(argv)


def cryoscape_train(data: Path, out: Path, args, decoder: str, options: list[str] | None = None, *,
                    batch_size: int | None = None) -> list[str]:
    """Our command; the batch is ``batch_size``, else ``--batch-size``, else the decoder's default."""
    extra = []
    if decoder == "basis":
        for kv in args.basis_opt if options is None else options:
            extra += ["--decoder-opt", kv]
    batch = batch_size or args.batch_size
    if batch:
        extra += ["-b", str(batch)]
    return [*cryoscape_command(), "train", str(data / "particles.mrcs"), "--poses", str(data / "poses.pkl"),
            "--ctf", str(data / "ctf.pkl"), "-o", str(out), "--zdim", "8", *ENCODER, *DECODER_MLP,
            "--decoder", decoder, "-n", str(args.epochs), "--no-progress", *extra]


_TIME_MAPS = r"""
import json, sys, time
import numpy as np, torch
from cryoscape.train.volumes import load_trained_model
run_dir, zfile, box, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
decoder, _, _ = load_trained_model(run_dir)
z = np.load(zfile)
latents = [torch.as_tensor(row) for row in z[: max(1, repeats)]]
decoder.eval_volume(latents[0], box_size=box)  # warm-up: caches, allocator
times = []
for zi in latents:
    t0 = time.perf_counter()
    decoder.eval_volume(zi, box_size=box)
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "threads": torch.get_num_threads()}))
"""


def time_map_generation(run_dir: Path, z: np.ndarray, *, box: int, repeats: int, env) -> tuple[float, float]:
    """``(best, median)`` seconds of ``decoder.eval_volume`` at ``box`` for a trained decoder, timed
    in a child process with the tools' thread settings (after one warm-up map)."""
    import json
    import subprocess

    zfile = run_dir / "bench_map_latents.npy"
    np.save(zfile, z[: max(1, repeats)].astype(np.float32))
    out = subprocess.run([sys.executable, "-c", _TIME_MAPS, str(run_dir), str(zfile), str(box), str(repeats)],
                         capture_output=True, text=True, env=env, check=True)
    times = json.loads(out.stdout.strip().splitlines()[-1])["times"]
    return float(min(times)), float(np.median(times))


def benchmark_box(args, env, exe: Path, box: int, n_images: int) -> dict:
    data, sim = simulate_dataset(args.workdir / f"hinge_D{box}_n{n_images}", box_size=box,
                                 n_images=n_images, snr=args.snr, heterogeneity="hinge", env=env)
    truth = np.load(data / "ground_truth.npz")
    pixel = float(truth["pixel_size_angstrom"])
    print_note(f"D={box}: {n_images} images of the built-in hinge molecule ({len(truth['state_values'])} states, "
               f"{pixel:.3f} A/pixel), SNR {args.snr}, data {data}"
               + ("" if sim is None else f" (simulated in {sim.wall_s:.0f} s)"))
    runs_dir = args.workdir / "runs" / f"decoders_D{box}_n{n_images}_e{args.epochs}"
    configs = {}
    if DRGN not in args.skip:
        configs[DRGN] = cryodrgn_train(exe, data, runs_dir / "cryodrgn",
                                       argparse.Namespace(**{**vars(args), "batch_size": args.batch_size or 8}))
    if "field" not in args.skip:
        configs[FIELD] = cryoscape_train(data, runs_dir / "neural_field", args, "neural_field")
    if "basis" not in args.skip:
        configs[BASIS] = cryoscape_train(data, runs_dir / "basis", args, "basis")
        if not args.batch_size:
            configs[BASIS_8] = cryoscape_train(data, runs_dir / "basis_b8", args, "basis", batch_size=8)
    for i, variant in enumerate(args.basis_variant):
        options = [kv for kv in variant.split(",") if kv]
        configs[f"{BASIS} {' '.join(options)}"] = cryoscape_train(data, runs_dir / f"basis_variant{i}", args,
                                                                  "basis", options)
    for name, command in configs.items():
        print_note(f"{name} command: {' '.join(command)}")
    fsc_box = box if box < 128 else min(args.fsc_box_128, box)
    index = np.unique(np.linspace(0, n_images - 1, min(args.fsc_images, n_images)).round().astype(int))
    print_note(f"per-image FSC: {len(index)} images, maps decoded at box {fsc_box}")
    results = {}
    for name, command in configs.items():
        tool = DRGN if name == DRGN else "cryoscape"
        run_dir = Path(command[command.index("-o") + 1])
        log_path = runs_dir / f"{run_dir.name}.log"
        reused = (name == DRGN and args.reuse_cryodrgn and (run_dir / f"z.{args.epochs}.pkl").exists()
                  and training_seconds(run_dir, log_path, tool))
        if reused:
            run = None
            print_note(f"{name} D={box}: reusing the finished run in {run_dir} (trained earlier, not in this run; "
                       f"its training time comes from {log_path}, written {time.ctime(log_path.stat().st_mtime)})")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            run = run_timed(command, log_path=log_path, env=env)
        train_s = training_seconds(run_dir, log_path, tool)
        warm_s = warm_start_seconds(run_dir) if tool != DRGN else None
        epoch, z = last_latents(run_dir, tool)
        states = truth["state_index"][index]
        paths, decode_s = decode_maps(tool, exe, run_dir, epoch, z[index], runs_dir / f"{run_dir.name}_maps",
                                      box=fsc_box, train_box=box, env=env)
        scores = score_maps(paths, states, data, fsc_box)
        negated = bool(np.mean(scores["correlation"]) < 0)
        if negated:
            scores = score_maps_negated(paths, states, data, fsc_box)
        r = dict(run=run, reused=run is None, train_s=train_s, warm_s=warm_s, scores=scores, negated=negated, epoch=epoch, run_dir=run_dir, z=z,
                 spearman=latent_spearman(z, truth["coordinate"]), decode_s=decode_s, n_maps=len(paths))
        results[name] = r
        label = f"{name} D={box}"
        if train_s:
            earlier = " (earlier run)" if run is None else ""
            print_figure(f"{label} training images/s{earlier}", n_images * args.epochs / train_s, fmt=".1f")
            print_figure(f"{label} training time ({args.epochs} epochs, from its log)", train_s, "s", fmt=".1f")
        if warm_s:
            print_figure(f"{label} warm start (set-up before epoch 1, from its log)", warm_s, "s", fmt=".2f")
            print_figure(f"{label} training images/s with the warm start counted", n_images * args.epochs /
                         (train_s + warm_s), fmt=".1f")
        if run is not None:
            print_figure(f"{label} whole-command wall time", run.wall_s, "s", fmt=".1f")
            print_figure(f"{label} peak RSS", run.peak_rss_mb, "MB", fmt=".0f")
        s = scores
        print_figure(f"{label} per-image FSC AUC mean / median", f"{s['auc'].mean():.3f} / {np.median(s['auc']):.3f}")
        print_figure(f"{label} per-image real-space correlation to truth mean", float(s["correlation"].mean()),
                     fmt="+.3f")
        print_figure(f"{label} per-image FSC AUC against the mirrored truth (hand check)",
                     float(s["auc_mirror"].mean()), fmt=".3f")
        if negated:
            print_note(f"{label}: maps correlate negatively with the truth; the figures score the negated maps")
        print_figure(f"{label} Spearman |rho| latent PC1 vs hinge angle", r["spearman"], fmt=".3f")
        print_figure(f"{label} map decoding, whole command, per map (box {fsc_box})", decode_s / len(paths), "s",
                     fmt=".2f")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.n_images_64, args.epochs, args.box_128 = 1000, 1, False
    if args.fsc_images is None:
        args.fsc_images = 25 if args.quick else 100
    env = thread_env(args.threads)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    exe = ensure_cryodrgn(args.cryodrgn)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print_note("decoders: cryoscape --decoder basis vs cryoscape --decoder neural_field vs cryodrgn train_vae "
               "(zdim 8, encoder 256x3, decoder MLPs 256x3), same data, same machine, CPU only, one run each")
    print_note(f"cryoscape: {tool_version(cryoscape_command(), env)}; cryodrgn: {tool_version([exe], env)}")
    print_note(f"threads: OMP_NUM_THREADS=MKL_NUM_THREADS={args.threads}, OMP_WAIT_POLICY=PASSIVE; CUDA hidden; "
               f"batch {args.batch_size or 'each tool default (cryodrgn 8, neural field 8, basis 64; basis also at 8)'}, "
               f"{args.epochs} epoch(s); basis options: {args.basis_opt or 'defaults'}")
    print_note("load average at start (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
    boxes = [(64, args.n_images_64)] + ([(128, args.n_images_128)] if args.box_128 else [])
    results = {box: benchmark_box(args, env, exe, box, n) for box, n in boxes}

    # map generation at 128^3 (a child process with the tools' thread settings)
    big = max(results)
    map_times = {}
    for name in (BASIS, FIELD):
        if name in results[big]:
            r = results[big][name]
            repeats = args.map_repeats if name == BASIS else 2
            map_times[name] = time_map_generation(r["run_dir"], r["z"], box=128, repeats=repeats, env=env)
            print_figure(f"{name} seconds per 128^3 map (eval_volume, trained at D={big}, best / median of "
                         f"{repeats})", f"{map_times[name][0]:.3f} / {map_times[name][1]:.3f}", "s")
    print_note("load average at end (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())

    def speed(res, a, b, *, with_warm_start=False):
        ta, tb = res.get(a, {}).get("train_s"), res.get(b, {}).get("train_s")
        if with_warm_start and ta:
            ta += res[a].get("warm_s") or 0.0
        return tb / ta if ta and tb else float("nan")

    def auc(res, a, b):
        if a not in res or b not in res:
            return float("nan")
        return res[a]["scores"]["auc"].mean() / res[b]["scores"]["auc"].mean()

    for box, res in results.items():
        earlier = " (cryodrgn timed in an earlier run)" if res.get(DRGN, {}).get("reused") else ""
        print_figure(f"speed ratio (training images/s) basis/cryodrgn at D={box}{earlier}", speed(res, BASIS, DRGN))
    for box, res in results.items():
        print_figure(f"per-image FSC AUC ratio neural_field/cryodrgn at D={box}", auc(res, FIELD, DRGN), fmt=".3f")
    if BASIS in map_times and FIELD in map_times:
        print_figure("map generation ratio (seconds per 128^3 map) neural_field/basis",
                     map_times[FIELD][0] / map_times[BASIS][0], fmt=".0f")
    if BASIS in map_times:
        print_figure("seconds per 128^3 basis map (target <= 0.1)", map_times[BASIS][0], "s", fmt=".3f")
    for box, res in results.items():
        for name in res:
            if name.startswith(BASIS + " ") and name != BASIS_8:
                print_figure(f"per-image FSC AUC ratio {name[len('cryoscape --decoder '):]}/cryodrgn at D={box}",
                             auc(res, name, DRGN), fmt=".3f")
                print_figure(f"speed ratio (training images/s) {name[len('cryoscape --decoder '):]}/neural_field "
                             f"at D={box}", speed(res, name, FIELD))
    for box, res in results.items():
        if BASIS_8 in res:
            print_figure(f"speed ratio (training images/s) basis at batch 8/neural_field at D={box} (same batch)",
                         speed(res, BASIS_8, FIELD))
            print_figure(f"per-image FSC AUC ratio basis at batch 8/cryodrgn at D={box}", auc(res, BASIS_8, DRGN),
                         fmt=".3f")
    for box, res in results.items():
        print_figure(f"per-image FSC AUC ratio basis/cryodrgn at D={box} (target >= 1)", auc(res, BASIS, DRGN),
                     fmt=".3f")
    for box, res in results.items():
        print_figure(f"speed ratio basis/neural_field at D={box} with the basis warm start counted as training "
                     f"time ({args.epochs} epochs)", speed(res, BASIS, FIELD, with_warm_start=True))
    for box, res in results.items():
        print_figure(f"speed ratio (training images/s) basis/neural_field at D={box} (target >= 10)",
                     speed(res, BASIS, FIELD))
    return 0


if __name__ == "__main__":
    sys.exit(main())
