"""Random access to the particle images of a particle table, lazily, at any dataset size.

A particle table names, for every particle, a stack file and an image index in it
(``image_paths``, ``image_indices``; see :mod:`cryoscape.io.particles`).  :class:`ParticleImages`
checks every stack once (headers only), then reads batches by grouping the requested particles
by stack, sorting them by file offset and reading each run of consecutive images with one
positional read (``os.preadv``) straight into the output array.  At most ``max_open_files``
files are open at a time (least recently used are closed), so a dataset spread over tens of
thousands of micrograph stacks neither runs out of file handles nor loads a whole stack.

Why positional reads and not memory maps: every page touched through a memory map counts in
the process's resident memory (RSS) until the map is dropped, and the kernel's read-ahead maps
more pages than were asked for, so a random scan of a stack larger than memory grows the RSS
towards the stack's size (README, "Scaling up").  Read this way the file pages stay in the
kernel's page cache (shared, reclaimable, not RSS) and the RSS is the batches only, whatever
the stack size.

With ``block_size=K`` (the chunked shuffle of :func:`cryoscape.data.training.epoch_order`)
a lazy read fetches whole aligned blocks of ``K`` particles (one sequential read each) and
keeps the ``cached_blocks`` most recently used in memory, so the batches of one shuffle
window are served from a few large sequential reads.

Small datasets can instead be loaded into memory once (``in_memory=True``); by default this
happens when the images fit in ``memory_limit_bytes`` (2 GiB), and the choice is logged.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cryoscape.errors import InputError
from cryoscape.io.mrc import MrcHeader, normalize_indices, open_stack

__all__ = ["ParticleImages"]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT_BYTES = 2 * 1024**3
_LOAD_CHUNK_BYTES = 16 * 1024**2


class ParticleImages:
    """Particle images addressed by particle number, read lazily from MRC stacks.

    Parameters
    ----------
    image_paths
        ``(N,)`` stack file of each particle (str; already resolved against any data folder).
    image_indices
        ``(N,)`` 0-based index of each particle's image in its stack.
    box_size
        Expected box size; every stack is checked against it.  Default: taken from the stacks
        (which must agree with each other).
    in_memory
        ``True`` loads all images once, ``False`` always reads lazily, ``None`` (default)
        loads them when ``N * D * D * 4 <= memory_limit_bytes``.
    max_open_files
        How many stack files are kept open at once (least recently used are closed).
    memory_limit_bytes
        Threshold for the automatic ``in_memory`` choice.
    table_path
        The particle file the table came from, named in error messages.
    block_size
        ``0`` (default): lazy reads fetch exactly the images asked for.  ``K > 0``: they fetch
        the whole aligned blocks ``[b K, (b + 1) K)`` of particles holding them (for the
        chunked shuffle of :func:`cryoscape.data.training.epoch_order` with the same ``K``).
    cached_blocks
        With ``block_size``: how many blocks are kept in memory (least recently used dropped):
        at most ``cached_blocks * block_size * D * D * 4`` bytes.

    Raises
    ------
    InputError
        A stack is missing, not MRC, truncated or non-square, box sizes differ, or an index
        points past the end of its stack.
    """

    def __init__(
        self,
        image_paths: Sequence[str] | np.ndarray,
        image_indices: Sequence[int] | np.ndarray,
        *,
        box_size: int | None = None,
        in_memory: bool | None = None,
        max_open_files: int = 64,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
        table_path: str | os.PathLike | None = None,
        block_size: int = 0,
        cached_blocks: int = 8,
    ):
        paths = np.asarray(image_paths, dtype=object).reshape(-1)
        indices = np.asarray(image_indices).reshape(-1)
        source = os.fspath(table_path) if table_path is not None else "the particle table"
        if paths.shape != indices.shape:
            raise InputError(f"{source} lists {paths.size} image files but {indices.size} image "
                             "indices; pass one file and one index per particle.", path=table_path)
        # pd.factorize hashes (O(N)) and keeps first-appearance order of the files.
        codes, uniques = pd.factorize(pd.Series(paths, dtype=object), sort=False)
        self._setup(
            [os.fspath(p) for p in uniques],
            codes.astype(np.int64),
            indices,
            box_size=box_size,
            in_memory=in_memory,
            max_open_files=max_open_files,
            memory_limit_bytes=memory_limit_bytes,
            source=source,
            block_size=block_size,
            cached_blocks=cached_blocks,
        )

    @classmethod
    def from_stack(cls, path: str | os.PathLike, **kwargs: Any) -> "ParticleImages":
        """All images of one stack file, in file order (no per-particle path array is built)."""
        obj = cls.__new__(cls)
        name = os.fspath(path)
        n = len(open_stack(name))
        obj._setup(
            [name],
            np.zeros(n, dtype=np.int64),
            np.arange(n, dtype=np.int64),
            box_size=kwargs.pop("box_size", None),
            in_memory=kwargs.pop("in_memory", None),
            max_open_files=kwargs.pop("max_open_files", 64),
            memory_limit_bytes=kwargs.pop("memory_limit_bytes", DEFAULT_MEMORY_LIMIT_BYTES),
            source=name,
            block_size=kwargs.pop("block_size", 0),
            cached_blocks=kwargs.pop("cached_blocks", 8),
        )
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        return obj

    def _setup(
        self,
        paths: list[str],
        file_ids: np.ndarray,
        image_indices: np.ndarray,
        *,
        box_size: int | None,
        in_memory: bool | None,
        max_open_files: int,
        memory_limit_bytes: int,
        source: str,
        block_size: int = 0,
        cached_blocks: int = 8,
    ) -> None:
        image_indices = _checked_indices(image_indices, source)
        self._paths = paths
        self._file_ids = file_ids
        self._image_indices = image_indices
        self.max_open_files = max(1, int(max_open_files))
        self._open: OrderedDict[int, _StackFile] = OrderedDict()
        self._lock = threading.Lock()
        self._source = source
        self.block_size = max(0, int(block_size))
        self.cached_blocks = max(1, int(cached_blocks))
        self._blocks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._headers = [open_stack(path).header for path in paths]  # missing/not MRC/truncated
        self._box_size = _check_boxes(self._headers, file_ids, image_indices, box_size, source)
        D = self._box_size
        self._pixel_size = self._headers[0].pixel_size_angstrom if self._headers else 0.0

        nbytes = len(self) * D * D * 4
        if in_memory is None:
            in_memory = nbytes <= memory_limit_bytes
            logger.info("%s: %d images of %dx%d (%.2f GiB) -> %s", source, len(self), D, D,
                        nbytes / 1024**3,
                        "loaded into memory" if in_memory else "read lazily from disk")
        self.in_memory = bool(in_memory)
        self._data: np.ndarray | None = None
        if self.in_memory:
            self._data = self._read_lazy_in_chunks()
            self._data.flags.writeable = False
            self._close_all()

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self._image_indices.size)

    def __repr__(self) -> str:
        mode = "in memory" if self.in_memory else "lazy"
        return (f"ParticleImages(n={len(self)}, box_size={self.box_size}, "
                f"files={len(self._paths)}, {mode})")

    @property
    def box_size(self) -> int:
        """Image side length ``D`` in pixels."""
        return self._box_size

    @property
    def pixel_size_angstrom(self) -> float:
        """Pixel size from the first stack's header (0.0 if unset)."""
        return self._pixel_size

    @property
    def stack_paths(self) -> list[str]:
        """The distinct stack files, in order of first appearance."""
        return list(self._paths)

    @property
    def stack_headers(self) -> list[MrcHeader]:
        """The checked header of each distinct stack file (same order as :attr:`stack_paths`)."""
        return list(self._headers)

    @property
    def file_ids(self) -> np.ndarray:
        """``(N,)`` position in :attr:`stack_paths` of each particle's stack (read-only view)."""
        view = self._file_ids.view()
        view.flags.writeable = False
        return view

    @property
    def image_indices(self) -> np.ndarray:
        """``(N,)`` index of each particle's image in its stack (read-only view)."""
        view = self._image_indices.view()
        view.flags.writeable = False
        return view

    # ------------------------------------------------------------------ reading
    def read(self, indices: Any) -> np.ndarray:
        """Read particle images as float32.

        Parameters
        ----------
        indices
            Particle numbers: int, slice, boolean mask, or int sequence in any order.

        Returns
        -------
        np.ndarray
            ``(n, D, D)`` float32 in the order asked for (``(D, D)`` for a scalar index).
        """
        idx, scalar = normalize_indices(indices, len(self))
        if isinstance(idx, slice):
            idx = np.arange(idx.start, idx.stop, dtype=np.int64)
        if self._data is not None:
            out = self._data[idx]  # fancy indexing copies
        else:
            # one reader at a time: the open files and the block cache are shared state
            with self._lock:
                out = self._read_blocks(idx) if self.block_size else self._read_lazy(idx)
        return out[0] if scalar else out

    def __getitem__(self, indices: Any) -> np.ndarray:
        return self.read(indices)

    def _read_lazy(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images ``idx`` as float32, into ``out`` (a C-contiguous ``(n, D, D)`` array) if given."""
        D = self._box_size
        if idx.size == 0:
            return np.empty((0, D, D), dtype=np.float32) if out is None else out
        fids = self._file_ids[idx]
        local = self._image_indices[idx]
        if np.all(fids == fids[0]):  # one stack: read straight into the output
            return self._stack(int(fids[0])).read(local, out=out)
        if out is None:
            out = np.empty((idx.size, D, D), dtype=np.float32)
        order = np.argsort(fids, kind="stable")
        sorted_fids = fids[order]
        cuts = np.flatnonzero(np.diff(sorted_fids)) + 1
        for group in np.split(order, cuts):
            out[group] = self._stack(int(fids[group[0]])).read(local[group])
        return out

    def _read_blocks(self, idx: np.ndarray) -> np.ndarray:
        """Images ``idx`` gathered from whole blocks of ``block_size`` particles (read once each).

        The buffer of the least recently used block is reused for the next one, so the blocks
        cost ``cached_blocks`` fixed buffers however many are read (a fresh array per block
        would leave freed blocks in the heap of the reading thread).
        """
        K, D = self.block_size, self._box_size
        out = np.empty((idx.size, D, D), dtype=np.float32)
        blocks = idx // K
        for b in np.unique(blocks).tolist():
            block = self._blocks.get(b)
            if block is None:
                members = np.arange(b * K, min(len(self), (b + 1) * K), dtype=np.int64)
                if len(self._blocks) >= self.cached_blocks:
                    buffer = self._blocks.popitem(last=False)[1].base
                else:
                    buffer = np.empty((K, D, D), dtype=np.float32)
                block = self._read_lazy(members, out=buffer[: members.size])
                self._blocks[b] = block
            else:
                self._blocks.move_to_end(b)
            here = blocks == b
            out[here] = block[idx[here] - b * K]
        return out

    def _read_lazy_in_chunks(self) -> np.ndarray:
        D = self._box_size
        out = np.empty((len(self), D, D), dtype=np.float32)
        step = max(1, _LOAD_CHUNK_BYTES // max(1, D * D * 4))
        for start in range(0, len(self), step):
            stop = min(len(self), start + step)
            out[start:stop] = self._read_lazy(np.arange(start, stop, dtype=np.int64))
        return out

    def load_all(self) -> np.ndarray:
        """All images as ``(N, D, D)`` float32 (read-only when the dataset is in memory)."""
        if self._data is not None:
            return self._data
        with self._lock:
            return self._read_lazy_in_chunks()

    def iter_batches(self, batch_size: int, *, indices: Any = None):
        """Yield ``(particle_indices, images)`` in order, ``batch_size`` at a time."""
        if indices is None:
            all_idx = np.arange(len(self), dtype=np.int64)
        else:
            all_idx, _ = normalize_indices(indices, len(self))
            if isinstance(all_idx, slice):
                all_idx = np.arange(all_idx.start, all_idx.stop, dtype=np.int64)
        for start in range(0, all_idx.size, max(1, int(batch_size))):
            batch = all_idx[start:start + batch_size]
            yield batch, self.read(batch)

    # ------------------------------------------------------------------ open files (LRU)
    def _stack(self, file_id: int) -> "_StackFile":
        stack = self._open.get(file_id)
        if stack is not None:
            self._open.move_to_end(file_id)
            return stack
        stack = _StackFile(self._headers[file_id])  # header already checked
        self._open[file_id] = stack
        while len(self._open) > self.max_open_files:
            _, old = self._open.popitem(last=False)
            old.close()
        return stack

    @property
    def n_open_files(self) -> int:
        """How many stack files are open now (bounded by ``max_open_files``)."""
        return sum(1 for s in self._open.values() if s.is_open)

    def _close_all(self) -> None:
        for stack in self._open.values():
            stack.close()
        self._open.clear()
        self._blocks.clear()

    def close(self) -> None:
        """Close all files and drop cached blocks (reads reopen them as needed)."""
        with self._lock:
            self._close_all()

    def __getstate__(self) -> dict:
        # Open files, cached blocks and the lock do not travel to worker processes.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_blocks"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _checked_indices(image_indices: np.ndarray, source: str) -> np.ndarray:
    """``image_indices`` as int64, refusing non-integer or negative values."""
    if image_indices.size and image_indices.dtype.kind not in "iu":
        if not np.all(np.mod(image_indices, 1) == 0):
            raise InputError(f"{source} has non-integer image indices; fix the particle "
                             "file.", path=source)
    image_indices = image_indices.astype(np.int64, copy=False)
    if image_indices.size and image_indices.min() < 0:
        raise InputError(f"{source} has negative image indices; image indices count from 0 "
                         "here (RELION's 1-based numbers are converted on import), so fix "
                         "the particle file.", path=source)
    return image_indices


def _check_boxes(headers: list[MrcHeader], file_ids: np.ndarray, image_indices: np.ndarray,
                 box_size: int | None, source: str) -> int:
    """The common box size of the stacks; refuse mismatches and indices past a stack's end."""
    if not headers:
        return int(box_size) if box_size is not None else 0
    first = headers[0]
    D = int(box_size) if box_size is not None else first.nx
    for h in headers:
        if h.nx != D:
            if box_size is not None:
                raise InputError(
                    f"{h.path} holds {h.nx}x{h.ny} images but {source} says the box is "
                    f"{D} pixels; pass the matching stack or fix the box size.", path=h.path)
            raise InputError(
                f"{h.path} holds {h.nx}x{h.ny} images but {first.path} holds "
                f"{first.nx}x{first.ny}; all stacks of one particle set must share "
                "the box size, so re-extract them alike.", path=h.path)
    if file_ids.size:
        max_index = np.full(len(headers), -1, dtype=np.int64)
        np.maximum.at(max_index, file_ids, image_indices)
        for h, hi in zip(headers, max_index):
            if hi >= h.nz:
                raise InputError(
                    f"{source} refers to image {int(hi) + 1} of {h.path}, which holds "
                    f"only {h.nz} images; pass the matching stack or fix the "
                    "particle file.", path=source)
    return D


class _StackFile:
    """One stack file read with positional reads: sorted by offset, one ``preadv`` per run.

    Nothing is memory-mapped, so the pages read stay in the kernel's page cache and never
    count in this process's resident memory (see the module docstring).  ``preadv`` releases
    the GIL, so a background thread reads while the main thread trains.
    """

    def __init__(self, header: MrcHeader):
        self.header = header
        self._fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def _fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.header.path, os.O_RDONLY)
        return self._fd

    def read(self, local: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Images ``local`` (indices in this file, any order, repeats allowed) as float32.

        ``out``: a C-contiguous float32 ``(n, D, D)`` array to fill (float32 files are read
        straight into it).
        """
        if local.size > 1 and np.any(local[1:] <= local[:-1]):
            # read each image once, in file order, then put them in the order asked for
            unique, inverse = np.unique(local, return_inverse=True)
            images = self.read(unique)[inverse.reshape(-1)]
            if out is None:
                return images
            out[...] = images
            return out
        h = self.header
        direct = h.dtype.isnative and h.dtype == np.float32
        if direct:
            raw = out if out is not None else np.empty((local.size, h.ny, h.nx), dtype=np.float32)
        else:
            raw = np.empty((local.size, h.ny, h.nx), dtype=h.dtype)
        rows = raw.reshape(local.size, -1).view(np.uint8)
        cuts = (np.flatnonzero(np.diff(local) != 1) + 1).tolist()
        for a, b in zip([0, *cuts], [*cuts, local.size]):
            self._read_into(rows[a:b], h.image_offset_bytes(int(local[a])))
        if direct:
            out = raw
        elif out is None:
            out = raw.astype(np.float32)
        else:
            out[...] = raw  # converts while copying
        if out.size and not np.isfinite(np.sum(out, dtype=np.float64)):
            bad = int(np.flatnonzero(~np.isfinite(out.reshape(out.shape[0], -1)).all(axis=1))[0])
            raise InputError(
                f"{h.path} has NaN or infinite pixels in image {int(local[bad])} (counting from "
                "0); re-extract the particles or remove that image from the particle list.",
                path=h.path)
        return out

    def _read_into(self, rows: np.ndarray, offset: int) -> None:
        view = memoryview(rows).cast("B")
        done = 0
        while done < view.nbytes:  # one call reads at most ~2 GiB on Linux
            got = os.preadv(self._fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise InputError(f"{self.header.path} ended before image data at byte "
                                 f"{offset + done}; the file was truncated after it was "
                                 "opened, so re-copy the stack.", path=self.header.path)
            done += got

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
