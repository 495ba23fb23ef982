#!/usr/bin/env python
"""Benchmark: CryoFormer (``--decoder cryoformer``) against cryoDRGN, our neural field and the basis.

What it compares (the paper's Table 1 and its orientation ablation, on our simulator)
----------------------------------------------------------------------------------------
For every ``--snr`` (default 0.1, 0.01, 0.001): the built-in hinge at ``--box`` (64) with
``--n-images`` images, whose poses are perturbed before training (each rotation by ``--perturb-deg``
(5) degrees about a random axis, each shift by ``--perturb-px`` (1) pixel in a random direction;
``poses_perturbed.pkl``).  Five heterogeneous trainings (zdim 8, the same epochs, one after the
other, same thread settings, each at its default batch and learning rate):

``cryodrgn train_vae`` (4.3.1, 256 x 3, the peer); ``cryoscape train`` (neural field, 256 x 3);
``cryoscape train --decoder basis``; ``cryoscape train --decoder cryoformer`` on the perturbed poses
(no refinement: the ablation); ``cryoscape train --decoder cryoformer --pose-source encoder``
(the residual orientation encoder, starting at the perturbed poses and refined end to end;
``--pose-encoder absolute``: the paper's, pre-trained on them for ``--pretrain-epochs`` passes).

Figures per run: training images/s (images x epochs / the sum of the epoch times in the log);
per-image FSC AUC to the truth (``--fsc-images`` evenly spaced images, each decoded at its latent by
the tool's own command, bench/train.py's scoring); for the encoder run, the median rotation error
(degrees) and shift error (pixels) of the perturbed input poses and of the refined poses
(``poses.E.pkl`` of the last epoch) against the truth; a cryoscape run's set-up before epoch 1
(its warm start, e.g. CryoFormer's occupancy prior, and CryoFormer's automatic teacher, a basis run
of ``--teacher-epochs``) and its throughput with it counted.  Ratios last:
CryoFormer's AUC over each peer's, the refined over the input pose error, CryoFormer's time per epoch
over the neural field's.  The host is shared and its speed drifts by more than the changes measured,
so by default (``--bracket``) the neural field trains again after the others and its time is the mean
of its two runs (each run's ratio is printed too).

Usage::

    .venv/bin/python bench/cryoformer.py                      # D=64, 2000 images, 3 SNRs, 2 epochs
    .venv/bin/python bench/cryoformer.py --quick              # D=32, 500 images, SNR 0.1, 1 epoch
"""

from __future__ import annotations

import argparse
import math
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
    run_timed,
    simulate_dataset,
    teacher_seconds,
    thread_env,
    warm_start_seconds,
)
from train import decode_maps, last_latents, score_maps, training_seconds  # noqa: E402

DRGN = "cryodrgn"
ENCODER = ["--enc-dim", "256", "--enc-layers", "3"]
MLP = ["--dec-dim", "256", "--dec-layers", "3"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench"))
    p.add_argument("--cryodrgn", default=None, help="cryodrgn executable or its venv")
    p.add_argument("--quick", action="store_true", help="D=32, 500 images, SNR 0.1, 1 epoch, 20 maps")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--snr", type=float, action="append", default=None, help="repeatable [0.1 0.01 0.001]")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--perturb-deg", type=float, default=5.0)
    p.add_argument("--perturb-px", type=float, default=1.0)
    p.add_argument("--pretrain-epochs", type=int, default=200, help="absolute encoder's pre-training passes")
    p.add_argument("--pose-encoder", choices=("residual", "absolute"), default="residual",
                   help="orientation encoder form of the refined run [residual]")
    p.add_argument("--cryoformer-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="--decoder-opt of both CryoFormer runs (repeatable)")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="CryoFormer's automatic teacher (train --teacher-epochs) [its default; 0: none]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="our runs with --amp or --no-amp (default: train's own, bfloat16 autocast on GPUs and on "
                        "CPUs with AVX512-BF16/AMX, float32 elsewhere); cryoDRGN keeps its own")
    p.add_argument("--gpu", action="store_true", help="every tool on the GPU (default: CPU, GPU hidden)")
    p.add_argument("--fsc-images", type=int, default=None, help="[100; 20 with --quick]")
    p.add_argument("--bracket", action=argparse.BooleanOptionalAction, default=True,
                   help="train the neural field again after the others and time it by the mean of its two runs, "
                        "so that a shared host's drift between runs shows and partly cancels [on]")
    p.add_argument("--skip", action="append", default=[], choices=[DRGN, "neural_field", "basis", "cryoformer",
                                                                    "cryoformer_encoder"])
    return p.parse_args(argv)


def perturb_poses(data: Path, *, degrees: float, pixels: float, seed: int = 0) -> Path:
    """``poses_perturbed.pkl``: every rotation turned by ``degrees`` about a random axis, every shift moved
    by ``pixels`` in a random direction (cryoDRGN's format: shifts in box fractions)."""
    from cryoscape.geometry.rotations import rotation_about_axis
    from cryoscape.io.cryodrgn import read_poses_pkl, write_poses_pkl

    box = int(np.load(data / "ground_truth.npz")["box_size"])
    R, t = read_poses_pkl(data / "poses.pkl", box_size=box)
    rng = np.random.default_rng(seed)
    axes = rng.normal(size=(len(R), 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    dR = np.asarray(rotation_about_axis(axes, np.full(len(R), math.radians(degrees))))
    angle = rng.uniform(0, 2 * math.pi, len(R))
    t2 = (np.zeros((len(R), 2)) if t is None else t) + pixels * np.stack([np.cos(angle), np.sin(angle)], 1)
    out = data / f"poses_perturbed_{degrees:g}deg_{pixels:g}px.pkl"
    write_poses_pkl(out, dR @ R, t2, box_size=box)
    return out


def commands(args, exe: Path, data: Path, poses: Path, runs: Path) -> dict[str, list[str]]:
    inputs = [str(data / "particles.mrcs"), "--poses", str(poses), "--ctf", str(data / "ctf.pkl")]
    ours = [*cryoscape_command(), "train", *inputs, "--zdim", "8", *ENCODER, "-n", str(args.epochs), "--no-progress"]
    if args.amp is not None:
        ours.append("--amp" if args.amp else "--no-amp")
    cf = [x for kv in args.cryoformer_opt for x in ("--decoder-opt", kv)]
    if args.teacher_epochs is not None:
        cf += ["--teacher-epochs", str(args.teacher_epochs)]
    cmds = {
        DRGN: [str(exe), "train_vae", *inputs, "-o", str(runs / DRGN), "--zdim", "8", *ENCODER, *MLP,
               "-n", str(args.epochs), "-b", "8", "--seed", "0", "--no-analysis"],
        "neural_field": [*ours, "--decoder", "neural_field", *MLP, "-o", str(runs / "neural_field")],
        "basis": [*ours, "--decoder", "basis", "-o", str(runs / "basis")],
        "cryoformer": [*ours, "--decoder", "cryoformer", *cf, "-o", str(runs / "cryoformer")],
        "cryoformer_encoder": [*ours, "--decoder", "cryoformer", *cf, "--pose-source", "encoder",
                               "--pose-encoder", args.pose_encoder,
                               "--pose-pretrain-epochs", str(args.pretrain_epochs), "--pose-start-epoch", "0",
                               "-o", str(runs / "cryoformer_encoder")],
    }
    return {k: v for k, v in cmds.items() if k not in args.skip}


def pose_errors(path: Path, data: Path, box: int) -> tuple[float, float]:
    """Median rotation error (degrees) and shift error (pixels) of a poses.pkl against the truth."""
    from cryoscape.geometry.rotations import rotation_angle_between
    from cryoscape.io.cryodrgn import read_poses_pkl

    R, t = read_poses_pkl(path, box_size=box)
    R0, t0 = read_poses_pkl(data / "poses.pkl", box_size=box)
    rot = np.degrees(np.asarray(rotation_angle_between(R, R0)))
    return float(np.median(rot)), float(np.median(np.linalg.norm(t - t0, axis=1)))


def run_snr(args, env, exe: Path, snr: float) -> dict:
    data, _ = simulate_dataset(args.workdir / f"hinge_D{args.box}_n{args.n_images}_snr{snr:g}", box_size=args.box,
                               n_images=args.n_images, snr=snr, heterogeneity="hinge", env=env)
    truth = np.load(data / "ground_truth.npz")
    poses = perturb_poses(data, degrees=args.perturb_deg, pixels=args.perturb_px)
    runs = args.workdir / "runs" / f"cryoformer_D{args.box}_n{args.n_images}_snr{snr:g}_e{args.epochs}"
    index = np.unique(np.linspace(0, args.n_images - 1, args.fsc_images).round().astype(int))
    tag = f"SNR {snr:g} D={args.box}"
    before = pose_errors(poses, data, args.box)
    print_figure(f"{tag} input poses median rotation / shift error", f"{before[0]:.2f} deg / {before[1]:.2f} px")
    results = {}
    for name, command in commands(args, exe, data, poses, runs).items():
        tool = DRGN if name == DRGN else "cryoscape"
        run_dir = Path(command[command.index("-o") + 1])
        shutil.rmtree(run_dir, ignore_errors=True)
        print_note(f"{tag} {name}: {' '.join(command)}")
        run_timed(command, log_path=runs / f"{name}.log", env=env)
        train_s = training_seconds(run_dir, runs / f"{name}.log", tool)
        epoch, z = last_latents(run_dir, tool)
        paths, _ = decode_maps(tool, exe, run_dir, epoch, z[index], runs / f"{name}_maps", box=args.box,
                               train_box=args.box, env=env)
        auc = float(np.mean(score_maps(paths, truth["state_index"][index], data, args.box)["auc"]))
        results[name] = {"auc": auc, "img_s": args.n_images * args.epochs / train_s if train_s else float("nan")}
        print_figure(f"{tag} {name} training images/s", results[name]["img_s"], fmt=".2f")
        warm_s = warm_start_seconds(run_dir) if tool != DRGN else None
        teach_s = teacher_seconds(run_dir) if tool != DRGN else None
        if warm_s is not None:  # set-up before epoch 1 (CryoFormer's occupancy prior), not in the epoch times
            print_figure(f"{tag} {name} warm start (set-up before epoch 1, from its log)", warm_s, "s", fmt=".2f")
        if teach_s is not None:  # CryoFormer's automatic teacher (a basis run before it), not in the epoch times
            print_figure(f"{tag} {name} teacher (a basis run before epoch 1, from its log)", teach_s, "s", fmt=".2f")
        if warm_s is not None or teach_s is not None:
            setup_s = (warm_s or 0.0) + (teach_s or 0.0)
            print_figure(f"{tag} {name} training images/s with the set-up counted",
                         args.n_images * args.epochs / (train_s + setup_s), fmt=".2f")
        print_figure(f"{tag} {name} per-image FSC AUC", auc, fmt=".3f")
        if name == "cryoformer_encoder":
            after = pose_errors(run_dir / f"poses.{epoch}.pkl", data, args.box)
            results[name]["pose_ratio"] = after[0] / max(before[0], 1e-9)
            print_figure(f"{tag} refined poses median rotation / shift error", f"{after[0]:.2f} deg / {after[1]:.2f} px")
    if args.bracket and "neural_field" in results:
        bracket_neural_field(args, env, commands(args, exe, data, poses, runs)["neural_field"], runs, tag, results)
    return results


def train_into(command: list[str], run_dir: Path, log: Path, env) -> float | None:
    """Run our ``train`` ``command`` into ``run_dir`` (its ``-o`` replaced) and return its epochs' seconds."""
    at = command.index("-o") + 1
    shutil.rmtree(run_dir, ignore_errors=True)
    run_timed([*command[:at], str(run_dir), *command[at + 1:]], log_path=log, env=env)
    return training_seconds(run_dir, log, "cryoscape")


def bracket_neural_field(args, env, command: list[str], runs: Path, tag: str, results: dict) -> None:
    """Train the neural field once more, after the other tools, and time it by the mean of its two runs'
    training seconds (``results["neural_field"]["img_s"]`` is replaced; both runs' figures are printed)."""
    again_s = train_into(command, runs / "neural_field_again", runs / "neural_field_again.log", env)
    first = results["neural_field"]["img_s"]
    again = args.n_images * args.epochs / again_s if again_s else float("nan")
    mean = 2 / (1 / first + 1 / again)  # images over the mean of the two runs' seconds
    print_figure(f"{tag} neural_field training images/s, again after the others", again, fmt=".2f")
    print_figure(f"{tag} neural_field training images/s, the two runs' mean time", mean, fmt=".2f")
    results["neural_field"].update(img_s=mean, img_s_runs=(first, again))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.box, args.n_images, args.epochs, args.snr = 32, 500, 1, args.snr or [0.1]
    args.snr = args.snr or [0.1, 0.01, 0.001]
    args.fsc_images = args.fsc_images or (20 if args.quick else 100)
    env = thread_env(args.threads, gpu=args.gpu)
    exe = ensure_cryodrgn(args.cryodrgn) if DRGN not in args.skip else Path("cryodrgn")
    precision = {None: "train's default precision", True: "--amp", False: "--no-amp (float32)"}[args.amp]
    print_note(f"{machine_name(args.gpu)}; {args.threads} threads; our runs: {precision}")
    all_results = {snr: run_snr(args, env, exe, snr) for snr in args.snr}
    for snr, r in all_results.items():
        cf = r.get("cryoformer_encoder") or r.get("cryoformer")
        if cf is None:
            continue
        for peer in (DRGN, "neural_field", "basis"):
            if peer in r:
                print_figure(f"SNR {snr:g} CryoFormer AUC / {peer} AUC", cf["auc"] / r[peer]["auc"], fmt=".3f")
        if "pose_ratio" in cf:
            print_figure(f"SNR {snr:g} refined / input median rotation error", cf["pose_ratio"], fmt=".3f")
        if "neural_field" in r:
            print_figure(f"SNR {snr:g} CryoFormer time per epoch / neural field's",
                         r["neural_field"]["img_s"] / cf["img_s"], fmt=".2f")
            for which, img_s in zip(("first", "second"), r["neural_field"].get("img_s_runs", ())):
                print_figure(f"SNR {snr:g} CryoFormer time per epoch / the neural field's {which} run's",
                             img_s / cf["img_s"], fmt=".2f")
    return 0


if __name__ == "__main__":
    sys.exit(main())
