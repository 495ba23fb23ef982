#!/usr/bin/env python
"""Benchmark: ``cryoscape train`` (heterogeneous VAE) against cryoDRGN's ``cryodrgn train_vae``.

What it compares
----------------
Both tools train a VAE with the same architecture (encoder and decoder 256 x 3, zdim 8; our
``resmlp`` encoder against cryoDRGN's default ``resid`` one), the same batch size (8), the same
number of epochs and learning rate (both default 1e-4, beta 1/zdim), on the same simulated 1-D hinge
dataset (``cryoscape simulate --heterogeneity hinge --snr 0.1``: particles.mrcs + poses.pkl +
ctf.pkl), on this machine's CPU, in the same run, one after the other, with the same thread
settings (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``--threads``, ``OMP_WAIT_POLICY``, GPU hidden).
Each tool keeps its defaults: positional encoding (both ``gaussian`` with sigma 0.5), contrast
handling (both negate the images, which are white like extracted particles) and precision (ours
mixed precision -- bfloat16 matrix products, float32 loss -- on CPUs with bfloat16 instructions,
float32 elsewhere; cryoDRGN float32 on CPUs).  Ours also runs with ``--no-amp`` (float32
throughout) so that both precisions are measured; ``--lowf`` adds a run with our previous
default encoding (``--pe-type geom_lowf``).

Speed: training images/s = images x epochs / training time, the training time being the sum of
each tool's per-epoch times from its log (the training passes only; cryoDRGN's extra pass that
encodes every image after each epoch, and both tools' checkpoint writing, are left out); the
whole-command wall time (start-up, reading, training, latents, checkpoints) is printed too.
Peak RSS is the child's ``ru_maxrss``.

Quality (CryoBench-style per-image FSC): ``--fsc-images`` evenly spaced images
(``linspace(0, N-1)``); for each, the map decoded at its latent mean after the last epoch (ours
``z.E.npy``, cryoDRGN ``z.E.pkl``) by each tool's own command (``cryoscape volumes --z``,
``cryodrgn eval_vol --zfile``) is compared with the ground-truth volume of that image's state:
AUC = mean |FSC| over shells 1..D/2, mean and median over the images, and the FSC = 0.5 / 0.143
crossings (mean crossing frequency, shown in angstrom).  At D = 128 the maps are decoded by
default at box ``--fsc-box-128`` = 64 (both tools evaluate their decoder on the central 64^3
frequencies only: ``cryoscape volumes --box-size 64``, ``cryodrgn eval_vol -d 64``) and compared
with the ground truth Fourier-cropped to 64: the FSC curve is then exactly the first 32 shells of
the full-box one (to 7.8 A), at an eighth of the decoding cost.  The sign and hand of every map are
checked (real-space correlation to the truth; AUC against the mirrored truth).  The extra
runs of ours (``--no-amp``, ``--lowf``) are scored on ``--fsc-images-extra`` = 25 images to save time.  Latent quality:
Spearman |rho| between PC1 of all latent means and the true hinge angle.

Usage::

    /work/main/.venv/bin/python bench/train.py            # D=64 and D=128 (see README for times)
    /work/main/.venv/bin/python bench/train.py --quick    # D=64, 1000 images, 1 epoch, 25 maps

The speed ratio lines (cryoscape training images/s over cryoDRGN's) are printed last.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cryoscape_command,
    ensure_cryodrgn,
    machine_name,
    print_figure,
    print_note,
    read_map,
    run_timed,
    simulate_dataset,
    thread_env,
    tool_version,
)

ARCHITECTURE_OURS = ["--decoder", "neural_field", "--zdim", "8", "--enc-dim", "256", "--enc-layers", "3",
                     "--dec-dim", "256", "--dec-layers", "3", "--encoder", "resmlp"]
ARCHITECTURE_CRYODRGN = ["--zdim", "8", "--enc-dim", "256", "--enc-layers", "3", "--dec-dim", "256",
                         "--dec-layers", "3"]
DRGN = "cryodrgn"
OURS = "cryoscape"
FP32 = "cryoscape --no-amp"
LOWF = "cryoscape --pe-type geom_lowf"


def precision_note(gpu: bool) -> str:
    """Our default precision where the benchmark runs."""
    if gpu:
        return "mixed precision (bfloat16 autocast on the GPU)"
    return "mixed precision (bfloat16 CPU)" if cpu_bf16() else "float32 (no bfloat16 on this CPU)"


def cpu_bf16() -> bool:
    from cryoscape.models.precision import cpu_has_native_bfloat16

    return cpu_has_native_bfloat16()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench"),
                   help="datasets and outputs (datasets are reused when parameters match)")
    p.add_argument("--cryodrgn", default=None,
                   help="cryodrgn executable or its venv (default /tmp/cryodrgn-venv, created if missing)")
    p.add_argument("--quick", action="store_true",
                   help="D=64, 1000 images, 1 epoch, 25 maps per tool for the FSC (~5 min)")
    p.add_argument("--n-images-64", type=int, default=2000, help="images at D=64 [2000]")
    p.add_argument("--n-images-128", type=int, default=1000, help="images at D=128 [1000]")
    p.add_argument("--no-128", dest="box_128", action="store_false", help="D=64 only")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of every run [2]")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch, both tools [8]")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads for every tool [2]")
    p.add_argument("--gpu", action="store_true", help="both tools on the GPU (default: CPU, GPU hidden)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "unset"],
                   help="OMP_WAIT_POLICY for every tool [PASSIVE: idle OpenMP threads sleep instead "
                        "of spinning, which matters on a busy machine]")
    p.add_argument("--fsc-images", type=int, default=None,
                   help="images scored by per-image FSC, evenly spaced [100; 25 with --quick]")
    p.add_argument("--fsc-images-extra", type=int, default=25,
                   help="images scored for ours with --amp / --match-pe [25]")
    p.add_argument("--fsc-box-128", type=int, default=64,
                   help="box the D=128 maps are decoded and scored at [64: first 32 shells; 128: full]")
    p.add_argument("--fp32", action=argparse.BooleanOptionalAction, default=True,
                   help="also run ours with --no-amp (float32 throughout) [on]")
    p.add_argument("--lowf", action="store_true",
                   help="also run ours with the geom_lowf encoding (our default before 2026-11-21)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- commands
def cryodrgn_train(exe: Path, data: Path, out: Path, args) -> list[str]:
    """cryoDRGN's command: its defaults (gaussian encoding, resid encoder, contrast inversion,
    a checkpoint and latents every epoch) with our architecture, batch, epochs, seed 0."""
    return [str(exe), "train_vae", str(data / "particles.mrcs"), "--poses", str(data / "poses.pkl"),
            "--ctf", str(data / "ctf.pkl"), "-o", str(out), *ARCHITECTURE_CRYODRGN,
            "-n", str(args.epochs), "-b", str(args.batch_size), "--seed", "0", "--no-analysis"]


def cryoscape_train(data: Path, out: Path, args, extra: list[str] = ()) -> list[str]:
    return [*cryoscape_command(), "train", str(data / "particles.mrcs"), "--poses", str(data / "poses.pkl"),
            "--ctf", str(data / "ctf.pkl"), "-o", str(out), *ARCHITECTURE_OURS,
            "-n", str(args.epochs), "-b", str(args.batch_size), "--no-progress", *extra]


def training_seconds(run_dir: Path, log: Path, tool: str) -> float | None:
    """Sum of the per-epoch training times in the tool's log (None if absent).

    cryoDRGN: the "=====> Epoch: E ... Finished in H:MM:SS.ffffff" lines (the epoch's training
    pass, before it encodes every image and writes the checkpoint).  Ours: the "epoch e/E: ...
    in X s" lines of run.log (the training pass, before latents and checkpoint are written).
    """
    if tool == DRGN:
        text = log.read_text(errors="replace") if log.exists() else ""
        hits = re.findall(r"=====> Epoch: \d+ .*?Finished in (\d+):(\d\d):(\d\d(?:\.\d+)?)", text)
        if not hits:
            return None
        return sum(int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in hits)
    path = run_dir / "run.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    hits = re.findall(r"epoch \d+/\d+(?: \([^)]*\))?: .*? in ([\d.]+) s,", text)  # "(marching, band N px)" too
    return sum(map(float, hits)) if hits else None


def last_latents(run_dir: Path, tool: str) -> tuple[int, np.ndarray]:
    """``(epoch label, (N, zdim) latent means)`` of the last saved epoch.

    Ours: ``z.E.npy`` (epochs from 0); cryoDRGN 4.3.1: ``z.E.pkl`` (epochs from 1).
    """
    pattern = r"z\.(\d+)\.npy" if tool != DRGN else r"z\.(\d+)\.pkl"
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := re.fullmatch(pattern, p.name))]
    if not found:
        raise RuntimeError(f"no latents matching {pattern} in {run_dir}")
    epoch, path = max(found)
    if tool == DRGN:
        with open(path, "rb") as f:
            return epoch, np.asarray(pickle.load(f), dtype=np.float32)
    return epoch, np.load(path)


def decode_maps(tool: str, exe: Path, run_dir: Path, epoch: int, z: np.ndarray, out: Path, *,
                box: int, train_box: int, env) -> tuple[list[Path], float]:
    """Decode one map per latent with the tool's own command; ``(map paths in order, seconds)``."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if tool == DRGN:
        zfile = out / "z.txt"
        np.savetxt(zfile, z)
        command = [str(exe), "eval_vol", str(run_dir / f"weights.{epoch}.pkl"), "-c",
                   str(run_dir / "config.yaml"), "--zfile", str(zfile), "-o", str(out / "maps"),
                   "--vol-start-index", "0"]
        if box != train_box:
            command += ["-d", str(box)]
    else:
        zfile = out / "z.npy"
        np.save(zfile, z)
        command = [*cryoscape_command(), "volumes", str(run_dir), "--z", str(zfile), "-o",
                   str(out / "maps"), "--epoch", str(epoch), "--no-progress"]
        if box != train_box:
            command += ["--box-size", str(box)]
    run = run_timed(command, log_path=out / "decode.log", env=env)
    paths = sorted((out / "maps").glob("vol_*.mrc"), key=lambda p: int(re.sub(r"\D", "", p.stem)))
    if len(paths) != len(z):
        raise RuntimeError(f"{command[0]} wrote {len(paths)} maps for {len(z)} latents in {out / 'maps'}")
    return paths, run.wall_s


# --------------------------------------------------------------------------- quality
def score_maps(paths: list[Path], states: np.ndarray, data: Path, box: int) -> dict:
    """Per-map FSC to the ground truth of its state, and sign/hand checks: the library's CryoBench
    scoring (:func:`cryoscape.analysis.evaluate.score_map_files`, also behind ``cryoscape
    evaluate``), which compares at the smaller of the two boxes (the truth Fourier-cropped)."""
    from cryoscape.analysis.evaluate import score_map_files

    scores = score_map_files(paths, states, data)
    if scores.box_size != box:
        raise RuntimeError(f"maps were compared at box {scores.box_size}, expected {box}")
    return dict(auc=scores.auc, auc_mirror=scores.auc_mirror, f05=scores.res_0_5, f0143=scores.res_0_143,
                correlation=scores.correlation)


def latent_spearman(z: np.ndarray, coordinate: np.ndarray) -> float:
    """Spearman |rho| between the first principal component of ``z`` and the true coordinate."""
    from scipy.stats import spearmanr
    from sklearn.decomposition import PCA

    pc1 = PCA(n_components=1).fit_transform(z.astype(np.float64))[:, 0]
    return abs(float(spearmanr(pc1, coordinate).statistic))


# --------------------------------------------------------------------------- one box
def benchmark_box(args, env, exe: Path, box: int, n_images: int) -> dict:
    data, sim = simulate_dataset(args.workdir / f"hinge_D{box}_n{n_images}", box_size=box,
                                 n_images=n_images, snr=args.snr, heterogeneity="hinge", env=env)
    truth = np.load(data / "ground_truth.npz")
    pixel = float(truth["pixel_size_angstrom"])
    print_note(f"D={box}: {n_images} images of the built-in hinge molecule ({len(truth['state_values'])} "
               f"states, {pixel:.3f} A/pixel), SNR {args.snr}, data {data}"
               + ("" if sim is None else f" (simulated in {sim.wall_s:.0f} s)"))
    runs_dir = args.workdir / "runs" / f"train_D{box}_n{n_images}_e{args.epochs}"
    configs = {DRGN: cryodrgn_train(exe, data, runs_dir / "cryodrgn", args),
               OURS: cryoscape_train(data, runs_dir / "cryoscape", args)}
    if args.fp32:
        configs[FP32] = cryoscape_train(data, runs_dir / "cryoscape_fp32", args, ["--no-amp"])
    if args.lowf:
        configs[LOWF] = cryoscape_train(data, runs_dir / "cryoscape_lowf", args, ["--pe-type", "geom_lowf"])
    for name, command in configs.items():
        print_note(f"{name} command: {' '.join(command)}")

    fsc_box = box if box < 128 else min(args.fsc_box_128, box)
    pixel_fsc = pixel * box / fsc_box

    def fsc_index(n: int) -> np.ndarray:
        return np.unique(np.linspace(0, n_images - 1, min(n, n_images)).round().astype(int))

    index = fsc_index(args.fsc_images)
    print_note(f"per-image FSC: {len(index)} images (linspace over the dataset, "
               f"{len(np.unique(truth['state_index'][index]))} distinct states; {args.fsc_images_extra} "
               f"for the extra configurations of ours), maps decoded at box {fsc_box} ({pixel_fsc:.3f} "
               f"A/pixel, Nyquist {2 * pixel_fsc:.2f} A)" + ("" if fsc_box == box else
               f": the first {fsc_box // 2} of {box // 2} shells of the full-box FSC"))

    results = {}
    for name, command in configs.items():  # one after another, never in parallel
        tool = DRGN if name == DRGN else OURS
        run_dir = Path(command[command.index("-o") + 1])
        shutil.rmtree(run_dir, ignore_errors=True)
        run = run_timed(command, log_path=runs_dir / f"{run_dir.name}.log", env=env)
        train_s = training_seconds(run_dir, run.log_path, tool)
        epoch, z = last_latents(run_dir, tool)
        index = fsc_index(args.fsc_images if name in (DRGN, OURS) else args.fsc_images_extra)
        states = truth["state_index"][index]
        paths, decode_s = decode_maps(tool, exe, run_dir, epoch, z[index], runs_dir / f"{run_dir.name}_maps",
                                      box=fsc_box, train_box=box, env=env)
        scores = score_maps(paths, states, data, fsc_box)
        negated = bool(np.mean(scores["correlation"]) < 0)
        if negated:  # an inverted map: score its negative (FSC is sign-sensitive)
            scores = score_maps_negated(paths, states, data, fsc_box)
        results[name] = dict(run=run, train_s=train_s, scores=scores, negated=negated,
                             spearman=latent_spearman(z, truth["coordinate"]), decode_s=decode_s,
                             n_maps=len(paths), epoch=epoch)
        report(name, box, n_images, args.epochs, results[name], pixel_fsc)
    return results


def score_maps_negated(paths, states, data, box):
    """:func:`score_maps` of the negated maps (written next to the originals)."""
    from cryoscape.io.mrc import write_mrc

    flipped = []
    for p in paths:
        v, pix = read_map(p)
        q = p.with_name(p.stem + "_negated.mrc")
        write_mrc(q, -v.astype(np.float32), pixel_size_angstrom=pix)
        flipped.append(q)
    return score_maps(flipped, states, data, box)


def angstrom(freq: np.ndarray, pixel: float) -> str:
    f = float(np.mean(freq))
    return f"{pixel / f:.2f} A ({f:.3f} cycles/pixel)" if f > 0 else "inf"


def report(name: str, box: int, n_images: int, epochs: int, r: dict, pixel_fsc: float) -> None:
    label = f"{name} D={box}"
    run, s = r["run"], r["scores"]
    if r["train_s"] is not None:
        print_figure(f"{label} training images/s", n_images * epochs / r["train_s"], fmt=".1f")
        print_figure(f"{label} training time ({epochs} epochs, from its log)", r["train_s"], "s", fmt=".1f")
    print_figure(f"{label} whole-command wall time", run.wall_s, "s", fmt=".1f")
    print_figure(f"{label} whole-command images/s", n_images * epochs / run.wall_s, fmt=".1f")
    print_figure(f"{label} peak RSS", run.peak_rss_mb, "MB", fmt=".0f")
    print_figure(f"{label} per-image FSC AUC mean / median (latents of epoch label {r['epoch']})",
                 f"{s['auc'].mean():.3f} / {np.median(s['auc']):.3f}")
    print_figure(f"{label} per-image FSC=0.5 / 0.143 (mean crossing)",
                 f"{angstrom(s['f05'], pixel_fsc)} / {angstrom(s['f0143'], pixel_fsc)}")
    print_figure(f"{label} per-image real-space correlation to truth mean (sign check)",
                 float(s["correlation"].mean()), fmt="+.3f")
    print_figure(f"{label} per-image FSC AUC against the mirrored truth (hand check)",
                 float(s["auc_mirror"].mean()), fmt=".3f")
    if r["negated"]:
        print_note(f"{label}: maps correlate negatively with the truth; figures above score the negated maps")
    print_figure(f"{label} Spearman |rho| latent PC1 vs hinge angle", r["spearman"], fmt=".3f")
    print_figure(f"{label} map decoding time ({r['n_maps']} maps, whole command)", r["decode_s"], "s",
                 fmt=".1f")


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.n_images_64, args.epochs, args.box_128 = 1000, 1, False
    if args.fsc_images is None:
        args.fsc_images = 25 if args.quick else 100
    if args.quick:
        args.fsc_images_extra = min(args.fsc_images_extra, args.fsc_images)
    env = thread_env(args.threads, gpu=args.gpu)
    if args.omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    exe = ensure_cryodrgn(args.cryodrgn)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print_note("cryoscape train vs cryodrgn train_vae (zdim 8, encoder and decoder 256x3), same data, "
               f"same machine, {'GPU' if args.gpu else 'CPU only'}, one run each, one after another")
    print_note(machine_name(args.gpu))
    print_note(f"cryoscape: {tool_version(cryoscape_command(), env)}; cryodrgn: {tool_version([exe], env)}")
    print_note(f"threads: OMP_NUM_THREADS=MKL_NUM_THREADS={args.threads}, OMP_WAIT_POLICY="
               f"{env.get('OMP_WAIT_POLICY', '(unset)')} for both; CUDA {'visible' if args.gpu else 'hidden'}; "
               f"batch {args.batch_size}, {args.epochs} epoch(s); encodings: both gaussian sigma 0.5 (both "
               f"defaults); ours: {precision_note(args.gpu)} by default")
    print_note("load average at start (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())
    boxes = [(64, args.n_images_64)] + ([(128, args.n_images_128)] if args.box_128 else [])
    results = {box: benchmark_box(args, env, exe, box, n) for box, n in boxes}
    print_note("load average at end (1/5/15 min): %.1f %.1f %.1f" % os.getloadavg())

    def ratio(res, name):
        a, b = res[name]["train_s"], res[DRGN]["train_s"]
        return b / a if a and b else float("nan")

    for box, res in results.items():
        print_figure(f"FSC AUC mean ratio cryoscape/cryodrgn at D={box}",
                     res[OURS]["scores"]["auc"].mean() / res[DRGN]["scores"]["auc"].mean(), fmt=".3f")
    for name in (LOWF, FP32):
        for box, res in results.items():
            if name in res:
                print_figure(f"speed ratio (training images/s) {name}/cryodrgn at D={box}", ratio(res, name))
    for box, res in results.items():
        print_figure(f"speed ratio (training images/s) cryoscape/cryodrgn at D={box}", ratio(res, OURS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
