"""Maps for analyses: inside the training sphere they are the decoder's own values, point for point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoscape.analysis.maps import MapModel, evaluate_map, generate_maps, plan_map_grid
from cryoscape.fourier.fft import fft3_center, ht3_center, ifft3_center, iht3_center
from cryoscape.io.mrc import read_mrc
from cryoscape.models.neural_field import NeuralField


def _sphere_masked(volume: torch.Tensor, D: int, domain: str) -> torch.Tensor:
    n = volume.shape[-1]
    c = torch.arange(n) - n // 2
    cz, cy, cx = torch.meshgrid(c, c, c, indexing="ij")
    inside = 4 * (cx**2 + cy**2 + cz**2) < D * D
    if domain == "fourier":
        return ifft3_center(fft3_center(volume) * inside).real
    return iht3_center(ht3_center(volume) * inside)


@pytest.mark.parametrize("domain", ["fourier", "hartley"])
@pytest.mark.parametrize("D,n", [(16, 16), (15, 15), (16, 12), (16, 11), (15, 10), (16, 20), (15, 18)])
def test_sphere_maps_equal_eval_volume_inside_the_training_sphere(domain, D, n):
    torch.manual_seed(0)
    decoder = NeuralField(box_size=D, zdim=3, layers=1, width=32, domain=domain).eval()
    z = torch.randn(3)
    with torch.no_grad():
        reference = decoder.eval_volume(z, box_size=n).double()
    grid = plan_map_grid(n, training_box=D, domain=domain)
    mine = evaluate_map(decoder, z, grid).double()
    expected = _sphere_masked(reference, D, domain)
    assert (mine - expected).abs().max() <= 1e-5 * expected.abs().max()
    if domain == "fourier" and n == D:
        assert grid.coords.shape[0] < 0.27 * n**3  # a half-sphere: about half of eval_volume's points


def test_generate_maps_writes_post_processed_maps(tmp_path):
    torch.manual_seed(1)
    decoder = NeuralField(box_size=16, zdim=2, layers=1, width=32).eval()
    model = MapModel(decoder=decoder, box_size=16, pixel_size_angstrom=3.0, epoch=0, device=torch.device("cpu"))
    z = np.array([[0.1, -0.3], [1.0, 0.5]], np.float32)
    plain = generate_maps(model, z, tmp_path / "a", amp=False, progress=False)
    flipped = generate_maps(model, z, tmp_path / "b", amp=False, progress=False, flip=True, invert=True, box_size=8)
    exact = generate_maps(model, z, tmp_path / "c", amp=False, progress=False, sphere=False)
    assert [p.name for p in plain.paths] == ["vol_000.mrc", "vol_001.mrc"]
    np.testing.assert_allclose(np.loadtxt(tmp_path / "a" / "z_values.txt"), z, rtol=1e-5)
    v0, pixel = read_mrc(plain.paths[1])
    assert pixel == pytest.approx(3.0) and v0.shape == (16, 16, 16)
    np.testing.assert_allclose(plain.projections[1, 0], v0.sum(0), rtol=1e-4, atol=1e-5)
    v1, pixel1 = read_mrc(flipped.paths[1])
    assert pixel1 == pytest.approx(6.0) and v1.shape == (8, 8, 8)
    small = evaluate_map(decoder, z[1], plan_map_grid(8, training_box=16)).numpy()
    np.testing.assert_allclose(v1, -small[::-1], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(read_mrc(exact.paths[0])[0], decoder.eval_volume(torch.tensor(z[0])).numpy(),
                                   rtol=1e-4, atol=1e-6)


def test_bfloat16_maps_are_close_to_float32():
    torch.manual_seed(2)
    decoder = NeuralField(box_size=16, zdim=2, layers=2, width=64).eval()
    grid = plan_map_grid(16, training_box=16)
    a = evaluate_map(decoder, np.array([0.3, -0.2]), grid)
    b = evaluate_map(decoder, np.array([0.3, -0.2]), grid, amp=True)
    assert float((a - b).norm() / a.norm()) < 0.03
