"""Fourier shell (ring) correlation, resolution estimates, and FSC plots/tables.

The FSC of two maps in integer shell ``s`` (``round(|k| D) == s``, see fourier/grids.py) is::

    FSC(s) = Re(sum_s F1 conj(F2)) / sqrt(sum_s |F1|^2 * sum_s |F2|^2)

for shells ``0 .. D//2``; shell ``s`` is the frequency ``s / D`` cycles per pixel (``s / (D *
pixel_size)`` per angstrom).  The corners beyond Nyquist are left out.  A shell where either map
has no power gets FSC 0.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from cryoscape.fourier import fft, grids

__all__ = [
    "fourier_shell_correlation",
    "fourier_ring_correlation",
    "resolution_at_threshold",
    "first_shell_below",
    "frequency_to_angstrom",
    "gold_standard_fsc",
    "fsc_auc",
    "plot_fsc",
    "write_fsc_txt",
]


def fourier_shell_correlation(
    vol1: torch.Tensor,
    vol2: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ndim: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FSC of two real-space maps (``ndim=3``) or FRC of two images (``ndim=2``).

    Parameters
    ----------
    vol1, vol2
        ``(..., D, D, D)`` (or ``(..., D, D)`` with ``ndim=2``) real-space maps; leading axes
        broadcast and give one curve per map pair.
    mask
        Optional real-space mask multiplied into both maps before the transform.
    ndim
        3 for volumes (FSC), 2 for images (FRC).

    Returns
    -------
    freqs, fsc
        ``(D//2 + 1,)`` shell frequencies in cycles per pixel (``s / D``) and the
        ``(..., D//2 + 1)`` correlation per shell.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if vol1.shape[-ndim:] != vol2.shape[-ndim:]:
        raise ValueError(f"maps differ in shape: {tuple(vol1.shape)} vs {tuple(vol2.shape)}")
    D = vol1.shape[-1]
    if mask is not None:
        vol1 = vol1 * mask
        vol2 = vol2 * mask
    forward = fft.fft3_center if ndim == 3 else fft.fft2_center
    f1 = forward(vol1)
    f2 = forward(vol2)
    f1, f2 = torch.broadcast_tensors(f1, f2)

    n_shells = D // 2 + 1
    shells = (grids.shell_index_3d if ndim == 3 else grids.shell_index_2d)(D, device=f1.device).reshape(-1)
    keep = shells < n_shells
    shells = shells[keep]
    batch = f1.shape[: f1.dim() - ndim]
    f1 = f1.reshape(*batch, -1)[..., keep]
    f2 = f2.reshape(*batch, -1)[..., keep]
    real_dtype = f1.real.dtype

    def shell_sum(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*batch, n_shells, dtype=real_dtype, device=values.device)
        return out.index_add(-1, shells, values)

    cross = shell_sum((f1 * f2.conj()).real)
    power1 = shell_sum(f1.real.square() + f1.imag.square())
    power2 = shell_sum(f2.real.square() + f2.imag.square())
    denom = torch.sqrt(power1 * power2)
    has_power = denom > 0
    safe = torch.where(has_power, denom, torch.ones_like(denom))
    fsc = torch.where(has_power, cross / safe, torch.zeros_like(denom))
    freqs = torch.arange(n_shells, device=f1.device, dtype=real_dtype) / D
    return freqs, fsc


def fourier_ring_correlation(
    image1: torch.Tensor, image2: torch.Tensor, *, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FRC of two ``(..., D, D)`` real-space images; see :func:`fourier_shell_correlation`."""
    return fourier_shell_correlation(image1, image2, mask=mask, ndim=2)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def resolution_at_threshold(freqs, fsc, threshold: float) -> float:
    """Frequency where ``fsc`` first drops below ``threshold``, linearly interpolated.

    Scanning from the lowest shell, the first shell ``i`` with ``fsc[i] < threshold`` is found and
    the crossing is interpolated between shells ``i - 1`` and ``i``.  If ``fsc[0]`` is already below
    the threshold, ``freqs[0]`` is returned.  If the curve never drops below the threshold, the
    Nyquist frequency 0.5 is returned (in the units of ``freqs`` this assumes cycles per pixel; the
    map is resolved to the sampling limit and the true resolution may be better).

    Parameters
    ----------
    freqs
        ``(S,)`` increasing frequencies (e.g. cycles per pixel from
        :func:`fourier_shell_correlation`).
    fsc
        ``(S,)`` curve.
    threshold
        E.g. 0.143 (gold-standard half maps) or 0.5.

    Returns
    -------
    float
        The crossing frequency, in the units of ``freqs``.
    """
    f = _to_numpy(freqs).reshape(-1)
    c = _to_numpy(fsc).reshape(-1)
    if f.shape != c.shape:
        raise ValueError(f"freqs and fsc differ in length: {f.shape} vs {c.shape}")
    below = np.nonzero(c < threshold)[0]
    if below.size == 0:
        return 0.5
    i = int(below[0])
    if i == 0:
        return float(f[0])
    c0, c1 = c[i - 1], c[i]
    fraction = (c0 - threshold) / (c0 - c1)
    return float(f[i - 1] + fraction * (f[i] - f[i - 1]))


def first_shell_below(fsc, threshold: float) -> int:
    """The first shell after the origin (an index in Fourier pixels) where ``fsc`` (per integer shell)
    falls below ``threshold``; the last shell when it never does: how far a half-map FSC resolves."""
    c = _to_numpy(fsc).reshape(-1)
    below = np.nonzero(c[1:] < threshold)[0]
    return int(below[0]) + 1 if below.size else len(c) - 1


def frequency_to_angstrom(freq_cycles_per_pixel, pixel_size_angstrom: float):
    """Resolution in angstrom of a frequency in cycles per pixel: ``pixel_size / freq``.

    Zero frequency gives ``inf``.  Floats give a float; arrays and tensors keep their type.
    """
    if isinstance(freq_cycles_per_pixel, torch.Tensor):
        return pixel_size_angstrom / freq_cycles_per_pixel
    freq = np.asarray(freq_cycles_per_pixel, dtype=np.float64)
    with np.errstate(divide="ignore"):
        out = pixel_size_angstrom / freq
    return float(out) if out.ndim == 0 else out


def gold_standard_fsc(
    half1: torch.Tensor,
    half2: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    pixel_size_angstrom: float | None = None,
) -> dict:
    """FSC of two independently refined half maps and the resolutions it implies.

    Returns
    -------
    dict
        ``freqs`` (cycles/pixel), ``fsc`` (half-map curve), ``fsc_full_map``
        (``2 FSC / (1 + FSC)``, the expected FSC of the full map against the truth),
        ``res_0.143`` and ``res_0.5`` (crossing frequencies of the half-map curve, cycles/pixel) and,
        when ``pixel_size_angstrom`` is given, ``res_0.143_angstrom`` and ``res_0.5_angstrom``.
    """
    freqs, fsc = fourier_shell_correlation(half1, half2, mask=mask, ndim=3)
    full = 2.0 * fsc / (1.0 + fsc).clamp(min=1e-12)
    result = {
        "freqs": freqs,
        "fsc": fsc,
        "fsc_full_map": full,
        "res_0.143": resolution_at_threshold(freqs, fsc, 0.143),
        "res_0.5": resolution_at_threshold(freqs, fsc, 0.5),
    }
    if pixel_size_angstrom is not None:
        result["res_0.143_angstrom"] = frequency_to_angstrom(result["res_0.143"], pixel_size_angstrom)
        result["res_0.5_angstrom"] = frequency_to_angstrom(result["res_0.5"], pixel_size_angstrom)
    return result


def fsc_auc(fsc: torch.Tensor) -> torch.Tensor:
    """Area under an FSC curve as the mean of ``|FSC|`` over shells ``1 .. D//2``.

    ``fsc`` is ``(..., D//2 + 1)`` with shell 0 first; the DC shell is left out.  Returns ``(...)``.
    A perfect map scores 1.
    """
    fsc = torch.as_tensor(fsc)
    return fsc[..., 1:].abs().mean(-1)


def plot_fsc(
    freqs,
    curves: dict,
    path: str | os.PathLike,
    *,
    pixel_size_angstrom: float | None = None,
    thresholds: tuple[float, ...] = (0.5, 0.143),
    title: str | None = None,
) -> None:
    """Plot one or more FSC curves against frequency and save the figure to ``path``.

    Uses matplotlib's object API (no pyplot, no global backend change).  The x axis is in
    1/angstrom when ``pixel_size_angstrom`` is given, else in cycles per pixel; thresholds are drawn
    as dashed horizontal lines.
    """
    from matplotlib.figure import Figure

    f = _to_numpy(freqs)
    if pixel_size_angstrom is not None:
        f = f / pixel_size_angstrom
        xlabel = "spatial frequency (1/Å)"
    else:
        xlabel = "spatial frequency (cycles/pixel)"
    fig = Figure(figsize=(5.0, 3.6), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in curves.items():
        ax.plot(f, _to_numpy(curve), label=str(label))
    for value in thresholds:
        ax.axhline(value, color="0.5", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, float(f.max()) if f.size else 0.5)
    lowest = min((float(_to_numpy(c).min()) for c in curves.values()), default=0.0)
    ax.set_ylim(min(-0.1, lowest - 0.05), 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FSC")
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(os.fspath(path))


def write_fsc_txt(
    path: str | os.PathLike,
    freqs,
    fsc,
    pixel_size_angstrom: float | None = None,
) -> None:
    """Write an FSC curve as a whitespace-separated text table with a ``#`` header.

    Columns: ``frequency_cycles_per_pixel``, then (with a pixel size) ``frequency_per_angstrom``
    and ``resolution_angstrom``, then ``fsc``.
    """
    f = _to_numpy(freqs).reshape(-1)
    c = _to_numpy(fsc).reshape(-1)
    columns = [f]
    names = ["frequency_cycles_per_pixel"]
    if pixel_size_angstrom is not None:
        with np.errstate(divide="ignore"):
            columns += [f / pixel_size_angstrom, pixel_size_angstrom / f]
        names += ["frequency_per_angstrom", "resolution_angstrom"]
    columns.append(c)
    names.append("fsc")
    np.savetxt(os.fspath(path), np.stack(columns, axis=1), fmt="%.6g", header=" ".join(names))
