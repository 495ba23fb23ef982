"""``cryoscape postprocess``: solvent mask, mask-corrected FSC, Guinier B-factor, sharpened map."""

from __future__ import annotations

import argparse

HELP = "Mask, mask-corrected gold-standard FSC (phase randomisation), Guinier B-factor and sharpening of two half-maps."
EXAMPLE = "cryoscape postprocess refine/half1.mrc refine/half2.mrc -o post/  (or --mask mask.mrc, --b-factor -80)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("half1", help="first half-map .mrc")
    parser.add_argument("half2", help="second half-map .mrc")
    parser.add_argument("-o", "--outdir", required=True,
                        help="output folder (postprocess.mrc, mask.mrc, fsc.txt, fsc.png, postprocess.yaml)")
    parser.add_argument("--mask", help="solvent mask .mrc (default: made from the map)")
    parser.add_argument("--mask-threshold", type=float, help="density threshold of the mask (default: half the max)")
    parser.add_argument("--mask-lowpass", type=float, default=15.0, metavar="ANGSTROM",
                        help="low-pass before thresholding (default 15)")
    parser.add_argument("--mask-dilate", type=float, default=3.0, metavar="PIXELS", help="dilation (default 3)")
    parser.add_argument("--mask-edge", type=float, default=6.0, metavar="PIXELS", help="soft edge width (default 6)")
    parser.add_argument("--b-factor", type=float, metavar="A2",
                        help="B-factor to undo (default: estimated from the Guinier plot)")
    parser.add_argument("--guinier-low", type=float, default=10.0, metavar="ANGSTROM",
                        help="lowest resolution of the Guinier fit (default 10)")
    parser.add_argument("--pixel-size", type=float, metavar="ANGSTROM", help="override the maps' pixel size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phase randomisation")


def run(args: argparse.Namespace) -> int:
    import torch

    from cryoscape.errors import InputError
    from cryoscape.io.mrc import read_mrc
    from cryoscape.io.run_folder import detach_log_file, prepare_run_folder
    from cryoscape.reconstruct.postprocess import postprocess, solvent_mask, write_postprocess

    (h1, pixel), (h2, _) = read_mrc(args.half1), read_mrc(args.half2)
    if h1.shape != h2.shape or h1.ndim != 3:
        raise InputError(f"{args.half2} has shape {h2.shape} but {args.half1} has {h1.shape}; pass two half-maps "
                         "of one refinement.")
    pixel = args.pixel_size or pixel
    if not pixel or pixel <= 0:
        raise InputError(f"{args.half1} gives no pixel size; pass --pixel-size in angstroms.")
    half1, half2 = torch.as_tensor(h1.copy()).float(), torch.as_tensor(h2.copy()).float()
    out, handler = prepare_run_folder(args.outdir, "postprocess", vars(args))
    try:
        if args.mask:
            mask = torch.as_tensor(read_mrc(args.mask)[0].copy()).float()
            if mask.shape != half1.shape:
                raise InputError(f"{args.mask} has shape {tuple(mask.shape)}, not the maps' {tuple(half1.shape)}; "
                                 "pass a mask of the same box.")
        else:
            mask = solvent_mask(0.5 * (half1 + half2), pixel, threshold=args.mask_threshold,
                                lowpass_angstrom=args.mask_lowpass, dilate_pixel=args.mask_dilate,
                                edge_width_pixel=args.mask_edge)
        result = postprocess(half1, half2, pixel, mask=mask, b_factor_angstrom2=args.b_factor,
                             guinier_low_angstrom=args.guinier_low, seed=args.seed)
        summary = write_postprocess(out, result, pixel)
        print(f"resolution {summary['resolution_angstrom']:.2f} A (mask-corrected FSC 0.143), "
              f"B-factor {summary['b_factor_angstrom2']:.1f} A^2; wrote {out}/postprocess.mrc")
    finally:
        detach_log_file(handler)
    return 0
