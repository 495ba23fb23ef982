"""``cryoscape evaluate``: score a run (or another tool's output) against a simulated dataset's truth."""

from __future__ import annotations

import argparse

HELP = ("Evaluate against the ground truth of a simulated dataset: per-image FSC (100 images, AUC, FSC=0.5/0.143), "
        "latent vs true coordinate, clusters vs true classes (ARI), poses.")
EXAMPLE = ("cryoscape evaluate run/ --truth sim/   (another tool: cryoscape evaluate --truth sim/ --z z.50.pkl "
           "-o eval/, decode eval/eval_z.txt into maps/, then add --maps maps/; real data: cryoscape evaluate "
           "--poses abinit/poses.19.pkl --reference-poses refined.star -o eval/)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", default=None,
                        help="the output folder of cryoscape train or abinit (optional with --z/--maps/--poses)")
    parser.add_argument("--truth", "--dataset", dest="truth",
                        help="the output folder of cryoscape simulate (ground_truth.npz, gt_volumes/)")
    parser.add_argument("--reference-poses", metavar="FILE",
                        help="real data: score --poses (or the run's poses) against this refinement (.star, .cs, "
                             "poses.pkl) instead of a simulated truth")
    parser.add_argument("-o", "--outdir", default=None, help="output folder (default: RUN/evaluate.EPOCH)")
    parser.add_argument("--epoch", type=int, default=None, help="weights and latents of this epoch (default: latest)")
    parser.add_argument("--n-images", type=int, default=100, help="images for the per-image FSC, evenly spaced [100]")
    parser.add_argument("--box-size", type=int, default=None,
                        help="decode the run's maps at this box (default: the training box); with --reference-poses: "
                             "the box of cryoDRGN poses.pkl shifts (box fractions)")
    parser.add_argument("--z", dest="z_path", metavar="FILE", help="latents of another tool (.pkl/.npy/.txt, N x zdim)")
    parser.add_argument("--maps", dest="maps_dir", metavar="DIR",
                        help="one map per evaluated image (sorted by the number in the name), e.g. from cryodrgn "
                             "eval_vol --zfile OUT/eval_z.txt")
    parser.add_argument("--ind", metavar="FILE",
                        help="dataset rows of the particles (the --ind used for training); overrides the run's record")
    parser.add_argument("--labels", metavar="FILE", help="per-particle cluster labels to score (default: k-means of z)")
    parser.add_argument("--n-clusters", type=int, default=None,
                        help="k of that k-means (default: the number of true classes)")
    parser.add_argument("--poses", metavar="FILE",
                        help="predicted poses (poses.pkl, .npz, .star, .cs) to score (default: the run's poses.EPOCH file, "
                             "if any)")
    parser.add_argument("--true-model", metavar="PDB",
                        help="atomic decoder runs: the true atomic model(s) (.pdb/.cif, one model or one per state) for "
                             "C-alpha RMSE, %% within 3 A and volume NMSE (default: the dataset's gt_models.pdb)")
    parser.add_argument("--invert-maps", action="store_true", help="negate the maps before the FSC")
    parser.add_argument("--flip-maps", action="store_true", help="mirror the maps (reverse z) before the FSC")
    parser.add_argument("--seed", type=int, default=0, help="seed of the k-means [0]")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from cryoscape.cli.common import resolve_device
    from cryoscape.errors import InputError
    from cryoscape.report.evaluate import run_evaluation

    if args.reference_poses is not None:
        return _against_reference(args)
    if args.truth is None:
        raise InputError("pass the simulated dataset with --truth (or a reference refinement with "
                         "--reference-poses to score poses on real data).")
    ev = run_evaluation(
        args.truth, run_dir=args.run, epoch=args.epoch, z_path=args.z_path, ind=args.ind, maps_dir=args.maps_dir,
        n_images=args.n_images, box_size=args.box_size, labels=args.labels, n_clusters=args.n_clusters,
        poses=args.poses, invert_maps=args.invert_maps, flip_maps=args.flip_maps, out_dir=args.outdir,
        device=resolve_device(args.device), seed=args.seed, progress=not args.no_progress, true_model=args.true_model,
    )
    if ev.fsc is not None:
        f = ev.fsc
        print(f"per-image FSC ({len(f.auc)} images): AUC {f.auc.mean():.3f} mean / {np.median(f.auc):.3f} median; "
              f"FSC=0.5 at {f.angstrom(f.res_0_5.mean()):.2f} A, FSC=0.143 at {f.angstrom(f.res_0_143.mean()):.2f} A "
              "(mean frequency)")
    if ev.latent is not None:
        print(f"latent PC1 vs true {ev.latent.get('coordinate', 'coordinate')}: |Spearman rho| "
              f"{ev.latent['spearman_pc1']:.3f}")
    if ev.clusters is not None:
        print(f"clusters vs true classes: ARI {ev.clusters['adjusted_rand_index']:.3f}")
    if ev.poses is not None:
        _print_poses(ev.poses)
    if ev.atomic is not None:
        a = ev.atomic
        print(f"atomic model ({len(a['states'])} state(s)): C-alpha RMSE {a['mean_ca_rmse_angstrom']:.2f} A mean / "
              f"{a['max_ca_rmse_angstrom']:.2f} A max, {a['mean_percent_within']:.1f}% within "
              f"{a['cutoff_angstrom']:g} A, volume NMSE {a['mean_volume_nmse']:.3f}")
    for note in ev.notes:
        print(f"note: {note}")
    print(f"report: {ev.out_dir / 'report.html'}")
    return 0


def _print_poses(p: dict) -> None:
    shifts = (f"; shift error {p['translation_pixel_median']:.2f} px median" if "translation_pixel_median" in p
              else "")
    print(f"poses: rotation error {p['rotation_frobenius_median']:.4f} median squared Frobenius, "
          f"{p['angle_deg_median']:.2f} deg median{', mirrored map' if p['handedness_flipped'] else ''}{shifts}")


def _against_reference(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cryoscape.analysis.evaluate import evaluate_poses_against_reference
    from cryoscape.errors import InputError

    poses = args.poses or args.run
    if poses is None:
        raise InputError("pass the poses to score with --poses (or a run folder) together with --reference-poses.")
    out = Path(args.outdir) if args.outdir else (Path(args.run) / "evaluate.poses" if args.run else None)
    if out is None:
        raise InputError("pass an output folder with -o.")
    summary = evaluate_poses_against_reference(poses, args.reference_poses, out, ind=args.ind, box_size=args.box_size)
    _print_poses(summary)
    print(f"wrote {out / 'evaluation.yaml'}")
    return 0
