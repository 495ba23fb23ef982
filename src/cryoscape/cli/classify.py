"""``cryoscape classify``: 3-D classification by EM (RELION's --K), with or without alignment."""

from __future__ import annotations

import argparse

from cryoscape.cli.common import add_particle_arguments

HELP = "Classify particles into K 3-D classes by EM (class x pose posteriors), with --no-align or local alignment."
EXAMPLE = "cryoscape classify refine/particles.star -K 4 --initial-map refine/map.mrc -o classes/ --no-align"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="particles with poses: .star, .cs, or .mrcs with --poses")
    parser.add_argument("-K", "--n-classes", type=int, default=4, help="number of classes (default 4)")
    parser.add_argument("--initial-map", required=True,
                        help="consensus map .mrc (same box as the particles), or an abinit run folder (its last map)")
    parser.add_argument("-o", "--outdir", required=True,
                        help="output folder (classNNN.mrc/.star, particles.star, model.tsv, iterations.tsv)")
    add_particle_arguments(parser)
    parser.add_argument("--no-align", action="store_true",
                        help="keep the input poses, sample classes only (RELION's --skip_align)")
    parser.add_argument("--global-align", action="store_true",
                        help="search all orientations (coarse grid, then refined to --level) instead of locally "
                             "around the input poses")
    parser.add_argument("--level", type=int, default=3,
                        help="SO(3) grid level of the local search with alignment (3 = 3.75 degrees)")
    parser.add_argument("--tau2-fudge", type=float, default=None,
                        help="regularisation parameter T (default 16 with --no-align, else RELION's 4)")
    parser.add_argument("--ini-high", type=float, default=40.0, metavar="ANGSTROM",
                        help="low-pass of the consensus map (default 40)")
    parser.add_argument("--max-iterations", type=int, default=25, help="default 25")
    parser.add_argument("--highres-limit", type=float, default=12.0, metavar="ANGSTROM",
                        help="highest resolution the class/pose posteriors use (default 12; 0: Nyquist)")
    mask = parser.add_mutually_exclusive_group()
    mask.add_argument("--solvent-mask", dest="solvent_mask", action="store_true", default=None,
                      help="mask the class maps with a solvent mask of the consensus map in the E-step "
                           "(default: with alignment only)")
    mask.add_argument("--no-solvent-mask", dest="solvent_mask", action="store_false",
                      help="never mask the class maps")
    parser.add_argument("--no-ctf", action="store_true", help="ignore the CTF")
    parser.add_argument("--uninvert-data", action="store_true", help="do not negate the images")
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("--memory-gib", type=float, default=4.0,
                        help="with --no-align, hold the centred images and their insertion weights in memory up to "
                             "this size (default 4; 0: read every image from disk at every iteration)")
    parser.add_argument("--start", choices=("auto", "bisect", "random"), default="auto",
                        help="first assignment: repeated two-class splits (bisect) or the best of 3 random "
                             "starts (random); auto (default): bisect with --no-align, random with alignment")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random first assignment")
    parser.add_argument("--sym", default="C1",
                        help="point group: C1 (none), Cn, Dn, T, O, I (= I2), I1-I4, RELION's conventions")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def run(args: argparse.Namespace) -> int:
    from cryoscape.classical.classify import ClassifySettings
    from cryoscape.classical.runs import classify_particles
    from cryoscape.cli.common import load_table_from_args
    from cryoscape.errors import InputError
    from cryoscape.io.run_folder import detach_log_file, prepare_run_folder

    if args.no_align and args.global_align:
        raise InputError("--no-align and --global-align exclude each other; pass one of them.")
    if args.n_classes < 1:
        raise InputError(f"-K {args.n_classes} is not a number of classes; pass -K 1 or more.")
    from cryoscape.geometry.symmetry import parse_symmetry

    try:
        parse_symmetry(args.sym)
    except ValueError as err:
        raise InputError(f"--sym: {err}.") from None
    out, handler = prepare_run_folder(args.outdir, "classify", vars(args))
    try:
        table = load_table_from_args(args)
        settings = ClassifySettings(
            n_classes=args.n_classes, max_iterations=args.max_iterations, tau2_fudge=args.tau2_fudge,
            align=not args.no_align, global_align=args.global_align, level=args.level,
            initial_lowpass_angstrom=args.ini_high,
            highres_limit_angstrom=args.highres_limit or None,
            batch_size=args.batch_size, seed=args.seed, start=args.start, symmetry=args.sym,
            auto_mask=args.solvent_mask, image_memory_gib=args.memory_gib,
        )
        classify_particles(table, args.initial_map, out, settings, resume=args.resume, use_ctf=not args.no_ctf,
                           invert_contrast=not args.uninvert_data)
    finally:
        detach_log_file(handler)
    return 0
