"""Image encoders, the tilt-pair encoder and their config round trip."""

import math

import numpy as np
import pytest
import torch

from cryoscape.models import ImageEncoder, TiltPairEncoder, build_encoder, kl_divergence
from cryoscape.models.encoders import LOGVAR_CAP, bounded_logvar


def disc_count(D, radius):
    c = np.arange(D) - D // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    return int((x**2 + y**2 <= radius**2).sum())


@pytest.mark.parametrize("kind", ["mlp", "resmlp", "conv"])
@pytest.mark.parametrize("D", [32, 33])
def test_image_encoder_shapes(kind, D):
    torch.manual_seed(0)
    enc = ImageEncoder(box_size=D, zdim=5, kind=kind, layers=2, width=32)
    mu, logvar = enc(torch.randn(4, D, D))
    assert mu.shape == (4, 5) and logvar.shape == (4, 5)
    assert torch.isfinite(mu).all() and torch.isfinite(logvar).all()


@pytest.mark.parametrize("D", [32, 33])
@pytest.mark.parametrize("fraction", [1.0, 0.6])
def test_mask_size(D, fraction):
    enc = ImageEncoder(box_size=D, zdim=2, kind="mlp", layers=1, width=16, mask_radius_fraction=fraction)
    n = disc_count(D, fraction * D / 2)
    assert enc.n_pixels == n
    assert enc.trunk.net.input.in_features == n
    assert ImageEncoder(box_size=D, zdim=2, mask_radius_fraction=1.5).n_pixels == D * D


@pytest.mark.parametrize("kind", ["mlp", "resmlp", "conv"])
def test_pixels_outside_the_disc_are_ignored(kind):
    D = 32
    torch.manual_seed(0)
    enc = ImageEncoder(box_size=D, zdim=3, kind=kind, layers=1, width=16)
    x = torch.randn(2, D, D)
    y = x.clone()
    y[:, 0, 0] += 10.0  # corner, outside the disc
    y[:, 1, D - 2] -= 5.0
    torch.testing.assert_close(enc(x), enc(y))
    y[:, D // 2, D // 2] += 1.0  # centre, inside
    assert (enc(y)[0] - enc(x)[0]).abs().max() > 0


def test_conv_encoder_large_box():
    enc = ImageEncoder(box_size=256, zdim=8, kind="conv", layers=3, width=64)
    mu, logvar = enc(torch.randn(2, 256, 256))
    assert mu.shape == (2, 8)


@pytest.mark.parametrize("kind", ["resmlp", "conv"])
@pytest.mark.parametrize("D", [32, 33])
def test_tilt_pair_encoder(kind, D):
    torch.manual_seed(0)
    enc = TiltPairEncoder(box_size=D, zdim=4, kind=kind, layers=1, width=32, head_layers=2)
    a, b = torch.randn(3, D, D), torch.randn(3, D, D)
    mu, logvar = enc(a, b)
    assert mu.shape == (3, 4) and logvar.shape == (3, 4)
    # Shared stage-1 weights: each image of a batch is encoded independently of the others.
    mu1, _ = enc(a[:1], b[:1])
    torch.testing.assert_close(mu1[0], mu[0], atol=1e-5, rtol=1e-5)
    # The order of the pair matters (concatenation, not a symmetric pooling).
    mu_swapped, _ = enc(b, a)
    assert (mu_swapped - mu).abs().max() > 0
    with pytest.raises(ValueError, match="match"):
        enc(a, b[:, :-1, :-1])


@pytest.mark.parametrize(
    "enc",
    [
        ImageEncoder(box_size=16, zdim=3, kind="conv", layers=2, width=24, activation="gelu"),
        ImageEncoder(box_size=17, zdim=2, kind="mlp", layers=1, width=8, mask_radius_fraction=0.7),
        TiltPairEncoder(box_size=16, zdim=2, kind="resmlp", layers=2, width=16, head_layers=1),
    ],
)
def test_config_round_trip(enc):
    copy = build_encoder(enc.config)
    assert type(copy) is type(enc)
    assert copy.config == enc.config
    sd, sd2 = enc.state_dict(), copy.state_dict()
    assert list(sd) == list(sd2) and all(sd[k].shape == sd2[k].shape for k in sd)


def test_bad_arguments():
    with pytest.raises(ValueError, match="conv"):
        ImageEncoder(box_size=16, zdim=2, kind="transformer")
    with pytest.raises(ValueError, match="zdim"):
        ImageEncoder(box_size=16, zdim=0)
    enc = ImageEncoder(box_size=16, zdim=2)
    with pytest.raises(ValueError, match="16"):
        enc(torch.randn(2, 17, 17))


def test_lowpass_encoder_ignores_frequencies_above_its_band():
    """``lowpass_fraction=0.5``: adding a pattern at 0.75 x Nyquist leaves the latent unchanged,
    while one at 0.25 x Nyquist changes it; the option survives the config round trip."""
    torch.manual_seed(0)
    enc = ImageEncoder(box_size=16, zdim=2, kind="resmlp", layers=1, width=16, lowpass_fraction=0.5).eval()
    images = torch.randn(3, 16, 16)
    x = torch.arange(16, dtype=torch.float32)
    high = torch.cos(2 * torch.pi * 0.375 * x).expand(16, 16)  # 0.375 cycles/pixel = 0.75 Nyquist
    low = torch.cos(2 * torch.pi * 0.125 * x).expand(16, 16)
    with torch.no_grad():
        base = enc(images)[0]
        assert torch.allclose(enc(images + high)[0], base, atol=1e-5)
        assert (enc(images + low)[0] - base).abs().max() > 1e-3
    assert build_encoder(enc.config).config["lowpass_fraction"] == 0.5
    with pytest.raises(ValueError, match="lowpass_fraction"):
        ImageEncoder(box_size=16, zdim=2, lowpass_fraction=1.5)


def test_logvar_is_untouched_below_the_cap_and_saturates_above_it():
    raw = torch.tensor([-30.0, 0.0, LOGVAR_CAP - 1e-3, LOGVAR_CAP + 0.5, 11.0, 1e4], requires_grad=True)
    out = bounded_logvar(raw)
    assert torch.equal(out[:3], raw[:3])  # bit for bit below the cap
    assert float(out[3].detach()) == pytest.approx(LOGVAR_CAP + math.tanh(0.5))
    assert float(out.max().detach()) <= LOGVAR_CAP + 1.0
    out.sum().backward()
    assert torch.all(raw.grad[:3] == 1.0)
    assert 0.0 < float(raw.grad[3]) < 1.0  # still trainable just above the cap


def test_an_encoder_whose_head_runs_away_gives_a_bounded_kl():
    enc = ImageEncoder(box_size=16, zdim=4, kind="mlp", layers=1, width=8)
    with torch.no_grad():
        enc.head.bias[4:] = 11.0  # the runaway log-variance a CryoFormer run once produced for one image
    with torch.no_grad():
        mu, logvar = enc(torch.randn(3, 16, 16))
    assert float(logvar.max()) <= LOGVAR_CAP + 1.0
    kl = kl_divergence(mu, logvar)
    # unbounded, each of the 4 dimensions would cost 0.5 * (e^11 - 12) ~ 3e4
    assert float(kl.max()) < 4 * 0.5 * (math.exp(LOGVAR_CAP + 1.0) - 1.0) + 0.5 * float(mu.pow(2).sum(-1).max()) + 1e-3
