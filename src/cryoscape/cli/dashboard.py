"""``cryoscape dashboard``: a local web app over a run folder (latent space, selections, maps, trajectories)."""

from __future__ import annotations

import argparse

HELP = ("Explore a run in the browser: latent scatter coloured by clusters or values, lasso selection exported as "
        ".star/.cs, maps decoded at clicked points, graph paths played as movies, live loss curves.")
EXAMPLE = ("cryoscape dashboard run/   (then open http://127.0.0.1:8050; from a server: ssh -L 8050:127.0.0.1:8050 "
           "server, or --host 0.0.0.0 with the printed token)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cryoscape.cli.common import add_map_arguments

    parser.add_argument("run", help="the output folder of cryoscape train or abinit")
    parser.add_argument("--epoch", type=int, default=None, help="latents and weights of this epoch, 0-based [latest]")
    parser.add_argument("--z", default=None, metavar="FILE",
                        help="per-particle latents from another file (.npy/.pkl/.txt, e.g. another tool's)")
    web = parser.add_argument_group("server")
    web.add_argument("--host", default="127.0.0.1",
                     help="address to listen on [127.0.0.1]; any other needs the token printed at start")
    web.add_argument("--port", type=int, default=8050, help="port [8050]; 0: any free port")
    web.add_argument("--token", default=None,
                     help="access token (default: none on 127.0.0.1, a random one on any other address)")
    data = parser.add_argument_group("particles exported")
    data.add_argument("--particles", metavar="FILE", help="the ORIGINAL .star/.cs to subset [the training file]")
    data.add_argument("--train-ind", metavar="FILE", help="the run's --ind file if it moved ('none': no --ind)")
    data.add_argument("--datadir", help="folder of the stacks (stack lists and .mrcs inputs)")
    maps = parser.add_argument_group("maps")
    maps.add_argument("--view-box", type=int, default=64,
                      help="box of the maps decoded for the viewer, same field of view [64, at most the training box]")
    maps.add_argument("--seed", type=int, default=0, help="seed of k-means, GMM and UMAP [0]")
    add_map_arguments(maps)


def run(args: argparse.Namespace) -> int:
    from cryoscape.analysis.maps import MapOptions
    from cryoscape.cli.common import map_options
    from cryoscape.dashboard.server import serve

    options = map_options(args)
    serve(args.run, epoch=args.epoch, z_path=args.z, particles=args.particles, train_ind=args.train_ind,
          datadir=args.datadir, view_box=args.view_box, seed=args.seed, maps=MapOptions(**options),
          host=args.host, port=args.port, token=args.token)
    return 0
