"""Maps of a trained run at many latents, for analyses (k-means centres, PC and graph traversals).

What differs from ``cryoscape volumes`` (:func:`cryoscape.train.volumes.decode_volumes`)
---------------------------------------------------------------------------------------------
The model is loaded once and every map is generated from it with the decoder's own fast path,
``decoder.eval_volume`` (the neural field evaluates only the trained sphere ``|k| <= 1/2`` in
cache-sized chunks; the basis decoder is one weighted sum and one inverse FFT), so in float32
(``amp=False``) the maps of an analysis are exactly those ``cryoscape volumes`` writes for the
same latents.

Mixed precision: ``amp=None`` follows the rule of :func:`cryoscape.models.precision.resolve_amp`:
the decoder's matrix products run in bfloat16 where the hardware has fast bfloat16 (CPUs with
AVX512-BF16/AMX, recent GPUs); the positional encoding and the FFT stay in float32.

Scale, pixel size, ``flip`` and ``invert`` are those of :mod:`cryoscape.train.volumes`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.errors import InputError
from cryoscape.train.volumes import map_paths

__all__ = ["MapOptions", "MapModel", "load_map_model", "MapSet", "map_paths", "generate_maps", "read_map_set"]

log = logging.getLogger(__name__)


@dataclass
class MapOptions:
    """How an analysis makes its maps (the ``--box-size --lowpass --flip --invert --device --amp`` options).

    One object instead of six keyword arguments threaded through every analysis command
    (analyze, traverse, the dashboard); :meth:`generate_kwargs` gives :func:`generate_maps`'s.
    """

    box_size: int | None = None
    lowpass_angstrom: float | None = None
    flip: bool = False
    invert: bool = False
    device: Any = "cpu"
    amp: bool | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`generate_maps` (all but ``device``, which the model holds)."""
        return dict(box_size=self.box_size, lowpass_angstrom=self.lowpass_angstrom, flip=self.flip,
                    invert=self.invert, amp=self.amp)

    def record(self) -> dict[str, Any]:
        """Plain values for ``config.yaml``."""
        return dict(self.generate_kwargs(), device=str(self.device))


@dataclass
class MapModel:
    """A trained decoder ready to make maps, with what the maps' headers need.

    Attributes
    ----------
    decoder
        The decoder in eval mode on ``device``.
    box_size
        Training box ``D``.
    pixel_size_angstrom
        Training pixel size (1.0 where the run has none).
    epoch
        0-based epoch of the weights.
    device
        Where the decoder lives.
    history
        The run's per-epoch training records (loss, squared error, KL), possibly empty.
    """

    decoder: torch.nn.Module
    box_size: int
    pixel_size_angstrom: float
    epoch: int
    device: torch.device
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def zdim(self) -> int:
        """Latent dimension (0: homogeneous)."""
        return int(self.decoder.zdim)


def load_map_model(run_dir: str | os.PathLike, *, epoch: int | None = None,
                   device: torch.device | str = "cpu") -> MapModel:
    """The decoder of ``run_dir`` at ``epoch`` (default latest) as a :class:`MapModel`."""
    from cryoscape.train.volumes import load_trained_model

    decoder, _, state = load_trained_model(run_dir, epoch=epoch, device=device)
    pixel = state.get("data", {}).get("pixel_size_angstrom")
    if pixel is None or not np.isfinite(pixel) or not pixel > 0:
        log.info("the run has no pixel size; writing maps with 1 angstrom per training pixel")
        pixel = 1.0
    return MapModel(decoder=decoder, box_size=int(state["data"]["box_size"]), pixel_size_angstrom=float(pixel),
                    epoch=int(state["epoch"]), device=torch.device(device), history=list(state.get("history") or []))


@dataclass
class MapSet:
    """Maps written by :func:`generate_maps`.

    Attributes
    ----------
    paths
        The ``.mrc`` files, in latent order.
    projections
        ``(M, 3, n, n)`` float32 sums of each map along z, y and x (for thumbnails).
    pixel_size_angstrom
        Pixel size written in the headers.
    seconds
        Wall time spent generating and writing the maps.
    """

    paths: list[Path]
    projections: np.ndarray
    pixel_size_angstrom: float
    seconds: float = 0.0


def generate_maps(
    model: MapModel,
    z: np.ndarray | None,
    out_dir: str | os.PathLike,
    *,
    box_size: int | None = None,
    lowpass_angstrom: float | None = None,
    flip: bool = False,
    invert: bool = False,
    prefix: str = "vol_",
    amp: bool | None = None,
    progress: bool = True,
    write_z_values: bool = True,
) -> MapSet:
    """Write one map per latent row of ``z`` (``vol_000.mrc``, ...) into ``out_dir``.

    Parameters
    ----------
    model
        From :func:`load_map_model`.
    z
        ``(M, zdim)`` latents (``None`` for a homogeneous run: one map).
    box_size
        Output box ``n`` (default the training box; the field of view is kept, so the pixel is
        ``D / n`` training pixels).
    lowpass_angstrom, flip, invert
        Post-processing as in ``cryoscape volumes``.
    amp
        bfloat16 matrix products (``None``: where the hardware is fast at it).
    write_z_values
        Also write ``z_values.txt`` (the latents, one per line).
    """
    import time

    from tqdm.auto import tqdm

    from cryoscape.models.precision import autocast, resolve_amp
    from cryoscape.train.volumes import write_map

    start_time = time.perf_counter()
    decoder = model.decoder
    D = model.box_size
    n = int(box_size) if box_size else D
    if n < 2:
        raise InputError(f"--box-size {box_size} is too small; pass at least 2 pixels.")
    if lowpass_angstrom is not None and not lowpass_angstrom > 0:
        raise InputError(f"--lowpass {lowpass_angstrom} is not positive; pass a resolution in angstroms.")
    pixel_out = model.pixel_size_angstrom * D / n
    if model.zdim == 0:
        latents: list[np.ndarray | None] = [None]
    else:
        if z is None:
            raise InputError(f"the run has zdim {model.zdim}; latents are needed to make its maps.")
        z = np.asarray(z, dtype=np.float32).reshape(-1, model.zdim)
        latents = list(z)
    use_amp = resolve_amp(amp, model.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    names = map_paths(out, len(latents), prefix=prefix)
    projections = np.zeros((len(latents), 3, n, n), dtype=np.float32)
    for i, zi in enumerate(tqdm(latents, desc="maps", unit="map", disable=not progress, leave=False)):
        with torch.no_grad(), autocast(model.device, use_amp):
            zt = None if zi is None else torch.as_tensor(zi, device=model.device)
            volume = decoder.eval_volume(zt, box_size=n).to(torch.float32)
        array = write_map(volume, names[i], pixel_size_angstrom=pixel_out, lowpass_angstrom=lowpass_angstrom,
                          flip=flip, invert=invert)
        paths.append(names[i])
        for axis in range(3):
            projections[i, axis] = array.sum(axis=axis)
    if write_z_values and model.zdim > 0:
        np.savetxt(out / "z_values.txt", z, fmt="%.6g")
    from cryoscape.analysis.atomic import write_atomic_models

    write_atomic_models(decoder, latents, names)  # an atomic decoder's models next to its maps
    seconds = time.perf_counter() - start_time
    log.info("wrote %d map(s) of %d^3 voxels at %.4g A/pixel (epoch %d%s) to %s in %.1f s",
             len(paths), n, pixel_out, model.epoch, ", bfloat16" if use_amp else "", out, seconds)
    return MapSet(paths=paths, projections=projections, pixel_size_angstrom=pixel_out, seconds=seconds)


def read_map_set(paths: list[Path]) -> np.ndarray:
    """``(M, n, n, n)`` float32 stack of the maps at ``paths`` (one map set of an analysis)."""
    from cryoscape.io.mrc import read_mrc

    return np.stack([np.asarray(read_mrc(p)[0], dtype=np.float32) for p in paths])
