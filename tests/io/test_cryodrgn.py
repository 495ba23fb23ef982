"""cryoDRGN poses.pkl / ctf.pkl reading and writing, and the CtfParameters conversion."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryoscape.errors import InputError
from cryoscape.io.cryodrgn import read_ctf_pkl, read_poses_pkl, write_ctf_pkl, write_poses_pkl
from cryoscape.io.particles import CtfParameters


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


@pytest.mark.parametrize("box", [64, 65])
def test_poses_pkl_round_trip(tmp_path, box):
    rots = Rotation.random(7, random_state=3).as_matrix()
    shifts = np.random.default_rng(0).normal(size=(7, 2)) * 3
    path = tmp_path / "poses.pkl"
    write_poses_pkl(path, rots, shifts, box_size=box)
    with open(path, "rb") as f:
        stored = pickle.load(f)
    assert isinstance(stored, tuple) and len(stored) == 2
    np.testing.assert_allclose(stored[0], rots)
    np.testing.assert_allclose(stored[1], shifts / box)  # box fractions, same sign
    r2, s2 = read_poses_pkl(path, box_size=box)
    np.testing.assert_allclose(r2, rots, atol=1e-12)
    np.testing.assert_allclose(s2, shifts, atol=1e-12)


def test_poses_pkl_rotations_alone_and_float32(tmp_path):
    rots = Rotation.random(4, random_state=5).as_matrix().astype(np.float32)
    r, s = read_poses_pkl(dump(tmp_path / "rots.pkl", rots), box_size=None)
    assert s is None and r.dtype == np.float64
    np.testing.assert_array_equal(r, rots.astype(np.float64))
    r, s = read_poses_pkl(dump(tmp_path / "t.pkl", (rots, np.full((4, 2), 0.25, np.float32))), box_size=8)
    np.testing.assert_array_equal(s, 2.0)


def test_poses_pkl_bad_inputs_name_the_file(tmp_path):
    rots = Rotation.random(3, random_state=0).as_matrix()
    cases = {
        "shape.pkl": np.zeros((3, 3)),
        "trans.pkl": (rots, np.zeros((3, 3))),
        "nan.pkl": (np.where(np.eye(3) > 0, np.nan, rots), np.zeros((3, 2))),
        "notrot.pkl": (rots * 2, np.zeros((3, 2))),
        "text.pkl": "hello",
    }
    for name, obj in cases.items():
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            read_poses_pkl(dump(tmp_path / name, obj), box_size=8)
    (tmp_path / "garbage.pkl").write_bytes(b"\x00\x01 not a pickle")
    with pytest.raises(InputError, match=r"garbage\.pkl could not be read"):
        read_poses_pkl(tmp_path / "garbage.pkl", box_size=8)
    with pytest.raises(InputError, match=r"absent\.pkl was not found"):
        read_poses_pkl(tmp_path / "absent.pkl", box_size=8)
    with pytest.raises(InputError, match=r"frac\.pkl.*box size"):
        read_poses_pkl(dump(tmp_path / "frac.pkl", (rots, np.zeros((3, 2)))), box_size=None)


def test_ctf_pkl_round_trip_and_columns(tmp_path):
    ctf = CtfParameters(
        defocus_u_angstrom=[15000.5, 20000.0],
        defocus_v_angstrom=[14000.25, 19000.0],
        defocus_angle_deg=[-30.0, 45.5],
        voltage_kv=[300.0, 200.0],
        cs_mm=[2.7, 2.0],
        amplitude_contrast=[0.1, 0.07],
        phase_shift_deg=[0.0, 90.0],
    )
    arr = ctf.to_cryodrgn_array(128, np.array([1.1, 1.2]))
    np.testing.assert_array_equal(arr[0], [128, 1.1, 15000.5, 14000.25, -30.0, 300.0, 2.7, 0.1, 0.0])
    np.testing.assert_array_equal(arr[1], [128, 1.2, 20000.0, 19000.0, 45.5, 200.0, 2.0, 0.07, 90.0])
    path = tmp_path / "ctf.pkl"
    write_ctf_pkl(path, arr)
    with open(path, "rb") as f:
        stored = pickle.load(f)
    assert stored.dtype == np.float32 and stored.shape == (2, 9)
    back = read_ctf_pkl(path)
    np.testing.assert_array_equal(back, arr.astype(np.float32).astype(np.float64))
    ctf2 = CtfParameters.from_cryodrgn_array(back)
    np.testing.assert_allclose(ctf2.defocus_u_angstrom, ctf.defocus_u_angstrom, rtol=1e-7)
    np.testing.assert_allclose(ctf2.phase_shift_deg, [0, 90])
    np.testing.assert_allclose(ctf2.subset([1]).cs_mm, [2.0])


def test_ctf_pkl_bad_inputs_name_the_file(tmp_path):
    for name, obj in {"eight.pkl": np.zeros((4, 8)), "flat.pkl": np.zeros(9),
                      "nan.pkl": np.full((2, 9), np.nan), "words.pkl": ["a", "b"]}.items():
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            read_ctf_pkl(dump(tmp_path / name, obj))
