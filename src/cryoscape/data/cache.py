"""Preprocessed copies of a particle set, written once and read directly.

:func:`write_preprocessed_stack` streams every image through a :class:`Preprocessor` in batches
(reading the next batch in a background thread while the current one is processed) and fills
an output stack, renamed into place only when complete.  Memory stays at about two batches
whatever the dataset size.  ``cryoscape downsample`` is this function with a
downsampling-only preprocessor.

:func:`open_training_cache` is the training cache (``cryoscape train --cache-dir``): the
normalised, windowed images of a :class:`~cryoscape.data.images.ParticleImages` as one float16
MRC stack (mode 12) in particle order.  It is half the bytes of a float32 source, one file read
in particle order however many micrograph stacks the particles came from, and needs no
preprocessing when read.  The file name carries a hash of everything that decides its content
(the stacks' paths, sizes and modification times, which images in which order, the box and the
normalisation), so a changed input or normalisation writes a new cache instead of reading a
stale one, and an existing cache is reused by later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cryoscape.data.images import ParticleImages
from cryoscape.data.preprocess import ImageReader, Preprocessor
from cryoscape.errors import InputError
from cryoscape.fourier.resample import resampled_pixel_size_angstrom
from cryoscape.io.mrc import MrcStackWriter, read_mrc_header
from cryoscape.io.writers import atomic_write

__all__ = ["write_preprocessed_stack", "training_cache_path", "open_training_cache"]

log = logging.getLogger(__name__)

_CACHE_FORMAT = 1


def _box_size_of(reader: Any) -> int:
    D = getattr(reader, "box_size", None)
    if D is None:
        D = int(np.asarray(reader.read([0])).shape[-1])
    return int(D)


def write_preprocessed_stack(
    reader: ImageReader,
    preprocessor: Preprocessor,
    out_path: str | os.PathLike,
    *,
    batch_size: int = 1000,
    pixel_size_angstrom: float | None = None,
    progress: bool = True,
    description: str = "preprocessing",
    dtype: str = "float32",
) -> float:
    """Preprocess all images of ``reader`` into one ``.mrcs`` file, atomically.

    Parameters
    ----------
    reader
        Has ``len()``, ``read(indices) -> (n, D, D)`` and ideally ``box_size`` and
        ``pixel_size_angstrom`` (e.g. :class:`~cryoscape.data.images.ParticleImages`).
    preprocessor
        Applied to each batch.
    out_path
        Output stack; replaced only once every image is written.
    batch_size
        Images per batch.
    pixel_size_angstrom
        Pixel size of the input images (default: ``reader.pixel_size_angstrom``, else 1.0);
        the output's is scaled by ``D / D_out``.
    progress
        Show a progress bar.
    description
        Label of the progress bar.
    dtype
        ``"float32"`` (MRC mode 2) or ``"float16"`` (mode 12: half the size; for images
        normalised to about unit variance the rounding error is below 1e-3 of their spread).

    Returns
    -------
    float
        The pixel size written to the output header.
    """
    n = len(reader)
    if n == 0:
        raise ValueError("the particle set is empty; nothing to write")
    batch_size = max(1, int(batch_size))
    D = _box_size_of(reader)
    D_out = preprocessor.output_box_size(D)
    if pixel_size_angstrom is None:
        pixel_size_angstrom = float(getattr(reader, "pixel_size_angstrom", 0.0) or 0.0) or 1.0
    out_pixel = resampled_pixel_size_angstrom(pixel_size_angstrom, D, D_out)
    starts = list(range(0, n, batch_size))

    def read(start: int) -> np.ndarray:
        return reader.read(np.arange(start, min(n, start + batch_size), dtype=np.int64))

    with MrcStackWriter(out_path, n_images=n, box_size=D_out,
                        pixel_size_angstrom=out_pixel, dtype=dtype) as writer, \
            ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=n, unit="img", desc=description, disable=not progress) as bar:
        pending = pool.submit(read, starts[0])
        for i in range(len(starts)):
            images = pending.result()
            if i + 1 < len(starts):
                pending = pool.submit(read, starts[i + 1])  # overlap disk reads with compute
            writer.write(preprocessor(images).cpu().numpy())
            bar.update(images.shape[0])
    return out_pixel


# --------------------------------------------------------------------------------------------
# the float16 training cache
# --------------------------------------------------------------------------------------------
def _cache_key(images: ParticleImages, preprocessor: Preprocessor) -> str:
    """Hash of everything that decides the cache's content (see the module docstring)."""
    h = hashlib.sha256()
    stacks = []
    for header in images.stack_headers:
        st = os.stat(header.path)
        stacks.append([os.path.abspath(header.path), st.st_size, st.st_mtime_ns])
    fields = {name: getattr(preprocessor, name) for name in preprocessor.__dataclass_fields__}
    h.update(json.dumps({"format": _CACHE_FORMAT, "box": images.box_size, "n": len(images),
                         "stacks": stacks, "preprocessing": fields}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(images.file_ids, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(images.image_indices, dtype="<i8").tobytes())
    return h.hexdigest()[:20]


def training_cache_path(images: ParticleImages, preprocessor: Preprocessor,
                        cache_dir: str | os.PathLike) -> Path:
    """Where the float16 cache of ``images`` preprocessed by ``preprocessor`` lives in ``cache_dir``."""
    return Path(cache_dir) / f"cryoscape-cache-{_cache_key(images, preprocessor)}.mrcs"


def _usable(path: Path, n: int, box_size: int) -> bool:
    if not path.is_file():
        return False
    try:
        header = read_mrc_header(path)
    except InputError:
        return False
    return header.nz == n and header.nx == box_size and header.mode == 12


def open_training_cache(
    images: ParticleImages,
    preprocessor: Preprocessor,
    cache_dir: str | os.PathLike,
    *,
    block_size: int = 0,
    cached_blocks: int = 8,
    batch_size: int = 1000,
    progress: bool = True,
) -> ParticleImages:
    """The float16 cache of ``preprocessor(images)`` in ``cache_dir``, written first if needed.

    Returns a lazy :class:`ParticleImages` over the cache whose particle ``i`` is particle ``i``
    of ``images`` after preprocessing (``block_size`` and ``cached_blocks`` are passed on).
    Writing streams the images in batches (memory: a few batches), to a temporary file renamed
    into place when complete, beside a ``.json`` that says what the cache holds.  In a
    multi-process run, call it on one process first, then on the others after a barrier.

    Raises
    ------
    InputError
        ``cache_dir`` cannot be created or lacks the free space for the cache.
    """
    n, D = len(images), images.box_size
    path = training_cache_path(images, preprocessor, cache_dir)
    if _usable(path, n, D):
        log.info("reading the float16 cache %s (%d images)", path, n)
    else:
        _write_training_cache(images, preprocessor, path, batch_size=batch_size, progress=progress)
    return ParticleImages.from_stack(path, in_memory=False, block_size=block_size,
                                     cached_blocks=cached_blocks)


def _write_training_cache(images: ParticleImages, preprocessor: Preprocessor, path: Path, *,
                          batch_size: int, progress: bool) -> None:
    n, D = len(images), images.box_size
    needed = 1024 + n * D * D * 2
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
    except OSError as err:
        raise InputError(f"the cache folder {path.parent} cannot be used ({err.strerror}); "
                         "pass a writable --cache-dir.", path=str(path.parent)) from None
    if free < needed * 1.02:
        raise InputError(f"the float16 cache of {n} images needs {needed / 1e9:.2f} GB in "
                         f"{path.parent} but only {free / 1e9:.2f} GB are free; pass another "
                         "--cache-dir or train without the cache.", path=str(path.parent))
    log.info("writing the float16 cache %s (%d images, %.2f GB)", path, n, needed / 1e9)
    write_preprocessed_stack(images, preprocessor, path, batch_size=batch_size, progress=progress,
                             description="caching (float16)", dtype="float16")
    fields = {name: getattr(preprocessor, name) for name in preprocessor.__dataclass_fields__}
    about = {"format": _CACHE_FORMAT, "n_images": n, "box_size": D, "dtype": "float16",
             "stacks": [h.path for h in images.stack_headers][:100], "preprocessing": fields}
    with atomic_write(path.with_suffix(".json"), "w") as f:
        json.dump(about, f, indent=1)
