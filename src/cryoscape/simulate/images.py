"""Particle images from an ensemble: projection, CTF, translation and Gaussian noise.

Image formation (thesis eq. 2.5-2.8 and section 3.5.1)
------------------------------------------------------
For image ``i`` with state ``m``, pose ``R``, shift ``t`` (pixels, RELION's sign) and CTF ``C``::

    P(k)     = FT of sum_z V_m(R^T (x, y, z))            (fourier/slicing.py, 2x padded, trilinear)
    Y(k)     = C(k) * P(k) * exp(+2 pi i k.t)              (fourier/ctf.py, fourier/shift.py)
    image    = -Re(IFFT(Y)) + noise

The minus sign is particle extraction's contrast inversion: RELION and cryoSPARC write particles
white (protein bright), while the CTF of fourier/ctf.py is negative at low frequency (protein
dark in the raw micrograph).  Simulated stacks therefore look like real extracted particles, and
every reconstruction command negates images by default (``--uninvert-data`` turns it off), as
cryoDRGN does.

The phase ramp moves the projection centre to ``box centre - t``: the particle sits where the
stored shift ``t`` would bring it back to the centre (``phase_shift_images(F, -t)``).

Noise and SNR
-------------
SNR is the ratio of the signal variance to the noise variance (thesis 3.5.1).  The *signal
variance* is the variance over every pixel of the whole ``D x D`` box of **all** the clean
(projected, CTF-corrupted, shifted) images of the dataset, background included:
``mean((x - mean(x))^2)`` over ``N * D * D`` values.  White Gaussian noise of standard deviation
``sqrt(signal_variance / snr)`` is then added to every pixel.  ``snr=None`` or ``inf`` gives
noiseless images.  (Counting the background makes the SNR depend on how much of the box the
particle fills; the thesis notes the same.)

Parameters drawn per image (all from one seed; see :func:`sample_image_parameters`)
-----------------------------------------------------------------------------------
* rotation uniform on SO(3) (``random_rotations``);
* defocus U uniform in ``defocus_range_angstrom``; defocus V = U - delta with delta uniform in
  ``[0, astigmatism_angstrom]``; astigmatism angle uniform in ``[0, 180)`` degrees;
* shift ``(tx, ty)`` uniform in the square ``[-shift_max_pixel, shift_max_pixel]^2``;
* the state (and continuous coordinate) from :meth:`Ensemble.sample_states`.

Determinism: the seed is split (``numpy.random.SeedSequence(seed).spawn``) into independent
streams for states, rotations, CTF/shifts and noise, so the same seed gives the same draws
whatever the batch size or device (and, on one machine, bit-identical images), and turning noise
off leaves the clean images unchanged.

Streaming: images are computed state by state (each volume is prepared for projection once)
and written into ``out`` (e.g. a memory-mapped MRC stack) at their own indices; the noise is
then added in a second pass in index order.  Memory stays at one prepared volume plus a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryoscape.fourier.ctf import ctf_images
from cryoscape.fourier.fft import ifft2_center
from cryoscape.fourier.shift import phase_shift_images
from cryoscape.fourier.slicing import prepare_projection_volume, project_prepared
from cryoscape.geometry.rotations import random_rotations
from cryoscape.io.particles import CtfParameters
from cryoscape.simulate.ensembles import Ensemble

__all__ = [
    "DEFAULT_DEFOCUS_RANGE_ANGSTROM",
    "ImageParameters",
    "SimulationResult",
    "sample_image_parameters",
    "render_clean_images",
    "simulate_images",
    "default_batch_size",
]

DEFAULT_DEFOCUS_RANGE_ANGSTROM = (10000.0, 25000.0)


@dataclass
class ImageParameters:
    """Ground truth of every image.

    Attributes
    ----------
    rotations
        ``(N, 3, 3)`` float64 poses (a world point ``X`` appears at ``(R X)_xy``).
    shifts_pixel
        ``(N, 2)`` float64 ``(x, y)`` shifts, RELION's sign (centre sits at box centre - shift).
    ctf
        :class:`cryoscape.io.particles.CtfParameters`, ``(N,)`` arrays in RELION units.
    b_factor_angstrom2
        Envelope B-factor applied to every image (0: none).
    state_index, coordinate
        ``(N,)`` from :meth:`Ensemble.sample_states`.
    box_size, pixel_size_angstrom
        ``D`` and the pixel size.
    """

    rotations: np.ndarray
    shifts_pixel: np.ndarray
    ctf: CtfParameters
    b_factor_angstrom2: float
    state_index: np.ndarray
    coordinate: np.ndarray
    box_size: int
    pixel_size_angstrom: float

    def __len__(self) -> int:
        return len(self.rotations)


@dataclass
class SimulationResult:
    """What :func:`simulate_images` produced.

    Attributes
    ----------
    images
        ``out`` (or the new ``(N, D, D)`` float32 array) holding the images.
    signal_variance
        Variance over all pixels of all clean images (see the module docstring).
    noise_std
        Standard deviation of the added noise (0 when noiseless).
    snr
        The requested SNR (``inf`` when noiseless).
    image_stats
        ``min``, ``max``, ``mean``, ``rms`` (standard deviation) of the final images, for the MRC
        header.
    """

    images: Any
    signal_variance: float
    noise_std: float
    snr: float
    image_stats: dict[str, float]


def _seed_streams(seed: int) -> dict[str, np.random.SeedSequence]:
    children = np.random.SeedSequence(int(seed)).spawn(4)
    return dict(zip(("states", "rotations", "ctf_shifts", "noise"), children))


def sample_image_parameters(
    n_images: int,
    ensemble: Ensemble,
    *,
    seed: int = 0,
    defocus_range_angstrom: Sequence[float] = DEFAULT_DEFOCUS_RANGE_ANGSTROM,
    astigmatism_angstrom: float = 0.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    phase_shift_deg: float = 0.0,
    b_factor_angstrom2: float = 0.0,
    shift_max_pixel: float = 0.0,
) -> ImageParameters:
    """Draw poses, shifts, CTF parameters and states for ``n_images`` images (see module docstring)."""
    n = int(n_images)
    streams = _seed_streams(seed)
    states = ensemble.sample_states(n, np.random.default_rng(streams["states"]))
    gen = torch.Generator().manual_seed(int(streams["rotations"].generate_state(1, np.uint64)[0] >> np.uint64(1)))
    rotations = random_rotations(n, generator=gen, dtype=torch.float64).numpy()
    rng = np.random.default_rng(streams["ctf_shifts"])
    lo, hi = (float(d) for d in defocus_range_angstrom)
    defocus_u = rng.uniform(lo, hi, size=n)
    delta = rng.uniform(0.0, float(astigmatism_angstrom), size=n)
    angle = rng.uniform(0.0, 180.0, size=n)
    s = float(shift_max_pixel)
    shifts = rng.uniform(-s, s, size=(n, 2)) if s > 0 else np.zeros((n, 2))
    ctf = CtfParameters(
        defocus_u_angstrom=defocus_u,
        defocus_v_angstrom=defocus_u - delta,
        defocus_angle_deg=angle,
        voltage_kv=np.full(n, float(voltage_kv)),
        cs_mm=np.full(n, float(cs_mm)),
        amplitude_contrast=np.full(n, float(amplitude_contrast)),
        phase_shift_deg=np.full(n, float(phase_shift_deg)),
    )
    return ImageParameters(
        rotations=rotations,
        shifts_pixel=shifts,
        ctf=ctf,
        b_factor_angstrom2=float(b_factor_angstrom2),
        state_index=states.state_index,
        coordinate=states.coordinate,
        box_size=ensemble.box_size,
        pixel_size_angstrom=float(ensemble.pixel_size_angstrom),
    )


def default_batch_size(box_size: int) -> int:
    """Images per projection batch: about 0.5 GB of interpolation buffers (``2^18 / D^2``)."""
    return int(max(1, min(1024, 2**18 // (box_size * box_size))))


def render_clean_images(
    prepared_volume: torch.Tensor,
    params: ImageParameters,
    indices: np.ndarray,
    *,
    apply_ctf: bool = True,
    invert_contrast: bool = True,
) -> torch.Tensor:
    """Clean images ``(n, D, D)`` of the images ``indices`` of one state.

    Parameters
    ----------
    prepared_volume
        The state's volume after :func:`cryoscape.fourier.slicing.prepare_projection_volume`;
        its device and precision are used.
    params
        Per-image ground truth.
    indices
        Images to render (all showing that state).
    apply_ctf
        Multiply by the CTF (False: projection and shift only).
    invert_contrast
        Negate the result, as particle extraction does (see the module docstring).
    """
    D = params.box_size
    device = prepared_volume.device
    dtype = prepared_volume.real.dtype
    idx = np.asarray(indices)

    def col(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values)[idx], dtype=dtype, device=device)

    rotations = col(params.rotations)
    image_ft = project_prepared(prepared_volume, rotations, box_size=D, return_fourier=True)
    if apply_ctf:
        c = params.ctf
        ctf = ctf_images(
            D,
            torch.full((len(idx),), params.pixel_size_angstrom, dtype=dtype, device=device),
            defocus_u_angstrom=col(c.defocus_u_angstrom),
            defocus_v_angstrom=col(c.defocus_v_angstrom),
            defocus_angle_deg=col(c.defocus_angle_deg),
            voltage_kv=col(c.voltage_kv),
            cs_mm=col(c.cs_mm),
            amplitude_contrast=col(c.amplitude_contrast),
            phase_shift_deg=col(c.phase_shift_deg),
            b_factor_angstrom2=params.b_factor_angstrom2,
        )
        image_ft = image_ft * ctf
    shifts = col(params.shifts_pixel)
    if bool((shifts != 0).any()):
        image_ft = phase_shift_images(image_ft, -shifts)
    images = ifft2_center(image_ft).real
    return -images if invert_contrast else images


class _RunningStats:
    """Mean, sum of squared deviations, min and max over streamed blocks (Chan et al.)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, block: np.ndarray) -> None:
        if block.size == 0:
            return
        b = np.asarray(block, dtype=np.float64)
        b_mean = float(b.mean())
        b_m2 = float(np.square(b - b_mean).sum())
        total = self.count + b.size
        delta = b_mean - self.mean
        self.mean += delta * b.size / total
        self.m2 += b_m2 + delta * delta * self.count * b.size / total
        self.count = total
        self.min = min(self.min, float(b.min()))
        self.max = max(self.max, float(b.max()))

    @property
    def variance(self) -> float:
        return self.m2 / self.count if self.count else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"min": self.min, "max": self.max, "mean": self.mean, "rms": math.sqrt(self.variance)}


def simulate_images(
    ensemble: Ensemble,
    params: ImageParameters,
    *,
    snr: float | None = None,
    seed: int = 0,
    out: Any = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    oversampling: int = 2,
    progress: bool = False,
) -> SimulationResult:
    """Make the images described by ``params`` (see the module docstring for the model).

    Parameters
    ----------
    ensemble
        The ground-truth volumes.
    params
        From :func:`sample_image_parameters` (its states index ``ensemble.volumes``).
    snr
        Signal-to-noise ratio (signal variance / noise variance); None or inf: no noise.
    seed
        The seed given to :func:`sample_image_parameters`; its noise stream is used here.
    out
        Where to write the ``(N, D, D)`` images: any array accepting ``out[int_array] = block``
        and ``out[a:b] += block`` (a numpy array or a memory-mapped MRC stack); a new float32
        array when None.
    batch_size
        Images per projection batch (default :func:`default_batch_size`).
    device, dtype
        Where and in which precision to compute (default CPU, float32); results are identical in
        distribution whatever the device, and the random draws do not depend on it.
    oversampling
        Zero-padding factor of the projector (:func:`prepare_projection_volume`).  With 2,
        projections of a compact molecule are within ~1-3% (relative L2) of the exact line
        integrals; 3 cuts that several-fold for ~1.5x the time.
    progress
        Show tqdm progress bars.

    Returns
    -------
    SimulationResult
    """
    N, D = len(params), params.box_size
    if ensemble.box_size != D:
        raise ValueError(f"parameters are for box {D} but the ensemble's volumes are {ensemble.box_size}")
    if out is None:
        out = np.zeros((N, D, D), dtype=np.float32)
    batch = int(batch_size or default_batch_size(D))
    device = torch.device(device) if device is not None else torch.device("cpu")
    noisy = snr is not None and math.isfinite(float(snr))
    if noisy and not float(snr) > 0:
        raise ValueError(f"snr must be positive, got {snr}")

    clean_stats = _project_all_states(ensemble, params, out, batch=batch, device=device, dtype=dtype,
                                      oversampling=oversampling, progress=progress)
    signal_variance = clean_stats.variance
    if not noisy:
        return SimulationResult(out, signal_variance, 0.0, math.inf, clean_stats.as_dict())

    noise_std = math.sqrt(signal_variance / float(snr))
    final_stats = _add_noise(out, N, D, noise_std, seed=seed, chunk=max(batch, 256), progress=progress)
    return SimulationResult(out, signal_variance, noise_std, float(snr), final_stats.as_dict())


def _project_all_states(ensemble: Ensemble, params: ImageParameters, out: Any, *, batch: int, device: torch.device,
                        dtype: torch.dtype, oversampling: int, progress: bool) -> _RunningStats:
    """Write every clean image into ``out``, state by state (one prepared volume in memory); their statistics."""
    from tqdm.auto import tqdm

    clean_stats = _RunningStats()
    bar = tqdm(total=len(params), desc="projecting", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for m in range(ensemble.n_states):
            members = np.flatnonzero(params.state_index == m)
            if len(members) == 0:
                continue
            volume = torch.as_tensor(ensemble.volumes[m], dtype=dtype, device=device)
            prepared = prepare_projection_volume(volume, oversampling=oversampling)
            del volume
            for start in range(0, len(members), batch):
                idx = members[start : start + batch]
                block = render_clean_images(prepared, params, idx).cpu().numpy().astype(np.float32, copy=False)
                out[idx] = block
                clean_stats.add(block)
                bar.update(len(idx))
            del prepared
    finally:
        bar.close()
    return clean_stats


def _add_noise(out: Any, N: int, D: int, noise_std: float, *, seed: int, chunk: int, progress: bool) -> _RunningStats:
    """Add the seed's noise stream to ``out`` in index order, ``chunk`` images at a time; the final statistics."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(_seed_streams(seed)["noise"])
    final_stats = _RunningStats()
    with tqdm(total=N, desc="adding noise", unit="img", disable=not progress, dynamic_ncols=True) as bar2:
        for start in range(0, N, chunk):
            stop = min(N, start + chunk)
            noise = rng.standard_normal((stop - start, D, D), dtype=np.float32)
            block = np.asarray(out[start:stop], dtype=np.float32) + np.float32(noise_std) * noise
            out[start:stop] = block
            final_stats.add(block)
            bar2.update(stop - start)
    return final_stats
