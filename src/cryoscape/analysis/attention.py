"""Attention maps of a decoder with attention queries (CryoFormer), as volumes a user can open.

For a decoder whose :meth:`~cryoscape.models.base.VolumeDecoder.attention_volumes` returns maps
(``None`` for the others), :func:`write_attention_maps` writes, for a set of latents (by default
the 10th, 50th and 90th percentile of the first latent coordinate of the run's last epoch):

* ``attention/query_JJ.mrc``: query ``J``'s attention weight at every voxel, at the median latent;
* ``attention/change.mrc``: the sum over queries of how much each voxel's attention changes
  between the latents (``sum_j max_z a_j - min_z a_j``): where the model's attention follows the
  conformation, i.e. the regions that move (notes/cryoformer.md);
* ``attention/summary.json``: per query, the share of its attention mass and how much it changes.

:func:`region_contrast` is the figure the tests report: the mean of a map over one mask divided by
its mean over another (e.g. the hinge's moving arm versus the body).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["attention_maps", "write_attention_maps", "region_contrast", "default_latents"]


def default_latents(z: np.ndarray) -> np.ndarray:
    """``(3, zdim)`` latents: the particles' median with the first coordinate at its 10/50/90th percentile."""
    z = np.asarray(z, dtype=np.float32)
    med = np.median(z, axis=0)
    rows = np.repeat(med[None], 3, axis=0)
    rows[:, 0] = np.percentile(z[:, 0], [10, 50, 90])
    return rows


def attention_maps(decoder, latents: np.ndarray | None, *, box_size: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """``(per-query maps at the middle latent (N, n, n, n), change map (n, n, n))``, or ``None``
    when the decoder has no attention maps.  ``latents`` ``(M, zdim)``; ``None`` for a homogeneous decoder."""
    rows = [None] if latents is None or decoder.zdim == 0 else [torch.as_tensor(z) for z in latents]
    maps = [decoder.attention_volumes(z, box_size=box_size) for z in rows]
    if maps[0] is None:
        return None
    stack = torch.stack([m.float().cpu() for m in maps])  # (M, N, n, n, n)
    change = (stack.max(0).values - stack.min(0).values).sum(0)
    return stack[len(rows) // 2].numpy(), change.numpy()


def write_attention_maps(decoder, out_dir: str | os.PathLike, *, latents: np.ndarray | None,
                         pixel_size_angstrom: float = 1.0, box_size: int | None = None) -> dict[str, Any] | None:
    """Write the maps of the module docstring under ``out_dir/attention``; returns the summary (``None``:
    the decoder has no attention maps, nothing written)."""
    from cryoscape.io.mrc import write_mrc

    found = attention_maps(decoder, latents, box_size=box_size)
    if found is None:
        return None
    per_query, change = found
    out = Path(out_dir) / "attention"
    out.mkdir(parents=True, exist_ok=True)
    for j, vol in enumerate(per_query):
        write_mrc(out / f"query_{j:02d}.mrc", vol.astype(np.float32), pixel_size_angstrom=pixel_size_angstrom)
    write_mrc(out / "change.mrc", change.astype(np.float32), pixel_size_angstrom=pixel_size_angstrom)
    mass = per_query.reshape(len(per_query), -1).sum(1)
    summary = {"n_queries": int(len(per_query)), "latents": None if latents is None else np.asarray(latents).tolist(),
               "query_mass_fraction": (mass / max(float(mass.sum()), 1e-12)).round(5).tolist(),
               "files": [f"query_{j:02d}.mrc" for j in range(len(per_query))] + ["change.mrc"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def region_contrast(volume: np.ndarray, region: np.ndarray, reference: np.ndarray) -> float:
    """Mean of ``volume`` over the boolean mask ``region`` divided by its mean over ``reference``."""
    volume = np.asarray(volume, dtype=np.float64)
    return float(volume[region].mean() / max(volume[reference].mean(), 1e-30))
