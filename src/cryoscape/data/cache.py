"""A preprocessed copy of a particle set as one float32 stack, written once and read directly.

:func:`write_preprocessed_stack` streams every image through a :class:`Preprocessor` in batches
(reading the next batch in a background thread while the current one is processed) and fills a
memory-mapped output stack, renamed into place only when complete.  Memory stays at about two
batches whatever the dataset size.  ``cryoscape downsample`` is this function with a
downsampling-only preprocessor.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cryoscape.data.preprocess import ImageReader, Preprocessor
from cryoscape.fourier.resample import resampled_pixel_size_angstrom
from cryoscape.io.mrc import MrcStackWriter

__all__ = ["write_preprocessed_stack"]


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
) -> float:
    """Preprocess all images of ``reader`` into one float32 ``.mrcs`` file, atomically.

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
                        pixel_size_angstrom=out_pixel) as writer, \
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
