"""``cryoscape landscape``: volume-space landscape analysis of a trained run (thesis chapter 6)."""

from __future__ import annotations

import argparse

HELP = ("Landscape analysis of a heterogeneous run: k-means sketch of maps, mask, volume PCA, agglomerative "
        "clustering and a latent -> volume-PC MLP, with an HTML report.")
EXAMPLE = ("cryoscape landscape run/ --sketch-size 500 --box-size 64 --n-clusters 10   "
           "(or: --mask focus.mrc --linkage average --metric euclidean --epoch 19 -o run/landscape_focus)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cryoscape.analysis.landscape import LINKAGES, METRICS, LandscapeOptions

    d = LandscapeOptions()
    parser.add_argument("run", help="the output folder of cryoscape train (zdim > 0)")
    parser.add_argument("-o", "--outdir", default=None, help="output folder (default: RUN/landscape.EPOCH)")
    parser.add_argument("--epoch", type=int, default=None, help="weights and latents of this epoch (default: latest)")
    parser.add_argument("--sketch-size", "--sketch", type=int, default=d.sketch_size, dest="sketch_size",
                        help=f"number of maps in the k-means sketch [{d.sketch_size}]")
    parser.add_argument("--box-size", type=int, default=d.box_size,
                        help=f"box of the decoded maps, at most the training box; same field of view, larger "
                             f"pixels (memory: k maps of box^3 floats on disk during the run) [{d.box_size}]")
    parser.add_argument("--mask", default=None, metavar="MRC",
                        help="mask (voxels > 0.5 kept) covering the training box; default: union of the sketch "
                             "maps' voxels above --mask-threshold x their maximum")
    parser.add_argument("--mask-threshold", type=float, default=d.mask_threshold,
                        help=f"fraction of each map's maximum for the union mask [{d.mask_threshold}]")
    parser.add_argument("--pcs", type=int, default=d.n_pcs, dest="n_pcs", help=f"volume PCs kept [{d.n_pcs}]")
    parser.add_argument("--pc-maps", type=int, default=d.traversal_points, dest="traversal_points",
                        help=f"maps written along each PC [{d.traversal_points}]")
    parser.add_argument("--pc-axes", type=int, default=d.traversal_pcs, dest="traversal_pcs",
                        help=f"PCs to write maps along [{d.traversal_pcs}]")
    parser.add_argument("-M", "--n-clusters", type=int, default=d.n_clusters, dest="n_clusters",
                        help=f"agglomerative clusters of the sketch maps [{d.n_clusters}]")
    parser.add_argument("--linkage", choices=LINKAGES, default=d.linkage, help=f"cluster linkage [{d.linkage}]")
    parser.add_argument("--metric", choices=METRICS, default=d.metric,
                        help=f"distance between maps (ward needs euclidean) [{d.metric}]")
    parser.add_argument("--mlp-samples", type=int, default=d.mlp_samples,
                        help=f"maps decoded (besides the sketch) to train the latent -> volume-PC MLP "
                             f"[{d.mlp_samples}]")
    parser.add_argument("--mlp-epochs", type=int, default=d.mlp_epochs, help=f"MLP training epochs [{d.mlp_epochs}]")
    parser.add_argument("--write-sketch-maps", action="store_true",
                        help="also write every sketch map (sketch/vol_XXX.mrc)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed of k-means, sampling and the MLP [{d.seed}]")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from cryoscape.analysis.landscape import LandscapeOptions
    from cryoscape.cli.common import resolve_device
    from cryoscape.report.landscape import run_landscape

    options = LandscapeOptions(
        sketch_size=args.sketch_size, box_size=args.box_size, mask=args.mask, mask_threshold=args.mask_threshold,
        n_pcs=args.n_pcs, n_clusters=args.n_clusters, linkage=args.linkage, metric=args.metric,
        traversal_pcs=args.traversal_pcs, traversal_points=args.traversal_points, mlp_samples=args.mlp_samples,
        mlp_epochs=args.mlp_epochs, write_sketch_maps=args.write_sketch_maps, seed=args.seed,
    )
    result = run_landscape(args.run, epoch=args.epoch, out_dir=args.outdir, options=options,
                           device=resolve_device(args.device), progress=not args.no_progress)
    ratio = result.pca.explained_variance_ratio
    print(f"landscape of {result.n_particles} particles from {len(result.sketch.indices)} sketch maps "
          f"(box {result.box_size}): PC1-3 explain {100 * float(ratio[:3].sum()):.1f} % of the variance, "
          f"{len(result.cluster_volume_counts)} clusters")
    print(f"report: {result.paths['report']}")
    return 0
