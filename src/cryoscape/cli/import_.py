"""``cryoscape import``: convert particle metadata between RELION, cryoSPARC and cryoDRGN formats."""

from __future__ import annotations

import argparse

HELP = "Convert particles (.star, .cs, .txt, .mrcs + poses.pkl/ctf.pkl) to .star, .cs, poses.pkl or ctf.pkl."
EXAMPLE = "cryoscape import particles.cs --datadir project/ --out-star particles.star --out-poses poses.pkl --out-ctf ctf.pkl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="input: RELION .star, cryoSPARC .cs, .txt list of stacks, or one .mrcs stack")
    parser.add_argument("--datadir", help="folder holding the image stacks (tried first for relative paths)")
    parser.add_argument("--poses", help="cryoDRGN poses.pkl supplying or replacing the poses")
    parser.add_argument("--ctf", help="cryoDRGN ctf.pkl supplying or replacing the CTF parameters")
    parser.add_argument("--pixel-size", type=float, help="pixel size in angstroms, overriding the input's")
    parser.add_argument("--ind", help="write only these particles: 0-based indices in .pkl, .npy or .txt")
    parser.add_argument("--no-stack-check", action="store_true",
                        help="do not open the stacks (metadata-only conversion of .star/.cs)")
    parser.add_argument("--out-star", help="write a RELION 3.1 STAR file (image names kept as the input had them)")
    parser.add_argument("--absolute-paths", action="store_true",
                        help="write rlnImageName with absolute stack paths instead of the input's names")
    parser.add_argument("--amp-contrast", type=float, default=0.1,
                        help="amplitude contrast for a .star without rlnAmplitudeContrast (RELION 3.0 exports) [0.1]")
    parser.add_argument("--out-cs", help="write a cryoSPARC .cs file")
    parser.add_argument("--out-poses", help="write a cryoDRGN poses.pkl")
    parser.add_argument("--out-ctf", help="write a cryoDRGN ctf.pkl")


def run(args: argparse.Namespace) -> int:
    from cryoscape.errors import InputError
    from cryoscape.io.particles import load_indices, load_particles
    from cryoscape.io.writers import write_particles

    outputs = (args.out_star, args.out_cs, args.out_poses, args.out_ctf)
    if all(o is None for o in outputs):
        raise InputError("cryoscape import was given no output; pass --out-star, --out-cs, --out-poses or --out-ctf.")
    table = load_particles(
        args.particles,
        datadir=args.datadir,
        poses_path=args.poses,
        ctf_path=args.ctf,
        pixel_size_angstrom=args.pixel_size,
        check_stacks=not args.no_stack_check,
        amplitude_contrast=args.amp_contrast,
    )
    indices = None if args.ind is None else load_indices(args.ind, n_particles=len(table))
    written = write_particles(
        table,
        star_path=args.out_star,
        cs_path=args.out_cs,
        poses_path=args.out_poses,
        ctf_path=args.out_ctf,
        indices=indices,
        image_names="absolute" if args.absolute_paths else "keep",
    )
    n = len(table) if indices is None else len(indices)
    for kind, path in written.items():
        print(f"wrote {n} particles to {path} ({kind})")
    return 0
