"""NeuralField: Hermitian symmetry, eval_volume scale/centring, cropping, config round trip."""

import math

import pytest
import torch

from cryoscape.fourier.fft import fourier_to_hartley, ifft3_center, iht3_center
from cryoscape.fourier.resample import downsample_volume
from cryoscape.models import NeuralField, build_decoder, decoder_names
from cryoscape.models.neural_field import hermitian_negative_mask


def small(**kw):
    torch.manual_seed(0)
    args = dict(box_size=16, layers=2, width=32)
    args.update(kw)
    return NeuralField(**args)


def test_registered():
    assert "neural_field" in decoder_names()


def test_negative_mask_splits_pairs():
    k = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.1], [0.3, -0.2, 0.0]])
    neg = hermitian_negative_mask(k)
    neg_mirror = hermitian_negative_mask(-k)
    assert not neg[0] and not neg_mirror[0]
    assert torch.all(neg[1:] ^ neg_mirror[1:])


def hermitian_test_points(gen):
    pts = torch.rand(200, 3, generator=gen) - 0.5
    pts[:40, 2] = 0.0  # kz = 0 plane
    pts[40:60, 1:] = 0.0  # kx axis
    pts[60:70, 0] = 0.0
    pts[60:70, 2] = 0.0  # ky axis
    pts[70] = 0.0  # origin
    return pts


@pytest.mark.parametrize("zdim", [0, 3])
def test_fourier_hermitian_exact(zdim):
    dec = small(zdim=zdim)
    gen = torch.Generator().manual_seed(1)
    k = hermitian_test_points(gen)
    coords = torch.stack([k, k[torch.randperm(200, generator=gen)]])  # (2, 200, 3)
    z = torch.randn(2, zdim, generator=gen) if zdim else None
    with torch.no_grad():
        f = dec(coords, z)
        f_neg = dec(-coords, z)
    assert f.shape == (2, 200) and f.dtype == torch.complex64
    scale = f.abs().max()
    assert (f_neg - f.conj()).abs().max() <= 1e-6 * scale
    origin = (coords == 0).all(-1)
    assert torch.all(f.imag[origin] == 0)
    assert f.abs()[origin].min() > 0  # the real part is a free value


def test_hartley_output_real():
    dec = small(domain="hartley", zdim=2)
    out = dec(torch.rand(3, 10, 3) - 0.5, torch.randn(3, 2))
    assert out.shape == (3, 10) and out.dtype == torch.float32


def test_z_changes_output_and_broadcasts():
    dec = small(zdim=2)
    k = torch.rand(1, 50, 3) - 0.5
    z = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    with torch.no_grad():
        out = dec(k, z)  # coords broadcast over the latent batch
        out0 = dec(k, z[:1])
    assert out.shape == (2, 50)
    assert (out[0] - out[1]).abs().max() > 1e-3
    torch.testing.assert_close(out[0], out0[0])
    with pytest.raises(ValueError, match="latent"):
        dec(k, None)
    v0, v1 = dec.eval_volume(z[0]), dec.eval_volume(z[1])
    assert (v0 - v1).abs().max() > 1e-6


def blob_transform(coords, centre, sigma):
    """Analytic FT of exp(-|x - c|^2 / (2 sigma^2)) (unnormalised FFT convention), coords in cycles/pixel."""
    k = coords.double()
    amp = (2 * math.pi * sigma**2) ** 1.5 * torch.exp(-2 * math.pi**2 * sigma**2 * (k**2).sum(-1))
    phase = -2 * math.pi * (k * torch.tensor(centre, dtype=torch.float64)).sum(-1)
    return amp * torch.exp(1j * phase)


def blob_map(D, centre, sigma):
    c = torch.arange(D, dtype=torch.float64) - D // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
    return torch.exp(-r2 / (2 * sigma**2))


@pytest.mark.parametrize("domain", ["fourier", "hartley"])
@pytest.mark.parametrize("D", [20, 21])
def test_eval_volume_reproduces_blob(monkeypatch, domain, D):
    """A decoder returning a map's FT gives back the map: pins scale and centring."""
    centre, sigma = (2.0, -1.0, -3.0), 1.5
    dec = small(box_size=D, domain=domain)

    def forward(coords, z=None):
        F = blob_transform(coords, centre, sigma)
        return F.to(torch.complex64) if domain == "fourier" else fourier_to_hartley(F).float()

    monkeypatch.setattr(dec, "forward", forward)
    vol = dec.eval_volume()
    assert vol.shape == (D, D, D) and vol.dtype == torch.float32
    expected = blob_map(D, centre, sigma).float()
    assert (vol - expected).abs().max() < 1e-4
    assert vol.flatten().argmax() == expected.flatten().argmax()


@pytest.mark.parametrize("domain", ["fourier", "hartley"])
@pytest.mark.parametrize("D", [10, 11])
def test_eval_volume_equals_full_grid_evaluation(domain, D):
    """The half-grid fill (fourier) matches evaluating every grid point."""
    dec = small(box_size=D, domain=domain, zdim=1)
    z = torch.tensor([0.7])
    c = (torch.arange(D, dtype=torch.float32) - D // 2) / D
    kz, ky, kx = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([kx, ky, kz], -1).reshape(1, -1, 3)
    with torch.no_grad():
        vals = dec(pts, z[None]).reshape(D, D, D)
    ref = ifft3_center(vals).real if domain == "fourier" else iht3_center(vals)
    vol = dec.eval_volume(z, chunk_points=D * D * 2, sphere=False)  # several chunks
    assert (vol - ref).abs().max() <= 1e-5 * ref.abs().max()
    # default: only the trained sphere |k| <= 1/2 is evaluated, the corners are zero
    inside = (kx.square() + ky.square() + kz.square()) <= 0.25
    ref_sphere = ifft3_center(vals * inside) if domain == "fourier" else iht3_center(vals * inside)
    ref_sphere = ref_sphere.real if ref_sphere.is_complex() else ref_sphere
    vol_sphere = dec.eval_volume(z, chunk_points=D * D * 2)
    assert (vol_sphere - ref_sphere).abs().max() <= 1e-5 * ref_sphere.abs().max()
    assert (vol_sphere - vol).abs().max() > 1e-3 * ref.abs().max()  # the corners did matter


@pytest.mark.parametrize(
    "domain,D,n",
    [("fourier", 16, 12), ("fourier", 16, 11), ("fourier", 15, 10), ("fourier", 15, 9), ("hartley", 16, 11), ("hartley", 15, 9)],
)
def test_eval_volume_small_box_is_fourier_crop(domain, D, n):
    dec = small(box_size=D, domain=domain)
    big = dec.eval_volume()
    smallbox = dec.eval_volume(box_size=n)
    expected = downsample_volume(big.double(), n).float()
    assert smallbox.shape == (n, n, n)
    assert (smallbox - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_config_round_trip():
    dec = small(zdim=4, encoding="gaussian", gaussian_scale=0.3, n_freqs=20, activation="silu", domain="hartley")
    copy = build_decoder("neural_field", **dec.config)
    sd, sd2 = dec.state_dict(), copy.state_dict()
    assert list(sd) == list(sd2)
    assert all(sd[k].shape == sd2[k].shape for k in sd)
    assert torch.equal(sd["encoding.frequencies"], sd2["encoding.frequencies"])  # same seed
    copy.load_state_dict(sd)
    k, z = torch.rand(2, 30, 3) - 0.5, torch.randn(2, 4)
    torch.testing.assert_close(copy(k, z), dec(k, z))
    assert copy.config == dec.config


def test_layers_width_convention():
    """256x3 = input layer + 3 hidden 256->256 layers + output (thesis/cryoDRGN counting)."""
    dec = NeuralField(box_size=128, layers=5, width=512, domain="hartley", encoding="geom_full")
    n_params = sum(p.numel() for p in dec.parameters())
    assert n_params == 1_510_913  # thesis ch. 5: "5 hidden layers of width 512; 1,510,913 parameters"
