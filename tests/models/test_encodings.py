"""Positional encodings: eq. 3.1-3.3 of the thesis, the low-frequency variants, random features."""

import math

import pytest
import torch

from cryoscape.models.encodings import ENCODING_KINDS, geometric_frequencies, make_encoding


@pytest.mark.parametrize("kind", ENCODING_KINDS)
@pytest.mark.parametrize("D", [32, 33])
def test_shapes(kind, D):
    enc = make_encoding(kind, box_size=D)
    out = enc(torch.rand(4, 7, 3) - 0.5)
    assert out.shape == (4, 7, enc.out_dim)
    expected = {"none": 3, "gaussian": 2 * 3 * (D // 2)}.get(kind, 6 * (D // 2))
    assert enc.out_dim == expected


def test_geom_full_is_eq_3_3():
    D = 64
    gamma = geometric_frequencies("geom_full", box_size=D)
    d = torch.arange(D // 2, dtype=torch.float64)
    expected = D * math.pi * (2 / D) ** (d / (D / 2 - 1))
    torch.testing.assert_close(gamma, expected)
    wavelengths = 2 * math.pi / gamma
    assert wavelengths.min().item() == pytest.approx(2 / D)  # Nyquist limit
    assert wavelengths.max().item() == pytest.approx(1.0)  # unit extent


def test_encoding_values_follow_eq_3_1_and_3_2():
    D = 16
    enc = make_encoding("geom_full", box_size=D)
    k = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    gamma = geometric_frequencies("geom_full", box_size=D).float().double()  # stored as float32
    out = enc(k)[0]
    n = D // 2
    for axis in range(3):
        arg = gamma * k[0, axis]
        torch.testing.assert_close(out[axis * n : (axis + 1) * n], torch.sin(arg))
        torch.testing.assert_close(out[3 * n + axis * n : 3 * n + (axis + 1) * n], torch.cos(arg))


def test_low_frequency_variants_exclude_the_top():
    D = 128
    full = geometric_frequencies("geom_full", box_size=D)
    lowf = geometric_frequencies("geom_lowf", box_size=D)
    nohighf = geometric_frequencies("geom_nohighf", box_size=D)
    # geom_lowf: every wavelength of the eq. 3.3 series times 2 pi.
    torch.testing.assert_close(lowf, full / (2 * math.pi))
    assert lowf.max() == pytest.approx(D / 2)
    # geom_nohighf: top 10 % of the log-frequency span removed, same lowest frequency.
    assert nohighf.min() == pytest.approx(full.min())
    span_full = math.log(full.max() / full.min())
    span_nohighf = math.log(nohighf.max() / nohighf.min())
    assert span_nohighf == pytest.approx(0.9 * span_full)
    assert nohighf.max() < full.max()


def test_n_freqs_override():
    enc = make_encoding("geom_lowf", box_size=64, n_freqs=10)
    assert enc.out_dim == 60
    assert geometric_frequencies("geom_full", box_size=64, n_freqs=1).tolist() == [pytest.approx(2 * math.pi)]


def test_gaussian_reproducible_by_seed():
    a = make_encoding("gaussian", box_size=64, seed=3)
    b = make_encoding("gaussian", box_size=64, seed=3)
    c = make_encoding("gaussian", box_size=64, seed=4)
    assert torch.equal(a.frequencies, b.frequencies)
    assert not torch.equal(a.frequencies, c.frequencies)
    big = make_encoding("gaussian", box_size=64, n_freqs=20000, gaussian_scale=0.5)
    assert big.frequencies.std().item() == pytest.approx(0.5 * 64 / 2, rel=0.03)


def test_none_is_identity():
    enc = make_encoding("none", box_size=8)
    k = torch.rand(5, 3)
    assert torch.equal(enc(k), k)


def test_unknown_kind():
    with pytest.raises(ValueError, match="geom_lowf"):
        make_encoding("fourier_features", box_size=8)


def test_full_precision_under_autocast():
    enc = make_encoding("geom_full", box_size=256)
    k = torch.rand(100, 3) - 0.5
    ref = enc(k.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(k)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-4
