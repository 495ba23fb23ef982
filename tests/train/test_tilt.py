"""Tilt pairs (thesis 3.7.2): the tilted pose is T(x, angle) @ R, both images enter the loss."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import yaml

from cryoscape.data.training import TrainingBatch, fourier_pixels, transform_at_pixels
from cryoscape.errors import InputError
from cryoscape.fourier.grids import grid_2d_index
from cryoscape.geometry.rotations import random_rotations
from cryoscape.io.mrc import read_mrc, write_mrc
from cryoscape.io.particles import load_particles
from cryoscape.simulate.ensembles import discrete_ensemble
from cryoscape.simulate.images import ImageParameters, simulate_images
from cryoscape.train.config import TrainConfig
from cryoscape.train.loop import batch_loss, run_training, tilt_rotation

from .test_likelihood import AnalyticGaussians, _blobs


def test_tilt_rotation_is_right_handed_about_image_x():
    T = tilt_rotation(30.0, dtype=torch.float64)
    torch.testing.assert_close(T @ torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([1.0, 0, 0], dtype=torch.float64))
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    torch.testing.assert_close(T @ torch.tensor([0, 1.0, 0], dtype=torch.float64), torch.tensor([0, c, s], dtype=torch.float64))


def _projections(D, blobs, R):
    g2 = grid_2d_index(D, dtype=torch.float64)
    out = torch.zeros(len(R), D, D, dtype=torch.float64)
    for a, c, s in blobs:
        p = (R @ c)[:, :2]
        out += a * math.sqrt(2 * math.pi) * s * torch.exp(-((g2[None] - p[:, None, None]) ** 2).sum(-1) / (2 * s * s))
    return out.float()


def _batch(D, images, R, pixels):
    n = len(R)
    return TrainingBatch(
        indices=torch.arange(n), images=images, values=transform_at_pixels(images, pixels),
        rotations=R.float(), shifts_pixel=torch.zeros(n, 2), ctf=torch.ones(n, len(pixels)),
    )


def test_both_images_of_a_pair_enter_the_loss_with_the_tilted_pose():
    D, tilt = 24, 45.0
    blobs = _blobs(D, seed=4)
    R = random_rotations(5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    T = tilt_rotation(tilt, dtype=torch.float64)
    pixels = fourier_pixels(D)
    batch = _batch(D, _projections(D, blobs, R), R, pixels)
    batch.tilted = _batch(D, _projections(D, blobs, T @ R), T @ R, pixels)
    decoder = AnalyticGaussians(box_size=D, blobs=blobs)
    signal = float((batch.values.abs() ** 2 @ pixels.weights).mean()) / pixels.n_circle

    def loss(tilt_deg):
        return float(batch_loss(batch, decoder=decoder, encoder=None, poses=None, pixels=pixels, domain="fourier",
                                beta=0.0, tilt_matrix=tilt_rotation(tilt_deg))["error"])

    assert loss(tilt) < 2e-3 * signal  # exact model: both images explained
    assert loss(-tilt) > 0.1 * signal  # the other tilt direction is not
    batch.tilted.values = torch.zeros_like(batch.tilted.values)  # the tilted image counts
    assert loss(tilt) > 0.5 * signal


@pytest.fixture(scope="module")
def tilt_dataset(tiny_dataset, tmp_path_factory):
    """The tiny dataset's tilted partners at +45 degrees (same states and CTF, noiseless)."""
    out = tmp_path_factory.mktemp("tilt")
    table = load_particles(tiny_dataset / "particles.star")
    gt = np.load(tiny_dataset / "ground_truth.npz")
    volumes = [read_mrc(tiny_dataset / f)[0] for f in gt["volume_files"]]
    ensemble = discrete_ensemble(np.stack(volumes), pixel_size_angstrom=float(gt["pixel_size_angstrom"]))
    T = tilt_rotation(45.0, dtype=torch.float64).numpy()
    params = ImageParameters(
        rotations=np.einsum("ij,njk->nik", T, table.rotations), shifts_pixel=np.zeros((len(table), 2)),
        ctf=table.ctf, b_factor_angstrom2=0.0, state_index=gt["state_index"], coordinate=gt["coordinate"],
        box_size=16, pixel_size_angstrom=float(gt["pixel_size_angstrom"]),
    )
    images = simulate_images(ensemble, params, snr=1.0, seed=1, oversampling=1).images
    write_mrc(out / "tilted.mrcs", images, pixel_size_angstrom=float(gt["pixel_size_angstrom"]))
    return out / "tilted.mrcs"


def test_tilt_pair_training_runs_and_records_the_tilt_encoder(tiny_dataset, tilt_dataset, tmp_path):
    config = TrainConfig(particles=str(tiny_dataset / "particles.star"), tilt=str(tilt_dataset), tilt_deg=45.0,
                         decoder="neural_field", zdim=1, num_epochs=2, dec_layers=1, dec_dim=16, enc_layers=1, enc_dim=16,
                         batch_size=16, lr=1e-2, progress=False)
    result = run_training(config, tmp_path / "run")
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # two images per pair: the squared error is the sum of two per-image errors (about 2 x 0.5 here)
    assert 1.0 < result.history[0]["error"] < 2.2
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["encoder"]["type"] == "tilt_pair"
    assert np.load(tmp_path / "run" / "z.1.npy").shape == (64, 1)


def test_tilted_file_with_another_particle_count_is_an_input_error(tiny_dataset, tilt_dataset, tmp_path):
    images, pixel = read_mrc(tilt_dataset)
    write_mrc(tmp_path / "short.mrcs", images[:10], pixel_size_angstrom=pixel)
    config = TrainConfig(particles=str(tiny_dataset / "particles.star"), tilt=str(tmp_path / "short.mrcs"), zdim=1,
                         num_epochs=1, progress=False)
    with pytest.raises(InputError, match="10 tilted particles"):
        run_training(config, tmp_path / "run")
    with pytest.raises(InputError, match="zdim"):
        run_training(dataclasses.replace(config, zdim=0), tmp_path / "run2")
