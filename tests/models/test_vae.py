"""KL term, reparameterisation and the VAE container."""

import pytest
import torch

from cryoscape.models import (
    HeterogeneousVAE,
    ImageEncoder,
    NeuralField,
    TiltPairEncoder,
    build_vae,
    kl_divergence,
    reparameterize,
)


def test_kl_zero_at_prior():
    assert torch.equal(kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))


def test_kl_closed_form():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    logvar = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    var = logvar.exp()
    # KL(N(mu, var) || N(0, 1)) per dimension: log(1/sigma) + (sigma^2 + mu^2)/2 - 1/2
    expected = (-0.5 * torch.log(var) + (var + mu**2) / 2 - 0.5).sum(-1)
    torch.testing.assert_close(kl_divergence(mu, logvar), expected)
    # and by Monte Carlo for one row
    q = torch.distributions.Normal(mu[0], var[0].sqrt())
    p = torch.distributions.Normal(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(kl_divergence(mu[:1], logvar[:1])[0], torch.distributions.kl_divergence(q, p).sum())


def test_reparameterize():
    mu = torch.tensor([[1.0, -2.0]], requires_grad=True)
    logvar = torch.tensor([[0.0, 2.0]], requires_grad=True)
    a = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(5))
    b = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    a.sum().backward()
    assert mu.grad is not None and logvar.grad is not None
    big = reparameterize(torch.zeros(20000, 2), torch.log(torch.tensor([[0.25, 4.0]])).expand(20000, 2),
                         generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(big.std(0), torch.tensor([0.5, 2.0]), rtol=0.03, atol=0)


def make_vae(tilt=False):
    torch.manual_seed(0)
    D = 16
    cls = TiltPairEncoder if tilt else ImageEncoder
    enc = cls(box_size=D, zdim=2, kind="resmlp", layers=1, width=16)
    dec = NeuralField(box_size=D, zdim=2, layers=1, width=16)
    return HeterogeneousVAE(enc, dec)


@pytest.mark.parametrize("tilt", [False, True])
def test_vae_forward_and_round_trip(tilt):
    vae = make_vae(tilt)
    images = torch.randn(3, 16, 16)
    tilted = torch.randn(3, 16, 16) if tilt else None
    coords = torch.rand(3, 40, 3) - 0.5
    out = vae(images, coords, tilted=tilted)
    assert out.values.shape == (3, 40) and out.values.is_complex()
    assert out.z.shape == out.mu.shape == out.logvar.shape == (3, 2)
    loss = out.values.abs().pow(2).mean() + kl_divergence(out.mu, out.logvar).mean()
    loss.backward()
    assert all(p.grad is not None for p in vae.parameters())
    det = vae(images, coords, tilted=tilted, sample=False)
    torch.testing.assert_close(det.z, det.mu)
    copy = build_vae(vae.config)
    copy.load_state_dict(vae.state_dict())
    torch.testing.assert_close(copy(images, coords, tilted=tilted, sample=False).values, det.values)


def test_vae_checks():
    with pytest.raises(ValueError, match="zdim"):
        HeterogeneousVAE(ImageEncoder(box_size=16, zdim=3), NeuralField(box_size=16, zdim=2))
    vae = make_vae(tilt=True)
    with pytest.raises(ValueError, match="tilted"):
        vae.encode(torch.randn(2, 16, 16))
