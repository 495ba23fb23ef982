"""cryoSPARC .cs reading and writing: conventions, round trips through STAR, bad input."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryoscape.errors import InputError
from cryoscape.io.cryosparc import read_cs, write_cs
from cryoscape.io.particles import load_particles
from cryoscape.io.star import read_star, write_star


def make_stack(path: Path, n: int, box: int, pixel: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.zeros((n, box, box), np.float32))
        m.voxel_size = pixel
    return path


ROTVECS = np.array([[0.1, -0.2, 0.3], [1.0, 0.5, -2.0], [0.0, 0.0, 0.0], [-2.5, 0.4, 0.9], [0.3, 3.0, 0.1]])


def make_cs(project: Path, box: int, *, n: int = 5, with_poses: bool = True, with_ctf: bool = True) -> Path:
    """A project folder with J1/imported/a.mrcs and J2/particles.cs using '>'-relative paths."""
    make_stack(project / "J1" / "imported" / "a.mrcs", 6, box, 1.1)
    fields = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("location/micrograph_uid", "<u8")]
    if with_poses:
        fields += [("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
                   ("alignments3D/class_posterior", "<f4")]
    if with_ctf:
        fields += [("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/accel_kv", "<f4"),
                   ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/phase_shift_rad", "<f4")]
    rec = np.zeros(n, dtype=fields)
    rec["uid"] = np.arange(1000, 1000 + n)
    rec["blob/path"] = b">J1/imported/a.mrcs"
    rec["blob/idx"] = [5, 0, 3, 1, 2][:n]
    rec["blob/shape"] = box
    rec["blob/psize_A"] = 1.1
    rec["location/micrograph_uid"] = np.arange(n) * 7
    if with_poses:
        rec["alignments3D/pose"] = ROTVECS[:n]
        rec["alignments3D/shift"] = np.stack([np.arange(n) * 0.5, -np.arange(n) * 0.25], -1)
        rec["alignments3D/class_posterior"] = 0.9
    if with_ctf:
        rec["ctf/df1_A"] = 15000 + 100 * np.arange(n)
        rec["ctf/df2_A"] = 14000 + 100 * np.arange(n)
        rec["ctf/df_angle_rad"] = np.linspace(-1.0, 1.0, n)
        rec["ctf/accel_kv"] = 300
        rec["ctf/cs_mm"] = 2.7
        rec["ctf/amp_contrast"] = 0.1
        rec["ctf/phase_shift_rad"] = np.pi / 4
    path = project / "J2" / "particles.cs"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.save(f, rec)
    return path


@pytest.mark.parametrize("box", [10, 11])
def test_read_cs_conventions(tmp_path, box):
    path = make_cs(tmp_path / "proj", box)
    t = load_particles(path)
    assert len(t) == 5 and t.box_size == box
    assert set(t.image_paths) == {str(tmp_path / "proj" / "J1" / "imported" / "a.mrcs")}
    np.testing.assert_array_equal(t.image_indices, [5, 0, 3, 1, 2])
    np.testing.assert_allclose(t.pixel_size_angstrom, np.float32(1.1))
    expected = Rotation.from_rotvec(ROTVECS.astype(np.float32)).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(t.rotations, expected, atol=1e-12)
    np.testing.assert_array_equal(t.shifts_pixel[:, 0], np.arange(5) * 0.5)
    np.testing.assert_array_equal(t.shifts_pixel[:, 1], -np.arange(5) * 0.25)
    np.testing.assert_allclose(t.ctf.defocus_angle_deg, np.degrees(np.linspace(-1, 1, 5).astype(np.float32).astype(np.float64)),
                               rtol=1e-12)
    np.testing.assert_allclose(t.ctf.phase_shift_deg, 45.0, rtol=1e-6)
    np.testing.assert_array_equal(t.ctf.defocus_u_angstrom, 15000 + 100 * np.arange(5))
    np.testing.assert_allclose(t.ctf.cs_mm, 2.7, rtol=1e-6)
    assert t.cs_records["location/micrograph_uid"].tolist() == [0, 7, 14, 21, 28]


def test_cs_write_read_keeps_other_fields_and_subsets(tmp_path):
    path = make_cs(tmp_path / "proj", 8)
    t = read_cs(path)
    out = tmp_path / "proj" / "J3" / "subset.cs"
    write_cs(out, t, indices=np.array([4, 1]))
    assert out.suffix == ".cs" and not (out.parent / "subset.cs.npy").exists()
    rec = np.load(out)
    assert rec.dtype == t.cs_records.dtype  # every original field kept
    assert rec["uid"].tolist() == [1004, 1001]
    assert rec["alignments3D/class_posterior"].tolist() == pytest.approx([0.9, 0.9])
    np.testing.assert_array_equal(rec["alignments3D/pose"], t.cs_records["alignments3D/pose"][[4, 1]])
    t2 = read_cs(out)
    np.testing.assert_allclose(t2.rotations, t.rotations[[4, 1]], atol=1e-6)
    np.testing.assert_array_equal(t2.image_indices, [2, 0])


def test_cs_to_star_to_cs_poses_equal(tmp_path):
    t = read_cs(make_cs(tmp_path / "proj", 9))
    star = tmp_path / "p.star"
    write_star(star, t)
    t_star = read_star(star)
    np.testing.assert_allclose(t_star.rotations, t.rotations, atol=1e-6)
    np.testing.assert_allclose(t_star.shifts_pixel, t.shifts_pixel, atol=1e-5)
    np.testing.assert_allclose(t_star.ctf.defocus_angle_deg, t.ctf.defocus_angle_deg, atol=1e-5)
    np.testing.assert_allclose(t_star.pixel_size_angstrom, t.pixel_size_angstrom, rtol=1e-6)
    out = tmp_path / "back.cs"
    write_cs(out, t_star)  # a table from STAR: records are built
    t_cs = read_cs(out)
    np.testing.assert_allclose(t_cs.rotations, t.rotations, atol=1e-6)
    np.testing.assert_allclose(t_cs.shifts_pixel, t.shifts_pixel, atol=1e-5)
    for field in ("defocus_u_angstrom", "defocus_v_angstrom", "voltage_kv", "cs_mm", "amplitude_contrast"):
        np.testing.assert_array_equal(getattr(t_cs.ctf, field).astype(np.float32), getattr(t.ctf, field).astype(np.float32))
    np.testing.assert_allclose(t_cs.ctf.phase_shift_deg, t.ctf.phase_shift_deg, atol=1e-4)
    np.testing.assert_array_equal(t_cs.image_indices, t.image_indices)
    assert list(t_cs.image_paths) == list(t.image_paths)
    rec = np.load(out)
    assert rec["uid"].dtype == np.uint64 and len(np.unique(rec["uid"])) == 5


@pytest.mark.parametrize("box", [6, 7])
def test_cs_built_from_bare_stack_round_trip(tmp_path, box):
    stack = make_stack(tmp_path / "s.mrcs", 4, box, 1.7)
    t = load_particles(stack)
    rng = np.random.default_rng(0)
    t.rotations = Rotation.random(4, random_state=1).as_matrix()
    t.shifts_pixel = rng.normal(size=(4, 2))
    out = tmp_path / "s.cs"
    write_cs(out, t)
    t2 = read_cs(out)
    assert t2.box_size == box and not t2.has_ctf
    np.testing.assert_allclose(t2.rotations, t.rotations, atol=1e-6)
    np.testing.assert_allclose(t2.shifts_pixel, t.shifts_pixel, atol=1e-6)
    np.testing.assert_allclose(t2.pixel_size_angstrom, 1.7, rtol=1e-6)
    assert np.load(out)["blob/shape"][0].tolist() == [box, box]


def test_cs_datadir_and_missing_stack(tmp_path):
    path = make_cs(tmp_path / "proj", 8)
    moved = tmp_path / "elsewhere" / "particles.cs"
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    with pytest.raises(InputError, match=r"particles\.cs.*J1/imported/a\.mrcs.*--datadir"):
        read_cs(moved)
    t = read_cs(moved, datadir=tmp_path / "proj")
    assert t.image_paths[0] == str(tmp_path / "proj" / "J1" / "imported" / "a.mrcs")


def test_cs_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "bad.cs"
    bad.write_text("not numpy")
    with pytest.raises(InputError, match=r"bad\.cs could not be read"):
        load_particles(bad)
    with open(bad, "wb") as f:
        np.save(f, np.zeros(3, dtype=[("uid", "<u8")]))
    with pytest.raises(InputError, match=r"bad\.cs has no blob/path"):
        load_particles(bad)
    path = make_cs(tmp_path / "proj", 8, with_poses=False, with_ctf=False)
    t = read_cs(path)
    with pytest.raises(InputError, match=r"particles\.cs has no pose fields"):
        t.require_poses()
    with pytest.raises(InputError, match=r"particles\.cs has no CTF fields"):
        t.require_ctf()
    rec = np.load(path)
    rec["blob/idx"][0] = 6
    with open(path, "wb") as f:
        np.save(f, rec)
    with pytest.raises(InputError, match=r"particles\.cs references image 7 of J1/imported/a\.mrcs which holds 6"):
        read_cs(path)
