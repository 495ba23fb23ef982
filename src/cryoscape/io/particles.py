"""One particle table for every metadata format, and the function that loads it.

:func:`load_particles` reads RELION ``.star``, cryoSPARC ``.cs``, a ``.txt`` list of stacks or a
bare ``.mrcs`` stack (plus optional cryoDRGN ``poses.pkl`` / ``ctf.pkl``) into a
:class:`ParticleTable`: numpy arrays with one row per particle, in the conventions of
DESIGN.md (rotations ``R`` such that a world point ``X`` appears at image point ``(R X)_xy``;
shifts in pixels with RELION's sign; CTF parameters in RELION units).

Stack files are resolved and checked here, once per unique stack (datasets have 500k rows and a
few thousand stacks): absolute paths are kept; a relative path is tried under ``datadir``, then
next to the metadata file, then in the working directory; with ``datadir`` the bare file name is
tried last (stacks copied flat into one folder).  Each stack's header gives its number of
images (every referenced index must be inside it) and its box size (one for all stacks).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryoscape.errors import InputError

__all__ = [
    "CtfParameters",
    "ParticleTable",
    "StackInfo",
    "load_particles",
    "load_indices",
    "read_stack_list",
    "read_bare_stack",
    "resolve_stacks",
]

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# CTF parameters
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class CtfParameters:
    """Per-particle CTF parameters in RELION units; every field is an ``(N,)`` float64 array.

    Attributes
    ----------
    defocus_u_angstrom, defocus_v_angstrom
        Defocus along the major / minor axis, angstroms (positive = underfocus).
    defocus_angle_deg
        Azimuth of the U axis, degrees.
    voltage_kv, cs_mm, amplitude_contrast
        Acceleration voltage (kV), spherical aberration (mm), amplitude contrast (fraction).
    phase_shift_deg
        Additional phase shift (phase plate), degrees; 0 when the metadata has none.
    """

    defocus_u_angstrom: np.ndarray
    defocus_v_angstrom: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray

    def __post_init__(self) -> None:
        n = None
        for field in dataclasses.fields(self):
            value = np.array(getattr(self, field.name), dtype=np.float64, copy=True).reshape(-1)
            object.__setattr__(self, field.name, value)
            if n is None:
                n = len(value)
            elif len(value) != n:
                raise ValueError(f"CtfParameters.{field.name} has {len(value)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.defocus_u_angstrom)

    def subset(self, indices: np.ndarray) -> "CtfParameters":
        """The parameters of the particles ``indices`` (integer indices or a boolean mask)."""
        idx = _as_index_array(indices)
        return CtfParameters(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})

    def to_cryodrgn_array(self, box_size: int, pixel_size: float | np.ndarray) -> np.ndarray:
        """``(N, 9)`` float64 array ``D, Apix, dfU, dfV, dfAng, kV, Cs, w, phase_shift`` (cryoDRGN ctf.pkl).

        Parameters
        ----------
        box_size
            Box size ``D`` in pixels written in column 0.
        pixel_size
            Pixel size in angstroms, a scalar or an ``(N,)`` array, written in column 1.
        """
        n = len(self)
        out = np.empty((n, 9), dtype=np.float64)
        out[:, 0] = box_size
        out[:, 1] = np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (n,))
        out[:, 2] = self.defocus_u_angstrom
        out[:, 3] = self.defocus_v_angstrom
        out[:, 4] = self.defocus_angle_deg
        out[:, 5] = self.voltage_kv
        out[:, 6] = self.cs_mm
        out[:, 7] = self.amplitude_contrast
        out[:, 8] = self.phase_shift_deg
        return out

    @classmethod
    def from_cryodrgn_array(cls, arr: np.ndarray) -> "CtfParameters":
        """Parameters from an ``(N, 9)`` cryoDRGN ctf array (columns 0-1, box and pixel size, are ignored)."""
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 9:
            raise ValueError(f"expected an (N, 9) cryoDRGN CTF array, got shape {arr.shape}")
        return cls(
            defocus_u_angstrom=arr[:, 2],
            defocus_v_angstrom=arr[:, 3],
            defocus_angle_deg=arr[:, 4],
            voltage_kv=arr[:, 5],
            cs_mm=arr[:, 6],
            amplitude_contrast=arr[:, 7],
            phase_shift_deg=arr[:, 8],
        )


# --------------------------------------------------------------------------------------------
# the particle table
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ParticleTable:
    """Everything read about N particles, as numpy arrays (row ``i`` is particle ``i``).

    Attributes
    ----------
    image_paths
        ``(N,)`` object array of ``str``: absolute path of each particle's stack file (many
        rows share one string object, which keeps 500k-row tables small).
    image_indices
        ``(N,)`` int64, 0-based index of the image inside its stack.
    box_size
        Box size in pixels shared by all stacks, or None when the stacks were not opened and the
        metadata does not say.
    pixel_size_angstrom
        ``(N,)`` float64 (optics groups may differ); NaN where unknown.
    rotations
        ``(N, 3, 3)`` float64 pose rotations ``R`` (world point ``X`` appears at ``(R X)_xy``), or None.
    shifts_pixel
        ``(N, 2)`` float64 ``(x, y)`` shifts in pixels, RELION sign (the projection centre sits at
        box centre minus shift), or None.
    ctf
        :class:`CtfParameters` or None.
    optics
        RELION optics table (kept for writing back), or None.
    star_rows
        The original STAR particle rows, unknown columns untouched, or None.
    cs_records
        The original cryoSPARC structured array, or None.
    source_path
        The metadata file this table was read from.
    """

    image_paths: np.ndarray
    image_indices: np.ndarray
    box_size: int | None
    pixel_size_angstrom: np.ndarray
    rotations: np.ndarray | None = None
    shifts_pixel: np.ndarray | None = None
    ctf: CtfParameters | None = None
    optics: pd.DataFrame | None = None
    star_rows: pd.DataFrame | None = None
    cs_records: np.ndarray | None = None
    source_path: str = ""

    def __post_init__(self) -> None:
        self.image_paths = np.asarray(self.image_paths, dtype=object).reshape(-1)
        self.image_indices = np.asarray(self.image_indices, dtype=np.int64).reshape(-1)
        n = len(self.image_paths)
        self.pixel_size_angstrom = np.broadcast_to(
            np.asarray(self.pixel_size_angstrom, dtype=np.float64), (n,)
        ).copy()
        if self.rotations is not None:
            self.rotations = np.asarray(self.rotations, dtype=np.float64)
        if self.shifts_pixel is not None:
            self.shifts_pixel = np.asarray(self.shifts_pixel, dtype=np.float64)
        if self.box_size is not None:
            self.box_size = int(self.box_size)
        self.source_path = os.fspath(self.source_path)
        checks = {
            "image_indices": (self.image_indices, (n,)),
            "rotations": (self.rotations, (n, 3, 3)),
            "shifts_pixel": (self.shifts_pixel, (n, 2)),
        }
        for name, (value, shape) in checks.items():
            if value is not None and value.shape != shape:
                raise ValueError(f"ParticleTable.{name} has shape {value.shape}, expected {shape}")
        if self.ctf is not None and len(self.ctf) != n:
            raise ValueError(f"ParticleTable.ctf has {len(self.ctf)} rows, expected {n}")
        if self.star_rows is not None and len(self.star_rows) != n:
            raise ValueError(f"ParticleTable.star_rows has {len(self.star_rows)} rows, expected {n}")
        if self.cs_records is not None and len(self.cs_records) != n:
            raise ValueError(f"ParticleTable.cs_records has {len(self.cs_records)} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def has_poses(self) -> bool:
        """True when the table holds rotations."""
        return self.rotations is not None

    @property
    def has_ctf(self) -> bool:
        """True when the table holds CTF parameters."""
        return self.ctf is not None

    def subset(self, indices: np.ndarray) -> "ParticleTable":
        """The particles ``indices`` (integer indices, in that order, or a boolean mask).

        Every per-particle field is selected, the original STAR rows and cryoSPARC records
        included; the optics table is kept whole.
        """
        idx = _as_index_array(indices)
        return ParticleTable(
            image_paths=self.image_paths[idx],
            image_indices=self.image_indices[idx],
            box_size=self.box_size,
            pixel_size_angstrom=self.pixel_size_angstrom[idx],
            rotations=None if self.rotations is None else self.rotations[idx],
            shifts_pixel=None if self.shifts_pixel is None else self.shifts_pixel[idx],
            ctf=None if self.ctf is None else self.ctf.subset(idx),
            optics=self.optics,
            star_rows=None if self.star_rows is None else self.star_rows.iloc[idx].reset_index(drop=True),
            cs_records=None if self.cs_records is None else self.cs_records[idx],
            source_path=self.source_path,
        )

    def resampled(self, stack_path: PathLike, box_size: int) -> "ParticleTable":
        """The same particles as images ``0 .. N-1`` of a new stack ``stack_path`` whose box is
        ``box_size`` pixels (e.g. Fourier-cropped from :attr:`box_size`).

        Pixel sizes grow by ``D / box_size`` and shifts in pixels shrink by ``box_size / D`` (the
        same in angstroms); poses, CTF, the optics table (its image size and pixel size are
        rewritten by :func:`cryoscape.io.star.write_star`) and every other STAR column are kept.
        The STAR image names become ``NNNNNN@stack_path`` as given (RELION reads relative names
        from the project folder, the working directory).  cryoSPARC records are dropped.
        """
        if self.box_size is None:
            raise InputError(f"{self.source_path or 'the particle file'} does not give the box size; "
                             "open its stacks (check_stacks) before resampling it.")
        n = len(self)
        factor = self.box_size / int(box_size)
        rows = None
        if self.star_rows is not None:
            rows = self.star_rows.copy()
            rows["rlnImageName"] = pd.Series([f"{i + 1:06d}@{os.fspath(stack_path)}" for i in range(n)], dtype=object)
        return ParticleTable(
            image_paths=np.full(n, os.path.abspath(stack_path), dtype=object),
            image_indices=np.arange(n),
            box_size=int(box_size),
            pixel_size_angstrom=self.pixel_size_angstrom * factor,
            rotations=self.rotations,
            shifts_pixel=None if self.shifts_pixel is None else self.shifts_pixel / factor,
            ctf=self.ctf,
            optics=self.optics,
            star_rows=rows,
            source_path=self.source_path,
        )

    def require_poses(self) -> None:
        """Raise :class:`InputError` naming the source file when the table has no rotations."""
        if self.rotations is not None:
            return
        name = self.source_path or "the particle file"
        suffix = Path(self.source_path).suffix.lower()
        if suffix == ".star":
            what = "has no pose columns (rlnAngleRot/Tilt/Psi)"
        elif suffix == ".cs":
            what = "has no pose fields (alignments3D/pose)"
        else:
            what = "holds images but no poses"
        raise InputError(f"{name} {what}; pass --poses poses.pkl or run a 3-D refinement first.")

    def require_ctf(self) -> None:
        """Raise :class:`InputError` naming the source file (and, for a STAR file, only the CTF
        columns it lacks) when the table has no CTF parameters."""
        if self.ctf is not None:
            return
        name = self.source_path or "the particle file"
        suffix = Path(self.source_path).suffix.lower()
        if suffix == ".star":
            needed = ("rlnDefocusU", "rlnVoltage", "rlnSphericalAberration")  # amplitude contrast defaults
            have = set() if self.star_rows is None else set(self.star_rows.columns)
            if self.optics is not None:
                have |= set(self.optics.columns)
            missing = [c for c in needed if c not in have] or list(needed)
            what = f"has no CTF column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        elif suffix == ".cs":
            what = "has no CTF fields (ctf/df1_A, ctf/df2_A, ctf/accel_kv, ...)"
        else:
            what = "holds images but no CTF parameters"
        raise InputError(f"{name} {what}; pass --ctf ctf.pkl or run CTF estimation first.")

    def require_pixel_size(self) -> None:
        """Raise :class:`InputError` naming the source file when some pixel sizes are unknown."""
        bad = ~(np.isfinite(self.pixel_size_angstrom) & (self.pixel_size_angstrom > 0))
        if bad.any():
            name = self.source_path or "the particle file"
            raise InputError(
                f"{name} gives no pixel size for {int(bad.sum())} of {len(self)} particles; "
                "pass --pixel-size (angstroms) or a ctf.pkl that holds it."
            )


def _as_index_array(indices) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.dtype == bool:
        return np.flatnonzero(idx)
    if idx.size == 0:
        return idx.astype(np.int64).reshape(-1)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"particle indices must be integers or a boolean mask, got {idx.dtype}")
    return idx.astype(np.int64).reshape(-1)


# --------------------------------------------------------------------------------------------
# stacks: path resolution and checks
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class StackInfo:
    """What :func:`resolve_stacks` learnt: absolute paths, box size, header pixel sizes."""

    image_paths: np.ndarray  # (N,) object array of absolute paths
    box_size: int | None
    header_pixel_size_angstrom: np.ndarray  # (N,) float64, NaN when the stack was not opened


def _candidate_paths(raw: str, *, datadir: Path | None, search_dirs: list[Path]) -> list[Path]:
    path = Path(raw)
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = []
        if datadir is not None:
            candidates.append(datadir / path)
        candidates.extend(d / path for d in search_dirs)
        candidates.append(Path.cwd() / path)
    if datadir is not None:
        candidates.append(datadir / path.name)  # stacks copied flat into one folder
    return candidates


def resolve_stacks(
    raw_paths,
    image_indices: np.ndarray,
    *,
    metadata_path: PathLike,
    datadir: PathLike | None = None,
    search_dirs: tuple[PathLike, ...] = (),
    check_stacks: bool = True,
) -> StackInfo:
    """Resolve stack paths and check every referenced image exists, once per unique stack.

    Parameters
    ----------
    raw_paths
        ``(N,)`` stack paths as written in the metadata.
    image_indices
        ``(N,)`` 0-based image indices.
    metadata_path
        The metadata file (named in error messages; relative paths are tried next to it).
    datadir
        Folder tried first for relative paths (and, by file name, for any path).
    search_dirs
        More folders to try after the metadata file's folder and before the working directory
        (e.g. the cryoSPARC project folder).
    check_stacks
        Open each stack's header: check the indices and read box and pixel size.  When False
        missing stacks are allowed (paths are resolved as well as possible).

    Raises
    ------
    InputError
        A stack is missing, an index is past the end of its stack, images are not square, or
        stacks differ in box size.
    """
    meta = os.fspath(metadata_path)
    meta_name = Path(meta).name
    codes, uniques = pd.factorize(pd.Series(np.asarray(raw_paths, dtype=object)), sort=False)
    image_indices = np.asarray(image_indices, dtype=np.int64)
    n = len(codes)
    ddir = None if datadir is None else Path(datadir).expanduser().resolve()
    dirs = [Path(meta).expanduser().resolve().parent]
    dirs += [Path(d).expanduser().resolve() for d in search_dirs]
    if ddir is not None and not ddir.is_dir():
        raise InputError(f"--datadir {datadir} is not a folder; pass the folder that holds the stacks.")

    max_index = np.full(len(uniques), -1, dtype=np.int64)
    if n:
        np.maximum.at(max_index, codes, image_indices)
        if image_indices.min() < 0:
            raise InputError(f"{meta} references a negative image index; fix {meta_name}.")

    resolved, pixel_by_stack, box_by_stack = _locate_stacks(
        uniques, max_index, datadir=ddir, search_dirs=dirs, meta=meta, meta_name=meta_name, check_stacks=check_stacks
    )
    box_size = _common_box_size(box_by_stack, meta)
    resolved_arr = np.array(resolved, dtype=object)
    return StackInfo(
        image_paths=resolved_arr[codes] if n else np.empty(0, dtype=object),
        box_size=box_size,
        header_pixel_size_angstrom=pixel_by_stack[codes] if n else np.empty(0),
    )


def _locate_stacks(
    uniques,
    max_index: np.ndarray,
    *,
    datadir: Path | None,
    search_dirs: list[Path],
    meta: str,
    meta_name: str,
    check_stacks: bool,
) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """Resolve each unique stack (and check its header with ``check_stacks``): paths, header pixel sizes, boxes."""
    resolved: list[str] = []
    pixel_by_stack = np.full(len(uniques), np.nan)
    box_by_stack: dict[str, int] = {}
    for k, raw in enumerate(uniques):
        raw = str(raw)
        candidates = _candidate_paths(raw, datadir=datadir, search_dirs=search_dirs)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            if check_stacks:
                looked = ", ".join(sorted({str(c.parent) for c in candidates}))
                raise InputError(
                    f"{meta} references stack {raw} which was not found (looked in {looked}); "
                    "pass --datadir with the folder that holds the stacks."
                )
            resolved.append(str(candidates[0].absolute()))
            continue
        found = found.absolute()
        resolved.append(str(found))
        if not check_stacks:
            continue
        header = _checked_stack_header(found, raw, max_index[k], meta_name)
        box_by_stack[str(found)] = int(header.nx)
        if header.pixel_size_angstrom and header.pixel_size_angstrom > 0:
            pixel_by_stack[k] = float(header.pixel_size_angstrom)
    return resolved, pixel_by_stack, box_by_stack


def _checked_stack_header(found: Path, raw: str, max_index, meta_name: str):
    """The MRC header of one stack, once its images are known to be square and to include ``max_index``."""
    from cryoscape.io.mrc import read_mrc_header  # another io module; imported when needed

    header = read_mrc_header(found)
    if header.nx != header.ny:
        raise InputError(
            f"{found} holds {header.nx}x{header.ny} images, which are not square; "
            "re-extract the particles in square boxes."
        )
    if max_index >= header.nz:
        raise InputError(
            f"{meta_name} references image {max_index + 1} of {raw} which holds "
            f"{header.nz} images; pass the matching stack or fix {meta_name}."
        )
    return header


def _common_box_size(box_by_stack: dict[str, int], meta: str) -> int | None:
    """The one box size of all opened stacks (None if none was opened); stacks must not differ in it."""
    boxes = sorted(set(box_by_stack.values()))
    if len(boxes) > 1:
        a = next(p for p, b in box_by_stack.items() if b == boxes[0])
        b = next(p for p, b in box_by_stack.items() if b == boxes[-1])
        raise InputError(
            f"{meta} references stacks with different box sizes ({boxes[0]} px in {a}, "
            f"{boxes[-1]} px in {b}); rescale them to one box size first."
        )
    return boxes[0] if boxes else None


def _fill_pixel_size(pixel_size: np.ndarray | None, info: StackInfo) -> np.ndarray:
    """Metadata pixel sizes where known, the stack header's elsewhere."""
    header = info.header_pixel_size_angstrom
    if pixel_size is None:
        return header.copy()
    pixel_size = np.asarray(pixel_size, dtype=np.float64).copy()
    missing = ~(np.isfinite(pixel_size) & (pixel_size > 0))
    pixel_size[missing] = header[missing]
    return pixel_size


# --------------------------------------------------------------------------------------------
# readers for bare stacks and stack lists
# --------------------------------------------------------------------------------------------
def read_bare_stack(path: PathLike) -> ParticleTable:
    """Every image of one ``.mrcs`` / ``.mrc`` stack, with the header's pixel size; no poses or CTF."""
    from cryoscape.io.mrc import read_mrc_header

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass an existing particle stack.")
    header = read_mrc_header(path)
    if header.nx != header.ny:
        raise InputError(
            f"{path} holds {header.nx}x{header.ny} images, which are not square; "
            "re-extract the particles in square boxes."
        )
    n = int(header.nz)
    pixel = float(header.pixel_size_angstrom) if header.pixel_size_angstrom else np.nan
    return ParticleTable(
        image_paths=np.full(n, str(path.absolute()), dtype=object),
        image_indices=np.arange(n, dtype=np.int64),
        box_size=int(header.nx),
        pixel_size_angstrom=np.full(n, pixel if pixel > 0 else np.nan),
        source_path=os.fspath(path),
    )


def read_stack_list(path: PathLike, *, datadir: PathLike | None = None) -> ParticleTable:
    """All images of the stacks listed in a ``.txt`` file, one path a line.

    Relative paths are resolved against ``datadir``, then the list's folder, then the working
    directory.  Blank lines and lines starting with ``#`` are skipped.
    """
    from cryoscape.io.mrc import read_mrc_header

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass an existing stack list.")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a text file; pass a .txt file with one stack path a line.") from None
    stacks = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not stacks:
        raise InputError(f"{path} lists no stacks; write one .mrcs path a line.")
    # one resolution pass for existence and box checks, then count images per stack
    info = resolve_stacks(stacks, np.zeros(len(stacks), dtype=np.int64), metadata_path=path, datadir=datadir)
    counts = np.array([read_mrc_header(p).nz for p in info.image_paths], dtype=np.int64)
    paths = np.repeat(info.image_paths, counts)
    indices = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
    pixel = np.repeat(info.header_pixel_size_angstrom, counts)
    return ParticleTable(
        image_paths=paths,
        image_indices=indices,
        box_size=info.box_size,
        pixel_size_angstrom=pixel,
        source_path=os.fspath(path),
    )


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
def load_particles(
    path: PathLike,
    *,
    datadir: PathLike | None = None,
    poses_path: PathLike | None = None,
    ctf_path: PathLike | None = None,
    pixel_size_angstrom: float | None = None,
    check_stacks: bool = True,
    amplitude_contrast: float = 0.1,
) -> ParticleTable:
    """Read particles from ``.star``, ``.cs``, ``.txt`` (stack list) or ``.mrcs``/``.mrc`` (one stack).

    Parameters
    ----------
    path
        The metadata file or stack.
    datadir
        Folder holding the stacks, tried first for relative stack paths.
    poses_path
        cryoDRGN ``poses.pkl`` whose rotations (and shifts, if stored) replace or supply the poses.
    ctf_path
        cryoDRGN ``ctf.pkl`` whose parameters replace or supply the CTF.  For inputs without a
        pixel size in the metadata (``.txt``, ``.mrcs``) its pixel size is used, rescaled to the
        stacks' box if the images were downsampled.
    pixel_size_angstrom
        Overrides every particle's pixel size.
    check_stacks
        Open every stack header (existence, index range, box size).  Only ``.star`` and ``.cs``
        can be read without it, e.g. to convert metadata on a machine without the images.

    Raises
    ------
    InputError
        Unknown extension, unreadable metadata, missing or too short stacks, or pickles whose
        number of rows differs from the particle count.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputError(f"{path} was not found; pass an existing particle file (.star, .cs, .txt or .mrcs).")
    if suffix == ".star":
        from cryoscape.io.star import read_star

        table = read_star(path, datadir=datadir, check_stacks=check_stacks, amplitude_contrast=amplitude_contrast)
    elif suffix == ".cs":
        from cryoscape.io.cryosparc import read_cs

        table = read_cs(path, datadir=datadir, check_stacks=check_stacks)
    elif suffix == ".txt":
        table = read_stack_list(path, datadir=datadir)
    elif suffix in (".mrcs", ".mrc"):
        table = read_bare_stack(path)
    else:
        raise InputError(
            f"{path} has the unknown extension '{path.suffix}'; pass a .star, .cs, .txt (stack list) "
            "or .mrcs file."
        )

    if poses_path is not None:
        _apply_poses_pkl(table, poses_path)
    if ctf_path is not None:
        _apply_ctf_pkl(table, ctf_path, metadata_has_pixel_size=suffix in (".star", ".cs"))
    if pixel_size_angstrom is not None:
        if not pixel_size_angstrom > 0:
            raise InputError(f"--pixel-size {pixel_size_angstrom} is not positive; pass the pixel size in angstroms.")
        table.pixel_size_angstrom = np.full(len(table), float(pixel_size_angstrom))
    return table


def _apply_poses_pkl(table: ParticleTable, poses_path: PathLike) -> None:
    from cryoscape.io.cryodrgn import read_poses_pkl

    if table.box_size is None:
        raise InputError(
            f"{table.source_path} gives no box size, which {poses_path} needs to convert its shifts; "
            "make the stacks reachable (--datadir) so their headers can be read."
        )
    rotations, shifts = read_poses_pkl(poses_path, box_size=table.box_size)
    if len(rotations) != len(table):
        raise InputError(
            f"{poses_path} holds {len(rotations)} poses but {table.source_path} has {len(table)} "
            f"particles; pass the poses.pkl made for {Path(table.source_path).name}."
        )
    table.rotations = rotations
    if shifts is not None:
        table.shifts_pixel = shifts


def _apply_ctf_pkl(table: ParticleTable, ctf_path: PathLike, *, metadata_has_pixel_size: bool) -> None:
    from cryoscape.io.cryodrgn import read_ctf_pkl

    arr = read_ctf_pkl(ctf_path)
    if len(arr) != len(table):
        raise InputError(
            f"{ctf_path} holds {len(arr)} CTF rows but {table.source_path} has {len(table)} "
            f"particles; pass the ctf.pkl made for {Path(table.source_path).name}."
        )
    table.ctf = CtfParameters.from_cryodrgn_array(arr)
    known = np.isfinite(table.pixel_size_angstrom) & (table.pixel_size_angstrom > 0)
    if not metadata_has_pixel_size or not known.all():
        # ctf.pkl stores the pixel size of the original box D; rescale to the stacks' box
        pixel = arr[:, 1].astype(np.float64)
        if table.box_size is not None:
            pixel = pixel * arr[:, 0] / table.box_size
        if metadata_has_pixel_size:
            table.pixel_size_angstrom[~known] = pixel[~known]
        else:
            table.pixel_size_angstrom = pixel


def load_indices(path: PathLike, *, n_particles: int | None = None) -> np.ndarray:
    """Particle indices (0-based, int64) from ``.pkl`` (cryoDRGN), ``.npy`` or ``.txt`` (whitespace separated).

    Parameters
    ----------
    path
        The index file.
    n_particles
        When given, every index must be in ``[0, n_particles)``.

    Raises
    ------
    InputError
        The file is missing, unreadable, not a 1-D list of integers, or indexes past the end.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass an existing index file (.pkl, .npy or .txt).")
    suffix = path.suffix.lower()
    try:
        if suffix == ".pkl":
            with open(path, "rb") as f:
                values = pickle.load(f)
        elif suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        elif suffix == ".txt":
            text = path.read_text().replace(",", " ").split()
            values = np.array([int(v) for v in text], dtype=np.int64)
        else:
            raise InputError(f"{path} has the unknown extension '{path.suffix}'; pass indices as .pkl, .npy or .txt.")
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user error
        raise InputError(f"{path} could not be read as an index file ({err}); pass a .pkl, .npy or .txt list of integers.") from None
    idx = np.asarray(values)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        if idx.dtype == bool and idx.ndim == 1:
            idx = np.flatnonzero(idx)
        else:
            raise InputError(f"{path} does not hold a 1-D list of integer indices; write one particle index per entry.")
    idx = idx.astype(np.int64)
    if n_particles is not None and idx.size and (idx.min() < 0 or idx.max() >= n_particles):
        bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
        raise InputError(
            f"{path} holds index {bad} but the particle file has {n_particles} particles "
            "(indices are 0-based); pass the index file made for these particles."
        )
    return idx


def select_particles(table: ParticleTable, *, ind: PathLike | None = None, first: int | None = None) -> ParticleTable:
    """The rows of ``table`` chosen by an index file (``--ind``) and then the first ``first`` of those.

    Returns ``table`` itself when neither is given.
    """
    selection = None
    if ind:
        selection = load_indices(ind, n_particles=len(table))
    if first:
        base = np.arange(len(table)) if selection is None else selection
        selection = base[: min(int(first), len(base))]
    return table if selection is None else table.subset(selection)
