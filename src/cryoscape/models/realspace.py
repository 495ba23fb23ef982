"""Real-space image formation for decoders that model the density itself (CryoFormer).

Kernels, pure functions on tensors.  Conventions are those of DESIGN.md and fourier/fft.py:
positions in **training pixels** with the origin at index ``D // 2``, arrays ``[z, y, x]``, and
``image(x, y) = integral V(R^T (x, y, z)) dz`` (a world point ``X`` appears at ``(R X)_xy``).

The point set and its cost budget
---------------------------------
Rendering a ``D x D`` image from a density exactly needs about ``D^3`` density queries.  The
renderer instead samples a ``r x r x r`` lattice of spacing ``s = D / r`` training pixels
(``r = render_size <= D``), keeping only the lattice points inside the sphere of radius
``radius_fraction * D / 2`` (the particle's support): about ``(pi / 6) (radius_fraction r)^3``
queries per image (divided by the depth stride, below).  Summing the samples along z (times their
spacing) gives the projection at
``r x r`` pixels of size ``s``; its centred FFT times ``s^2`` is the unnormalised ``D x D`` FFT of
the projection at the frequencies ``|k| < r / 2`` (index units), which is the band this renderer
predicts; the training pixels beyond it are predicted as 0 (their error does not depend on the
model).  ``r = D`` renders every voxel column with no band limit.

Depth stride: the sum along z needs fewer samples than the image plane.  Sampling z every
``depth_stride`` lattice steps (spacing ``s_z``) and summing times ``s_z`` gives the integral plus the
density's transform at ``k_z = m / s_z`` (Poisson summation; ``m != 0``).  At ``s_z = 2 s`` the first
of these lies on the band's edge (``r / 2`` index units), and with a random z offset (jitter) their
phases average to zero: half the points, for aliasing that is harmless where the band reaches past
what the data resolve and costs where it does not (README, "The band at D=64", measures both).
``depth_stride = 1`` (an isotropic lattice) keeps them at twice the band.

Jitter: while training, every image's lattice is displaced by a random offset ``d`` of up to half
a step along each axis (half the z spacing along z), so that the model is queried everywhere and
not only on the lattice; the sampled projection is then ``p(x + d_xy)`` and its transform is
multiplied by ``exp(-2 pi i k . d_xy)`` to put it back (the z offset needs no correction).

Shifts: the training objective undoes each image's shift on the data (a phase ramp,
train/likelihood.py ``centre_values``), which is the in-plane translation ``t`` of querying
``V(R^T x + t)`` applied exactly (band-limited) and differentiably, so the renderer samples the
centred particle.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from cryoscape.fourier.fft import fft2_center

__all__ = ["ColumnPoints", "column_points", "rotate_points", "project_density", "image_values", "render_values"]


class ColumnPoints:
    """The lattice points of one image (image frame, training pixels) and the pixel each falls in.

    ``positions`` ``(M, 3)`` (x, y, z); ``pixel`` ``(M,)`` flat index into the ``r x r`` image
    ``[y, x]``; ``render_size`` ``r``; ``step`` ``s = D / r`` (x and y); ``z_step`` the spacing along z
    (``s`` times the depth stride).
    """

    def __init__(self, positions: torch.Tensor, pixel: torch.Tensor, render_size: int, step: float,
                 z_step: float | None = None):
        self.positions, self.pixel, self.render_size, self.step = positions, pixel, int(render_size), float(step)
        self.z_step = float(step if z_step is None else z_step)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def to(self, device) -> "ColumnPoints":
        return ColumnPoints(self.positions.to(device), self.pixel.to(device), self.render_size, self.step,
                            self.z_step)

    def jitter_scale(self) -> tuple[float, float, float]:
        """Per axis (x, y, z), the width of the lattice offset a training image draws: the spacing where it
        exceeds one training pixel, else 0 (a lattice on the pixels needs none)."""
        xy = self.step if self.step > 1 else 0.0
        return xy, xy, self.z_step if self.z_step > 1 else 0.0


def column_points(box_size: int, render_size: int, *, radius_fraction: float = 1.0, depth_stride: int = 1,
                  device: torch.device | str | None = None) -> ColumnPoints:
    """The ``r x r`` lattice of spacing ``D / r``, with planes every ``depth_stride`` steps along z (module
    docstring), inside the sphere ``|X| <= radius_fraction * D / 2``."""
    D, r, stride = int(box_size), int(render_size), int(depth_stride)
    if not 1 <= r <= D:
        raise ValueError(f"render_size must be between 1 and the box size {D}, got {r}")
    if stride < 1:
        raise ValueError(f"depth_stride must be a positive integer, got {depth_stride}")
    step = D / r
    axis = (torch.arange(r, dtype=torch.float32, device=device) - r // 2) * step
    zz, yy, xx = torch.meshgrid(axis[(r // 2) % stride::stride], axis, axis, indexing="ij")  # z = 0 is a plane
    pos = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    iy, ix = torch.meshgrid(torch.arange(r, device=device), torch.arange(r, device=device), indexing="ij")
    pixel = (iy * r + ix).reshape(1, -1).expand(zz.shape[0], -1).reshape(-1)
    keep = pos.square().sum(-1) <= (radius_fraction * D / 2) ** 2 + 1e-6
    return ColumnPoints(pos[keep], pixel[keep], r, step, step * stride)


def rotate_points(points: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """World positions ``R^T x`` of image-frame points: ``(M, 3)`` or ``(B, M, 3)`` x ``(B, 3, 3)`` -> ``(B, M, 3)``.

    In ``points``' dtype even under autocast: in bfloat16 the positions would be rounded to a quarter
    pixel at 32 px, and the hash grid would leave its compiled CPU loops for the slower PyTorch path.
    """
    with torch.autocast(device_type=points.device.type, enabled=False):
        if points.dim() == 2:
            return torch.einsum("bij,mi->bmj", rotations.to(points.dtype), points)
        return torch.einsum("bij,bmi->bmj", rotations.to(points.dtype), points)


def project_density(density: torch.Tensor, columns: ColumnPoints) -> torch.Tensor:
    """``(B, M)`` densities at the lattice points -> ``(B, r, r)`` projections (sum along z times its spacing)."""
    B, r = density.shape[0], columns.render_size
    image = torch.zeros(B, r * r, dtype=density.dtype, device=density.device)
    image = image.index_add(1, columns.pixel, density)
    return (image * columns.z_step).reshape(B, r, r)


def image_values(projections: torch.Tensor, coords_index: torch.Tensor, *, box_size: int,
                 offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalised ``D x D`` centred FFT of projections rendered at ``r x r``, at pixels ``coords_index``.

    ``projections`` ``(B, r, r)`` of pixel size ``s = D / r``; ``coords_index`` ``(P, 2)`` (kx, ky)
    in index units of the ``D`` grid; ``offsets`` ``(B, 2)`` lattice offsets (x, y) in training
    pixels (jitter, module docstring).  Pixels with ``|k| >= r / 2`` get 0.  Returns ``(B, P)`` complex.
    """
    B, r = projections.shape[0], projections.shape[-1]
    step = box_size / r
    spectrum = fft2_center(projections.float()) * (step * step)
    k = coords_index.to(projections.device)
    inside = k.square().sum(-1) < (r / 2.0) ** 2
    ki = k.round().long() + r // 2
    ki = ki.clamp(0, r - 1)
    values = spectrum[:, ki[:, 1], ki[:, 0]]
    values = torch.where(inside, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if offsets is not None:
        # elementwise, not a matrix product, so that autocast leaves the phase in float32
        angle = (offsets.float()[:, None, :] * k.float()[None]).sum(-1) * (-2.0 * math.pi / box_size)
        values = values * torch.polar(torch.ones_like(angle), angle)
    return values


def render_values(density_fn: Callable[[torch.Tensor], torch.Tensor], rotations: torch.Tensor,
                  columns: ColumnPoints, coords_index: torch.Tensor, *, box_size: int,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Fourier values ``(B, P)`` of the projections of ``density_fn`` (world ``(B, M, 3)`` -> ``(B, M)``).

    ``offsets`` ``(B, 3)``: lattice jitter in the image frame (training pixels), or ``None``.
    """
    points = columns.positions
    if offsets is not None:
        points = points.unsqueeze(0) + offsets.unsqueeze(1).to(points.dtype)
    density = density_fn(rotate_points(points, rotations))
    proj = project_density(density.float(), columns)
    return image_values(proj, coords_index, box_size=box_size, offsets=None if offsets is None else offsets[:, :2])
