"""Time one CryoFormer decoder step (render a batch, its loss's backward) and the share of precision casts in it.

The decoder alone, at D=64 and batch 8 by default, with every point of the rendered sphere queried (the occupancy
grid off: a trained grid queries fewer, the first steps of a run query all), on random rotations and latents.
Per precision (train's bfloat16 autocast where the CPU has it, float32 always) it prints the median and minimum
of ``--rounds`` steps, the precisions interleaved step by step so that a shared machine's slow spells fall on
both, and, with ``--profile``, the share of the step's CPU time in ``aten::copy_`` (the casts between
precisions) from the PyTorch profiler.

To compare two versions of the code, run it with ``PYTHONPATH=<tree>/src`` for each, alternating the runs.

    python bench/cryoformer_step.py [--box 64] [--batch 8] [--rounds 10] [--decoder-opt KEY=VALUE ...] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine_name

from cryoscape.cli.common import parse_key_value
from cryoscape.data.training import fourier_pixels
from cryoscape.geometry.rotations import random_rotations
from cryoscape.models.base import build_decoder
from cryoscape.models.precision import cpu_has_native_bfloat16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--zdim", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decoder-opt", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--profile", action="store_true", help="also the share of aten::copy_ in each precision")
    return p.parse_args(argv)


def _options(pairs: list[str]) -> dict:
    return dict(parse_key_value(pair) for pair in pairs)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    decoder = build_decoder("cryoformer", box_size=args.box, zdim=args.zdim, occupancy=False,
                            **_options(args.decoder_opt)).train()
    pixels = fourier_pixels(args.box)
    z = torch.randn(args.batch, args.zdim)
    generator = torch.Generator().manual_seed(1)

    def step(low: bool) -> None:
        rotations = random_rotations(args.batch, generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            values = decoder.predict_images(rotations, pixels, z, None)
        values.abs().square().sum().backward()

    modes = {"float32": False}
    if cpu_has_native_bfloat16():
        modes = {"bfloat16": True, **modes}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for low in modes.values():
        step(low)  # warm-up (numba compiles the grid's loops on the first call)
    for _ in range(args.rounds):
        for name, low in modes.items():
            start = time.perf_counter()
            step(low)
            times[name].append(time.perf_counter() - start)
    points = len(decoder.columns(torch.device("cpu")))
    print(f"# {machine_name()}; {args.threads} threads; D={args.box}, batch {args.batch}, "
          f"{points} points per image, options {_options(args.decoder_opt)}")
    for name, low in modes.items():
        line = (f"{name}: decoder step median {statistics.median(times[name]) * 1e3:.0f} ms, "
                f"min {min(times[name]) * 1e3:.0f} ms ({args.rounds} steps)")
        if args.profile:
            line += f"; aten::copy_ {_copy_share(step, low):.0%} of the step's CPU time"
        print(line)


def _copy_share(step, low: bool) -> float:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(low)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key == "aten::copy_") / max(total, 1e-9)


if __name__ == "__main__":
    main()
