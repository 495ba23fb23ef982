"""The CTF of fourier/ctf.py against values computed by hand with the math module."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cryoscape.fourier import ctf as ctf_mod
from cryoscape.fourier.ctf import ctf_images, ctf_images_from_table, electron_wavelength_angstrom, evaluate_ctf


def hand_ctf(kx, ky, *, dfu, dfv, ang_deg, kv, cs_mm, w, phase_deg=0.0, bfac=0.0):
    """Thesis eq. 2.5-2.8 written out in plain python floats."""
    volts = kv * 1000.0
    lam = 12.2643247 / math.sqrt(volts * (1.0 + 0.978466e-6 * volts))
    k2 = kx * kx + ky * ky
    theta = math.atan2(ky, kx)
    z = 0.5 * (dfu + dfv + (dfu - dfv) * math.cos(2.0 * (theta - math.radians(ang_deg))))
    cs = cs_mm * 1e7
    gamma = 2 * math.pi * (-z * lam * k2 / 2 + cs * lam**3 * k2**2 / 4) - math.radians(phase_deg)
    value = math.sqrt(1 - w * w) * math.sin(gamma) - w * math.cos(gamma)
    return value * math.exp(-bfac * k2 / 4)


PARAMS = dict(dfu=15000.0, dfv=12000.0, ang_deg=30.0, kv=300.0, cs_mm=2.7, w=0.1)


def _kwargs(p):
    return dict(
        defocus_u_angstrom=p["dfu"],
        defocus_v_angstrom=p["dfv"],
        defocus_angle_deg=p["ang_deg"],
        voltage_kv=p["kv"],
        cs_mm=p["cs_mm"],
        amplitude_contrast=p["w"],
        phase_shift_deg=p.get("phase_deg", 0.0),
        b_factor_angstrom2=p.get("bfac", 0.0),
    )


def test_wavelength_known_values():
    # Relativistic electron wavelengths (angstrom) at common voltages.
    assert electron_wavelength_angstrom(300.0) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength_angstrom(200.0) == pytest.approx(0.025079, abs=2e-6)
    assert electron_wavelength_angstrom(100.0) == pytest.approx(0.037014, abs=2e-6)
    t = electron_wavelength_angstrom(torch.tensor([300.0, 200.0], dtype=torch.float64))
    assert torch.allclose(t, torch.tensor([0.019687, 0.025079], dtype=torch.float64), atol=2e-6)


@pytest.mark.parametrize(
    "extra",
    [{}, {"phase_deg": 90.0}, {"bfac": 80.0}, {"phase_deg": 35.0, "bfac": 150.0, "kv": 200.0, "cs_mm": 0.01}],
)
def test_against_hand_computed_values(extra):
    p = {**PARAMS, **extra}
    freqs = [(0.1, 0.05), (-0.07, 0.12), (0.2, -0.15), (0.0, 0.3)]
    k = torch.tensor(freqs, dtype=torch.float64)
    got = evaluate_ctf(k, **_kwargs(p))
    assert got.shape == (4,)
    expected = [hand_ctf(kx, ky, **p) for kx, ky in freqs]
    assert np.allclose(got.numpy(), expected, atol=1e-6, rtol=0)
    # The values are not trivially small: the comparison means something.
    assert max(abs(e) for e in expected) > 0.1


def test_one_value_written_out_in_full():
    # Non-astigmatic, 300 kV, Cs 2.7 mm, w=0.07, k = (0.1, 0) per angstrom, defocus 10000 A.
    lam = 12.2643247 / math.sqrt(300e3 * (1 + 0.978466e-6 * 300e3))
    gamma = 2 * math.pi * (-10000 * lam * 0.01 / 2 + 2.7e7 * lam**3 * 1e-4 / 4)
    expected = math.sqrt(1 - 0.07**2) * math.sin(gamma) - 0.07 * math.cos(gamma)
    got = evaluate_ctf(
        torch.tensor([[0.1, 0.0]], dtype=torch.float64),
        defocus_u_angstrom=10000.0,
        defocus_v_angstrom=10000.0,
        defocus_angle_deg=0.0,
        voltage_kv=300.0,
        cs_mm=2.7,
        amplitude_contrast=0.07,
    )
    assert got.item() == pytest.approx(expected, abs=1e-9)


def test_value_at_zero_frequency_is_minus_w():
    k = torch.zeros(1, 2, dtype=torch.float64)
    got = evaluate_ctf(k, **_kwargs({**PARAMS, "w": 0.07, "bfac": 100.0}))
    assert got.item() == pytest.approx(-0.07, abs=1e-12)


def test_first_zero_without_spherical_aberration():
    # Cs = 0, z1 = z2 = z: gamma = -pi z lam k^2 and ctf = sin(gamma - a) with a = arcsin(w).
    # ctf < 0 near k = 0 and the first zero is at gamma = a - pi: k1 = sqrt((pi - a) / (pi z lam)).
    z, w = 20000.0, 0.1
    lam = electron_wavelength_angstrom(300.0)
    k1 = math.sqrt((math.pi - math.asin(w)) / (math.pi * z * lam))
    radii = torch.linspace(0.0, 1.5 * k1, 3001, dtype=torch.float64)
    angle = 0.7
    k = torch.stack([radii * math.cos(angle), radii * math.sin(angle)], dim=-1)
    kw = _kwargs({"dfu": z, "dfv": z, "ang_deg": 12.0, "kv": 300.0, "cs_mm": 0.0, "w": w})
    values = evaluate_ctf(k, **kw)
    first_sign_change = int((values > 0).nonzero()[0])
    assert radii[first_sign_change - 1] <= k1 <= radii[first_sign_change]
    at_zero = evaluate_ctf(torch.tensor([[k1, 0.0]], dtype=torch.float64), **kw)
    assert abs(at_zero.item()) < 1e-10


def test_even_symmetry_with_astigmatism():
    g = torch.Generator().manual_seed(0)
    k = (torch.rand(50, 2, generator=g, dtype=torch.float64) - 0.5) * 0.6
    kw = _kwargs({**PARAMS, "phase_deg": 20.0, "bfac": 40.0})
    assert torch.allclose(evaluate_ctf(k, **kw), evaluate_ctf(-k, **kw), atol=1e-12)


def test_per_image_parameters_broadcast_against_frequencies():
    k = torch.tensor([(0.1, 0.05), (-0.07, 0.12), (0.2, -0.15)], dtype=torch.float64)
    dfu = torch.tensor([15000.0, 9000.0], dtype=torch.float64)
    got = evaluate_ctf(
        k,
        defocus_u_angstrom=dfu,
        defocus_v_angstrom=torch.tensor([12000.0, 9500.0], dtype=torch.float64),
        defocus_angle_deg=torch.tensor([30.0, -45.0], dtype=torch.float64),
        voltage_kv=300.0,
        cs_mm=2.7,
        amplitude_contrast=0.1,
    )
    assert got.shape == (2, 3)
    p2 = dict(dfu=9000.0, dfv=9500.0, ang_deg=-45.0, kv=300.0, cs_mm=2.7, w=0.1)
    assert np.allclose(got[0].numpy(), [hand_ctf(*kk, **PARAMS) for kk in k.tolist()], atol=1e-9)
    assert np.allclose(got[1].numpy(), [hand_ctf(*kk, **p2) for kk in k.tolist()], atol=1e-9)


@pytest.mark.parametrize("D", [9, 10])
def test_ctf_images_grid_orientation(D):
    pixel = 1.7
    n = torch.tensor
    kw = dict(
        defocus_u_angstrom=n([15000.0, 8000.0], dtype=torch.float64),
        defocus_v_angstrom=n([11000.0, 8000.0], dtype=torch.float64),
        defocus_angle_deg=n([0.0, 0.0], dtype=torch.float64),
        voltage_kv=n([300.0, 300.0], dtype=torch.float64),
        cs_mm=n([2.7, 2.7], dtype=torch.float64),
        amplitude_contrast=n([0.1, 0.1], dtype=torch.float64),
    )
    images = ctf_images(D, pixel, **kw)
    assert images.shape == (2, D, D) and images.dtype == torch.float64
    c = D // 2
    p = dict(dfu=15000.0, dfv=11000.0, ang_deg=0.0, kv=300.0, cs_mm=2.7, w=0.1)
    # Along x (row c, column c + m) the defocus is defocus_u; along y it is defocus_v.
    m = 3
    kx = m / (D * pixel)
    assert images[0, c, c + m].item() == pytest.approx(hand_ctf(kx, 0.0, **p), abs=1e-9)
    assert images[0, c + m, c].item() == pytest.approx(hand_ctf(0.0, kx, **p), abs=1e-9)
    assert images[0, c - 2, c + 1].item() == pytest.approx(
        hand_ctf(1 / (D * pixel), -2 / (D * pixel), **p), abs=1e-9
    )
    assert images[0, c, c].item() == pytest.approx(-0.1)
    assert images[0, c, c + m].item() != pytest.approx(images[0, c + m, c].item(), abs=1e-3)


def test_ctf_images_from_table():
    table = SimpleNamespace(
        defocus_u_angstrom=np.array([15000.0, 9000.0, 20000.0]),
        defocus_v_angstrom=np.array([12000.0, 9500.0, 19000.0]),
        defocus_angle_deg=np.array([30.0, -45.0, 80.0]),
        voltage_kv=np.array([300.0, 300.0, 200.0]),
        cs_mm=np.array([2.7, 2.7, 2.0]),
        amplitude_contrast=np.array([0.1, 0.1, 0.07]),
        phase_shift_deg=None,
    )
    D, pixel = 8, 1.3
    got = ctf_images_from_table(table, pixel, D, np.array([2, 0]), device="cpu", dtype=torch.float64)
    assert got.shape == (2, D, D)
    for row, i in enumerate([2, 0]):
        expected = ctf_images(
            D,
            pixel,
            **{
                name: torch.tensor([getattr(table, name)[i]], dtype=torch.float64)
                for name in ctf_mod.CTF_PARAMETER_NAMES
                if name != "phase_shift_deg"
            },
        )[0]
        assert torch.allclose(got[row], expected)
    # Per-particle pixel sizes are indexed like the table.
    table.phase_shift_deg = np.array([0.0, 90.0, 0.0])
    got2 = ctf_images_from_table(table, np.array([1.0, 2.0, 3.0]), D, [1], dtype=torch.float64)
    c = D // 2
    p = dict(dfu=9000.0, dfv=9500.0, ang_deg=-45.0, kv=300.0, cs_mm=2.7, w=0.1, phase_deg=90.0)
    assert got2[0, c, c + 1].item() == pytest.approx(hand_ctf(1 / (D * 2.0), 0.0, **p), abs=1e-9)
