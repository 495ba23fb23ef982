"""``cryoscape simulate``: a synthetic dataset with its ground truth (see cryoscape.simulate)."""

from __future__ import annotations

import argparse
import math

HELP = "Simulate particle images (poses, CTF, noise) of a heterogeneous molecule, with ground truth."
EXAMPLE = "cryoscape simulate -o sim_hinge -n 10000 -D 64 --snr 0.1 --shift-max-pixel 4"


def _snr(text: str) -> float | None:
    if text.lower() in ("inf", "none", "noiseless"):
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"SNR must be positive (or 'inf' for no noise), got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--outdir", required=True, help="output folder (created)")
    out.add_argument("-n", "--n-images", type=int, default=1000, help="number of images (default 1000)")
    out.add_argument("-D", "--box-size", type=int, default=None,
                     help="box size in pixels (default 64; a map's own box for --molecule MAP)")
    out.add_argument("--pixel-size", type=float, default=None, metavar="ANGSTROM",
                     help="pixel size (default: the built-in molecule fills ~60%% of the box, i.e. 3.906 A at "
                          "D=64; a map's own; 60%% fill for atomic models)")

    mol = parser.add_argument_group("molecule and heterogeneity")
    mol.add_argument("--molecule", default="hinge", metavar="hinge|PATH",
                     help="'hinge' (built-in body with a domain on a hinge, default) or a .mrc/.pdb/.cif file")
    mol.add_argument("--heterogeneity", choices=("none", "hinge", "discrete", "trajectory"), default=None,
                     help="default: hinge for the built-in molecule, none for a file, discrete with --classes, "
                          "trajectory with --trajectory")
    mol.add_argument("--classes", nargs="+", metavar="FILE", default=None,
                     help="maps/atomic models of discrete classes")
    mol.add_argument("--populations", nargs="+", type=float, default=None,
                     help="relative population of each class (default equal)")
    mol.add_argument("--trajectory", nargs="+", metavar="FILE", default=None,
                     help="maps/atomic models along a 1-D trajectory, in order")
    mol.add_argument("--n-classes", type=int, default=None,
                     help="built-in molecule, discrete: number of hinge angles (default 3)")
    mol.add_argument("--hinge-range-deg", nargs=2, type=float, default=(0.0, 60.0), metavar=("MIN", "MAX"),
                     help="range of hinge angles in degrees (default 0 60)")
    mol.add_argument("--hinge-states", type=int, default=40,
                     help="number of ground-truth volumes rendered over the hinge range (default 40)")
    mol.add_argument("--resolution-angstrom", type=float, default=None,
                     help="atoms are Gaussians of sigma = 0.225 * resolution (default 3 pixels)")

    img = parser.add_argument_group("image formation")
    img.add_argument("--snr", type=_snr, default=0.1,
                     help="signal variance / noise variance over the whole box (default 0.1; 'inf' for none)")
    img.add_argument("--defocus-range-angstrom", nargs=2, type=float, default=(10000.0, 25000.0),
                     metavar=("MIN", "MAX"), help="defocus U drawn uniformly in this range (default 10000 25000)")
    img.add_argument("--astigmatism-angstrom", type=float, default=0.0,
                     help="defocus V = U - delta, delta uniform in [0, this] (default 0)")
    img.add_argument("--voltage-kv", type=float, default=300.0, help="default 300")
    img.add_argument("--cs-mm", type=float, default=2.7, help="spherical aberration (default 2.7)")
    img.add_argument("--amplitude-contrast", type=float, default=0.1, help="default 0.1")
    img.add_argument("--b-factor", type=float, default=0.0, metavar="ANGSTROM2",
                     help="CTF envelope B-factor in A^2 (default 0: none)")
    img.add_argument("--shift-max-pixel", type=float, default=0.0,
                     help="shifts uniform in [-s, s]^2 pixels (default 0)")
    img.add_argument("--oversampling", type=int, default=2,
                     help="zero-padding factor of the projector (default 2; 3 is more exact, ~1.5x slower)")

    run_ = parser.add_argument_group("run")
    run_.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    run_.add_argument("--batch-size", type=int, default=None, help="images per batch (default: by box size)")
    run_.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'...")


def run(args: argparse.Namespace) -> int:
    """Build the ensemble, simulate, write the dataset."""
    import torch

    from cryoscape.errors import InputError
    from cryoscape.simulate.dataset import simulate_dataset
    from cryoscape.simulate.ensembles import build_ensemble

    if args.n_images < 1:
        raise InputError(f"-n {args.n_images} is not a positive number of images; pass -n 1 or more.")
    if args.box_size is not None and args.box_size < 8:
        raise InputError(f"-D {args.box_size} is too small a box; pass -D 8 or more (e.g. 64).")
    if args.pixel_size is not None and not args.pixel_size > 0:
        raise InputError(f"--pixel-size {args.pixel_size} is not positive; pass the pixel size in angstroms.")
    lo, hi = args.defocus_range_angstrom
    if not (0 <= lo <= hi):
        raise InputError(f"--defocus-range-angstrom {lo:g} {hi:g} is not a range; pass MIN MAX with 0 <= MIN <= MAX.")
    if args.oversampling < 1:
        raise InputError(f"--oversampling {args.oversampling} must be 1 or more (2 is the default).")
    if args.astigmatism_angstrom < 0 or args.shift_max_pixel < 0:
        raise InputError("--astigmatism-angstrom and --shift-max-pixel must not be negative.")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    ensemble = build_ensemble(
        molecule=args.molecule,
        heterogeneity=args.heterogeneity,
        classes=args.classes,
        populations=args.populations,
        trajectory=args.trajectory,
        n_classes=args.n_classes,
        hinge_range_deg=args.hinge_range_deg,
        hinge_states=args.hinge_states,
        box_size=args.box_size,
        pixel_size_angstrom=args.pixel_size,
        resolution_angstrom=args.resolution_angstrom,
    )
    arguments = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    out = simulate_dataset(
        args.outdir,
        ensemble=ensemble,
        n_images=args.n_images,
        seed=args.seed,
        snr=args.snr,
        defocus_range_angstrom=args.defocus_range_angstrom,
        astigmatism_angstrom=args.astigmatism_angstrom,
        voltage_kv=args.voltage_kv,
        cs_mm=args.cs_mm,
        amplitude_contrast=args.amplitude_contrast,
        b_factor_angstrom2=args.b_factor,
        shift_max_pixel=args.shift_max_pixel,
        batch_size=args.batch_size,
        device=device,
        oversampling=args.oversampling,
        progress=True,
        arguments=arguments,
    )
    snr = "inf" if args.snr is None or not math.isfinite(args.snr) else f"{args.snr:g}"
    print(
        f"wrote {args.n_images} images ({ensemble.box_size}x{ensemble.box_size}, "
        f"{ensemble.pixel_size_angstrom:g} A/pixel, {ensemble.kind}, {ensemble.n_states} volume(s), SNR {snr}) to {out}/"
    )
    return 0
