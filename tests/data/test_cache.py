"""The cached preprocessed stack equals the preprocessor applied to every image."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cryoscape.data.cache import write_preprocessed_stack
from cryoscape.data.images import ParticleImages
from cryoscape.data.preprocess import Preprocessor
from cryoscape.io.mrc import read_mrc, write_mrc


@pytest.mark.parametrize("D, D_new", [(20, 10), (21, 12)])
def test_cached_stack_matches_in_memory_preprocessing(tmp_path, D, D_new):
    rng = np.random.default_rng(D)
    a = rng.normal(size=(7, D, D)).astype(np.float32)
    b = rng.normal(size=(4, D, D)).astype(np.float32)
    write_mrc(tmp_path / "a.mrcs", a, pixel_size_angstrom=1.1)
    write_mrc(tmp_path / "b.mrcs", b, pixel_size_angstrom=1.1)
    paths = np.array([str(tmp_path / "b.mrcs")] * 4 + [str(tmp_path / "a.mrcs")] * 7)
    indices = np.array([3, 0, 1, 2, 6, 5, 4, 3, 2, 1, 0])
    reader = ParticleImages(paths, indices, in_memory=False)
    pre = Preprocessor(downsample_box_size=D_new, invert=True, mean=0.1, std=2.0, window=True)
    out_path = tmp_path / "cache.mrcs"
    pixel = write_preprocessed_stack(reader, pre, out_path, batch_size=3, progress=False)
    data, pixel_read = read_mrc(out_path)
    expected = pre(torch.from_numpy(reader.load_all())).numpy()
    np.testing.assert_allclose(data, expected, rtol=0, atol=1e-6)
    assert pixel == pytest.approx(1.1 * D / D_new) and pixel_read == pytest.approx(pixel, rel=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["a.mrcs", "b.mrcs", "cache.mrcs"]


def test_failure_midway_leaves_no_partial_file(tmp_path):
    write_mrc(tmp_path / "s.mrcs", np.zeros((10, 8, 8), np.float32))
    reader = ParticleImages.from_stack(tmp_path / "s.mrcs", in_memory=False)

    def failing(images, calls=[0]):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("disk full")
        return torch.as_tensor(images)

    class Failing(Preprocessor):
        def __call__(self, images):
            return failing(images)

    with pytest.raises(RuntimeError):
        write_preprocessed_stack(reader, Failing(), tmp_path / "out.mrcs", batch_size=4,
                                 progress=False)
    assert sorted(os.listdir(tmp_path)) == ["s.mrcs"]
