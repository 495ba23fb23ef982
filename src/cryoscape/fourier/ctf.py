"""The contrast transfer function (thesis eq. 2.5-2.8), evaluated on frequency vectors.

Formula
-------
With ``k = (kx, ky)`` in 1/angstrom, ``theta = atan2(ky, kx)``, defocus ``z1 = defocus_u``,
``z2 = defocus_v`` and astigmatism angle ``z_theta`` (angstrom, angstrom, degrees; RELION units,
underfocus positive)::

    z(k)     = 0.5 * (z1 + z2 + (z1 - z2) * cos(2 * (theta - z_theta)))
    gamma(k) = 2 pi * (-z(k) * lambda * |k|^2 / 2 + Cs * lambda^3 * |k|^4 / 4) - phi0
    ctf(k)   = sqrt(1 - w^2) * sin(gamma) - w * cos(gamma)
    ctf'(k)  = ctf(k) * exp(-B * |k|^2 / 4)

``lambda`` is the relativistic electron wavelength in angstrom, ``Cs`` the spherical aberration
converted from mm to angstrom (``* 1e7``), ``phi0`` the phase-plate shift in radians, ``w`` the
amplitude contrast and ``B`` the envelope B-factor in angstrom^2 (``B = 0``: no envelope).  At
``k = 0`` the CTF is ``-w`` (no phase shift); it is even, ``ctf(k) = ctf(-k)``.

Images of the CTF use the centred grid of fourier/fft.py: element ``i`` along an axis of length
``D`` is the frequency ``(i - D//2) / (D * pixel_size)`` per angstrom, with ``(kx, ky)`` ordered as
in :func:`cryoscape.fourier.grids.frequency_grid_2d_cycles_per_pixel`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from cryoscape.fourier import grids

__all__ = [
    "electron_wavelength_angstrom",
    "evaluate_ctf",
    "ctf_images",
    "ctf_images_from_table",
    "CTF_PARAMETER_NAMES",
]

CTF_PARAMETER_NAMES = (
    "defocus_u_angstrom",
    "defocus_v_angstrom",
    "defocus_angle_deg",
    "voltage_kv",
    "cs_mm",
    "amplitude_contrast",
    "phase_shift_deg",
)


def electron_wavelength_angstrom(voltage_kv: float | torch.Tensor) -> float | torch.Tensor:
    """Relativistic wavelength of an electron accelerated through ``voltage_kv`` kilovolts.

    ``lambda = 12.2643247 / sqrt(V * (1 + 0.978466e-6 * V))`` angstrom with ``V`` in volts
    (0.0197 angstrom at 300 kV).  Floats give a float, tensors a tensor of the same shape.
    """
    volts = voltage_kv * 1000.0
    if isinstance(volts, torch.Tensor):
        return 12.2643247 / torch.sqrt(volts * (1.0 + 0.978466e-6 * volts))
    return 12.2643247 / math.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def _as_parameter(value: float | torch.Tensor | np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A parameter of shape ``(...)`` as a tensor of shape ``(..., 1)`` (broadcasts against P)."""
    tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return tensor.unsqueeze(-1)


def evaluate_ctf(
    freqs_per_angstrom: torch.Tensor,
    *,
    defocus_u_angstrom: float | torch.Tensor,
    defocus_v_angstrom: float | torch.Tensor,
    defocus_angle_deg: float | torch.Tensor,
    voltage_kv: float | torch.Tensor,
    cs_mm: float | torch.Tensor,
    amplitude_contrast: float | torch.Tensor,
    phase_shift_deg: float | torch.Tensor = 0.0,
    b_factor_angstrom2: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """The CTF (with its B-factor envelope) at a set of 2-D spatial frequencies.

    Parameters
    ----------
    freqs_per_angstrom
        ``(..., P, 2)`` frequencies ``(kx, ky)`` in 1/angstrom; its dtype and device are used.
    defocus_u_angstrom, defocus_v_angstrom, defocus_angle_deg, voltage_kv, cs_mm,
    amplitude_contrast, phase_shift_deg, b_factor_angstrom2
        Floats, or tensors of shape ``(...)`` (one value per image) that broadcast against the
        leading axes of ``freqs_per_angstrom`` once a trailing ``P`` axis is added.

    Returns
    -------
    torch.Tensor
        ``(..., P)`` real CTF values (see the module docstring for the formula).
    """
    k = freqs_per_angstrom
    if k.shape[-1] != 2:
        raise ValueError(f"freqs_per_angstrom must end in an axis of 2 (kx, ky), got {tuple(k.shape)}")
    kx, ky = k[..., 0], k[..., 1]
    k2 = kx * kx + ky * ky
    theta = torch.atan2(ky, kx)

    z1 = _as_parameter(defocus_u_angstrom, k)
    z2 = _as_parameter(defocus_v_angstrom, k)
    z_theta = torch.deg2rad(_as_parameter(defocus_angle_deg, k))
    wavelength = electron_wavelength_angstrom(_as_parameter(voltage_kv, k))
    cs_angstrom = _as_parameter(cs_mm, k) * 1e7
    w = _as_parameter(amplitude_contrast, k)
    phi0 = torch.deg2rad(_as_parameter(phase_shift_deg, k))
    b_factor = _as_parameter(b_factor_angstrom2, k)

    defocus = 0.5 * (z1 + z2 + (z1 - z2) * torch.cos(2.0 * (theta - z_theta)))
    gamma = (
        2.0 * math.pi * (-defocus * wavelength * k2 / 2.0 + cs_angstrom * wavelength**3 * k2 * k2 / 4.0)
        - phi0
    )
    ctf = torch.sqrt(1.0 - w * w) * torch.sin(gamma) - w * torch.cos(gamma)
    return ctf * torch.exp(-b_factor * k2 / 4.0)


def ctf_images(
    box_size: int,
    pixel_size_angstrom: float | torch.Tensor,
    **params: float | torch.Tensor,
) -> torch.Tensor:
    """CTF images on the centred ``D x D`` Fourier grid.

    Parameters
    ----------
    box_size
        ``D``.
    pixel_size_angstrom
        A float, or a tensor of shape ``(N,)`` (one pixel size per image).
    **params
        Keyword arguments of :func:`evaluate_ctf` (``defocus_u_angstrom`` ...), each a float or a
        tensor of shape ``(N,)``.  Dtype and device come from the first tensor among them
        (float32 on the CPU when all are floats).

    Returns
    -------
    torch.Tensor
        ``(N, D, D)`` (or ``(D, D)`` when every parameter is a float), indexed ``[n, y, x]``.
    """
    like = next((v for v in (pixel_size_angstrom, *params.values()) if isinstance(v, torch.Tensor)), None)
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    device = like.device if like is not None else None
    freqs = grids.frequency_grid_2d_cycles_per_pixel(box_size, device=device, dtype=dtype)
    freqs = freqs.reshape(box_size * box_size, 2)
    pixel = torch.as_tensor(pixel_size_angstrom, dtype=dtype, device=device)
    freqs = freqs / pixel[..., None, None]
    values = evaluate_ctf(freqs, **params)
    return values.reshape(*values.shape[:-1], box_size, box_size)


def ctf_images_from_table(
    ctf: Any,
    pixel_size_angstrom: float | np.ndarray,
    box_size: int,
    indices: np.ndarray | torch.Tensor | slice | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    freqs_cycles_per_pixel: torch.Tensor | None = None,
) -> torch.Tensor:
    """CTF images for rows ``indices`` of a particle CTF table.

    Parameters
    ----------
    ctf
        Any object with ``(N_total,)`` numpy array attributes ``defocus_u_angstrom``,
        ``defocus_v_angstrom``, ``defocus_angle_deg``, ``voltage_kv``, ``cs_mm``,
        ``amplitude_contrast`` and ``phase_shift_deg`` (``None`` or missing means 0), and
        optionally ``b_factor_angstrom2``.
    pixel_size_angstrom
        A float, or an ``(N_total,)`` array indexed like the table.
    box_size
        ``D``.
    indices
        Rows to evaluate (integer array, slice, or ``None`` for all rows).
    device, dtype
        Where and in which precision to build the images.
    freqs_cycles_per_pixel
        Optional ``(P, 2)`` frequencies ``(kx, ky)``: evaluate only there and return ``(n, P)``
        (cheaper when only some pixels are used; ``box_size`` is then ignored).

    Returns
    -------
    torch.Tensor
        ``(n, D, D)`` CTF images, one per selected row.
    """
    if indices is None:
        indices = slice(None)
    elif isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()

    def column(name: str, default: float | None) -> torch.Tensor:
        values = getattr(ctf, name, None)
        if values is None:
            if default is None:
                raise AttributeError(f"the CTF table has no attribute {name!r}")
            reference = np.asarray(ctf.defocus_u_angstrom)[indices]
            values_np = np.full(np.shape(reference), default, dtype=np.float64)
        else:
            values_np = np.asarray(values, dtype=np.float64)[indices]
        return torch.as_tensor(values_np, dtype=dtype, device=device)

    params = {name: column(name, 0.0 if name == "phase_shift_deg" else None) for name in CTF_PARAMETER_NAMES}
    if getattr(ctf, "b_factor_angstrom2", None) is not None:
        params["b_factor_angstrom2"] = column("b_factor_angstrom2", 0.0)
    pixel = np.asarray(pixel_size_angstrom, dtype=np.float64)
    if pixel.ndim > 0:
        pixel = pixel[indices]
    pixel_t = torch.as_tensor(pixel, dtype=dtype, device=device)
    if freqs_cycles_per_pixel is None:
        return ctf_images(box_size, pixel_t, **params)
    freqs = freqs_cycles_per_pixel.to(device=device, dtype=dtype)
    if pixel_t.ndim > 0:
        freqs = freqs / pixel_t[:, None, None]
    else:
        freqs = freqs / pixel_t
    return evaluate_ctf(freqs, **params)
