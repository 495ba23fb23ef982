"""cryoDRGN-style pickles: ``poses.pkl`` and ``ctf.pkl``.

``poses.pkl`` is a tuple ``(rots, trans)``: ``rots`` ``(N, 3, 3)`` rotation matrices in our own
convention (loaded unchanged) and ``trans`` ``(N, 2)`` shifts as fractions of the box
(``shifts_pixel = trans * D``, same sign).  A pickle holding ``rots`` alone is accepted.

``ctf.pkl`` is an ``(N, 9)`` float32 array with columns
``D, Apix, dfU (A), dfV (A), dfAng (deg), kV, Cs (mm), w, phase_shift (deg)``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cryoscape.errors import InputError
from cryoscape.io.writers import atomic_write

if TYPE_CHECKING:
    from cryoscape.io.particles import ParticleTable

__all__ = [
    "read_poses_pkl",
    "write_poses_pkl",
    "read_ctf_pkl",
    "write_ctf_pkl",
    "write_poses_pkl_from_table",
    "write_ctf_pkl_from_table",
]

PathLike = str | os.PathLike


def _load_pickle(path: PathLike, what: str):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass an existing {what}.")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as err:  # noqa: BLE001 - any unreadable pickle is one user error
        raise InputError(f"{path} could not be read as a pickle ({type(err).__name__}); pass a cryoDRGN {what}.") from None


def read_poses_pkl(path: PathLike, *, box_size: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a cryoDRGN ``poses.pkl``.

    Parameters
    ----------
    path
        The pickle: ``(rots, trans)`` or ``rots`` alone.
    box_size
        Box size ``D`` in pixels, to turn box fractions into pixels; may be None only when the
        file holds no translations.

    Returns
    -------
    rotations : (N, 3, 3) float64
    shifts_pixel : (N, 2) float64 or None

    Raises
    ------
    InputError
        Wrong structure or shapes, non-finite values, or matrices that are not rotations.
    """
    obj = _load_pickle(path, "poses.pkl")
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2) and np.ndim(obj[0]) == 3:
        rots = obj[0]
        trans = obj[1] if len(obj) == 2 else None
    else:
        rots, trans = obj, None
    try:
        rots = np.asarray(rots, dtype=np.float64)
        trans = None if trans is None else np.asarray(trans, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path} does not hold numeric arrays; pass a poses.pkl with (rots (N,3,3), trans (N,2)).") from None
    if rots.ndim != 3 or rots.shape[1:] != (3, 3):
        raise InputError(f"{path} holds rotations of shape {rots.shape}, not (N, 3, 3); pass a cryoDRGN poses.pkl.")
    if trans is not None and trans.shape != (len(rots), 2):
        raise InputError(
            f"{path} holds translations of shape {trans.shape}, not ({len(rots)}, 2); pass a cryoDRGN poses.pkl."
        )
    if not np.isfinite(rots).all() or (trans is not None and not np.isfinite(trans).all()):
        raise InputError(f"{path} holds NaN or infinite poses; remove those particles or redo the refinement.")
    # orthonormality (loose: files are often float32)
    err = np.abs(np.einsum("nij,nkj->nik", rots, rots) - np.eye(3)).max() if len(rots) else 0.0
    if err > 1e-3 or (len(rots) and np.linalg.det(rots).min() < 0):
        raise InputError(f"{path} holds matrices that are not rotations; pass a poses.pkl of rotation matrices.")
    if trans is None:
        return rots, None
    if box_size is None:
        raise InputError(f"{path} stores shifts as box fractions but the box size is unknown; pass the image stacks too.")
    return rots, trans * float(box_size)


def write_poses_pkl(
    path: PathLike,
    rotations: np.ndarray,
    shifts_pixel: np.ndarray | None = None,
    *,
    box_size: int,
) -> None:
    """Write ``(rots, trans)`` with ``trans = shifts_pixel / box_size`` (zeros when no shifts), atomically."""
    rots = np.asarray(rotations, dtype=np.float64)
    shifts = np.zeros((len(rots), 2)) if shifts_pixel is None else np.asarray(shifts_pixel, dtype=np.float64)
    with atomic_write(path) as f:
        pickle.dump((rots, shifts / float(box_size)), f, protocol=4)


def read_ctf_pkl(path: PathLike) -> np.ndarray:
    """Read a cryoDRGN ``ctf.pkl`` as an ``(N, 9)`` float64 array (see the module docstring)."""
    obj = _load_pickle(path, "ctf.pkl")
    try:
        arr = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path} does not hold a numeric array; pass a cryoDRGN ctf.pkl (N x 9).") from None
    if arr.ndim != 2 or arr.shape[1] != 9:
        raise InputError(f"{path} holds an array of shape {arr.shape}, not (N, 9); pass a cryoDRGN ctf.pkl.")
    if not np.isfinite(arr).all():
        raise InputError(f"{path} holds NaN or infinite CTF values; redo the CTF estimation for those particles.")
    return arr


def write_ctf_pkl(path: PathLike, ctf_array: np.ndarray) -> None:
    """Write an ``(N, 9)`` CTF array as float32, atomically."""
    arr = np.asarray(ctf_array, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 9:
        raise ValueError(f"expected an (N, 9) array, got shape {arr.shape}")
    with atomic_write(path) as f:
        pickle.dump(arr, f, protocol=4)


def _box_size_for(table: "ParticleTable", path: PathLike) -> int:
    if table.box_size is None:
        raise InputError(
            f"the box size of {table.source_path} is unknown, which {Path(path).name} needs; "
            "make the stacks reachable (--datadir) so their headers can be read."
        )
    return table.box_size


def write_poses_pkl_from_table(path: PathLike, table: "ParticleTable", *, indices: np.ndarray | None = None) -> None:
    """Write the poses of ``table`` (or of its particles ``indices``) as a cryoDRGN ``poses.pkl``."""
    table.require_poses()
    box = _box_size_for(table, path)
    sub = table if indices is None else table.subset(indices)
    write_poses_pkl(path, sub.rotations, sub.shifts_pixel, box_size=box)


def write_ctf_pkl_from_table(path: PathLike, table: "ParticleTable", *, indices: np.ndarray | None = None) -> None:
    """Write the CTF of ``table`` (or of its particles ``indices``) as a cryoDRGN ``ctf.pkl``."""
    table.require_ctf()
    box = _box_size_for(table, path)
    table.require_pixel_size()
    sub = table if indices is None else table.subset(indices)
    write_ctf_pkl(path, sub.ctf.to_cryodrgn_array(box, sub.pixel_size_angstrom))
