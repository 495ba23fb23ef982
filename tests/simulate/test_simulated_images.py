"""Image formation: SNR, CTF, shifts, determinism (simulate/images.py)."""

import math

import numpy as np
import pytest
import torch

from cryoscape.fourier.ctf import ctf_images
from cryoscape.fourier.fft import fft2_center
from cryoscape.fourier.slicing import prepare_projection_volume
from cryoscape.simulate.ensembles import hinge_ensemble, homogeneous_ensemble
from cryoscape.simulate.images import render_clean_images, sample_image_parameters, simulate_images
from cryoscape.simulate.molecule import default_pixel_size_angstrom, hinge_molecule
from cryoscape.simulate.volumes import render_gaussian_atoms


def small_hinge(D, n_states=3):
    pixel = default_pixel_size_angstrom(D)
    return hinge_ensemble(box_size=D, pixel_size_angstrom=pixel, resolution_angstrom=3 * pixel, n_states=n_states)


@pytest.fixture(scope="module")
def ens24():
    return small_hinge(24)


@pytest.fixture(scope="module")
def clean24(ens24):
    params = sample_image_parameters(150, ens24, seed=5, shift_max_pixel=2)
    return params, simulate_images(ens24, params, snr=None, seed=5)


@pytest.mark.parametrize("snr", [0.1, 1.0])
def test_empirical_snr(ens24, clean24, snr):
    params, clean = clean24
    noisy = simulate_images(ens24, params, snr=snr, seed=5)
    signal_var = clean.images.astype(np.float64).var()
    noise = noisy.images.astype(np.float64) - clean.images
    assert clean.signal_variance == pytest.approx(signal_var, rel=1e-6)
    assert noise.std() == pytest.approx(noisy.noise_std, rel=0.01)
    assert signal_var / noise.var() == pytest.approx(snr, rel=0.1)
    assert noisy.snr == snr and clean.noise_std == 0.0 and math.isinf(clean.snr)


def test_same_seed_same_images_any_batch(ens24):
    p1 = sample_image_parameters(20, ens24, seed=3, shift_max_pixel=1.5, astigmatism_angstrom=400)
    p2 = sample_image_parameters(20, ens24, seed=3, shift_max_pixel=1.5, astigmatism_angstrom=400)
    np.testing.assert_array_equal(p1.rotations, p2.rotations)
    a = simulate_images(ens24, p1, snr=0.5, seed=3, batch_size=7).images
    b = simulate_images(ens24, p2, snr=0.5, seed=3, batch_size=20).images
    np.testing.assert_allclose(a, b, atol=1e-5)
    p3 = sample_image_parameters(20, ens24, seed=4)
    assert not np.allclose(p3.rotations, p1.rotations)


def test_parameter_distributions(ens24):
    p = sample_image_parameters(2000, ens24, seed=0, defocus_range_angstrom=(8000, 12000), astigmatism_angstrom=300,
                                shift_max_pixel=3, voltage_kv=200, cs_mm=2.0, amplitude_contrast=0.07)
    c = p.ctf
    assert c.defocus_u_angstrom.min() >= 8000 and c.defocus_u_angstrom.max() <= 12000
    delta = c.defocus_u_angstrom - c.defocus_v_angstrom
    assert delta.min() >= 0 and delta.max() <= 300 and delta.max() > 250
    assert c.defocus_angle_deg.min() >= 0 and c.defocus_angle_deg.max() < 180
    assert np.abs(p.shifts_pixel).max() <= 3 and np.abs(p.shifts_pixel).max() > 2.9
    assert (c.voltage_kv == 200).all() and (c.cs_mm == 2.0).all() and (c.amplitude_contrast == 0.07).all()
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", p.rotations, p.rotations), np.broadcast_to(np.eye(3), (2000, 3, 3)), atol=1e-12)
    # uniform on SO(3): the mean rotation matrix vanishes
    assert np.abs(p.rotations.mean(0)).max() < 0.05


@pytest.mark.parametrize("D", [24, 25])
def test_ctf_is_applied(D):
    ens = small_hinge(D, n_states=1)
    params = sample_image_parameters(8, ens, seed=1, astigmatism_angstrom=800, b_factor_angstrom2=60.0)
    images = simulate_images(ens, params, snr=None, seed=1, dtype=torch.float64).images
    prepared = prepare_projection_volume(torch.from_numpy(ens.volumes[0].astype(np.float64)))
    proj = render_clean_images(prepared, params, np.arange(8), apply_ctf=False)
    c = params.ctf
    ctf = ctf_images(
        D, torch.full((8,), params.pixel_size_angstrom, dtype=torch.float64),
        defocus_u_angstrom=torch.from_numpy(c.defocus_u_angstrom), defocus_v_angstrom=torch.from_numpy(c.defocus_v_angstrom),
        defocus_angle_deg=torch.from_numpy(c.defocus_angle_deg), voltage_kv=torch.from_numpy(c.voltage_kv),
        cs_mm=torch.from_numpy(c.cs_mm), amplitude_contrast=torch.from_numpy(c.amplitude_contrast),
        phase_shift_deg=torch.from_numpy(c.phase_shift_deg), b_factor_angstrom2=60.0,
    ).numpy()
    image_ft = fft2_center(torch.from_numpy(images.astype(np.float64))).numpy()
    proj_ft = fft2_center(proj).numpy()
    for n in range(8):
        ok = (np.abs(proj_ft[n]) > 1e-3 * np.abs(proj_ft[n]).max()) & (np.abs(ctf[n]) > 0.05)
        if D % 2 == 0:
            ok[0, :] = ok[:, 0] = False  # -Nyquist row/column has no partner (real part taken)
        ratio = image_ft[n][ok] / proj_ft[n][ok]
        np.testing.assert_allclose(ratio.real, ctf[n][ok], atol=2e-3)
        np.testing.assert_allclose(ratio.imag, 0.0, atol=2e-3)


@pytest.mark.parametrize("D", [24, 25])
def test_shift_moves_particle_centre_by_minus_shift(D):
    pixel = 3.0
    coords, weights = hinge_molecule(10.0)
    vol = render_gaussian_atoms(coords * 0.3, weights, box_size=D, pixel_size_angstrom=pixel, resolution_angstrom=9.0,
                                center=True)
    ens = homogeneous_ensemble(vol, pixel_size_angstrom=pixel)
    params = sample_image_parameters(2, ens, seed=0)
    params.rotations[1] = params.rotations[0]
    params.ctf = params.ctf.subset([0, 0])
    t = np.array([1.3, -2.6])
    params.shifts_pixel[:] = [[0.0, 0.0], t]
    prepared = prepare_projection_volume(torch.from_numpy(vol.astype(np.float64)))
    proj = render_clean_images(prepared, params, np.arange(2), apply_ctf=False).numpy()
    c = np.arange(D) - D // 2
    y, x = np.meshgrid(c, c, indexing="ij")

    def centroid(img):
        return np.array([(img * x).sum(), (img * y).sum()]) / img.sum()

    np.testing.assert_allclose(centroid(proj[1]) - centroid(proj[0]), -t, atol=0.02)
    # with the CTF and an integer shift the image is exactly the unshifted one moved by -t
    params.shifts_pixel[1] = [2.0, -3.0]
    imgs = render_clean_images(prepared, params, np.arange(2)).numpy()
    np.testing.assert_allclose(imgs[1], np.roll(imgs[0], shift=(3, -2), axis=(0, 1)), atol=1e-9 * np.abs(imgs).max())


def test_states_use_their_volume():
    D = 20
    vols = [render_gaussian_atoms(np.array([[x, 0.0, 0.0]]), np.array([1.0]), box_size=D, pixel_size_angstrom=2.0,
                                  resolution_angstrom=10.0) for x in (-8.0, 8.0)]
    from cryoscape.simulate.ensembles import discrete_ensemble

    ens = discrete_ensemble(np.stack(vols), pixel_size_angstrom=2.0)
    params = sample_image_parameters(30, ens, seed=2)
    out = simulate_images(ens, params, snr=None, seed=2).images
    for m in (0, 1):
        single = discrete_ensemble(np.stack([vols[m], vols[m]]), pixel_size_angstrom=2.0)
        ref = simulate_images(single, params, snr=None, seed=2).images
        sel = params.state_index == m
        assert sel.any()
        np.testing.assert_allclose(out[sel], ref[sel], atol=1e-6)
