"""Ensembles and state assignment (simulate/ensembles.py)."""

import numpy as np
import pytest

from cryoscape.errors import InputError
from cryoscape.io.mrc import write_mrc
from cryoscape.simulate.ensembles import (
    build_ensemble,
    discrete_ensemble,
    hinge_ensemble,
    load_volumes,
    trajectory_ensemble,
)
from cryoscape.simulate.volumes import render_gaussian_atoms

D = 16


def blob(x, D=D, pixel=2.0):
    return render_gaussian_atoms(np.array([[x, 0.0, 0.0]]), np.array([1.0]), box_size=D, pixel_size_angstrom=pixel,
                                 resolution_angstrom=8.0)


def test_discrete_populations():
    ens = discrete_ensemble(np.stack([blob(0), blob(2), blob(4)]), pixel_size_angstrom=2.0, populations=[1, 2, 7])
    states = ens.sample_states(20000, np.random.default_rng(0))
    freq = np.bincount(states.state_index, minlength=3) / 20000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.7], atol=0.015)
    assert np.isnan(states.coordinate).all()
    with pytest.raises(InputError, match="populations"):
        discrete_ensemble(np.stack([blob(0), blob(2)]), pixel_size_angstrom=2.0, populations=[1, 2, 3])


def test_trajectory_nearest_volume():
    ens = trajectory_ensemble(np.stack([blob(x) for x in range(5)]), pixel_size_angstrom=2.0)
    s = ens.sample_states(5000, np.random.default_rng(1))
    assert s.coordinate.min() >= 0 and s.coordinate.max() <= 1
    # the chosen volume is the nearest one: |u - m/(M-1)| <= 1/(2(M-1))
    assert np.all(np.abs(s.coordinate - ens.state_values[s.state_index]) <= 0.125 + 1e-12)
    with pytest.raises(InputError, match="at least 2"):
        trajectory_ensemble(blob(0)[None], pixel_size_angstrom=2.0)


def test_hinge_bins():
    ens = hinge_ensemble(box_size=D, pixel_size_angstrom=12.0, resolution_angstrom=36.0, angle_range_deg=(10, 50),
                         n_states=8)
    assert ens.volumes.shape == (8, D, D, D)
    np.testing.assert_allclose(ens.state_values, 10 + 5 * (np.arange(8) + 0.5))
    s = ens.sample_states(4000, np.random.default_rng(2))
    assert s.coordinate.min() >= 10 and s.coordinate.max() <= 50
    assert np.all(np.abs(s.coordinate - ens.state_values[s.state_index]) <= 2.5 + 1e-9)
    assert np.bincount(s.state_index, minlength=8).min() > 350  # uniform


def test_load_volumes_keeps_conformations_superposed(tmp_path):
    line = "ATOM  {:5d}  CA  ALA A{:4d}    {:8.3f}{:8.3f}{:8.3f}  1.00  0.00           C\n"
    atoms = np.array([[0.0, 0.0, 0.0], [4.0, 1.0, 0.0], [8.0, 0.0, 2.0]])
    for name, shift in (("a.pdb", 0.0), ("b.pdb", 6.0)):
        moved = atoms.copy()
        moved[2, 0] += shift  # only the last atom moves
        text = "".join(line.format(i + 1, i + 1, *p) for i, p in enumerate(moved)) + "END\n"
        (tmp_path / name).write_text(text)
    vols, pixel = load_volumes([tmp_path / "a.pdb", tmp_path / "b.pdb"], box_size=24, pixel_size_angstrom=2.0,
                               resolution_angstrom=6.0)
    assert pixel == 2.0 and vols.shape == (2, 24, 24, 24)
    # the first two atoms sit at the same voxels in both maps (common centring)
    centroid = atoms.mean(0)
    i0 = np.round((atoms[0] - centroid) / 2.0).astype(int) + 12
    assert vols[0][i0[2], i0[1], i0[0]] == pytest.approx(vols[1][i0[2], i0[1], i0[0]], rel=1e-2)
    assert np.linalg.norm(vols[0] - vols[1]) / np.linalg.norm(vols[0]) > 0.2


def test_build_ensemble_defaults_and_errors(tmp_path):
    ens = build_ensemble(box_size=D, hinge_states=3)
    assert ens.kind == "hinge" and ens.n_states == 3 and ens.box_size == D
    ens = build_ensemble(box_size=D, heterogeneity="discrete", n_classes=2, populations=[1, 3])
    assert ens.kind == "discrete" and list(ens.state_values) == [0.0, 60.0]
    np.testing.assert_allclose(ens.populations, [0.25, 0.75])
    ens = build_ensemble(box_size=D, heterogeneity="none")
    assert ens.kind == "homogeneous" and ens.n_states == 1

    m1, m2 = tmp_path / "m1.mrc", tmp_path / "m2.mrc"
    write_mrc(m1, blob(0), pixel_size_angstrom=2.0)
    write_mrc(m2, blob(4), pixel_size_angstrom=2.0)
    ens = build_ensemble(molecule=m1)
    assert ens.kind == "homogeneous" and ens.pixel_size_angstrom == pytest.approx(2.0)
    np.testing.assert_allclose(ens.volumes[0], blob(0), atol=1e-7)
    ens = build_ensemble(classes=[m1, m2], populations=[1, 1])
    assert ens.kind == "discrete" and ens.labels == [str(m1), str(m2)]
    ens = build_ensemble(trajectory=[m1, m2])
    assert ens.kind == "trajectory"

    with pytest.raises(InputError, match="heterogeneity"):
        build_ensemble(classes=[m1, m2], heterogeneity="hinge")
    with pytest.raises(InputError, match="needs"):
        build_ensemble(molecule=m1, heterogeneity="hinge")
    with pytest.raises(InputError, match="not found"):
        build_ensemble(classes=[m1, tmp_path / "nope.mrc"])
    with pytest.raises(InputError, match="extension"):
        build_ensemble(molecule=tmp_path / "thing.xyz")
