"""Central slices of a Fourier volume: extraction (projection) and insertion (backprojection).

Convention (the one written in the README and in geometry/rotations.py): a pose ``R`` means
``image(x, y) = integral V(R^T (x, y, z)) dz``, so by the Fourier slice theorem the 2-D transform
of the image at ``k = (kx, ky)`` is the 3-D transform of the volume at ``R^T (kx, ky, 0)``, i.e.
at ``kx * R[0, :] + ky * R[1, :]``.  Coordinates are ``(x, y, z)`` vectors in *index* units
(frequency times the box size, see fourier/grids.py); the volume array is ``[z, y, x]`` with the
origin at index ``D // 2`` (fourier/fft.py).

Interpolation is trilinear.  A corner is used only when it lies inside the index range that is
symmetric about the origin, ``[2*(D//2) - (D-1), D-1]``: for even boxes this drops the -Nyquist
plane at index 0 (which has no +Nyquist partner), so extraction and insertion both respect
Friedel symmetry.  Corners outside contribute zero.

The values may be complex (Fourier) or real (Hartley, CTF weights); several channels can be
carried at once with a trailing channel axis on the volume: ``(D, D, D, C)``.
"""

from __future__ import annotations

import warnings

import torch

from cryoscape.fourier.fft import fft2_center, fft3_center, ifft2_center
from cryoscape.fourier.grids import grid_2d_index

__all__ = [
    "slice_coordinates",
    "sample_trilinear",
    "scatter_trilinear",
    "ScatterOperator",
    "extract_central_slices",
    "project_volume",
    "prepare_projection_volume",
    "project_prepared",
]


def slice_coordinates(rotations: torch.Tensor, coords_2d: torch.Tensor) -> torch.Tensor:
    """3-D positions ``R^T (x, y, 0)`` of 2-D slice points.

    Parameters
    ----------
    rotations
        ``(..., 3, 3)`` pose matrices.
    coords_2d
        ``(P, 2)`` slice points ``(x, y)`` in index units.

    Returns
    -------
    ``(..., P, 3)`` points ``(x, y, z)`` in index units, in ``rotations``' dtype even under autocast:
    a bfloat16 product would round the positions every decoder encodes to 8 bits of mantissa.
    """
    with torch.autocast(device_type=rotations.device.type, enabled=False):
        return coords_2d.to(rotations.dtype) @ rotations[..., :2, :]


def _axis_corners(coords: torch.Tensor, D: int):
    """Per-axis lower/upper corner indices and weights of trilinear interpolation.

    Returns three ``(index0, index1, weight0, weight1)`` tuples for x, y, z, each tensor shaped
    like ``coords[..., 0]``; a corner outside the valid range gets weight 0 (and a clamped index).
    Looping over the 8 corners with these small arrays is about twice as fast as materialising
    ``(..., P, 8)`` index and weight arrays (memory traffic dominates this inner loop of
    backprojection and training).
    """
    c = D // 2
    lo, hi = 2 * c - (D - 1), D - 1
    pos = coords + c  # array position of each (x, y, z)
    base = torch.floor(pos)
    frac = pos - base
    b0 = base.long()
    axes = []
    for a in range(3):
        i0, f = b0[..., a], frac[..., a]
        i1 = i0 + 1
        w0 = (1 - f) * ((i0 >= lo) & (i0 <= hi))
        w1 = f * ((i1 >= lo) & (i1 <= hi))
        axes.append((i0.clamp(lo, hi), i1.clamp(lo, hi), w0, w1))
    return axes


def _corner_iter(coords: torch.Tensor, D: int):
    """Yield ``(flat_index, weight)`` for each of the 8 trilinear corners, shaped like ``coords[..., 0]``."""
    (x0, x1, wx0, wx1), (y0, y1, wy0, wy1), (z0, z1, wz0, wz1) = _axis_corners(coords, D)
    for iz, wz in ((z0, wz0), (z1, wz1)):
        for iy, wy in ((y0, wy0), (y1, wy1)):
            row = (iz * D + iy) * D
            wzy = wz * wy
            for ix, wx in ((x0, wx0), (x1, wx1)):
                yield row + ix, wzy * wx


def sample_trilinear(volume: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a ``(D, D, D[, C])`` volume at ``(..., P, 3)`` index coordinates.

    Returns ``(..., P[, C])`` with the volume's dtype (real or complex).
    """
    D = volume.shape[0]
    channels = volume.shape[3:]
    table = volume.reshape(D * D * D, *channels)
    out = None
    for flat, w in _corner_iter(coords, D):
        w = w.to(table.real.dtype if table.is_complex() else table.dtype)
        term = table[flat] * (w.unsqueeze(-1) if channels else w)
        out = term if out is None else out + term
    return out


def scatter_trilinear(
    accumulator: torch.Tensor,
    coords: torch.Tensor,
    values: torch.Tensor,
    *,
    offsets: torch.Tensor | None = None,
) -> None:
    """Add ``values`` into ``accumulator`` at ``coords`` with trilinear weights (in place).

    Parameters
    ----------
    accumulator
        Real ``(S, D, D, D, C)`` or ``(D, D, D, C)`` buffer (use ``torch.view_as_real`` for
        complex data).
    coords
        ``(B, P, 3)`` index coordinates.
    values
        ``(B, P, C)`` real values.
    offsets
        Optional ``(B,)`` index of the sub-buffer ``s`` of an ``(S, D, D, D, C)`` accumulator each
        row goes to (e.g. the half-set of each image).
    """
    D, C = accumulator.shape[-2], accumulator.shape[-1]
    table = accumulator.view(-1, C)
    shift = None if offsets is None else (offsets.to(coords.device).long() * D**3).view(-1, *([1] * (coords.dim() - 2)))
    for flat, w in _corner_iter(coords, D):
        if shift is not None:
            flat = flat + shift
        table.index_add_(0, flat.reshape(-1), (values * w.unsqueeze(-1).to(values.dtype)).reshape(-1, C))


class ScatterOperator:
    """:func:`scatter_trilinear` of a fixed set of points as a sparse matrix, for points that are
    scattered again and again with new values (images at fixed poses, one EM iteration after
    another).

    ``matrix`` is ``(U, M)`` CSR: row ``u`` holds the trilinear weights of the ``M`` points on
    voxel ``voxels[u]`` (flat index into ``(S, D, D, D)``), the ``U`` distinct voxels the points
    touch.  The slices of a batch cross near the origin and share most of their voxels, so
    summing each voxel's contributions with one sparse matrix product and writing each voxel once
    beats an ``index_add_`` per corner (README, "Classical refinement", has the measured factor);
    building it costs a sort of the ``8 M`` corners, and it holds an index and a weight per corner.
    """

    def __init__(self, coords: torch.Tensor, D: int, *, offsets: torch.Tensor | None = None):
        """``coords (B, P, 3)`` index coordinates, grid side ``D``; ``offsets (B,)``: the
        sub-grid ``s`` of an ``(S, D, D, D)`` accumulator each row goes to (as in :func:`scatter_trilinear`)."""
        B, P = coords.shape[0], coords.shape[1]
        shift = 0 if offsets is None else (offsets.to(coords.device).long() * D**3).view(B, 1)
        flats, weights = zip(*((flat + shift, w) for flat, w in _corner_iter(coords, D)))
        flat, weight = torch.stack(flats).reshape(-1), torch.stack(weights).reshape(-1).to(torch.float32)
        keep = (weight != 0).nonzero()[:, 0].to(torch.int32)  # a point's 8 corners are distinct voxels
        index = torch.int32 if flat.max() < 2**31 else torch.long  # int32 sorts twice as fast
        order = keep[torch.argsort(flat[keep].to(index))]
        self.voxels, counts = torch.unique_consecutive(flat[order], return_counts=True)
        crow = torch.zeros(len(self.voxels) + 1, dtype=index, device=coords.device)
        crow[1:] = torch.cumsum(counts, 0)
        col = (order % (B * P)).to(index)  # corner-major layout: entry c * B * P + m is corner c of point m
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long stable
            warnings.simplefilter("ignore", UserWarning)
            self.matrix = torch.sparse_csr_tensor(crow, col, weight[order], (len(self.voxels), B * P),
                                                  check_invariants=False)

    @property
    def nbytes(self) -> int:
        """Memory held (indices and weights)."""
        m = self.matrix
        return sum(t.numel() * t.element_size() for t in (m.crow_indices(), m.col_indices(), m.values(), self.voxels))

    def scatter(self, table: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``values (B, P, C)`` (float32) at the points into ``table (S * D^3, C)`` (in place)."""
        product = self.matrix @ values.reshape(-1, values.shape[-1])
        table.index_add_(0, self.voxels, product.to(table.dtype))


def extract_central_slices(
    volume_ft: torch.Tensor, rotations: torch.Tensor, *, coords_2d: torch.Tensor | None = None
) -> torch.Tensor:
    """Central slices of a centred Fourier (or Hartley) volume.

    Parameters
    ----------
    volume_ft
        ``(D, D, D)`` centred transform (fourier/fft.py conventions).
    rotations
        ``(..., 3, 3)`` poses.
    coords_2d
        Optional ``(P, 2)`` subset of slice points (index units); default the full ``D x D`` grid.

    Returns
    -------
    ``(..., D, D)`` slices (or ``(..., P)`` for a subset).
    """
    D = volume_ft.shape[0]
    full = coords_2d is None
    if full:
        coords_2d = grid_2d_index(D, device=volume_ft.device, dtype=rotations.dtype).reshape(-1, 2)
    vals = sample_trilinear(volume_ft, slice_coordinates(rotations, coords_2d))
    return vals.reshape(*vals.shape[:-1], D, D) if full else vals


def prepare_projection_volume(volume: torch.Tensor, *, oversampling: int = 2) -> torch.Tensor:
    """Zero-pad a real-space ``(D, D, D)`` volume by ``oversampling`` and return its centred FT.

    Two things make the slices accurate: padding makes the Fourier grid finer, and the volume is
    first divided by the real-space image of the trilinear kernel, ``sinc^2(x / Dp)`` per axis
    (the "gridding correction"), which trilinear interpolation in Fourier space multiplies back.
    """
    D = volume.shape[-1]
    Dp = oversampling * D
    start = Dp // 2 - D // 2
    x = (torch.arange(D, device=volume.device, dtype=volume.dtype) - D // 2) / Dp
    apod = torch.sinc(x) ** 2
    corrected = volume / (apod[:, None, None] * apod[None, :, None] * apod[None, None, :])
    padded = volume.new_zeros(Dp, Dp, Dp)
    padded[start : start + D, start : start + D, start : start + D] = corrected
    return fft3_center(padded)


def project_prepared(
    padded_ft: torch.Tensor,
    rotations: torch.Tensor,
    *,
    box_size: int,
    return_fourier: bool = False,
) -> torch.Tensor:
    """Projections ``(..., D, D)`` from a volume prepared by :func:`prepare_projection_volume`.

    With ``return_fourier=True`` the centred 2-D FT of each projection on the ``D x D`` grid is
    returned instead (what the image formation model multiplies by the CTF).
    """
    Dp = padded_ft.shape[0]
    D = box_size
    coords_2d = grid_2d_index(Dp, device=padded_ft.device, dtype=rotations.dtype).reshape(-1, 2)
    slices = sample_trilinear(padded_ft, slice_coordinates(rotations, coords_2d))
    slices = slices.reshape(*slices.shape[:-1], Dp, Dp)
    # the padded image's central D x D real-space window is the projection
    images = ifft2_center(slices).real
    start = Dp // 2 - D // 2
    images = images[..., start : start + D, start : start + D].contiguous()
    return fft2_center(images) if return_fourier else images


def project_volume(
    volume: torch.Tensor, rotations: torch.Tensor, *, oversampling: int = 2
) -> torch.Tensor:
    """Real-space projections ``(..., D, D)`` of a real ``(D, D, D)`` volume at the given poses.

    ``image(x, y) = sum_z V(R^T (x, y, z))`` sampled on the pixel grid, computed by the Fourier
    slice theorem on a zero-padded grid.
    """
    prepared = prepare_projection_volume(volume, oversampling=oversampling)
    return project_prepared(prepared, rotations, box_size=volume.shape[-1])
