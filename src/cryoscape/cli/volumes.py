"""``cryoscape volumes``: decode maps from a trained run at given latents."""

from __future__ import annotations

import argparse

HELP = "Write the maps of a trained run (one per latent; one map for a homogeneous run)."
EXAMPLE = "cryoscape volumes run/ --z z_values.txt -o maps/   (or: --z-values 0.5 -1.2 --epoch 19 --box-size 64)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cryoscape.cli.common import add_map_arguments

    parser.add_argument("run", help="the output folder of cryoscape train (or one of its .pt files)")
    parser.add_argument("-o", "--outdir", required=True, help="output folder (vol_000.mrc, ...)")
    parser.add_argument("--epoch", type=int, default=None, help="saved epoch to use (default: the latest)")
    zs = parser.add_mutually_exclusive_group()
    zs.add_argument("--z", dest="z_file", help="latents: .txt (one per line), .npy or .pkl (N x zdim)")
    zs.add_argument("--z-values", type=float, nargs="+", help="latents as numbers, zdim per map")
    add_map_arguments(parser, amp=False)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from cryoscape.cli.common import map_options
    from cryoscape.train.volumes import decode_volumes, load_trained_model, read_latents

    decoder, _, _ = load_trained_model(args.run, epoch=args.epoch, device="cpu")
    z = read_latents(args.z_file, args.z_values, zdim=decoder.zdim) if decoder.zdim > 0 else None
    paths = decode_volumes(
        args.run,
        z,
        args.outdir,
        epoch=args.epoch,
        **map_options(args),
        progress=not args.no_progress,
    )
    print(f"wrote {len(paths)} map(s) to {args.outdir}")
    return 0
