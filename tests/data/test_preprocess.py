"""Preprocessing: window shape, normalisation estimate, phase flipping, the Preprocessor order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoscape.data.preprocess import (
    Preprocessor,
    apply_window,
    estimate_normalization,
    invert_contrast,
    normalize,
    phase_flip,
    soft_circular_window,
)
from cryoscape.fourier.fft import fft2_center
from cryoscape.fourier.resample import downsample_images


class ArrayReader:
    def __init__(self, images):
        self.images = np.asarray(images, dtype=np.float32)
        self.box_size = self.images.shape[-1]
        self.pixel_size_angstrom = 1.0

    def __len__(self):
        return len(self.images)

    def read(self, indices):
        return self.images[np.asarray(indices)]


@pytest.mark.parametrize("D", [32, 33])
def test_soft_window_profile(D):
    w = soft_circular_window(D, inner_radius_fraction=0.5, outer_radius_fraction=0.9)
    assert w.shape == (D, D) and w.dtype == torch.float32
    c = D // 2
    half = D / 2
    assert w[c, c] == 1.0
    assert w[c, c + int(0.5 * half)] == 1.0  # inside the inner radius
    assert w[0, 0] == 0.0  # corner, beyond the outer radius
    x = torch.arange(D, dtype=torch.float64) - c
    expected = 0.5 * (1 + torch.cos(math.pi * ((x.abs() / half - 0.5) / 0.4).clamp(0, 1)))
    torch.testing.assert_close(w[c].double(), expected, rtol=0, atol=1e-6)
    # symmetric about the origin (a point reflection about index D//2)
    inner = w[1:, 1:] if D % 2 == 0 else w
    torch.testing.assert_close(inner, torch.flip(inner, dims=(0, 1)))
    # monotone non-increasing along the row from the centre
    assert torch.all(torch.diff(w[c, c:]) <= 0)


def test_apply_window_invert_normalize():
    x = torch.randn(2, 8, 8)
    w = soft_circular_window(8)
    torch.testing.assert_close(apply_window(x, w), x * w)
    torch.testing.assert_close(invert_contrast(x), -x)
    torch.testing.assert_close(normalize(x, 1.0, 2.0), (x - 1) / 2)


def test_estimate_normalization_on_a_subset():
    rng = np.random.default_rng(0)
    images = rng.normal(3.0, 2.0, size=(400, 16, 16))
    reader = ArrayReader(images)
    mean, std = estimate_normalization(reader, n_sample=100, seed=1, batch_size=30)
    assert mean == pytest.approx(3.0, abs=0.05) and std == pytest.approx(2.0, rel=0.02)
    # same seed, same answer; all images when n_sample exceeds N
    assert estimate_normalization(reader, n_sample=100, seed=1) == (mean, std)
    full_mean, full_std = estimate_normalization(reader, n_sample=10_000)
    assert full_mean == pytest.approx(images.astype(np.float32).mean(dtype=np.float64), rel=1e-6)
    assert full_std == pytest.approx(images.astype(np.float32).std(dtype=np.float64), rel=1e-5)


@pytest.mark.parametrize("D", [16, 17])
def test_phase_flip_multiplies_the_spectrum_by_the_ctf_sign(D):
    g = torch.Generator().manual_seed(D)
    images = torch.randn(3, D, D, dtype=torch.float64, generator=g)
    k = torch.arange(D, dtype=torch.float64) - D // 2
    r2 = (k[:, None] ** 2 + k[None, :] ** 2) / D**2
    ctf = torch.sin(40.0 * r2 + 0.1).expand(3, D, D)  # radially symmetric, so sign is even
    flipped = phase_flip(images, ctf)
    assert flipped.dtype == torch.float64
    torch.testing.assert_close(fft2_center(flipped), fft2_center(images) * torch.sign(ctf))
    # flipping twice gives back the image
    torch.testing.assert_close(phase_flip(flipped, ctf), images)
    # with an all-positive CTF nothing changes
    torch.testing.assert_close(phase_flip(images, torch.ones(D, D)), images)


def test_preprocessor_order_and_fit():
    rng = np.random.default_rng(2)
    images = rng.normal(5.0, 1.0, size=(50, 24, 24)).astype(np.float32)
    reader = ArrayReader(images)
    pre = Preprocessor(downsample_box_size=12, invert=True, window=True).fit_normalization(
        reader, n_sample=50)
    small = -downsample_images(torch.from_numpy(images), 12)
    assert pre.mean == pytest.approx(float(small.double().mean()), rel=1e-6)
    assert pre.std == pytest.approx(float(small.double().std(unbiased=False)), rel=1e-5)
    out = pre(images)
    expected = (small - pre.mean) / pre.std * soft_circular_window(12)
    assert out.shape == (50, 12, 12) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    assert pre.output_box_size(24) == 12
    assert Preprocessor().output_box_size(24) == 24
    torch.testing.assert_close(Preprocessor()(images), torch.from_numpy(images))
    with pytest.raises(ValueError):
        Preprocessor(downsample_box_size=30).output_box_size(24)

