"""``cryoscape select``: choose particles of a trained run and write them for RELION or cryoSPARC."""

from __future__ import annotations

import argparse

HELP = ("Select particles of a trained run (k-means cluster, GMM component, latent outliers, index list or a "
        "polygon in the latent embedding) and write them as indices and a .star/.cs subset of the original file.")
EXAMPLE = ("cryoscape select run/ --kmeans 8 --cluster 0 3 -o good.star   (or: --outliers --zscore 3 "
           "--invert-selection; --polygon poly.txt --embedding pc; --interactive; --particles full_res.cs -o sel.cs)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="the output folder of cryoscape train (its z.EPOCH.npy and config.yaml)")
    parser.add_argument("-o", "--output", required=True,
                        help="sel.star / sel.cs (subset, plus sel.ind.pkl) or sel.pkl / sel.txt / sel.npy "
                             "(indices, plus the subset beside them in the original format)")
    parser.add_argument("--epoch", type=int, default=None, help="latents of this epoch, 0-based (default: the latest)")

    crit = parser.add_argument_group("criterion (exactly one)")
    crit.add_argument("--kmeans", type=int, metavar="K", help="k-means of the latents into K clusters (seeded)")
    crit.add_argument("--gmm", type=int, metavar="N", help="Gaussian mixture (full covariance) with N components")
    crit.add_argument("--labels", metavar="FILE",
                      help="per-particle cluster labels (.pkl/.npy/.txt), e.g. from analyze or landscape")
    crit.add_argument("--cluster", "--component", dest="clusters", type=int, nargs="+", metavar="C",
                      help="the cluster(s) / component(s) to select with --kmeans, --gmm or --labels")
    crit.add_argument("--outliers", action="store_true",
                      help="particles whose latent lies far from the mean latent (thesis 4.4.10)")
    crit.add_argument("--zscore", type=float, default=None,
                      help="with --outliers: z-score of |z - mean z| above which a particle is an outlier [3]")
    crit.add_argument("--norm-percentile", type=float, default=None, metavar="P",
                      help="with --outliers: instead of --zscore, particles above the P-th percentile of |z - mean z|")
    crit.add_argument("--ind", metavar="FILE",
                      help="index file (.pkl/.npy/.txt) of positions in the run's particle order (the rows of z.E.npy)")
    crit.add_argument("--polygon", metavar="FILE",
                      help="particles inside this polygon (one 'x y' vertex a line) in the --embedding")
    crit.add_argument("--interactive", action="store_true",
                      help="draw the polygon with a lasso in a matplotlib window (needs a display)")
    crit.add_argument("--embedding", default="pc",
                      help="2-D embedding of --polygon/--interactive: pc (first two latent PCs), z (zdim <= 2), umap "
                           "(computed now) or an (N, 2) .npy/.pkl/.txt file [pc]")
    crit.add_argument("--invert-selection", action="store_true", help="select every other trained particle instead")
    crit.add_argument("--seed", type=int, default=0, help="seed of k-means / GMM / UMAP [0]")

    data = parser.add_argument_group("particles written")
    data.add_argument("--particles", metavar="FILE",
                      help="the ORIGINAL particle file to subset (.star/.cs, e.g. full resolution; default: the "
                           "file the run was trained on, from its config.yaml); its rows are those the run's --ind "
                           "refers to")
    data.add_argument("--train-ind", metavar="FILE",
                      help="the index file the run was trained with, if config.yaml's path moved; 'none' when the "
                           "particle file holds exactly the trained particles")
    data.add_argument("--datadir", help="folder of the stacks (only for .txt stack lists and .mrcs inputs)")
    data.add_argument("--absolute-paths", action="store_true",
                      help="write the .star subset's rlnImageName with absolute stack paths (default: as the input "
                           "had them, relative to the RELION project folder)")
    data.add_argument("--no-plot", action="store_true", help="do not write the PNG of the selection")


def run(args: argparse.Namespace) -> int:
    from cryoscape.report.selection import run_select

    selection = run_select(
        args.run,
        args.output,
        interactive=args.interactive,
        embedding=args.embedding,
        epoch=args.epoch,
        plot=not args.no_plot,
        seed=args.seed,
        particles=args.particles,
        datadir=args.datadir,
        train_ind=args.train_ind,
        absolute_paths=args.absolute_paths,
        kmeans=args.kmeans,
        gmm=args.gmm,
        labels=args.labels,
        clusters=args.clusters,
        outliers=args.outliers,
        zscore=args.zscore,
        norm_percentile=args.norm_percentile,
        ind=args.ind,
        polygon=args.polygon,
        invert=args.invert_selection,
    )
    print(f"selected {len(selection.rows)} of {selection.n_particles} particles: {selection.description}")
    for kind, path in selection.paths.items():
        print(f"  {kind}: {path}")
    return 0
