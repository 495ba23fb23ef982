"""The model lattice: geometry, Hermitian fill, Hartley conversion, and slices read from it."""

from __future__ import annotations

import pytest
import torch

from cryoscape.fourier.slicing import slice_coordinates
from cryoscape.geometry.rotations import random_rotations
from cryoscape.models.base import VolumeDecoder
from cryoscape.posesearch.lattice import decoder_values, evaluate_lattice, evaluate_slices


class TrilinearField(VolumeDecoder):
    """A Hermitian transform that trilinear interpolation reproduces exactly.

    ``F(k) = 1 + 3 kx ky + ky kz / 2 + i (kx + 2 ky - 5 kz + 4 kx ky kz)`` with ``k`` in index
    units: the real part is even and the imaginary part odd, so ``F(-k) = conj F(k)``, and every
    term is at most linear in each coordinate.
    """

    def __init__(self, box_size: int, domain: str = "fourier", zdim: int = 0):
        super().__init__(box_size=box_size, zdim=zdim)
        self.domain = domain

    def fourier(self, coords_cycles: torch.Tensor) -> torch.Tensor:
        x, y, z = (coords_cycles * self.box_size).unbind(-1)
        real = 1 + 3 * x * y + 0.5 * y * z
        imag = x + 2 * y - 5 * z + 4 * x * y * z
        return torch.complex(real, imag)

    def forward(self, coords, z=None):
        F = self.fourier(coords.float())
        if self.domain == "hartley":
            return F.real - F.imag
        return F

    def eval_volume(self, z=None, *, box_size=None):
        raise NotImplementedError


@pytest.mark.parametrize("domain", ["fourier", "hartley"])
@pytest.mark.parametrize("oversampling", [1.0, 2.0, 1.5])
def test_lattice_slices_equal_the_function(domain, oversampling):
    D = 21
    dec = TrilinearField(D, domain)
    lat = evaluate_lattice(dec, radius_index=7.0, oversampling=oversampling)
    R = random_rotations(5, generator=torch.Generator().manual_seed(0))
    coords = torch.tensor([[0.0, 0.0], [3.0, -2.0], [-5.0, 4.5], [6.9, 0.3], [0.0, -7.0]])
    got = lat.sample_slices(R, coords)
    want = dec.fourier(slice_coordinates(R, coords) / D)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5)
    assert got.shape == (5, 5)


def test_hartley_values_become_fourier_values():
    dec = TrilinearField(16, "hartley")
    pts = torch.rand(1, 50, 3, generator=torch.Generator().manual_seed(1)) - 0.5
    torch.testing.assert_close(decoder_values(dec, pts, None), dec.fourier(pts))


def test_direct_slices_match_lattice_and_batched_lattices_follow_their_latents():
    D = 16
    dec = TrilinearField(D)
    R = random_rotations(6, generator=torch.Generator().manual_seed(2)).reshape(2, 3, 3, 3)
    coords = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [4.0, -4.0]])
    direct = evaluate_slices(dec, R, coords)
    lat = evaluate_lattice(dec, radius_index=6.0, oversampling=2.0)
    torch.testing.assert_close(direct, lat.sample_slices(R, coords), atol=2e-4, rtol=1e-5)

    class Scaled(TrilinearField):
        """Latent ``z`` scales the map: volume ``i`` of a batched lattice must be read with ``z_i``."""

        def forward(self, coords, z=None):
            return super().forward(coords) * z[:, :1].to(torch.complex64)

    sdec = Scaled(D, zdim=1)
    z = torch.tensor([[1.0], [-2.0]])
    blat = evaluate_lattice(sdec, radius_index=6.0, oversampling=2.0, z=z)
    assert blat.n_volumes == 2
    got = blat.sample_slices(R, coords)
    torch.testing.assert_close(got[1], -2.0 * lat.sample_slices(R[1], coords), atol=5e-4, rtol=1e-5)
    torch.testing.assert_close(evaluate_slices(sdec, R, coords, z=z), got, atol=5e-4, rtol=1e-5)
