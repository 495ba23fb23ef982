"""Datasets larger than memory: chunked shuffle, block reads, the float16 cache, bounded RSS."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pytest
import torch

from cryoscape.data import images as images_module
from cryoscape.data.cache import open_training_cache, training_cache_path
from cryoscape.data.images import ParticleImages
from cryoscape.data.preprocess import Preprocessor
from cryoscape.data.training import CHUNK_WINDOW_BLOCKS, ParticleDataset, epoch_order, iterate_batches
from cryoscape.errors import InputError
from cryoscape.geometry.rotations import random_rotations
from cryoscape.io.mrc import MrcStackWriter, open_stack, write_mrc
from cryoscape.io.particles import CtfParameters, ParticleTable


# --------------------------------------------------------------------------------------------
# epoch order
# --------------------------------------------------------------------------------------------
def test_default_order_is_unchanged():
    # the uniform shuffle of every run so far (old checkpoints resume bit for bit)
    assert epoch_order(12, seed=3, epoch=2).tolist() == [0, 1, 6, 11, 8, 2, 7, 5, 3, 4, 10, 9]
    assert epoch_order(10, seed=0, epoch=0, shuffle_chunk=0).tolist() == [8, 1, 5, 2, 3, 0, 7, 9, 6, 4]


@pytest.mark.parametrize("n, K", [(1000, 32), (1001, 32), (50, 64), (37, 1)])
def test_chunked_order_is_a_deterministic_permutation_of_whole_blocks(n, K):
    order = epoch_order(n, seed=5, epoch=3, shuffle_chunk=K)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n))
    assert np.array_equal(order, epoch_order(n, seed=5, epoch=3, shuffle_chunk=K))
    if n > 2 * K:
        assert not np.array_equal(order, epoch_order(n, seed=5, epoch=4, shuffle_chunk=K))
        assert not np.array_equal(order, epoch_order(n, seed=6, epoch=3, shuffle_chunk=K))
    # each window of W consecutive blocks is a union of whole blocks, internally shuffled
    blocks = order // K
    start = 0
    while start < n:
        first_blocks = []
        for b in blocks[start:]:
            if b not in first_blocks:
                if len(first_blocks) == CHUNK_WINDOW_BLOCKS:
                    break
                first_blocks.append(b)
        size = sum(min(n, (b + 1) * K) - b * K for b in first_blocks)
        window = order[start:start + size]
        expected = np.concatenate([np.arange(b * K, min(n, (b + 1) * K)) for b in first_blocks])
        assert np.array_equal(np.sort(window), np.sort(expected))
        start += size


def test_chunked_order_mixes_within_windows():
    order = epoch_order(4096, seed=0, epoch=0, shuffle_chunk=256)
    # not block-sequential: consecutive entries are rarely neighbours
    assert np.mean(np.abs(np.diff(order)) == 1) < 0.05
    # a batch of 64 holds particles of several blocks
    assert np.mean([len(np.unique(order[i:i + 64] // 256)) for i in range(0, 4096, 64)]) > 3


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _table(tmp_path, n=300, D=16, n_files=3, dtype="float32"):
    rng = np.random.default_rng(0)
    stack = (rng.normal(size=(n, D, D)) * 2 + 0.5).astype(np.float32)
    paths, indices = [], []
    for f, part in enumerate(np.array_split(np.arange(n), n_files)):
        path = tmp_path / f"stack{f}.mrcs"
        with MrcStackWriter(path, n_images=part.size, box_size=D, pixel_size_angstrom=2.0, dtype=dtype) as w:
            w.write(stack[part])
        paths += [str(path)] * part.size
        indices += list(range(part.size))
    if dtype == "float16":
        stack = stack.astype(np.float16).astype(np.float32)
    ctf = CtfParameters(
        defocus_u_angstrom=rng.uniform(8000, 20000, n), defocus_v_angstrom=rng.uniform(8000, 20000, n),
        defocus_angle_deg=rng.uniform(0, 180, n), voltage_kv=np.full(n, 300.0), cs_mm=np.full(n, 2.7),
        amplitude_contrast=np.full(n, 0.1), phase_shift_deg=np.zeros(n),
    )
    table = ParticleTable(
        image_paths=np.array(paths, dtype=object), image_indices=np.array(indices), box_size=D,
        pixel_size_angstrom=np.full(n, 2.0),
        rotations=random_rotations(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).numpy(),
        shifts_pixel=rng.uniform(-2, 2, (n, 2)), ctf=ctf, source_path=str(tmp_path / "particles.star"),
    )
    return table, stack


def _assert_same_batches(a, b, *, atol=0.0, rtol=0.0):
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.images, b.images, atol=atol, rtol=rtol)
    torch.testing.assert_close(a.values, b.values, atol=atol, rtol=rtol)
    assert torch.equal(a.rotations, b.rotations) and torch.equal(a.shifts_pixel, b.shifts_pixel)
    assert torch.equal(a.ctf, b.ctf)


def test_float16_stacks_round_trip(tmp_path):
    table, stack = _table(tmp_path, n=20, n_files=1, dtype="float16")
    s = open_stack(table.image_paths[0])
    assert s.header.mode == 12
    np.testing.assert_array_equal(ParticleImages.from_stack(s.path, in_memory=False).read([3, 1]), stack[[3, 1]])
    with pytest.raises(ValueError, match="float16 range"):
        with MrcStackWriter(tmp_path / "big.mrcs", n_images=1, box_size=2, dtype="float16") as w:
            w.write(np.full((1, 2, 2), 1e6, np.float32))


@pytest.mark.parametrize("shuffle_chunk", [0, 32])
def test_lazy_and_in_memory_give_identical_batches(tmp_path, shuffle_chunk):
    table, _ = _table(tmp_path)
    memory = ParticleDataset(table, in_memory=True, shuffle_chunk=shuffle_chunk)
    lazy = ParticleDataset(table, in_memory=False, shuffle_chunk=shuffle_chunk)
    norm = memory.fit_normalization(invert=True, seed=1)
    assert lazy.fit_normalization(invert=True, seed=1) == norm
    order = lazy.epoch_order(seed=0, epoch=1)
    assert np.array_equal(order, epoch_order(len(lazy), seed=0, epoch=1, shuffle_chunk=shuffle_chunk))
    for a, b in zip(iterate_batches(memory.get_batch, order, 24, prefetch=0),
                    iterate_batches(lazy.get_batch, order, 24, prefetch=3)):
        _assert_same_batches(a, b)


def test_block_reads_are_sequential_and_each_block_is_read_once(tmp_path, monkeypatch):
    table, stack = _table(tmp_path, n=300, n_files=1)
    K = 32
    reads = []
    original = images_module._StackFile._read_into

    def spy(self, rows, offset):
        reads.append((offset, rows.nbytes))
        return original(self, rows, offset)

    monkeypatch.setattr(images_module._StackFile, "_read_into", spy)
    reader = ParticleImages(table.image_paths, table.image_indices, in_memory=False, block_size=K,
                            cached_blocks=2 * CHUNK_WINDOW_BLOCKS)
    order = epoch_order(len(reader), seed=2, epoch=0, shuffle_chunk=K)
    for start in range(0, len(order), 20):
        idx = order[start:start + 20]
        np.testing.assert_array_equal(reader.read(idx), stack[idx])
    image_bytes = 16 * 16 * 4
    n_blocks = -(-300 // K)
    assert len(reads) == n_blocks  # every block read once, in one piece
    assert sorted(size for _, size in reads) == sorted([K * image_bytes] * (n_blocks - 1) + [(300 % K) * image_bytes])
    # without blocks, a random batch is many small reads
    reads.clear()
    plain = ParticleImages(table.image_paths, table.image_indices, in_memory=False)
    plain.read(epoch_order(300, seed=2, epoch=0)[:20])
    assert len(reads) > 15


def test_reads_sorted_by_offset_merge_consecutive_images(tmp_path, monkeypatch):
    table, stack = _table(tmp_path, n=40, n_files=1)
    reads = []
    original = images_module._StackFile._read_into
    monkeypatch.setattr(images_module._StackFile, "_read_into",
                        lambda self, rows, offset: (reads.append(rows.shape[0]), original(self, rows, offset)))
    reader = ParticleImages(table.image_paths, table.image_indices, in_memory=False)
    idx = np.array([7, 3, 5, 4, 6, 20, 21, 3])
    np.testing.assert_array_equal(reader.read(idx), stack[idx])
    assert reads == [5, 2]  # 3..7 and 20..21, each once


# --------------------------------------------------------------------------------------------
# float16 cache
# --------------------------------------------------------------------------------------------
def test_float16_cache_gives_the_uncached_batches(tmp_path, caplog):
    table, _ = _table(tmp_path)
    cache_dir = tmp_path / "cache"
    plain = ParticleDataset(table, in_memory=False)
    norm = plain.fit_normalization(invert=True)
    cached = ParticleDataset(table, in_memory=False, cache_dir=str(cache_dir), normalization=norm, progress=False)
    assert cached.uses_cache
    order = epoch_order(len(plain), seed=0, epoch=0)
    for a, b in zip(iterate_batches(plain.get_batch, order, 50), iterate_batches(cached.get_batch, order, 50)):
        # float16 keeps 11 significant bits: relative error <= 2^-11 of each value
        scale = float(a.images.abs().max())
        _assert_same_batches(a, b, atol=scale * 2.0**-11, rtol=0)
        assert not torch.equal(a.images, b.images)  # it really came from the float16 copy
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".mrcs")
    mrcs = cache_dir / files[1]
    assert os.path.getsize(mrcs) == 1024 + len(plain) * 16 * 16 * 2
    stamp = os.stat(mrcs).st_mtime_ns
    # a second run reuses it; another normalisation gets its own file
    with caplog.at_level(logging.INFO, logger="cryoscape.data.cache"):
        again = ParticleDataset(table, in_memory=False, cache_dir=str(cache_dir), normalization=norm)
        again.get_batch(np.arange(3))
    assert "reading the float16 cache" in caplog.text and os.stat(mrcs).st_mtime_ns == stamp
    other = ParticleDataset(table, in_memory=False, cache_dir=str(cache_dir), progress=False)
    other.fit_normalization(invert=False)
    other.prepare_cache()
    assert len(list(cache_dir.glob("*.mrcs"))) == 2


def test_datasets_with_a_cache_travel_to_other_processes(tmp_path):
    import pickle

    table, _ = _table(tmp_path, n=40, n_files=2)
    ds = ParticleDataset(table, in_memory=False, cache_dir=str(tmp_path / "cache"), shuffle_chunk=8, progress=False)
    ds.fit_normalization()
    first = ds.get_batch(np.arange(10))
    copy = pickle.loads(pickle.dumps(ds))
    _assert_same_batches(first, copy.get_batch(np.arange(10)))
    assert copy.uses_cache and len(list((tmp_path / "cache").glob("*.mrcs"))) == 1


def test_cache_key_follows_the_input(tmp_path):
    table, stack = _table(tmp_path, n=30, n_files=2)
    reader = ParticleImages(table.image_paths, table.image_indices, in_memory=False)
    pre = Preprocessor(invert=True, mean=0.1, std=2.0, window=True)
    first = training_cache_path(reader, pre, tmp_path)
    assert training_cache_path(reader, pre, tmp_path) == first
    assert training_cache_path(reader, Preprocessor(mean=0.1, std=2.0, window=True), tmp_path) != first
    subset = ParticleImages(table.image_paths[::-1], table.image_indices[::-1], in_memory=False)
    assert training_cache_path(subset, pre, tmp_path) != first
    os.utime(table.image_paths[0], ns=(1, 1))  # the stack was rewritten
    assert training_cache_path(reader, pre, tmp_path) != first
    cache = open_training_cache(reader, pre, tmp_path / "c", progress=False)
    np.testing.assert_allclose(cache.read(np.arange(30)), pre(stack).numpy(), atol=2e-3 * np.abs(pre(stack).numpy()).max())


def test_unusable_cache_folder_is_one_clear_error(tmp_path):
    table, _ = _table(tmp_path, n=20, n_files=1)
    (tmp_path / "afile").write_text("x")
    ds = ParticleDataset(table, in_memory=False, cache_dir=str(tmp_path / "afile" / "sub"), progress=False)
    ds.fit_normalization()
    with pytest.raises(InputError, match="cache folder .* cannot be used"):
        ds.get_batch(np.arange(2))


def test_cache_is_not_used_for_in_memory_images(tmp_path):
    table, _ = _table(tmp_path, n=20, n_files=1)
    ds = ParticleDataset(table, in_memory=True, cache_dir=str(tmp_path / "cache"))
    ds.fit_normalization()
    ds.get_batch(np.arange(4))
    assert not ds.uses_cache and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------
# resident memory
# --------------------------------------------------------------------------------------------
def _resident_mb() -> float:
    """Resident memory of this process now (anonymous + file-backed pages), MB."""
    total = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                total += int(line.split()[1])
    return total / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_resident_memory_stays_bounded_reading_a_stack_larger_than_the_budget(tmp_path):
    D, n_files, per_file = 64, 4, 400  # 4 x 6.6 MB = 26 MB of images
    rng = np.random.default_rng(0)
    paths = []
    for f in range(n_files):
        path = tmp_path / f"s{f}.mrcs"
        write_mrc(path, rng.normal(size=(per_file, D, D)).astype(np.float32))
        paths += [str(path)] * per_file
    indices = np.tile(np.arange(per_file), n_files)
    stack_mb = n_files * per_file * D * D * 4 / 1024**2
    budget_mb = stack_mb / 4
    warm_up = tmp_path / "warm_up.mrcs"
    write_mrc(warm_up, rng.normal(size=(64, D, D)).astype(np.float32))
    ParticleImages.from_stack(warm_up, in_memory=False).read(np.arange(0, 64, 2))  # code paths, not the data
    order = epoch_order(len(indices), seed=0, epoch=0)
    base = _resident_mb()
    reader = ParticleImages(np.array(paths, dtype=object), indices, in_memory=False)
    peak = base
    for batch in reader.iter_batches(32, indices=order):
        peak = max(peak, _resident_mb())
    assert peak - base < budget_mb, f"resident memory grew {peak - base:.1f} MB reading a {stack_mb:.0f} MB stack"
