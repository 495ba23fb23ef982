"""Benchmark: Cryofold (``--decoder atomic``) vs our neural field vs cryoDRGN 4.3.1 on a 1-D atomic motion.

Data: ``cryoscape simulate --molecule tests/data/1A8O.pdb --bond-rotation-deg 0 60`` (the CA-C
bond of the middle residue of 1A8O turned over 20 states, C-alphas move 7.0 A RMS end to end),
D = 40, 1.5 A pixels, SNR 0.1, true poses and CTF (poses.pkl, ctf.pkl) for every tool, zdim 1,
the same epochs and batch (8) for all; encoders and decoders 256 x 3 (Cryofold's offset MLP too).
Cryofold runs with its defaults, so its last half of epochs take each image's latent from a search
against the model (train/latent_search.py; ``--cryofold-args '--latent-search-epochs 0'`` turns it off)
and the local-geometry restraint holds the chain's shape (``--cryofold-args '--decoder-opt
local_strength=0'`` leaves the thesis's restraints alone).
``--tools cryofold -n 5000`` measures Cryofold alone on a larger set (no ratios).

Figures (one per line):

* per-image FSC AUC over the **moving region** for each tool: for 100 images evenly spaced in the
  particle order, the map at the image's latent (``cryoscape volumes`` / ``cryodrgn eval_vol``)
  and the true map of its state, both multiplied by a mask of the voxels within 5 A of any
  moving centre (C-alpha or side-chain centroid of a residue whose C-alpha moves more than 1 A)
  in any state; AUC = mean |FSC| over shells 1..D/2;
* Cryofold's C-alpha RMSE per state (its model at the median latent of each state's images,
  against the state's true C-alphas) and % within 3 A;
* training images per second of each tool (the sum of its per-epoch training times), and the
  ratios against cryoDRGN last.

Run (under the shared lock; about 10-15 minutes on 2 cores)::

    flock /tmp/cryoscape-heavy.lock .venv/bin/python bench/atomic.py | tee bench/results/atomic_DATE.txt
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    cryoscape_command, ensure_cryodrgn, machine_name, print_figure, print_note, run_timed, thread_env, tool_version,
)
from train import decode_maps, last_latents, training_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PDB = ROOT / "tests" / "data" / "1A8O.pdb"
ATOMIC, NF, DRGN = "cryofold", "neural_field", "cryodrgn"
ARCH = ["--enc-layers", "3", "--enc-dim", "256", "--dec-layers", "3", "--dec-dim", "256"]
CRYOFOLD_OPTIONS = ["--lr", "5e-4", "--decoder-opt", "centre_lr_scale=40", "--decoder-opt", "global_lr_scale=20"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/cryoscape-bench-atomic"))
    p.add_argument("-n", "--n-images", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--beta", type=float, default=0.1, help="KL weight of every VAE [0.1]")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--fsc-images", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cryodrgn", default="/tmp/venv-cryodrgn", help="cryodrgn executable or its venv")
    p.add_argument("--cryofold-args", default="", metavar="ARGS",
                   help="more `cryoscape train` options for Cryofold's run, one string (e.g. '--latent-search-epochs 0')")
    p.add_argument("--tools", nargs="+", choices=(ATOMIC, NF, DRGN), default=[ATOMIC, NF, DRGN],
                   help="the tools to train (default all three; e.g. --tools cryofold for Cryofold's C-alpha RMSE on a "
                        "larger data set without the peers' runs; the ratios need cryodrgn)")
    p.add_argument("--reuse-cryodrgn", action="store_true",
                   help="keep cryoDRGN's finished run in --workdir (same data set, same epochs) instead of training it "
                        "again; its training time is read from its log of that run, and the output says so")
    return p.parse_args(argv)


def simulate(args, env) -> Path:
    data = args.workdir / f"sim_1a8o_n{args.n_images}"
    if not (data / "gt_atomic.npz").exists():
        run_timed([*cryoscape_command(), "simulate", "--molecule", str(PDB), "--bond-rotation-deg", "0", "60",
                   "-n", str(args.n_images), "-D", "40", "--pixel-size", "1.5", "--snr", str(args.snr),
                   "-o", str(data)], log_path=args.workdir / "simulate.log", env=env)
    return data


def commands(args, data: Path, exe: Path) -> dict[str, list[str]]:
    """The three trainings: same particles, poses, CTF, zdim, epochs, batch, beta."""
    runs = args.workdir / "runs"
    common = ["--poses", str(data / "poses.pkl"), "--ctf", str(data / "ctf.pkl"), "--zdim", "1",
              "-n", str(args.epochs), "-b", "8", "--beta", str(args.beta)]
    ours = [*cryoscape_command(), "train", str(data / "particles.mrcs"), *common, *ARCH, "--no-progress", "--no-amp"]
    return {
        ATOMIC: [*ours, "-o", str(runs / ATOMIC), "--decoder", "atomic", "--reference", str(PDB), *CRYOFOLD_OPTIONS,
                 *shlex.split(args.cryofold_args)],
        NF: [*ours, "-o", str(runs / NF), "--decoder", "neural_field"],
        DRGN: [str(exe), "train_vae", str(data / "particles.mrcs"), *common, *ARCH, "-o", str(runs / DRGN),
               "--seed", "0", "--no-analysis"],
    }


def moving_mask(data: Path, box: int, pixel: float) -> np.ndarray:
    """Voxels within 5 A of a moving centre in any state (module docstring)."""
    gt = np.load(data / "gt_atomic.npz")
    ca, side = gt["ca_angstrom"], gt["sidechain_angstrom"]
    moving = np.linalg.norm(ca[-1] - ca[0], axis=-1) > 1.0
    points = np.concatenate([ca[:, moving], side[:, moving]], axis=1).reshape(-1, 3) / pixel + box // 2
    idx = np.arange(box)
    grid = np.stack(np.meshgrid(idx, idx, idx, indexing="ij"), -1).reshape(-1, 3)[:, ::-1]  # (x, y, z) of [z, y, x]
    from scipy.spatial import cKDTree

    near = cKDTree(points).query(grid, distance_upper_bound=5.0 / pixel)[0] < np.inf
    return near.reshape(box, box, box).astype(np.float32)


def masked_auc(paths: list[Path], states: np.ndarray, data: Path, mask: np.ndarray) -> np.ndarray:
    from cryoscape.analysis.evaluate import load_ground_truth, per_image_fsc
    from cryoscape.io.mrc import read_mrc

    gt = load_ground_truth(data)
    maps = [read_mrc(p)[0] * mask for p in paths]
    truths = [gt.volume(s) * mask for s in states]
    return per_image_fsc(maps, truths, truth_box_pixel=(gt.box_size, gt.pixel_size_angstrom)).auc


def cryofold_rmse(run: Path, data: Path) -> dict:
    from cryoscape.analysis.atomic import atomic_metrics_along_path, median_latent_per_state
    from cryoscape.train.volumes import load_trained_model

    decoder, _, _ = load_trained_model(run)
    _, z = last_latents(run, ATOMIC)
    gt = np.load(data / "gt_atomic.npz")
    states = np.load(data / "ground_truth.npz")["state_index"]
    return atomic_metrics_along_path(decoder, median_latent_per_state(z, states, len(gt["ca_angstrom"])),
                                     gt["ca_angstrom"])


def run_tool(args, tool: str, command: list[str], exe, data: Path, positions, states, mask, env) -> tuple[float, np.ndarray]:
    """Train one tool (or, for cryoDRGN with ``--reuse-cryodrgn``, keep its finished run), decode the
    maps at the images' latents and print its masked AUC and speed: ``(images/s, AUC per image)``."""
    run_dir = Path(command[command.index("-o") + 1])
    log = args.workdir / f"{tool}.log"
    kind = DRGN if tool == DRGN else tool
    n = len(np.load(data / "ground_truth.npz")["state_index"])
    if tool == DRGN and args.reuse_cryodrgn and (run_dir / f"z.{args.epochs}.pkl").exists() and log.exists():
        print_note(f"{tool}: the finished run in {run_dir} is reused (not trained again): same particles "
                   f"(sha256 {file_sha256(data / 'particles.mrcs')[:16]}), poses, CTF and epochs; its images/s is "
                   f"from its own log ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(log.stat().st_mtime))})")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a run folder left by an earlier run would add its epochs' times
        result = run_timed(command, log_path=log, env=env)
        print_note(f"{tool} wall {result.wall_s:.0f} s")
    seconds = training_seconds(run_dir, log, kind)
    speed = args.epochs * n / seconds if seconds else float("nan")
    epoch, z = last_latents(run_dir, kind)
    paths, _ = decode_maps(kind, exe, run_dir, epoch, z[positions], args.workdir / f"maps_{tool}", box=mask.shape[0],
                           train_box=mask.shape[0], env=env)
    auc = masked_auc(paths, states, data, mask)
    print_figure(f"{tool}: masked per-image FSC AUC (mean of {len(positions)})", float(auc.mean()), fmt=".3f")
    print_figure(f"{tool}: training images/s", speed, fmt=".0f")
    return speed, auc


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = thread_env(args.threads)
    exe = ensure_cryodrgn(args.cryodrgn) if DRGN in args.tools else Path(args.cryodrgn)
    print_note(machine_name() + f", {args.threads} threads, float32 throughout (--no-amp; cryoDRGN's CPU default is float32)")
    print_note(f"cryoscape: {tool_version(cryoscape_command(), env)}"
               + (f"; cryodrgn: {tool_version([exe], env)}" if DRGN in args.tools else ""))
    data = simulate(args, env)
    truth = np.load(data / "ground_truth.npz")
    n, box, pixel = len(truth["state_index"]), int(truth["box_size"]), float(truth["pixel_size_angstrom"])
    print_note(f"1A8O bond rotation 0-60 deg, 20 states, {n} images, D={box}, {pixel} A/pixel, SNR {args.snr}, "
               f"zdim 1, {args.epochs} epochs, batch 8, beta {args.beta}")
    from cryoscape.analysis.evaluate import evenly_spaced_indices

    positions = evenly_spaced_indices(n, args.fsc_images)
    states = truth["state_index"][positions]
    mask = moving_mask(data, box, pixel)
    print_note(f"moving-region mask: {int(mask.sum())} voxels of {box ** 3}")
    speed, auc = {}, {}
    runs = commands(args, data, exe)
    for tool, command in runs.items():
        if tool in args.tools:
            speed[tool], auc[tool] = run_tool(args, tool, command, exe, data, positions, states, mask, env)
    if ATOMIC in args.tools:
        print_cryofold_rmse(cryofold_rmse(Path(runs[ATOMIC][runs[ATOMIC].index("-o") + 1]), data))
    if DRGN not in args.tools:
        return 0
    for tool in (t for t in (ATOMIC, NF) if t in args.tools):
        print_figure(f"masked AUC ratio {tool}/cryodrgn", float(auc[tool].mean() / auc[DRGN].mean()), fmt=".3f")
    for tool in (t for t in (ATOMIC, NF) if t in args.tools):
        print_figure(f"speed ratio (training images/s) {tool}/cryodrgn", speed[tool] / speed[DRGN], fmt=".2f")
    return 0


def print_cryofold_rmse(rmse: dict) -> None:
    print_figure("cryofold: C-alpha RMSE per state (A)", " ".join(f"{v:.2f}" for v in rmse["ca_rmse_angstrom"]))
    print_figure("cryofold: C-alpha RMSE mean over states", rmse["mean_ca_rmse_angstrom"], "A")
    print_figure("cryofold: C-alpha RMSE max over states", rmse["max_ca_rmse_angstrom"], "A")
    print_figure("cryofold: % C-alphas within 3 A (mean over states)", rmse["mean_percent_within"], "%", fmt=".1f")


if __name__ == "__main__":
    raise SystemExit(main())
