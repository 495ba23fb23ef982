"""cryoSPARC ``.cs`` particle files: numpy structured arrays saved with ``np.save``.

Fields read (others are kept untouched in ``ParticleTable.cs_records`` and written back):

* ``blob/path`` (bytes; a leading ``>`` means relative to the project folder), ``blob/idx``
  (0-based), ``blob/shape`` (box), ``blob/psize_A`` (pixel size);
* ``alignments3D/pose``: a rotation vector ``v`` with ``R = expmap(v)^T``, i.e. the transpose of
  ``scipy.spatial.transform.Rotation.from_rotvec(v).as_matrix()``
  (:func:`cryoscape.geometry.rotations.cryosparc_pose_to_matrix`);
  ``alignments3D/shift``: pixels, RELION's sign;
* ``ctf/df1_A``, ``ctf/df2_A``, ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``,
  ``ctf/amp_contrast``, ``ctf/phase_shift_rad`` (radians become degrees in the table).

Relative stack paths are tried under ``datadir``, next to the .cs file, in the folder above it
(the project folder when the .cs sits in a job folder ``Jxx/``), then in the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryoscape.errors import InputError
from cryoscape.io.particles import CtfParameters, ParticleTable, _fill_pixel_size, resolve_stacks
from cryoscape.io.writers import atomic_write

__all__ = ["read_cs", "write_cs"]

PathLike = str | os.PathLike

_CTF_FIELDS = {
    # cs field: (CtfParameters attribute, factor from cs units to table units)
    "ctf/df1_A": ("defocus_u_angstrom", 1.0),
    "ctf/df2_A": ("defocus_v_angstrom", 1.0),
    "ctf/df_angle_rad": ("defocus_angle_deg", 180.0 / np.pi),
    "ctf/accel_kv": ("voltage_kv", 1.0),
    "ctf/cs_mm": ("cs_mm", 1.0),
    "ctf/amp_contrast": ("amplitude_contrast", 1.0),
    "ctf/phase_shift_rad": ("phase_shift_deg", 180.0 / np.pi),
}
_REQUIRED_CTF = ("ctf/df1_A", "ctf/df2_A", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")


def _poses_to_matrices(poses: np.ndarray) -> np.ndarray:
    from cryoscape.geometry.rotations import cryosparc_pose_to_matrix

    return np.asarray(cryosparc_pose_to_matrix(np.asarray(poses, dtype=np.float64)), dtype=np.float64)


def _matrices_to_poses(rotations: np.ndarray) -> np.ndarray:
    from cryoscape.geometry.rotations import matrix_to_cryosparc_pose

    return np.asarray(matrix_to_cryosparc_pose(np.asarray(rotations, dtype=np.float64)), dtype=np.float64)


def _load_records(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path} was not found; pass an existing cryoSPARC .cs file.")
    try:
        records = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user error
        raise InputError(
            f"{path} could not be read as a cryoSPARC .cs file ({type(err).__name__}); "
            "export the particles from cryoSPARC again."
        ) from None
    if records.dtype.names is None or records.ndim != 1:
        raise InputError(f"{path} is not a cryoSPARC particle table; pass the particles .cs of a cryoSPARC job.")
    missing = [f for f in ("blob/path", "blob/idx") if f not in records.dtype.names]
    if missing:
        raise InputError(
            f"{path} has no {' or '.join(missing)} field; pass the job's particles .cs "
            "(not a passthrough file), or the exported particles."
        )
    if len(records) == 0:
        raise InputError(f"{path} holds no particles; pass a .cs file with at least one particle.")
    return records


def _decode_paths(raw: np.ndarray) -> np.ndarray:
    codes, uniques = pd.factorize(pd.Series(raw, dtype=object), sort=False)
    decoded = []
    for u in uniques:
        s = u.decode() if isinstance(u, bytes) else str(u)
        decoded.append(s[1:] if s.startswith(">") else s)
    return np.array(decoded, dtype=object)[codes]


def read_cs(path: PathLike, *, datadir: PathLike | None = None, check_stacks: bool = True) -> ParticleTable:
    """Read a cryoSPARC particle ``.cs`` file into a :class:`ParticleTable`.

    Parameters
    ----------
    path
        The ``.cs`` file.
    datadir
        Folder tried first for relative stack paths (e.g. the cryoSPARC project folder).
    check_stacks
        Open every stack header (see :func:`cryoscape.io.particles.resolve_stacks`).
    """
    path = Path(path)
    records = _load_records(path)
    names = set(records.dtype.names)
    n = len(records)
    stacks = _decode_paths(records["blob/path"])
    image_indices = records["blob/idx"].astype(np.int64)
    info = resolve_stacks(
        stacks,
        image_indices,
        metadata_path=path,
        datadir=datadir,
        search_dirs=(path.absolute().parent.parent,),
        check_stacks=check_stacks,
    )
    pixel = records["blob/psize_A"].astype(np.float64) if "blob/psize_A" in names else None
    pixel = _fill_pixel_size(pixel, info)
    box_size = info.box_size
    if box_size is None and "blob/shape" in names:
        box_size = int(np.asarray(records["blob/shape"][0]).reshape(-1)[-1])

    rotations = shifts = None
    if "alignments3D/pose" in names:
        poses = records["alignments3D/pose"].astype(np.float64)
        if not np.isfinite(poses).all():
            raise InputError(f"{path} holds NaN poses; remove those particles or redo the refinement.")
        rotations = _poses_to_matrices(poses)
        shifts = (records["alignments3D/shift"].astype(np.float64) if "alignments3D/shift" in names
                  else np.zeros((n, 2)))

    ctf = None
    if all(f in names for f in _REQUIRED_CTF):
        kwargs = {attr: np.zeros(n) for attr, _ in _CTF_FIELDS.values()}
        for field, (attr, factor) in _CTF_FIELDS.items():
            if field in names:
                kwargs[attr] = records[field].astype(np.float64) * factor
        ctf = CtfParameters(**kwargs)

    return ParticleTable(
        image_paths=info.image_paths,
        image_indices=image_indices,
        box_size=box_size,
        pixel_size_angstrom=pixel,
        rotations=rotations,
        shifts_pixel=shifts,
        ctf=ctf,
        cs_records=records,
        source_path=os.fspath(path),
    )


def _with_fields(records: np.ndarray, extra: list[tuple]) -> np.ndarray:
    """Copy of ``records`` with the fields in ``extra`` (name, dtype[, shape]) added, zero-filled."""
    extra = [e for e in extra if e[0] not in records.dtype.names]
    if not extra:
        return records
    descr = [(name, records.dtype.fields[name][0]) for name in records.dtype.names] + extra
    out = np.zeros(len(records), dtype=descr)
    for name in records.dtype.names:
        out[name] = records[name]
    return out


def _build_records(table: ParticleTable) -> np.ndarray:
    n = len(table)
    paths = [p.encode() for p in table.image_paths.tolist()]
    width = max((len(p) for p in paths), default=1)
    records = np.zeros(
        n,
        dtype=[
            ("uid", "<u8"),
            ("blob/path", f"S{width}"),
            ("blob/idx", "<u4"),
            ("blob/shape", "<u4", (2,)),
            ("blob/psize_A", "<f4"),
        ],
    )
    records["uid"] = np.arange(1, n + 1, dtype=np.uint64)
    records["blob/path"] = paths
    records["blob/idx"] = table.image_indices
    records["blob/shape"] = 0 if table.box_size is None else table.box_size
    records["blob/psize_A"] = table.pixel_size_angstrom
    return records


def write_cs(path: PathLike, table: ParticleTable, *, indices: np.ndarray | None = None) -> None:
    """Write ``table`` (or its particles ``indices``) as a cryoSPARC ``.cs`` file, atomically.

    A table read from a ``.cs`` keeps all its original fields; poses, shifts and CTF values are
    rewritten only where they changed beyond float32 rounding.  Other tables get records with
    ``uid``, ``blob/*``, ``alignments3D/*`` (when posed) and ``ctf/*`` (when they have a CTF).
    """
    sub = table if indices is None else table.subset(indices)
    n = len(sub)
    records = sub.cs_records.copy() if sub.cs_records is not None else _build_records(sub)

    if sub.rotations is not None:
        had_pose = "alignments3D/pose" in records.dtype.names
        extra = [("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))]
        if not had_pose:
            extra.append(("alignments3D/psize_A", "<f4"))
        records = _with_fields(records, extra)
        if had_pose:
            old = _poses_to_matrices(records["alignments3D/pose"].astype(np.float64))
            changed = np.abs(old - sub.rotations).reshape(n, 9).max(axis=1) > 1e-6
        else:
            changed = np.ones(n, dtype=bool)
            records["alignments3D/psize_A"] = sub.pixel_size_angstrom
        if changed.any():
            records["alignments3D/pose"][changed] = _matrices_to_poses(sub.rotations[changed])
        shifts = np.zeros((n, 2)) if sub.shifts_pixel is None else sub.shifts_pixel
        moved = np.abs(records["alignments3D/shift"].astype(np.float64) - shifts).max(axis=1) > 1e-5
        records["alignments3D/shift"][moved] = shifts[moved]

    if sub.ctf is not None:
        records = _with_fields(records, [(field, "<f4") for field in _CTF_FIELDS])
        for field, (attr, factor) in _CTF_FIELDS.items():
            new = getattr(sub.ctf, attr) / factor
            old = records[field].astype(np.float64)
            changed = ~np.isclose(old, new, rtol=1e-6, atol=1e-7)
            records[field][changed] = new[changed]

    with atomic_write(path) as f:
        np.save(f, records, allow_pickle=False)
