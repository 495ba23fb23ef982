"""``cryoscape train``: learn a map (homogeneous) or a distribution of maps (VAE) from particles with poses."""

from __future__ import annotations

import argparse
import os

from cryoscape.cli.common import add_particle_arguments, parse_beta, parse_key_value

HELP = "Train a neural map (homogeneous, --zdim 0) or a heterogeneous VAE (--zdim N) on particles with poses and CTF."
EXAMPLE = ("cryoscape train particles.star --zdim 8 -n 20 -o run/   "
           "(or: particles.mrcs --poses poses.pkl --ctf ctf.pkl; continue: cryoscape train --resume run/ -n 30)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_data_arguments(parser)
    _add_model_arguments(parser)
    _add_training_arguments(parser)
    _add_fit_arguments(parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The particles, metadata, preprocessing and reading options."""
    data = parser.add_argument_group("data")
    data.add_argument("particles", nargs="?", help="particles: .star, .cs, .txt stack list or .mrcs stack")
    data.add_argument("-o", "--outdir", help="output folder (the run folder)")
    add_particle_arguments(data, amp_contrast=False)
    data.add_argument("--pixel-size", type=float, dest="pixel_size_angstrom", metavar="ANGSTROM",
                      help="override the pixel size (angstroms)")
    data.add_argument("--no-ctf", action="store_true", help="ignore the CTF (phase-flipped or CTF-free data)")
    data.add_argument("--uninvert-data", action="store_true",
                      help="do not negate the images (by default they are, as extracted particles are white: "
                           "RELION, cryoSPARC and cryoscape simulate write them so)")
    data.add_argument("--window", action=argparse.BooleanOptionalAction, default=False,
                      help="multiply the images by a soft circular real-space window (cryoDRGN's default); off by "
                           "default: it cuts the signal the CTF spreads beyond the particle, which the model predicts")
    data.add_argument("--window-r", type=float, default=0.85,
                      help="window: inner radius as a fraction of D/2, the edge falls to 0 at --window-r-outer [0.85]")
    data.add_argument("--window-r-outer", type=float, default=0.99, help="window: outer radius fraction [0.99]")
    data.add_argument("--lazy", action="store_true", help="always read images from disk (default: load sets under 2 GiB)")
    data.add_argument("--shuffle-chunk", type=int, default=0, metavar="N",
                      help="for data read from disk: shuffle blocks of N consecutive particles (4 blocks mixed at a "
                           "time) so that every block is read once, sequentially; e.g. 1024 [0: uniform shuffle]")
    data.add_argument("--cache-dir", metavar="DIR",
                      help="for data read from disk: write a float16 copy of the preprocessed images in DIR once "
                           "(N x D x D x 2 bytes) and train from it; later runs of the same data reuse it")
    data.add_argument("--norm-images", type=int, default=1000,
                      help="images sampled to estimate the data normalisation [1000]")

    tilt = parser.add_argument_group("tilt pairs (thesis 3.7.2)")
    tilt.add_argument("--tilt", help="tilted partner of every particle (.star/.mrcs/.txt/.cs, same order)")
    tilt.add_argument("--tilt-poses", help="poses.pkl of the tilted particles (only their shifts are used)")
    tilt.add_argument("--tilt-ctf", help="ctf.pkl of the tilted particles (default: theirs, else the untilted CTF)")
    tilt.add_argument("--tilt-deg", type=float, default=45.0,
                      help="stage tilt in degrees, right-handed about the image x axis: tilted pose = T(x, deg) @ pose [45]")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoder, encoder and likelihood options."""
    model = parser.add_argument_group("model")
    model.add_argument("--zdim", type=int, default=0, help="latent dimension; 0 trains one homogeneous map [0]")
    model.add_argument("--decoder", default="basis",
                       help="decoder name (a registered decoder: basis, neural_field, cryoformer, atomic; README "
                            "'Choosing a decoder') [basis]")
    model.add_argument("--decoder-opt", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="extra decoder option (repeatable), passed to the decoder as it is")
    model.add_argument("--reference", metavar="PDB",
                       help="--decoder atomic: the reference atomic model (.pdb/.cif) whose residues become the model's "
                            "Gaussian centres (centred on its centroid, as cryoscape simulate centres models); "
                            "default: the built-in hinge molecule")
    model.add_argument("--dec-layers", type=int, default=3, help="decoder hidden layers [3]")
    model.add_argument("--dec-dim", type=int, default=None,
                       help="decoder width [128 for the neural field (README 'Choosing a decoder'), 256 for the others]")
    model.add_argument("--domain", choices=("fourier", "hartley"), default="fourier",
                       help="decoder output: complex Fourier (half the pixels) or real Hartley [fourier]")
    model.add_argument("--pe-type", default="gaussian",
                       help="positional encoding: gaussian, geom_lowf, geom_full, geom_nohighf, none [gaussian]")
    model.add_argument("--pe-dim", type=int, default=None, help="number of encoding frequencies (default: by box)")
    model.add_argument("--feat-sigma", type=float, default=None, dest="gaussian_scale", metavar="SIGMA",
                       help="standard deviation of the gaussian encoding's frequencies, in units of D/2 [0.5]")
    model.add_argument("--encoder", choices=("mlp", "resmlp", "conv"), default="resmlp", help="encoder kind [resmlp]")
    model.add_argument("--enc-layers", type=int, default=3, help="encoder hidden layers [3]")
    model.add_argument("--enc-dim", type=int, default=256, help="encoder width [256]")
    model.add_argument("--noise-model", choices=("white", "spectral"), default="white",
                       help="likelihood noise: white (all frequencies weighted equally) or spectral (each "
                            "Fourier shell weighted by 1/sigma^2 estimated from the data and CTF, seed 003 eq. 5) [white]")
    model.add_argument("--enc-mask", type=float, default=None, dest="enc_mask_radius_fraction", metavar="FRACTION",
                       help="encoder reads pixels within this fraction of D/2 [1.0]")
    model.add_argument("--enc-lowpass", type=float, default=None, dest="enc_lowpass_fraction", metavar="FRACTION",
                       help="encoder reads the images low-passed to this fraction of Nyquist (at low SNR the high "
                            "frequencies are mostly noise) [1: all]")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The optimisation, schedule, checkpoints and device options, and --resume."""
    opt = parser.add_argument_group("training")
    opt.add_argument("-n", "--num-epochs", type=int, default=None, help="number of epochs [20]")
    opt.add_argument("-b", "--batch-size", type=int, default=None,
                     help="images per batch [8; 64 for --decoder basis]")
    opt.add_argument("--lr", type=float, default=None,
                     help="learning rate of Adam [4e-4 for the neural field, 1e-3 for the basis decoder]")
    opt.add_argument("--wd", type=float, default=None, dest="weight_decay", help="weight decay [0]")
    opt.add_argument("--beta", type=parse_beta, default=None,
                     help="KL weight: a number, or 'anneal' (0 -> 1 over --beta-anneal-epochs) [1/zdim]")
    opt.add_argument("--beta-anneal-epochs", type=int, default=None, help="epochs of the beta ramp [num_epochs/4]")
    opt.add_argument("--band-start", type=float, default=None, metavar="FRACTION",
                     help="frequency marching: epoch 0 trains only |k| < FRACTION x Nyquist, the band widens "
                          "linearly to Nyquist at epoch --band-epochs (1: every pixel in every epoch) "
                          "[1]")
    opt.add_argument("--band-epochs", type=int, default=None, metavar="E",
                     help="frequency marching: the epoch (0-based) from which every pixel trains [the last]")
    opt.add_argument("--refine-poses", action="store_true",
                     help="learn per-particle rotation and shift corrections by gradient descent")
    opt.add_argument("--no-refine-shifts", action="store_true", help="with --refine-poses: keep the shifts fixed")
    opt.add_argument("--pose-lr", type=float, default=None, help="learning rate of the rotation corrections in radians per step; shifts use pose-lr * D/4 pixels [3e-3]")
    opt.add_argument("--pose-lr-decay", type=float, default=1.0,
                     help="with --refine-poses: multiply the pose learning rate by this after every epoch that "
                          "updates the poses, so the corrections settle (e.g. 0.7 with --pose-lr 2e-2) [1: constant]")
    opt.add_argument("--pose-start-epoch", type=int, default=1,
                     help="first epoch (0-based) that updates the poses; earlier ones fit the map to the input poses [1]")
    opt.add_argument("--pose-representation", choices=("axis_angle", "6d"), default="axis_angle",
                     help="rotation correction: axis-angle delta or 6-D rotation [axis_angle]")
    opt.add_argument("--pose-source", choices=("table", "encoder"), default="table",
                     help="table: the particles' poses (with --refine-poses: corrected); encoder: an orientation "
                          "encoder pre-trained on them, then refined end to end (CryoFormer) [table]")
    opt.add_argument("--pose-encoder", choices=("residual", "absolute"), default="residual",
                     help="residual: a correction of the table's poses, starting exactly at them; absolute: the "
                          "paper's, pre-trained to the table's poses [residual]")
    opt.add_argument("--pose-encoder-layers", type=int, default=4,
                     help="orientation encoder MLP layers [4; the paper's 10 x 128 fitted the poses worse]")
    opt.add_argument("--pose-encoder-dim", type=int, default=256, help="orientation encoder MLP width [256]")
    opt.add_argument("--pose-pretrain-epochs", type=int, default=200,
                     help="passes over the images fitting the orientation encoder to the table's poses [200]")
    opt.add_argument("--pose-encoder-lr", type=float, default=1e-4,
                     help="learning rate refining the orientation encoder (0: frozen after pre-training) [1e-4]")
    opt.add_argument("--no-shuffle", action="store_true", help="visit particles in file order")
    opt.add_argument("--seed", type=int, default=0, help="random seed (initialisation, order, noise) [0]")
    opt.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="mixed precision (bfloat16 matrix products in encoder and decoder, float32 loss); "
                          "default: on for GPUs with bfloat16 and CPUs with bfloat16 instructions (about 2x "
                          "faster on AVX512-BF16), off elsewhere; --no-amp trains in float32")
    opt.add_argument("--device", default=None, help="auto (cuda when present), cpu, cuda, cuda:1 ... [auto]")
    opt.add_argument("--prefetch", type=int, default=None, help="batches prepared ahead in a background thread [2]")
    opt.add_argument("--checkpoint-every", type=int, default=None, help="keep weights.EPOCH.pt every N epochs [5]")
    opt.add_argument("--checkpoint-minutes", type=float, default=None, metavar="M",
                     help="also checkpoint inside an epoch at most every M minutes (checkpoint.partial.pt; --resume "
                          "continues the epoch where it stopped) [0: only after each epoch]")
    opt.add_argument("--no-progress", action="store_true", help="no progress bar")

    run = parser.add_argument_group("continuing")
    run.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN (same folder; -n sets the total)")
    run.add_argument("--load", metavar="WEIGHTS",
                     help="start from a checkpoint.pt / weights.EPOCH.pt (its epoch, weights, optimiser, "
                          "normalisation) and write a new run to -o")
    run.add_argument("--init-encoder", metavar="RUN",
                     help="start the VAE encoder from a finished run's (folder, checkpoint.pt or weights.EPOCH.pt; "
                          "same --zdim/--encoder/--enc-*), e.g. a fast --decoder basis run teaching CryoFormer its "
                          "latent")
    run.add_argument("--teacher-epochs", type=int, default=None, metavar="N",
                     help="first train a voxel-basis run of N epochs (in RUN/teacher) and start the VAE encoder from "
                          "its (an automatic --init-encoder; zdim > 0) [the decoder's: cryoformer 12, others 0]")

def _add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that fit the maps or the latents outside the optimiser: warm start, refits, latent searches."""
    opt = parser.add_argument_group("maps and latents fitted outside the optimiser")
    opt.add_argument("--warm-start-images", type=int, default=None, metavar="N",
                     help="decoders that start from the posed data: the basis's mean map from the Wiener-filtered "
                          "backprojection of up to N images, CryoFormer's occupancy grid from its low-pass "
                          "consensus (0: neither; from zero and every cell) [20000]")
    opt.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                     help="decoders linear in their voxels (basis): after the last epoch, re-solve the maps in "
                          "closed form from all images at their latents, with a gold-standard Wiener prior per "
                          "component and shell (known poses; one more pass over the data); --no-refit: never, "
                          "not even every --refit-every epochs [on]")
    opt.add_argument("--refit-every", type=int, default=None, metavar="N",
                     help="also refit after every N-th epoch (the encoder then trains against the refitted maps); "
                          "0: only after the last (measured: every 2nd orders the motion of 8000 images best, but "
                          "on 1000 images it stopped the latent from forming) [auto: 2 when an epoch has at least "
                          "100 optimiser steps, else 0]")
    opt.add_argument("--refit-latents", action=argparse.BooleanOptionalAction, default=None,
                     help="after the final refit, re-estimate each image's latent against the refitted maps (its "
                          "posterior mean over --refit-latent-candidates of the run's own latents) and refit the "
                          "maps at those latents (decoders that score many latents at once: basis) [on]")
    opt.add_argument("--refit-latent-candidates", type=int, default=None, metavar="N",
                     help="candidate latents per image for --refit-latents [512]")
    opt.add_argument("--latent-search-epochs", type=int, default=None, metavar="N",
                     help="the last N epochs take each image's latent from a search against the decoder (the "
                          "posterior mean over --latent-search-points candidates) instead of the encoder; 0: off "
                          "[the decoder's default: half the epochs for --decoder atomic, else 0]")
    opt.add_argument("--latent-search-points", type=int, default=None, metavar="G",
                     help="candidate latents per image in a latent search (zdim 1: a grid along the latents; "
                          "more: around the encoder's mean) [32]")


def _config_from_args(args: argparse.Namespace):
    from cryoscape.train.config import TrainConfig

    defaults = TrainConfig()

    def pick(value, default):
        return default if value is None else value

    return TrainConfig(
        particles=args.particles, poses=args.poses, ctf=args.ctf, datadir=args.datadir,
        ind=args.ind,
        first=args.first,
        pixel_size_angstrom=args.pixel_size_angstrom,
        use_ctf=not args.no_ctf,
        invert_data=not args.uninvert_data,
        window=args.window,
        window_inner_radius_fraction=args.window_r,
        window_outer_radius_fraction=args.window_r_outer,
        lazy=args.lazy,
        shuffle_chunk=args.shuffle_chunk,
        cache_dir=args.cache_dir,
        n_normalization_images=args.norm_images,
        tilt=args.tilt,
        tilt_poses=args.tilt_poses,
        tilt_ctf=args.tilt_ctf,
        tilt_deg=args.tilt_deg,
        zdim=args.zdim,
        decoder=args.decoder,
        decoder_options=dict(args.decoder_opt),
        dec_layers=args.dec_layers,
        dec_dim=args.dec_dim,
        domain=args.domain,
        pe_type=args.pe_type,
        pe_dim=args.pe_dim,
        gaussian_scale=args.gaussian_scale,
        encoder=args.encoder,
        enc_layers=args.enc_layers,
        enc_dim=args.enc_dim,
        enc_mask_radius_fraction=args.enc_mask_radius_fraction,
        enc_lowpass_fraction=args.enc_lowpass_fraction,
        noise_model=args.noise_model,
        num_epochs=pick(args.num_epochs, defaults.num_epochs),
        batch_size=args.batch_size,
        lr=args.lr,  # None: the decoder's default
        weight_decay=pick(args.weight_decay, defaults.weight_decay),
        beta=args.beta,
        beta_anneal_epochs=args.beta_anneal_epochs,
        band_start=args.band_start,
        band_epochs=args.band_epochs,
        refine_poses=args.refine_poses,
        refine_shifts=not args.no_refine_shifts,
        pose_lr=pick(args.pose_lr, defaults.pose_lr), pose_lr_decay=args.pose_lr_decay,
        pose_representation=args.pose_representation,
        pose_start_epoch=args.pose_start_epoch,
        pose_source=args.pose_source,
        pose_encoder_layers=args.pose_encoder_layers,
        pose_encoder_dim=args.pose_encoder_dim,
        pose_pretrain_epochs=args.pose_pretrain_epochs,
        pose_encoder_lr=args.pose_encoder_lr,
        pose_encoder=args.pose_encoder,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        amp=args.amp,
        device=pick(args.device, defaults.device),
        prefetch=pick(args.prefetch, defaults.prefetch),
        checkpoint_every=pick(args.checkpoint_every, defaults.checkpoint_every),
        checkpoint_minutes=pick(args.checkpoint_minutes, defaults.checkpoint_minutes),
        warm_start_images=pick(args.warm_start_images, defaults.warm_start_images),
        refit=pick(args.refit, defaults.refit),
        refit_every=pick(args.refit_every, defaults.refit_every),
        refit_latents=pick(args.refit_latents, defaults.refit_latents),
        refit_latent_candidates=pick(args.refit_latent_candidates, defaults.refit_latent_candidates),
        latent_search_epochs=args.latent_search_epochs,
        latent_search_points=pick(args.latent_search_points, defaults.latent_search_points),
        init_encoder=args.init_encoder, teacher_epochs=args.teacher_epochs,
        progress=not args.no_progress,
    )


def _atomic_options(args: argparse.Namespace, config) -> None:
    """``--reference`` as the atomic decoder's options, with the data's pixel size (its centres are in angstroms)."""
    from cryoscape.errors import InputError

    if args.reference and args.decoder != "atomic":
        raise InputError("--reference is the reference model of the atomic decoder; pass --decoder atomic with it.")
    if args.decoder != "atomic":
        return
    if args.reference:  # without one: the built-in hinge molecule (cryoscape simulate's default)
        config.decoder_options.setdefault("reference", args.reference)
    if "pixel_size_angstrom" not in config.decoder_options:
        import numpy as np

        from cryoscape.train.inputs import load_tables

        table, _ = load_tables(config)
        config.decoder_options["pixel_size_angstrom"] = float(np.median(table.pixel_size_angstrom))


def run(args: argparse.Namespace) -> int:
    from cryoscape.errors import InputError
    from cryoscape.train.loop import resume_training, run_training

    arguments = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    if args.resume:
        result = resume_training(
            args.resume,
            arguments=arguments,
            num_epochs=args.num_epochs,
            lr=args.lr,
            weight_decay=args.weight_decay,
            pose_lr=args.pose_lr,
            device=args.device,
            progress=False if args.no_progress else None,
            checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
            prefetch=args.prefetch,
            datadir=args.datadir,
            amp=args.amp,
            lazy=True if args.lazy else None, cache_dir=args.cache_dir,
        )
    else:
        if not args.particles:
            raise InputError("no particles were given; pass a .star, .cs, .txt or .mrcs file (or --resume RUN).")
        if not args.outdir:
            raise InputError("no output folder was given; pass -o RUN_FOLDER.")
        config = _config_from_args(args)
        _atomic_options(args, config)
        try:
            config.validate()
        except ValueError as err:
            raise InputError(f"{err}.") from None
        result = run_training(config, args.outdir, arguments=arguments, init_from=args.load)
    if result.history and os.environ.get("RANK", "0") == "0":  # torchrun: process 0 reports
        last = result.history[-1]
        print(f"trained {result.epochs_done} epochs; final loss {last['loss']:.5g}; run folder {result.out_dir}")
    return 0
