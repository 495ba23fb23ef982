"""Maps for analyses: the decoder's own maps (its fast path), post-processed like `cryoscape volumes`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoscape.analysis.maps import MapModel, generate_maps
from cryoscape.io.mrc import read_mrc
from cryoscape.models.basis import StructuralBasis
from cryoscape.models.neural_field import NeuralField


def _model(decoder, D: int) -> MapModel:
    return MapModel(decoder=decoder.eval(), box_size=D, pixel_size_angstrom=3.0, epoch=0, device=torch.device("cpu"))


def test_generate_maps_writes_post_processed_maps(tmp_path):
    torch.manual_seed(1)
    decoder = NeuralField(box_size=16, zdim=2, layers=1, width=32)
    model = _model(decoder, 16)
    z = np.array([[0.1, -0.3], [1.0, 0.5]], np.float32)
    plain = generate_maps(model, z, tmp_path / "a", amp=False, progress=False)
    flipped = generate_maps(model, z, tmp_path / "b", amp=False, progress=False, flip=True, invert=True, box_size=8)
    assert [p.name for p in plain.paths] == ["vol_000.mrc", "vol_001.mrc"]
    np.testing.assert_allclose(np.loadtxt(tmp_path / "a" / "z_values.txt"), z, rtol=1e-5)
    v0, pixel = read_mrc(plain.paths[1])
    assert pixel == pytest.approx(3.0) and v0.shape == (16, 16, 16)
    np.testing.assert_allclose(plain.projections[1, 0], v0.sum(0), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(v0, decoder.eval_volume(torch.tensor(z[1])).numpy(), rtol=1e-4, atol=1e-6)
        small = decoder.eval_volume(torch.tensor(z[1]), box_size=8).numpy()
    v1, pixel1 = read_mrc(flipped.paths[1])
    assert pixel1 == pytest.approx(6.0) and v1.shape == (8, 8, 8)
    np.testing.assert_allclose(v1, -small[::-1], rtol=1e-4, atol=1e-6)
    assert np.abs(v1).max() > 0  # a real map, not an empty one


def test_basis_decoder_maps_come_from_its_fast_path(tmp_path):
    torch.manual_seed(3)
    decoder = StructuralBasis(box_size=16, zdim=2)
    with torch.no_grad():
        for p in (decoder.mean_real, decoder.mean_imag, decoder.basis_real, decoder.basis_imag):
            p.normal_()
    z = np.array([[0.4, -1.0]], np.float32)
    maps = generate_maps(_model(decoder, 16), z, tmp_path, amp=False, progress=False)
    with torch.no_grad():
        expected = decoder.eval_volume(torch.tensor(z[0])).numpy()
    np.testing.assert_allclose(read_mrc(maps.paths[0])[0], expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected).max() > 0


def test_bfloat16_maps_are_close_to_float32(tmp_path):
    torch.manual_seed(2)
    model = _model(NeuralField(box_size=16, zdim=2, layers=2, width=64), 16)
    z = np.array([[0.3, -0.2]], np.float32)
    a = read_mrc(generate_maps(model, z, tmp_path / "a", amp=False, progress=False).paths[0])[0]
    b = read_mrc(generate_maps(model, z, tmp_path / "b", amp=True, progress=False).paths[0])[0]
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 0 < rel < 0.03  # bfloat16 did run (not bit-identical) and stayed close
