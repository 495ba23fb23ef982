"""Fourier shell correlation, resolution estimates and FSC outputs of fourier/fsc.py."""

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch

from cryoscape.fourier.filters import apply_fourier_filter, radial_profile_to_grid
from cryoscape.fourier.fsc import (
    fourier_ring_correlation,
    fourier_shell_correlation,
    frequency_to_angstrom,
    fsc_auc,
    gold_standard_fsc,
    plot_fsc,
    resolution_at_threshold,
    write_fsc_txt,
)


@pytest.mark.parametrize("D", [15, 16])
def test_fsc_of_a_volume_with_itself_is_one(D):
    g = torch.Generator().manual_seed(0)
    vol = torch.randn(D, D, D, generator=g)
    freqs, fsc = fourier_shell_correlation(vol, vol)
    assert fsc.shape == freqs.shape == (D // 2 + 1,)
    assert torch.allclose(fsc, torch.ones_like(fsc), atol=1e-5)
    assert torch.allclose(freqs, torch.arange(D // 2 + 1) / D)
    # Scaling one map does not change the correlation; negating it flips the sign.
    assert torch.allclose(fourier_shell_correlation(vol, 3 * vol)[1], torch.ones_like(fsc), atol=1e-5)
    assert torch.allclose(fourier_shell_correlation(vol, -vol)[1], -torch.ones_like(fsc), atol=1e-5)


def test_fsc_of_independent_noise_is_near_zero():
    D = 48
    g = torch.Generator().manual_seed(1)
    a = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    b = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    _, fsc = fourier_shell_correlation(a, b)
    assert abs(fsc[1:].mean().item()) < 0.05
    # Shells with many voxels are individually close to zero (std ~ 1/sqrt(n/2)).
    assert fsc[8:].abs().max().item() < 0.15


def test_fsc_follows_the_per_shell_snr():
    D = 48
    g = torch.Generator().manual_seed(2)
    shells = torch.arange(D // 2 + 1, dtype=torch.float64)
    snr = 6.0 * torch.exp(-shells / 6.0)  # from 6 at low frequency to ~0.1 at Nyquist
    amplitude = radial_profile_to_grid(snr.sqrt(), D, ndim=3)
    signal = apply_fourier_filter(torch.randn(D, D, D, generator=g, dtype=torch.float64), amplitude, ndim=3)
    half1 = signal + torch.randn(D, D, D, generator=g, dtype=torch.float64)
    half2 = signal + torch.randn(D, D, D, generator=g, dtype=torch.float64)
    _, fsc = fourier_shell_correlation(half1, half2)
    expected = snr / (1 + snr)
    assert (fsc[3:] - expected[3:]).abs().max().item() < 0.1
    assert (fsc[3:] - expected[3:]).abs().mean().item() < 0.03


@pytest.mark.parametrize("D", [15, 16])
def test_frc_of_images_and_batches(D):
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(4, D, D, generator=g, dtype=torch.float64)
    noisy = imgs + 0.01 * torch.randn(4, D, D, generator=g, dtype=torch.float64)
    freqs, frc = fourier_ring_correlation(imgs, noisy)
    assert frc.shape == (4, D // 2 + 1)
    assert (frc > 0.99).all()
    _, single = fourier_ring_correlation(imgs[2], noisy[2])
    assert torch.allclose(frc[2], single)
    # A mask multiplies both maps before the transform.
    mask = torch.zeros(D, D, dtype=torch.float64)
    mask[2:-2, 2:-2] = 1.0
    _, masked = fourier_ring_correlation(imgs, imgs + (1 - mask) * 50.0, mask=mask)
    assert torch.allclose(masked, torch.ones_like(masked))


def test_resolution_interpolation_on_a_hand_made_curve():
    freqs = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    fsc = [1.0, 0.9, 0.6, 0.3, 0.1, 0.0]
    assert resolution_at_threshold(freqs, fsc, 0.5) == pytest.approx(0.2 + 0.1 / 3)
    assert resolution_at_threshold(freqs, fsc, 0.143) == pytest.approx(0.3 + 0.1 * 0.157 / 0.2)
    # First crossing wins even if the curve comes back up.
    assert resolution_at_threshold(freqs, [1.0, 0.4, 0.9, 0.9, 0.9, 0.9], 0.5) == pytest.approx(0.1 * 5 / 6)
    # Never crossing: Nyquist.
    assert resolution_at_threshold(freqs, [1.0] * 6, 0.143) == 0.5
    # Below the threshold from the start: the first frequency.
    assert resolution_at_threshold(freqs, [0.1] * 6, 0.143) == 0.0
    # Tensors work too.
    assert resolution_at_threshold(torch.tensor(freqs), torch.tensor(fsc), 0.5) == pytest.approx(0.23333333)


def test_frequency_to_angstrom():
    assert frequency_to_angstrom(0.25, 1.5) == pytest.approx(6.0)
    assert frequency_to_angstrom(0.5, 1.1) == pytest.approx(2.2)
    assert np.allclose(frequency_to_angstrom(np.array([0.1, 0.2]), 2.0), [20.0, 10.0])
    assert frequency_to_angstrom(0.0, 1.0) == np.inf


def test_gold_standard_fsc_and_auc():
    D = 16
    g = torch.Generator().manual_seed(4)
    vol = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    same = gold_standard_fsc(vol, vol, pixel_size_angstrom=2.0)
    assert same["res_0.143"] == 0.5 and same["res_0.143_angstrom"] == pytest.approx(4.0)
    assert torch.allclose(same["fsc_full_map"], torch.ones(D // 2 + 1, dtype=torch.float64))
    noisy = gold_standard_fsc(vol, vol + 2 * torch.randn(D, D, D, generator=g, dtype=torch.float64))
    f = noisy["fsc"]
    assert torch.allclose(noisy["fsc_full_map"], 2 * f / (1 + f))
    assert (noisy["fsc_full_map"][1:] > f[1:]).all()
    assert noisy["res_0.5"] <= noisy["res_0.143"] + 1e-12
    assert "res_0.143_angstrom" not in noisy
    assert fsc_auc(torch.ones(9)).item() == 1.0
    assert fsc_auc(torch.tensor([1.0, 0.8, -0.4, 0.0])).item() == pytest.approx(0.4)
    assert fsc_auc(torch.ones(2, 5)).shape == (2,)


def test_plot_and_text_outputs(tmp_path):
    freqs = np.linspace(0, 0.5, 9)
    fsc = np.clip(1.2 - 2.5 * freqs, -0.1, 1.0)
    backend = matplotlib.get_backend()
    png = tmp_path / "fsc.png"
    plot_fsc(freqs, {"half maps": fsc, "other": torch.tensor(fsc * 0.5)}, png, pixel_size_angstrom=1.5)
    assert matplotlib.get_backend() == backend  # no global backend change
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # something was drawn

    txt = tmp_path / "fsc.txt"
    write_fsc_txt(txt, freqs, fsc, 1.5)
    table = np.loadtxt(txt)
    assert table.shape == (9, 4)
    assert np.allclose(table[:, 0], freqs, atol=1e-6)
    assert np.allclose(table[1:, 2], 1.5 / freqs[1:], rtol=1e-5)
    assert np.allclose(table[:, 3], fsc, atol=1e-6)
    assert txt.read_text().startswith("# frequency_cycles_per_pixel")


def test_first_shell_below_counts_from_the_first_shell_after_the_origin():
    from cryoscape.fourier.fsc import first_shell_below

    curve = np.array([0.2, 0.99, 0.9, 0.6, 0.4, 0.1])  # the origin's value is not read
    assert first_shell_below(curve, 0.5) == 4
    assert first_shell_below(curve, 0.143) == 5
    assert first_shell_below(curve, 0.05) == 5  # never below: the last shell
    assert first_shell_below(torch.tensor([1.0, 0.1, 0.9]), 0.5) == 1
