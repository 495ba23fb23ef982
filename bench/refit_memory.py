#!/usr/bin/env python
"""Benchmark: memory and time of the voxel basis's refit at large boxes (models/basis.py).

The refit holds per-voxel sums (a Gram triangle and data sums per half-set) for every voxel of the
decoder's lattice; above its 8 GiB budget the components are solved up to the outermost shell that
fits and the mean map alone beyond it (``refit_bands``).  This script builds a basis decoder at box
``D`` (zdim 8, 16 basis volumes, random maps), makes ``--images`` noisy central slices of it at random
rotations and latents, runs one refit (no correction passes: ``final=False``) and prints the band it
chose, its seconds and the process's peak resident memory (``ru_maxrss``: decoder, torch and refit
together; the decoder alone is printed too).  The images cost little: at D = 256 the time is the
per-voxel solves and the component mask's FFTs.

Usage::

    .venv/bin/python bench/refit_memory.py --box 256 --images 64    # ~13 min, ~10 GiB on 2 cores
    .venv/bin/python bench/refit_memory.py --box 128 --images 64    # ~1.5 min
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from common import machine_name

from cryoscape.geometry.rotations import random_rotations
from cryoscape.models.basis import StructuralBasis, refit_bands, refit_bytes


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def slices(decoder: StructuralBasis, z: torch.Tensor, box: int, batch: int = 16):
    """Central slices of ``decoder`` at random rotations plus unit complex noise, as the refit reads them."""
    k = torch.arange(-(box // 2), box // 2, dtype=torch.float32) / box
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    keep = (kx.square() + ky.square()).sqrt() <= 0.5
    plane = torch.stack([kx[keep], ky[keep], torch.zeros_like(kx[keep])], -1)
    g = torch.Generator().manual_seed(1)
    rotations = random_rotations(len(z), generator=g)
    for start in range(0, len(z), batch):
        coords = plane @ rotations[start:start + batch]
        with torch.no_grad():
            values = decoder(coords, z[start:start + batch])
        values = values + torch.complex(torch.randn(values.shape, generator=g), torch.randn(values.shape, generator=g))
        yield coords, values, None, torch.ones(plane.shape[0]), z[start:start + batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    decoder = StructuralBasis(box_size=args.box, zdim=8, n_basis=16, init_scale=1e-2).eval()
    print(f"{machine_name()}, {torch.get_num_threads()} threads; D = {args.box}, {args.images} images")
    print(f"decoder built: process peak {peak_gib():.2f} GiB")
    counts = torch.bincount(decoder._voxel_shell)
    print(f"{decoder.lattice.n_vox} voxels; the whole refit with 16 components would hold "
          f"{refit_bytes(decoder.lattice.n_vox, 17) / 2**30:.1f} GiB; the band for 8 GiB: components to shell "
          f"{refit_bands(counts, 17, 8 * 2**30)} of {len(counts) - 1}")
    z = torch.randn(args.images, 8)
    t0 = time.perf_counter()
    summary = decoder.refit(lambda: slices(decoder, z, args.box), z, final=False)
    seconds = time.perf_counter() - t0
    shown = {key: value for key, value in summary.items() if key != "fsc_half"}
    print(f"refit: {shown}; {seconds:.0f} s; process peak {peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()
