"""The decoder's transform on a fine 3-D lattice, and slices of it by trilinear interpolation.

Why a lattice (thesis 5.3.2, "speeding up exhaustive search by interpolation")
-------------------------------------------------------------------------------
A neural decoder costs a small network per frequency, so evaluating it at every pixel of every
candidate slice (4 608 rotations x ~450 pixels at the 15-degree base grid) is the slow part of a
pose search.  Instead the decoder is evaluated once on a cubic lattice of frequencies inside the
search radius, and slices are read from it by trilinear interpolation, the way voxel-based
reconstruction extracts slices.  We interpolate the *model output*, never the image: the model's
transform is smooth (the map it represents is compact and centred in the box), the noisy image's
is not.

Lattice geometry
----------------
Points are ``q / s`` in frequency-index units (``k * D``) for integer ``q`` in ``[-Q, Q]^3``, with
``s`` the oversampling (``2`` by default: twice as fine as the image's Fourier grid, which keeps
the interpolation error well below the noise of the first search rounds; the same reason
projection code pads volumes).  Only points within ``s * radius + 2`` lattice steps of the origin
are evaluated (the corners that trilinear interpolation at ``|k| <= radius`` can touch); the
rest stay 0.  The array is ``[z, y, x]`` with the origin at index ``Q``; slices are read with
:func:`torch.nn.functional.grid_sample` (trilinear, about 10x faster on a CPU than gathering the
8 corners with tensor indexing).

Domains
-------
The lattice always holds complex Fourier values.  A ``fourier`` decoder is evaluated on the half
``qz >= 0`` and the rest filled by ``F(-k) = conj F(k)`` (which such decoders honour exactly); a
``hartley`` decoder is evaluated on the whole ball and converted with
``F(k) = (H(k) + H(-k)) / 2 - i (H(k) - H(-k)) / 2``.  :func:`evaluate_slices` applies the same
conversion to slices evaluated directly, so the search code only ever sees Fourier values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

import torch.nn.functional as F

from cryoscape.fourier.slicing import slice_coordinates
from cryoscape.models.precision import autocast

if TYPE_CHECKING:
    from cryoscape.models.base import VolumeDecoder

__all__ = ["FourierLattice", "evaluate_lattice", "evaluate_slices", "decoder_values"]


@dataclass(frozen=True, eq=False)
class FourierLattice:
    """A decoder's Fourier transform sampled on a lattice (see the module docstring).

    Attributes
    ----------
    values
        ``(n, 2, L, L, L)`` float32: real and imaginary parts of ``n`` volumes (one per latent,
        ``n = 1`` for a homogeneous decoder), ``[z, y, x]``, origin at index ``Q = (L - 1) // 2``
        (the layout :func:`torch.nn.functional.grid_sample` reads).
    oversampling
        Lattice points per frequency-index unit (``s``).
    radius_index
        Largest ``|k|`` (index units) whose trilinear neighbours were all evaluated.
    """

    values: torch.Tensor
    oversampling: float
    radius_index: float

    @property
    def n_volumes(self) -> int:
        """Number of volumes (latents) held."""
        return int(self.values.shape[0])

    @property
    def complex_values(self) -> torch.Tensor:
        """``(n, L, L, L)`` complex64 view of the values (a copy)."""
        return torch.complex(self.values[:, 0], self.values[:, 1])

    def _grid_sample(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary parts at ``(n, ..., 3)`` positions already in grid_sample's [-1, 1] units."""
        n = grid.shape[0]
        if n != self.n_volumes:
            raise ValueError(f"coords has {n} rows for a lattice of {self.n_volumes} volumes")
        shape = grid.shape[1:-1]
        out = F.grid_sample(self.values, grid.reshape(n, 1, 1, -1, 3), mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        return out[:, 0].reshape(n, *shape), out[:, 1].reshape(n, *shape)

    @property
    def _index_to_grid(self) -> float:
        # align_corners=True maps -1..1 onto array positions 0..L-1, so the origin (L-1)/2 is 0
        return self.oversampling * 2.0 / (self.values.shape[-1] - 1)

    def sample_parts(self, coords_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary parts at frequencies ``(n, ..., 3)`` (index units), two ``(n, ...)`` float32.

        Row ``i`` is read from volume ``i`` (``n`` = :attr:`n_volumes`); separate parts let the
        caller work in real arithmetic without copies.
        """
        return self._grid_sample(coords_index.to(torch.float32) * self._index_to_grid)

    def sample(self, coords_index: torch.Tensor) -> torch.Tensor:
        """Trilinear values at frequencies ``(n, ..., 3)`` (index units): ``(n, ...)`` complex64."""
        re, im = self.sample_parts(coords_index)
        return torch.complex(re, im)

    def slice_parts(self, rotations: torch.Tensor, coords_2d_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary parts of central slices: ``(..., 3, 3)`` x ``(P, 2)`` -> two ``(..., P)``.

        For a lattice of ``n > 1`` volumes ``rotations`` is ``(n, ..., 3, 3)``: volume ``i`` is
        read for the rotations ``rotations[i]``.
        """
        # fold the lattice scale into the rotation rows: one pass over the slice points
        rows = rotations[..., :2, :].to(torch.float32) * self._index_to_grid
        grid = coords_2d_index.to(device=rows.device, dtype=torch.float32) @ rows
        if self.n_volumes == 1:
            re, im = self._grid_sample(grid.unsqueeze(0))
            return re[0], im[0]
        return self._grid_sample(grid)

    def sample_slices(self, rotations: torch.Tensor, coords_2d_index: torch.Tensor) -> torch.Tensor:
        """Central slices ``V(R^T (kx, ky, 0))`` as complex64: see :meth:`slice_parts`."""
        re, im = self.slice_parts(rotations, coords_2d_index)
        return torch.complex(re, im)


def decoder_values(decoder: VolumeDecoder, coords_cycles: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """Complex Fourier values of any decoder at ``(B, P, 3)`` frequencies (cycles per pixel).

    A ``hartley`` decoder is evaluated at ``k`` and ``-k`` (module docstring); a ``fourier`` one
    is returned as it is.
    """
    if decoder.domain == "hartley":
        both = decoder(torch.cat([coords_cycles, -coords_cycles], dim=1), z).float()
        h, hm = both.chunk(2, dim=1)
        return torch.complex(0.5 * (h + hm), -0.5 * (h - hm))
    out = decoder(coords_cycles, z)
    return out.to(torch.complex64) if out.is_complex() else out.to(torch.complex64)


def _decoder_device(decoder: VolumeDecoder) -> torch.device:
    for p in decoder.parameters():
        return p.device
    for b in decoder.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_lattice(
    decoder: VolumeDecoder,
    *,
    radius_index: float,
    oversampling: float = 2.0,
    z: torch.Tensor | None = None,
    chunk_points: int = 2**17,
    amp: bool = False,
) -> FourierLattice:
    """Evaluate ``decoder`` on the lattice that covers frequencies ``|k| <= radius_index``.

    Parameters
    ----------
    decoder
        A :class:`cryoscape.models.base.VolumeDecoder` (``decoder(coords, z)`` in cycles per
        pixel of its ``box_size``; ``domain`` "fourier" or "hartley").
    radius_index
        Search radius in frequency-index units (``k * D``; ``D / 2`` is Nyquist).
    oversampling
        Lattice points per index unit (``s``; 2 by default).
    z
        ``None`` (homogeneous decoder), or ``(n, zdim)`` latents: one lattice per row, returned
        as a batched lattice.
    chunk_points
        Points per decoder call (bounds memory).
    amp
        Evaluate the decoder under bfloat16 autocast (GPUs, CPUs with bfloat16 instructions).

    Returns
    -------
    :class:`FourierLattice` on the decoder's device.
    """
    s = float(oversampling)
    if not s > 0:
        raise ValueError(f"oversampling must be positive, got {oversampling}")
    D = int(decoder.box_size)
    device = _decoder_device(decoder)
    reach = s * float(radius_index) + 2.0  # lattice steps touched by interpolation at |k| <= radius
    Q = int(math.ceil(reach))
    L = 2 * Q + 1
    q = torch.arange(-Q, Q + 1, device=device, dtype=torch.float32)
    hartley = decoder.domain == "hartley"
    zs = q if hartley else q[Q:]  # fourier: the half qz >= 0, the rest by symmetry
    gz, gy, gx = torch.meshgrid(zs, q, q, indexing="ij")
    inside = (gx.square() + gy.square() + gz.square()) <= reach * reach
    points = torch.stack([gx[inside], gy[inside], gz[inside]], dim=-1) / (s * D)  # cycles per pixel
    flat_index = inside.reshape(-1).nonzero().squeeze(-1)
    n_lat = 1 if z is None else int(z.shape[0])
    zz = None if z is None else z.to(device)
    per_call = max(1, int(chunk_points) // max(1, n_lat))
    half = torch.zeros((n_lat, zs.numel() * L * L), dtype=torch.complex64 if not hartley else torch.float32,
                       device=device)
    with autocast(device, amp):
        for start in range(0, points.shape[0], per_call):
            pts = points[start : start + per_call]
            batch = pts.unsqueeze(0).expand(n_lat, -1, -1) if n_lat > 1 else pts.unsqueeze(0)
            out = decoder(batch, zz)
            out = out.to(torch.complex64) if out.is_complex() else out.float()
            half[:, flat_index[start : start + per_call]] = out.to(half.dtype)
    half = half.reshape(n_lat, zs.numel(), L, L)
    if hartley:
        flipped = half.flip((1, 2, 3))
        values = torch.complex(0.5 * (half + flipped), -0.5 * (half - flipped))
    else:
        values = torch.empty((n_lat, L, L, L), dtype=torch.complex64, device=device)
        values[:, Q:] = half
        # index i mirrors to 2Q - i on every axis: F(-k) = conj F(k) fills qz < 0
        values[:, :Q] = half[:, 1:].flip((1, 2, 3)).conj()
    stacked = torch.stack([values.real, values.imag], dim=1).contiguous()  # (n, 2, L, L, L)
    return FourierLattice(values=stacked, oversampling=s, radius_index=float(radius_index))


@torch.no_grad()
def evaluate_slices(
    decoder: VolumeDecoder,
    rotations: torch.Tensor,
    coords_2d_index: torch.Tensor,
    *,
    z: torch.Tensor | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """Central slices evaluated directly: ``(B, C, 3, 3)`` rotations x ``(P, 2)`` pixels -> ``(B, C, P)``.

    ``z`` is ``(B, zdim)`` (one latent per row of ``rotations``) or ``None``.  Values are complex
    Fourier coefficients whatever the decoder's domain.
    """
    B, C = rotations.shape[:2]
    D = int(decoder.box_size)
    coords = slice_coordinates(rotations, coords_2d_index.to(rotations.dtype)) / D  # (B, C, P, 3)
    P = coords.shape[-2]
    with autocast(rotations.device, amp):
        out = decoder_values(decoder, coords.reshape(B, C * P, 3), z)
    return out.to(torch.complex64).reshape(B, C, P)
