#!/usr/bin/env python
"""Benchmark: does a decoder learn a part of the molecule that only a minority of the particles carry?

Compositional heterogeneity (a subunit bound in some particles) is what a heterogeneity tool must not
lose.  A real-space decoder that skips empty cells (CryoFormer's occupancy grid) risks exactly that: the
part is weak in the early, latent-free map (its density times its population), so a threshold prunes
it, and a pruned cell gets no gradient.

Data: two classes at ``--box`` (32) px: A, a state of the built-in hinge; B, the same plus a Gaussian
blob (sigma 1.5 px, peak 0.8 of A's maximum, ~13% of its mass) placed at least ``--gap`` (7) px from
A's density (voxels above 5% of its maximum), inside the rendered sphere; B carries ``--population``
(0.15) of ``--n-images`` (2000) images, SNR ``--snr`` (1), known poses.

Runs (``--epochs`` 6, zdim 1, beta 0.05, the demo's CPU-sized CryoFormer): the voxel basis (the
teacher); CryoFormer with its encoder started from the basis (``--init-encoder``, the README's advice
for heterogeneous runs) and its default occupancy grid (the consensus prior kept); the same with
``occupancy_keep_prior=false``; with ``occupancy=false``; and the default without the teacher.

Figures per run: the blob's peak (within 2 px of its centre) over the map's peak, in the map at the
mean latent of class A's images and of class B's (truth: 0 and 0.8); the latent's class separation
``|mean_B - mean_A| / sd``; for CryoFormer whether the final occupancy grid holds the blob's centre.

Usage::

    .venv/bin/python bench/minority_part.py
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cryoscape_command, machine_name, print_figure, print_note, run_timed, simulate_dataset  # noqa: E402

CPU_SIZED = ["n_levels=8", "log2_table_size=14", "base_resolution=4", "n_queries=16", "query_dim=32", "n_blocks=2"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench/minority"))
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--population", type=float, default=0.15)
    p.add_argument("--gap", type=float, default=7.0, help="least distance (px) of the blob's centre from A")
    p.add_argument("--snr", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=6)
    return p.parse_args(argv)


def class_maps(workdir: Path, box: int, gap: float) -> tuple[Path, Path, np.ndarray]:
    """Write A.mrc (a hinge state) and B.mrc (A + the blob); return their paths and the blob's centre
    ``(x, y, z)`` in pixels from the box centre."""
    import mrcfile
    from scipy import ndimage

    hinge, _ = simulate_dataset(workdir / "hinge_states", box_size=box, n_images=40, snr=1.0, heterogeneity="hinge")
    files = sorted((hinge / "gt_volumes").glob("vol_*.mrc"))
    with mrcfile.open(files[len(files) // 2]) as m:
        base, pixel = m.data.astype(np.float32), float(m.voxel_size.x)
    ax = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(ax, ax, ax, indexing="ij")
    distance = ndimage.distance_transform_edt(~(base > 0.05 * base.max()))
    radius = np.sqrt(xx ** 2 + yy ** 2 + zz ** 2)
    candidates = (distance >= gap) & (radius <= 0.35 * box)
    if not candidates.any():
        raise SystemExit(f"no place for the blob {gap} px from the molecule inside 0.35 of the box")
    z, y, x = np.argwhere(candidates)[np.argmin(radius[candidates])] - box // 2
    blob = np.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / (2 * 1.5 ** 2))
    blob *= 0.8 * base.max()
    print_note(f"blob at (x, y, z) = ({x}, {y}, {z}) px, {distance[z + box // 2, y + box // 2, x + box // 2]:.1f} "
               f"px from the molecule; its mass / the molecule's {blob.sum() / base.sum():.3f}")
    paths = []
    for name, volume in (("A", base), ("B", base + blob)):
        paths.append(workdir / f"{name}.mrc")
        with mrcfile.new(paths[-1], overwrite=True) as m:
            m.set_data(volume.astype(np.float32))
            m.voxel_size = pixel
    return paths[0], paths[1], np.array([x, y, z], dtype=np.float32)


def runs(data: Path, out: Path, epochs: int) -> dict[str, list[str]]:
    common = [*cryoscape_command(), "train", str(data / "particles.star"), "--zdim", "1", "-n", str(epochs),
              "--beta", "0.05", "--enc-layers", "2", "--enc-dim", "128", "--no-progress"]
    cf = [*common, "--decoder", "cryoformer", *[x for kv in CPU_SIZED for x in ("--decoder-opt", kv)]]
    taught = [*cf, "--init-encoder", str(out / "basis")]
    return {
        "basis": [*common, "--decoder", "basis", "-o", str(out / "basis")],
        "cryoformer": [*taught, "-o", str(out / "cryoformer")],
        "cryoformer_prior_not_kept": [*taught, "--decoder-opt", "occupancy_keep_prior=false",
                                      "-o", str(out / "cryoformer_prior_not_kept")],
        "cryoformer_no_grid": [*taught, "--decoder-opt", "occupancy=false", "-o", str(out / "cryoformer_no_grid")],
        "cryoformer_untaught": [*cf, "--teacher-epochs", "0", "-o", str(out / "cryoformer_untaught")],
    }


def score(run_dir: Path, states: np.ndarray, centre: np.ndarray, box: int) -> dict[str, float]:
    """Blob peak over map peak at each class's mean latent, the latent's separation, the grid's verdict."""
    import torch

    from cryoscape.models.cryoformer import CryoFormer
    from cryoscape.train.volumes import load_trained_model

    decoder, _, _ = load_trained_model(run_dir)
    epoch = max(int(p.name.split(".")[1]) for p in run_dir.glob("z.*.npy"))
    z = np.load(run_dir / f"z.{epoch}.npy")
    ax = np.arange(box) - box // 2
    zz, yy, xx = np.meshgrid(ax, ax, ax, indexing="ij")
    near = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (zz - centre[2]) ** 2 <= 4
    out = {}
    for label, state in (("A", 0), ("B", 1)):
        with torch.no_grad():
            volume = decoder.eval_volume(torch.tensor(z[states == state].mean(0), dtype=torch.float32)).numpy()
        out[f"blob/peak at class {label}'s latent"] = float(volume[near].max() / volume.max())
    out["latent separation"] = float(abs(z[states == 1].mean() - z[states == 0].mean()) / z.std())
    if isinstance(decoder, CryoFormer) and decoder.occupancy is not None:
        out["final grid holds the blob"] = float(bool(decoder.occupancy.contains(torch.tensor(centre)[None])))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print_note(f"{machine_name()}; train's default precision")
    a, b, centre = class_maps(args.workdir, args.box, args.gap)
    data = args.workdir / f"data_p{args.population:g}"
    shutil.rmtree(data, ignore_errors=True)
    run_timed([*cryoscape_command(), "simulate", "-o", str(data), "-n", str(args.n_images), "-D", str(args.box),
               "--snr", str(args.snr), "--classes", str(a), str(b), "--populations", str(1 - args.population),
               str(args.population), "--seed", "0"], log_path=args.workdir / "simulate.log")
    states = np.load(data / "ground_truth.npz")["state_index"]
    out = args.workdir / f"runs_p{args.population:g}"
    for name, command in runs(data, out, args.epochs).items():
        shutil.rmtree(out / name, ignore_errors=True)
        print_note(f"{name}: {' '.join(command)}")
        run_timed(command, log_path=out / f"{name}.log")
        for figure, value in score(out / name, states, centre, args.box).items():
            print_figure(f"{name} {figure}", value, fmt=".3f")
    return 0


if __name__ == "__main__":
    sys.exit(main())
