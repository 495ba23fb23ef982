"""Post-processing of two half-maps: solvent mask, masked FSC corrected by phase randomisation,
B-factor from the Guinier plot, sharpening (RELION's relion_postprocess, local-resolution-free).

* **Mask**: the joined map low-passed (``mask_lowpass_angstrom``, 15 A), thresholded, dilated and
  given a soft cosine edge (:func:`cryoscape.fourier.masks.threshold_mask`).
* **Mask-corrected FSC** (Chen et al. 2013): beyond the shell where the *unmasked* half-map FSC
  first falls below ``randomize_fsc`` (0.8) the phases of both half-maps are replaced by random
  ones; the FSC of the masked randomised maps, ``FSC_n``, measures the correlation the mask alone
  creates, and ``FSC = (FSC_t - FSC_n) / (1 - FSC_n)`` beyond that shell (``FSC_t`` masked).
* **B-factor**: a straight line fitted to ``ln |F|(s)`` against ``s^2`` between
  ``guinier_low_angstrom`` (10 A) and the resolution; since ``|F| ~ exp(-B s^2 / 4)``,
  ``B = -4 x slope``.  Sharpening multiplies by ``exp(+B s^2 / 4)`` and low-passes at the resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryoscape.errors import InputError
from cryoscape.fourier.fft import fft3_center, ifft3_center
from cryoscape.fourier.filters import apply_b_factor, lowpass_filter, radial_average
from cryoscape.fourier.fsc import fourier_shell_correlation, frequency_to_angstrom, resolution_at_threshold
from cryoscape.fourier.grids import radius_3d_index
from cryoscape.fourier.masks import threshold_mask

__all__ = [
    "PostprocessResult",
    "solvent_mask",
    "randomize_phases",
    "mask_corrected_fsc",
    "guinier_b_factor",
    "sharpen",
    "postprocess",
    "write_postprocess",
]


@dataclass
class PostprocessResult:
    """Everything :func:`postprocess` finds; maps are ``(D, D, D)`` float32."""

    mask: torch.Tensor
    sharpened: torch.Tensor
    freqs: torch.Tensor
    fsc_unmasked: torch.Tensor
    fsc_masked: torch.Tensor
    fsc_randomized: torch.Tensor
    fsc_corrected: torch.Tensor
    randomize_from_shell: int
    resolution_angstrom: float
    b_factor_angstrom2: float


def solvent_mask(volume: torch.Tensor, pixel_size_angstrom: float, *, threshold: float | None = None,
                 lowpass_angstrom: float = 15.0, dilate_pixel: float = 3.0, edge_width_pixel: float = 6.0) -> torch.Tensor:
    """Soft mask around the density of ``volume`` (module docstring)."""
    smooth = lowpass_filter(volume.double(), lowpass_angstrom, pixel_size_angstrom, ndim=3)
    return threshold_mask(smooth, threshold=threshold, dilate_pixel=dilate_pixel,
                          edge_width_pixel=edge_width_pixel).to(torch.float32)


def randomize_phases(volume: torch.Tensor, from_shell: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``volume`` with the phases of every Fourier component at ``|k| D > from_shell`` made random
    (amplitudes kept; the random phases come from a real noise map, so the result stays real)."""
    D = volume.shape[-1]
    ft = fft3_center(volume.double())
    noise = fft3_center(torch.randn(volume.shape, generator=generator, dtype=torch.float64))
    phase = noise / noise.abs().clamp_min(1e-30)
    outer = radius_3d_index(D, dtype=torch.float64) > from_shell
    ft = torch.where(outer, ft.abs() * phase, ft)
    return ifft3_center(ft).real.to(volume.dtype)


def mask_corrected_fsc(half1, half2, mask, *, randomize_fsc: float = 0.8, seed: int = 0):
    """``(freqs, fsc_unmasked, fsc_masked, fsc_randomized, fsc_corrected, from_shell)``."""
    D = half1.shape[-1]
    freqs, unmasked = fourier_shell_correlation(half1.double(), half2.double())
    _, masked = fourier_shell_correlation(half1.double(), half2.double(), mask=mask.double())
    below = torch.nonzero(unmasked < randomize_fsc)
    from_shell = int(below[0, 0]) if len(below) else D // 2
    gen = torch.Generator().manual_seed(seed)
    r1 = randomize_phases(half1.double(), from_shell, generator=gen)
    r2 = randomize_phases(half2.double(), from_shell, generator=gen)
    _, rand = fourier_shell_correlation(r1, r2, mask=mask.double())
    shells = torch.arange(len(freqs))
    corrected = torch.where(shells > from_shell, (masked - rand) / (1 - rand).clamp_min(1e-6), masked)
    return freqs, unmasked, masked, rand, corrected, from_shell


def guinier_b_factor(volume: torch.Tensor, pixel_size_angstrom: float, *, low_angstrom: float = 10.0,
                     high_angstrom: float | None = None) -> float:
    """B-factor (A^2) from the slope of ``ln |F|`` against ``s^2`` (module docstring).

    ``|F|(s)`` is the root mean power of each Fourier shell; the fit uses the shells with
    resolution between ``low_angstrom`` and ``high_angstrom`` (default Nyquist).
    """
    D = volume.shape[-1]
    power = radial_average(fft3_center(volume.double()).abs().square(), ndim=3)
    s = torch.arange(len(power), dtype=torch.float64) / (D * pixel_size_angstrom)
    high = 2 * pixel_size_angstrom if high_angstrom is None else high_angstrom
    use = (s >= 1.0 / low_angstrom) & (s <= 1.0 / high) & (power > 0)
    if int(use.sum()) < 3:
        raise ValueError(f"fewer than 3 shells between {low_angstrom:g} and {high:g} A for the Guinier fit")
    slope, _ = np.polyfit((s[use] ** 2).numpy(), (0.5 * torch.log(power[use])).numpy(), 1)
    return float(-4.0 * slope)


def sharpen(volume: torch.Tensor, b_factor_angstrom2: float, pixel_size_angstrom: float,
            resolution_angstrom: float) -> torch.Tensor:
    """Undo ``exp(-B s^2 / 4)`` and low-pass at ``resolution_angstrom``."""
    sharp = apply_b_factor(volume.double(), -b_factor_angstrom2, pixel_size_angstrom, ndim=3)
    return lowpass_filter(sharp, resolution_angstrom, pixel_size_angstrom, ndim=3).to(torch.float32)


def postprocess(half1: torch.Tensor, half2: torch.Tensor, pixel_size_angstrom: float, *,
                mask: torch.Tensor | None = None, b_factor_angstrom2: float | None = None,
                guinier_low_angstrom: float = 10.0, seed: int = 0) -> PostprocessResult:
    """Mask, mask-corrected FSC, B-factor and sharpened map from two half-maps."""
    joined = 0.5 * (half1 + half2)
    if mask is None:
        mask = solvent_mask(joined, pixel_size_angstrom)
    freqs, unmasked, masked, rand, corrected, shell = mask_corrected_fsc(half1, half2, mask, seed=seed)
    res = frequency_to_angstrom(resolution_at_threshold(freqs, corrected, 0.143), pixel_size_angstrom)
    if b_factor_angstrom2 is None:
        if res > 0.8 * guinier_low_angstrom:
            raise InputError(f"the half-maps reach {res:.1f} A, too close to the Guinier fit's low end "
                             f"({guinier_low_angstrom:g} A) for a B-factor; pass --b-factor or a larger --guinier-low.")
        b_factor_angstrom2 = guinier_b_factor(joined * mask, pixel_size_angstrom, low_angstrom=guinier_low_angstrom,
                                              high_angstrom=res)
    sharpened = sharpen(joined * mask, b_factor_angstrom2, pixel_size_angstrom, res)
    return PostprocessResult(mask=mask, sharpened=sharpened, freqs=freqs, fsc_unmasked=unmasked, fsc_masked=masked,
                             fsc_randomized=rand, fsc_corrected=corrected, randomize_from_shell=shell,
                             resolution_angstrom=float(res), b_factor_angstrom2=b_factor_angstrom2)


def write_postprocess(out_dir, result: PostprocessResult, pixel_size_angstrom: float) -> dict:
    """Write ``postprocess.mrc`` (sharpened, masked), ``mask.mrc``, ``fsc.txt`` (all four curves),
    ``fsc.png`` and ``postprocess.yaml`` (resolution, B-factor, randomisation shell)."""
    from pathlib import Path

    import yaml

    from cryoscape.fourier.fsc import plot_fsc
    from cryoscape.io.mrc import write_mrc
    from cryoscape.io.writers import atomic_write

    out = Path(out_dir)
    write_mrc(out / "postprocess.mrc", result.sharpened.numpy(), pixel_size_angstrom=pixel_size_angstrom)
    write_mrc(out / "mask.mrc", result.mask.float().numpy(), pixel_size_angstrom=pixel_size_angstrom)
    f = result.freqs.numpy()
    with np.errstate(divide="ignore"):
        table = np.stack([f, pixel_size_angstrom / f, result.fsc_unmasked.numpy(), result.fsc_masked.numpy(),
                          result.fsc_randomized.numpy(), result.fsc_corrected.numpy()], axis=1)
    np.savetxt(out / "fsc.txt", table, fmt="%.6g",
               header="frequency_cycles_per_pixel resolution_angstrom fsc_unmasked fsc_masked "
                      "fsc_phase_randomized fsc_corrected")
    plot_fsc(result.freqs, {"unmasked": result.fsc_unmasked, "masked": result.fsc_masked,
                            "phase-randomised": result.fsc_randomized, "corrected": result.fsc_corrected},
             out / "fsc.png", pixel_size_angstrom=pixel_size_angstrom)
    summary = {"resolution_angstrom": result.resolution_angstrom, "b_factor_angstrom2": result.b_factor_angstrom2,
               "randomize_from_shell": result.randomize_from_shell,
               "randomize_from_angstrom": float(pixel_size_angstrom / max(f[result.randomize_from_shell], 1e-12))}
    with atomic_write(out / "postprocess.yaml", "w") as fh:
        yaml.safe_dump(summary, fh, sort_keys=False)
    return summary
