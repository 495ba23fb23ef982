"""Training batches: pixel sets, transforms at pixels, preprocessing, CTF, epoch order, prefetching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoscape.data.preprocess import Preprocessor
from cryoscape.data.training import (
    ParticleDataset,
    epoch_order,
    fourier_pixels,
    iterate_batches,
    transform_at_pixels,
)
from cryoscape.fourier.ctf import ctf_images_from_table
from cryoscape.fourier.fft import fft2_center
from cryoscape.geometry.rotations import random_rotations
from cryoscape.io.mrc import write_mrc
from cryoscape.io.particles import CtfParameters, ParticleTable


def _read_centred(image_ft: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Values of centred FFTs ``(B, D, D)`` at integer ``(kx, ky)`` index coordinates."""
    D = image_ft.shape[-1]
    kx, ky = coords[:, 0].long() + D // 2, coords[:, 1].long() + D // 2
    return image_ft[:, ky, kx]


@pytest.mark.parametrize("D", [16, 17])
@pytest.mark.parametrize("domain", ["fourier", "hartley"])
def test_transform_at_pixels_matches_centred_fft(D, domain):
    images = torch.randn(3, D, D, generator=torch.Generator().manual_seed(D))
    pixels = fourier_pixels(D, domain=domain)
    values = transform_at_pixels(images, pixels)
    expected = _read_centred(fft2_center(images), pixels.coords_index)
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-4)
    radius = pixels.coords_index.norm(dim=-1)
    assert bool((radius < D / 2).all())
    if domain == "hartley":  # the whole circle
        assert len(pixels) == pixels.n_circle
    else:  # one of every Friedel pair, plus the origin
        assert len(pixels) == (pixels.n_circle + 1) // 2
        x, y = pixels.coords_index[:, 0], pixels.coords_index[:, 1]
        assert bool(((x > 0) | ((x == 0) & (y >= 0))).all())


@pytest.mark.parametrize("D", [16, 17])
def test_weighted_half_plane_power_equals_circle_power_in_both_domains(D):
    """sum w |F|^2 over the half-plane = sum |F|^2 over the circle = sum H^2 over the circle."""
    images = torch.randn(4, D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    half = fourier_pixels(D, domain="fourier")
    full = fourier_pixels(D, domain="hartley")
    f_half = transform_at_pixels(images, half)
    f_full = transform_at_pixels(images, full)
    power_half = (f_half.abs() ** 2) @ half.weights.double()
    power_full = (f_full.abs() ** 2).sum(-1)
    hartley = f_full.real - f_full.imag
    torch.testing.assert_close(power_half, power_full)
    torch.testing.assert_close((hartley**2).sum(-1), power_full)
    assert float(half.weights.sum()) == half.n_circle == full.n_circle


@pytest.fixture
def small_table(tmp_path):
    D, n = 12, 40
    rng = np.random.default_rng(0)
    stack = (rng.normal(size=(n, D, D)) * 3 + 1.5).astype(np.float32)
    write_mrc(tmp_path / "stack.mrcs", stack, pixel_size_angstrom=2.0)
    ctf = CtfParameters(
        defocus_u_angstrom=rng.uniform(8000, 20000, n),
        defocus_v_angstrom=rng.uniform(8000, 20000, n),
        defocus_angle_deg=rng.uniform(0, 180, n),
        voltage_kv=np.full(n, 300.0),
        cs_mm=np.full(n, 2.7),
        amplitude_contrast=np.full(n, 0.1),
        phase_shift_deg=np.zeros(n),
    )
    table = ParticleTable(
        image_paths=np.full(n, str(tmp_path / "stack.mrcs"), dtype=object),
        image_indices=np.arange(n),
        box_size=D,
        pixel_size_angstrom=np.full(n, 2.0),
        rotations=random_rotations(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).numpy(),
        shifts_pixel=rng.uniform(-2, 2, (n, 2)),
        ctf=ctf,
        source_path=str(tmp_path / "stack.mrcs"),
    )
    return table, stack


@pytest.mark.parametrize("invert", [False, True])
def test_batch_preprocessing_ctf_and_poses(small_table, invert):
    table, stack = small_table
    ds = ParticleDataset(table, domain="fourier")
    norm = ds.fit_normalization(invert=invert, n_sample=1000, seed=0)
    # normalisation as the Preprocessor computes it, over all images
    pre = Preprocessor(invert=invert, window=True).fit_normalization(ds.images, n_sample=1000)
    assert norm.mean == pytest.approx(pre.mean, rel=1e-6)
    assert norm.std == pytest.approx(pre.std, rel=1e-6)
    idx = np.array([5, 0, 33])
    batch = ds.get_batch(idx)
    torch.testing.assert_close(batch.images, pre(stack[idx]), rtol=1e-5, atol=1e-5)
    expected_values = transform_at_pixels(pre(stack[idx]), ds.pixels) / norm.fourier_scale
    torch.testing.assert_close(batch.values, expected_values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch.rotations, torch.as_tensor(table.rotations[idx], dtype=torch.float32))
    torch.testing.assert_close(batch.shifts_pixel, torch.as_tensor(table.shifts_pixel[idx], dtype=torch.float32))
    full_ctf = ctf_images_from_table(table.ctf, table.pixel_size_angstrom, 12, idx)
    torch.testing.assert_close(batch.ctf, _read_centred(full_ctf, ds.pixels.coords_index), rtol=1e-4, atol=1e-5)
    assert batch.indices.tolist() == idx.tolist()


def test_fourier_scale_makes_the_transform_rms_one(small_table):
    table, _ = small_table
    ds = ParticleDataset(table, domain="hartley")
    ds.fit_normalization()
    values = ds.get_batch(np.arange(len(ds))).values
    rms = float((values.abs() ** 2).mean().sqrt())
    assert rms == pytest.approx(1.0, rel=1e-4)


def test_missing_ctf_is_a_clear_input_error(small_table):
    from cryoscape.errors import InputError

    table, _ = small_table
    table.ctf = None
    with pytest.raises(InputError, match="CTF"):
        ParticleDataset(table)
    ds = ParticleDataset(table, use_ctf=False)  # fine without
    ds.fit_normalization()
    assert ds.get_batch(np.arange(3)).ctf is None


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_order(100, seed=3, epoch=2)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, epoch_order(100, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(100, seed=3, epoch=3))
    assert not np.array_equal(a, epoch_order(100, seed=4, epoch=2))
    assert np.array_equal(epoch_order(10, seed=0, epoch=0, shuffle=False), np.arange(10))


def test_prefetching_gives_the_same_batches_and_reraises_errors():
    order = epoch_order(23, seed=0, epoch=0)

    def get(idx):
        return idx.copy()

    plain = list(iterate_batches(get, order, 5, prefetch=0))
    threaded = list(iterate_batches(get, order, 5, prefetch=2))
    assert [b.tolist() for b in plain] == [b.tolist() for b in threaded]
    assert [len(b) for b in plain] == [5, 5, 5, 5, 3]

    def broken(idx):
        if idx[0] == order[10]:
            raise RuntimeError("disk went away")
        return idx

    with pytest.raises(RuntimeError, match="disk went away"):
        list(iterate_batches(broken, order, 5, prefetch=2))
    # leaving early does not hang the background thread
    for i, _ in enumerate(iterate_batches(get, order, 1, prefetch=1)):
        if i == 2:
            break
