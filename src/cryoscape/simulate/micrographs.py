"""Whole micrographs: projections placed at random positions, CTF per micrograph, noise.

Image formation (per micrograph ``g``)
--------------------------------------
::

    clean_g  = sum_i  box_i( P R_i V_{state i} )           (D x D projections, fourier/slicing.py)
    signal_g = IFFT( C_g(k) * FFT(clean_g) )                (the CTF acts on the whole micrograph)
    mic_g    = signal_g + white Gaussian noise

``box_i`` puts the ``D x D`` projection with its centre (index ``D // 2``) on the integer pixel
``(x_i, y_i)`` of the micrograph.  The CTF is applied to the whole micrograph, so signal that
the CTF delocalises beyond a particle's box is kept, as in a real exposure.  There is no
contrast inversion: with the CTF of fourier/ctf.py (negative at low frequency) protein is dark,
as in a raw micrograph (extracted particles are the ones written white; see simulate/images.py).

Placement
---------
Centres are drawn uniformly with the whole box inside the micrograph, one after another, and a
draw closer than ``min_distance_pixel`` to an earlier centre along *both* axes (Chebyshev
distance) is rejected.  ``min_distance_pixel = 2 D`` (the default, "separated") guarantees that
every ``D x D`` patch of any patch grid cuts at most one particle box, the model of the
micrograph EM (seed 004); ``D`` keeps the boxes disjoint but lets a patch cut up to four
("arbitrary spacing"); smaller values let projections overlap.

SNR (per pixel of the particle area)
------------------------------------
The signal variance is the variance of ``signal_g`` over every pixel that lies inside some
particle's ``D x D`` box, over all micrographs; white noise of variance ``signal variance / snr``
is added everywhere.  For a particle stack this is the convention of simulate/images.py (the
variance over the ``D x D`` boxes), so an SNR means the same in both.

Coordinates
-----------
``positions_pixel[:, 0]`` is x (column) and ``[:, 1]`` is y (row), 0-based, the pixel on which the
box centre sits; they are written as ``rlnCoordinateX/Y``.

Every random draw comes from one seed (split into streams for placement, rotations, CTF and
noise), so runs are reproducible; micrographs are computed one at a time (memory: one
micrograph plus one batch of projections).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cryoscape.errors import InputError
from cryoscape.fourier.ctf import evaluate_ctf
from cryoscape.fourier.slicing import prepare_projection_volume, project_prepared
from cryoscape.geometry.rotations import random_rotations
from cryoscape.io.particles import CtfParameters
from cryoscape.simulate.ensembles import Ensemble

__all__ = [
    "MicrographTruth",
    "place_particles",
    "sample_micrograph_truth",
    "render_clean_micrograph",
    "micrograph_ctf_rfft",
    "apply_ctf_to_micrograph",
    "particle_box_mask",
    "prepare_volumes",
    "noise_std_for_snr",
    "simulate_micrographs",
]


@dataclass
class MicrographTruth:
    """Ground truth of a set of simulated micrographs.

    Attributes
    ----------
    shape
        ``(height, width)`` of every micrograph in pixels.
    micrograph_index
        ``(N,)`` micrograph of each particle.
    positions_pixel
        ``(N, 2)`` ``(x, y)`` box centres (0-based pixels).
    rotations
        ``(N, 3, 3)`` poses (DESIGN.md convention).
    state_index
        ``(N,)`` ensemble state of each particle.
    ctf
        :class:`CtfParameters` with one row per micrograph.
    box_size, pixel_size_angstrom, b_factor_angstrom2
        ``D``, the pixel size and the CTF envelope B-factor.
    """

    shape: tuple[int, int]
    micrograph_index: np.ndarray
    positions_pixel: np.ndarray
    rotations: np.ndarray
    state_index: np.ndarray
    ctf: CtfParameters
    box_size: int
    pixel_size_angstrom: float
    b_factor_angstrom2: float = 0.0

    @property
    def n_micrographs(self) -> int:
        return len(self.ctf)

    def particles_of(self, g: int) -> np.ndarray:
        """Indices of the particles of micrograph ``g``."""
        return np.flatnonzero(self.micrograph_index == g)


def place_particles(
    n: int, shape: Sequence[int], box_size: int, min_distance_pixel: float, rng: np.random.Generator,
    *, max_tries: int = 200,
) -> np.ndarray:
    """``(n, 2)`` integer ``(x, y)`` centres with whole boxes inside and Chebyshev spacing >= ``min_distance_pixel``.

    Raises InputError when ``max_tries * n`` draws cannot place ``n`` particles.
    """
    H, W = int(shape[0]), int(shape[1])
    D = int(box_size)
    lo, hi_x, hi_y = D // 2, W - (D - D // 2), H - (D - D // 2)
    if hi_x < lo or hi_y < lo:
        raise InputError(f"a micrograph of {W}x{H} pixels cannot hold a box of {D}; use larger micrographs.")
    placed = np.empty((0, 2), dtype=np.int64)
    for _ in range(max_tries * max(n, 1)):
        if len(placed) == n:
            break
        c = np.array([rng.integers(lo, hi_x + 1), rng.integers(lo, hi_y + 1)], dtype=np.int64)
        if len(placed) and (np.abs(placed - c).max(axis=1) < min_distance_pixel).any():
            continue
        placed = np.vstack([placed, c])
    if len(placed) < n:
        raise InputError(
            f"only {len(placed)} of {n} particles fit in a {W}x{H} micrograph at a spacing of "
            f"{min_distance_pixel:g} pixels; ask for fewer particles per micrograph or larger micrographs."
        )
    return placed


def sample_micrograph_truth(
    n_micrographs: int,
    particles_per_micrograph: int,
    ensemble: Ensemble,
    *,
    shape: Sequence[int] = (1024, 1024),
    min_distance_pixel: float | None = None,
    seed: int = 0,
    defocus_range_angstrom: Sequence[float] = (10000.0, 25000.0),
    astigmatism_angstrom: float = 0.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    b_factor_angstrom2: float = 0.0,
) -> MicrographTruth:
    """Draw positions, rotations, states and per-micrograph CTF (see the module docstring)."""
    D = ensemble.box_size
    spacing = 2.0 * D if min_distance_pixel is None else float(min_distance_pixel)
    streams = np.random.SeedSequence(int(seed)).spawn(4)
    rng_place, rng_ctf, rng_states = (np.random.default_rng(s) for s in (streams[0], streams[1], streams[3]))
    positions = [place_particles(particles_per_micrograph, shape, D, spacing, rng_place) for _ in range(n_micrographs)]
    N = n_micrographs * particles_per_micrograph
    gen = torch.Generator().manual_seed(int(streams[2].generate_state(1, np.uint64)[0] >> np.uint64(1)))
    rotations = random_rotations(N, generator=gen, dtype=torch.float64).numpy()
    states = ensemble.sample_states(N, rng_states).state_index
    lo, hi = (float(v) for v in defocus_range_angstrom)
    du = rng_ctf.uniform(lo, hi, size=n_micrographs)
    ctf = CtfParameters(
        defocus_u_angstrom=du,
        defocus_v_angstrom=du - rng_ctf.uniform(0.0, float(astigmatism_angstrom), size=n_micrographs),
        defocus_angle_deg=rng_ctf.uniform(0.0, 180.0, size=n_micrographs),
        voltage_kv=np.full(n_micrographs, float(voltage_kv)),
        cs_mm=np.full(n_micrographs, float(cs_mm)),
        amplitude_contrast=np.full(n_micrographs, float(amplitude_contrast)),
        phase_shift_deg=np.zeros(n_micrographs),
    )
    return MicrographTruth(
        shape=(int(shape[0]), int(shape[1])),
        micrograph_index=np.repeat(np.arange(n_micrographs), particles_per_micrograph),
        positions_pixel=np.concatenate(positions) if positions else np.zeros((0, 2), np.int64),
        rotations=rotations,
        state_index=np.asarray(states, dtype=np.int64),
        ctf=ctf,
        box_size=D,
        pixel_size_angstrom=float(ensemble.pixel_size_angstrom),
        b_factor_angstrom2=float(b_factor_angstrom2),
    )


def render_clean_micrograph(
    prepared_volumes: Sequence[torch.Tensor], truth: MicrographTruth, g: int, *, batch_size: int = 64
) -> torch.Tensor:
    """``(H, W)`` sum of the projections of micrograph ``g`` (no CTF), on the volumes' device.

    ``prepared_volumes[m]`` is state ``m`` after :func:`prepare_projection_volume`.
    """
    H, W = truth.shape
    D = truth.box_size
    like = prepared_volumes[0]
    canvas = torch.zeros(H, W, dtype=like.real.dtype, device=like.device)
    members = truth.particles_of(g)
    for m in np.unique(truth.state_index[members]):
        idx = members[truth.state_index[members] == m]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            rot = torch.as_tensor(truth.rotations[chunk], dtype=canvas.dtype, device=canvas.device)
            images = project_prepared(prepared_volumes[m], rot, box_size=D)
            for image, (x, y) in zip(images, truth.positions_pixel[chunk]):
                y0, x0 = int(y) - D // 2, int(x) - D // 2
                canvas[y0 : y0 + D, x0 : x0 + D] += image
    return canvas


def micrograph_ctf_rfft(
    shape: Sequence[int], pixel_size_angstrom: float, ctf: CtfParameters, row: int, *,
    b_factor_angstrom2: float = 0.0, device=None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """CTF of micrograph ``row`` of ``ctf`` on the ``(H, W // 2 + 1)`` grid of ``torch.fft.rfft2``."""
    H, W = int(shape[0]), int(shape[1])
    ky = torch.fft.fftfreq(H, d=pixel_size_angstrom, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(W, d=pixel_size_angstrom, device=device, dtype=torch.float64)
    freqs = torch.stack(torch.meshgrid(kx, ky, indexing="xy"), dim=-1)  # (H, W//2+1, 2) as (kx, ky)
    values = evaluate_ctf(
        freqs.reshape(-1, 2),
        defocus_u_angstrom=float(ctf.defocus_u_angstrom[row]),
        defocus_v_angstrom=float(ctf.defocus_v_angstrom[row]),
        defocus_angle_deg=float(ctf.defocus_angle_deg[row]),
        voltage_kv=float(ctf.voltage_kv[row]),
        cs_mm=float(ctf.cs_mm[row]),
        amplitude_contrast=float(ctf.amplitude_contrast[row]),
        phase_shift_deg=float(ctf.phase_shift_deg[row]),
        b_factor_angstrom2=float(b_factor_angstrom2),
    )
    return values.reshape(H, W // 2 + 1).to(dtype)


def apply_ctf_to_micrograph(micrograph: torch.Tensor, ctf_rfft: torch.Tensor) -> torch.Tensor:
    """``IFFT(C * FFT(micrograph))`` for a real ``(H, W)`` micrograph (C from :func:`micrograph_ctf_rfft`)."""
    H, W = micrograph.shape[-2:]
    return torch.fft.irfft2(torch.fft.rfft2(micrograph) * ctf_rfft, s=(H, W))


def particle_box_mask(shape: Sequence[int], positions_pixel: np.ndarray, box_size: int) -> np.ndarray:
    """``(H, W)`` boolean mask of the pixels inside at least one particle's ``D x D`` box."""
    mask = np.zeros(tuple(int(s) for s in shape), dtype=bool)
    D = int(box_size)
    for x, y in np.asarray(positions_pixel, dtype=np.int64):
        mask[max(0, y - D // 2) : y - D // 2 + D, max(0, x - D // 2) : x - D // 2 + D] = True
    return mask


def prepare_volumes(ensemble: Ensemble, *, device=None, oversampling: int = 2) -> list[torch.Tensor]:
    """Every state's volume prepared for projection (float32, on ``device``)."""
    return [
        prepare_projection_volume(torch.as_tensor(v, dtype=torch.float32, device=device), oversampling=oversampling)
        for v in ensemble.volumes
    ]


def noise_std_for_snr(signal_variance: float, snr: float | None) -> float:
    """Noise standard deviation for an SNR (0 for None or infinity)."""
    if snr is None or not math.isfinite(float(snr)):
        return 0.0
    if not float(snr) > 0:
        raise InputError(f"the SNR must be positive, not {snr}; pass e.g. --snr 0.1 or 'inf'.")
    return math.sqrt(signal_variance / float(snr))


def _clean_pass(ensemble: Ensemble, truth: MicrographTruth, clean_dir, device, progress: bool) -> float:
    """Render every CTF-corrupted clean micrograph to ``clean_dir/g.npy``; return the signal variance."""
    from tqdm.auto import tqdm

    prepared = prepare_volumes(ensemble, device=device)
    total, total_sq, count = 0.0, 0.0, 0
    for g in tqdm(range(truth.n_micrographs), desc="micrographs", disable=not progress, dynamic_ncols=True):
        clean = render_clean_micrograph(prepared, truth, g)
        ctf = micrograph_ctf_rfft(truth.shape, truth.pixel_size_angstrom, truth.ctf, g,
                                  b_factor_angstrom2=truth.b_factor_angstrom2, device=clean.device)
        signal = apply_ctf_to_micrograph(clean, ctf).cpu().numpy().astype(np.float32)
        inside = signal[particle_box_mask(truth.shape, truth.positions_pixel[truth.particles_of(g)], truth.box_size)]
        total += float(inside.sum(dtype=np.float64))
        total_sq += float(np.square(inside, dtype=np.float64).sum())
        count += inside.size
        np.save(clean_dir / f"{g}.npy", signal)
    if count == 0:
        return 0.0
    mean = total / count
    return max(total_sq / count - mean * mean, 0.0)


def simulate_micrographs(
    out_dir,
    *,
    ensemble: Ensemble,
    n_micrographs: int,
    particles_per_micrograph: int,
    shape: Sequence[int] = (1024, 1024),
    min_distance_pixel: float | None = None,
    snr: float | None = 0.1,
    seed: int = 0,
    device=None,
    progress: bool = False,
    arguments: dict | None = None,
    **ctf_options,
):
    """Simulate micrographs of ``ensemble`` and write them with their ground truth.

    Writes ``micrographs/mic_XXXX.mrc``, ``micrographs.star`` (RELION 3.1 with CTF),
    ``particles.star`` (true coordinates and eulers, one row per particle), ``gt_volumes/``,
    ``ground_truth.npz`` (positions, rotations, states, micrograph index, SNR, noise level),
    ``config.yaml`` and ``simulate.log``.  ``ctf_options`` are the CTF keywords of
    :func:`sample_micrograph_truth`.  Returns the output folder.
    """
    import datetime
    from pathlib import Path

    import yaml

    from cryoscape import __version__
    from cryoscape.io.writers import atomic_write

    out = Path(out_dir)
    (out / "micrographs").mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    truth = sample_micrograph_truth(n_micrographs, particles_per_micrograph, ensemble, shape=shape,
                                    min_distance_pixel=min_distance_pixel, seed=seed, **ctf_options)
    names, signal_variance, noise_std = _write_noisy_micrographs(out, ensemble, truth, snr=snr, seed=seed,
                                                                 device=device, progress=progress)
    G = n_micrographs
    snr_value = math.inf if noise_std == 0 else float(snr)
    _write_tables_and_truth(out, ensemble, truth, names, snr_value=snr_value, noise_std=noise_std,
                            signal_variance=signal_variance, seed=seed)
    summary = {
        "n_micrographs": G, "micrograph_shape": list(truth.shape), "particles_per_micrograph": particles_per_micrograph,
        "box_size": truth.box_size, "pixel_size_angstrom": truth.pixel_size_angstrom,
        "min_distance_pixel": 2.0 * truth.box_size if min_distance_pixel is None else float(min_distance_pixel),
        "snr": str(snr_value) if not math.isfinite(snr_value) else snr_value,
        "signal_variance": signal_variance, "noise_std": noise_std,
    }
    config = {"cryoscape_version": __version__, "command": "simulate micrographs",
              "created": started.isoformat(timespec="seconds"), "arguments": _plain(arguments or {}), "dataset": summary}
    with atomic_write(out / "config.yaml", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    elapsed = (datetime.datetime.now().astimezone() - started).total_seconds()
    with atomic_write(out / "simulate.log", "w") as f:
        f.write(f"cryoscape {__version__} simulate micrographs: {G} micrographs of {truth.shape[1]}x{truth.shape[0]} "
                f"pixels, {len(truth.rotations)} particles of box {truth.box_size}, signal variance "
                f"{signal_variance:.6g} over the particle boxes, snr {snr_value:g}, noise std {noise_std:.6g}, "
                f"{elapsed:.1f} s\n")
    return out


def _write_noisy_micrographs(out, ensemble, truth, *, snr, seed, device, progress):
    """The clean micrographs (set aside to measure the signal), then with noise at ``snr`` as .mrc;
    returns ``(names, signal variance, noise standard deviation)``."""
    import shutil

    from cryoscape.io.mrc import write_mrc

    clean_dir = out / f".clean.{os.getpid()}"
    clean_dir.mkdir(exist_ok=True)
    try:
        signal_variance = _clean_pass(ensemble, truth, clean_dir, device, progress)
        noise_std = noise_std_for_snr(signal_variance, snr)
        rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(5)[4])
        names = np.array([f"micrographs/mic_{g:04d}.mrc" for g in range(truth.n_micrographs)], dtype=object)
        for g, name in enumerate(names):
            mic = np.load(clean_dir / f"{g}.npy")
            if noise_std > 0:
                mic = mic + np.float32(noise_std) * rng.standard_normal(mic.shape, dtype=np.float32)
            write_mrc(out / name, mic, pixel_size_angstrom=truth.pixel_size_angstrom, is_stack=False)
    finally:
        shutil.rmtree(clean_dir, ignore_errors=True)

    return names, signal_variance, noise_std


def _write_tables_and_truth(out, ensemble, truth, names, *, snr_value, noise_std, signal_variance, seed):
    """``micrographs.star``, the true particles' ``particles.star``, ``gt_volumes/`` and ``ground_truth.npz``."""
    from cryoscape.io.micrographs import MicrographTable, write_coordinates_star, write_micrographs_star
    from cryoscape.io.mrc import write_mrc
    from cryoscape.io.writers import atomic_write

    G = len(names)
    table = MicrographTable(
        paths=np.array([str((out / n).resolve()) for n in names], dtype=object),
        pixel_size_angstrom=np.full(G, truth.pixel_size_angstrom), ctf=truth.ctf,
        b_factor_angstrom2=np.full(G, truth.b_factor_angstrom2), names=names,
    )
    write_micrographs_star(out / "micrographs.star", table)
    write_coordinates_star(out / "particles.star", names[truth.micrograph_index], truth.positions_pixel,
                           rotations=truth.rotations, extra={"rlnClassNumber": truth.state_index + 1})
    (out / "gt_volumes").mkdir(exist_ok=True)
    volume_files = [f"gt_volumes/vol_{m:03d}.mrc" for m in range(ensemble.n_states)]
    for m, name in enumerate(volume_files):
        write_mrc(out / name, ensemble.volumes[m], pixel_size_angstrom=truth.pixel_size_angstrom, is_stack=False)
    with atomic_write(out / "ground_truth.npz") as f:
        np.savez(
            f, kind=np.array("micrographs"), micrograph_index=truth.micrograph_index,
            positions_pixel=truth.positions_pixel, rotations=truth.rotations, state_index=truth.state_index,
            defocus_u_angstrom=truth.ctf.defocus_u_angstrom, defocus_v_angstrom=truth.ctf.defocus_v_angstrom,
            defocus_angle_deg=truth.ctf.defocus_angle_deg, volume_files=np.array(volume_files),
            micrograph_shape=np.array(truth.shape), box_size=np.int64(truth.box_size),
            pixel_size_angstrom=np.float64(truth.pixel_size_angstrom), snr=np.float64(snr_value),
            noise_std=np.float64(noise_std), signal_variance=np.float64(signal_variance), seed=np.int64(seed),
            state_labels=np.array(ensemble.labels),
        )


def _plain(value):
    """YAML-safe copy of an argument value."""
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
