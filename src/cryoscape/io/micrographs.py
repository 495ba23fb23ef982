"""Micrographs: RELION / CTFFIND micrograph STAR files, micrograph MRC files, coordinate STAR files.

Reading (:func:`read_micrographs_star`)
    * RELION 3.1+ ``micrographs_ctf.star`` (CtfFind job): ``data_optics`` (``rlnMicrographPixelSize``,
      ``rlnVoltage``, ``rlnSphericalAberration``, ``rlnAmplitudeContrast``) and ``data_micrographs``
      (``rlnMicrographName``, ``rlnDefocusU/V``, ``rlnDefocusAngle``, optional ``rlnPhaseShift``,
      ``rlnCtfBfactor``), joined through ``rlnOpticsGroup``.
    * RELION 3.0 / CTFFIND wrappers: one block; the pixel size from ``rlnMicrographPixelSize``,
      ``rlnImagePixelSize`` or ``rlnDetectorPixelSize`` (um) * 1e4 / ``rlnMagnification``; optics
      columns on every row.
    * A column missing from the micrograph rows is looked up in the optics table, so either layout
      works.  Micrograph paths are resolved like particle stacks: absolute; relative to
      ``datadir``; next to the STAR file; the working directory (RELION's project folder).
    * Without CTF columns the table has ``ctf=None`` (reconstruction then needs ``--no-ctf``).

Writing (:func:`write_micrographs_star`) produces the RELION 3.1 layout with one optics group
per distinct (pixel size, voltage, Cs, amplitude contrast); :func:`write_coordinates_star`
writes particle coordinates (``rlnMicrographName``, ``rlnCoordinateX/Y``, optionally eulers),
the layout of RELION's picking jobs and of the ground truth of ``cryoscape simulate micrographs``.

Coordinates are 0-based pixels of the box centre (x = column, y = row).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryoscape.errors import InputError
from cryoscape.io.mrc import read_mrc, read_mrc_header
from cryoscape.io.particles import CtfParameters
from cryoscape.io.star import read_star_blocks

__all__ = [
    "MicrographTable",
    "read_micrographs_star",
    "write_micrographs_star",
    "write_coordinates_star",
    "read_coordinates_star",
    "read_micrograph",
    "micrograph_shape",
]

PathLike = str | os.PathLike
_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
_CTF = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")


@dataclass(eq=False)
class MicrographTable:
    """Everything read about G micrographs (row ``g`` is micrograph ``g``).

    Attributes
    ----------
    paths
        ``(G,)`` absolute paths of the MRC files.
    pixel_size_angstrom
        ``(G,)`` pixel sizes.
    ctf
        :class:`CtfParameters` with one row per micrograph, or None without CTF columns.
    b_factor_angstrom2
        ``(G,)`` CTF envelope B-factors (0 where the file has none).
    names
        ``(G,)`` ``rlnMicrographName`` values as written in the file.
    source_path
        The STAR file.
    """

    paths: np.ndarray
    pixel_size_angstrom: np.ndarray
    ctf: CtfParameters | None
    b_factor_angstrom2: np.ndarray
    names: np.ndarray
    source_path: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def require_ctf(self) -> CtfParameters:
        if self.ctf is None:
            raise InputError(
                "has no CTF columns (rlnDefocusU, rlnDefocusV, rlnDefocusAngle); run CTF estimation "
                "(RELION CtfFind / CTFFIND) first or pass --no-ctf.",
                path=self.source_path,
            )
        return self.ctf

    def subset(self, indices: np.ndarray) -> "MicrographTable":
        idx = np.asarray(indices)
        return MicrographTable(
            self.paths[idx], self.pixel_size_angstrom[idx], None if self.ctf is None else self.ctf.subset(idx),
            self.b_factor_angstrom2[idx], self.names[idx], self.source_path,
        )


def _micrograph_block(path: Path, blocks: dict) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    frames = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    optics = frames.get("optics")
    rows = frames.get("micrographs")
    if rows is None:
        found = [v for k, v in frames.items() if k != "optics" and "rlnMicrographName" in v.columns]
        if not found:
            raise InputError(
                "has no block with an rlnMicrographName column; pass a micrographs STAR file "
                "(e.g. micrographs_ctf.star from CtfFind).",
                path=path,
            )
        rows = found[0]
    if "rlnMicrographName" not in rows.columns or len(rows) == 0:
        raise InputError("lists no micrographs (no rlnMicrographName rows); pass a non-empty micrographs STAR file.", path=path)
    return rows.reset_index(drop=True), (None if optics is None else optics.reset_index(drop=True))


def _column(path: Path, rows: pd.DataFrame, optics: pd.DataFrame | None, group_row: np.ndarray | None, name: str):
    """Values of ``name`` per micrograph (from the rows, else through the optics group), or None."""
    if name in rows.columns:
        values = pd.to_numeric(rows[name], errors="coerce").to_numpy(np.float64)
    elif optics is not None and name in optics.columns and group_row is not None:
        values = pd.to_numeric(optics[name], errors="coerce").to_numpy(np.float64)[group_row]
    else:
        return None
    if not np.isfinite(values).all():
        raise InputError(f"has non-numeric or missing {name} values; fix or remove those rows.", path=path)
    return values


def _optics_rows(path: Path, rows: pd.DataFrame, optics: pd.DataFrame | None) -> np.ndarray | None:
    if optics is None or len(optics) == 0:
        return None
    if "rlnOpticsGroup" not in rows.columns or "rlnOpticsGroup" not in optics.columns:
        if len(optics) == 1:
            return np.zeros(len(rows), dtype=np.int64)
        raise InputError("has several optics groups but no rlnOpticsGroup column; add it to both blocks.", path=path)
    lookup = pd.Index(pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce"))
    pos = lookup.get_indexer(pd.to_numeric(rows["rlnOpticsGroup"], errors="coerce"))
    if (pos < 0).any():
        raise InputError("has micrographs in an optics group that data_optics does not define; fix rlnOpticsGroup.", path=path)
    return pos.astype(np.int64)


def _pixel_sizes(path: Path, get) -> np.ndarray:
    for name in ("rlnMicrographPixelSize", "rlnImagePixelSize", "rlnPixelSize"):
        values = get(name)
        if values is not None:
            return values
    det, mag = get("rlnDetectorPixelSize"), get("rlnMagnification")
    if det is not None and mag is not None:
        return det * 1e4 / mag
    raise InputError(
        "gives no pixel size (rlnMicrographPixelSize, or rlnDetectorPixelSize and rlnMagnification); "
        "add rlnMicrographPixelSize to data_optics.",
        path=path,
    )


def _resolve(path: Path, names: np.ndarray, datadir: PathLike | None) -> np.ndarray:
    out = []
    for raw in names:
        p = Path(str(raw))
        candidates = [p] if p.is_absolute() else (
            ([Path(datadir) / p, Path(datadir) / p.name] if datadir else []) + [path.parent / p, Path.cwd() / p]
        )
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise InputError(
                f"names micrograph {raw}, which was not found (tried {', '.join(str(c) for c in candidates)}); "
                "pass --datadir with the folder that holds the micrographs.",
                path=path,
            )
        out.append(str(hit.resolve()))
    return np.array(out, dtype=object)


def read_micrographs_star(path: PathLike, *, datadir: PathLike | None = None) -> MicrographTable:
    """Read a RELION/CTFFIND micrographs STAR file (see the module docstring)."""
    path = Path(path)
    rows, optics = _micrograph_block(path, read_star_blocks(path))
    group_row = _optics_rows(path, rows, optics)

    def get(name: str):
        return _column(path, rows, optics, group_row, name)

    pixel = _pixel_sizes(path, get)
    names = rows["rlnMicrographName"].astype(str).to_numpy(dtype=object)
    ctf = None
    if all(get(c) is not None for c in _CTF):
        missing = [c for c in _OPTICS if get(c) is None]
        if missing:
            raise InputError(f"has CTF defoci but no {', '.join(missing)}; add them to data_optics.", path=path)
        phase = get("rlnPhaseShift")
        ctf = CtfParameters(
            defocus_u_angstrom=get("rlnDefocusU"), defocus_v_angstrom=get("rlnDefocusV"),
            defocus_angle_deg=get("rlnDefocusAngle"), voltage_kv=get("rlnVoltage"),
            cs_mm=get("rlnSphericalAberration"), amplitude_contrast=get("rlnAmplitudeContrast"),
            phase_shift_deg=np.zeros(len(rows)) if phase is None else phase,
        )
    bfac = get("rlnCtfBfactor")
    return MicrographTable(
        paths=_resolve(path, names, datadir),
        pixel_size_angstrom=np.asarray(pixel, dtype=np.float64),
        ctf=ctf,
        b_factor_angstrom2=np.zeros(len(rows)) if bfac is None else bfac,
        names=names,
        source_path=str(path),
    )


def _optics_groups(table_pixel: np.ndarray, ctf: CtfParameters) -> tuple[pd.DataFrame, np.ndarray]:
    keys = np.stack([table_pixel, ctf.voltage_kv, ctf.cs_mm, ctf.amplitude_contrast], axis=1)
    unique, group = np.unique(keys, axis=0, return_inverse=True)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(len(unique))],
        "rlnOpticsGroup": np.arange(1, len(unique) + 1),
        "rlnMicrographPixelSize": unique[:, 0],
        "rlnVoltage": unique[:, 1],
        "rlnSphericalAberration": unique[:, 2],
        "rlnAmplitudeContrast": unique[:, 3],
    })
    return optics, group.reshape(-1) + 1


def write_micrographs_star(path: PathLike, table: MicrographTable) -> None:
    """Write a RELION 3.1 micrographs STAR file (with CTF columns when the table has a CTF)."""
    if table.ctf is None:
        raise ValueError("write_micrographs_star needs a table with CTF parameters")
    optics, group = _optics_groups(table.pixel_size_angstrom, table.ctf)
    c = table.ctf
    rows = pd.DataFrame({
        "rlnMicrographName": table.names,
        "rlnOpticsGroup": group,
        "rlnDefocusU": c.defocus_u_angstrom,
        "rlnDefocusV": c.defocus_v_angstrom,
        "rlnDefocusAngle": c.defocus_angle_deg,
        "rlnPhaseShift": c.phase_shift_deg,
        "rlnCtfBfactor": table.b_factor_angstrom2,
    })
    _write_blocks(path, {"optics": optics, "micrographs": rows})


def _write_blocks(path: PathLike, blocks: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    starfile.write(blocks, tmp, overwrite=True)
    os.replace(tmp, path)


def write_coordinates_star(
    path: PathLike, micrograph_names: np.ndarray, positions_pixel: np.ndarray, *,
    rotations: np.ndarray | None = None, extra: dict | None = None,
) -> None:
    """Particle coordinates (``rlnMicrographName``, ``rlnCoordinateX/Y``, eulers when given)."""
    from cryoscape.geometry.rotations import matrix_to_euler_relion

    rows = pd.DataFrame({
        "rlnMicrographName": np.asarray(micrograph_names, dtype=object),
        "rlnCoordinateX": np.asarray(positions_pixel, dtype=np.float64)[:, 0],
        "rlnCoordinateY": np.asarray(positions_pixel, dtype=np.float64)[:, 1],
    })
    if rotations is not None and len(rotations):
        eulers = np.asarray(matrix_to_euler_relion(np.asarray(rotations, dtype=np.float64)))
        rows["rlnAngleRot"], rows["rlnAngleTilt"], rows["rlnAnglePsi"] = eulers[:, 0], eulers[:, 1], eulers[:, 2]
    for name, values in (extra or {}).items():
        rows[name] = values
    _write_blocks(path, {"particles": rows})


def read_coordinates_star(path: PathLike) -> pd.DataFrame:
    """The particle block of a coordinates STAR file (needs rlnMicrographName, rlnCoordinateX/Y)."""
    path = Path(path)
    blocks = read_star_blocks(path)
    frames = [v for v in blocks.values() if isinstance(v, pd.DataFrame) and "rlnCoordinateX" in v.columns]
    if not frames or not {"rlnMicrographName", "rlnCoordinateY"} <= set(frames[0].columns):
        raise InputError("has no block with rlnMicrographName, rlnCoordinateX and rlnCoordinateY; pass a coordinates STAR file.", path=path)
    return frames[0].reset_index(drop=True)


def micrograph_shape(path: PathLike) -> tuple[int, int]:
    """``(height, width)`` of a micrograph from its header."""
    h = read_mrc_header(path)
    if h.nz != 1:
        raise InputError(f"holds {h.nz} sections, not one micrograph; pass single-frame (motion-corrected) micrographs.", path=path)
    return int(h.ny), int(h.nx)


def read_micrograph(path: PathLike) -> np.ndarray:
    """One micrograph as a float32 ``(height, width)`` array (finite values checked by io/mrc)."""
    micrograph_shape(path)
    data, _ = read_mrc(path)
    return np.asarray(data, dtype=np.float32).reshape(data.shape[-2:])
