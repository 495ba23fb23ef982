"""The dataset writer (simulate/dataset.py): files agree with each other and with the truth."""

import numpy as np
import pytest
import yaml

from cryoscape.io.cryodrgn import read_ctf_pkl, read_poses_pkl
from cryoscape.io.mrc import read_mrc
from cryoscape.io.particles import load_particles
from cryoscape.io.star import read_star
from cryoscape.simulate.dataset import simulate_dataset
from cryoscape.simulate.ensembles import build_ensemble
from cryoscape.simulate.images import sample_image_parameters, simulate_images

N = 60
D = 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    ens = build_ensemble(box_size=D, hinge_states=4)
    out = tmp_path_factory.mktemp("sim") / "run"
    kwargs = dict(ensemble=ens, n_images=N, seed=11, snr=0.5, shift_max_pixel=2.0, astigmatism_angstrom=300.0,
                  b_factor_angstrom2=40.0, batch_size=16)
    path = simulate_dataset(out, **kwargs)
    return ens, path, kwargs


def test_files_agree(dataset):
    ens, path, kwargs = dataset
    gt = np.load(path / "ground_truth.npz")
    images, pixel = read_mrc(path / "particles.mrcs")
    assert images.shape == (N, D, D) and pixel == pytest.approx(ens.pixel_size_angstrom, rel=1e-5)

    table = read_star(path / "particles.star")
    assert len(table) == N and table.box_size == D
    assert all(p == str((path / "particles.mrcs").resolve()) for p in table.image_paths)
    np.testing.assert_array_equal(table.image_indices, np.arange(N))
    np.testing.assert_allclose(table.rotations, gt["rotations"], atol=1e-5)
    np.testing.assert_allclose(table.shifts_pixel, gt["shifts_pixel"], atol=1e-5)
    np.testing.assert_allclose(table.ctf.defocus_u_angstrom, gt["defocus_u_angstrom"], atol=1e-5)
    np.testing.assert_allclose(table.ctf.defocus_v_angstrom, gt["defocus_v_angstrom"], atol=1e-5)
    np.testing.assert_allclose(table.ctf.defocus_angle_deg, gt["defocus_angle_deg"], atol=1e-5)
    np.testing.assert_allclose(table.ctf.voltage_kv, 300.0)
    np.testing.assert_allclose(table.pixel_size_angstrom, ens.pixel_size_angstrom, rtol=1e-6)
    assert np.allclose(table.star_rows["rlnCtfBfactor"].astype(float), 40.0)
    with open(path / "particles.star") as f:
        assert "000001@particles.mrcs" in f.read()  # relative image names

    rots, shifts = read_poses_pkl(path / "poses.pkl", box_size=D)
    np.testing.assert_allclose(rots, gt["rotations"], atol=1e-12)
    np.testing.assert_allclose(shifts, gt["shifts_pixel"], atol=1e-9)
    ctf = read_ctf_pkl(path / "ctf.pkl")
    assert ctf.shape == (N, 9)
    np.testing.assert_allclose(ctf[:, 0], D)
    np.testing.assert_allclose(ctf[:, 1], ens.pixel_size_angstrom, rtol=1e-6)
    np.testing.assert_allclose(ctf[:, 2], gt["defocus_u_angstrom"], rtol=1e-6)
    np.testing.assert_allclose(ctf[:, 3], gt["defocus_v_angstrom"], rtol=1e-6)
    np.testing.assert_allclose(ctf[:, 5:8], [[300.0, 2.7, 0.1]] * N, rtol=1e-6)

    # ground truth: states and angles, and the volume files
    assert str(gt["kind"]) == "hinge" and str(gt["coordinate_name"]) == "hinge_angle_deg"
    width = 60.0 / 4
    assert np.all(np.abs(gt["coordinate"] - gt["state_values"][gt["state_index"]]) <= width / 2 + 1e-9)
    assert len(gt["volume_files"]) == 4
    for m, name in enumerate(gt["volume_files"]):
        vol, vpix = read_mrc(path / str(name))
        np.testing.assert_allclose(vol, ens.volumes[m], atol=1e-7)
    assert float(gt["snr"]) == 0.5
    assert float(gt["noise_std"]) == pytest.approx(np.sqrt(float(gt["signal_variance"]) / 0.5))

    config = yaml.safe_load((path / "config.yaml").read_text())
    assert config["arguments"]["n_images"] == N and config["dataset"]["noise_std"] == pytest.approx(float(gt["noise_std"]))


def test_stack_equals_in_memory_simulation(dataset):
    ens, path, kwargs = dataset
    images, _ = read_mrc(path / "particles.mrcs")
    params = sample_image_parameters(N, ens, seed=11, shift_max_pixel=2.0, astigmatism_angstrom=300.0,
                                     b_factor_angstrom2=40.0)
    again = simulate_images(ens, params, snr=0.5, seed=11, batch_size=5).images
    np.testing.assert_allclose(images, again, atol=1e-5)


def test_same_seed_same_dataset(dataset, tmp_path):
    ens, path, kwargs = dataset
    second = simulate_dataset(tmp_path / "again", **kwargs)
    a, _ = read_mrc(path / "particles.mrcs")
    b, _ = read_mrc(second / "particles.mrcs")
    np.testing.assert_array_equal(a, b)
    assert (path / "particles.star").read_text() == (second / "particles.star").read_text()
    kwargs = dict(kwargs, seed=12)
    third = simulate_dataset(tmp_path / "other", **kwargs)
    c, _ = read_mrc(third / "particles.mrcs")
    assert not np.allclose(a, c)
    assert not list((tmp_path / "again").glob(".*tmp"))  # no temporary files left behind


def test_load_particles_reads_the_dataset(dataset):
    ens, path, kwargs = dataset
    table = load_particles(path / "particles.star")
    assert len(table) == N and table.has_poses and table.has_ctf
