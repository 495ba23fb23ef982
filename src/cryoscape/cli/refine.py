"""``cryoscape refine``: 3-D auto-refinement (EM over poses, gold-standard half-sets, MAP prior)."""

from __future__ import annotations

import argparse

from cryoscape.cli.common import add_particle_arguments

HELP = "Refine poses and a map by expectation-maximisation with gold-standard half-sets (RELION's 3D auto-refine)."
EXAMPLE = "cryoscape refine particles.star --initial-map init.mrc -o refine/  (add --resume to continue)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="particles: .star, .cs, .txt stack list or .mrcs stack")
    parser.add_argument("--initial-map", required=True,
                        help="initial map .mrc (same box as the particles), or an abinit run folder (its last map)")
    parser.add_argument("-o", "--outdir", required=True,
                        help="output folder (map.mrc, half1/2.mrc, fsc.txt, particles.star, poses.pkl, iterations.tsv)")
    add_particle_arguments(parser, poses_help="cryoDRGN poses.pkl (its shifts centre the first search)")
    parser.add_argument("--ini-high", type=float, default=40.0, metavar="ANGSTROM",
                        help="low-pass the initial map to this resolution (default 40, RELION's --ini_high)")
    parser.add_argument("--tau2-fudge", type=float, default=1.0, help="regularisation parameter T (default 1)")
    parser.add_argument("--max-iterations", type=int, default=20, help="default 20")
    parser.add_argument("--max-level", type=int, default=5,
                        help="finest SO(3) grid level (3 = 3.75, 4 = 1.9, 5 = 0.94 degrees; default 5)")
    parser.add_argument("--local-window-level", type=int, default=3,
                        help="local searches cover one step of this grid level around each pose (3 = 3.75 degrees)")
    parser.add_argument("--pose-change-tolerance", type=float, metavar="DEGREES",
                        help="the run ends only once the median pose change is below this (default: the grid spacing)")
    parser.add_argument("--no-solvent-mask", action="store_true",
                        help="do not mask the references with a solvent mask made from the last map")
    parser.add_argument("--final-poses-from", choices=["joined", "half"], default="joined",
                        help="reference of the final pose pass: the joined map (default; the better poses) "
                             "or each half-set's own half-map (the two half-sets' written poses stay independent)")
    parser.add_argument("--offset-range", type=float, default=3.0, metavar="PIXELS", help="shift search range (default 3)")
    parser.add_argument("--offset-step", type=float, default=1.0, metavar="PIXELS", help="shift step (default 1)")
    parser.add_argument("--no-ctf", action="store_true", help="ignore the CTF")
    parser.add_argument("--uninvert-data", action="store_true", help="do not negate the images")
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the half-set split")
    parser.add_argument("--sym", default="C1",
                        help="point group: C1 (none), Cn, Dn, T, O, I (= I2), I1-I4, RELION's conventions")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")


def run(args: argparse.Namespace) -> int:
    from cryoscape.classical.refine import RefineSettings
    from cryoscape.classical.runs import refine_particles
    from cryoscape.cli.common import load_table_from_args
    from cryoscape.io.run_folder import detach_log_file, prepare_run_folder

    from cryoscape.errors import InputError
    from cryoscape.geometry.symmetry import parse_symmetry

    try:
        parse_symmetry(args.sym)
    except ValueError as err:
        raise InputError(f"--sym: {err}.") from None
    out, handler = prepare_run_folder(args.outdir, "refine", vars(args))
    try:
        table = load_table_from_args(args)
        settings = RefineSettings(
            initial_lowpass_angstrom=args.ini_high, tau2_fudge=args.tau2_fudge, max_iterations=args.max_iterations,
            max_level=args.max_level, offset_range_pixel=args.offset_range, offset_step_pixel=args.offset_step,
            batch_size=args.batch_size, seed=args.seed, symmetry=args.sym, local_window_level=args.local_window_level,
            pose_change_tolerance_deg=args.pose_change_tolerance, auto_mask=not args.no_solvent_mask,
            final_pose_reference=args.final_poses_from,
        )
        refine_particles(table, args.initial_map, out, settings, resume=args.resume, use_ctf=not args.no_ctf,
                         invert_contrast=not args.uninvert_data)
    finally:
        detach_log_file(handler)
    return 0
