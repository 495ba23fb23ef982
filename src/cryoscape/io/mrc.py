"""MRC files: headers, memory-mapped image stacks, whole-file reads and atomic writes.

Headers are parsed by the ``mrcfile`` library; the data block is then mapped with
:class:`numpy.memmap` at ``1024 + extended header`` bytes, so reading a few images from a
stack of any size (over 4 GiB included: every offset is a Python ``int``) touches only those
images.  Arrays are ``[z, y, x]`` (MRC order); for a particle stack ``z`` is the image index.

Supported data modes (all returned as ``float32``): 0 (int8), 1 (int16), 2 (float32),
6 (uint16) and 12 (float16).  Every problem with a user's file raises
:class:`cryoscape.errors.InputError` with one sentence naming the file and the fix.
"""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import mrcfile
import numpy as np

from cryoscape.errors import InputError

__all__ = [
    "MrcHeader",
    "MrcStack",
    "MrcStackWriter",
    "read_mrc_header",
    "open_stack",
    "read_mrc",
    "write_mrc",
    "normalize_indices",
]

HEADER_BYTES = 1024
SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}


@dataclass(frozen=True)
class MrcHeader:
    """What cryoscape needs from an MRC header.

    Attributes
    ----------
    nx, ny, nz
        Columns, rows and sections (for a stack, ``nz`` is the number of images).
    dtype
        The numpy dtype of the data block, with the file's byte order.
    pixel_size_angstrom
        Pixel (voxel) size along x from the header; 0.0 when the header does not set it.
    data_offset_bytes
        Where the data block starts: ``1024 + extended header size`` (a Python int).
    file_size_bytes
        The size of the file on disk.
    mode
        The MRC data mode number.
    ispg
        The space group field (0 for image stacks, 1 for single volumes).
    path
        The file the header came from.
    """

    nx: int
    ny: int
    nz: int
    dtype: np.dtype
    pixel_size_angstrom: float
    data_offset_bytes: int
    file_size_bytes: int
    mode: int = 2
    ispg: int = 0
    path: str = ""

    @property
    def image_bytes(self) -> int:
        """Bytes in one section (image) of ``ny * nx`` values."""
        return self.nx * self.ny * self.dtype.itemsize

    @property
    def expected_size_bytes(self) -> int:
        """File size that the header promises: header, extended header and all sections."""
        return self.data_offset_bytes + self.nz * self.image_bytes

    def image_offset_bytes(self, index: int) -> int:
        """Byte offset of section ``index`` in the file (exact Python integer arithmetic)."""
        return self.data_offset_bytes + int(index) * self.image_bytes


def _name(path: str | os.PathLike) -> str:
    return os.fspath(path)


def _check_file(path: str | os.PathLike) -> int:
    """Raise InputError for a missing path or a directory; return the file size."""
    name = _name(path)
    if not os.path.exists(name):
        raise InputError(f"{name} does not exist; check the path (and --datadir for paths "
                         "inside particle files).", path=name)
    if os.path.isdir(name):
        raise InputError(f"{name} is a folder, not an MRC file; pass the .mrc or .mrcs file "
                         "inside it.", path=name)
    return os.path.getsize(name)


def read_mrc_header(path: str | os.PathLike, *, check_size: bool = True) -> MrcHeader:
    """Read and check the header of an MRC file.

    Parameters
    ----------
    path
        An ``.mrc`` / ``.mrcs`` / ``.map`` file.
    check_size
        Raise :class:`InputError` when the file is shorter than its header promises.

    Returns
    -------
    MrcHeader

    Raises
    ------
    InputError
        Missing file, not an MRC file, unsupported data mode, or (with ``check_size``) a
        truncated file.
    """
    name = _name(path)
    file_size = _check_file(name)
    not_mrc = (f"{name} is not an MRC file (no valid MRC header); pass an .mrc or .mrcs "
               "image file.")
    if file_size < HEADER_BYTES:
        raise InputError(not_mrc, path=name)
    # mrcfile's permissive warnings (odd machine stamp, missing map id...) are silenced here:
    # the checks below decide whether the header is usable.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with mrcfile.open(name, mode="r", permissive=True, header_only=True) as mrc:
                header = mrc.header.copy()
                try:
                    voxel = float(mrc.voxel_size.x)
                except Exception:  # a zero sampling (mx == 0) in a foreign header
                    voxel = 0.0
        except Exception as err:  # garbage headers fail in many ways inside mrcfile
            raise InputError(not_mrc, path=name) from err
    has_map_id = bytes(header.map)[:3] == b"MAP"
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    mode = int(header.mode)
    ext_bytes = int(header.nsymbt)
    sane = nx > 0 and ny > 0 and nz >= 0 and ext_bytes >= 0
    if not sane:
        raise InputError(not_mrc, path=name)
    if mode not in SUPPORTED_MODES:
        if not has_map_id:
            raise InputError(not_mrc, path=name)
        raise InputError(f"{name} uses MRC data mode {mode}, which cryoscape does not read; "
                         "convert it to mode 2 (float32), e.g. with `mrcfile` or IMOD "
                         "newstack -mode 2.", path=name)
    dtype = mrcfile.utils.data_dtype_from_header(header)
    header_out = MrcHeader(
        nx=nx,
        ny=ny,
        nz=nz,
        dtype=np.dtype(dtype),
        pixel_size_angstrom=voxel if np.isfinite(voxel) and voxel > 0 else 0.0,
        data_offset_bytes=HEADER_BYTES + ext_bytes,
        file_size_bytes=int(file_size),
        mode=mode,
        ispg=int(header.ispg),
        path=name,
    )
    if header_out.expected_size_bytes > file_size:
        if not has_map_id:
            # Without the 'MAP' id and with sizes that do not fit, this is not an MRC file.
            raise InputError(not_mrc, path=name)
        if check_size:
            _raise_truncated(header_out)
    return header_out


def _raise_truncated(header: MrcHeader) -> None:
    available = max(header.file_size_bytes - header.data_offset_bytes, 0)
    n_full = available // header.image_bytes if header.image_bytes else 0
    what = "images" if header.ispg == 0 else "sections"
    raise InputError(
        f"{header.path} is truncated: its header promises {header.nz} {what} of "
        f"{header.nx}x{header.ny} but the file holds only {n_full}; re-extract or re-copy "
        "the stack.",
        path=header.path,
    )


def _check_finite(block: np.ndarray, path: str, indices: np.ndarray | None, *,
                  start: int = 0) -> None:
    """Raise InputError if ``block`` (n, ny, nx) has NaN or infinite values.

    Image ``j`` of the block is image ``indices[j]`` (or ``start + j``) of the file.
    One float64 sum over the block (no temporary array) decides; only when it is not finite
    do we look for the first bad image.
    """
    if block.dtype.kind != "f" or block.size == 0:
        return
    if np.isfinite(np.sum(block, dtype=np.float64)):
        return
    bad = ~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
    first = int(np.flatnonzero(bad)[0])
    where = int(indices[first]) if indices is not None else start + first
    raise InputError(
        f"{path} has NaN or infinite pixels in image {where} (counting from 0); re-extract "
        "the particles or remove that image from the particle list.",
        path=path,
    )


def normalize_indices(indices: Any, n: int) -> tuple[np.ndarray | slice, bool]:
    """Return (int64 index array or step-1 slice, is_scalar); negatives count from the end."""
    if isinstance(indices, slice):
        start, stop, step = indices.indices(n)
        if step == 1:
            return slice(start, max(start, stop)), False
        return np.arange(start, stop, step, dtype=np.int64), False
    if np.isscalar(indices) or (isinstance(indices, np.ndarray) and indices.ndim == 0):
        i = int(indices)
        if i < -n or i >= n:
            raise IndexError(f"image index {i} is out of range for {n} images")
        return np.array([i % n if n else i], dtype=np.int64), True
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean mask of shape {idx.shape} does not match {n} images")
        return np.flatnonzero(idx).astype(np.int64), False
    idx = idx.astype(np.int64, copy=False).reshape(-1)
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -n or hi >= n:
            bad = lo if lo < -n else hi
            raise IndexError(f"image index {bad} is out of range for {n} images")
        if lo < 0:
            idx = np.where(idx < 0, idx + n, idx)
    return idx, False


class MrcStack:
    """A lazily memory-mapped stack of square images in one MRC file.

    Use :func:`open_stack` to create one.  Nothing is read until :meth:`read`; the memory map
    is opened on first use and dropped by :meth:`close` (it reopens when needed).

    Attributes
    ----------
    header : MrcHeader
    path : str
    """

    #: After this many bytes have been read through one memory map, the map is dropped and
    #: reopened on the next read.  Pages touched through a map count in the process's resident
    #: memory (RSS) until it is unmapped; some cluster schedulers kill jobs by RSS, so a long
    #: scan over a 100 GB stack must not look like 100 GB of memory.
    remap_after_bytes: int = 256 * 1024**2

    def __init__(self, header: MrcHeader):
        self.header = header
        self.path = header.path
        self._mm: np.memmap | None = None
        self._bytes_through_map = 0

    def __len__(self) -> int:
        return self.header.nz

    def __repr__(self) -> str:
        return f"MrcStack({self.path!r}, n={len(self)}, box_size={self.box_size})"

    @property
    def box_size(self) -> int:
        """Image side length ``D`` in pixels."""
        return self.header.nx

    @property
    def pixel_size_angstrom(self) -> float:
        """Pixel size from the header (0.0 if unset)."""
        return self.header.pixel_size_angstrom

    @property
    def dtype(self) -> np.dtype:
        """The on-disk dtype (reads always return float32)."""
        return self.header.dtype

    def _memmap(self) -> np.memmap:
        if self._mm is None:
            h = self.header
            if h.nz == 0:
                self._mm = np.zeros((0, h.ny, h.nx), dtype=h.dtype)  # type: ignore[assignment]
            else:
                self._mm = np.memmap(self.path, dtype=h.dtype, mode="r",
                                     offset=int(h.data_offset_bytes), shape=(h.nz, h.ny, h.nx))
        return self._mm  # type: ignore[return-value]

    def read(self, indices: Any) -> np.ndarray:
        """Read images as float32.

        Parameters
        ----------
        indices
            An int, a slice, a boolean mask or a sequence/array of ints (any order, repeats
            allowed, negative counts from the end).

        Returns
        -------
        np.ndarray
            ``(n, D, D)`` float32 in the order asked for; ``(D, D)`` for a scalar index.

        Raises
        ------
        InputError
            If an image holds NaN or infinite pixels.
        """
        idx, scalar = normalize_indices(indices, len(self))
        mm = self._memmap()
        if isinstance(idx, slice):
            block = np.array(mm[idx], dtype=np.float32)
            self._count_bytes(block.shape[0])
            _check_finite(block, self.path, None, start=idx.start)
            return block
        self._count_bytes(idx.size)
        if idx.size > 1 and np.any(idx[1:] < idx[:-1]):
            # Read in file order (sequential I/O), then put back in the order asked for.
            order = np.argsort(idx, kind="stable")
            block = np.asarray(mm[idx[order]], dtype=np.float32)
            _check_finite(block, self.path, idx[order])
            out = np.empty_like(block)
            out[order] = block
        else:
            out = np.asarray(mm[idx], dtype=np.float32)
            _check_finite(out, self.path, idx)
        return out[0] if scalar else out

    def _count_bytes(self, n_images: int) -> None:
        self._bytes_through_map += n_images * self.header.image_bytes
        if self._bytes_through_map >= self.remap_after_bytes:
            # Our reads return copies, so dropping the map here unmaps it (see the attribute).
            self._mm = None
            self._bytes_through_map = 0

    def read_all(self) -> np.ndarray:
        """All images as one ``(n, D, D)`` float32 array (for small stacks)."""
        return self.read(slice(None))

    def close(self) -> None:
        """Drop the memory map (it is reopened on the next read)."""
        self._mm = None
        self._bytes_through_map = 0

    def __enter__(self) -> "MrcStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"header": self.header, "path": self.path, "_mm": None, "_bytes_through_map": 0}


def open_stack(path: str | os.PathLike) -> MrcStack:
    """Open an MRC stack of square images lazily (memory-mapped on first read).

    Raises
    ------
    InputError
        Missing, non-MRC or truncated file, unsupported mode, or non-square images.
    """
    header = read_mrc_header(path)
    if header.nx != header.ny:
        raise InputError(
            f"{header.path} holds non-square images of {header.nx}x{header.ny} pixels; "
            "cryoscape needs square particle images, so re-extract them with a square box.",
            path=header.path,
        )
    return MrcStack(header)


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a whole MRC file into memory.

    Returns
    -------
    data : np.ndarray
        float32, ``[z, y, x]``; a single section (``nz == 1``) comes back 2-D ``[y, x]``.
    pixel_size_angstrom : float
        From the header (0.0 if unset).
    """
    header = read_mrc_header(path)
    if header.nz == 0:
        data = np.zeros((0, header.ny, header.nx), np.float32)
    else:
        shape = (header.nz, header.ny, header.nx)
        mm = np.memmap(header.path, dtype=header.dtype, mode="r",
                       offset=int(header.data_offset_bytes), shape=shape)
        data = np.array(mm, dtype=np.float32)
        del mm
    if data.size and not np.isfinite(np.sum(data, dtype=np.float64)):
        bad = int(np.flatnonzero(~np.isfinite(data.reshape(data.shape[0], -1)).all(axis=1))[0])
        raise InputError(f"{header.path} has NaN or infinite values (first in section {bad}, "
                         "counting from 0); regenerate or repair the file.", path=header.path)
    if header.nz == 1:
        data = data[0]
    return data, header.pixel_size_angstrom


def _temp_path_for(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _is_stack_path(path: str) -> bool:
    return path.lower().endswith(".mrcs")


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def write_mrc(
    path: str | os.PathLike,
    array: Any,
    *,
    pixel_size_angstrom: float = 1.0,
    is_stack: bool | None = None,
) -> None:
    """Write a 2-D image, an image stack or a volume as float32 MRC, atomically.

    The file is written to a temporary name in the same folder and renamed over ``path``, so a
    reader never sees a half-written file.

    Parameters
    ----------
    path
        Output file.
    array
        ``(y, x)``, ``(n, y, x)`` or ``(z, y, x)``; numpy array or torch tensor.
    pixel_size_angstrom
        Stored as the voxel size.
    is_stack
        Mark a 3-D array as an image stack (space group 0) rather than a volume; by default a
        ``.mrcs`` name means a stack.
    """
    name = _name(path)
    data = np.ascontiguousarray(_as_numpy(array), dtype=np.float32)
    if data.ndim not in (2, 3):
        raise ValueError(f"write_mrc needs a 2-D or 3-D array, got shape {data.shape}")
    if is_stack is None:
        is_stack = _is_stack_path(name)
    tmp = _temp_path_for(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns on NaN stats
            with mrcfile.new(tmp, overwrite=True) as mrc:
                mrc.set_data(data)
                if data.ndim == 3:
                    if is_stack:
                        mrc.set_image_stack()
                    else:
                        mrc.set_volume()
                mrc.voxel_size = float(pixel_size_angstrom)
        os.replace(tmp, name)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class MrcStackWriter:
    """Write a float32 (or, with ``dtype="float16"``, mode 12) image stack batch by batch with
    bounded memory, atomically.

    The header is written first (by ``mrcfile``) to a temporary file next to ``path``; batches
    are then appended with plain sequential writes (no memory map, so resident memory stays at
    one batch however large the stack); :meth:`close` checks that every image was written,
    stores the header statistics (computed incrementally, no second pass) and renames the file
    onto ``path``.  Used as a context manager, an exception removes the temporary file instead.

    Examples
    --------
    >>> with MrcStackWriter("out.mrcs", n_images=n, box_size=64, pixel_size_angstrom=2.0) as w:
    ...     for batch in batches:
    ...         w.write(batch)
    """

    def __init__(self, path: str | os.PathLike, *, n_images: int, box_size: int,
                 pixel_size_angstrom: float = 1.0, dtype: str = "float32"):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' (mode 2) or 'float16' (mode 12), got {dtype!r}")
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.path = _name(path)
        self.n_images = int(n_images)
        self.box_size = int(box_size)
        self.pixel_size_angstrom = float(pixel_size_angstrom)
        self.n_written = 0
        self._tmp = _temp_path_for(self.path)
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._min = np.inf
        self._max = -np.inf
        shape = (self.n_images, self.box_size, self.box_size)
        # A full-size (sparse) file with a correct header; the data is filled in by write().
        mode = 12 if self.dtype.itemsize == 2 else 2
        with mrcfile.new_mmap(self._tmp, shape=shape, mrc_mode=mode, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = self.pixel_size_angstrom
            self._data_offset = HEADER_BYTES + int(mrc.header.nsymbt)
        self._file = open(self._tmp, "r+b")
        self._file.seek(self._data_offset)

    def write(self, images: Any) -> None:
        """Append ``(n, D, D)`` images (numpy or torch) after those already written."""
        if self._file is None:
            raise ValueError(f"{self.path}: the writer is closed")
        with np.errstate(over="ignore"):  # out-of-range float16 values are refused below
            block = np.ascontiguousarray(_as_numpy(images), dtype=self.dtype)
        if block.ndim == 2:
            block = block[None]
        if self.dtype.itemsize == 2 and not np.isfinite(block).all():
            raise ValueError(f"{self.path}: values beyond the float16 range (+-65504); "
                             "normalise the images first or write float32")
        n = block.shape[0]
        if block.shape[1:] != (self.box_size, self.box_size):
            raise ValueError(f"expected images of {self.box_size}x{self.box_size}, "
                             f"got {block.shape}")
        if self.n_written + n > self.n_images:
            raise ValueError(f"writing {n} more images overflows the stack of {self.n_images}")
        self._file.write(memoryview(block).cast("B"))
        self.n_written += n
        if block.size:
            # Chan et al. parallel update of the mean and the sum of squared deviations.
            b_mean = float(block.mean(dtype=np.float64))
            b_m2 = float(np.square(block - np.float32(b_mean), dtype=np.float64).sum())
            b_count = block.size
            total = self._count + b_count
            delta = b_mean - self._mean
            self._mean += delta * b_count / total
            self._m2 += b_m2 + delta * delta * self._count * b_count / total
            self._count = total
            self._min = min(self._min, float(block.min()))
            self._max = max(self._max, float(block.max()))

    def close(self) -> None:
        """Finish: check the count, write header statistics, rename onto ``path``."""
        if self._file is None:
            return
        if self.n_written != self.n_images:
            self.abort()
            raise ValueError(f"{self.path}: only {self.n_written} of {self.n_images} images "
                             "were written")
        self._file.close()
        self._file = None
        with mrcfile.mmap(self._tmp, mode="r+") as mrc:  # maps lazily: touches the header only
            h = mrc.header
            if self._count:
                h.dmin, h.dmax = np.float32(self._min), np.float32(self._max)
                h.dmean = np.float32(self._mean)
                h.rms = np.float32(np.sqrt(self._m2 / self._count))
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Discard the partial output."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> "MrcStackWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
