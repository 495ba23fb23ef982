#!/usr/bin/env python
"""Benchmark: where a float32 training step of the neural field goes, and what the band limit saves.

One decoder step (forward, loss, backward, Adam) of ``NeuralField`` 256 x 3, zdim 8, gaussian
encoding, on a batch of 8 randomly rotated half central slices of a D = 64 box (the pixels
``cryoscape train`` evaluates: the half-disc ``|k| < D/2``), float32, in this process with
``--threads`` threads.  Printed: milliseconds per step and decoder images/s for each
``band_fraction`` (the fraction of Nyquist the decoder evaluates), the points per image, and the
torch.profiler table of the full-band step (self CPU time by operator).  The encoder and data
loading are left out (the encoder's 4096 x 256 input layer costs ~1 % of the decoder's FLOPs).

Run under the shared lock::

    flock /tmp/cryoscape-heavy.lock .venv/bin/python bench/nf_speed.py | tee bench/results/nf_speed_DATE.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_name  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-D", "--box-size", type=int, default=64)
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bands", type=float, nargs="+", default=[1.0, 0.8, 0.7, 0.6])
    p.add_argument("--widths", type=int, nargs="+", default=[256], help="decoder widths (hidden layers 3) [256]")
    p.add_argument("--no-profile", action="store_true", help="skip the profile of the full-band step")
    return p.parse_args(argv)


def batch(D: int, B: int):
    """``(coords (B, P, 3), z (B, 8), target (B, P))``: rotated half-disc pixels, random data."""
    n = torch.arange(D) - D // 2
    yy, xx = torch.meshgrid(n, n, indexing="ij")
    keep = (xx ** 2 + yy ** 2 < (D // 2) ** 2) & ((yy > 0) | ((yy == 0) & (xx >= 0)))
    pts = torch.stack([xx[keep], yy[keep], torch.zeros(int(keep.sum()))], -1).float() / D
    rot = torch.linalg.qr(torch.randn(B, 3, 3))[0]
    return pts[None] @ rot.transpose(1, 2), torch.randn(B, 8), torch.randn(B, pts.shape[0], dtype=torch.complex64)


def step_seconds(band: float, data, steps: int, profile: bool = False, width: int = 256) -> float:
    from cryoscape.models.neural_field import NeuralField

    torch.manual_seed(0)
    coords, z, target, box = data
    decoder = NeuralField(box_size=box, zdim=8, band_fraction=band, width=width)
    opt = torch.optim.Adam(decoder.parameters(), 1e-4)

    def step():
        loss = (decoder(coords, z) - target).abs().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(5):
                step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {machine_name()}, {torch.get_num_threads()} threads, float32, torch {torch.__version__}")
    torch.manual_seed(0)
    data = (*batch(args.box_size, args.batch_size), args.box_size)
    print(f"# D={args.box_size}, batch {args.batch_size}, {data[0].shape[1]} points per image (half disc), "
          f"NeuralField WIDTHx3 zdim 8 gaussian encoding")
    full = None
    for width in args.widths:
        for band in args.bands:
            seconds = step_seconds(band, data, args.steps, width=width)
            full = full or seconds
            inside = int((data[0][0].square().sum(-1) <= (0.5 * band) ** 2).sum())
            print(f"width {width} band_fraction {band:g}: {inside} points per image, {seconds * 1e3:.1f} ms per step, "
                  f"{args.batch_size / seconds:.1f} decoder img/s, {full / seconds:.2f}x the first line")
    if not args.no_profile:
        print("# profile of the full-band step (5 steps):")
        step_seconds(1.0, data, 2, profile=True, width=args.widths[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
