"""Gaussian-atom rendering, atomic models and maps (simulate/volumes.py)."""

import math

import numpy as np
import pytest

from cryoscape.errors import InputError
from cryoscape.io.mrc import write_mrc
from cryoscape.simulate.volumes import (
    GAUSSIAN_SIGMA_PER_RESOLUTION,
    read_atomic_model,
    render_gaussian_atoms,
    volume_from_atomic_model,
    volume_from_map,
)


def voxel_coords_angstrom(D, pixel):
    """(D, D, D, 3) (x, y, z) positions of voxel centres relative to the box centre D//2."""
    c = (np.arange(D) - D // 2) * pixel
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return np.stack([x, y, z], axis=-1)


def sampled_gaussian(D, pixel, centre, weight, sigma_angstrom):
    s = sigma_angstrom / pixel
    r2 = (((voxel_coords_angstrom(D, pixel) - centre) / pixel) ** 2).sum(-1)
    return weight / ((2 * math.pi) ** 1.5 * s**3) * np.exp(-r2 / (2 * s * s))


@pytest.mark.parametrize("D", [24, 25])
@pytest.mark.parametrize("resolution", [4.0, 20.0])  # narrow (local windows) and wide (dense) paths
def test_single_atom_matches_sampled_gaussian(D, resolution):
    pixel = 1.3
    centre = np.array([1.37, -2.21, 0.64])
    vol = render_gaussian_atoms(centre[None], np.array([3.0]), box_size=D, pixel_size_angstrom=pixel,
                                resolution_angstrom=resolution)
    expected = sampled_gaussian(D, pixel, centre, 3.0, GAUSSIAN_SIGMA_PER_RESOLUTION * resolution)
    assert vol.shape == (D, D, D) and vol.dtype == np.float32
    np.testing.assert_allclose(vol, expected, atol=1e-6 * expected.max())


@pytest.mark.parametrize("D", [32, 33])
def test_mass_and_centroid(D):
    rng = np.random.default_rng(D)
    pixel = 2.0
    coords = rng.normal(scale=6.0, size=(300, 3)) + np.array([3.0, -4.0, 2.5])
    weights = rng.uniform(1, 8, size=300)
    vol = render_gaussian_atoms(coords, weights, box_size=D, pixel_size_angstrom=pixel, resolution_angstrom=8.0)
    np.testing.assert_allclose(vol.sum(dtype=np.float64), weights.sum(), rtol=1e-3)
    pos = voxel_coords_angstrom(D, pixel)
    centroid = (vol[..., None] * pos).reshape(-1, 3).sum(0) / vol.sum(dtype=np.float64)
    expected = (weights[:, None] * coords).sum(0) / weights.sum()
    np.testing.assert_allclose(centroid, expected, atol=0.01)
    centred = render_gaussian_atoms(coords, weights, box_size=D, pixel_size_angstrom=pixel,
                                    resolution_angstrom=8.0, center=True)
    centroid = (centred[..., None] * pos).reshape(-1, 3).sum(0) / centred.sum(dtype=np.float64)
    np.testing.assert_allclose(centroid, 0.0, atol=0.01)


def test_atoms_outside_box_are_dropped():
    vol = render_gaussian_atoms(np.array([[100.0, 0, 0]]), np.array([1.0]), box_size=16,
                                pixel_size_angstrom=1.0, resolution_angstrom=4.0)
    assert vol.sum() == 0.0


PDB_TEXT = """\
ATOM      1  N   ALA A   1      11.104   6.134  -6.504  1.00  0.00           N
ATOM      2  CA  ALA A   1      11.639   6.071  -5.147  1.00  0.00           C
ATOM      3  C   ALA A   1      13.559   5.127  -4.640  1.00  0.00           C
ATOM      4  O   ALA A   1      14.155   6.095  -4.089  0.50  0.00           O
ATOM      5  SG  CYS A   2       9.800   4.900  -3.300  1.00  0.00           S
ATOM      6  H   ALA A   1      10.500   6.900  -6.800  1.00  0.00           H
END
"""


def test_atomic_model_weights_and_hydrogens(tmp_path):
    path = tmp_path / "model.pdb"
    path.write_text(PDB_TEXT)
    coords, weights = read_atomic_model(path)
    assert len(coords) == 5  # hydrogen skipped
    np.testing.assert_allclose(weights, [7, 6, 6, 8 * 0.5, 16])
    vol = volume_from_atomic_model(path, box_size=24, pixel_size_angstrom=1.5, resolution_angstrom=5.0)
    np.testing.assert_allclose(vol.sum(dtype=np.float64), weights.sum(), rtol=1e-3)
    pos = voxel_coords_angstrom(24, 1.5)
    centroid = (vol[..., None] * pos).reshape(-1, 3).sum(0) / vol.sum(dtype=np.float64)
    np.testing.assert_allclose(centroid, 0.0, atol=0.02)  # centred by default


def test_unreadable_atomic_model_raises(tmp_path):
    bad = tmp_path / "bad.cif"
    bad.write_text("this is not a structure\n")
    with pytest.raises(InputError, match="bad.cif"):
        read_atomic_model(bad)
    with pytest.raises(InputError, match="not found"):
        read_atomic_model(tmp_path / "missing.pdb")


def test_volume_from_map_roundtrip_and_box(tmp_path):
    vol = render_gaussian_atoms(np.array([[2.0, -3.0, 1.0]]), np.array([10.0]), box_size=24,
                                pixel_size_angstrom=2.0, resolution_angstrom=10.0)
    path = tmp_path / "map.mrc"
    write_mrc(path, vol, pixel_size_angstrom=2.0)
    same, pixel = volume_from_map(path)
    assert pixel == pytest.approx(2.0)
    np.testing.assert_allclose(same, vol, rtol=1e-6, atol=1e-7)
    bigger, _ = volume_from_map(path, box_size=31)  # real-space pad keeps the centre
    np.testing.assert_allclose(bigger.sum(), vol.sum(), rtol=1e-5)
    np.testing.assert_allclose(bigger[15 - 12 : 15 + 12, 15 - 12 : 15 + 12, 15 - 12 : 15 + 12], vol, atol=1e-7)


@pytest.mark.parametrize("new_pixel, expected_box", [(4.0, 16), (3.0, 22)])
def test_volume_from_map_resamples_pixel_size(tmp_path, new_pixel, expected_box):
    centre = np.array([[2.0, -3.0, 1.0]])
    vol = render_gaussian_atoms(centre, np.array([10.0]), box_size=32, pixel_size_angstrom=2.0,
                                resolution_angstrom=20.0)
    path = tmp_path / "map.mrc"
    write_mrc(path, vol, pixel_size_angstrom=2.0)
    resampled, pixel = volume_from_map(path, pixel_size_angstrom=new_pixel, box_size=expected_box)
    assert pixel == pytest.approx(new_pixel)
    # values (density) are kept: the same Gaussian rendered at the new pixel size holds
    # (new/old)^3 times the weight per voxel
    direct = render_gaussian_atoms(centre, np.array([10.0]), box_size=expected_box,
                                   pixel_size_angstrom=new_pixel, resolution_angstrom=20.0)
    direct *= (2.0 / new_pixel) ** 3
    rel = np.linalg.norm(resampled - direct) / np.linalg.norm(direct)
    assert rel < 0.01, rel


def test_non_cubic_map_raises(tmp_path):
    path = tmp_path / "flat.mrc"
    write_mrc(path, np.zeros((4, 8, 8), np.float32), pixel_size_angstrom=1.0, is_stack=False)
    with pytest.raises(InputError, match="cubic"):
        volume_from_map(path)
