"""MRC reading and writing: round trips, modes, offsets past 4 GiB, and clear errors."""

from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest

from cryoscape.errors import InputError
from cryoscape.io.mrc import (
    MrcStackWriter,
    open_stack,
    read_mrc,
    read_mrc_header,
    write_mrc,
)


def _write_raw(path, data, *, mode_dtype=None, pixel=1.0, stack=True):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data if mode_dtype is None else data.astype(mode_dtype))
        if data.ndim == 3 and stack:
            mrc.set_image_stack()
        mrc.voxel_size = pixel


@pytest.mark.parametrize("D", [15, 16])
def test_stack_round_trip_keeps_images_and_pixel_size(tmp_path, D):
    rng = np.random.default_rng(D)
    images = rng.normal(size=(7, D, D)).astype(np.float32)
    path = tmp_path / "stack.mrcs"
    write_mrc(path, images, pixel_size_angstrom=1.37)
    data, pixel = read_mrc(path)
    np.testing.assert_array_equal(data, images)
    assert pixel == pytest.approx(1.37, rel=1e-6)
    with mrcfile.open(path) as mrc:
        assert mrc.is_image_stack()
    stack = open_stack(path)
    assert len(stack) == 7 and stack.box_size == D
    assert stack.pixel_size_angstrom == pytest.approx(1.37, rel=1e-6)
    np.testing.assert_array_equal(stack.read([6, 0, 3, 3]), images[[6, 0, 3, 3]])
    np.testing.assert_array_equal(stack.read(slice(2, 5)), images[2:5])
    np.testing.assert_array_equal(stack.read(slice(None, None, -2)), images[::-2])
    np.testing.assert_array_equal(stack.read(4), images[4])
    np.testing.assert_array_equal(stack.read(-1), images[-1])
    assert stack.read([2]).dtype == np.float32 and stack.read([2]).shape == (1, D, D)
    with pytest.raises(IndexError):
        stack.read([7])


@pytest.mark.parametrize("D", [9, 10])
def test_volume_and_image_round_trip(tmp_path, D):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(D, D, D)).astype(np.float32)
    write_mrc(tmp_path / "vol.mrc", volume, pixel_size_angstrom=2.5)
    data, pixel = read_mrc(tmp_path / "vol.mrc")
    np.testing.assert_array_equal(data, volume)
    assert pixel == pytest.approx(2.5)
    with mrcfile.open(tmp_path / "vol.mrc") as mrc:
        assert mrc.is_volume()
    image = volume[0]
    write_mrc(tmp_path / "img.mrc", image, pixel_size_angstrom=0.8)
    data, pixel = read_mrc(tmp_path / "img.mrc")
    assert data.shape == (D, D)
    np.testing.assert_array_equal(data, image)
    assert pixel == pytest.approx(0.8)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a.mrcs"
    write_mrc(path, np.ones((2, 4, 4), np.float32))
    write_mrc(path, np.zeros((3, 4, 4), np.float32))  # overwrite in place
    assert read_mrc(path)[0].shape == (3, 4, 4)
    assert sorted(os.listdir(tmp_path)) == ["a.mrcs"]
    with pytest.raises(ValueError):
        write_mrc(path, np.zeros((2, 2, 2, 2)))
    assert read_mrc(path)[0].shape == (3, 4, 4)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int8, np.float16])
def test_integer_and_half_modes_read_as_float32(tmp_path, dtype):
    rng = np.random.default_rng(1)
    values = rng.integers(0, 100, size=(3, 8, 8))
    path = tmp_path / "s.mrcs"
    _write_raw(path, values, mode_dtype=dtype)
    header = read_mrc_header(path)
    assert header.dtype == np.dtype(dtype).newbyteorder("<") or header.dtype == np.dtype(dtype)
    out = open_stack(path).read([2, 0])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values[[2, 0]].astype(np.float32))


def test_header_fields_and_extended_header_offset(tmp_path):
    path = tmp_path / "ext.mrcs"
    images = np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_extended_header(np.zeros(100, dtype="V1"))
        mrc.set_data(images)
        mrc.set_image_stack()
        mrc.voxel_size = 3.0
    h = read_mrc_header(path)
    assert (h.nx, h.ny, h.nz) == (6, 6, 2)
    assert h.data_offset_bytes == 1124 and isinstance(h.data_offset_bytes, int)
    assert h.file_size_bytes == 1124 + images.nbytes
    assert h.pixel_size_angstrom == pytest.approx(3.0)
    np.testing.assert_array_equal(open_stack(path).read([1, 0]), images[[1, 0]])


def _write_header_only(path, *, D, n, ext=0):
    """A header claiming ``n`` images of ``D x D`` float32, with no data written."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.zeros((1, D, D), np.float32))
        mrc.set_image_stack()
        if ext:
            mrc.set_extended_header(np.zeros(ext, dtype="V1"))
        mrc.header.nz = n
    return path


def test_offset_arithmetic_past_4_gib(tmp_path):
    D, n, ext = 256, 300001, 96
    path = _write_header_only(tmp_path / "big.mrcs", D=D, n=n, ext=ext)
    h = read_mrc_header(path, check_size=False)
    idx = 300000
    expected = 1024 + ext + idx * D * D * 4
    assert expected > 2**32
    assert h.image_offset_bytes(idx) == expected
    assert h.expected_size_bytes == 1024 + ext + n * D * D * 4
    with pytest.raises(InputError, match="truncated"):
        open_stack(path)


def test_reads_an_image_stored_past_4_gib_in_a_sparse_file(tmp_path):
    D, n = 256, 17000  # 17000 * 256 KiB = 4.15 GiB of (sparse) data
    path = _write_header_only(tmp_path / "sparse.mrcs", D=D, n=n)
    h = read_mrc_header(path, check_size=False)
    image = np.random.default_rng(2).normal(size=(D, D)).astype(np.float32)
    try:
        with open(path, "r+b") as f:
            f.truncate(h.expected_size_bytes)
            f.seek(h.image_offset_bytes(n - 1))
            f.write(image.tobytes())
    except OSError:
        pytest.skip("file system does not allow a sparse 4 GiB file")
    stack = open_stack(path)
    assert h.image_offset_bytes(n - 1) > 2**32
    np.testing.assert_array_equal(stack.read([n - 1])[0], image)
    np.testing.assert_array_equal(stack.read([0, n - 1])[0], np.zeros((D, D), np.float32))


def test_truncated_file_says_how_many_images_it_holds(tmp_path):
    path = tmp_path / "stack.mrcs"
    write_mrc(path, np.ones((20, 64, 64), np.float32))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 7 * 64 * 64 * 4 - 10)  # 12 full images and part of one more remain
    with pytest.raises(InputError) as err:
        open_stack(path)
    msg = str(err.value)
    assert "stack.mrcs is truncated" in msg
    assert "promises 20 images of 64x64" in msg and "holds only 12" in msg
    with pytest.raises(InputError, match="truncated"):
        read_mrc(path)


def test_nan_pixels_are_reported_with_the_image_index(tmp_path):
    images = np.zeros((5, 8, 8), np.float32)
    images[3, 2, 2] = np.nan
    images[4, 1, 1] = np.inf
    path = tmp_path / "nan.mrcs"
    write_mrc(path, images)
    stack = open_stack(path)
    np.testing.assert_array_equal(stack.read([0, 2, 1]), 0)
    with pytest.raises(InputError, match=r"nan.mrcs has NaN or infinite pixels in image 3"):
        stack.read([1, 3])
    with pytest.raises(InputError, match=r"image 4"):
        stack.read([4, 0])  # unsorted request
    with pytest.raises(InputError, match=r"image 3"):
        stack.read(slice(2, 5))
    with pytest.raises(InputError, match="NaN or infinite"):
        read_mrc(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match=r"nope.mrcs does not exist"):
        open_stack(tmp_path / "nope.mrcs")
    with pytest.raises(InputError, match="folder"):
        read_mrc_header(tmp_path)


def test_not_an_mrc_file(tmp_path):
    small = tmp_path / "notes.mrc"
    small.write_text("hello")
    with pytest.raises(InputError, match="notes.mrc is not an MRC file"):
        read_mrc(small)
    big = tmp_path / "random.mrcs"
    big.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(InputError, match="random.mrcs is not an MRC file"):
        open_stack(big)


def test_unsupported_mode(tmp_path):
    path = tmp_path / "c.mrc"
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.zeros((4, 4), np.complex64))
    with pytest.raises(InputError, match="mode 4"):
        read_mrc(path)


def test_non_square_stack(tmp_path):
    path = tmp_path / "rect.mrcs"
    _write_raw(path, np.zeros((2, 6, 8), np.float32))
    with pytest.raises(InputError, match="non-square images of 8x6"):
        open_stack(path)
    data, _ = read_mrc(path)  # whole-file reads (micrographs) accept rectangles
    assert data.shape == (2, 6, 8)


def test_big_endian_file(tmp_path):
    path = tmp_path / "be.mrcs"
    images = np.random.default_rng(3).normal(size=(3, 5, 5)).astype(">f4")
    _write_raw(path, images)
    np.testing.assert_array_equal(open_stack(path).read([2, 1]), images[[2, 1]].astype(np.float32))


def test_stack_writer_streams_and_sets_statistics(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.normal(2.0, 3.0, size=(11, 7, 7)).astype(np.float32)
    path = tmp_path / "w.mrcs"
    with MrcStackWriter(path, n_images=11, box_size=7, pixel_size_angstrom=1.5) as writer:
        for start in range(0, 11, 4):
            writer.write(images[start:start + 4])
    data, pixel = read_mrc(path)
    np.testing.assert_array_equal(data, images)
    assert pixel == pytest.approx(1.5)
    with mrcfile.open(path) as mrc:
        assert mrc.is_image_stack()
        assert mrc.header.dmean == pytest.approx(images.mean(), rel=1e-5)
        assert mrc.header.rms == pytest.approx(images.std(), rel=1e-5)
        assert mrc.header.dmin == images.min() and mrc.header.dmax == images.max()
    assert sorted(os.listdir(tmp_path)) == ["w.mrcs"]


def test_stack_writer_failure_leaves_old_file(tmp_path):
    path = tmp_path / "w.mrcs"
    write_mrc(path, np.ones((2, 4, 4), np.float32))
    with pytest.raises(RuntimeError):
        with MrcStackWriter(path, n_images=3, box_size=4) as writer:
            writer.write(np.zeros((1, 4, 4)))
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="only 1 of 3"):
        with MrcStackWriter(path, n_images=3, box_size=4) as writer:
            writer.write(np.zeros((1, 4, 4)))
    np.testing.assert_array_equal(read_mrc(path)[0], np.ones((2, 4, 4)))
    assert sorted(os.listdir(tmp_path)) == ["w.mrcs"]


def test_memory_map_is_dropped_after_many_bytes(tmp_path):
    images = np.random.default_rng(5).normal(size=(10, 8, 8)).astype(np.float32)
    write_mrc(tmp_path / "s.mrcs", images)
    stack = open_stack(tmp_path / "s.mrcs")
    stack.remap_after_bytes = 3 * 8 * 8 * 4  # unmap after three images have passed through
    np.testing.assert_array_equal(stack.read([0, 1]), images[:2])
    assert stack._mm is not None
    np.testing.assert_array_equal(stack.read([5]), images[5:6])
    assert stack._mm is None  # unmapped: touched pages leave the resident set
    np.testing.assert_array_equal(stack.read(slice(7, 10)), images[7:])
