"""Ground-truth density maps: Gaussian atoms on a grid, atomic models (PDB/mmCIF) and MRC maps.

Atom convention
---------------
Each atom ``j`` at ``X_j`` (angstroms, ``(x, y, z)``) with weight ``w_j`` contributes an isotropic
3-D Gaussian of standard deviation ``sigma = 0.225 * resolution_angstrom``, the width that UCSF
Chimera's ``molmap`` uses by default (``sigmaFactor = 1 / (pi * sqrt(2)) ~= 0.225``).  The map
is sampled at voxel centres and normalised so that a voxel holds *weight per voxel*::

    V[z, y, x] = sum_j w_j / ((2 pi)^(3/2) s^3) * exp(-|p - P_j|^2 / (2 s^2))

with ``s = sigma / pixel_size`` and ``p``, ``P_j`` in pixels.  The sum of all voxels is then
``sum_j w_j`` (for ``s`` above ~0.7 pixel; sharper Gaussians are under-sampled and their sum
oscillates with the sub-voxel position).  Coordinates are relative to the box centre, the voxel
at index ``D // 2`` (fourier/fft.py); array order is ``[z, y, x]``.

Each Gaussian is separable, ``g_j = gz_j (x) gy_j (x) gx_j``.  Narrow atoms are summed over a
window of at least +-5 sigma around each atom (the mass beyond is < 2e-6); wide ones over the whole grid as
one matrix product per chunk of atoms.  10^4 atoms at ``D = 128`` take well under a second.
Atoms are not wrapped: mass that falls outside the box is lost.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from cryoscape.errors import InputError

__all__ = [
    "GAUSSIAN_SIGMA_PER_RESOLUTION",
    "render_gaussian_atoms",
    "read_atomic_model",
    "volume_from_atomic_model",
    "atomic_model_centroid",
    "volume_from_map",
    "is_atomic_model_path",
    "is_map_path",
]

GAUSSIAN_SIGMA_PER_RESOLUTION = 0.225
"""``sigma = 0.225 * resolution`` (molmap's default sigma factor, ``1 / (pi sqrt 2)``)."""

_ATOMIC_MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".cif.gz", ".ent.gz")
_MAP_SUFFIXES = (".mrc", ".map", ".mrcs", ".ccp4")

PathLike = str | os.PathLike


def is_atomic_model_path(path: PathLike) -> bool:
    """True for ``.pdb``, ``.ent``, ``.cif``, ``.mmcif`` (optionally gzipped)."""
    name = os.fspath(path).lower()
    return name.endswith(_ATOMIC_MODEL_SUFFIXES)


def is_map_path(path: PathLike) -> bool:
    """True for ``.mrc``, ``.map``, ``.mrcs``, ``.ccp4``."""
    return os.fspath(path).lower().endswith(_MAP_SUFFIXES)


def render_gaussian_atoms(
    coords_angstrom: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    box_size: int,
    pixel_size_angstrom: float,
    resolution_angstrom: float,
    center: bool = False,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Render Gaussian atoms into a ``(D, D, D)`` float32 map (see the module docstring).

    Parameters
    ----------
    coords_angstrom
        ``(n, 3)`` atom positions ``(x, y, z)`` in angstroms relative to the box centre.
    weights
        ``(n,)`` atom weights (e.g. atomic numbers); all ones when None.
    box_size
        ``D``.
    pixel_size_angstrom
        Voxel size.
    resolution_angstrom
        Sets the Gaussian width, ``sigma = 0.225 * resolution_angstrom``.
    center
        Subtract the weighted centroid first, so the molecule's centre of mass sits at ``D // 2``.
    chunk_size
        Atoms per matrix product (memory ``chunk_size * D^2`` floats); chosen automatically.

    Returns
    -------
    np.ndarray
        ``(D, D, D)`` float32, ``[z, y, x]``; the voxel sum equals ``sum(weights)`` when every atom
        lies well inside the box.
    """
    coords = np.asarray(coords_angstrom, dtype=np.float64).reshape(-1, 3)
    n = len(coords)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != n:
        raise ValueError(f"{n} atoms but {len(w)} weights")
    if not (pixel_size_angstrom > 0 and resolution_angstrom > 0):
        raise ValueError("pixel_size_angstrom and resolution_angstrom must be positive")
    D = int(box_size)
    if center and n:
        coords = coords - (w[:, None] * coords).sum(0) / w.sum()
    sigma = GAUSSIAN_SIGMA_PER_RESOLUTION * resolution_angstrom / pixel_size_angstrom  # pixels
    pos = torch.from_numpy(coords / pixel_size_angstrom + D // 2)  # (n, 3) array positions (x, y, z)
    wt = torch.from_numpy(w)
    # Local windows of half-width >= 5 sigma (the mass beyond is < 2e-6) when they are small
    # against the box; otherwise the exact dense separable sum.
    half = max(1, int(math.ceil(5.0 * sigma + 0.5)))  # the window is centred on the nearest voxel
    K = 2 * half + 1
    if K < D and K**3 * 4 < D**3:
        volume = _render_local(pos, wt, sigma, D, half, chunk_size)
    else:
        volume = _render_dense(pos, wt, sigma, D, chunk_size)
    return volume.reshape(D, D, D).to(torch.float32).numpy()


def _gaussian_1d(offsets: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-0.5 * (offsets / sigma) ** 2) / (math.sqrt(2.0 * math.pi) * sigma)


def _render_dense(pos: torch.Tensor, wt: torch.Tensor, sigma: float, D: int, chunk_size: int | None) -> torch.Tensor:
    """Exact sum over the whole grid: per chunk, ``(D*D, c) @ (c, D)``."""
    grid = torch.arange(D, dtype=torch.float64)
    out = torch.zeros(D * D, D, dtype=torch.float64)
    chunk = chunk_size or max(1, int(4e6 // (D * D)))
    for start in range(0, len(pos), chunk):
        p = pos[start : start + chunk]
        g = _gaussian_1d(grid[None, None, :] - p[:, :, None], sigma)  # (c, 3, D)
        gx, gy, gz = g[:, 0], g[:, 1], g[:, 2]
        gzy = (wt[start : start + chunk, None, None] * gz[:, :, None] * gy[:, None, :]).reshape(len(p), D * D)
        out += (gzy.T.to(torch.float32) @ gx.to(torch.float32)).to(torch.float64)
    return out


def _render_local(
    pos: torch.Tensor, wt: torch.Tensor, sigma: float, D: int, half: int, chunk_size: int | None
) -> torch.Tensor:
    """Sum over a ``K^3`` window around each atom (``K = 2 * half + 1``), scattered with index_add."""
    K = 2 * half + 1
    out = torch.zeros(D * D * D, dtype=torch.float64)
    steps = torch.arange(-half, half + 1)
    chunk = chunk_size or max(1, int(4e6 // K**3))
    for start in range(0, len(pos), chunk):
        p = pos[start : start + chunk]
        idx = torch.round(p).long()[:, :, None] + steps  # (c, 3, K) voxel indices per axis
        g = _gaussian_1d(idx.to(torch.float64) - p[:, :, None], sigma)
        g = g * ((idx >= 0) & (idx < D))  # voxels outside the box are dropped
        idx = idx.clamp(0, D - 1)
        gx, gy, gz = g[:, 0], g[:, 1], g[:, 2]
        val = wt[start : start + chunk, None, None, None] * gz[:, :, None, None] * gy[:, None, :, None] * gx[:, None, None, :]
        flat = (idx[:, 2, :, None, None] * D + idx[:, 1, None, :, None]) * D + idx[:, 0, None, None, :]
        out.index_add_(0, flat.reshape(-1), val.reshape(-1))
    return out


def read_atomic_model(path: PathLike, *, weighting: str = "atomic_number") -> tuple[np.ndarray, np.ndarray]:
    """Atom coordinates and weights of the first model in a PDB or mmCIF file (via gemmi).

    Hydrogens (and deuteriums) are skipped.  Each atom is weighted by its atomic number (the
    number of electrons of the neutral atom) times its occupancy, or by its occupancy alone with
    ``weighting="uniform"``.

    Returns
    -------
    coords_angstrom : (n, 3) float64, ``(x, y, z)`` in the file's frame
    weights : (n,) float64

    Raises
    ------
    InputError
        Missing or unreadable file, unknown weighting, or no heavy atoms.
    """
    import gemmi

    path = Path(path)
    if weighting not in ("atomic_number", "uniform"):
        raise InputError(f"unknown atom weighting {weighting!r}; use 'atomic_number' or 'uniform'.")
    if not path.is_file():
        raise InputError(f"{path} was not found; pass an existing .pdb or .cif atomic model.", path=path)
    try:
        structure = gemmi.read_structure(str(path))
    except Exception as err:  # noqa: BLE001 - gemmi raises RuntimeError/ValueError/IOError
        raise InputError(
            f"{path} could not be read as an atomic model ({str(err).strip() or type(err).__name__}); "
            "pass a valid PDB or mmCIF file.",
            path=path,
        ) from None
    if len(structure) == 0:
        raise InputError(f"{path} holds no model; pass a PDB or mmCIF file with atoms.", path=path)
    coords, weights = [], []
    for chain in structure[0]:
        for residue in chain:
            for atom in residue:
                if atom.element.name in ("H", "D"):
                    continue
                p = atom.pos
                coords.append((p.x, p.y, p.z))
                z = atom.element.atomic_number if weighting == "atomic_number" else 1.0
                weights.append(z * atom.occ)
    if not coords:
        raise InputError(f"{path} holds no heavy atoms; pass an atomic model with coordinates.", path=path)
    return np.asarray(coords, dtype=np.float64), np.asarray(weights, dtype=np.float64)


def volume_from_atomic_model(
    path: PathLike,
    *,
    box_size: int,
    pixel_size_angstrom: float,
    resolution_angstrom: float,
    center: bool | np.ndarray = True,
    weighting: str = "atomic_number",
) -> np.ndarray:
    """Render an atomic model as Gaussian atoms (see :func:`render_gaussian_atoms`).

    Parameters
    ----------
    path
        ``.pdb`` / ``.cif`` file.
    box_size, pixel_size_angstrom, resolution_angstrom
        As in :func:`render_gaussian_atoms`.
    center
        ``True``: put the model's weighted centroid at the box centre; ``False``: keep the file's
        origin at the box centre; an ``(3,)`` array: subtract that point (angstroms), e.g. the
        centroid of the first of several conformations, so that they stay superposed.
    weighting
        ``"atomic_number"`` or ``"uniform"`` (see :func:`read_atomic_model`).

    Returns
    -------
    np.ndarray
        ``(D, D, D)`` float32 map.
    """
    coords, weights = read_atomic_model(path, weighting=weighting)
    if isinstance(center, np.ndarray) or (not isinstance(center, bool) and center is not None):
        coords = coords - np.asarray(center, dtype=np.float64).reshape(1, 3)
        center = False
    return render_gaussian_atoms(
        coords,
        weights,
        box_size=box_size,
        pixel_size_angstrom=pixel_size_angstrom,
        resolution_angstrom=resolution_angstrom,
        center=bool(center),
    )


def atomic_model_centroid(path: PathLike, *, weighting: str = "atomic_number") -> np.ndarray:
    """Weighted centroid ``(x, y, z)`` in angstroms of an atomic model."""
    coords, weights = read_atomic_model(path, weighting=weighting)
    return (weights[:, None] * coords).sum(0) / weights.sum()


def _crop_or_pad_real(volume: np.ndarray, D: int) -> np.ndarray:
    """Cut or zero-pad a cubic volume to ``D`` keeping the voxel at index ``D_old // 2`` central."""
    D_old = volume.shape[0]
    out = np.zeros((D, D, D), dtype=np.float32)
    # positions relative to the centre that exist in both boxes
    lo = max(-(D_old // 2), -(D // 2))
    hi = min(D_old - D_old // 2, D - D // 2)
    src = slice(D_old // 2 + lo, D_old // 2 + hi)
    dst = slice(D // 2 + lo, D // 2 + hi)
    out[dst, dst, dst] = volume[src, src, src]
    return out


def volume_from_map(
    path: PathLike,
    *,
    box_size: int | None = None,
    pixel_size_angstrom: float | None = None,
) -> tuple[np.ndarray, float]:
    """Read a cubic MRC map, resampled to a requested pixel size and box if asked.

    The pixel size is changed by Fourier cropping or zero padding (fourier/resample.py), which
    keeps voxel values; the box is then cut or zero-padded in real space about its centre
    (index ``D // 2``).  A pixel-size ratio that is not a ratio of whole boxes is met by first
    zero-padding the map by a few voxels so that it is; if no padding up to 64 voxels works, the
    nearest whole box is used and the pixel size actually reached is returned.

    Parameters
    ----------
    path
        ``.mrc`` / ``.map`` file holding one cubic volume.
    box_size
        Output box ``D``; the map's own box (after resampling) when None.
    pixel_size_angstrom
        Output voxel size; the map's own when None (or when the header has none).

    Returns
    -------
    volume : (D, D, D) float32
    pixel_size_angstrom : float
        The voxel size of the returned map (0.0 if neither the header nor the caller gives one).

    Raises
    ------
    InputError
        Missing or non-MRC file, or a non-cubic map.  (A map whose header has no pixel size takes
        ``pixel_size_angstrom`` as its own, without resampling.)
    """
    from cryoscape.fourier.resample import downsample_volume, upsample_volume
    from cryoscape.io.mrc import read_mrc

    path = Path(path)
    data, pixel = read_mrc(path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(
            f"{path} holds an array of shape {tuple(data.shape)}, not a cubic volume; "
            "pass a cubic 3-D map (resize it with a map tool first).",
            path=path,
        )
    volume = np.asarray(data, dtype=np.float32)
    pixel = float(pixel)
    if pixel_size_angstrom is not None and pixel > 0 and not math.isclose(pixel, pixel_size_angstrom, rel_tol=1e-6):
        ratio = pixel / float(pixel_size_angstrom)  # new box = old box * ratio
        D_old = volume.shape[0]
        pad = 0
        for extra in range(0, 65):
            if abs((D_old + extra) * ratio - round((D_old + extra) * ratio)) < 1e-3 * max(1.0, ratio):
                pad = extra
                break
        else:
            pad = 0
        if pad:
            volume = _crop_or_pad_real(volume, D_old + pad)
        D_src = volume.shape[0]
        D_new = max(1, int(round(D_src * ratio)))
        tensor = torch.from_numpy(volume)
        resampled = downsample_volume(tensor, D_new) if D_new < D_src else upsample_volume(tensor, D_new)
        volume = resampled.numpy().astype(np.float32)
        pixel = pixel * D_src / D_new
    elif pixel_size_angstrom is not None and not pixel > 0:
        pixel = float(pixel_size_angstrom)  # header has none: take the caller's value as the map's
    if box_size is not None and volume.shape[0] != box_size:
        volume = _crop_or_pad_real(volume, int(box_size))
    return volume, pixel
