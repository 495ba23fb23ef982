"""``cryoscape analyze``: PCA, UMAP, k-means, maps and an HTML report of a trained run's latent space."""

from __future__ import annotations

import argparse

HELP = "Analyse a trained run's latent space: PCA, UMAP, k-means with maps at on-data centres, PC traversals, report.html."
EXAMPLE = "cryoscape analyze run/ --ksample 20 --pc 2   (writes run/analysis.EPOCH/report.html; --epoch 9 --skip-umap)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cryoscape.cli.common import add_map_arguments

    parser.add_argument("run", help="the output folder of cryoscape train (heterogeneous, zdim >= 1)")
    parser.add_argument("--epoch", type=int, default=None,
                        help="epoch to analyse, 0-based like z.EPOCH.npy (default: the latest)")
    parser.add_argument("-o", "--outdir", default=None, help="output folder (default: RUN/analysis.EPOCH)")
    what = parser.add_argument_group("what to compute")
    what.add_argument("--ksample", type=int, default=20,
                      help="k-means clusters, one map at each on-data centre (default 20; 0: none)")
    what.add_argument("--pc", type=int, default=2, help="principal components to traverse (default 2)")
    what.add_argument("--n-per-pc", type=int, default=10,
                      help="maps along each PC, 5th to 95th percentile (default 10)")
    what.add_argument("--skip-umap", action="store_true", help="no UMAP embedding")
    what.add_argument("--skip-vol", action="store_true", help="no maps (latent analysis and plots only)")
    what.add_argument("--umap-max", type=int, default=20_000, metavar="N",
                      help="fit UMAP on at most N particles drawn at random and place the rest by their "
                           "nearest fitted neighbours (default 20000)")
    what.add_argument("--seed", type=int, default=0, help="seed of k-means, UMAP and subsampling (default 0)")
    what.add_argument("--no-map-views", action="store_true",
                      help="no isosurface/central-slice pictures of the maps in the report and no ChimeraX .cxc files")
    add_map_arguments(parser.add_argument_group("maps"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from cryoscape.analysis.maps import MapOptions
    from cryoscape.cli.common import map_options
    from cryoscape.report.analyze import AnalyzeOptions, analyze_run

    options = AnalyzeOptions(epoch=args.epoch, ksample=args.ksample, n_pcs=args.pc, n_per_pc=args.n_per_pc,
                             skip_umap=args.skip_umap, skip_vol=args.skip_vol, umap_fit_max=args.umap_max,
                             seed=args.seed, maps=MapOptions(**map_options(args)), map_views=not args.no_map_views)
    result = analyze_run(args.run, options, outdir=args.outdir, progress=not args.no_progress,
                         arguments={k: v for k, v in vars(args).items() if not k.startswith("_")})
    print(f"wrote {result.n_maps} map(s) and {result.report}")
    return 0
