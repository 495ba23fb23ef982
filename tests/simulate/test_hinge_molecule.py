"""The built-in hinge molecule (simulate/molecule.py)."""

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from cryoscape.simulate.molecule import default_pixel_size_angstrom, hinge_axis, hinge_molecule
from cryoscape.simulate.volumes import render_gaussian_atoms

D = 32


def render(coords, weights):
    pixel = default_pixel_size_angstrom(D)
    return render_gaussian_atoms(coords, weights, box_size=D, pixel_size_angstrom=pixel, resolution_angstrom=3 * pixel)


def normalised_difference(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(a)


def test_deterministic_protein_like_size():
    c1, w1 = hinge_molecule(20.0)
    c2, w2 = hinge_molecule(20.0)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(w1, w2)
    assert 1000 <= len(c1) <= 4000
    extent = pdist(c1).max()
    assert 110 <= extent <= 160
    # fits the default box (~60% fill): every atom within 0.35 D pixels of the centre
    assert np.linalg.norm(c1, axis=1).max() < 0.35 * D * default_pixel_size_angstrom(D)
    assert pdist(c1).min() > 2.0  # no clashes


def test_hinge_moves_only_the_domain_rigidly():
    c0, _, moving = hinge_molecule(0.0, return_moving=True)
    c60, _ = hinge_molecule(60.0)
    assert 0.1 < moving.mean() < 0.35
    np.testing.assert_allclose(c60[~moving], c0[~moving], atol=1e-12)
    # rigid motion about the axis: distances within the domain and to the hinge axis are kept
    np.testing.assert_allclose(pdist(c60[moving]), pdist(c0[moving]), atol=1e-9)
    point, axis = hinge_axis()

    def axis_distance(c):
        rel = c - point
        return np.linalg.norm(rel - (rel @ axis)[:, None] * axis, axis=1)

    np.testing.assert_allclose(axis_distance(c60[moving]), axis_distance(c0[moving]), atol=1e-9)
    shift = np.linalg.norm(c60[moving].mean(0) - c0[moving].mean(0))
    assert 15 < shift < 40


def test_hinge_angle_changes_the_map():
    v0 = render(*hinge_molecule(0.0))
    v60 = render(*hinge_molecule(60.0))
    v1 = render(*hinge_molecule(1.0))
    assert normalised_difference(v0, v60) > 0.3
    assert normalised_difference(v0, v1) < 0.05  # continuous in the angle


def test_not_centrosymmetric_nor_mirror_symmetric():
    coords, weights = hinge_molecule(30.0)
    v = render(coords, weights)
    inverted = render(-coords, weights)
    assert normalised_difference(v, inverted) > 0.5
    for axis in range(3):  # the molecule is flattest along z, so its z mirror differs least
        mirrored = coords.copy()
        mirrored[:, axis] *= -1
        assert normalised_difference(v, render(mirrored, weights)) > 0.2
