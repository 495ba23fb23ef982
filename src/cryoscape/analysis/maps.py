"""Maps of a trained run at many latents, for analyses (k-means centres, PC and graph traversals).

What differs from ``cryoscape volumes`` (:func:`cryoscape.train.volumes.decode_volumes`)
---------------------------------------------------------------------------------------------
The model is loaded once and every map is generated from it, and by default (``sphere=True``)
the decoder is evaluated only at the frequencies it was trained on: the training loss covers
the circle ``|k| < D/2`` of every image (:mod:`cryoscape.data.training`), so the decoder is fit
inside the sphere ``|k| < 1/2`` cycles per training pixel and its values in the corners of the
cube are untrained extrapolation.  Those are set to zero (a sharp low-pass at Nyquist, as
cryoDRGN's map evaluation also does), and in the Fourier domain only the canonical half of
the sphere is evaluated (the rest is ``F(-k) = conj F(k)``): 26 % of the cube's points, about
half of what ``eval_volume`` evaluates.  Inside the sphere the values are the decoder's own,
point for point (tests/analysis/test_maps.py checks this against ``eval_volume``).
``sphere=False`` calls ``decoder.eval_volume`` and so gives exactly ``cryoscape volumes``'s maps.

Mixed precision: ``amp=None`` follows the training loop's rule
(:func:`cryoscape.train.loop.resolve_amp`): the decoder's matrix products run in bfloat16 where
the hardware has fast bfloat16 (CPUs with AVX512-BF16/AMX, recent GPUs); the positional encoding
and the FFT stay in float32.

Scale, pixel size, ``flip`` and ``invert`` are those of :mod:`cryoscape.train.volumes`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.errors import InputError

__all__ = ["MapModel", "load_map_model", "MapGrid", "plan_map_grid", "default_chunk_points", "evaluate_map", "MapSet",
           "generate_maps"]

log = logging.getLogger(__name__)


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
class MapGrid:
    """Which grid points of an ``n^3`` map to evaluate and how to fill the rest.

    Attributes
    ----------
    n, training_box
        Output box and training box ``D``.
    domain
        ``"fourier"`` or ``"hartley"``.
    coords
        ``(P, 3)`` float32 frequencies ``(kx, ky, kz)`` in cycles per training pixel to evaluate.
    eval_index
        ``(P,)`` flat grid index of each evaluated point.
    fill_index, fill_source
        Flat indices of points set to the conjugate of the value at ``fill_source`` (Fourier).
    """

    n: int
    training_box: int
    domain: str
    coords: torch.Tensor
    eval_index: torch.Tensor
    fill_index: torch.Tensor
    fill_source: torch.Tensor


@functools.lru_cache(maxsize=4)
def plan_map_grid(n: int, *, training_box: int, domain: str = "fourier") -> MapGrid:
    """Points of an ``n^3`` grid inside the training sphere ``|k| < 1/2`` (module docstring).

    Grid index ``i`` along an axis has frequency ``(i - n//2) / D``.  In the Fourier domain only
    points outside the Hermitian "negative" half-space (see
    :func:`cryoscape.models.neural_field.hermitian_negative_mask`) are evaluated, plus negative
    points whose mirror ``2*(n//2) - i`` falls off the grid (the -Nyquist planes of even boxes);
    the other negative points are filled with the conjugate of their mirror.  Plans are cached
    (the last 4), so the many maps of one analysis share one.
    """
    from cryoscape.models.neural_field import hermitian_negative_mask

    if n < 1:
        raise InputError(f"box size {n} is not positive; pass --box-size 2 or more.")
    h = n // 2
    i = torch.arange(n, dtype=torch.int32)
    c = i - h
    cz, cy, cx = torch.meshgrid(c, c, c, indexing="ij")
    # |k| < 1/2 cycles per training pixel  <=>  4 (cx^2 + cy^2 + cz^2) < D^2, in exact integers
    inside = 4 * (cx.long() ** 2 + cy.long() ** 2 + cz.long() ** 2) < training_box * training_box
    flat = torch.arange(n**3, dtype=torch.int64).reshape(n, n, n)
    if domain == "hartley":
        evaluate = inside
        fill = torch.zeros_like(inside)
    elif domain == "fourier":
        coords_int = torch.stack([cx, cy, cz], dim=-1)
        negative = hermitian_negative_mask(coords_int)
        mirror_ok = (2 * h - i) < n  # index 0 of an even box has no mirror on the grid
        has_mirror = mirror_ok[:, None, None] & mirror_ok[None, :, None] & mirror_ok[None, None, :]
        evaluate = inside & (~negative | ~has_mirror)
        fill = inside & negative & has_mirror
    else:
        raise ValueError(f"unknown decoder domain {domain!r}")
    eval_index = flat[evaluate]
    coords = torch.stack([cx[evaluate], cy[evaluate], cz[evaluate]], dim=-1).to(torch.float32) / training_box
    fill_index = flat[fill]
    mz, my, mx = (2 * h - cz[fill] - h), (2 * h - cy[fill] - h), (2 * h - cx[fill] - h)
    fill_source = (mz.long() * n + my) * n + mx
    return MapGrid(n=n, training_box=int(training_box), domain=domain, coords=coords, eval_index=eval_index,
                   fill_index=fill_index, fill_source=fill_source)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def default_chunk_points(decoder: torch.nn.Module) -> int:
    """Points per decoder call: small enough that a layer's activations (``points x width``
    floats, 2 MB at width 256) stay in the CPU's caches.

    Measured on a 256 x 3 decoder at D = 64 (2 cores): 2048 points per call evaluate a map 4-8x
    faster than 131072 (whose 134 MB activations go through main memory), in float32 and bfloat16.
    """
    width = int(getattr(decoder, "config", {}).get("width", 256) or 256)
    return int(min(16384, max(512, 2**19 // max(width, 1))))


@torch.no_grad()
def evaluate_map(decoder: torch.nn.Module, z: torch.Tensor | np.ndarray | None, grid: MapGrid, *,
                 amp: bool = False, chunk_points: int | None = None) -> torch.Tensor:
    """Real-space map ``(n, n, n)`` float32 ``[z, y, x]`` of ``decoder`` at latent ``z`` on ``grid``.

    Same scale as ``decoder.eval_volume`` (boxes ``n != D`` are multiplied by ``(n / D)^3``).
    ``chunk_points``: points per decoder call (default :func:`default_chunk_points`).
    """
    from cryoscape.fourier.fft import ifft3_center, iht3_center

    device = next(decoder.parameters()).device
    chunk_points = int(chunk_points) if chunk_points else default_chunk_points(decoder)
    n = grid.n
    if z is not None:
        z = torch.as_tensor(np.asarray(z, dtype=np.float32) if not torch.is_tensor(z) else z,
                            dtype=torch.float32, device=device).reshape(1, -1)
    coords = grid.coords.to(device)
    complex_out = grid.domain == "fourier"
    values = torch.zeros(n**3, dtype=torch.complex64 if complex_out else torch.float32, device=device)
    parts = []
    with _autocast(device, amp):
        for start in range(0, coords.shape[0], chunk_points):
            out = decoder(coords[None, start : start + chunk_points], z)[0]
            parts.append(out.to(values.dtype))
    if parts:
        values[grid.eval_index.to(device)] = torch.cat(parts)
    if complex_out and grid.fill_index.numel():
        values[grid.fill_index.to(device)] = values[grid.fill_source.to(device)].conj()
    values = values.reshape(n, n, n)
    volume = ifft3_center(values).real if complex_out else iht3_center(values)
    if n != grid.training_box:
        volume = volume * (n / grid.training_box) ** 3
    return volume.to(torch.float32).contiguous()


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
    sphere: bool = True,
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
    sphere
        Evaluate only inside the training sphere (default; module docstring), or call
        ``eval_volume`` (``False``).
    amp
        bfloat16 matrix products (``None``: where the hardware is fast at it).
    write_z_values
        Also write ``z_values.txt`` (the latents, one per line).
    """
    import time

    from tqdm.auto import tqdm

    from cryoscape.fourier.filters import lowpass_filter
    from cryoscape.io.mrc import write_mrc
    from cryoscape.train.loop import resolve_amp

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
    grid = plan_map_grid(n, training_box=D, domain=getattr(decoder, "domain", "fourier")) if sphere else None
    takes_chunk = "chunk_points" in inspect.signature(decoder.eval_volume).parameters
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(latents) - 1)))
    paths: list[Path] = []
    projections = np.zeros((len(latents), 3, n, n), dtype=np.float32)
    for i, zi in enumerate(tqdm(latents, desc="maps", unit="map", disable=not progress, leave=False)):
        if grid is not None:
            volume = evaluate_map(decoder, zi, grid, amp=use_amp)
        else:
            with torch.no_grad(), _autocast(model.device, use_amp):
                zt = None if zi is None else torch.as_tensor(zi, device=model.device)
                extra = {"chunk_points": default_chunk_points(decoder)} if takes_chunk else {}
                volume = decoder.eval_volume(zt, box_size=n, **extra).to(torch.float32)
        if lowpass_angstrom is not None:
            volume = lowpass_filter(volume, float(lowpass_angstrom), pixel_out, ndim=3)
        if flip:
            volume = volume.flip(0)
        if invert:
            volume = -volume
        array = volume.cpu().numpy()
        path = out / f"{prefix}{i:0{width}d}.mrc"
        write_mrc(path, array, pixel_size_angstrom=pixel_out)
        paths.append(path)
        for axis in range(3):
            projections[i, axis] = array.sum(axis=axis)
    if write_z_values and model.zdim > 0:
        np.savetxt(out / "z_values.txt", z, fmt="%.6g")
    seconds = time.perf_counter() - start_time
    log.info("wrote %d map(s) of %d^3 voxels at %.4g A/pixel (epoch %d%s) to %s in %.1f s",
             len(paths), n, pixel_out, model.epoch, ", bfloat16" if use_amp else "", out, seconds)
    return MapSet(paths=paths, projections=projections, pixel_size_angstrom=pixel_out, seconds=seconds)
