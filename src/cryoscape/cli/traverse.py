"""``cryoscape traverse``: maps along a PC, a straight line or a graph path through latent space."""

from __future__ import annotations

import argparse

HELP = "Generate maps along a trajectory: a principal component, straight lines, or a graph path through the particles."
EXAMPLE = ("cryoscape traverse run/ --along graph --anchors 120 4031 977   "
           "(or: --along graph --kmeans-anchors 5; --along line --anchors 12 345 -n 10; --along pc --pc 1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cryoscape.cli.common import add_map_arguments

    parser.add_argument("run", help="the output folder of cryoscape train (heterogeneous, zdim >= 1)")
    parser.add_argument("--along", choices=("pc", "line", "graph"), required=True,
                        help="pc: along a principal component; line: straight lines between anchors; graph: "
                             "shortest path through the particles' neighbour graph (thesis 4.4.12)")
    parser.add_argument("--epoch", type=int, default=None,
                        help="epoch, 0-based like z.EPOCH.npy (default: the latest)")
    parser.add_argument("-o", "--outdir", default=None, help="output folder (default: RUN/traverse.EPOCH.ALONG)")
    path = parser.add_argument_group("trajectory")
    path.add_argument("--pc", type=int, default=1, help="--along pc: which PC, 1-based (default 1)")
    path.add_argument("-n", "--n-points", type=int, default=10,
                      help="--along pc: maps along the PC; --along line: points per segment (default 10)")
    path.add_argument("--percentiles", type=float, nargs=2, default=(5.0, 95.0), metavar=("LOW", "HIGH"),
                      help="--along pc: range of the PC coordinate (default 5 95)")
    anchors = path.add_mutually_exclusive_group()
    anchors.add_argument("--anchors", type=int, nargs="+", metavar="INDEX",
                         help="particle indices (0-based rows of z.EPOCH.npy) to pass through, in order")
    anchors.add_argument("--anchor-z", metavar="FILE",
                         help="--along line: latents to pass through (.txt one per line, .npy or .pkl)")
    anchors.add_argument("--kmeans-anchors", type=int, metavar="K",
                         help="anchors = on-data centres of k-means with K clusters, chained nearest first")
    path.add_argument("--avg-neighbors", type=float, default=5.0,
                      help="--along graph: mean neighbours per particle, sets the distance threshold (default 5)")
    path.add_argument("--max-neighbors", type=int, default=10,
                      help="--along graph: most neighbours of any particle (default 10)")
    path.add_argument("--max-maps", type=int, default=None,
                      help="--along graph: at most about this many maps, evenly along the path, anchors kept "
                           "(default: one per visited particle)")
    path.add_argument("--seed", type=int, default=0, help="seed of k-means anchors (default 0)")
    maps = parser.add_argument_group("maps")
    maps.add_argument("--skip-vol", action="store_true", help="latents and plots only, no maps")
    maps.add_argument("--no-map-views", action="store_true",
                      help="no isosurface/central-slice pictures of the maps and no ChimeraX maps.cxc")
    add_map_arguments(maps)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from cryoscape.analysis.maps import MapOptions
    from cryoscape.cli.common import map_options
    from cryoscape.report.traverse import TraverseOptions, traverse_run

    options = TraverseOptions(
        along=args.along, epoch=args.epoch, pc=args.pc, n_points=args.n_points, percentiles=tuple(args.percentiles),
        anchors=args.anchors, anchor_file=args.anchor_z, kmeans_anchors=args.kmeans_anchors,
        avg_neighbors=args.avg_neighbors, max_neighbors=args.max_neighbors, max_maps=args.max_maps,
        skip_vol=args.skip_vol, seed=args.seed, maps=MapOptions(**map_options(args)),
        map_views=not args.no_map_views)
    result = traverse_run(args.run, options, outdir=args.outdir, progress=not args.no_progress,
                          arguments={k: v for k, v in vars(args).items() if not k.startswith("_")})
    n_maps = len(result.maps.paths) if result.maps else 0
    print(f"{result.latents.shape[0]} latents, {n_maps} map(s) in {result.outdir}")
    return 0
