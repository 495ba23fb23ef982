"""ParticleImages: right images in any order across stacks, bounded memory, clear errors."""

from __future__ import annotations

import logging
import pickle
import tracemalloc

import numpy as np
import pytest

from cryoscape.data.images import ParticleImages
from cryoscape.errors import InputError
from cryoscape.io.mrc import write_mrc


@pytest.fixture
def three_stacks(tmp_path):
    """Three stacks of 13x13 images whose pixels encode (stack, index)."""
    D = 13
    sizes = [5, 8, 3]
    stacks = []
    for s, n in enumerate(sizes):
        images = np.empty((n, D, D), np.float32)
        for i in range(n):
            images[i] = 100 * s + i + np.linspace(0, 0.5, D * D).reshape(D, D)
        path = tmp_path / f"stack{s}.mrcs"
        write_mrc(path, images, pixel_size_angstrom=1.7)
        stacks.append((str(path), images))
    # a particle table that mixes the stacks and skips / repeats images
    rng = np.random.default_rng(0)
    pairs = [(s, i) for s, (_, imgs) in enumerate(stacks) for i in range(len(imgs))]
    rows = [pairs[j] for j in rng.permutation(len(pairs))] + [(1, 2), (0, 4)]
    paths = np.array([stacks[s][0] for s, _ in rows], dtype=object)
    indices = np.array([i for _, i in rows])
    expected = np.stack([stacks[s][1][i] for s, i in rows])
    return paths, indices, expected


@pytest.mark.parametrize("in_memory", [False, True])
def test_reads_the_right_images_in_any_order(three_stacks, in_memory):
    paths, indices, expected = three_stacks
    reader = ParticleImages(paths, indices, in_memory=in_memory, max_open_files=2)
    assert len(reader) == len(expected)
    assert reader.box_size == 13
    assert reader.pixel_size_angstrom == pytest.approx(1.7)
    assert reader.in_memory == in_memory
    order = np.random.default_rng(1).permutation(len(reader))
    np.testing.assert_array_equal(reader.read(order), expected[order])
    np.testing.assert_array_equal(reader.read([3, 3, 0]), expected[[3, 3, 0]])
    np.testing.assert_array_equal(reader.read(slice(2, 9)), expected[2:9])
    np.testing.assert_array_equal(reader[5], expected[5])
    np.testing.assert_array_equal(reader.load_all(), expected)
    assert reader.read([]).shape == (0, 13, 13)
    assert reader.n_open_files <= 2
    batches = list(reader.iter_batches(4))
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), expected)


def test_lru_keeps_few_maps_open(three_stacks):
    paths, indices, expected = three_stacks
    reader = ParticleImages(paths, indices, in_memory=False, max_open_files=1)
    for i in range(len(reader)):
        np.testing.assert_array_equal(reader.read([i])[0], expected[i])
        assert reader.n_open_files <= 1
    clone = pickle.loads(pickle.dumps(reader))  # e.g. sent to a DataLoader worker
    np.testing.assert_array_equal(clone.read([0, 7]), expected[[0, 7]])


def test_automatic_in_memory_choice_is_logged(three_stacks, caplog):
    paths, indices, _ = three_stacks
    with caplog.at_level(logging.INFO, logger="cryoscape.data.images"):
        small = ParticleImages(paths, indices)
        big = ParticleImages(paths, indices, memory_limit_bytes=1000)
    assert small.in_memory and not big.in_memory
    assert "loaded into memory" in caplog.text and "read lazily" in caplog.text


def test_memory_stays_bounded_for_a_large_stack(tmp_path):
    D, n = 64, 1024  # 16 MiB on disk
    path = tmp_path / "big.mrcs"
    rng = np.random.default_rng(0)
    write_mrc(path, rng.normal(size=(n, D, D)).astype(np.float32))
    tracemalloc.start()
    try:
        reader = ParticleImages.from_stack(path, in_memory=False)
        first = reader.read([1000, 3, 512, 7])
        _, peak_read = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total = 0.0
        for _, batch in reader.iter_batches(32):
            total += float(batch[:, 0, 0].sum())
        _, peak_scan = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.shape == (4, D, D)
    image_bytes = D * D * 4
    assert peak_read < 1024**2  # a few images, never the 16 MiB stack
    assert peak_scan < 3 * 32 * image_bytes + 200_000  # about two batches at a time
    assert np.isfinite(total)


def test_from_stack_matches_file_order(tmp_path):
    images = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6)
    write_mrc(tmp_path / "s.mrcs", images)
    reader = ParticleImages.from_stack(tmp_path / "s.mrcs")
    np.testing.assert_array_equal(reader.read([3, 1]), images[[3, 1]])


def test_index_past_the_end_of_a_stack(three_stacks):
    paths, indices, _ = three_stacks
    bad = indices.copy()
    bad[0] = 50
    with pytest.raises(InputError, match=r"particles.star refers to image 51 of .*holds only"):
        ParticleImages(paths, bad, table_path="particles.star")


def test_box_size_mismatches(tmp_path, three_stacks):
    paths, indices, _ = three_stacks
    with pytest.raises(InputError, match="says the box is 64 pixels"):
        ParticleImages(paths, indices, box_size=64)
    other = tmp_path / "other.mrcs"
    write_mrc(other, np.zeros((2, 9, 9), np.float32))
    mixed = np.concatenate([paths, [str(other)]])
    with pytest.raises(InputError, match="must share the box size"):
        ParticleImages(mixed, np.concatenate([indices, [0]]))


def test_missing_stack_and_bad_table(tmp_path, three_stacks):
    paths, indices, _ = three_stacks
    with pytest.raises(InputError, match="gone.mrcs does not exist"):
        ParticleImages(np.array([str(tmp_path / "gone.mrcs")]), np.array([0]))
    with pytest.raises(InputError, match="negative"):
        ParticleImages(paths, indices - 10)
    with pytest.raises(InputError, match="one file and one index per particle"):
        ParticleImages(paths, indices[:-1])


def test_nan_image_is_named(tmp_path):
    images = np.zeros((3, 5, 5), np.float32)
    images[2, 0, 0] = np.nan
    write_mrc(tmp_path / "n.mrcs", images)
    reader = ParticleImages(np.array([str(tmp_path / "n.mrcs")] * 3), np.array([0, 1, 2]),
                            in_memory=False)
    reader.read([0, 1])
    with pytest.raises(InputError, match="n.mrcs has NaN or infinite pixels in image 2"):
        reader.read([2])
