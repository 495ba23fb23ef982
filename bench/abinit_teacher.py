#!/usr/bin/env python
"""Benchmark: does ab initio's CryoFormer VAE learn the hinge, with and without its latent teacher?

What it measures
----------------
``cryoscape abinit --decoder cryoformer --search-decoder neural_field --zdim 1`` on a simulated hinge
(``--data``: a ``cryoscape simulate`` folder with ``ground_truth.npz``; by default the slow abinit
test's set, 1000 images of 32 px at SNR 1, made with ``--oversampling 1``): a homogeneous neural field
searches the poses for 24 epochs (12 searches, a reset after the third, as tests/train/test_abinit.py),
then a CryoFormer VAE trains ``--final-epochs`` epochs on them.  With ``--teacher-epochs T`` > 0 a
voxel-basis VAE of T epochs is trained at that switch on the poses found and starts the VAE's encoder
(train/teacher.py); 0 is the VAE alone.  Per run (one per teacher length and ``--seeds`` seed):

* the median rotation error of the final poses (the same for every teacher length of a seed);
* |Spearman rho| of the latent against the true hinge coordinate after every final epoch;
* the teacher's own |Spearman| after its last epoch, and the run's wall seconds.

Usage::

    .venv/bin/python bench/abinit_teacher.py --teacher-epochs 12 0 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cryoscape_command, machine_name, print_figure, print_note, run_timed, thread_env  # noqa: E402

SEARCH_EPOCHS = 24
SCHEDULE = ["--zdim", "1", "--encoder", "resmlp", "--enc-layers", "2", "--enc-dim", "128", "-b", "8", "--lr", "1e-3",
            "--beta", "0.05", "--search-every", "2", "--reset-epochs", "5", "--pretrain", "1000", "--k-min", "8",
            "--k-max", "16", "--t-extent", "3", "--decoder", "cryoformer", "--search-decoder", "neural_field",
            "--dec-layers", "2", "--dec-dim", "128", "--checkpoint-every", "100", "--no-progress"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/tmp/cryoscape-bench/hinge_D32_n1000_snr1_os1"),
                   help="a cryoscape simulate folder of the hinge [made when missing: 1000 images, D=32, SNR 1]")
    p.add_argument("--teacher-epochs", type=int, nargs="+", default=[12, 0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--final-epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None, help="[DATA/../runs/abinit_teacher_NAME]")
    return p.parse_args(argv)


def ensure_data(data: Path, env: dict) -> None:
    """The slow abinit test's hinge set (``cryoscape simulate ... --oversampling 1``), made when missing."""
    if (data / "ground_truth.npz").is_file():
        return
    run_timed([*cryoscape_command(), "simulate", "-o", str(data), "-n", "1000", "-D", "32", "--snr", "1",
               "--heterogeneity", "hinge", "--seed", "2", "--oversampling", "1"],
              log_path=data.parent / f"{data.name}.simulate.log", env=env)


def order(z_path: Path, truth: np.ndarray) -> float:
    return float(abs(spearmanr(np.load(z_path)[:, 0], truth).statistic))


def run_one(args, runs: Path, teacher: int, seed: int, env: dict, truth: np.ndarray) -> None:
    from cryoscape.analysis.pose_accuracy import pose_accuracy

    out = runs / f"teacher{teacher}_seed{seed}"
    epochs = SEARCH_EPOCHS + args.final_epochs
    command = [*cryoscape_command(), "abinit", str(args.data / "particles.star"), *SCHEDULE, "-n", str(epochs),
               "--final-epochs", str(args.final_epochs), "--teacher-epochs", str(teacher), "--seed", str(seed),
               "-o", str(out)]
    print_note(" ".join(command))
    shutil.rmtree(out, ignore_errors=True)
    result = run_timed(command, log_path=runs / f"teacher{teacher}_seed{seed}.log", env=env)
    last = epochs - 1
    name = f"seed {seed} teacher {teacher}"
    angle = pose_accuracy(out / f"poses.{last}.npz", args.data).summary()["angle_deg_median"]
    rhos = [order(out / f"z.{e}.npy", truth) for e in range(SEARCH_EPOCHS, epochs)]
    print_figure(f"{name} median pose error", angle, "deg")
    if teacher:
        print_figure(f"{name} the teacher's |Spearman|", order(out / "teacher" / f"z.{teacher - 1}.npy", truth))
    print_figure(f"{name} |Spearman| per final epoch", " ".join(f"{r:.2f}" for r in rhos))
    print_figure(f"{name} wall", result.wall_s, "s", fmt=".0f")


def main(argv=None) -> int:
    args = parse_args(argv)
    env = thread_env(args.threads)
    ensure_data(args.data, env)
    truth = np.load(args.data / "ground_truth.npz")["coordinate"]
    runs = args.workdir or args.data.parent / "runs" / f"abinit_teacher_{args.data.name}"
    runs.mkdir(parents=True, exist_ok=True)
    print_note(f"{machine_name()}; {args.threads} threads; data {args.data} ({len(truth)} images); "
               f"{SEARCH_EPOCHS} search-phase epochs, {args.final_epochs} final epochs")
    for seed in args.seeds:
        for teacher in args.teacher_epochs:
            run_one(args, runs, teacher, seed, env, truth)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
