"""What a training run writes into its folder, one function per file kind.

``config.yaml`` (:func:`write_run_config`), ``z.E.npy`` / ``z_logvar.E.npy`` / ``z.E.pkl``
(:func:`write_latents`), ``reconstruct.E.mrc`` (:func:`write_epoch_map`), ``poses.E.npz`` /
``poses.E.pkl`` (:func:`write_poses`), ``particles.star`` (:func:`write_star`) and ``loss.png``
(:func:`plot_losses`).  Every file is written atomically (a temporary name moved into place), so a
run killed while writing leaves the previous version.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.io.writers import atomic_write

__all__ = ["write_latents", "plot_losses", "write_run_config", "write_epoch_map", "write_poses", "write_star",
           "format_seconds"]

log = logging.getLogger(__name__)


def write_latents(out: Path, epoch: int, z_mean: np.ndarray, z_logvar: np.ndarray) -> None:
    """``z.E.npy``, ``z_logvar.E.npy`` (ours) and ``z.E.pkl`` (cryoDRGN's: pickled float32 means)."""
    for name, arr in ((f"z.{epoch}.npy", z_mean), (f"z_logvar.{epoch}.npy", z_logvar)):
        with atomic_write(out / name, "wb") as f:
            np.save(f, arr.astype(np.float32))
    with atomic_write(out / f"z.{epoch}.pkl", "wb") as f:
        pickle.dump(z_mean.astype(np.float32), f, protocol=4)


def plot_losses(history: list[dict[str, Any]], steps: list[tuple[float, float]], path: Path) -> None:
    """Loss per epoch (markers) and within epochs (thin line) into ``path`` (object API, no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    if steps:
        s = np.asarray(steps, dtype=np.float64)
        ax.plot(s[:, 0], s[:, 1], color="0.6", linewidth=0.8, label="within epoch")
    if history:
        e = np.array([h["epoch"] + 1 for h in history], dtype=np.float64)
        ax.plot(e, [h["loss"] for h in history], "o-", color="C0", label="epoch mean")
        if any(h.get("kl", 0.0) > 0 for h in history):
            ax.plot(e, [h["error"] for h in history], "s--", color="C1", markersize=3, label="squared error")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


def write_run_config(out: Path, config, arguments: dict | None, *, model, normalization, box_size: int,
                     pixel_size: float, n_particles: int, resumed_from: int | None, command: str = "train",
                     world_size: int = 1) -> None:
    """``config.yaml``: the options, what rebuilds the model (``model``: a :class:`~cryoscape.train.model.
    Model`), the data's box, pixel size and normalisation, and the number of processes."""
    from cryoscape.io.run_folder import write_config

    write_config(
        out, command, arguments if arguments is not None else config.to_dict(),
        training=config.to_dict(),
        model={
            "decoder": {"name": model.name, "config": dict(model.decoder.config)},
            "encoder": None if model.encoder is None else dict(model.encoder.config),
            "zdim": int(model.zdim),  # the model's (abinit's search phase: 0)
            "domain": config.domain,
        },
        data={
            "box_size": int(box_size),
            "pixel_size_angstrom": None if not math.isfinite(pixel_size) else float(pixel_size),
            "n_particles": int(n_particles),
            "normalization": normalization.to_dict(),
        },
        resumed_from_epoch=resumed_from,
        world_size=int(world_size),
    )


def write_epoch_map(out: Path, epoch: int, decoder, pixel_size: float) -> None:
    """``reconstruct.E.mrc``: the map of a homogeneous decoder."""
    from cryoscape.io.mrc import write_mrc

    was_training = decoder.training
    decoder.eval()
    volume = decoder.eval_volume(None)
    decoder.train(was_training)
    write_mrc(out / f"reconstruct.{epoch}.mrc", volume.cpu().numpy(),
              pixel_size_angstrom=pixel_size if math.isfinite(pixel_size) else 1.0)


def write_poses(out: Path, epoch: int, rotations: torch.Tensor, shifts: torch.Tensor, errors: torch.Tensor,
                searched: torch.Tensor, box_size: int, wall_seconds: float) -> None:
    """``poses.E.npz`` (rotations, shifts in pixels, search error, epoch of the last search, wall
    seconds) and ``poses.E.pkl`` (cryoDRGN's format)."""
    from cryoscape.io.cryodrgn import write_poses_pkl

    R = rotations.double().numpy()
    t = shifts.double().numpy()
    with atomic_write(out / f"poses.{epoch}.npz", "wb") as f:
        np.savez(f, rotations=R, shifts_pixel=t, search_error=errors.numpy().astype(np.float32),
                 searched_epoch=searched.numpy().astype(np.int32), wall_seconds=np.float64(wall_seconds),
                 box_size=np.int64(box_size))
    write_poses_pkl(out / f"poses.{epoch}.pkl", R, t, box_size=box_size)


def write_star(out: Path, table, rotations: torch.Tensor, shifts: torch.Tensor) -> None:
    """``particles.star`` (RELION 3.1) of ``table`` with these poses, when the pixel size is known."""
    from cryoscape.io.star import write_star as write_star_file

    bad = ~(np.isfinite(table.pixel_size_angstrom) & (table.pixel_size_angstrom > 0))
    if bad.any():
        log.info("particles.star not written: %d particles have no pixel size (pass --pixel-size)", int(bad.sum()))
        return
    posed = dataclasses.replace(table, rotations=rotations.double().numpy(), shifts_pixel=shifts.double().numpy())
    write_star_file(out / "particles.star", posed)


def format_seconds(s: float) -> str:
    """A duration for the log: seconds, minutes or hours."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
