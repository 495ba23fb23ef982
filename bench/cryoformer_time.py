"""Benchmark: CryoFormer's time per epoch over the neural field's, the two trained alternately.

bench/cryoformer.py trains each tool once (the neural field twice, before and after the others); on a
shared host whose speed drifts from minute to minute, its time ratio moved by a quarter between runs
of the same code.  Here the neural field and CryoFormer (with ``--encoder`` also CryoFormer with its
orientation encoder) train in turn, ``--repeats`` times, on bench/cryoformer.py's data with its commands
(every option of bench/cryoformer.py applies: ``--snr``, ``--n-images``, ``--epochs``,
``--cryoformer-opt``, ``--amp``...):

    neural field, CryoFormer, neural field, CryoFormer, ..., neural field

Each CryoFormer run's training seconds (the epochs' times from its log: not the teacher, not the warm
start) are divided by the mean of the two neural-field runs either side of it; the figure is the median
of those ratios, printed with every ratio and each tool's images/s.  No maps are scored (bench/cryoformer.py
scores them).

    .venv/bin/python bench/cryoformer_time.py --n-images 1000 --repeats 3 [--encoder] [--snr 0.001]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_name, print_figure, print_note, simulate_dataset, thread_env  # noqa: E402
from cryoformer import commands, parse_args, perturb_poses, train_into  # noqa: E402


def parse_all(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """``(this script's options, bench/cryoformer.py's options)``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="CryoFormer runs per SNR (one more neural-field run)")
    p.add_argument("--encoder", action="store_true", help="also CryoFormer with its orientation encoder")
    own, rest = p.parse_known_args(argv)
    if own.repeats < 1:
        p.error("--repeats must be at least 1")
    return own, parse_args(rest)


def time_snr(own, args, env, snr: float) -> None:
    data, _ = simulate_dataset(args.workdir / f"hinge_D{args.box}_n{args.n_images}_snr{snr:g}", box_size=args.box,
                               n_images=args.n_images, snr=snr, heterogeneity="hinge", env=env)
    poses = perturb_poses(data, degrees=args.perturb_deg, pixels=args.perturb_px)
    runs = args.workdir / "runs" / f"cryoformer_time_D{args.box}_n{args.n_images}_snr{snr:g}_e{args.epochs}"
    cmds = commands(args, Path("cryodrgn"), data, poses, runs)
    ours = ["cryoformer", *(["cryoformer_encoder"] if own.encoder else [])]
    seconds: dict[str, list[float]] = {name: [] for name in ["neural_field", *ours]}

    def train(name: str) -> None:
        i = len(seconds[name])
        seconds[name].append(train_into(cmds[name], runs / f"{name}_{i}", runs / f"{name}_{i}.log", env))
        print_note(f"SNR {snr:g} {name} run {i + 1}: {args.n_images * args.epochs / seconds[name][-1]:.1f} img/s")

    train("neural_field")
    for _ in range(own.repeats):
        for name in ours:
            train(name)
        train("neural_field")
    nf = seconds["neural_field"]
    for name in ours:
        ratios = [s / (0.5 * (nf[i] + nf[i + 1])) for i, s in enumerate(seconds[name])]
        label = "CryoFormer" if name == "cryoformer" else "CryoFormer + encoder"
        print_figure(f"SNR {snr:g} {label} time per epoch / neural field's, each run",
                     " ".join(f"{r:.2f}" for r in ratios))
        print_figure(f"SNR {snr:g} {label} time per epoch / neural field's, median of {len(ratios)}",
                     statistics.median(ratios), fmt=".2f")


def main(argv=None) -> int:
    own, args = parse_all(argv)
    if args.quick:  # bench/cryoformer.py's --quick
        args.box, args.n_images, args.epochs, args.snr = 32, 500, 1, args.snr or [0.1]
    args.snr = args.snr or [0.1, 0.01, 0.001]
    env = thread_env(args.threads, gpu=args.gpu)
    precision = {None: "train's default precision", True: "--amp", False: "--no-amp (float32)"}[args.amp]
    print_note(f"{machine_name(args.gpu)}; {args.threads} threads; {precision}; {own.repeats} CryoFormer runs "
               f"per SNR, the neural field before, between and after them")
    for snr in args.snr:
        time_snr(own, args, env, snr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
