"""CryoFormer: a real-space density from a hash-grid feature volume and a query transformer (seed 002).

Model (notes/cryoformer.md; names are the constructor's options)
----------------------------------------------------------------
* **Spatial features**: a multi-resolution hash grid (:class:`~cryoscape.models.hash_grid.HashGrid`,
  ``n_levels`` x ``features_per_level``, table ``2^log2_table_size``, ``base_resolution`` up to
  one cell per training pixel) and a 1-layer MLP of width ``spatial_width``, queried at the world
  point ``X`` (training pixels, origin at the box centre) mapped to ``X / D + 1/2``.
* **Deformation feature**: the latent ``z`` of the engine's image encoder (the VAE, so ``analyze``
  and ``volumes`` work as for every decoder) is mapped by an MLP to ``n_queries`` tokens of width
  ``query_dim`` (the paper's F_D, N x C).  A homogeneous decoder (``zdim = 0``) learns the tokens.
* **Deformation transformer**: ``n_queries`` learnable queries go through ``n_blocks`` blocks of
  [self-attention over the queries, cross-attention with the tokens, FFN] (pre-norm, ``n_heads``
  heads).  These run **once per image**.
* **Per point**: the spatial feature, projected to ``query_dim``, attends over the image's queries
  (one head, so each point has one weight per query: the attention maps of
  :meth:`CryoFormer.attention_volumes`), and an FFN gives a density, made non-negative by a
  softplus.  This is the only part that runs per point.

Latent paths (options; README "Choosing a decoder: CryoFormer" has what each did on the hinge)
--------------------------------------------------------------------------------------------
* ``deformation`` (on by default; only with a latent, in real space): an MLP of ``(x, z)`` displaces
  every query point before the hash-grid lookup (:class:`PointDeformation`; its last layer starts at
  ``deformation_init_scale``, 0: the undeformed map).  This is the path through which the decoder uses
  its latent: the attention paths alone left a latent unused even when it came ordered from another
  decoder (``train --init-encoder RUN``, :mod:`cryoscape.train.teacher`);
* ``latent_to_points`` / ``latent_to_spatial``: ``z`` is added to the hidden layer of every point's
  FFN / spatial MLP (concatenated to their inputs, as the neural field's first layer takes ``(x, z)``);
* ``grid_lr_scale``: the hash tables train at this fraction of the learning rate;
* ``latent_warmup_steps``: ``z`` is faded in over the first optimiser steps (the mean fits first);
* ``adam_eps``: Adam's epsilon (:meth:`CryoFormer.adam_eps`);
* ``occupancy`` (on by default, real space): an occupancy grid of ``occupancy_resolution^3`` cells (by
  default one per rendered lattice step and none finer than 2 training pixels: 32^3 at D=64)
  (:mod:`cryoscape.models.occupancy`, threshold ``occupancy_threshold``), refreshed every
  ``occupancy_every`` training steps after ``occupancy_warmup_steps``; the network is queried only in
  its occupied cells (the density is 0 in the others, in training and in the maps);
* ``occupancy_prior`` (on by default, with the grid): before the first epoch of a run with poses, the grid's
  first cells come from the consensus map, the low-pass backprojection of the data
  (:meth:`CryoFormer.warm_start`, :mod:`cryoscape.models.consensus`), so that the steps before the model's
  own map has a shape query the molecule's cells, not the whole sphere; with ``occupancy_keep_prior`` (on
  by default) those cells stay occupied for the whole run (a minority state's part, weak in the early
  map, is not pruned before the latent can learn it);
* ``coarse_start`` (off by default): training renders half the lattice while the occupancy grid prunes
  nothing, i.e. until it first prunes; so only without a prior (:meth:`CryoFormer._training_render_size`;
  README has its speed and its cost at low SNR).

Forward models (``space``)
--------------------------
``"real"`` (default): the density is queried at ``R^T x`` on a lattice of ``render_size^3``
points inside the sphere of ``radius_fraction`` of the box (every ``depth_stride``-th plane along z:
the default 2 halves the points, for aliasing at the band's edge), integrated along z, and the image's
transform taken by FFT (:mod:`cryoscape.models.realspace`, which states the cost budget and the
band it predicts); the CTF multiplies it at the training pixels.  This is the
:meth:`~cryoscape.models.base.VolumeDecoder.predict_images` hook; ``forward(coords, z)`` (the
Fourier-slice interface, used by searches) evaluates the map, takes its 3-D FFT and interpolates.
``"fourier"`` (the paper's ablation): the same network takes the frequency ``k + 1/2`` instead of
the position and returns a complex value (Hermitian by construction, as the neural field), trained
through the ordinary slice path.

Scale: the density is in the units of :meth:`eval_volume` of every decoder (a map whose centred
FFT is the data's normalised transform), i.e. one training voxel's value.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from cryoscape.fourier.fft import fft3_center, ifft3_center, iht3_center
from cryoscape.fourier.fsc import first_shell_below
from cryoscape.models.base import VolumeDecoder, register_decoder
from cryoscape.models.consensus import cell_maxima, lowpass_backprojection
from cryoscape.models.hash_grid import HashGrid
from cryoscape.models.neural_field import hermitian_negative_mask
from cryoscape.models.occupancy import OccupancyGrid
from cryoscape.models.precision import Float32Linear
from cryoscape.models.realspace import column_points, render_values

__all__ = ["CryoFormer"]

SPACES = ("real", "fourier")
#: the lattice's default size (``min(D, this)``) with ``depth_stride`` 2: a CPU-sized budget at D=64
#: (README, "Choosing a decoder: CryoFormer", has what 32, 48 and 64 gave)
DEFAULT_RENDER_SIZE = 48


class ImageContext(NamedTuple):
    """What the per-point part needs of one image, computed once per image (``(B or 1, ...)`` each)."""

    keys: torch.Tensor  # (B, N, C) keys of the image's queries
    values: torch.Tensor  # (B, N, C) their values
    deform: torch.Tensor | None  # (B, 1, W) the latent's term in the deformation MLP's first layer
    ffn: torch.Tensor | None  # (B, 1, C) the latent's term in the per-point FFN's hidden layer
    spatial: torch.Tensor | None  # (B, 1, S) the latent's term in the spatial MLP's hidden layer

    def expand(self, batch: int) -> "ImageContext":
        return ImageContext(*(t if t is None or t.shape[0] == batch else t.expand(batch, *t.shape[1:])
                              for t in self))


class PointDeformation(nn.Module):
    """``(x, z) -> dx``: an MLP displacement of the query point before the hash-grid lookup.

    The molecule's motion (a hinge) is a smooth displacement of its density, which a hash grid of
    fixed tables cannot express through attention weights alone; the last layer starts at zero, so
    training starts from the undeformed map.  The latent's share of the first layer is computed
    once per image (:meth:`latent_term`).
    """

    def __init__(self, zdim: int, width: int, init_scale: float = 0.0):
        super().__init__()
        self.point = Float32Linear(3, width)  # narrow layers in float32 (models/precision.py)
        self.latent = nn.Linear(zdim, width, bias=False)
        self.hidden = nn.Linear(width, width)
        self.out = Float32Linear(width, 3)
        nn.init.normal_(self.out.weight, std=float(init_scale))  # 0: exactly the undeformed map
        nn.init.zeros_(self.out.bias)

    def latent_term(self, z: torch.Tensor) -> torch.Tensor:
        return self.latent(z).unsqueeze(1)

    def forward(self, centred: torch.Tensor, latent_term: torch.Tensor) -> torch.Tensor:
        """Displacements ``(B, M, 3)`` (unit-cube units) at points ``(B, M, 3)`` of ``[-1/2, 1/2]^3``."""
        h = self.point(centred * 2.0)
        h = torch.relu(h + latent_term.float())
        return self.out(torch.relu(self.hidden(h)))


class QueryTransformer(nn.Module):
    """``n_blocks`` of [self-attention, cross-attention with the tokens, FFN] over learnt queries."""

    def __init__(self, *, n_queries: int, dim: int, n_blocks: int, n_heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * 0.5)
        self.blocks = nn.ModuleList(
            nn.TransformerDecoderLayer(d_model=dim, nhead=n_heads, dim_feedforward=2 * dim, dropout=0.0,
                                       batch_first=True, norm_first=True) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, C)`` tokens (and optional ``(B, N, C)`` offsets of the queries) -> ``(B, N, C)`` queries."""
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        if offsets is not None:
            q = q + offsets
        for block in self.blocks:
            q = block(q, tokens)
        return self.norm(q)


@register_decoder("cryoformer")
class CryoFormer(VolumeDecoder):
    """Real-space (or Fourier-domain) density from a hash grid and a deformation transformer.

    See the module docstring for the model; every option is a constructor keyword (also
    ``--decoder-opt KEY=VALUE``).  ``domain`` is the training loss's domain ("fourier" or
    "hartley"); ``space`` where the network lives ("real" or "fourier").
    """

    #: a new ``train`` run with a latent first trains a voxel basis this many epochs and starts its encoder from
    #: the basis's (train/teacher.py): alone, CryoFormer's latent collapsed to its prior at D=64 (README)
    teacher_epochs = 12

    def __init__(self, *, box_size: int, zdim: int = 0, domain: str = "fourier", space: str = "real",
                 n_levels: int = 16, features_per_level: int = 2, log2_table_size: int = 15,
                 base_resolution: int = 16, spatial_width: int = 16, n_queries: int = 64, query_dim: int = 64,
                 n_blocks: int = 3, n_heads: int = 4, deform_width: int = 128, deform_layers: int = 2,
                 render_size: int | None = None, depth_stride: int = 2, radius_fraction: float = 0.9,
                 jitter: bool = True,
                 chunk_points: int = 1 << 16, grid_init_scale: float = 1e-4, deformation: bool = True,
                 deformation_width: int = 64, latent_to_points: bool = False, grid_lr_scale: float = 1.0,
                 latent_warmup_steps: int = 0, latent_to_spatial: bool = False,
                 deformation_init_scale: float = 0.0, adam_eps: float = 1e-15, occupancy: bool = True,
                 occupancy_resolution: int | None = None, occupancy_threshold: float = 0.2,
                 occupancy_warmup_steps: int = 64, occupancy_every: int = 16, coarse_start: bool = False,
                 occupancy_prior: bool = True, occupancy_keep_prior: bool = True):
        super().__init__(box_size=box_size, zdim=zdim)
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if domain not in ("fourier", "hartley"):
            raise ValueError(f"domain must be fourier or hartley, got {domain!r}")
        D = self.box_size
        render_size = int(render_size) if render_size is not None else min(D, DEFAULT_RENDER_SIZE)
        if not 1 <= render_size <= D or int(depth_stride) < 1:
            raise ValueError(f"render_size must be between 1 and the box size {D} and depth_stride a positive integer, "
                             f"got {render_size} and {depth_stride}")
        # one cell per rendered lattice step, none finer than 2 training pixels
        occupancy_resolution = int(occupancy_resolution or max(1, min(render_size, D // 2)))
        self.domain, self.space = domain, space
        self.render_size, self.radius_fraction, self.jitter = render_size, float(radius_fraction), bool(jitter)
        self.depth_stride = int(depth_stride)
        self.chunk_points = int(chunk_points)
        self.config.update(domain=domain, space=space, n_levels=n_levels, features_per_level=features_per_level,
                           log2_table_size=log2_table_size, base_resolution=base_resolution,
                           spatial_width=spatial_width, n_queries=n_queries, query_dim=query_dim, n_blocks=n_blocks,
                           n_heads=n_heads, deform_width=deform_width, deform_layers=deform_layers,
                           render_size=render_size, depth_stride=depth_stride, radius_fraction=radius_fraction,
                           jitter=jitter,
                           chunk_points=chunk_points, grid_init_scale=grid_init_scale, deformation=deformation,
                           deformation_width=deformation_width, latent_to_points=latent_to_points,
                           grid_lr_scale=grid_lr_scale, latent_warmup_steps=latent_warmup_steps,
                           latent_to_spatial=latent_to_spatial, deformation_init_scale=deformation_init_scale,
                           adam_eps=adam_eps, occupancy=occupancy, occupancy_resolution=occupancy_resolution,
                           occupancy_threshold=occupancy_threshold, occupancy_warmup_steps=occupancy_warmup_steps,
                           occupancy_every=occupancy_every, coarse_start=coarse_start,
                           occupancy_prior=occupancy_prior, occupancy_keep_prior=occupancy_keep_prior)
        max_res = max(2, D)
        self.grid = HashGrid(n_levels=n_levels, features_per_level=features_per_level, log2_table_size=log2_table_size,
                             base_resolution=min(base_resolution, max_res), max_resolution=max_res,
                             init_scale=grid_init_scale)
        # the per-point layers with few inputs or outputs stay in float32 under autocast (Float32Linear)
        self.spatial = nn.Sequential(Float32Linear(self.grid.out_features, spatial_width), nn.ReLU(),
                                     Float32Linear(spatial_width, query_dim))
        self.n_queries, self.query_dim = int(n_queries), int(query_dim)
        self.deform = self._deformation_mlp(zdim, deform_width, deform_layers)
        self.transformer = QueryTransformer(n_queries=n_queries, dim=query_dim, n_blocks=n_blocks, n_heads=n_heads)
        self.key = nn.Linear(query_dim, query_dim)
        self.value = nn.Linear(query_dim, query_dim)
        n_out = 1 if space == "real" else 2
        self.ffn = nn.Sequential(nn.LayerNorm(query_dim), nn.Linear(query_dim, query_dim), nn.ReLU(),
                                 Float32Linear(query_dim, n_out))
        if space == "real":
            nn.init.constant_(self.ffn[-1].bias, -4.0)  # start near an empty box
        self.point_deformation = None
        if deformation and zdim > 0 and space == "real":
            self.point_deformation = PointDeformation(zdim, int(deformation_width), float(deformation_init_scale))
        self.latent_ffn = nn.Linear(zdim, query_dim, bias=False) if latent_to_points and zdim > 0 else None
        self.latent_spatial = nn.Linear(zdim, spatial_width, bias=False) if latent_to_spatial and zdim > 0 else None
        self.latent_warmup_steps = int(latent_warmup_steps)
        if self.latent_warmup_steps > 0:  # counted by after_optimizer_step, saved with the model
            self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))
        # one training voxel's value is ~1/D^2 of a unit-RMS normalised transform (see module docstring)
        self.register_buffer("output_scale", torch.tensor(4.0 / D ** 2 if space == "real" else 1.0),
                             persistent=False)
        self._columns: dict = {}  # (render size, device) -> the lattice's ColumnPoints
        self.occupancy = None
        if occupancy and space == "real":  # skip the empty cells of the box (models/occupancy.py)
            self.occupancy = OccupancyGrid(D, resolution=occupancy_resolution, threshold=float(occupancy_threshold),
                                           keep_prior=bool(occupancy_keep_prior))
            self.register_buffer("occupancy_steps", torch.zeros((), dtype=torch.long))
        # the engine streams the posed data once before a new run: the grid's prior (warm_start)
        self.wants_warm_start = self.occupancy is not None and bool(occupancy_prior)

    def _deformation_mlp(self, zdim: int, width: int, layers: int) -> nn.Module | None:
        if zdim == 0:
            self.tokens = nn.Parameter(torch.randn(self.n_queries, self.query_dim) * 0.5)
            return None
        mods: list[nn.Module] = [nn.Linear(zdim, width), nn.ReLU()]
        for _ in range(max(0, layers - 1)):
            mods += [nn.Linear(width, width), nn.ReLU()]
        mods.append(nn.Linear(width, self.n_queries * self.query_dim))
        return nn.Sequential(*mods)

    @classmethod
    def upgrade_config(cls, config: dict) -> dict:
        """A config saved before ``depth_stride`` rendered every plane (stride 1, not today's default)."""
        return {"depth_stride": 1, **config}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module``'s; weights saved before ``deformation`` was on by default (a config without the
        key rebuilds with it, but the weights have no ``point_deformation.*``) load as the model they were."""
        if self.point_deformation is not None and not any(k.startswith("point_deformation.") for k in state_dict):
            self.point_deformation = None
            self.config["deformation"] = False
        if self.occupancy is not None and "occupancy.level" not in state_dict:  # saved before the occupancy grid
            self.occupancy = None
            del self.occupancy_steps
            self.config["occupancy"] = False
        elif self.occupancy is not None and "occupancy.prior" not in state_dict:  # saved before the prior
            state_dict = {**state_dict, "occupancy.prior": torch.ones_like(self.occupancy.prior)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def warm_start(self, slices) -> dict:
        """Set the occupancy grid's prior from the consensus map: the Wiener-filtered backprojection of the
        posed data below one cycle per cell (:func:`~cryoscape.models.consensus.lowpass_backprojection`),
        its maximum per cell (:meth:`~cryoscape.models.occupancy.OccupancyGrid.set_prior`).  Until the
        model's own map has a shape the grid holds these cells instead of the whole sphere, and with
        ``occupancy_keep_prior`` it keeps them after (README, "Choosing a decoder: CryoFormer", has the
        shares, what they saved and what keeping them protects).  A training-loop hook,
        called before the first epoch of a new run with poses (train/warm_start.py).

        Returns ``{"n_images", "fsc_half", "prior_share", "note"}`` (the share of the grid's cells occupied,
        and a line for the log).
        """
        grid = self.occupancy
        volume, fsc, n_images = lowpass_backprojection(slices, self.box_size, min(grid.resolution, self.box_size // 2),
                                                       domain=self.domain, device=grid.level.device)
        grid.set_prior(cell_maxima(volume, self.box_size, grid.resolution))
        share = float(grid.prior.float().mean())
        return {"n_images": n_images, "fsc_half": fsc.float(), "prior_share": share,
                "note": f"the occupancy grid starts with {share:.0%} of its cells{self._band_advice(fsc)}"}

    def _band_advice(self, fsc: torch.Tensor) -> str:
        """A hint for the log when the data resolve beyond the rendered band: the half-map FSC of the
        warm start stays above 0.143 past ``render_size / 2`` Fourier pixels, the highest frequency a
        ``render_size^3`` lattice predicts (README "Choosing a decoder: CryoFormer" measures the trade)."""
        D, r = self.box_size, self.render_size
        resolved = first_shell_below(fsc, 0.143)
        if self.space != "real" or r >= D or resolved <= r // 2:
            return ""
        return (f"; the data resolve to shell {resolved} (half-map FSC 0.143), beyond the {r}^3 lattice's band "
                f"of {r // 2}: --decoder-opt render_size={D} trains the whole band, at about {(D / r) ** 3:.2g}x "
                "the points per image")

    def optimizer_param_groups(self) -> list[dict] | None:
        """The hash-grid tables at ``grid_lr_scale`` times the learning rate, the rest at 1 (``None`` if 1)."""
        scale = float(self.config["grid_lr_scale"])
        if scale == 1.0:
            return None
        rest = [p for name, p in self.named_parameters() if not name.startswith("grid.")]
        return [{"params": list(self.grid.parameters()), "lr_scale": scale}, {"params": rest, "lr_scale": 1.0}]

    def adam_eps(self) -> float | None:
        """``adam_eps`` (default 1e-15): the density starts near zero, and its gradients with it, far below
        torch's 1e-8 at low SNR, where that ``eps`` held the first epochs still (README, "Choosing a decoder")."""
        return float(self.config["adam_eps"])

    def after_optimizer_step(self) -> None:
        if self.latent_warmup_steps > 0:
            self.optimizer_steps += 1

    def latent_gate(self) -> float:
        """The factor of the latent: rising from 0 to 1 over ``latent_warmup_steps`` optimiser steps, so
        the map's mean is fitted before the latent can explain what the mean does not yet."""
        if self.latent_warmup_steps <= 0:
            return 1.0
        return min(1.0, float(self.optimizer_steps) / self.latent_warmup_steps)

    # ---- per image
    def image_context(self, z: torch.Tensor | None, batch: int) -> ImageContext:
        """Keys and values ``(B or 1, N, C)`` of the image-specific queries and the latent's per-point
        terms (run once per image)."""
        z = self.check_latent(z, batch)
        if z is None:
            tokens = self.tokens.unsqueeze(0)
        else:
            gate = self.latent_gate()
            z = z * gate if gate < 1.0 else z
            tokens = self.deform(z).reshape(z.shape[0], self.n_queries, self.query_dim)
        # the deformation tokens are the cross-attention's memory and also shift the queries they start
        # from, so the latent reaches every query from the first step (through cross-attention alone
        # the hinge's latent stayed unused for 10 epochs: |Spearman| <= 0.06, README)
        # once per image and tiny (B x n_queries tokens): float32 even under autocast, where the CPU's
        # bfloat16 attention backward took 8x the float32 time (README, "On a CPU with bfloat16")
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            tokens = tokens.float()
            q = self.transformer(tokens, tokens if z is not None else None)
        deform = None if self.point_deformation is None else self.point_deformation.latent_term(z)
        ffn = None if self.latent_ffn is None else self.latent_ffn(z).unsqueeze(1)
        spatial = None if self.latent_spatial is None else self.latent_spatial(z).unsqueeze(1)
        return ImageContext(self.key(q), self.value(q), deform, ffn, spatial)

    # ---- per point
    def point_values(self, u: torch.Tensor, context: ImageContext, *,
                     attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Network output ``(B, M, n_out)`` at points ``u`` ``(B, M, 3)`` of the unit cube.

        With ``deformation`` the point is first displaced by ``dx(u, z)``; with ``latent_to_points``
        the latent is added to the FFN's hidden layer (``z`` concatenated to its input).
        ``attention``: also return the ``(B, M, N)`` attention weights of the points over the queries.
        """
        keys, values = context.keys, context.values
        if context.deform is not None:
            u = u + self.point_deformation(u - 0.5, context.deform)
        feat = self.grid(u)
        if context.spatial is None:
            q = self.spatial(feat)  # float32: the spatial MLP's layers are narrow (Float32Linear)
        else:  # z concatenated to the grid features, as the neural field's first layer takes (x, z)
            hidden = self.spatial[0](feat)
            q = self.spatial[2](self.spatial[1](hidden + context.spatial.float()))
        # the (B, C, N) keys are scaled, not the (B, M, N) logits
        logits = q @ (keys.transpose(1, 2) / math.sqrt(self.query_dim)).to(q.dtype)
        # in the logits' dtype (autocast's): the CPU's bfloat16 softmax accumulates in float32 itself, and
        # the weights are rounded to it for the product anyway (a float32 copy cost 4 (B, M, N) casts a step)
        weights = torch.softmax(logits, dim=-1).to(logits.dtype)
        h = q + weights @ values.to(weights.dtype)
        if context.ffn is None:
            out = self.ffn(h)
        else:
            hidden = self.ffn[1](self.ffn[0](h))
            out = self.ffn[3](self.ffn[2](hidden + context.ffn.to(hidden.dtype)))
        return (out, weights) if attention else out

    def density(self, world: torch.Tensor, context) -> torch.Tensor:
        """Non-negative density ``(B, M)`` at world points ``(B, M, 3)`` (training pixels): 0 outside the
        rendered sphere and in the occupancy grid's empty cells, where the network is not queried."""
        keep = self._in_sphere(world)
        if not self._pruned():
            return self._density_values(world, context) * keep
        return self._density_at(world, keep & self.occupancy.contains(world), context)

    def _pruned(self) -> bool:
        """Whether the occupancy grid skips points (there is one and a cell is empty)."""
        return self.occupancy is not None and self.occupancy.prunes

    def _in_sphere(self, world: torch.Tensor) -> torch.Tensor:
        """Bool ``(B, M)``: the points inside the rendered sphere."""
        return world.square().sum(-1) <= (self.radius_fraction * self.box_size / 2) ** 2 + 1e-6

    def _queried(self, world: torch.Tensor) -> torch.Tensor:
        """Bool ``(B, M)``: the points the network is queried at (in the sphere and an occupied cell)."""
        keep = self._in_sphere(world)
        return keep & self.occupancy.contains(world) if self._pruned() else keep

    def _density_values(self, world: torch.Tensor, context) -> torch.Tensor:
        raw = self.point_values(world / self.box_size + 0.5, context)[..., 0].float()
        return nn.functional.softplus(raw) * self.output_scale

    def _density_at(self, world: torch.Tensor, keep: torch.Tensor, context) -> torch.Tensor:
        """The density at the points ``keep`` ``(B, M)`` of ``world``, 0 elsewhere: each image's kept points
        are gathered to the front (padded to the largest count), queried, and scattered back."""
        B, M = keep.shape[0], world.shape[1]
        counts = keep.sum(1)
        K = int(counts.max()) if B else 0
        if K == 0:  # nothing occupied here (e.g. a map chunk outside the molecule)
            return torch.zeros(B, M, device=world.device)
        order = torch.argsort(keep.to(torch.uint8), dim=1, descending=True, stable=True)[:, :K]  # (B, K)
        points = torch.gather(world.expand(B, -1, -1), 1, order.unsqueeze(-1).expand(-1, -1, 3))
        valid = torch.arange(K, device=world.device) < counts.unsqueeze(1)
        values = self._density_values(points, context) * valid
        return torch.zeros(B, M, device=world.device, dtype=values.dtype).scatter(1, order, values)

    def _refresh_occupancy(self, z: torch.Tensor | None) -> None:
        """During training: count the step; after the warm-up, refresh the occupancy grid every
        ``occupancy_every`` steps from this batch's latents ``z`` (the density without the grid), each
        cell at one of them (:meth:`_cell_densities`).  In data-parallel runs the latents of the whole
        batch are gathered and the cells' points and latents drawn from a generator seeded by the step
        (the training's random stream is left as it was): every process keeps the grid one process would."""
        self.occupancy_steps += 1
        step, warmup = int(self.occupancy_steps), int(self.config["occupancy_warmup_steps"])
        if step < warmup or (step - warmup) % max(1, int(self.config["occupancy_every"])) != 0:
            return
        with torch.no_grad():
            if z is not None:
                z = z.detach().float()
                z = z if self.process_gather_rows is None else self.process_gather_rows(z)
            context = self.image_context(z, 1 if z is None else z.shape[0])
            generator = torch.Generator().manual_seed(step)
            self.occupancy.refresh(lambda world: self._cell_densities(world, context, generator), generator=generator)

    def _cell_densities(self, world: torch.Tensor, context: ImageContext,
                        generator: torch.Generator) -> torch.Tensor:
        """The density ``(1, n)`` at the grid's points ``(1, n, 3)`` (one per cell), each at the latent of a
        random one of the ``B`` images of ``context``: a refresh costs one query per cell whatever the
        batch size, and over the refreshes a cell's decaying maximum gathers many latents."""
        n, B = world.shape[1], context.keys.shape[0]
        per_image = -(-n // B)
        cells = torch.randperm(n, generator=generator)[torch.arange(B * per_image) % n].reshape(B, per_image)
        cells = cells.to(world.device)
        values = self._density_values(world[0][cells], context).float()
        return torch.zeros(n, device=world.device).scatter_reduce(0, cells.reshape(-1), values.reshape(-1),
                                                                  "amax").unsqueeze(0)

    def columns(self, device: torch.device, render_size: int | None = None):
        r = int(render_size or self.render_size)
        key = (r, str(device))
        if key not in self._columns:
            self._columns[key] = column_points(self.box_size, r, radius_fraction=self.radius_fraction,
                                               depth_stride=self.depth_stride, device=device)
        return self._columns[key]

    def _training_render_size(self) -> int:
        """``render_size``, or half of it (a quarter of the band, an eighth of the points) with ``coarse_start``
        while the occupancy grid has pruned nothing: the map is still a blob (or, at low SNR, near-uniform)
        and its high frequencies are noise, as in the frequency marching of classical refinement."""
        if (self.config["coarse_start"] and self.occupancy is not None
                and not self.occupancy.prunes and self.render_size >= 32):
            return self.render_size // 2
        return self.render_size

    # ---- the training hook
    def predict_images(self, rotations: torch.Tensor, pixels, z: torch.Tensor | None,
                       ctf: torch.Tensor | None) -> torch.Tensor | None:
        """Real space: render the images and return ``c(k) * FFT`` at the training pixels; Fourier: ``None``."""
        if self.space != "real":
            return None
        B = rotations.shape[0]
        if self.training and self.occupancy is not None:
            self._refresh_occupancy(z)
        context = self.image_context(z, B).expand(B)
        columns = self.columns(rotations.device, self._training_render_size() if self.training else None)
        offsets, scale = None, columns.jitter_scale()
        if self.training and self.jitter and any(scale):
            offsets = (torch.rand(B, 3, device=rotations.device) - 0.5) * torch.tensor(scale, device=rotations.device)
        values = render_values(lambda world: self.density(world, context), rotations, columns, pixels.coords_index,
                               box_size=self.box_size, offsets=offsets)
        if pixels.domain == "hartley":
            values = values.real - values.imag
        if ctf is not None:
            values = values * ctf.to(values.real.dtype)
        return values

    # ---- the Fourier-slice interface
    def forward(self, coords: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        B = coords.shape[0]
        if self.space == "fourier":
            return self._fourier_values(coords, z)
        out = []
        for b in range(B):
            zb = None if z is None else z[min(b, z.shape[0] - 1)].unsqueeze(0)
            ft = fft3_center(self.eval_volume(zb, grad=True))
            out.append(_interpolate_grid(ft, coords[b], self.box_size))
        values = torch.stack(out)
        return values.real - values.imag if self.domain == "hartley" else values

    def _fourier_values(self, coords: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        B = coords.shape[0]
        context = self.image_context(z, B).expand(B)
        if self.domain == "hartley":
            out = self.point_values(coords + 0.5, context).float() * self.output_scale
            return out[..., 0] - out[..., 1]
        negative = hermitian_negative_mask(coords)
        canon = torch.where(negative.unsqueeze(-1), -coords, coords)
        out = self.point_values(canon + 0.5, context).float() * self.output_scale
        imag = torch.where(negative, -out[..., 1], out[..., 1])
        imag = torch.where((coords == 0).all(-1), torch.zeros_like(imag), imag)
        return torch.complex(out[..., 0], imag)

    # ---- maps
    def _grid_points(self, n: int, device) -> torch.Tensor:
        axis = (torch.arange(n, device=device, dtype=torch.float32) - n // 2) * (self.box_size / n)
        zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
        return torch.stack([xx, yy, zz], -1).reshape(1, -1, 3)

    def eval_volume(self, z: torch.Tensor | None = None, *, box_size: int | None = None,
                    grad: bool = False) -> torch.Tensor:
        """Real-space map ``(n, n, n)`` ``[z, y, x]``: the density sampled every ``D / n`` training pixels
        (real space) or the inverse FFT of the cropped frequencies times ``(n / D)^3`` (Fourier space)."""
        n = int(box_size) if box_size is not None else self.box_size
        device = self.tokens.device if self.zdim == 0 else self.deform[0].weight.device
        if z is not None:
            z = torch.as_tensor(z, device=device, dtype=torch.float32).reshape(1, -1)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if self.space == "fourier":
                freq = (torch.arange(n, device=device, dtype=torch.float32) - n // 2) / self.box_size
                zz, yy, xx = torch.meshgrid(freq, freq, freq, indexing="ij")
                k = torch.stack([xx, yy, zz], -1).reshape(1, -1, 3)
                values = torch.cat([self._fourier_values(c, z) for c in k.split(self.chunk_points, 1)], 1)
                values = values.reshape(n, n, n)
                if self.domain == "hartley":
                    return iht3_center(values) * (n / self.box_size) ** 3
                return ifft3_center(values).real * (n / self.box_size) ** 3
            context = self.image_context(z, 1)
            world = self._grid_points(n, device)
            dens = torch.cat([self.density(w, context) for w in world.split(self.chunk_points, 1)], 1)
            return dens.reshape(n, n, n)

    def attention_volumes(self, z: torch.Tensor | None = None, *, box_size: int | None = None) -> torch.Tensor | None:
        """``(N, n, n, n)``: per query, its attention weight at every voxel (real space; ``None`` for the
        Fourier-domain variant).

        Voxels outside the rendered sphere or the occupancy grid's occupied cells are 0.  A query whose
        weight changes with ``z`` in a region marks where the structure moves (notes/cryoformer.md).
        """
        if self.space != "real":
            return None  # the Fourier-domain variant's queries attend over frequencies, not voxels
        n = int(box_size) if box_size is not None else self.box_size
        device = self.grid.tables.device
        if z is not None:
            z = torch.as_tensor(z, device=device, dtype=torch.float32).reshape(1, -1)
        with torch.no_grad():
            context = self.image_context(z, 1)
            world = self._grid_points(n, device)
            parts = []
            for w in world.split(self.chunk_points, 1):
                _, att = self.point_values(w / self.box_size + 0.5, context, attention=True)
                parts.append(att.float() * self._queried(w).unsqueeze(-1))
            att = torch.cat(parts, 1)[0]
        return att.T.reshape(-1, n, n, n)


def _interpolate_grid(ft: torch.Tensor, coords: torch.Tensor, box_size: int) -> torch.Tensor:
    """Trilinear interpolation of a centred ``(D, D, D)`` transform at ``(P, 3)`` frequencies (cycles/pixel)."""
    D = ft.shape[-1]
    idx = coords * box_size + D // 2  # (P, 3) x, y, z in grid index units
    grid = (idx / (D - 1) * 2 - 1).reshape(1, 1, 1, -1, 3).to(torch.float32)
    parts = torch.stack([ft.real, ft.imag]).unsqueeze(0).float()  # (1, 2, D, D, D)
    out = nn.functional.grid_sample(parts, grid, mode="bilinear", align_corners=True, padding_mode="zeros")
    out = out.reshape(2, -1)
    return torch.complex(out[0], out[1])
