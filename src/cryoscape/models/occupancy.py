"""An occupancy grid: which cells of the box hold density, so that a real-space decoder skips the rest.

A molecule fills a small part of its box (a cryo-EM box is typically 1.5-2x the particle's diameter;
the built-in hinge's share is in the README), yet a real-space decoder
(CryoFormer) queries its network at every lattice point of the sphere.  As in Instant-NGP (Mueller et
al. 2022), a coarse grid of ``resolution^3`` cells over the box records, per cell, a decaying maximum of
the density the model has at random points in it: ``level = max(decay * level, density)``, refreshed
from the training batches' latents, so that over many refreshes it holds the union of the conformations
seen.  A cell is occupied while its level, averaged over the cell and its neighbours, is above
``threshold`` of the way from the lowest such average (the background: a noisy map's, or the
near-uniform density a model starts from, is far from 0) to the highest, or lies next to such a cell
(``dilation`` cells); points in the other cells are not queried and have density 0.  (The average keeps
a noisy map's isolated maxima from occupying the box, and counting from the background its noise floor:
README, "Choosing a decoder: CryoFormer", has the fractions measured.)

Until its first refresh, and while the model's map has no shape, the grid holds its *prior*: every cell,
or the cells a consensus map occupies (:meth:`OccupancyGrid.set_prior`, from the backprojection of the
data with their poses: CryoFormer's warm start), by the same rule dilated one cell further (the
consensus averages the conformations and blurs what moves).  With ``keep_prior`` (the default) the
prior's cells stay occupied after that too: a part of the molecule present in a minority of the particles
is weak in the model's early map (before its latent is in use) and would be pruned, and a pruned cell gets
no gradient, so the model could never learn it (README, "Choosing a decoder: CryoFormer", has the measured
case).  Beside a kept prior, the model's own cells are counted from the median cell's level instead of the
lowest: the prior holds the molecule, a cell outside it joins for density that stands above the
background's typical level, and the noise of a low-SNR map (above the lowest cell, not above the median)
does not widen the grid.  The decoder refreshes the grid only after a warm-up, when its map has a shape.
A pruned cell is still evaluated at every refresh, so it comes back if the network's density there grows
(through shared parameters) above the threshold.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["OccupancyGrid"]


class OccupancyGrid(nn.Module):
    """``resolution^3`` cells over the box ``[-D/2, D/2)^3`` (training pixels, origin at the centre).

    Buffers (saved with the model): ``level`` ``(r, r, r)`` ``[z, y, x]`` the decaying maximum density
    per cell (``inf``: never evaluated), ``occupied`` ``(r, r, r)`` bool, ``prior`` ``(r, r, r)`` bool the
    cells occupied while the model's map has no shape (all, unless :meth:`set_prior` was called) and, with
    ``keep_prior``, always.
    """

    def __init__(self, box_size: int, *, resolution: int = 16, threshold: float = 0.2, decay: float = 0.95,
                 dilation: int = 1, keep_prior: bool = True):
        super().__init__()
        if resolution < 1 or not 0.0 <= threshold < 1.0 or not 0.0 < decay <= 1.0 or dilation < 0:
            raise ValueError(f"occupancy grid: need resolution >= 1, 0 <= threshold < 1, 0 < decay <= 1 and "
                             f"dilation >= 0, got {resolution}, {threshold}, {decay}, {dilation}")
        self.box_size, self.resolution = int(box_size), int(resolution)
        self.threshold, self.decay, self.dilation = float(threshold), float(decay), int(dilation)
        self.keep_prior = bool(keep_prior)
        r = self.resolution
        self.register_buffer("level", torch.full((r, r, r), float("inf")))
        self.register_buffer("occupied", torch.ones(r, r, r, dtype=torch.bool))
        self.register_buffer("prior", torch.ones(r, r, r, dtype=torch.bool))

    @property
    def refreshed(self) -> bool:
        """Whether the grid has been refreshed at least once (before that it holds its prior)."""
        return not bool(torch.isinf(self.level).all())

    @property
    def prunes(self) -> bool:
        """Whether any cell is empty (else the decoder queries every point)."""
        return not bool(self.occupied.all())

    @torch.no_grad()
    def set_prior(self, levels: torch.Tensor) -> None:
        """Take the cells a consensus map occupies as the prior: ``levels`` ``(r, r, r)`` its maximum per
        cell (:func:`cryoscape.models.consensus.cell_maxima`), by the rule of :meth:`_cells` dilated
        ``dilation + 1`` cells; every cell if the map has no shape.  Before the first refresh the grid
        holds the prior."""
        cells = self._cells(levels.to(self.level.device).float(), self.dilation + 1)
        self.prior.copy_(torch.ones_like(self.prior) if cells is None else cells)
        if not self.refreshed:
            self.occupied.copy_(self.prior)

    def cells(self, world: torch.Tensor) -> torch.Tensor:
        """Flat cell index ``x + r (y + r z)`` of world points ``(..., 3)`` (x, y, z; clamped to the box)."""
        r = self.resolution
        idx = ((world.detach() / self.box_size + 0.5) * r).floor().clamp(0, r - 1).long()
        return idx[..., 0] + r * (idx[..., 1] + r * idx[..., 2])

    def contains(self, world: torch.Tensor) -> torch.Tensor:
        """Bool ``(...)``: whether each world point ``(..., 3)`` lies in an occupied cell."""
        return self.occupied.reshape(-1)[self.cells(world)]

    def sample_points(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One uniformly random world point in every cell, ``(r^3, 3)`` in flat cell order."""
        r, device = self.resolution, self.level.device
        axis = torch.arange(r, device=device, dtype=torch.float32)
        zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
        corner = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
        jitter = torch.rand(corner.shape, generator=generator, device="cpu").to(device)
        return ((corner + jitter) / r - 0.5) * self.box_size

    @torch.no_grad()
    def refresh(self, density_fn: Callable[[torch.Tensor], torch.Tensor],
                generator: torch.Generator | None = None) -> None:
        """Evaluate ``density_fn`` (world ``(1, r^3, 3)`` -> densities ``(B, r^3)``, e.g. one row per latent)
        at a random point of every cell and update ``level`` and ``occupied``."""
        points = self.sample_points(generator)
        values = density_fn(points.unsqueeze(0)).float().amax(0).reshape(self.level.shape)
        fresh = torch.isinf(self.level)
        self.level.copy_(torch.where(fresh, values, torch.maximum(self.level * self.decay, values)))
        kept = self.keep_prior and not bool(self.prior.all())
        # beside a kept prior, counted from the median cell: the noise of a low-SNR map stands above the lowest
        # cell's level but not above the background's typical one (README, "Occupancy grid")
        cells = self._cells(self.level, self.dilation, floor_quantile=0.5 if kept else 0.0)
        if cells is None:
            cells = self.prior
        elif kept:
            cells = cells | self.prior
        self.occupied.copy_(cells)

    def _cells(self, level: torch.Tensor, dilation: int, floor_quantile: float = 0.0) -> torch.Tensor | None:
        """Cells whose ``level``, averaged with their neighbours' (an isolated noisy maximum does not keep a
        cell), is above ``threshold`` of the way from the background (the ``floor_quantile`` of those
        averages: 0, the lowest) to the highest, dilated by ``dilation`` cells; ``None`` while the background
        is above half the highest (the map has no shape yet)."""
        smooth = nn.functional.avg_pool3d(level[None, None], 3, stride=1, padding=1,
                                          count_include_pad=False)[0, 0]
        top = float(smooth.max())
        floor = float(smooth.min() if floor_quantile <= 0 else torch.quantile(smooth.reshape(-1), floor_quantile))
        if not top > 0 or floor > 0.5 * top:
            return None
        occupied = smooth - floor > self.threshold * (top - floor)
        if dilation > 0:
            k = 2 * dilation + 1
            occupied = nn.functional.max_pool3d(occupied[None, None].float(), k, stride=1, padding=dilation)[0, 0] > 0
        return occupied
