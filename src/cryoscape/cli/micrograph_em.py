"""``cryoscape micrograph-em``: reconstruct from whole micrographs without picking (reconstruct/micrograph_em.py)."""

from __future__ import annotations

import argparse

HELP = "Reconstruct a map directly from micrographs by EM over patches (no particle picking), or pick-then-reconstruct."
EXAMPLE = ("cryoscape micrograph-em sim_mics/micrographs.star --initial-map init.mrc --box-size 64 -o mem "
           "--reference sim_mics/gt_volumes/vol_000.mrc")


def _stage(text: str):
    from cryoscape.reconstruct.micrograph_em import Stage

    parts = text.split(":")
    try:
        if len(parts) not in (3, 4):
            raise ValueError
        stage = Stage(int(parts[0]), int(parts[1]), int(parts[2]), float(parts[3]) if len(parts) == 4 else 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BOX:LEVEL:ITERATIONS[:FRACTION], e.g. 16:0:5:1") from None
    if stage.box_size < 4 or stage.so3_level < -1 or stage.iterations < 1 or not 0 < stage.fraction <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: box >= 4, level >= 0, iterations >= 1, 0 < fraction <= 1")
    return stage


def _keyword_or_number(keyword: str, keyword_value, cast, accept, meaning: str):
    """An argparse type: ``keyword`` (parsed as ``keyword_value``) or a number ``cast(text)`` that
    ``accept`` admits; anything else gets one sentence naming ``meaning``."""
    def parse(text: str):
        if text == keyword:
            return keyword_value
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} is neither {keyword!r} nor {meaning}")
        return value
    return parse


_coarse_box = _keyword_or_number("auto", None, int, lambda v: v >= 0, "a box size >= 0")
_regularization = _keyword_or_number("fsc", "fsc", float, lambda v: v > 0, "a positive number")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument("micrographs", help="micrographs .star with CTF (RELION CtfFind / CTFFIND output)")
    parser.add_argument("--initial-map", required=True, help="starting map (.mrc): a low-passed related structure, "
                        "a predicted model's map, or abinit/refine output; resampled to the micrographs' pixel size")
    parser.add_argument("--box-size", type=int, required=True, metavar="D", help="particle box (patch size) in pixels")
    parser.add_argument("-o", "--outdir", required=True, help="output folder")
    parser.add_argument("--datadir", default=None, help="folder holding the micrographs, if not next to the .star")
    parser.add_argument("--reference", default=None, help="map to report the FSC against each iteration (e.g. the truth)")
    parser.add_argument("--initial-lowpass-angstrom", type=float, default=None, help="low-pass the initial map first")
    parser.add_argument("--first", type=int, default=None, help="use only the first N micrographs")
    em = parser.add_argument_group("EM")
    em.add_argument("--iterations", type=int, default=20, help="iterations of the default schedule (default 20)")
    em.add_argument("--schedule", type=_stage, nargs="+", default=None, metavar="BOX:LEVEL:ITERS[:FRACTION]",
                    help="frequency-marching stages: box (downsampled patch size), SO(3) grid level (0: 30 deg, "
                         "1: 15 deg, -1: 60 deg), iterations, fraction of patches per iteration (default: D/4:0, D/2:0, D/2:1 "
                         "with 1/4, 1/4, 1/2 of --iterations and fractions 1, 0.5, 0.25)")
    em.add_argument("--rho0", type=float, default=0.5, help="initial probability that a patch is empty (default 0.5)")
    em.add_argument("--sigma", type=float, default=None,
                    help="noise standard deviation of the micrograph pixels (default: estimated each iteration)")
    em.add_argument("--regularization", type=_regularization, default=0.1,
                    help="fsc: gold-standard, even and odd micrographs summed apart and the map Wiener-filtered "
                         "by their FSC; or a Wiener constant relative to the mean Fourier weight (default 0.1)")
    em.add_argument("--independent-halves", action="store_true",
                    help="even and odd micrographs are aligned against their own half-map (RELION's gold standard), "
                         "so their FSC (logged; with --regularization fsc it filters the map) is not inflated by a "
                         "shared reference")
    em.add_argument("--grid", choices=("turned", "fixed"), default=None,
                    help="turned: the SO(3) grid is turned by a random rotation each iteration, so that its "
                         "quantisation errors average out over iterations instead of locking the map to the grid "
                         "(default for the EM); fixed: the same grid every iteration (default for --baseline pick, "
                         "where it measured better)")
    em.add_argument("--local-rotations", type=int, default=24, metavar="N",
                    help="stages at SO(3) level >= 1 score every patch on the level below first and then only the 8 "
                         "children of its N most probable rotations (default 24; 0: every rotation of the level)")
    em.add_argument("--coarse-box", type=_coarse_box, default=None, metavar="B",
                    help="stages of a box above B first score the patches on micrographs Fourier-cropped to box B "
                         "(a band-limited first pass): at SO(3) level 0 every rotation, then at the stage's box only "
                         "each patch's --coarse-pairs most probable rotation pairs and --coarse-sampled pairs drawn "
                         "from the others; at level 1 the parent level. auto (default): half the box of level-0 "
                         "stages of box >= 32, none elsewhere; 0: off (the exhaustive E-step)")
    em.add_argument("--coarse-pairs", type=int, default=16, metavar="P",
                    help="most probable rotation pairs per patch kept by the first pass at SO(3) level 0 (default 16 "
                         "of 288)")
    em.add_argument("--coarse-sampled", type=int, default=48, metavar="R",
                    help="rotation pairs per patch drawn uniformly from those the first pass did not keep, each "
                         "weighted for the pairs left out, so the posteriors stay unbiased (default 48; 0: only the "
                         "--coarse-pairs, which let low-SNR maps drift)")
    em.add_argument("--average", choices=("all", "window"), default="all",
                    help="all: the M-step sums are the mean over all the stage's iterations so far (a step of 1/t; "
                         "default); window: a running average over about 1/FRACTION iterations (the maps drifted "
                         "at low SNR)")
    em.add_argument("--reorient", action="store_true",
                    help="after each M-step turn the map by the small rotation that best aligns it with the previous "
                         "map (the rotational counterpart of the re-centring; off by default)")
    em.add_argument("--no-ctf", action="store_true", help="ignore the CTF (micrographs without CTF columns)")
    em.add_argument("--memory-gb", type=float, default=0.5, help="working memory of one E-step batch (default 0.5)")
    base = parser.add_argument_group("baseline")
    base.add_argument("--baseline", choices=("pick",), default=None,
                      help="pick: template matching with projections of the map, then backprojection with the "
                           "picked poses, repeated --iterations times (the comparison of bench/micrographs.py)")
    base.add_argument("--picks-per-micrograph", type=int, default=None,
                      help="picks kept per micrograph (default: peaks above --pick-threshold)")
    base.add_argument("--pick-threshold", type=float, default=4.0,
                      help="keep peaks this many robust standard deviations above the median score (default 4)")
    run_ = parser.add_argument_group("run")
    run_.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    run_.add_argument("--seed", type=int, default=0)
    run_.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda ...")
    run_.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Read the micrographs and maps, run the EM (or the picking baseline), write the outputs."""
    import numpy as np
    import torch

    from cryoscape.cli.common import resolve_device
    from cryoscape.errors import InputError
    from cryoscape.io.micrographs import read_micrographs_star
    from cryoscape.io.run_folder import detach_log_file, prepare_run_folder
    from cryoscape.reconstruct.micrograph_em import default_schedule, run_micrograph_em
    from cryoscape.reconstruct.micrograph_pick import run_pick_baseline
    from cryoscape.simulate.volumes import volume_from_map

    D = args.box_size
    if D < 8 or D % 2:
        raise InputError(f"--box-size {D} must be even and at least 8 (e.g. 64).")
    if not 0 < args.rho0 < 1:
        raise InputError(f"--rho0 {args.rho0} must lie strictly between 0 and 1.")
    table = read_micrographs_star(args.micrographs, datadir=args.datadir)
    if args.first is not None:
        table = table.subset(np.arange(min(args.first, len(table))))
    pixel = float(np.median(table.pixel_size_angstrom))
    initial = torch.from_numpy(volume_from_map(args.initial_map, box_size=D, pixel_size_angstrom=pixel)[0])
    if args.initial_lowpass_angstrom:
        from cryoscape.fourier.filters import lowpass_filter

        initial = lowpass_filter(initial, args.initial_lowpass_angstrom, pixel, ndim=3)
    reference = None
    if args.reference:
        reference = torch.from_numpy(volume_from_map(args.reference, box_size=D, pixel_size_angstrom=pixel)[0])
    schedule = args.schedule or default_schedule(D, args.iterations)
    if any(s.box_size > D for s in schedule):
        raise InputError(f"a --schedule box is larger than --box-size {D}; stage boxes must be at most D.")
    out, handler = prepare_run_folder(args.outdir, "micrograph-em", vars(args))
    common = dict(box_size=D, out_dir=out, reference=reference, use_ctf=not args.no_ctf,
                  device=resolve_device(args.device), progress=not args.no_progress)
    try:
        if args.baseline == "pick":
            run_pick_baseline(table, initial, iterations=args.iterations, picks_per_micrograph=args.picks_per_micrograph,
                              threshold=args.pick_threshold, turn_grid=args.grid == "turned", seed=args.seed, **common)
        else:
            run_micrograph_em(table, initial, schedule=schedule, rho0=args.rho0, sigma=args.sigma,
                              regularization=args.regularization, local_parents=args.local_rotations,
                              coarse_box=args.coarse_box, coarse_pairs=args.coarse_pairs, coarse_sampled=args.coarse_sampled, average=args.average,
                              align_rotation=args.reorient, independent_halves=args.independent_halves,
                              turn_grid=args.grid != "fixed",
                              seed=args.seed, resume=args.resume, memory_bytes=int(args.memory_gb * 1024**3),
                              **common)
    finally:
        detach_log_file(handler)
    print(f"wrote {out}/map.mrc and {out}/iterations.tsv")
    return 0
