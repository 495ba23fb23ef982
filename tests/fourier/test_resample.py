"""Fourier cropping / padding: scale, band-limited round trips, odd and even boxes."""

from __future__ import annotations

import pytest
import torch

from cryoscape.fourier.fft import fft2_center, fft3_center, ifft2_center, ifft3_center
from cryoscape.fourier.resample import (
    crop_fourier_2d,
    crop_fourier_3d,
    downsample_images,
    downsample_volume,
    pad_fourier_2d,
    pad_fourier_3d,
    resampled_pixel_size_angstrom,
    upsample_images,
    upsample_volume,
)

PAIRS = [(16, 8), (16, 9), (15, 8), (15, 9), (12, 11), (11, 10), (7, 2), (8, 3)]


def _band_limited(shape_batch, D, D_band, ndim, *, seed=0, dtype=torch.float64):
    """Random real array whose centred spectrum is zero outside the interior of the D_band box.

    Interior: |k| <= (D_band - 1) // 2 on every axis, so the new -Nyquist line of an even
    D_band carries nothing either.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_batch, *([D] * ndim), generator=g, dtype=dtype)
    ft = fft2_center(x) if ndim == 2 else fft3_center(x)
    k = torch.arange(D) - D // 2
    inside = (k.abs() <= (D_band - 1) // 2)
    mask = inside
    for _ in range(ndim - 1):
        mask = mask[..., None] & inside
    ft = ft * mask
    out = ifft2_center(ft) if ndim == 2 else ifft3_center(ft)
    return out.real  # the mask is symmetric about the origin, so this is exactly real


@pytest.mark.parametrize("D, D_new", PAIRS)
def test_crop_and_pad_keep_the_origin(D, D_new):
    ft = torch.zeros(D, D, dtype=torch.complex64)
    ft[D // 2, D // 2] = 1.0
    ft[D // 2 - 1, D // 2 - 1] = 2.0  # frequency (kx=-1, ky=-1), inside every band here
    small = crop_fourier_2d(ft, D_new)
    assert small.shape == (D_new, D_new)
    assert small[D_new // 2, D_new // 2] == 1.0
    assert small[D_new // 2 - 1, D_new // 2 - 1] == 2.0
    back = pad_fourier_2d(small, D)
    assert back.shape == (D, D)
    assert torch.equal(back, ft)
    vol = torch.zeros(D, D, D)
    vol[D // 2 - 1, D // 2, D // 2 - 1] = 3.0
    cropped = crop_fourier_3d(vol, D_new)
    assert cropped[D_new // 2 - 1, D_new // 2, D_new // 2 - 1] == 3.0
    assert torch.equal(pad_fourier_3d(cropped, D), vol)


@pytest.mark.parametrize("D, D_new", PAIRS)
def test_constant_image_stays_the_same_constant(D, D_new):
    images = torch.full((3, D, D), 2.75)
    small = downsample_images(images, D_new)
    assert small.shape == (3, D_new, D_new) and small.dtype == torch.float32
    torch.testing.assert_close(small, torch.full_like(small, 2.75), rtol=1e-5, atol=1e-5)
    big = upsample_images(small, D)
    torch.testing.assert_close(big, images, rtol=1e-5, atol=1e-5)
    vol = torch.full((D, D, D), -1.5, dtype=torch.float64)
    torch.testing.assert_close(downsample_volume(vol, D_new), torch.full((D_new,) * 3, -1.5,
                               dtype=torch.float64))


@pytest.mark.parametrize("D, D_new", PAIRS)
def test_band_limited_image_survives_down_and_up(D, D_new):
    x = _band_limited((4,), D, D_new, 2)
    small = downsample_images(x, D_new)
    back = upsample_images(small, D)
    rel = (back - x).norm() / x.norm()
    assert rel < 1e-5
    # float32 too
    x32 = x.float()
    rel32 = (upsample_images(downsample_images(x32, D_new), D) - x32).norm() / x32.norm()
    assert rel32 < 1e-5


@pytest.mark.parametrize("D, D_new", [(12, 6), (11, 6), (10, 7), (9, 5)])
def test_band_limited_volume_survives_down_and_up(D, D_new):
    v = _band_limited((), D, D_new, 3)
    back = upsample_volume(downsample_volume(v, D_new), D)
    assert (back - v).norm() / v.norm() < 1e-5


@pytest.mark.parametrize("D", [16, 15])
def test_downsampled_values_are_samples_of_a_smooth_image(D):
    # A slow cosine along x sampled on the coarse grid with pixel size D / D_new.
    D_new = 8
    c = torch.arange(D, dtype=torch.float64) - D // 2
    x = torch.cos(2 * torch.pi * 1 * c / D)[None, :].expand(D, D)  # one period per box
    small = downsample_images(x, D_new)
    cn = torch.arange(D_new, dtype=torch.float64) - D_new // 2
    expected = torch.cos(2 * torch.pi * 1 * cn / D_new)[None, :].expand(D_new, D_new)
    torch.testing.assert_close(small, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("D, D_new", [(d, n) for d in (8, 9, 10, 13) for n in range(1, d + 1)])
def test_real_fft_path_equals_full_complex_crop(D, D_new):
    x = torch.randn(2, 3, D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(D))
    reference = ifft2_center(crop_fourier_2d(fft2_center(x), D_new)).real * (D_new / D) ** 2
    torch.testing.assert_close(downsample_images(x, D_new), reference, rtol=0, atol=1e-12)


def test_even_nyquist_is_split_evenly():
    # The result of cropping to an even box is the real image whose -Nyquist line averages
    # the old +-Nyquist coefficients: downsampling the real and the mirrored image agree.
    D, D_new = 12, 6
    x = torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    flipped_origin = torch.roll(torch.flip(x, dims=(-2, -1)), shifts=(2 * (D // 2) - D + 1,) * 2,
                                dims=(-2, -1))  # x(-r) about the origin at D//2
    a = downsample_images(x, D_new)
    b = downsample_images(flipped_origin, D_new)
    b_back = torch.roll(torch.flip(b, dims=(-2, -1)), shifts=(2 * (D_new // 2) - D_new + 1,) * 2,
                        dims=(-2, -1))
    torch.testing.assert_close(a, b_back, rtol=0, atol=1e-12)


def test_errors_and_pixel_size():
    x = torch.zeros(2, 8, 8)
    with pytest.raises(ValueError):
        downsample_images(x, 9)
    with pytest.raises(ValueError):
        upsample_images(x, 7)
    with pytest.raises(ValueError):
        downsample_images(torch.zeros(8, 6), 4)
    with pytest.raises(ValueError):
        crop_fourier_2d(x, 0)
    assert torch.equal(downsample_images(x + 1, 8), x + 1)
    assert resampled_pixel_size_angstrom(1.2, 256, 128) == pytest.approx(2.4)
    assert resampled_pixel_size_angstrom(1.0, 15, 10) == pytest.approx(1.5)


def test_integer_input_is_promoted():
    x = torch.ones(4, 4, dtype=torch.int16) * 3
    out = downsample_images(x, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((2, 2), 3.0))
