"""Maps from a trained run: rebuild the decoder from the run folder and evaluate it at latents.

Scale and pixel size
--------------------
Maps are ``decoder.eval_volume(z, box_size=n)`` unchanged (units of the normalised training
data, see :mod:`cryoscape.models.base`), optionally low-pass filtered, mirrored (``flip``:
the z axis reversed, which changes the hand) and negated (``invert``).  A box ``n`` different
from the training box ``D`` keeps the field of view, so the pixel size written in the header
is ``training pixel * D / n``.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.errors import InputError
from cryoscape.train.checkpoint import find_checkpoint, load_checkpoint

__all__ = ["load_trained_model", "load_latent_file", "read_latents", "map_paths", "postprocess_map", "write_map",
           "decode_volumes"]

log = logging.getLogger(__name__)


def load_trained_model(
    run_dir: str | os.PathLike,
    *,
    epoch: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.nn.Module, torch.nn.Module | None, dict[str, Any]]:
    """``(decoder, encoder or None, checkpoint dict)`` of ``run_dir`` at ``epoch`` (default latest), in eval mode."""
    from cryoscape.models.base import build_saved_decoder
    from cryoscape.models.encoders import build_encoder

    path = find_checkpoint(run_dir, epoch)
    state = load_checkpoint(path, map_location="cpu")
    spec = state["decoder"]
    decoder = build_saved_decoder(spec["name"], spec["config"])
    decoder.load_state_dict(spec["state"])
    decoder.to(device).eval()
    encoder = None
    if state.get("encoder") is not None:
        encoder = build_encoder(state["encoder"]["config"])
        encoder.load_state_dict(state["encoder"]["state"])
        encoder.to(device).eval()
    return decoder, encoder, state


def load_latent_file(path: str | os.PathLike, *, option: str = "") -> np.ndarray:
    """The float32 array in a latent file: ``.npy``, ``.pkl`` (cryoDRGN's ``z.pkl``) or text.

    ``option`` (e.g. ``"--z "``) prefixes the file in the one-sentence errors for a missing or
    unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{option}{p} was not found; pass a .npy, .pkl or .txt file of latents.")
    try:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif p.suffix == ".pkl":
            with open(p, "rb") as f:
                arr = pickle.load(f)
        else:
            arr = np.loadtxt(p, ndmin=2)
        return np.asarray(arr, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user error
        raise InputError(f"{option}{p} could not be read as latents ({type(err).__name__}); pass a .npy, .pkl or "
                         ".txt array (one latent per row).") from None


def read_latents(path: str | os.PathLike | None = None, values: list[float] | None = None, *,
                 zdim: int) -> np.ndarray:
    """Latents ``(M, zdim)`` float32 from a .txt/.npy/.pkl file or a flat list of numbers.

    A file holding ``(N, zdim)`` latents (e.g. ``z.E.npy``) or one latent per line; a list is
    read row by row (``zdim`` numbers per map).
    """
    if (path is None) == (values is None):
        raise InputError("pass either a latent file (--z) or latent values (--z-values), not both or neither.")
    if path is not None:
        p = Path(path)
        arr = load_latent_file(p).astype(np.float64)
        where = str(p)
    else:
        arr = np.asarray(values, dtype=np.float64)
        where = "--z-values"
    if arr.ndim == 1:
        if arr.size % max(zdim, 1):
            raise InputError(f"{where} holds {arr.size} numbers, not a multiple of the run's zdim {zdim}; "
                             f"give {zdim} numbers per map.")
        arr = arr.reshape(-1, zdim)
    if arr.ndim != 2 or arr.shape[1] != zdim:
        raise InputError(f"{where} holds latents of shape {arr.shape} but the run has zdim {zdim}; "
                         f"pass latents with {zdim} columns.")
    if not np.isfinite(arr).all():
        raise InputError(f"{where} holds NaN or infinite latents; remove them.")
    return arr.astype(np.float32)


def map_paths(out_dir: str | os.PathLike, n_maps: int, *, prefix: str = "vol_") -> list[Path]:
    """The files written for ``n_maps`` latents: ``vol_000.mrc``, ... (at least three digits, more
    when needed)."""
    width = max(3, len(str(max(n_maps, 1) - 1)))
    return [Path(out_dir) / f"{prefix}{i:0{width}d}.mrc" for i in range(n_maps)]


def postprocess_map(volume: torch.Tensor, *, pixel_size_angstrom: float, lowpass_angstrom: float | None = None,
                    flip: bool = False, invert: bool = False) -> torch.Tensor:
    """A decoded map low-passed, hand-flipped and inverted as asked (what every written map gets)."""
    from cryoscape.fourier.filters import lowpass_filter

    if lowpass_angstrom is not None:
        volume = lowpass_filter(volume, float(lowpass_angstrom), pixel_size_angstrom, ndim=3)
    if flip:
        volume = volume.flip(0)
    if invert:
        volume = -volume
    return volume


def write_map(volume: torch.Tensor, path: str | os.PathLike, *, pixel_size_angstrom: float,
              lowpass_angstrom: float | None = None, flip: bool = False, invert: bool = False) -> np.ndarray:
    """Post-process a decoded map (:func:`postprocess_map`) and write it; returns the array.

    The one place ``cryoscape volumes`` and the analysis commands turn ``eval_volume`` output into
    a file, so their maps agree.
    """
    from cryoscape.io.mrc import write_mrc

    volume = postprocess_map(volume, pixel_size_angstrom=pixel_size_angstrom, lowpass_angstrom=lowpass_angstrom,
                             flip=flip, invert=invert)
    array = volume.cpu().numpy()
    write_mrc(path, array, pixel_size_angstrom=pixel_size_angstrom)
    return array


def decode_volumes(
    run_dir: str | os.PathLike,
    z: np.ndarray | None,
    out_dir: str | os.PathLike,
    *,
    epoch: int | None = None,
    box_size: int | None = None,
    lowpass_angstrom: float | None = None,
    flip: bool = False,
    invert: bool = False,
    prefix: str = "vol_",
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[Path]:
    """Write one map per latent row of ``z`` (``vol_000.mrc``, ...) into ``out_dir``.

    Parameters
    ----------
    run_dir
        A ``cryoscape train`` run folder (or one of its ``.pt`` files).
    z
        ``(M, zdim)`` latents; ``None`` (or ignored) for a homogeneous run, which gives one map.
    epoch
        Which saved epoch (default: the latest checkpoint).
    box_size
        Output box ``n`` (default the training box).
    lowpass_angstrom
        Low-pass filter the maps to this resolution (soft edge).
    flip, invert
        Mirror the hand (reverse the z axis) / negate the density.

    Returns
    -------
    The written paths.
    """
    from tqdm.auto import tqdm

    decoder, _, state = load_trained_model(run_dir, epoch=epoch, device=device)
    D = int(state["data"]["box_size"])
    n = int(box_size) if box_size else D
    if n < 2:
        raise InputError(f"--box-size {box_size} is too small; pass at least 2 pixels.")
    pixel = state["data"].get("pixel_size_angstrom")
    if pixel is None or not np.isfinite(pixel):
        pixel = 1.0
        log.info("the run has no pixel size; writing maps with 1 angstrom per training pixel")
    pixel_out = float(pixel) * D / n
    if decoder.zdim == 0:
        latents: list[torch.Tensor | None] = [None]
    else:
        if z is None:
            raise InputError(f"the run has zdim {decoder.zdim}; pass latents with --z FILE or --z-values.")
        z = np.asarray(z, dtype=np.float32).reshape(-1, decoder.zdim)
        latents = [torch.as_tensor(row, device=device) for row in z]
    if lowpass_angstrom is not None and not lowpass_angstrom > 0:
        raise InputError(f"--lowpass {lowpass_angstrom} is not positive; pass a resolution in angstroms.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = map_paths(out, len(latents), prefix=prefix)
    for zi, path in zip(tqdm(latents, desc="volumes", unit="map", disable=not progress, leave=False), paths):
        volume = decoder.eval_volume(zi, box_size=n).to(torch.float32)
        write_map(volume, path, pixel_size_angstrom=pixel_out, lowpass_angstrom=lowpass_angstrom, flip=flip,
                  invert=invert)
    for zi, path in zip(latents, paths):  # an atomic decoder's model next to each map (vol_XXX.pdb)
        decoder.write_atomic_model(path.with_suffix(".pdb"), zi)
    if decoder.zdim > 0:
        np.savetxt(out / "z_values.txt", z, fmt="%.6g")
    log.info("wrote %d map(s) of %d^3 voxels at %.4g A/pixel (epoch %d) to %s",
             len(paths), n, pixel_out, state["epoch"], out)
    return paths
