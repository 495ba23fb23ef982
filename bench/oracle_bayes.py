"""How well can ANY method place an image on the trajectory?  The Bayes limit of a simulated dataset (issue 19).

    .venv/bin/python bench/oracle_bayes.py DATA_FOLDER [RUN_FOLDER ...] [--n-images N]

For the first N images of a ``cryoscape simulate`` dataset with discrete states (the 1A8O bond
rotation's 20, the hinge's 40), every state's clean image is rendered at the image's true pose and
CTF exactly as the simulator made it (same projector, oversampling 2), and the exact posterior over
the states follows from the simulator's white Gaussian noise (its ``noise_std``) and the states'
equal populations.  Its posterior-mean state value is the best estimate of the coordinate any
method can make from one image knowing the true maps and poses; the script prints its R^2 against
the true state value, the MAP state's accuracy and the posterior's spread.  For each ``RUN_FOLDER``
(a finished ``cryoscape train`` run on the same data), the same R^2 of its last latents (5-fold
k-nearest-neighbour regression of the state value from the latent means, as
bench/oracle_diagnostics.py) is printed beside it.

A research tool for the oracle benchmark's 1A8O gap: if the Bayes limit is near the learnt latents'
R^2, better latent inference cannot close the gap.  Results: bench/results/oracle_2026-12-04_bayes.txt.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from cryoscape.analysis.evaluate import load_ground_truth
from cryoscape.io.mrc import open_stack, read_mrc
from cryoscape.io.particles import CtfParameters
from cryoscape.fourier.slicing import prepare_projection_volume
from cryoscape.simulate.images import ImageParameters, render_clean_images


def image_parameters(data: Path) -> tuple[ImageParameters, np.ndarray, float]:
    """The simulator's per-image ground truth, the states' values and its noise std."""
    z = np.load(data / "ground_truth.npz")
    n = len(z["state_index"])
    full = lambda key: np.full(n, float(z[key]))  # noqa: E731
    ctf = CtfParameters(defocus_u_angstrom=z["defocus_u_angstrom"], defocus_v_angstrom=z["defocus_v_angstrom"],
                        defocus_angle_deg=z["defocus_angle_deg"], voltage_kv=full("voltage_kv"), cs_mm=full("cs_mm"),
                        amplitude_contrast=full("amplitude_contrast"), phase_shift_deg=np.zeros(n))
    params = ImageParameters(rotations=z["rotations"], shifts_pixel=z["shifts_pixel"], ctf=ctf,
                             b_factor_angstrom2=float(z["b_factor_angstrom2"]), state_index=z["state_index"],
                             coordinate=z["coordinate"], box_size=int(z["box_size"]),
                             pixel_size_angstrom=float(z["pixel_size_angstrom"]))
    return params, z["state_values"].astype(np.float64), float(z["noise_std"])


def low_passed(volume: np.ndarray, resolution_angstrom: float | None, pixel_angstrom: float) -> np.ndarray:
    """``volume`` with every Fourier component beyond ``1 / resolution_angstrom`` removed (None: as is)."""
    if resolution_angstrom is None:
        return volume
    D = volume.shape[0]
    k = np.fft.fftfreq(D, d=pixel_angstrom)
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    return np.fft.ifftn(np.fft.fftn(volume) * (radius <= 1.0 / resolution_angstrom)).real


def state_log_likelihoods(data: Path, params: ImageParameters, index: np.ndarray, noise_std: float,
                          resolution_angstrom: float | None = None) -> np.ndarray:
    """``(n, S)`` Gaussian log-likelihoods of the images ``index`` under every state's clean image
    (rendered from the state's map low-passed to ``resolution_angstrom``, or as it is)."""
    truth = load_ground_truth(data)
    images = torch.as_tensor(open_stack(data / "particles.mrcs").read(index), dtype=torch.float64)
    out = np.zeros((len(index), len(truth.volume_files)))
    for s, path in enumerate(truth.volume_files):
        volume = low_passed(read_mrc(path)[0].astype(np.float64), resolution_angstrom, params.pixel_size_angstrom)
        prepared = prepare_projection_volume(torch.as_tensor(volume), oversampling=2)
        for start in range(0, len(index), 256):
            block = index[start:start + 256]
            clean = render_clean_images(prepared, params, block)
            residual = images[start:start + 256] - clean
            out[start:start + len(block), s] = (-residual.square().sum((-1, -2)) / (2 * noise_std ** 2)).numpy()
    return out


def knn_r2(z: np.ndarray, target: np.ndarray) -> float:
    from sklearn.model_selection import cross_val_predict
    from sklearn.neighbors import KNeighborsRegressor

    predicted = cross_val_predict(KNeighborsRegressor(n_neighbors=20), z, target, cv=5)
    return 1 - float(np.mean((predicted - target) ** 2) / np.var(target))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path)
    p.add_argument("runs", type=Path, nargs="*")
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--lowpass-angstrom", type=float, default=None,
                   help="render the states from their maps low-passed to this resolution (maps as good as a "
                        "reconstruction's): how much does the limit owe to the fine detail?")
    args = p.parse_args(argv)
    params, values, noise_std = image_parameters(args.data)
    index = np.arange(min(args.n_images, len(params)))
    ll = state_log_likelihoods(args.data, params, index, noise_std, args.lowpass_angstrom)
    post = np.exp(ll - ll.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    true_value = values[params.state_index[index]]
    mean = post @ values
    sd = np.sqrt(np.maximum(post @ values ** 2 - mean ** 2, 0))
    r2 = 1 - float(np.mean((mean - true_value) ** 2) / np.var(true_value))
    step = float(np.median(np.diff(values)))
    print(f"# {args.data}: {len(index)} images, {len(values)} states (step {step:.4f}), noise std {noise_std:.4f}, "
          f"maps {'as simulated' if args.lowpass_angstrom is None else f'low-passed to {args.lowpass_angstrom} A'}")
    print(f"Bayes posterior-mean state value R^2 vs truth: {r2:.4f}")
    print(f"Bayes posterior-mean rms error: {math.sqrt(np.mean((mean - true_value) ** 2)):.4f} "
          f"({math.sqrt(np.mean((mean - true_value) ** 2)) / step:.2f} state steps)")
    print(f"MAP state accuracy: {np.mean(post.argmax(1) == params.state_index[index]):.3f}; within one state: "
          f"{np.mean(np.abs(post.argmax(1) - params.state_index[index]) <= 1):.3f}")
    print(f"posterior sd, median: {np.median(sd) / step:.2f} state steps; posterior mass on the true state, "
          f"median: {np.median(post[np.arange(len(index)), params.state_index[index]]):.3f}")
    print(f"k-NN R^2 of the Bayes posterior mean (same protocol as the runs): {knn_r2(mean[:, None], true_value):.4f}")
    for run in args.runs:
        last = max(run.glob("z.*.npy"), key=lambda f: int(f.stem.split(".")[1]))
        z = np.load(last)[index]
        print(f"{run}: k-NN R^2 of {last.name} vs state value: {knn_r2(z, true_value):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
