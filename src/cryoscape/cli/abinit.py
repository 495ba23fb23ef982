"""``cryoscape abinit``: ab initio reconstruction, the map (or a VAE) and the particles' poses learnt together."""

from __future__ import annotations

import argparse
import os

from cryoscape.cli.common import add_particle_arguments, parse_beta, parse_key_value

HELP = ("Ab initio reconstruction without poses: hierarchical pose search alternating with training of a "
        "homogeneous map (--zdim 0) or a heterogeneous VAE (--zdim N).")
EXAMPLE = ("cryoscape abinit particles.star -n 20 --search-every 4 --final-epochs 4 -o abinit/   "
           "(continue: cryoscape abinit --resume abinit/ -n 30)")

_GRID_LEVELS = {"30": 0, "15": 1, "7.5": 2, "3.75": 3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_data_arguments(parser)
    _add_model_arguments(parser)
    _add_schedule_arguments(parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The particles, metadata, preprocessing and reading options."""

    data = parser.add_argument_group("data")
    data.add_argument("particles", nargs="?", help="particles: .star, .cs, .txt stack list or .mrcs stack (poses not needed)")
    data.add_argument("-o", "--outdir", help="output folder (a run folder, like cryoscape train's)")
    add_particle_arguments(data, poses_help=None, amp_contrast=False)
    data.add_argument("--pixel-size", type=float, dest="pixel_size_angstrom", metavar="ANGSTROM",
                      help="override the pixel size (angstroms)")
    data.add_argument("--no-ctf", action="store_true", help="ignore the CTF (phase-flipped or CTF-free data)")
    data.add_argument("--uninvert-data", action="store_true",
                      help="do not negate the images (by default they are, as extracted particles are white)")
    data.add_argument("--no-window", action="store_true", help="do not apply the soft circular real-space window")
    data.add_argument("--window-r", type=float, default=0.85, help="window inner radius, fraction of D/2 [0.85]")
    data.add_argument("--window-r-outer", type=float, default=0.99, help="window outer radius fraction [0.99]")
    data.add_argument("--lazy", action="store_true", help="always read images from disk (default: load sets under 2 GiB)")
    data.add_argument("--shuffle-chunk", type=int, default=0, metavar="N",
                      help="for data read from disk: shuffle blocks of N consecutive particles (4 blocks mixed at a "
                           "time) so that every block is read once, sequentially; e.g. 1024 [0: uniform shuffle]")
    data.add_argument("--cache-dir", metavar="DIR",
                      help="for data read from disk: write a float16 copy of the preprocessed images in DIR once "
                           "(N x D x D x 2 bytes) and train from it; later runs of the same data reuse it")
    data.add_argument("--norm-images", type=int, default=1000, help="images sampled for the data normalisation [1000]")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options (as cryoscape train's) and the optimisation options."""
    model = parser.add_argument_group("model (as cryoscape train)")
    model.add_argument("--zdim", type=int, default=0, help="latent dimension; 0 reconstructs one homogeneous map [0]")
    model.add_argument("--decoder", default="neural_field", help="decoder name (a registered decoder) [neural_field]")
    model.add_argument("--decoder-opt", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="extra decoder option (repeatable)")
    model.add_argument("--dec-layers", type=int, default=3, help="decoder hidden layers [3]")
    model.add_argument("--dec-dim", type=int, default=None, help="decoder width [128]")
    model.add_argument("--domain", choices=("fourier", "hartley"), default="fourier", help="decoder output domain [fourier]")
    model.add_argument("--pe-type", default=None, help="positional encoding [geom_lowf]")
    model.add_argument("--pe-dim", type=int, default=None, help="number of encoding frequencies (default: by box)")
    model.add_argument("--feat-sigma", type=float, default=None, dest="gaussian_scale", metavar="SIGMA",
                       help="scale of the gaussian encoding's frequencies")
    model.add_argument("--encoder", choices=("mlp", "resmlp", "conv"), default="resmlp", help="VAE encoder kind [resmlp]")
    model.add_argument("--enc-layers", type=int, default=3, help="encoder hidden layers [3]")
    model.add_argument("--enc-dim", type=int, default=256, help="encoder width [256]")
    model.add_argument("--noise-model", choices=("white", "spectral"), default="white",
                       help="likelihood: white noise, or per-shell noise estimated from the data [white]")

    opt = parser.add_argument_group("training")
    opt.add_argument("-n", "--num-epochs", type=int, default=None, help="number of epochs, final ones included [16]")
    opt.add_argument("-b", "--batch-size", type=int, default=None, help="images per gradient step [16]")
    opt.add_argument("--lr", type=float, default=None, help="learning rate of Adam [1e-3]")
    opt.add_argument("--wd", type=float, default=None, dest="weight_decay", help="weight decay [0]")
    opt.add_argument("--beta", type=parse_beta, default=None, help="KL weight of the VAE: a number or 'anneal' [1/zdim]")
    opt.add_argument("--beta-anneal-epochs", type=int, default=None, help="epochs of the beta ramp")
    opt.add_argument("--no-shuffle", action="store_true", help="visit particles in file order")
    opt.add_argument("--seed", type=int, default=0, help="random seed [0]")
    opt.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="bfloat16 autocast of the networks and the search's model evaluation "
                          "[on for GPUs and CPUs with bfloat16 instructions]")
    opt.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ... [auto]")
    opt.add_argument("--prefetch", type=int, default=None, help="batches prepared ahead [2]")
    opt.add_argument("--checkpoint-every", type=int, default=None, help="keep weights.EPOCH.pt every N epochs [5]")
    opt.add_argument("--checkpoint-minutes", type=float, default=None, metavar="M",
                     help="also checkpoint inside an epoch at most every M minutes (checkpoint.partial.pt; --resume "
                          "continues the epoch where it stopped) [0: only after each epoch]")
    opt.add_argument("--no-progress", action="store_true", help="no progress output")


def _add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """The schedule, the pose-search grid and --resume."""
    sched = parser.add_argument_group("schedule (thesis 5.3.3)")
    sched.add_argument("--pretrain", type=int, default=None, dest="pretrain_images", metavar="N_IMAGES",
                       help="warm-up: images fitted with random poses before the first search [4000]")
    sched.add_argument("--search-every", type=int, default=None, metavar="N",
                       help="search poses every N epochs (from epoch 0) and reuse them in between [2]")
    sched.add_argument("--final-epochs", type=int, default=None,
                       help="last epochs trained with the poses fixed, on the whole frequency circle [0]")
    sched.add_argument("--reset-epochs", type=int, nargs="*", default=None, metavar="EPOCH",
                       help="re-initialise model and optimiser at the start of these (non-search, 0-based) epochs, "
                            "keeping the poses")
    sched.add_argument("--reset-before-final", action="store_true",
                       help="re-initialise model and optimiser before the final epochs")
    sched.add_argument("--vae-start-epoch", type=int, default=None, metavar="EPOCH",
                       help="with --zdim: a homogeneous model searches the poses until this (0-based, non-search) "
                            "epoch, then a new VAE takes over with those poses; 0: the VAE searches from the start "
                            "[the first final epoch with --final-epochs, else 0]")
    sched.add_argument("--search-decoder", default=None, metavar="NAME",
                       help="decoder of the homogeneous model that searches the poses until the first final epoch "
                            "(or --vae-start-epoch), when a new --decoder model takes over [the decoder itself; "
                            "neural_field for --decoder basis, which does not align from random poses]")
    sched.add_argument("--final-batch-size", type=int, default=None, metavar="N",
                       help="images per batch from that switch on [the final decoder's own when another decoder "
                            "searched (the basis: 64), else --batch-size]")
    sched.add_argument("--teacher-epochs", type=int, default=None, metavar="N",
                       help="with --zdim: at that switch, first train a voxel-basis VAE of N epochs on the poses "
                            "found (in RUN/teacher) and start the new VAE's encoder from it; 0: none [the decoder's: "
                            "12 for cryoformer, 0 for the others]")
    sched.add_argument("--warm-start-images", type=int, default=None, metavar="N",
                       help="when the model is rebuilt after poses were found (the switch above, a reset), a "
                            "decoder with a warm start (the basis's mean map, CryoFormer's occupancy grid) starts from the "
                            "backprojection of up to N images with the current poses; 0: from zero [20000]")
    sched.add_argument("--search-chunk", type=int, default=None, metavar="N_IMAGES",
                       help="images searched with one model before it trains on them, at the band --k-min; the "
                            "chunk grows as (band / k-min)^3 [64]")
    sched.add_argument("--no-band-limit", action="store_true",
                       help="train on the whole frequency circle from the start (default: the search band)")

    search = parser.add_argument_group("pose search (thesis 5.3.2)")
    search.add_argument("--base-grid", choices=tuple(_GRID_LEVELS), default="15",
                        help="spacing of the exhaustive SO(3) grid in degrees: 30 (576 rotations), 15 (4 608), "
                             "7.5 (36 864) [15]")
    search.add_argument("--n-refine", type=int, default=None, help="refinement rounds, each halving the grid [4]")
    search.add_argument("--n-keep", type=int, default=None, help="rotations kept per refinement round [8]")
    search.add_argument("--n-keep-base", type=int, default=None, help="rotations kept from the base grid [32]")
    search.add_argument("--k-min", type=float, default=None, help="band of the base grid, Fourier pixels [12]")
    search.add_argument("--k-max", type=float, default=None,
                        help="band of the last refinement round at the end of the ramp, Fourier pixels "
                             "(clipped to D/2) [32]")
    search.add_argument("--k-ramp-epochs", type=int, default=None,
                        help="epochs over which the top band grows from --k-min to --k-max [up to the last search]")
    search.add_argument("--t-extent", type=float, default=None, dest="t_extent_pixel",
                        help="shift search range +- pixels [10]")
    search.add_argument("--t-ngrid", type=int, default=None, dest="t_n_per_axis",
                        help="shift grid points per axis (spacing 2 extent / n) [7]")
    search.add_argument("--no-trans", action="store_true", help="do not search shifts (centred particles)")
    search.add_argument("--search-oversampling", type=float, default=None,
                        help="model lattice points per Fourier pixel for interpolated slices [2]")

    run = parser.add_argument_group("continuing")
    run.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN (-n sets the total)")

def _config_from_args(args: argparse.Namespace):
    from cryoscape.train.abinit import AbinitConfig

    d = AbinitConfig()

    def pick(value, default):
        return default if value is None else value

    return AbinitConfig(
        particles=args.particles, ctf=args.ctf, datadir=args.datadir, ind=args.ind, first=args.first,
        pixel_size_angstrom=args.pixel_size_angstrom, use_ctf=not args.no_ctf, invert_data=not args.uninvert_data,
        window=not args.no_window, window_inner_radius_fraction=args.window_r,
        window_outer_radius_fraction=args.window_r_outer, lazy=args.lazy, n_normalization_images=args.norm_images,
        shuffle_chunk=args.shuffle_chunk, cache_dir=args.cache_dir,
        zdim=args.zdim, decoder=args.decoder, decoder_options=dict(args.decoder_opt), dec_layers=args.dec_layers,
        dec_dim=pick(args.dec_dim, d.dec_dim), domain=args.domain, pe_type=pick(args.pe_type, d.pe_type),
        pe_dim=args.pe_dim, gaussian_scale=args.gaussian_scale, encoder=args.encoder, enc_layers=args.enc_layers,
        enc_dim=args.enc_dim, noise_model=args.noise_model,
        num_epochs=pick(args.num_epochs, d.num_epochs), batch_size=pick(args.batch_size, d.batch_size),
        lr=pick(args.lr, d.lr), weight_decay=pick(args.weight_decay, d.weight_decay), beta=args.beta,
        beta_anneal_epochs=args.beta_anneal_epochs, shuffle=not args.no_shuffle, seed=args.seed, amp=args.amp,
        device=pick(args.device, d.device), prefetch=pick(args.prefetch, d.prefetch),
        checkpoint_every=pick(args.checkpoint_every, d.checkpoint_every),
        checkpoint_minutes=pick(args.checkpoint_minutes, d.checkpoint_minutes), progress=not args.no_progress,
        pretrain_images=pick(args.pretrain_images, d.pretrain_images),
        search_every=pick(args.search_every, d.search_every), final_epochs=pick(args.final_epochs, d.final_epochs),
        reset_epochs=list(args.reset_epochs or []), reset_before_final=args.reset_before_final,
        vae_start_epoch=pick(args.vae_start_epoch, d.vae_start_epoch), search_decoder=args.search_decoder,
        final_batch_size=args.final_batch_size, teacher_epochs=args.teacher_epochs,
        warm_start_images=pick(args.warm_start_images, d.warm_start_images),
        search_chunk=pick(args.search_chunk, d.search_chunk), band_limit_training=not args.no_band_limit,
        base_level=_GRID_LEVELS[args.base_grid], n_refine=pick(args.n_refine, d.n_refine),
        n_keep=pick(args.n_keep, d.n_keep), n_keep_base=pick(args.n_keep_base, d.n_keep_base), k_min=pick(args.k_min, d.k_min),
        k_max=pick(args.k_max, d.k_max), k_ramp_epochs=args.k_ramp_epochs,
        t_extent_pixel=0.0 if args.no_trans else pick(args.t_extent_pixel, d.t_extent_pixel),
        t_n_per_axis=1 if args.no_trans else pick(args.t_n_per_axis, d.t_n_per_axis),
        search_oversampling=pick(args.search_oversampling, d.search_oversampling),
    )


def run(args: argparse.Namespace) -> int:
    from cryoscape.errors import InputError
    from cryoscape.train.abinit import resume_abinit, run_abinit

    arguments = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    if args.resume:
        result = resume_abinit(
            args.resume, arguments=arguments, num_epochs=args.num_epochs, final_epochs=args.final_epochs,
            lr=args.lr, device=args.device, progress=False if args.no_progress else None,
            checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes, prefetch=args.prefetch,
            datadir=args.datadir, amp=args.amp,
            lazy=True if args.lazy else None, cache_dir=args.cache_dir, search_chunk=args.search_chunk,
        )
    else:
        if not args.particles:
            raise InputError("no particles were given; pass a .star, .cs, .txt or .mrcs file (or --resume RUN).")
        if not args.outdir:
            raise InputError("no output folder was given; pass -o RUN_FOLDER.")
        config = _config_from_args(args)
        try:
            config.validate()
        except ValueError as err:
            raise InputError(f"{err}.") from None
        result = run_abinit(config, args.outdir, arguments=arguments)
    if result.history and os.environ.get("RANK", "0") == "0":  # torchrun: process 0 reports
        last = result.history[-1]
        print(f"ran {result.epochs_done} epochs; final loss {last['loss']:.5g}; poses and maps in {result.out_dir}")
    return 0
