"""``cryoscape fsc``: Fourier shell correlation between two maps."""

from __future__ import annotations

import argparse

HELP = "Compute the FSC curve between two maps (optionally masked), write it as text and a plot."
EXAMPLE = "cryoscape fsc half1.mrc half2.mrc --mask mask.mrc -o fsc.txt --plot fsc.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map1", help="first map (.mrc)")
    parser.add_argument("map2", help="second map (.mrc), same box")
    mask = parser.add_mutually_exclusive_group()
    mask.add_argument("--mask", help="mask .mrc multiplied into both maps")
    mask.add_argument("--auto-mask", action="store_true",
                      help="threshold at half the 99.99th percentile of map1+map2, dilate 3 px, 6 px soft edge (thesis 4.4.4)")
    parser.add_argument("--pixel-size", type=float, help="pixel size in angstrom (default: from map1's header)")
    parser.add_argument("-o", "--output", help="write the curve as text here")
    parser.add_argument("--plot", help="write a plot (.png/.pdf) here")


def run(args: argparse.Namespace) -> int:
    import torch

    from cryoscape.errors import InputError
    from cryoscape.fourier.fsc import fourier_shell_correlation, frequency_to_angstrom, plot_fsc, resolution_at_threshold, write_fsc_txt
    from cryoscape.fourier.masks import threshold_mask
    from cryoscape.io.mrc import read_mrc

    v1, pixel = read_mrc(args.map1)
    v2, _ = read_mrc(args.map2)
    if v1.shape != v2.shape or v1.ndim != 3:
        raise InputError(
            f"{args.map1} has shape {v1.shape} but {args.map2} has shape {v2.shape}; "
            "resample one with `cryoscape downsample --volume` so both are the same cubic box."
        )
    pixel = args.pixel_size or (pixel if pixel > 0 else None)
    a, b = torch.as_tensor(v1, dtype=torch.float64), torch.as_tensor(v2, dtype=torch.float64)
    mask = None
    if args.mask:
        m, _ = read_mrc(args.mask)
        if m.shape != v1.shape:
            raise InputError(f"{args.mask} has shape {m.shape} but the maps are {v1.shape}; pass a mask of the same box.")
        mask = torch.as_tensor(m, dtype=torch.float64)
    elif args.auto_mask:
        mask = threshold_mask(a + b)
    freqs, curve = fourier_shell_correlation(a, b, mask=mask)
    for t in (0.5, 0.143):
        f = resolution_at_threshold(freqs, curve, t)
        extra = f" = {frequency_to_angstrom(f, pixel):.2f} A" if pixel else ""
        print(f"FSC={t}: {f:.4f} 1/pixel{extra}")
    if args.output:
        write_fsc_txt(args.output, freqs, curve, pixel)
    if args.plot:
        plot_fsc(freqs, {f"{args.map1} vs {args.map2}": curve}, args.plot, pixel_size_angstrom=pixel)
    return 0
