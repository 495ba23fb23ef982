"""Atomic file output, and one call that writes a particle table to any metadata format.

Every writer in io/ goes through :func:`atomic_write`: the file is written next to its target
under a temporary name and moved into place with ``os.replace``, so an interrupted run never
leaves half a STAR file where a good one was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cryoscape.io.particles import ParticleTable

__all__ = ["atomic_write", "write_particles"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success move it onto ``path``, else delete it.

    Parameters
    ----------
    path
        Final file name; its folder is created if needed.
    mode
        ``"wb"`` or ``"w"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_particles(
    table: "ParticleTable",
    *,
    star_path: str | os.PathLike | None = None,
    cs_path: str | os.PathLike | None = None,
    poses_path: str | os.PathLike | None = None,
    ctf_path: str | os.PathLike | None = None,
    indices: np.ndarray | None = None,
    image_names: str = "auto",
) -> dict[str, str]:
    """Write ``table`` (or its particles ``indices``) to each requested format.

    ``image_names`` ("keep", "absolute" or "auto") is passed to :func:`cryoscape.io.star.write_star`.

    Parameters
    ----------
    table
        The particles.
    star_path, cs_path
        RELION 3.1 STAR / cryoSPARC ``.cs`` output.
    poses_path, ctf_path
        cryoDRGN ``poses.pkl`` / ``ctf.pkl`` output (the table must hold poses / CTF).
    indices
        0-based particle indices to write, in that order; all particles when None.

    Returns
    -------
    dict
        Format name -> path written.
    """
    from cryoscape.errors import InputError
    from cryoscape.io.cryodrgn import write_ctf_pkl_from_table, write_poses_pkl_from_table
    from cryoscape.io.cryosparc import write_cs
    from cryoscape.io.star import write_star

    written: dict[str, str] = {}
    # check requirements before writing anything, so a failure leaves no partial output
    if poses_path is not None:
        table.require_poses()
    if ctf_path is not None:
        table.require_ctf()
    if star_path is not None or ctf_path is not None:
        table.require_pixel_size()
    if (poses_path is not None or ctf_path is not None) and table.box_size is None:
        raise InputError(
            f"the box size of {table.source_path} is unknown, which cryoDRGN pickles need; "
            "make the stacks reachable (--datadir) so their headers can be read."
        )
    if star_path is not None:
        write_star(star_path, table, indices=indices, image_names=image_names)
        written["star"] = os.fspath(star_path)
    if cs_path is not None:
        write_cs(cs_path, table, indices=indices)
        written["cs"] = os.fspath(cs_path)
    if poses_path is not None:
        write_poses_pkl_from_table(poses_path, table, indices=indices)
        written["poses"] = os.fspath(poses_path)
    if ctf_path is not None:
        write_ctf_pkl_from_table(ctf_path, table, indices=indices)
        written["ctf"] = os.fspath(ctf_path)
    return written
