#!/usr/bin/env python
"""Benchmark: which decoder learns the hinge's latent, epoch by epoch, at D=64 (CryoFormer's open question).

What it measures
----------------
On one simulated hinge data set (``--data``: a ``cryoscape simulate`` folder with ``ground_truth.npz``,
e.g. bench/oracle.py's 8000-image hinge or bench/cryoformer.py's 1000-image sets), each chosen decoder
is trained with ``cryoscape train`` (zdim 8, a 256 x 3 encoder, ``--epochs`` epochs, the poses of
``--poses``); after the run:

* per epoch, |Spearman rho| between the first principal component of the epoch's latent means
  (``z.E.npy``) and the true state index (the hinge angle's order): does the latent order the motion?
* after the last epoch, the per-image FSC AUC to the truth (``--fsc-images`` evenly spaced images, each
  decoded at its latent by ``cryoscape volumes``; bench/train.py's scoring, as bench/cryoformer.py);
* the training seconds (the epoch times of run.log).

``cryoformer`` is CryoFormer alone (``--teacher-epochs 0``); ``cryoformer_teacher`` is CryoFormer whose VAE
encoder starts from the ``basis`` run's (``--init-encoder``, train/teacher.py; the automatic teacher is that
run made by ``train`` itself), so ``basis`` is trained first whenever it is asked for.

Usage::

    .venv/bin/python bench/latent_epochs.py --data /tmp/cryoscape-bench-oracle/hinge_D64_n8000_snr0.1 \\
        --epochs 12 --decoders basis neural_field cryoformer cryoformer_teacher
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import mrcfile
import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cryoscape_command, machine_name, print_figure, print_note, run_timed, thread_env  # noqa: E402
from train import decode_maps, score_maps, training_seconds  # noqa: E402

ENCODER = ["--zdim", "8", "--enc-dim", "256", "--enc-layers", "3"]
DECODERS = {
    "basis": ["--decoder", "basis"],
    "neural_field": ["--decoder", "neural_field", "--dec-dim", "256", "--dec-layers", "3"],
    "cryoformer": ["--decoder", "cryoformer", "--teacher-epochs", "0"],  # alone
    "cryoformer_teacher": ["--decoder", "cryoformer"],  # + --init-encoder RUNS/basis
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a cryoscape simulate folder of the hinge")
    p.add_argument("--poses", default="poses.pkl", help="pose file inside --data [poses.pkl: the true poses]")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--decoders", nargs="+", choices=list(DECODERS), default=list(DECODERS))
    p.add_argument("--cryoformer-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="--decoder-opt of both CryoFormer runs (e.g. render_size=64: the whole band at D=64)")
    p.add_argument("--fsc-images", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None, help="[DATA/../runs/latent_epochs_NAME_eE]")
    return p.parse_args(argv)


def latent_order(z: np.ndarray, states: np.ndarray) -> float:
    """|Spearman rho| of the latents' first principal component against the true states."""
    zc = z - z.mean(0)
    pc = np.linalg.svd(zc, full_matrices=False)[2][0]
    return float(abs(spearmanr(zc @ pc, states).statistic))


def train_and_score(args, name: str, runs: Path, env: dict, states: np.ndarray, box: int) -> None:
    out = runs / name
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--init-encoder", str(runs / "basis")] if name == "cryoformer_teacher" else []
    if name.startswith("cryoformer"):
        extra += [x for kv in args.cryoformer_opt for x in ("--decoder-opt", kv)]
    command = [*cryoscape_command(), "train", str(args.data / "particles.mrcs"), "--poses", str(args.data / args.poses),
               "--ctf", str(args.data / "ctf.pkl"), *ENCODER, *DECODERS[name], *extra, "-n", str(args.epochs),
               "--checkpoint-every", str(args.epochs), "--no-progress", "-o", str(out)]
    print_note(f"{name}: {' '.join(command)}")
    run_timed(command, log_path=runs / f"{name}.log", env=env)
    rhos = [latent_order(np.load(out / f"z.{e}.npy"), states) for e in range(args.epochs)]
    z = np.load(out / f"z.{args.epochs - 1}.npy")
    index = np.unique(np.linspace(0, len(states) - 1, args.fsc_images).round().astype(int))
    paths, _ = decode_maps("cryoscape", None, out, args.epochs - 1, z[index], runs / f"{name}_maps", box=box,
                           train_box=box, env=env)
    auc = float(np.mean(score_maps(paths, states[index], args.data, box)["auc"]))
    print_figure(f"{name} |Spearman| latent PC1 vs truth per epoch", " ".join(f"{r:.2f}" for r in rhos))
    print_figure(f"{name} per-image FSC AUC after {args.epochs} epochs", auc, fmt=".3f")
    print_figure(f"{name} training seconds (epochs of run.log)", training_seconds(out, out / "run.log", "cryoscape"),
                 "s", fmt=".0f")


def main(argv=None) -> int:
    args = parse_args(argv)
    states = np.load(args.data / "ground_truth.npz")["state_index"]
    with mrcfile.open(args.data / "particles.mrcs", header_only=True) as f:
        box = int(f.header.nx)
    runs = args.workdir or args.data.parent / "runs" / f"latent_epochs_{args.data.name}_e{args.epochs}"
    runs.mkdir(parents=True, exist_ok=True)
    print_note(f"{machine_name()}; {args.threads} threads; data {args.data} ({len(states)} images, D={box}), "
               f"poses {args.poses}, {args.epochs} epochs")
    names = [n for n in DECODERS if n in args.decoders]
    if "cryoformer_teacher" in names and "basis" not in names:
        names.insert(0, "basis")
    env = thread_env(args.threads)
    for name in names:
        train_and_score(args, name, runs, env, states, box)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
