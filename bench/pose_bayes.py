"""How far can ANY refinement bring perturbed poses at a given SNR?  The Bayes limit of local pose refinement (issue 15).

    .venv/bin/python bench/pose_bayes.py DATA_FOLDER [--n-images 100] [--snr 0.1 0.01 0.001]

bench/cryoformer.py asks CryoFormer's refinement to halve a 5-degree rotation error at SNR 0.1,
0.01 and 0.001 (D=64 hinge).  This script measures what the images allow at best: for the first
N images of a ``cryoscape simulate`` dataset (its states' maps, true poses and CTF), each image
is re-rendered clean exactly as the simulator renders it, Gaussian noise is added at each
``--snr`` (the simulator's definition: signal variance over noise variance), its rotation is
turned by ``--perturb-deg`` about a random axis (bench/cryoformer.py's perturbation), and the exact
posterior over rotations on a local grid around that perturbed pose (rotation vectors of step
``--step-deg`` within ``--radius-deg``) is computed with the image's TRUE map, CTF and shift:
with a flat prior over the window (a local search) and with a Gaussian prior centred on the
perturbed pose (sd ``--perturb-deg`` per axis of the rotation vector: knowledge of the error's size).
The median rotation error of the posterior mean and of the MAP pose against the truth is printed
per SNR.  A refinement with learnt maps cannot do better than these.

``--learnt-run RUN --poses-in FILE``: the same local search on the dataset's own (noisy) images around
the poses in ``FILE`` (the perturbed poses RUN was trained on), once with each image's map decoded by
RUN at its latent (amplitude fitted per candidate, since a decoder's maps carry the data's
normalisation) and once with the true map: what a local pose search against learnt maps would give.
Results: bench/results/cryoformer_2026-12-04_pose_bayes.txt.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from cryoscape.analysis.evaluate import load_ground_truth
from cryoscape.fourier.slicing import prepare_projection_volume
from cryoscape.geometry.rotations import rotation_about_axis, rotation_angle_between, rotvec_to_matrix
from cryoscape.io.mrc import read_mrc
from cryoscape.simulate.images import ImageParameters, render_clean_images

from oracle_bayes import image_parameters  # noqa: E402  (bench/ is on sys.path when run as a script)


def local_grid(radius_deg: float, step_deg: float) -> np.ndarray:
    """Rotation vectors (radians) of a cubic grid of ``step_deg`` inside a ball of ``radius_deg``."""
    n = int(radius_deg // step_deg)
    axis = np.arange(-n, n + 1) * math.radians(step_deg)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    return grid[np.linalg.norm(grid, axis=1) <= math.radians(radius_deg) + 1e-9]


def candidates_of(params: ImageParameters, i: int, rotations: np.ndarray) -> ImageParameters:
    """Image ``i``'s parameters repeated for every candidate rotation."""
    k = len(rotations)
    pick = lambda a: np.repeat(np.asarray(a)[i:i + 1], k, axis=0)  # noqa: E731
    c = params.ctf
    ctf = type(c)(**{f: pick(getattr(c, f)) for f in c.__dataclass_fields__})
    return ImageParameters(rotations=rotations, shifts_pixel=pick(params.shifts_pixel), ctf=ctf,
                           b_factor_angstrom2=params.b_factor_angstrom2, state_index=pick(params.state_index),
                           coordinate=pick(params.coordinate), box_size=params.box_size,
                           pixel_size_angstrom=params.pixel_size_angstrom)


def posterior_mean_rotation(rotations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The rotation nearest (Frobenius) to the weighted mean of the matrices."""
    u, _, vt = np.linalg.svd(np.einsum("k,kij->ij", weights, rotations))
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def mean_and_map(candidates: np.ndarray, log_posterior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The posterior-mean rotation and the MAP candidate of one image's local search."""
    w = np.exp(log_posterior - log_posterior.max())
    return posterior_mean_rotation(candidates, w / w.sum()), candidates[int(np.argmax(log_posterior))]


def own_or_mean_map(decoder, z: np.ndarray, i: int, which: str, cache: dict) -> torch.Tensor:
    """Image ``i``'s map decoded at its own latent, or (``mean``) the one map at the latents' mean."""
    key = i if which == "own" else "mean"
    if key not in cache:
        zi = z[i] if which == "own" else z.mean(0)
        with torch.no_grad():
            cache[key] = decoder.eval_volume(torch.as_tensor(zi, dtype=torch.float32)).double()
    return cache[key]


def learnt_search(args) -> int:
    """The local search on the dataset's own images, with the run's decoded maps and with the true maps."""
    from cryoscape.io.cryodrgn import read_poses_pkl
    from cryoscape.io.mrc import open_stack
    from cryoscape.train.volumes import load_trained_model

    params, _, noise_std = image_parameters(args.data)
    truth = load_ground_truth(args.data)
    decoder, _, _ = load_trained_model(args.learnt_run)
    z = np.load(max(args.learnt_run.glob("z.*.npy"), key=lambda f: int(f.stem.split(".")[1])))
    R_in = read_poses_pkl(args.poses_in, box_size=params.box_size)[0]
    n = min(args.n_images, len(z))
    images = open_stack(args.data / "particles.mrcs").read(np.arange(n)).astype(np.float64)
    grid = rotvec_to_matrix(local_grid(args.radius_deg, args.step_deg))
    errors = {k: [] for k in ("input", "learnt_mean", "learnt_map", "true_mean", "true_map")}
    cache = {}
    for i in range(n):
        true = params.rotations[i]
        err = lambda R: float(np.degrees(rotation_angle_between(R, true)))  # noqa: E731
        cand = grid @ R_in[i]
        learnt = own_or_mean_map(decoder, z, i, args.learnt_latent, cache)
        true_map = torch.as_tensor(read_mrc(truth.volume_files[int(params.state_index[i])])[0], dtype=torch.float64)
        for key, volume in (("learnt", learnt), ("true", true_map)):
            rendered = render_clean_images(prepare_projection_volume(volume, oversampling=2),
                                           candidates_of(params, i, cand), np.arange(len(cand))).numpy()
            dot = (rendered * images[i]).sum((-1, -2))
            norm = (rendered ** 2).sum((-1, -2))
            logp = dot ** 2 / norm / (2 * noise_std ** 2)  # amplitude fitted per candidate (profile likelihood)
            mean, best = mean_and_map(cand, logp)
            errors[f"{key}_mean"].append(err(mean))
            errors[f"{key}_map"].append(err(best))
        errors["input"].append(err(R_in[i]))
    e = {k: float(np.median(v)) for k, v in errors.items()}
    print(f"# {args.data}: {n} images, their own noise; poses {args.poses_in}; maps of {args.learnt_run}; "
          f"local grid {len(grid)} rotations (step {args.step_deg} deg, radius {args.radius_deg} deg)")
    print(f"median rotation error: input {e['input']:.2f} deg; learnt maps: posterior mean {e['learnt_mean']:.2f}, "
          f"MAP {e['learnt_map']:.2f}; true maps: posterior mean {e['true_mean']:.2f}, MAP {e['true_map']:.2f}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--snr", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    p.add_argument("--perturb-deg", type=float, default=5.0)
    p.add_argument("--radius-deg", type=float, default=12.0)
    p.add_argument("--step-deg", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learnt-run", type=Path, default=None, help="a cryoscape train run on DATA (module docstring)")
    p.add_argument("--poses-in", type=Path, default=None, help="with --learnt-run: the poses it was trained on")
    p.add_argument("--learnt-latent", choices=("own", "mean"), default="own",
                   help="with --learnt-run: decode each image's map at its own latent or one map at the latents' mean")
    args = p.parse_args(argv)
    if args.learnt_run is not None:
        return learnt_search(args)
    params, _, _ = image_parameters(args.data)
    truth = load_ground_truth(args.data)
    rng = np.random.default_rng(args.seed)
    grid = rotvec_to_matrix(local_grid(args.radius_deg, args.step_deg))
    offsets_deg = np.degrees(np.linalg.norm(local_grid(args.radius_deg, args.step_deg), axis=1))
    n = min(args.n_images, len(params))
    print(f"# {args.data}: {n} images, D={params.box_size}; perturbation {args.perturb_deg} deg about a random axis; "
          f"local grid {len(grid)} rotations (step {args.step_deg} deg, radius {args.radius_deg} deg)")
    prepared = {}
    errors = {snr: {k: [] for k in ("input", "flat_mean", "flat_map", "prior_mean")} for snr in args.snr}
    clean_all, sq = [], []
    for i in range(n):
        s = int(params.state_index[i])
        if s not in prepared:
            prepared[s] = prepare_projection_volume(torch.as_tensor(read_mrc(truth.volume_files[s])[0],
                                                                    dtype=torch.float64), oversampling=2)
        clean = render_clean_images(prepared[s], params, np.array([i]))[0].numpy()
        axis = rng.normal(size=3)
        R_in = np.asarray(rotation_about_axis(axis / np.linalg.norm(axis), math.radians(args.perturb_deg))) \
            @ params.rotations[i]
        cand = grid @ R_in  # candidates turned about the perturbed pose, in the same (left) frame
        rendered = render_clean_images(prepared[s], candidates_of(params, i, cand), np.arange(len(cand))).numpy()
        clean_all.append((clean, rendered, cand, R_in))
        sq.append(np.var(clean))
    signal_variance = float(np.mean(sq))
    for snr in args.snr:
        noise_std = math.sqrt(signal_variance / snr)
        prior = -0.5 * (offsets_deg / args.perturb_deg) ** 2
        for i, (clean, rendered, cand, R_in) in enumerate(clean_all):
            image = clean + noise_std * rng.standard_normal(clean.shape)
            loglik = -((image[None] - rendered) ** 2).sum((-1, -2)) / (2 * noise_std ** 2)
            true = params.rotations[i]
            err = lambda R: float(np.degrees(rotation_angle_between(R, true)))  # noqa: E731
            for key, logp in (("flat", loglik), ("prior", loglik + prior)):
                mean, best = mean_and_map(cand, logp)
                errors[snr][f"{key}_mean"].append(err(mean))
                if key == "flat":
                    errors[snr]["flat_map"].append(err(best))
            errors[snr]["input"].append(err(R_in))
        e = {k: float(np.median(v)) for k, v in errors[snr].items()}
        print(f"SNR {snr:g}: median rotation error input {e['input']:.2f} deg; local search with the true map, "
              f"flat prior: posterior mean {e['flat_mean']:.2f}, MAP {e['flat_map']:.2f}; with the prior: "
              f"posterior mean {e['prior_mean']:.2f}  (refined / input {e['flat_mean'] / e['input']:.2f}, "
              f"with prior {e['prior_mean'] / e['input']:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
