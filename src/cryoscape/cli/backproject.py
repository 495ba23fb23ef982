"""``cryoscape backproject``: voxel reconstruction with known poses and CTF."""

from __future__ import annotations

import argparse

from cryoscape.cli.common import add_particle_arguments

HELP = "Reconstruct a voxel map, half-maps and their gold-standard FSC from particles with poses and CTF."
EXAMPLE = "cryoscape backproject particles.star -o bp/  (or: particles.mrcs --poses poses.pkl --ctf ctf.pkl)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="particles: .star, .cs, .txt stack list or .mrcs stack")
    parser.add_argument("-o", "--outdir", required=True, help="output folder (map.mrc, half1/2.mrc, fsc.txt, fsc.png)")
    add_particle_arguments(parser)
    parser.add_argument("--split", default="random",
                        help="half-sets: random (default), star (rlnRandomSubset / alignments3D/split), "
                             "or an index file listing half-set 1")
    parser.add_argument("--regularization", default="1",
                        help="a positive number r for a constant lambda = r * mean CTF^2 weight (default 1, as "
                             "cryoDRGN's --reg-weight), or 'fsc' for a per-shell Wiener filter from the half-map FSC")
    parser.add_argument("--oversampling", type=int, default=1, choices=(1, 2, 3),
                        help="Fourier grid oversampling: 1 is fast; 2 with --gridding-correction is exact for "
                             "noiseless data (4x the work, 8x the memory) [1]")
    parser.add_argument("--gridding-correction", action="store_true",
                        help="divide out the trilinear kernel's sinc^2 taper (exact amplitudes, but noise grows "
                             "towards the box edge)")
    parser.add_argument("--sphere-mask", type=float, default=0.45, metavar="FRACTION",
                        help="soft spherical mask radius as a fraction of the box (0.05 box cosine edge); 0 turns it off [0.45]")
    parser.add_argument("--no-ctf", action="store_true", help="ignore the CTF (images already corrected or simulated without)")
    parser.add_argument("--uninvert-data", action="store_true",
                        help="do not invert the contrast (by default images are negated, as extracted particles are white)")
    parser.add_argument("--mask", help="mask .mrc applied to the half-maps for the FSC")
    parser.add_argument("--sym", default="C1",
                        help="point group of the map: C1 (none), Cn, Dn, T, O, I (= I2), I1-I4, RELION's conventions")
    parser.add_argument("--expand-symmetry", metavar="STAR",
                        help="also write the symmetry-expanded particles (one row per particle and group element, "
                             "poses R g) to this .star, as relion_particle_symmetry_expand does")
    parser.add_argument("-b", "--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random half-set split")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from cryoscape.cli.common import load_table_from_args, resolve_device
    from cryoscape.io.mrc import read_mrc
    from cryoscape.io.run_folder import detach_log_file, prepare_run_folder
    from cryoscape.reconstruct.backproject import backproject_particles, write_backprojection

    from cryoscape.errors import InputError
    from cryoscape.geometry.symmetry import parse_symmetry

    try:
        parse_symmetry(args.sym)
    except ValueError as err:
        raise InputError(f"--sym: {err}.") from None
    out, handler = prepare_run_folder(args.outdir, "backproject", vars(args))
    try:
        table = load_table_from_args(args)
        regularization = args.regularization if args.regularization == "fsc" else float(args.regularization)
        mask = None
        if args.mask:
            mask = torch.as_tensor(read_mrc(args.mask)[0])
        device = resolve_device(args.device)
        result = backproject_particles(
            table,
            batch_size=args.batch_size,
            split=args.split,
            seed=args.seed,
            oversampling=args.oversampling,
            regularization=regularization,
            gridding_correction=args.gridding_correction,
            sphere_mask_radius_fraction=args.sphere_mask or None,
            use_ctf=not args.no_ctf,
            invert_contrast=not args.uninvert_data,
            fsc_mask=None if mask is None else mask.to(device),
            device=device,
            progress=not args.no_progress,
            symmetry=args.sym,
        )
        if args.expand_symmetry:
            from cryoscape.io.star import write_star
            from cryoscape.reconstruct.backproject import expand_symmetry

            write_star(args.expand_symmetry, expand_symmetry(table, args.sym))
        pixel = float(np.nanmedian(table.pixel_size_angstrom)) if np.isfinite(table.pixel_size_angstrom).any() else None
        write_backprojection(out, result, pixel_size_angstrom=pixel)
    finally:
        detach_log_file(handler)
    return 0
