"""Key acceptance test: projecting a sum of Gaussians through the Fourier slice pipeline
(prepare_projection_volume + project_prepared) gives the analytic line integrals."""

import math

import numpy as np
import pytest
import torch

from cryoscape.fourier.fft import ifft2_center
from cryoscape.fourier.slicing import prepare_projection_volume, project_prepared
from cryoscape.geometry.rotations import random_rotations
from cryoscape.simulate.volumes import GAUSSIAN_SIGMA_PER_RESOLUTION, render_gaussian_atoms


def analytic_projection(coords_px, weights, rotations, sigma_px, D):
    """sum_j w_j / (2 pi s^2) exp(-|p - (R X_j)_xy|^2 / (2 s^2)) on the pixel grid (origin D//2).

    A 3-D Gaussian of amplitude A = w / ((2 pi)^(3/2) s^3) integrates along z to
    A sqrt(2 pi) s times the 2-D Gaussian of the same s."""
    c = np.arange(D) - D // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    out = np.zeros((len(rotations), D, D))
    for n, R in enumerate(rotations):
        centres = coords_px @ R.T  # (R X)
        for (cx, cy, _), w in zip(centres, weights):
            amplitude = w / ((2 * math.pi) ** 1.5 * sigma_px**3) * math.sqrt(2 * math.pi) * sigma_px
            out[n] += amplitude * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma_px**2))
    return out


@pytest.mark.parametrize("D", [32, 33])
@pytest.mark.parametrize("sigma_px", [1.5, 2.5])
def test_projection_of_gaussians_matches_analytic(D, sigma_px):
    rng = np.random.default_rng(D)
    n_atoms = 5
    # a compact "molecule": centres within a quarter of the box from the centre (trilinear
    # interpolation with 2x padding loses accuracy towards the box edge)
    radius = D / 4
    directions = rng.normal(size=(n_atoms, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    coords = directions * rng.uniform(0.0, 1.0, size=(n_atoms, 1)) ** (1 / 3) * radius
    weights = rng.uniform(0.5, 2.0, size=n_atoms)
    pixel = 1.0
    volume = render_gaussian_atoms(
        coords, weights, box_size=D, pixel_size_angstrom=pixel,
        resolution_angstrom=sigma_px * pixel / GAUSSIAN_SIGMA_PER_RESOLUTION,
    )
    rotations = random_rotations(6, generator=torch.Generator().manual_seed(D), dtype=torch.float64)
    prepared = prepare_projection_volume(torch.from_numpy(volume.astype(np.float64)), oversampling=2)
    images_ft = project_prepared(prepared, rotations, box_size=D, return_fourier=True)
    images = ifft2_center(images_ft).real.numpy()
    expected = analytic_projection(coords, weights, rotations.numpy(), sigma_px, D)
    for got, want in zip(images, expected):
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 0.02, rel
