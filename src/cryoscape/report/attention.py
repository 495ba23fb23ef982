"""The attention-map section of ``cryoscape analyze``'s report (decoders with attention queries only).

:func:`attention_section` writes the maps of :func:`cryoscape.analysis.attention.write_attention_maps`
under the analysis folder, draws the central slices of the attention-change map and of the most
changing queries, and returns a report :class:`~cryoscape.report.html.Section`; for a decoder
without attention maps it writes nothing and returns ``None``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cryoscape.report.html import Figure, Section

__all__ = ["attention_section"]

log = logging.getLogger(__name__)


#: attention maps are written at most at this box (N maps of n^3 voxels: 64 x 128^3 floats would be 0.5 GB)
MAX_BOX = 64


def attention_section(run: Path, out: Path, figures: Path, *, z: np.ndarray, epoch: int,
                      device: str = "cpu") -> Section | None:
    """Write ``out/attention/`` (at box ``min(D, MAX_BOX)``) and return its report section (``None``:
    the decoder has no attention maps)."""
    from cryoscape.analysis.attention import default_latents, write_attention_maps
    from cryoscape.train.volumes import load_trained_model

    decoder, _, state = load_trained_model(run, epoch=epoch, device=device)
    latents = default_latents(z) if decoder.zdim > 0 else None
    if decoder.attention_volumes(None if latents is None else torch.as_tensor(latents[0]), box_size=2) is None:
        return None
    box = min(decoder.box_size, MAX_BOX)
    pixel = float(state.get("data", {}).get("pixel_size_angstrom", 1.0) or 1.0) * decoder.box_size / box
    summary = write_attention_maps(decoder, out, latents=latents, pixel_size_angstrom=pixel, box_size=box)
    change = _read(out / "attention" / "change.mrc")
    path = figures / "attention_change.png"
    _plot_slices(change, path, title="attention change over the latent (sum over queries)")
    log.info("attention maps of %d queries written to %s", summary["n_queries"], out / "attention")
    return Section(
        "Attention maps",
        paragraphs=[f"Per query, its attention weight at every voxel at the median latent "
                    f"(attention/query_JJ.mrc, {summary['n_queries']} queries), and attention/change.mrc: how much "
                    "each voxel's attention changes between the 10th and 90th percentile of the first latent "
                    "coordinate. High values mark the regions whose density follows the conformation."],
        figures=[Figure(path, "central slices (z, y, x) of attention/change.mrc")])


def _read(path: Path) -> np.ndarray:
    from cryoscape.io.mrc import read_mrc

    return np.asarray(read_mrc(path)[0])


def _plot_slices(volume: np.ndarray, path: Path, *, title: str) -> None:
    """Three central slices side by side (no global pyplot state, as report/plots.py)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    n = volume.shape[0] // 2
    fig = MplFigure(figsize=(9, 3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, img, name in zip(axes, (volume[n], volume[:, n], volume[:, :, n]), ("z", "y", "x")):
        ax.imshow(img, cmap="magma", origin="lower")
        ax.set_title(f"{name} = centre")
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
