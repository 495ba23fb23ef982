"""RELION STAR files: particles with poses and CTF, RELION 3.0 and 3.1+ (optics groups).

Reading (:func:`read_star`)
    * 3.1+: ``data_optics`` and ``data_particles`` (either order); optics columns
      (``rlnImagePixelSize``, ``rlnImageSize``, ``rlnVoltage``, ``rlnSphericalAberration``,
      ``rlnAmplitudeContrast``...) reach each particle through ``rlnOpticsGroup``; shifts are
      ``rlnOriginXAngst/YAngst`` in angstroms.
    * 3.0: one particle block; pixel size from ``rlnPixelSize`` or
      ``rlnDetectorPixelSize`` (um) * 1e4 / ``rlnMagnification``; shifts ``rlnOriginX/Y`` in pixels.
    * ``rlnImageName`` is ``N@stack`` with N 1-based (a bare path is image 1 of that file).
    * Eulers ``(rlnAngleRot, rlnAngleTilt, rlnAnglePsi)`` give ``R = A(rot, tilt, psi)``, RELION's
      ZYZ matrix (see cryoscape.geometry.rotations); a column missing from the particle rows is
      looked up in the optics table, so either layout works.

Writing (:func:`write_star`) always produces the 3.1 layout.  Rows read from a STAR file are
written back with every column untouched except those whose value changed in the table (a
pose, a shift, a CTF value differing by more than float32 rounding); new values are rounded to
6 decimals, as RELION writes them.  Other floats are written with ``%.6f`` when that reads back
to the same number and with their shortest exact representation otherwise, so read -> write ->
read is lossless.  Relative image names that would no longer reach their stack from the new
file's folder (or the working directory, RELION's project root) are made absolute.  A 3.0 file
gains an optics table (one group per distinct pixel size, box,
voltage, Cs and amplitude contrast) and its shifts move to ``rlnOriginXAngst/YAngst``.
"""

from __future__ import annotations

import linecache
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryoscape.errors import InputError
from cryoscape.io.particles import CtfParameters, ParticleTable, _fill_pixel_size, resolve_stacks
from cryoscape.io.writers import atomic_write

log = logging.getLogger(__name__)

__all__ = ["read_star", "write_star", "read_star_blocks"]

PathLike = str | os.PathLike

ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
# optics-level quantities the table knows per particle: written into the optics table
_OPTICS_FIELDS = ("rlnImagePixelSize", "rlnImageSize", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
# 3.0 pixel-size columns superseded by rlnImagePixelSize
_OLD_PIXEL_COLUMNS = ("rlnMagnification", "rlnDetectorPixelSize", "rlnPixelSize")


def _eulers_to_matrices(eulers_deg: np.ndarray) -> np.ndarray:
    from cryoscape.geometry.rotations import euler_relion_to_matrix

    return np.asarray(euler_relion_to_matrix(np.asarray(eulers_deg, dtype=np.float64)), dtype=np.float64)


def _matrices_to_eulers(rotations: np.ndarray) -> np.ndarray:
    from cryoscape.geometry.rotations import matrix_to_euler_relion

    return np.asarray(matrix_to_euler_relion(np.asarray(rotations, dtype=np.float64)), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def read_star_blocks(path: PathLike) -> dict:
    """All data blocks of a STAR file (loops as DataFrames), raising InputError if it cannot be parsed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass an existing STAR file.")
    # starfile reads lines through linecache and leaves them cached when parsing fails, so a
    # file rewritten after a failure would be read stale: clear the cache around each read
    linecache.clearcache()
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # noqa: BLE001 - any parser failure is one user error
        raise InputError(
            f"{path} could not be parsed as a STAR file ({type(err).__name__}); "
            "check it is a RELION particle STAR file."
        ) from None
    finally:
        linecache.clearcache()
    return blocks


def _particle_and_optics_blocks(path: Path, blocks: dict) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    frames = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    optics = frames.get("optics")
    if isinstance(frames.get("particles"), pd.DataFrame):
        rows = frames["particles"]
    else:
        candidates = [v for k, v in frames.items() if k != "optics" and "rlnImageName" in v.columns]
        if not candidates:
            raise InputError(
                f"{path} has no particle block with an rlnImageName column; pass a particle STAR file "
                "(e.g. from Extract, Refine3D or Select)."
            )
        rows = candidates[0]
    if "rlnImageName" not in rows.columns:
        raise InputError(f"{path} has no rlnImageName column; pass a particle STAR file that names each image.")
    if len(rows) == 0:
        raise InputError(f"{path} holds no particles; pass a STAR file with at least one particle row.")
    return rows.reset_index(drop=True), (None if optics is None else optics.reset_index(drop=True))


def _optics_row_of_each_particle(path: Path, rows: pd.DataFrame, optics: pd.DataFrame | None) -> np.ndarray | None:
    """Row of ``optics`` that each particle uses, or None without an optics table."""
    if optics is None or len(optics) == 0:
        return None
    if "rlnOpticsGroup" not in rows.columns:
        if len(optics) == 1:
            return np.zeros(len(rows), dtype=np.int64)
        raise InputError(
            f"{path} has {len(optics)} optics groups but its particles have no rlnOpticsGroup column; "
            "add rlnOpticsGroup to the particle rows."
        )
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError(f"{path} has a data_optics block without rlnOpticsGroup; add the group numbers to data_optics.")
    lookup = pd.Index(pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce"))
    groups = pd.to_numeric(rows["rlnOpticsGroup"], errors="coerce")
    pos = lookup.get_indexer(groups)
    if (pos < 0).any():
        missing = groups[pos < 0].iloc[0]
        raise InputError(
            f"{path} has particles in optics group {missing}, which data_optics does not define; "
            "add the group to data_optics or fix rlnOpticsGroup."
        )
    return pos.astype(np.int64)


def _numeric(path: Path, series: pd.Series, name: str) -> np.ndarray:
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, copy=True)
    if np.isnan(values).any():
        row = int(np.flatnonzero(np.isnan(values))[0])
        raise InputError(
            f"{path} has a missing or non-numeric {name} value (row {row + 1}); fix or remove that particle."
        )
    return values


def _parse_image_names(path: Path, names: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``N@stack`` (N 1-based) -> (stack paths as written, 0-based indices)."""
    names = names.astype(str)
    has_at = names.str.contains("@", regex=False).to_numpy()
    parts = names.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:  # no '@' anywhere: each name is a single-image file
        return names.to_numpy(dtype=object), np.zeros(len(names), dtype=np.int64)
    number = pd.to_numeric(parts[0].where(has_at), errors="coerce").to_numpy(dtype=np.float64)
    bad = has_at & ~((number >= 1) & (number == np.round(number)))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{path} has the image name '{names.iloc[row]}' (row {row + 1}), not of the form N@stack "
            "with N >= 1; fix rlnImageName."
        )
    stacks = np.where(has_at, parts[1].to_numpy(dtype=object), names.to_numpy(dtype=object))
    index = np.where(has_at, np.nan_to_num(number) - 1, 0).astype(np.int64)
    return stacks.astype(object), index


def read_star(path: PathLike, *, datadir: PathLike | None = None, check_stacks: bool = True,
              amplitude_contrast: float = 0.1) -> ParticleTable:
    """Read a RELION particle STAR file (3.0 or 3.1+) into a :class:`ParticleTable`.

    Parameters
    ----------
    path
        The STAR file.
    datadir
        Folder tried first for relative stack paths.
    check_stacks
        Open each stack header to check indices and read the box size (see
        :func:`cryoscape.io.particles.resolve_stacks`).
    amplitude_contrast
        Used, with a warning, when the file has every other CTF column but no
        ``rlnAmplitudeContrast`` (common in RELION 3.0 exports); the commands' ``--amp-contrast``.

    Raises
    ------
    InputError
        Unparsable file, no particle block, bad image names, non-numeric pose/CTF values,
        undefined optics groups, or missing/short stacks.
    """
    path = Path(path)
    rows, optics = _particle_and_optics_blocks(path, read_star_blocks(path))
    group_row = _optics_row_of_each_particle(path, rows, optics)

    def column(name: str) -> np.ndarray | None:
        if name in rows.columns:
            return _numeric(path, rows[name], name)
        if optics is not None and group_row is not None and name in optics.columns:
            return _numeric(path, optics[name], name)[group_row]
        return None

    stacks, image_indices = _parse_image_names(path, rows["rlnImageName"])

    pixel = _star_pixel_size(column)
    info = resolve_stacks(stacks, image_indices, metadata_path=path, datadir=datadir, check_stacks=check_stacks)
    pixel = _fill_pixel_size(pixel, info)
    box_size = info.box_size
    if box_size is None:
        size = column("rlnImageSize")
        box_size = None if size is None else int(size[0])
    has_angles = all(c in rows.columns or (optics is not None and c in optics.columns) for c in ANGLE_COLUMNS)
    rotations, shifts = _star_poses(path, column, pixel, len(rows), has_angles=has_angles)
    ctf = _star_ctf(path, column, len(rows), amplitude_contrast)

    return ParticleTable(
        image_paths=info.image_paths,
        image_indices=image_indices,
        box_size=box_size,
        pixel_size_angstrom=pixel,
        rotations=rotations,
        shifts_pixel=shifts,
        ctf=ctf,
        optics=optics,
        star_rows=rows,
        source_path=os.fspath(path),
    )


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _format_float_column(values: np.ndarray) -> np.ndarray:
    """Strings that read back to exactly ``values``: ``%.6f`` where enough, shortest repr elsewhere."""
    values = np.asarray(values, dtype=np.float64)
    out = np.array([f"{v:.6f}" for v in values.tolist()], dtype=object)
    finite = np.isfinite(values)
    back = np.array(out.tolist(), dtype=np.float64) if len(out) else values
    for i in np.flatnonzero(finite & (back != values)):
        out[i] = repr(float(values[i]))
    return out


def _star_pixel_size(column) -> np.ndarray | None:
    """Per-particle pixel size from rlnImagePixelSize, rlnPixelSize or detector pixel / magnification."""
    pixel = column("rlnImagePixelSize")
    if pixel is None:
        pixel = column("rlnPixelSize")
    if pixel is None:
        detector_um, magnification = column("rlnDetectorPixelSize"), column("rlnMagnification")
        if detector_um is not None and magnification is not None:
            pixel = detector_um * 1e4 / magnification
    return pixel


def _star_poses(path: Path, column, pixel: np.ndarray, n: int, *, has_angles: bool
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Rotations from the Euler angles and shifts in pixels (from angstroms with the pixel size, or
    RELION 3.0's pixel columns; zero when angles come without shifts)."""
    rotations = None
    if has_angles:
        eulers = np.stack([column(c) for c in ANGLE_COLUMNS], axis=-1)
        rotations = _eulers_to_matrices(eulers)
    shifts = None
    x_angst, y_angst = column("rlnOriginXAngst"), column("rlnOriginYAngst")
    x_pixel, y_pixel = column("rlnOriginX"), column("rlnOriginY")
    if x_angst is not None and y_angst is not None:
        known = np.isfinite(pixel) & (pixel > 0)
        if not known.all():
            raise InputError(
                f"{path} gives shifts in angstroms but no pixel size; add rlnImagePixelSize to data_optics."
            )
        shifts = np.stack([x_angst, y_angst], axis=-1) / pixel[:, None]
    elif x_pixel is not None and y_pixel is not None:
        shifts = np.stack([x_pixel, y_pixel], axis=-1)
    elif rotations is not None:
        shifts = np.zeros((n, 2))
    return rotations, shifts


def _star_ctf(path: Path, column, n: int, amplitude_contrast: float) -> CtfParameters | None:
    """CTF parameters when the defocus, voltage and Cs columns exist (amplitude contrast defaulted with
    a warning when only it is missing)."""
    defocus_u = column("rlnDefocusU")
    voltage, cs, amp = column("rlnVoltage"), column("rlnSphericalAberration"), column("rlnAmplitudeContrast")
    if amp is None and defocus_u is not None and voltage is not None and cs is not None:
        log.warning("%s has no rlnAmplitudeContrast column; using %g (pass --amp-contrast to change it)",
                    path, amplitude_contrast)
        amp = np.full(n, float(amplitude_contrast))
    if defocus_u is None or voltage is None or cs is None or amp is None:
        return None
    defocus_v = column("rlnDefocusV")
    angle = column("rlnDefocusAngle")
    phase = column("rlnPhaseShift")
    zeros = np.zeros(n)
    return CtfParameters(
        defocus_u_angstrom=defocus_u,
        defocus_v_angstrom=defocus_u if defocus_v is None else defocus_v,
        defocus_angle_deg=zeros if angle is None else angle,
        voltage_kv=voltage,
        cs_mm=cs,
        amplitude_contrast=amp,
        phase_shift_deg=zeros if phase is None else phase,
    )


def _format_column(column: pd.Series) -> np.ndarray:
    """STAR text of each value: exact floats, plain integers, strings quoted when they hold blanks."""
    if pd.api.types.is_float_dtype(column.dtype):
        return _format_float_column(column.to_numpy(dtype=np.float64))
    if pd.api.types.is_integer_dtype(column.dtype) and not column.isna().any():
        return np.array([str(v) for v in column.tolist()], dtype=object)
    text = column.astype(str)
    needs_quotes = (text.str.contains(r"\s", regex=True) | (text == "")).to_numpy()
    out = text.to_numpy(dtype=object).copy()
    out[needs_quotes] = ['"' + v + '"' for v in out[needs_quotes]]
    return out


def _loop_text(name: str, frame: pd.DataFrame) -> str:
    """One ``data_<name>`` loop block (written here rather than by starfile: 3x faster at 500k rows)."""
    header = [f"data_{name}", "", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(frame.columns)]
    columns = [_format_column(frame[c]) for c in frame.columns]
    body = ["\t".join(values) for values in zip(*columns)]
    return "\n".join(header + body) + "\n\n"


def _set_values(rows: pd.DataFrame, name: str, new: np.ndarray, changed: np.ndarray | None = None) -> None:
    """Write ``new`` (rounded to 6 decimals) into ``rows[name]`` where ``changed`` (all rows if new)."""
    new = np.round(np.asarray(new, dtype=np.float64), 6)
    if name not in rows.columns:
        rows[name] = new
        return
    if changed is None:
        old = pd.to_numeric(rows[name], errors="coerce").to_numpy(dtype=np.float64)
        changed = ~np.isclose(old, new, rtol=1e-7, atol=1e-9)
    if not changed.any():
        return
    column = pd.to_numeric(rows[name], errors="coerce").astype(np.float64).to_numpy().copy()
    column[changed] = new[changed]
    rows[name] = column


def _optics_values(table: ParticleTable) -> dict[str, np.ndarray]:
    """Optics-level quantities the table knows, per particle."""
    n = len(table)
    values: dict[str, np.ndarray] = {"rlnImagePixelSize": table.pixel_size_angstrom}
    if table.box_size is not None:
        values["rlnImageSize"] = np.full(n, table.box_size, dtype=np.int64)
    if table.ctf is not None:
        values["rlnVoltage"] = table.ctf.voltage_kv
        values["rlnSphericalAberration"] = table.ctf.cs_mm
        values["rlnAmplitudeContrast"] = table.ctf.amplitude_contrast
    return values


def _group_keys(values: dict[str, np.ndarray], first: np.ndarray | None = None) -> np.ndarray:
    """Group number (0-based, by first appearance) of each distinct combination of values."""
    frame = pd.DataFrame({k: np.round(np.asarray(v, dtype=np.float64), 6) for k, v in values.items()})
    if first is not None:
        frame.insert(0, "_group", first)
    return frame.groupby(list(frame.columns), sort=False).ngroup().to_numpy()


def _build_optics(rows: pd.DataFrame, values: dict[str, np.ndarray]) -> pd.DataFrame:
    """Fresh optics table (one group per distinct combination); sets rlnOpticsGroup in ``rows``."""
    keys = _group_keys(values)
    first = np.unique(keys, return_index=True)[1]
    optics = pd.DataFrame({"rlnOpticsGroupName": [f"opticsGroup{k + 1}" for k in range(len(first))]})
    optics["rlnOpticsGroup"] = np.arange(1, len(first) + 1, dtype=np.int64)
    for name, v in values.items():
        v = np.asarray(v)[first]
        optics[name] = v if np.issubdtype(v.dtype, np.integer) else np.round(v.astype(np.float64), 6)
    optics["rlnImageDimensionality"] = np.int64(2)
    rows["rlnOpticsGroup"] = (keys + 1).astype(np.int64)
    return optics


def _optics_value(name: str, value) -> int | float:
    return int(value) if name == "rlnImageSize" else round(float(value), 6)


def _set_cell(frame: pd.DataFrame, pos: int, name: str, value: int | float) -> None:
    """``frame[name][pos] = value``, turning an integer column into floats only when needed."""
    column = frame[name]
    if not pd.api.types.is_numeric_dtype(column.dtype) or (
        pd.api.types.is_integer_dtype(column.dtype) and float(value) != int(value)
    ):
        frame[name] = pd.to_numeric(column, errors="coerce").astype(np.float64)
    frame.loc[frame.index[pos], name] = value


def _reconcile_optics(rows: pd.DataFrame, optics: pd.DataFrame, values: dict[str, np.ndarray]) -> pd.DataFrame:
    """Make the optics table agree with the table's per-particle values, splitting groups if needed.

    Groups whose particles agree with their optics row are left untouched; a group whose
    particles all share a new value gets it; a group whose particles differ is split, the extra
    combinations becoming new groups numbered after the last one.
    """
    optics = optics.copy()
    if "rlnOpticsGroup" not in rows.columns:  # single group without the column (read path allows it)
        rows["rlnOpticsGroup"] = np.full(len(rows), optics["rlnOpticsGroup"].iloc[0])
    groups = pd.to_numeric(rows["rlnOpticsGroup"]).to_numpy()
    group_pos = pd.Index(pd.to_numeric(optics["rlnOpticsGroup"])).get_indexer(groups)
    # quantities stored per particle are updated in the rows; the rest belong to the optics table
    at_optics = {}
    for name, v in values.items():
        if name in rows.columns:
            _set_values(rows, name, v)
        else:
            at_optics[name] = v
    if not at_optics:
        return optics
    for name, v in at_optics.items():
        if name not in optics.columns:  # new column: unreferenced groups get the first value
            optics[name] = _optics_value(name, v[0])

    keys = _group_keys(at_optics, first=group_pos)
    next_group = int(pd.to_numeric(optics["rlnOpticsGroup"]).max()) + 1
    new_groups = groups.copy()
    used: set[int] = set()
    extra_rows = []
    for key in pd.unique(keys):
        members = keys == key
        i = int(np.flatnonzero(members)[0])
        pos = int(group_pos[i])
        if pos not in used:
            used.add(pos)
            for name, v in at_optics.items():
                if not np.isclose(float(optics[name].iloc[pos]), float(v[i]), rtol=1e-7, atol=1e-9):
                    _set_cell(optics, pos, name, _optics_value(name, v[i]))
            continue
        row = optics.iloc[[pos]].copy()
        row["rlnOpticsGroup"] = next_group
        if "rlnOpticsGroupName" in row.columns:
            row["rlnOpticsGroupName"] = f"{row['rlnOpticsGroupName'].iloc[0]}_{next_group}"
        for name, v in at_optics.items():
            row[name] = _optics_value(name, v[i])
        extra_rows.append(row)
        new_groups[members] = next_group
        next_group += 1
    if extra_rows:
        optics = pd.concat([optics, *extra_rows], ignore_index=True)
        rows["rlnOpticsGroup"] = new_groups.astype(np.int64)
    return optics


def _image_names_for(out_path: Path, names: pd.Series, resolved: np.ndarray) -> pd.Series:
    """Original image names, except relative ones that would not find their stack from ``out_path``.

    Relative names are kept when, read from the new file's folder or the working directory (the
    RELION project root), they still reach the stack they were resolved to; otherwise the stack
    part becomes the absolute path, so a STAR file written elsewhere stays usable.
    """
    stacks, _ = _parse_image_names(out_path, names)
    codes, uniques = pd.factorize(pd.Series(stacks, dtype=object), sort=False)
    first_row = np.unique(codes, return_index=True)[1]
    out_dir = out_path.absolute().parent
    targets = np.full(len(uniques), None, dtype=object)
    for k, raw in enumerate(uniques):
        raw = str(raw)
        target = Path(resolved[first_row[k]])
        if Path(raw).is_absolute() or not target.is_file():
            continue
        found = next((c for c in (out_dir / raw, Path.cwd() / raw) if c.is_file()), None)
        if found is None or not os.path.samefile(found, target):
            targets[k] = str(target)
    row_targets = targets[codes]
    change = pd.notna(row_targets)
    if not change.any():
        return names
    out = names.astype(str).to_numpy(dtype=object).copy()
    parts = pd.Series(out[change], dtype=object).str.partition("@")
    has_at = (parts[1] == "@").to_numpy()
    new_stack = row_targets[change]
    out[change] = np.where(has_at, parts[0].to_numpy(dtype=object) + "@" + new_stack, new_stack)
    return pd.Series(out, dtype=object)


def write_star(path: PathLike, table: ParticleTable, *, indices: np.ndarray | None = None,
               image_names: str = "auto") -> None:
    """Write ``table`` (or its particles ``indices``) as a RELION 3.1 particle STAR file, atomically.

    Parameters
    ----------
    path
        Output file.
    table
        Particles; rows read from a STAR file are kept (unknown columns untouched) and only
        changed poses / shifts / CTF values are rewritten.  Other tables get new rows
        (``rlnImageName`` with absolute stack paths) and a fresh optics table.
    indices
        0-based particles to write, in that order; all when None.
    image_names
        For rows read from a STAR file: ``"keep"`` writes ``rlnImageName`` exactly as the input
        had it (RELION resolves relative names from its project folder; what subsets sent back
        to RELION need), ``"absolute"`` makes every stack path absolute, ``"auto"`` (default)
        keeps names that still reach their stack from the new file's folder or the working
        directory and makes the others absolute.

    Raises
    ------
    InputError
        The pixel size of some particles is unknown (needed for rlnImagePixelSize and shifts).
    """
    table.require_pixel_size()
    sub = table if indices is None else table.subset(indices)
    rows = _particle_rows(path, sub, image_names)

    values = _optics_values(sub)
    if sub.optics is None or len(sub.optics) == 0:
        moved = [c for c in (*_OPTICS_FIELDS, *_OLD_PIXEL_COLUMNS) if c in rows.columns
                 and (c in values or c in _OLD_PIXEL_COLUMNS)]
        rows = rows.drop(columns=moved)
        optics = _build_optics(rows, values)
    else:
        optics = _reconcile_optics(rows, sub.optics, values)

    rows = _set_pose_columns(rows, sub)
    if sub.ctf is not None:
        _set_values(rows, "rlnDefocusU", sub.ctf.defocus_u_angstrom)
        _set_values(rows, "rlnDefocusV", sub.ctf.defocus_v_angstrom)
        _set_values(rows, "rlnDefocusAngle", sub.ctf.defocus_angle_deg)
        # written whenever the source had it, or was not a STAR file (cryoDRGN's STAR parser
        # needs the column; RELION treats a missing one as 0)
        if "rlnPhaseShift" in rows.columns or sub.star_rows is None or np.any(sub.ctf.phase_shift_deg != 0):
            _set_values(rows, "rlnPhaseShift", sub.ctf.phase_shift_deg)

    text = "# version 30001, written by cryoscape\n\n" + _loop_text("optics", optics) + _loop_text("particles", rows)
    with atomic_write(path, "w") as f:
        f.write(text)


def _particle_rows(path: PathLike, sub: ParticleTable, image_names: str) -> pd.DataFrame:
    """A copy of the table's STAR rows with ``rlnImageName`` as ``image_names`` asks, or new rows naming each image."""
    if sub.star_rows is not None:
        rows = sub.star_rows.copy()
        if image_names == "absolute":
            rows["rlnImageName"] = pd.Series([f"{i + 1:06d}@{p}" for i, p in zip(sub.image_indices.tolist(),
                                                                                 sub.image_paths.tolist())], dtype=object)
        elif image_names != "keep":
            rows["rlnImageName"] = _image_names_for(Path(path), rows["rlnImageName"], sub.image_paths)
    else:
        names = [f"{i + 1:06d}@{p}" for i, p in zip(sub.image_indices.tolist(), sub.image_paths.tolist())]
        rows = pd.DataFrame({"rlnImageName": pd.Series(names, dtype=object)})
    return rows


def _set_pose_columns(rows: pd.DataFrame, sub: ParticleTable) -> pd.DataFrame:
    """``rows`` with the table's angles and shifts (angstroms) set where they changed; pixel shifts dropped."""
    n = len(sub)
    if sub.rotations is not None:
        if all(c in rows.columns for c in ANGLE_COLUMNS):
            old = _eulers_to_matrices(np.stack([pd.to_numeric(rows[c]).to_numpy(np.float64) for c in ANGLE_COLUMNS], -1))
            changed = np.abs(old - sub.rotations).reshape(n, 9).max(axis=1) > 1e-6
        else:
            changed = np.ones(n, dtype=bool)
        if changed.any():
            eulers = _matrices_to_eulers(sub.rotations)
            for k, name in enumerate(ANGLE_COLUMNS):
                _set_values(rows, name, eulers[:, k], changed)
    if sub.shifts_pixel is not None:
        shifts_angst = sub.shifts_pixel * sub.pixel_size_angstrom[:, None]
        if "rlnOriginXAngst" in rows.columns and "rlnOriginYAngst" in rows.columns:
            old = np.stack([pd.to_numeric(rows[c]).to_numpy(np.float64) for c in ("rlnOriginXAngst", "rlnOriginYAngst")], -1)
            old_pixel = old / sub.pixel_size_angstrom[:, None]
            changed = np.abs(old_pixel - sub.shifts_pixel).max(axis=1) > 1e-5
        else:
            changed = np.ones(n, dtype=bool)
        for k, name in enumerate(("rlnOriginXAngst", "rlnOriginYAngst")):
            _set_values(rows, name, shifts_angst[:, k], changed)
        rows = rows.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in rows.columns])
    return rows
