"""RELION STAR reading and writing: 3.0 and 3.1 layouts, conventions, round trips, bad input."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

from cryoscape.errors import InputError
from cryoscape.io.particles import load_particles
from cryoscape.io.star import read_star, read_star_blocks, write_star


def make_stack(path: Path, n: int, box: int, pixel: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.zeros((n, box, box), np.float32))
        m.voxel_size = pixel
    return path


def loop(name: str, columns: list[str], rows: list[list]) -> str:
    head = f"data_{name}\n\nloop_\n" + "".join(f"_{c} #{i + 1}\n" for i, c in enumerate(columns))
    return head + "".join(" ".join(str(v) for v in r) + "\n" for r in rows) + "\n"


def passive_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's A = Rz(psi) Ry(tilt) Rz(rot) with passive elementary rotations, written out by hand."""
    def rz(a):
        c, s = np.cos(np.radians(a)), np.sin(np.radians(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(b):
        c, s = np.cos(np.radians(b)), np.sin(np.radians(b))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    return rz(psi) @ ry(tilt) @ rz(rot)


OPTICS_COLS = ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize", "rlnVoltage",
               "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImageDimensionality"]
PARTICLE_COLS = ["rlnImageName", "rlnMicrographName", "rlnOpticsGroup", "rlnAngleRot", "rlnAngleTilt",
                 "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV",
                 "rlnDefocusAngle", "rlnPhaseShift", "rlnClassNumber", "rlnMyCustomScore"]
EULERS = np.array([[10.5, 40.0, -70.0], [-120.25, 95.5, 33.3], [0.0, 0.0, 45.0], [179.9, 179.0, -179.5]])
DEFOCUS = np.array([[12345.678901, 12000.5, 10.0], [20000.0, 19000.25, -45.5],
                    [15000.123, 14000.0, 170.0], [9000.0, 9000.0, 0.0]])


def write_31(tmp_path: Path, box: int, *, optics_first: bool = True, name: str = "particles.star") -> Path:
    make_stack(tmp_path / "Extract" / "a.mrcs", 5, box, 1.25)
    make_stack(tmp_path / "Extract" / "b.mrcs", 3, box, 1.25)
    optics = loop("optics", OPTICS_COLS, [
        ["opticsGroup1", 1, 1.25, box, 300.0, 2.7, 0.1, 2],
        ["opticsGroup2", 2, 2.5, box, 200.0, 2.0, 0.07, 2],
    ])
    rows = []
    names = ["000001@Extract/a.mrcs", "000005@Extract/a.mrcs", "000003@Extract/b.mrcs", "2@Extract/a.mrcs"]
    groups = [1, 2, 1, 2]
    shifts = [[1.25, -2.5], [5.0, 2.5], [0.0, 0.125], [-3.75, 1.0]]
    for i in range(4):
        rows.append([names[i], f"mic{i}.mrc", groups[i], *EULERS[i], *shifts[i], *DEFOCUS[i], 0.0, i + 1,
                     ["1e-09", "2.123456789012", "-0.0", "3"][i]])
    particles = loop("particles", PARTICLE_COLS, rows)
    text = "# version 30001\n\n" + (optics + particles if optics_first else particles + optics)
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("box", [8, 9])
@pytest.mark.parametrize("optics_first", [True, False])
def test_read_star_31_either_block_order(tmp_path, box, optics_first):
    path = write_31(tmp_path, box, optics_first=optics_first)
    t = read_star(path)
    assert len(t) == 4 and t.box_size == box
    assert list(t.image_paths) == [str(tmp_path / "Extract" / n) for n in ("a.mrcs", "a.mrcs", "b.mrcs", "a.mrcs")]
    np.testing.assert_array_equal(t.image_indices, [0, 4, 2, 1])
    np.testing.assert_array_equal(t.pixel_size_angstrom, [1.25, 2.5, 1.25, 2.5])
    # shifts: angstroms / the particle's own optics-group pixel size
    np.testing.assert_allclose(t.shifts_pixel, [[1.0, -2.0], [2.0, 1.0], [0.0, 0.1], [-1.5, 0.4]], atol=1e-12)
    np.testing.assert_array_equal(t.ctf.voltage_kv, [300, 200, 300, 200])
    np.testing.assert_array_equal(t.ctf.cs_mm, [2.7, 2.0, 2.7, 2.0])
    np.testing.assert_array_equal(t.ctf.amplitude_contrast, [0.1, 0.07, 0.1, 0.07])
    np.testing.assert_array_equal(t.ctf.defocus_u_angstrom, DEFOCUS[:, 0])
    np.testing.assert_array_equal(t.ctf.defocus_v_angstrom, DEFOCUS[:, 1])
    np.testing.assert_array_equal(t.ctf.defocus_angle_deg, DEFOCUS[:, 2])
    np.testing.assert_array_equal(t.ctf.phase_shift_deg, 0.0)
    for i, (rot, tilt, psi) in enumerate(EULERS):
        np.testing.assert_allclose(t.rotations[i], passive_matrix(rot, tilt, psi), atol=1e-12)
    assert list(t.optics["rlnOpticsGroupName"]) == ["opticsGroup1", "opticsGroup2"]
    assert "rlnMyCustomScore" in t.star_rows.columns


def test_euler_matrix_equals_scipy_zyz_transpose(tmp_path):
    """R = A(rot, tilt, psi) = Rotation.from_euler('ZYZ', [rot, tilt, psi]).as_matrix().T."""
    t = read_star(write_31(tmp_path, 8))
    expected = Rotation.from_euler("ZYZ", EULERS, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(t.rotations, expected, atol=1e-12)
    # pose convention: rot = 90 alone turns the world x axis onto image -y (passive Rz)
    np.testing.assert_allclose(passive_matrix(90, 0, 0) @ [1, 0, 0], [0, -1, 0], atol=1e-12)


@pytest.mark.parametrize("box", [6, 7])
def test_read_star_30(tmp_path, box):
    make_stack(tmp_path / "s.mrcs", 4, box, 0.0)  # header without pixel size
    cols = ["rlnImageName", "rlnMagnification", "rlnDetectorPixelSize", "rlnVoltage", "rlnSphericalAberration",
            "rlnAmplitudeContrast", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnAngleRot",
            "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnGroupNumber"]
    rows = [[f"{k + 1}@s.mrcs", 50000.0, 7.0, 300.0, 2.7, 0.1, 10000.0 + k, 9000.0, 5.0 * k,
             *EULERS[k], 1.5 * k, -0.5, k] for k in range(4)]
    path = tmp_path / "old.star"
    path.write_text(loop("", cols, rows))
    t = load_particles(path)
    assert t.box_size == box and t.optics is None
    np.testing.assert_allclose(t.pixel_size_angstrom, 7.0 * 1e4 / 50000.0)
    np.testing.assert_array_equal(t.image_indices, [0, 1, 2, 3])
    np.testing.assert_array_equal(t.shifts_pixel, [[0, -0.5], [1.5, -0.5], [3.0, -0.5], [4.5, -0.5]])
    np.testing.assert_array_equal(t.ctf.defocus_u_angstrom, [10000, 10001, 10002, 10003])
    np.testing.assert_array_equal(t.ctf.phase_shift_deg, 0)
    np.testing.assert_allclose(t.rotations[1], passive_matrix(*EULERS[1]), atol=1e-12)

    # written back as 3.1: one optics group, shifts in angstroms, values unchanged
    out = tmp_path / "new.star"
    write_star(out, t)
    blocks = read_star_blocks(out)
    assert set(blocks) == {"optics", "particles"}
    assert len(blocks["optics"]) == 1
    assert blocks["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(1.4)
    assert blocks["optics"]["rlnVoltage"].iloc[0] == 300.0
    assert blocks["optics"]["rlnImageSize"].iloc[0] == box
    for gone in ("rlnMagnification", "rlnDetectorPixelSize", "rlnOriginX", "rlnVoltage"):
        assert gone not in blocks["particles"].columns
    np.testing.assert_array_equal(blocks["particles"]["rlnGroupNumber"], [0, 1, 2, 3])
    t2 = load_particles(out)
    np.testing.assert_allclose(t2.shifts_pixel, t.shifts_pixel, atol=1e-6)
    np.testing.assert_allclose(t2.rotations, t.rotations, atol=1e-6)
    np.testing.assert_array_equal(t2.ctf.defocus_u_angstrom, t.ctf.defocus_u_angstrom)
    np.testing.assert_array_equal(t2.ctf.cs_mm, t.ctf.cs_mm)
    np.testing.assert_allclose(t2.pixel_size_angstrom, t.pixel_size_angstrom, rtol=1e-12)


@pytest.mark.parametrize("optics_first", [True, False])
def test_star_round_trip_preserves_everything(tmp_path, optics_first):
    t = read_star(write_31(tmp_path, 9, optics_first=optics_first))
    out = tmp_path / "copy.star"
    write_star(out, t)
    t2 = read_star(out)
    np.testing.assert_allclose(t2.rotations, t.rotations, atol=1e-6)
    np.testing.assert_allclose(t2.shifts_pixel, t.shifts_pixel, atol=1e-6)
    for field in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv", "cs_mm",
                  "amplitude_contrast", "phase_shift_deg"):
        np.testing.assert_array_equal(getattr(t2.ctf, field), getattr(t.ctf, field))
    pd.testing.assert_frame_equal(t2.star_rows, t.star_rows)  # unknown columns untouched, exactly
    pd.testing.assert_frame_equal(t2.optics, t.optics)
    assert t2.star_rows["rlnMyCustomScore"].tolist() == [1e-9, 2.123456789012, -0.0, 3.0]
    assert t2.star_rows["rlnMicrographName"].tolist() == [f"mic{i}.mrc" for i in range(4)]
    assert list(t2.image_paths) == list(t.image_paths)
    np.testing.assert_array_equal(t2.image_indices, t.image_indices)


def test_write_star_subset_keeps_optics_and_rows(tmp_path):
    t = read_star(write_31(tmp_path, 8))
    out = tmp_path / "sub.star"
    write_star(out, t, indices=np.array([3, 0]))
    t2 = read_star(out)
    assert t2.star_rows["rlnClassNumber"].tolist() == [4, 1]
    np.testing.assert_array_equal(t2.image_indices, [1, 0])
    np.testing.assert_allclose(t2.rotations, t.rotations[[3, 0]], atol=1e-6)
    pd.testing.assert_frame_equal(t2.optics, t.optics)


def test_changed_poses_and_ctf_are_written(tmp_path):
    t = read_star(write_31(tmp_path, 8))
    turn = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    t.rotations[1] = turn @ t.rotations[1]
    t.shifts_pixel[2] = [0.75, -1.0]
    t.ctf.defocus_u_angstrom[0] = 11111.5
    t.ctf.voltage_kv[2] = 200.0  # particle 2 leaves optics group 1's 300 kV: the group is split
    out = tmp_path / "changed.star"
    write_star(out, t)
    t2 = read_star(out)
    np.testing.assert_allclose(t2.rotations, t.rotations, atol=1e-6)
    np.testing.assert_allclose(t2.shifts_pixel, t.shifts_pixel, atol=1e-6)
    np.testing.assert_array_equal(t2.ctf.defocus_u_angstrom, t.ctf.defocus_u_angstrom)
    np.testing.assert_array_equal(t2.ctf.voltage_kv, [300, 200, 200, 200])
    np.testing.assert_array_equal(t2.ctf.cs_mm, t.ctf.cs_mm)
    np.testing.assert_array_equal(t2.pixel_size_angstrom, t.pixel_size_angstrom)
    assert len(t2.optics) == 3
    assert t2.star_rows["rlnOpticsGroup"].tolist() == [1, 2, 3, 2]
    # untouched particles keep their original angle values exactly
    assert t2.star_rows.loc[0, "rlnAngleRot"] == 10.5
    assert t2.star_rows.loc[3, "rlnAnglePsi"] == -179.5


def test_image_name_parsing(tmp_path):
    make_stack(tmp_path / "st.mrcs", 12, 8)
    make_stack(tmp_path / "single.mrc", 1, 8)
    path = tmp_path / "names.star"
    path.write_text(loop("particles", ["rlnImageName"], [["12@st.mrcs"], ["000001@st.mrcs"], ["single.mrc"]]))
    t = read_star(path)
    np.testing.assert_array_equal(t.image_indices, [11, 0, 0])
    assert Path(t.image_paths[2]).name == "single.mrc"
    for bad in ("0@st.mrcs", "abc@st.mrcs", "1.5@st.mrcs"):
        path.write_text(loop("particles", ["rlnImageName"], [["1@st.mrcs"], [bad]]))
        with pytest.raises(InputError, match=r"names\.star.*" + bad.split("@")[0].replace(".", r"\.")):
            read_star(path)


def test_star_datadir_resolution(tmp_path):
    make_stack(tmp_path / "data" / "Extract" / "a.mrcs", 3, 8)
    meta = tmp_path / "meta"
    meta.mkdir()
    path = meta / "p.star"
    path.write_text(loop("particles", ["rlnImageName"], [["1@Extract/a.mrcs"], ["3@Extract/a.mrcs"]]))
    with pytest.raises(InputError, match=r"p\.star.*Extract/a\.mrcs.*--datadir"):
        read_star(path)
    t = read_star(path, datadir=tmp_path / "data")
    assert t.image_paths[0] == str(tmp_path / "data" / "Extract" / "a.mrcs")
    # stacks copied flat into one folder are found by file name
    make_stack(tmp_path / "flat" / "a.mrcs", 3, 8)
    t = read_star(path, datadir=tmp_path / "flat")
    assert t.image_paths[1] == str(tmp_path / "flat" / "a.mrcs")


def test_star_bad_inputs_name_the_file(tmp_path):
    make_stack(tmp_path / "a.mrcs", 5, 8)
    make_stack(tmp_path / "big.mrcs", 5, 10)
    path = tmp_path / "bad.star"

    path.write_text("this is not\na star file\n")
    with pytest.raises(InputError, match=r"bad\.star"):
        read_star(path)
    path.write_text("data_\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n1@a.mrcs 3 4 5\n")
    with pytest.raises(InputError, match=r"bad\.star.*parsed"):
        read_star(path)
    path.write_text(loop("particles", ["rlnImageName"], [["6@a.mrcs"]]))
    with pytest.raises(InputError, match=r"bad\.star references image 6 of a\.mrcs which holds 5 images"):
        read_star(path)
    path.write_text(loop("particles", ["rlnImageName"], [["1@a.mrcs"], ["1@big.mrcs"]]))
    with pytest.raises(InputError, match=r"bad\.star.*different box sizes"):
        read_star(path)
    path.write_text(loop("particles", ["rlnImageName"], [["1@missing.mrcs"]]))
    with pytest.raises(InputError, match=r"bad\.star.*missing\.mrcs.*--datadir"):
        read_star(path)
    path.write_text(loop("optics", ["rlnOpticsGroup", "rlnImagePixelSize"], [[1, 1.0]])
                    + loop("particles", ["rlnImageName", "rlnOpticsGroup"], [["1@a.mrcs", 2]]))
    with pytest.raises(InputError, match=r"bad\.star.*optics group 2"):
        read_star(path)
    path.write_text(loop("particles", ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"],
                         [["1@a.mrcs", 1.0, "nan", 3.0]]))
    with pytest.raises(InputError, match=r"bad\.star.*rlnAngleTilt"):
        read_star(path)

    # readable, but without poses / CTF when a command needs them
    path.write_text(loop("particles", ["rlnImageName", "rlnAnglePsi"], [["1@a.mrcs", 3.0]]))
    t = read_star(path)
    assert not t.has_poses and not t.has_ctf
    with pytest.raises(InputError, match=r"bad\.star has no pose columns \(rlnAngleRot/Tilt/Psi\); pass --poses"):
        t.require_poses()
    with pytest.raises(InputError, match=r"bad\.star has no CTF columns.*--ctf"):
        t.require_ctf()


def test_write_star_from_bare_stack(tmp_path):
    stack = make_stack(tmp_path / "imgs.mrcs", 3, 7, 2.0)
    t = load_particles(stack)
    t.rotations = Rotation.from_euler("ZYZ", EULERS[:3], degrees=True).as_matrix().transpose(0, 2, 1)
    t.shifts_pixel = np.array([[0.5, 1.0], [-1.0, 0.0], [2.0, 2.0]])
    out = tmp_path / "built.star"
    write_star(out, t)
    t2 = read_star(out)
    assert list(t2.image_paths) == [str(stack)] * 3
    np.testing.assert_array_equal(t2.image_indices, [0, 1, 2])
    np.testing.assert_allclose(t2.rotations, t.rotations, atol=1e-6)
    np.testing.assert_allclose(t2.shifts_pixel, t.shifts_pixel, atol=1e-6)
    assert t2.optics["rlnImagePixelSize"].tolist() == [2.0] and t2.box_size == 7
    assert not t2.has_ctf

    t.pixel_size_angstrom[:] = np.nan
    with pytest.raises(InputError, match=r"imgs\.mrcs.*pixel size"):
        write_star(tmp_path / "x.star", t)


def test_read_star_without_stacks_uses_image_size(tmp_path):
    path = write_31(tmp_path, 9)
    (tmp_path / "Extract" / "a.mrcs").unlink()
    t = read_star(path, check_stacks=False)
    assert t.box_size == 9
    assert t.image_paths[0] == str(tmp_path / "Extract" / "a.mrcs")


def test_written_elsewhere_names_stay_reachable(tmp_path, monkeypatch):
    """Relative image names that would not resolve from the new file's folder become absolute."""
    monkeypatch.chdir(tmp_path)
    t = read_star(write_31(tmp_path, 8))
    write_star(tmp_path / "here.star", t)  # same folder: names kept as written
    assert read_star_blocks(tmp_path / "here.star")["particles"]["rlnImageName"][0] == "000001@Extract/a.mrcs"
    (tmp_path / "jobs" / "job001").mkdir(parents=True)
    write_star(tmp_path / "jobs" / "job001" / "sel.star", t)  # RELION project root = cwd: still reachable
    assert read_star_blocks(tmp_path / "jobs" / "job001" / "sel.star")["particles"]["rlnImageName"][0] == (
        "000001@Extract/a.mrcs")
    monkeypatch.chdir(tmp_path / "jobs")
    out = tmp_path / "other" / "sel.star"
    write_star(out, t)
    names = read_star_blocks(out)["particles"]["rlnImageName"].tolist()
    assert names[0] == f"000001@{tmp_path / 'Extract' / 'a.mrcs'}"
    assert list(read_star(out).image_paths) == list(t.image_paths)
