"""``cryoscape simulate``: a synthetic dataset with its ground truth (see cryoscape.simulate)."""

from __future__ import annotations

import argparse
import math

HELP = ("Simulate particle images (poses, CTF, noise) of a heterogeneous molecule, with ground truth; "
        "'simulate micrographs' makes whole micrographs.")
EXAMPLE = ("cryoscape simulate -o sim_hinge -n 10000 -D 64 --snr 0.1 --shift-max-pixel 4\n"
           "  cryoscape simulate micrographs -o sim_mics --n-micrographs 20 --micrograph-size 1024 -D 64 --snr 0.1")


def _snr(text: str) -> float | None:
    if text.lower() in ("inf", "none", "noiseless"):
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"SNR must be positive (or 'inf' for no noise), got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument("mode", nargs="?", choices=("particles", "micrographs"), default="particles",
                        help="particles (a particle stack, the default) or micrographs (whole micrographs)")
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
    mol.add_argument("--atomic-trajectory", metavar="FILE", default=None,
                     help="a multi-model PDB/mmCIF, one state per model along a 1-D path (ground-truth coordinates "
                          "in gt_atomic.npz and gt_models.pdb)")
    mol.add_argument("--bond-rotation-deg", nargs=2, type=float, default=None, metavar=("MIN", "MAX"),
                     help="with --molecule MODEL.pdb: states turning the CA-C bond of --bond-residue from MIN to MAX "
                          "degrees (thesis ch. 7's 1-D motion)")
    mol.add_argument("--bond-residue", type=int, default=None,
                     help="0-based residue of the first chain whose CA-C bond turns (default: the middle one)")
    mol.add_argument("--atomic-states", type=int, default=20,
                     help="number of bond-rotation states (default 20)")
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

    mic = parser.add_argument_group("micrographs mode")
    mic.add_argument("--n-micrographs", type=int, default=10, help="number of micrographs (default 10)")
    mic.add_argument("--micrograph-size", type=int, nargs="+", default=[1024], metavar="PIXELS",
                     help="micrograph size: one number (square) or HEIGHT WIDTH (default 1024)")
    mic.add_argument("--particles-per-micrograph", type=int, default=20, help="default 20")
    mic.add_argument("--placement", choices=("separated", "arbitrary"), default="separated",
                     help="separated: box centres at least 2 D apart along x or y, so a D x D patch cuts at most "
                          "one particle (default); arbitrary: boxes only kept disjoint (D apart)")
    mic.add_argument("--min-distance-pixel", type=float, default=None,
                     help="Chebyshev distance between centres (overrides --placement; below D projections overlap)")
    mic.add_argument("--hinge-angle-deg", type=float, default=None,
                     help="built-in molecule at this one hinge angle (micrographs default: 0)")

    run_ = parser.add_argument_group("run")
    run_.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    run_.add_argument("--batch-size", type=int, default=None, help="images per batch (default: by box size)")
    run_.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1'...")


def _run_micrographs(args: argparse.Namespace, ensemble, device) -> int:
    from cryoscape.errors import InputError
    from cryoscape.simulate.micrographs import simulate_micrographs

    size = args.micrograph_size
    if len(size) not in (1, 2) or min(size) < 2 * ensemble.box_size:
        raise InputError(f"--micrograph-size {' '.join(map(str, size))} must be one or two sizes of at least 2 D "
                         f"({2 * ensemble.box_size} pixels).")
    if args.n_micrographs < 1 or args.particles_per_micrograph < 0:
        raise InputError("--n-micrographs must be positive and --particles-per-micrograph not negative.")
    shape = (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
    spacing = args.min_distance_pixel
    if spacing is None:
        spacing = (2 if args.placement == "separated" else 1) * ensemble.box_size
    arguments = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    out = simulate_micrographs(
        args.outdir, ensemble=ensemble, n_micrographs=args.n_micrographs,
        particles_per_micrograph=args.particles_per_micrograph, shape=shape, min_distance_pixel=spacing,
        snr=args.snr, seed=args.seed, device=device, progress=True, arguments=arguments,
        defocus_range_angstrom=args.defocus_range_angstrom, astigmatism_angstrom=args.astigmatism_angstrom,
        voltage_kv=args.voltage_kv, cs_mm=args.cs_mm, amplitude_contrast=args.amplitude_contrast,
        b_factor_angstrom2=args.b_factor,
    )
    print(f"wrote {args.n_micrographs} micrographs of {shape[1]}x{shape[0]} pixels with "
          f"{args.particles_per_micrograph} particles each (box {ensemble.box_size}, "
          f"{ensemble.pixel_size_angstrom:g} A/pixel) to {out}/")
    return 0


def _atomic_trajectory(args: argparse.Namespace):
    """``(AtomicTrajectory, Ensemble)`` for --atomic-trajectory / --bond-rotation-deg, else ``None``."""
    if args.atomic_trajectory is None and args.bond_rotation_deg is None:
        return None
    from cryoscape.errors import InputError
    from cryoscape.simulate.atomic_trajectory import atomic_trajectory, atomic_trajectory_ensemble

    path = args.atomic_trajectory or (None if args.molecule == "hinge" else args.molecule)
    if path is None:
        raise InputError("--bond-rotation-deg turns a bond of an atomic model; pass --molecule MODEL.pdb with it.")
    if args.pixel_size is None:
        raise InputError("an atomic trajectory needs the pixel size; pass --pixel-size ANGSTROM.")
    traj = atomic_trajectory(path, bond_rotation_deg=args.bond_rotation_deg, n_states=args.atomic_states,
                             bond_residue=args.bond_residue)
    return traj, atomic_trajectory_ensemble(traj, box_size=args.box_size or 64, pixel_size_angstrom=args.pixel_size,
                                            resolution_angstrom=args.resolution_angstrom)


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

    micrographs = args.mode == "micrographs"
    hinge_range = args.hinge_range_deg
    heterogeneity = args.heterogeneity
    if micrographs and heterogeneity is None and not (args.classes or args.trajectory):
        heterogeneity = "none"
    if args.hinge_angle_deg is not None:
        hinge_range, heterogeneity = (args.hinge_angle_deg, args.hinge_angle_deg + 1.0), heterogeneity or "none"
    atomic = _atomic_trajectory(args)
    ensemble = atomic[1] if atomic else build_ensemble(
        molecule=args.molecule,
        heterogeneity=heterogeneity,
        classes=args.classes,
        populations=args.populations,
        trajectory=args.trajectory,
        n_classes=args.n_classes,
        hinge_range_deg=hinge_range,
        hinge_states=args.hinge_states,
        box_size=args.box_size,
        pixel_size_angstrom=args.pixel_size,
        resolution_angstrom=args.resolution_angstrom,
    )
    if micrographs:
        return _run_micrographs(args, ensemble, device)
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
    if atomic:
        from cryoscape.simulate.atomic_trajectory import write_atomic_truth

        write_atomic_truth(out, atomic[0])
    snr = "inf" if args.snr is None or not math.isfinite(args.snr) else f"{args.snr:g}"
    print(
        f"wrote {args.n_images} images ({ensemble.box_size}x{ensemble.box_size}, "
        f"{ensemble.pixel_size_angstrom:g} A/pixel, {ensemble.kind}, {ensemble.n_states} volume(s), SNR {snr}) to {out}/"
    )
    return 0
