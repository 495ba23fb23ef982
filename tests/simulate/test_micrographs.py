"""Simulated micrographs: placement, image formation, SNR, files (simulate/micrographs.py, io/micrographs.py)."""

import numpy as np
import pytest
import torch

from cryoscape.cli.main import main
from cryoscape.fourier.slicing import project_volume
from cryoscape.io.micrographs import read_coordinates_star, read_micrograph, read_micrographs_star
from cryoscape.io.mrc import read_mrc
from cryoscape.simulate.ensembles import homogeneous_ensemble
from cryoscape.simulate.micrographs import (
    apply_ctf_to_micrograph,
    micrograph_ctf_rfft,
    place_particles,
    prepare_volumes,
    render_clean_micrograph,
    sample_micrograph_truth,
)
from cryoscape.simulate.volumes import render_gaussian_atoms


def _ensemble(D=16):
    vol = render_gaussian_atoms(np.array([[3.0, 0.0, 0.0], [-4.0, 5.0, 2.0]]), np.array([1.0, 0.7]), box_size=D,
                                pixel_size_angstrom=2.0, resolution_angstrom=6.0)
    return homogeneous_ensemble(vol, pixel_size_angstrom=2.0)


@pytest.mark.parametrize("spacing", [32.0, 16.0])
def test_placement_keeps_the_spacing_and_the_boxes_inside(spacing):
    rng = np.random.default_rng(0)
    pos = place_particles(12, (200, 300), 16, spacing, rng)
    assert pos.shape == (12, 2)
    d = np.abs(pos[:, None] - pos[None]).max(-1) + np.eye(12, dtype=np.int64) * 10**6
    assert d.min() >= spacing
    assert pos[:, 0].min() >= 8 and pos[:, 0].max() <= 300 - 8 and pos[:, 1].max() <= 200 - 8


def test_placement_that_cannot_fit_is_an_input_error():
    from cryoscape.errors import InputError

    with pytest.raises(InputError, match="fit"):
        place_particles(50, (64, 64), 16, 32.0, np.random.default_rng(0), max_tries=5)


def test_clean_micrograph_holds_each_projection_at_its_centre():
    ens = _ensemble()
    truth = sample_micrograph_truth(1, 3, ens, shape=(96, 128), seed=3)
    clean = render_clean_micrograph(prepare_volumes(ens), truth, 0)
    rot = torch.as_tensor(truth.rotations, dtype=torch.float32)
    proj = project_volume(torch.as_tensor(ens.volumes[0]), rot)
    for (x, y), image in zip(truth.positions_pixel, proj):
        window = clean[y - 8 : y + 8, x - 8 : x + 8]
        torch.testing.assert_close(window, image, rtol=0, atol=1e-5)  # separated: no other particle inside
    assert float(clean.sum()) == pytest.approx(float(proj.sum()), rel=1e-5)


def test_micrograph_ctf_matches_the_particle_ctf_on_a_square_grid():
    from cryoscape.fourier.ctf import ctf_images
    from cryoscape.fourier.fft import fft2_center, ifft2_center

    ens = _ensemble()
    truth = sample_micrograph_truth(1, 1, ens, shape=(32, 32), seed=1, astigmatism_angstrom=500.0)
    from cryoscape.fourier.filters import lowpass_filter

    # band-limited below Nyquist: the centred even grid has no +Nyquist partner, the rfft grid does
    image = lowpass_filter(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)), 5.0, 2.0, ndim=2)
    c = truth.ctf
    full = ctf_images(32, 2.0, defocus_u_angstrom=c.defocus_u_angstrom[0], defocus_v_angstrom=c.defocus_v_angstrom[0],
                      defocus_angle_deg=c.defocus_angle_deg[0], voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    expected = ifft2_center(fft2_center(image) * full).real
    got = apply_ctf_to_micrograph(image, micrograph_ctf_rfft((32, 32), 2.0, c, 0))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_simulate_micrographs_command_writes_readable_files_at_the_snr(tmp_path, capsys):
    out = tmp_path / "mics"
    code = main(["simulate", "micrographs", "-o", str(out), "--n-micrographs", "3", "--micrograph-size", "160", "192",
                 "-D", "16", "--particles-per-micrograph", "4", "--snr", "0.5", "--seed", "2",
                 "--defocus-range-angstrom", "8000", "9000"])
    assert code == 0 and "wrote 3 micrographs" in capsys.readouterr().out
    table = read_micrographs_star(out / "micrographs.star")
    assert len(table) == 3 and table.ctf is not None
    assert np.all((table.ctf.defocus_u_angstrom >= 8000) & (table.ctf.defocus_u_angstrom <= 9000))
    mic = read_micrograph(table.paths[0])
    assert mic.shape == (160, 192)
    gt = np.load(out / "ground_truth.npz")
    assert float(gt["signal_variance"]) / float(gt["noise_std"]) ** 2 == pytest.approx(0.5, rel=1e-6)
    coords = read_coordinates_star(out / "particles.star")
    assert len(coords) == 12
    np.testing.assert_allclose(coords["rlnCoordinateX"].to_numpy(), gt["positions_pixel"][:, 0])
    # away from the particles only noise is left: its standard deviation is the one written
    from cryoscape.simulate.micrographs import particle_box_mask

    mics = [read_micrograph(p) for p in table.paths]
    outside = np.concatenate([m[~particle_box_mask(m.shape, gt["positions_pixel"][gt["micrograph_index"] == g], 24)]
                              for g, m in enumerate(mics)])
    assert outside.std() == pytest.approx(float(gt["noise_std"]), rel=0.1)
    vol, pixel = read_mrc(out / "gt_volumes" / "vol_000.mrc")
    assert vol.shape == (16, 16, 16) and pixel == pytest.approx(float(gt["pixel_size_angstrom"]))


def test_particle_mode_still_the_default(tmp_path):
    out = tmp_path / "stack"
    assert main(["simulate", "-o", str(out), "-n", "6", "-D", "16", "--hinge-states", "2"]) == 0
    images, _ = read_mrc(out / "particles.mrcs")
    assert images.shape == (6, 16, 16)
