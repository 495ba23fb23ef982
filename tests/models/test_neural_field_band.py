"""NeuralField band limit (``band_fraction``): in-band values unchanged, zero beyond, fewer MLP points."""

import pytest
import torch

from cryoscape.fourier.fft import ifft3_center, iht3_center
from cryoscape.models import NeuralField, build_decoder


def pair(fraction: float, **kw):
    """The same network with and without the band limit."""
    torch.manual_seed(0)
    full = NeuralField(box_size=16, layers=2, width=32, zdim=2, **kw)
    band = NeuralField(box_size=16, layers=2, width=32, zdim=2, band_fraction=fraction, **kw)
    band.load_state_dict(full.state_dict())
    return full, band


@pytest.mark.parametrize("domain", ["fourier", "hartley"])
def test_band_keeps_inband_values_and_zeroes_the_rest(domain):
    full, band = pair(0.6, domain=domain)
    k = (torch.rand(1, 200, 3) - 0.5)
    R = torch.linalg.qr(torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(1)))[0]
    coords = k @ R.transpose(1, 2)  # three rotations of the same points: equal radii column by column
    z = torch.randn(3, 2)
    inside = k[0].square().sum(-1) <= 0.3 ** 2
    assert 0 < int(inside.sum()) < 200
    a, b = full(coords, z), band(coords, z)
    torch.testing.assert_close(b[:, inside], a[:, inside])
    assert torch.all(b[:, ~inside] == 0)
    # extra point axes keep their shape
    assert band(coords.reshape(3, 10, 20, 3), z).shape == (3, 10, 20)


def test_band_evaluates_fewer_points():
    full, band = pair(0.5)
    seen = []
    band.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-2]))
    k = torch.rand(2, 400, 3) - 0.5
    band(k, torch.randn(2, 2))
    assert seen == [int((k[0].square().sum(-1) <= 0.25 ** 2).sum())]


@pytest.mark.parametrize("domain", ["fourier", "hartley"])
def test_band_eval_volume_is_the_lowpassed_full_map(domain):
    D = 16
    full, band = pair(0.7, domain=domain)
    z = torch.tensor([0.3, -0.8])
    c = (torch.arange(D, dtype=torch.float32) - D // 2) / D
    kz, ky, kx = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([kx, ky, kz], -1).reshape(1, -1, 3)
    with torch.no_grad():
        vals = full(pts, z[None]).reshape(D, D, D)
    inside = (kx.square() + ky.square() + kz.square()) <= 0.35 ** 2
    ref = ifft3_center(vals * inside).real if domain == "fourier" else iht3_center(vals * inside)
    vol = band.eval_volume(z)
    assert (vol - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_band_config_round_trip_and_checks():
    _, band = pair(0.75)
    copy = build_decoder("neural_field", **band.config)
    assert copy.config["band_fraction"] == 0.75 and copy.band_radius == pytest.approx(0.375)
    assert NeuralField(box_size=16, band_fraction="0.5").band_radius == 0.25  # --decoder-opt gives strings
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="band_fraction"):
            NeuralField(box_size=16, band_fraction=bad)
