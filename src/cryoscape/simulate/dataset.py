"""Write a simulated dataset in real file formats, with its ground truth.

Output folder
-------------
``particles.mrcs``
    ``(N, D, D)`` float32 image stack, written batch by batch into a memory-mapped temporary
    file and renamed into place when complete.
``particles.star``
    RELION 3.1 (``data_optics``: pixel size, box, voltage, Cs, amplitude contrast;
    ``data_particles``: ``rlnImageName`` as ``i@particles.mrcs`` relative to the STAR file,
    eulers, ``rlnOriginXAngst/YAngst``, defoci; ``rlnCtfBfactor`` when a B-factor is applied).
``poses.pkl``, ``ctf.pkl``
    cryoDRGN formats (rotations unchanged, shifts as box fractions; ``(N, 9)`` CTF array).
``gt_volumes/vol_XXX.mrc``
    The M ground-truth volumes (``XXX`` = state index, 0-based).
``ground_truth.npz``
    Per image: ``state_index``, ``coordinate`` (hinge angle in degrees, trajectory ``u``, or NaN;
    ``coordinate_name`` says which), ``rotations``, ``shifts_pixel``, defoci; per state:
    ``volume_files`` (relative paths), ``state_values``, ``populations``, ``state_labels``; and
    ``kind``, ``snr``, ``noise_std``, ``signal_variance``, ``box_size``, ``pixel_size_angstrom``,
    ``b_factor_angstrom2``, ``seed``.  Load with ``np.load(path)`` (no pickles).
``config.yaml``
    cryoscape version, the arguments, and the noise level reached.
``simulate.log``
    A few lines summarising the run.

Every file is written under a temporary name and renamed, so a crash never leaves a
half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from cryoscape import __version__
from cryoscape.io.cryodrgn import write_ctf_pkl, write_poses_pkl
from cryoscape.io.mrc import write_mrc
from cryoscape.io.particles import ParticleTable
from cryoscape.io.star import write_star
from cryoscape.io.writers import atomic_write
from cryoscape.simulate.ensembles import Ensemble
from cryoscape.simulate.images import (
    DEFAULT_DEFOCUS_RANGE_ANGSTROM,
    ImageParameters,
    SimulationResult,
    sample_image_parameters,
    simulate_images,
)

__all__ = ["simulate_dataset", "STACK_NAME", "STAR_NAME", "GROUND_TRUTH_NAME", "VOLUME_DIR"]

STACK_NAME = "particles.mrcs"
STAR_NAME = "particles.star"
POSES_NAME = "poses.pkl"
CTF_NAME = "ctf.pkl"
GROUND_TRUTH_NAME = "ground_truth.npz"
VOLUME_DIR = "gt_volumes"
CONFIG_NAME = "config.yaml"
LOG_NAME = "simulate.log"


def _write_stack(
    path: Path,
    ensemble: Ensemble,
    params: ImageParameters,
    *,
    snr: float | None,
    seed: int,
    batch_size: int | None,
    device: Any,
    oversampling: int,
    progress: bool,
) -> SimulationResult:
    """Stream the images into a memory-mapped temporary MRC stack, then rename it onto ``path``."""
    import mrcfile

    N, D = len(params), params.box_size
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    mrc = mrcfile.new_mmap(str(tmp), shape=(N, D, D), mrc_mode=2, overwrite=True)
    try:
        mrc.set_image_stack()
        mrc.voxel_size = float(params.pixel_size_angstrom)
        result = simulate_images(
            ensemble, params, snr=snr, seed=seed, out=mrc.data, batch_size=batch_size, device=device,
            oversampling=oversampling, progress=progress,
        )
        stats = result.image_stats
        h = mrc.header
        if N:
            h.dmin, h.dmax = np.float32(stats["min"]), np.float32(stats["max"])
            h.dmean, h.rms = np.float32(stats["mean"]), np.float32(stats["rms"])
        mrc.flush()
        mrc.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            mrc.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    result.images = None  # the memmap is closed; the images live in ``path``
    return result


def _particle_table(out_dir: Path, params: ImageParameters) -> ParticleTable:
    N = len(params)
    stack = str((out_dir / STACK_NAME).resolve())
    rows = pd.DataFrame({"rlnImageName": pd.Series([f"{i + 1:06d}@{STACK_NAME}" for i in range(N)], dtype=object)})
    rows["rlnPhaseShift"] = np.asarray(params.ctf.phase_shift_deg, dtype=np.float64)
    if params.b_factor_angstrom2 != 0:
        rows["rlnCtfBfactor"] = np.full(N, params.b_factor_angstrom2)
    return ParticleTable(
        image_paths=np.full(N, stack, dtype=object),
        image_indices=np.arange(N, dtype=np.int64),
        box_size=params.box_size,
        pixel_size_angstrom=np.full(N, params.pixel_size_angstrom),
        rotations=params.rotations,
        shifts_pixel=params.shifts_pixel,
        ctf=params.ctf,
        star_rows=rows,
        source_path=str(out_dir / STAR_NAME),
    )


def _plain(value: Any) -> Any:
    """YAML-safe copy of an argument (paths -> str, tuples -> lists, numpy -> python)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def simulate_dataset(
    out_dir: str | os.PathLike,
    *,
    ensemble: Ensemble,
    n_images: int,
    seed: int = 0,
    snr: float | None = 0.1,
    defocus_range_angstrom: Sequence[float] = DEFAULT_DEFOCUS_RANGE_ANGSTROM,
    astigmatism_angstrom: float = 0.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    b_factor_angstrom2: float = 0.0,
    shift_max_pixel: float = 0.0,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    oversampling: int = 2,
    progress: bool = False,
    arguments: dict[str, Any] | None = None,
) -> Path:
    """Simulate ``n_images`` particle images of ``ensemble`` and write them with their ground truth.

    Parameters
    ----------
    out_dir
        Output folder (created; files of a previous run are replaced).  See the module
        docstring for what is written.
    ensemble
        Ground-truth volumes and the rule assigning images to them (simulate/ensembles.py).
    n_images
        N.
    seed
        Fixes every random draw (states, poses, CTF, shifts, noise).
    snr
        Signal variance over noise variance (simulate/images.py); None or inf: noiseless.
    defocus_range_angstrom, astigmatism_angstrom, voltage_kv, cs_mm, amplitude_contrast,
    b_factor_angstrom2, shift_max_pixel
        Image parameters (see :func:`cryoscape.simulate.images.sample_image_parameters`).
    batch_size, device, oversampling, progress
        Passed to :func:`cryoscape.simulate.images.simulate_images`.
    arguments
        What to record in ``config.yaml`` as the run's arguments (e.g. the command line's);
        default: this function's own arguments.

    Returns
    -------
    Path
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    n_images = int(n_images)
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    image_options = dict(defocus_range_angstrom=defocus_range_angstrom, astigmatism_angstrom=astigmatism_angstrom,
                         voltage_kv=voltage_kv, cs_mm=cs_mm, amplitude_contrast=amplitude_contrast,
                         b_factor_angstrom2=b_factor_angstrom2, shift_max_pixel=shift_max_pixel)
    params = sample_image_parameters(n_images, ensemble, seed=seed, **image_options)

    # ground-truth volumes first: they are what every later check compares against
    volume_files = _write_volumes(out_dir, ensemble)

    result = _write_stack(
        out_dir / STACK_NAME, ensemble, params, snr=snr, seed=seed, batch_size=batch_size, device=device,
        oversampling=oversampling, progress=progress,
    )

    _write_image_truth(out_dir, ensemble, params, result, volume_files, seed=seed, image_options=image_options)
    if arguments is None:
        arguments = dict(n_images=n_images, seed=seed, snr=snr, **image_options, batch_size=batch_size,
                         oversampling=oversampling)
    _write_config_and_log(out_dir, ensemble, result, arguments=arguments, started=started, n_images=n_images)
    return out_dir


def _write_volumes(out_dir: Path, ensemble: Ensemble) -> list[str]:
    """Write each state's ground-truth volume as ``gt_volumes/vol_MMM.mrc``; their paths relative to ``out_dir``."""
    pixel = float(ensemble.pixel_size_angstrom)
    (out_dir / VOLUME_DIR).mkdir(exist_ok=True)
    volume_files = [f"{VOLUME_DIR}/vol_{m:03d}.mrc" for m in range(ensemble.n_states)]
    for m, name in enumerate(volume_files):
        write_mrc(out_dir / name, ensemble.volumes[m], pixel_size_angstrom=pixel, is_stack=False)
    return volume_files


def _write_image_truth(out_dir: Path, ensemble: Ensemble, params: ImageParameters, result: SimulationResult,
                       volume_files: list[str], *, seed: int, image_options: dict[str, Any]) -> None:
    """Write each image's truth: its pose and CTF (STAR, poses.pkl, ctf.pkl) and all of it (ground_truth.npz)."""
    D, pixel = ensemble.box_size, float(ensemble.pixel_size_angstrom)
    table = _particle_table(out_dir, params)
    write_star(out_dir / STAR_NAME, table)
    write_poses_pkl(out_dir / POSES_NAME, params.rotations, params.shifts_pixel, box_size=D)
    write_ctf_pkl(out_dir / CTF_NAME, params.ctf.to_cryodrgn_array(D, pixel))
    _write_ground_truth(out_dir / GROUND_TRUTH_NAME, ensemble, params, result, volume_files, seed=seed,
                        **image_options)


def _write_ground_truth(path: Path, ensemble: Ensemble, params, result, volume_files: list[str], *, seed: int,
                        voltage_kv: float, cs_mm: float, amplitude_contrast: float, b_factor_angstrom2: float,
                        **_: Any) -> None:
    """``ground_truth.npz``: each image's state, coordinate, pose and CTF, the volumes and the noise level."""
    c = params.ctf
    with atomic_write(path) as f:
        np.savez(
            f,
            kind=np.array(ensemble.kind),
            coordinate_name=np.array(ensemble.coordinate_name),
            coordinate_range=np.asarray(ensemble.coordinate_range, dtype=np.float64),
            state_index=params.state_index,
            coordinate=params.coordinate,
            rotations=params.rotations,
            shifts_pixel=params.shifts_pixel,
            defocus_u_angstrom=c.defocus_u_angstrom,
            defocus_v_angstrom=c.defocus_v_angstrom,
            defocus_angle_deg=c.defocus_angle_deg,
            volume_files=np.array(volume_files),
            state_values=ensemble.state_values,
            populations=ensemble.populations,
            state_labels=np.array(ensemble.labels),
            snr=np.float64(result.snr),
            noise_std=np.float64(result.noise_std),
            signal_variance=np.float64(result.signal_variance),
            box_size=np.int64(ensemble.box_size),
            pixel_size_angstrom=np.float64(ensemble.pixel_size_angstrom),
            voltage_kv=np.float64(voltage_kv),
            cs_mm=np.float64(cs_mm),
            amplitude_contrast=np.float64(amplitude_contrast),
            b_factor_angstrom2=np.float64(b_factor_angstrom2),
            seed=np.int64(seed),
        )


def _write_config_and_log(out_dir: Path, ensemble: Ensemble, result, *, arguments: dict[str, Any],
                          started: datetime.datetime, n_images: int) -> None:
    """``config.yaml`` (arguments and dataset summary) and the short ``simulate.log``."""
    D, pixel = ensemble.box_size, float(ensemble.pixel_size_angstrom)
    config = {
        "cryoscape_version": __version__,
        "command": "simulate",
        "created": started.isoformat(timespec="seconds"),
        "arguments": _plain(arguments),
        "dataset": {
            "n_images": n_images,
            "box_size": D,
            "pixel_size_angstrom": pixel,
            "heterogeneity": ensemble.kind,
            "n_states": ensemble.n_states,
            "coordinate_name": ensemble.coordinate_name,
            "snr": _plain(float(result.snr)),
            "signal_variance": float(result.signal_variance),
            "noise_std": float(result.noise_std),
        },
    }
    with atomic_write(out_dir / CONFIG_NAME, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)

    elapsed = (datetime.datetime.now().astimezone() - started).total_seconds()
    lines = [
        f"cryoscape {__version__} simulate, started {started.isoformat(timespec='seconds')}",
        f"{n_images} images of {D}x{D} pixels at {pixel:g} A/pixel; heterogeneity {ensemble.kind} "
        f"with {ensemble.n_states} ground-truth volume(s)",
        f"signal variance {result.signal_variance:.6g} over all pixels of the clean images; "
        f"snr {result.snr:g}; noise std {result.noise_std:.6g}",
        f"finished in {elapsed:.1f} s",
    ]
    with atomic_write(out_dir / LOG_NAME, "w") as f:
        f.write("\n".join(lines) + "\n")
