"""ParticleTable, load_particles dispatch, stack lists, pickled overrides, indices, stack checks."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryoscape.errors import InputError
from cryoscape.io.cryodrgn import write_ctf_pkl, write_poses_pkl
from cryoscape.io.particles import CtfParameters, ParticleTable, load_indices, load_particles


def make_stack(path: Path, n: int, box: int, pixel: float = 1.0, ny: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.zeros((n, ny or box, box), np.float32))
        m.voxel_size = pixel
    return path


def write_star(path: Path, names: list[str], extra: str = "") -> Path:
    cols = "_rlnImageName #1\n_rlnClassNumber #2\n"
    body = "".join(f"{n} {k + 1}\n" for k, n in enumerate(names))
    path.write_text(f"data_particles\n\nloop_\n{cols}{body}\n{extra}")
    return path


@pytest.mark.parametrize("box", [12, 13])
def test_txt_stack_list(tmp_path, box):
    make_stack(tmp_path / "lists" / "s1.mrcs", 3, box, 1.5)
    make_stack(tmp_path / "data" / "s2.mrcs", 2, box, 1.5)
    lst = tmp_path / "lists" / "stacks.txt"
    lst.write_text(f"# two stacks\ns1.mrcs\n\n{tmp_path / 'data' / 's2.mrcs'}\n")
    t = load_particles(lst)
    assert len(t) == 5 and t.box_size == box and not t.has_poses and not t.has_ctf
    assert list(t.image_paths) == [str(tmp_path / "lists" / "s1.mrcs")] * 3 + [str(tmp_path / "data" / "s2.mrcs")] * 2
    np.testing.assert_array_equal(t.image_indices, [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(t.pixel_size_angstrom, 1.5)
    # relative to --datadir first
    lst2 = tmp_path / "rel.txt"
    lst2.write_text("s2.mrcs\n")
    with pytest.raises(InputError, match=r"rel\.txt.*s2\.mrcs.*--datadir"):
        load_particles(lst2)
    assert len(load_particles(lst2, datadir=tmp_path / "data")) == 2


def test_bare_stack(tmp_path):
    stack = make_stack(tmp_path / "imgs.mrcs", 4, 9, 2.2)
    t = load_particles(stack)
    assert len(t) == 4 and t.box_size == 9
    np.testing.assert_array_equal(t.image_indices, np.arange(4))
    np.testing.assert_allclose(t.pixel_size_angstrom, 2.2, rtol=1e-6)
    with pytest.raises(InputError, match=r"imgs\.mrcs holds images but no poses; pass --poses poses\.pkl"):
        t.require_poses()
    with pytest.raises(InputError, match=r"imgs\.mrcs holds images but no CTF.*--ctf ctf\.pkl"):
        t.require_ctf()


def test_pickle_overrides_and_count_mismatch(tmp_path):
    stack = make_stack(tmp_path / "imgs.mrcs", 4, 8, 0.0)  # header without pixel size
    rots = Rotation.random(4, random_state=2).as_matrix()
    shifts = np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 0.0], [-4.0, 3.0]])
    write_poses_pkl(tmp_path / "poses.pkl", rots, shifts, box_size=8)
    ctf = CtfParameters(*(np.full(4, v) for v in (15000.0, 14000.0, 10.0, 300.0, 2.7, 0.1, 0.0)))
    # a ctf.pkl written for the 16-px original: 0.9 A at D=16 is 1.8 A at D=8
    write_ctf_pkl(tmp_path / "ctf.pkl", ctf.to_cryodrgn_array(16, 0.9))
    t = load_particles(stack, poses_path=tmp_path / "poses.pkl", ctf_path=tmp_path / "ctf.pkl")
    np.testing.assert_allclose(t.rotations, rots, atol=1e-12)
    np.testing.assert_allclose(t.shifts_pixel, shifts, atol=1e-12)
    np.testing.assert_array_equal(t.ctf.defocus_u_angstrom, 15000.0)
    np.testing.assert_allclose(t.pixel_size_angstrom, 1.8, rtol=1e-6)
    t = load_particles(stack, ctf_path=tmp_path / "ctf.pkl", pixel_size_angstrom=1.0)
    np.testing.assert_array_equal(t.pixel_size_angstrom, 1.0)

    write_poses_pkl(tmp_path / "short.pkl", rots[:3], shifts[:3], box_size=8)
    with pytest.raises(InputError, match=r"short\.pkl holds 3 poses but .*imgs\.mrcs has 4 particles"):
        load_particles(stack, poses_path=tmp_path / "short.pkl")
    write_ctf_pkl(tmp_path / "short_ctf.pkl", ctf.subset([0, 1]).to_cryodrgn_array(8, 1.0))
    with pytest.raises(InputError, match=r"short_ctf\.pkl holds 2 CTF rows but .*imgs\.mrcs has 4"):
        load_particles(stack, ctf_path=tmp_path / "short_ctf.pkl")


def test_poses_pkl_overrides_star_poses(tmp_path):
    make_stack(tmp_path / "a.mrcs", 3, 10)
    star = write_star(tmp_path / "p.star", ["1@a.mrcs", "2@a.mrcs", "3@a.mrcs"])
    rots = Rotation.random(3, random_state=4).as_matrix()
    write_poses_pkl(tmp_path / "poses.pkl", rots, None, box_size=10)
    t = load_particles(star, poses_path=tmp_path / "poses.pkl")
    np.testing.assert_allclose(t.rotations, rots, atol=1e-12)
    np.testing.assert_array_equal(t.shifts_pixel, 0.0)


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "particles.csv").write_text("x")
    with pytest.raises(InputError, match=r"particles\.csv has the unknown extension '\.csv'"):
        load_particles(tmp_path / "particles.csv")
    with pytest.raises(InputError, match=r"nothing\.star was not found"):
        load_particles(tmp_path / "nothing.star")


def test_stack_checks(tmp_path):
    make_stack(tmp_path / "a.mrcs", 5, 8)
    make_stack(tmp_path / "b.mrcs", 5, 10)
    make_stack(tmp_path / "rect.mrcs", 5, 8, ny=6)
    with pytest.raises(InputError, match=r"x\.star references image 512 of a\.mrcs which holds 5 images"):
        load_particles(write_star(tmp_path / "x.star", ["1@a.mrcs", "512@a.mrcs"]))
    with pytest.raises(InputError, match=r"y\.star.*different box sizes \(8 px in .*a\.mrcs, 10 px in .*b\.mrcs\)"):
        load_particles(write_star(tmp_path / "y.star", ["1@a.mrcs", "1@b.mrcs"]))
    with pytest.raises(InputError, match=r"rect\.mrcs holds 8x6 images"):
        load_particles(write_star(tmp_path / "z.star", ["1@rect.mrcs"]))
    with pytest.raises(InputError, match=r"datadir"):
        load_particles(write_star(tmp_path / "w.star", ["1@a.mrcs"]), datadir=tmp_path / "no_such_dir")


def test_stack_checked_once_per_unique_stack(tmp_path, monkeypatch):
    import cryoscape.io.mrc as mrc

    make_stack(tmp_path / "a.mrcs", 50, 8)
    make_stack(tmp_path / "b.mrcs", 50, 8)
    star = write_star(tmp_path / "many.star", [f"{k % 50 + 1}@{'ab'[k % 2]}.mrcs" for k in range(400)])
    calls = []
    original = mrc.read_mrc_header
    monkeypatch.setattr(mrc, "read_mrc_header", lambda p, **kw: calls.append(p) or original(p, **kw))
    t = load_particles(star)
    assert len(t) == 400 and len(calls) == 2
    assert len({id(p) for p in t.image_paths}) == 2  # rows share the path strings


def test_subset_selects_every_field(tmp_path):
    from cryoscape.io.cryosparc import write_cs

    stack = make_stack(tmp_path / "s.mrcs", 5, 8, 1.3)
    t = load_particles(stack)
    t.rotations = Rotation.random(5, random_state=0).as_matrix()
    t.shifts_pixel = np.arange(10.0).reshape(5, 2)
    t.ctf = CtfParameters(*(np.arange(5.0) + k for k in range(7)))
    write_cs(tmp_path / "s.cs", t)
    t = load_particles(tmp_path / "s.cs")
    sub = t.subset([4, 1])
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.image_indices, [4, 1])
    np.testing.assert_allclose(sub.rotations, t.rotations[[4, 1]])
    np.testing.assert_array_equal(sub.shifts_pixel, [[8, 9], [2, 3]])
    np.testing.assert_array_equal(sub.ctf.defocus_v_angstrom, [5.0, 2.0])
    assert sub.cs_records["uid"].tolist() == t.cs_records["uid"][[4, 1]].tolist()
    mask = np.array([True, False, False, True, False])
    np.testing.assert_array_equal(t.subset(mask).image_indices, [0, 3])

    make_stack(tmp_path / "a.mrcs", 3, 8)
    st = load_particles(write_star(tmp_path / "p.star", ["3@a.mrcs", "1@a.mrcs", "2@a.mrcs"]))
    sub = st.subset(np.array([2, 0]))
    assert sub.star_rows["rlnClassNumber"].tolist() == [3, 1]
    assert list(sub.star_rows.index) == [0, 1]
    np.testing.assert_array_equal(sub.image_indices, [1, 2])


def test_particle_table_checks_shapes():
    with pytest.raises(ValueError, match="rotations"):
        ParticleTable(image_paths=["a"] * 2, image_indices=[0, 1], box_size=8, pixel_size_angstrom=1.0,
                      rotations=np.zeros((3, 3, 3)))


def test_load_indices(tmp_path):
    with open(tmp_path / "ind.pkl", "wb") as f:
        pickle.dump(np.array([3, 0, 2]), f)
    np.save(tmp_path / "ind.npy", np.array([1, 4], dtype=np.int32))
    (tmp_path / "ind.txt").write_text("5 2\n7\n")
    np.testing.assert_array_equal(load_indices(tmp_path / "ind.pkl", n_particles=4), [3, 0, 2])
    np.testing.assert_array_equal(load_indices(tmp_path / "ind.npy"), [1, 4])
    assert load_indices(tmp_path / "ind.txt").dtype == np.int64
    np.testing.assert_array_equal(load_indices(tmp_path / "ind.txt"), [5, 2, 7])
    with pytest.raises(InputError, match=r"ind\.txt holds index 7 but the particle file has 6 particles"):
        load_indices(tmp_path / "ind.txt", n_particles=6)
    (tmp_path / "bad.txt").write_text("1 2 x\n")
    with pytest.raises(InputError, match=r"bad\.txt could not be read"):
        load_indices(tmp_path / "bad.txt")
    np.save(tmp_path / "float.npy", np.array([0.5, 1.0]))
    with pytest.raises(InputError, match=r"float\.npy does not hold a 1-D list of integer"):
        load_indices(tmp_path / "float.npy")
    (tmp_path / "ind.csv").write_text("1")
    with pytest.raises(InputError, match=r"ind\.csv has the unknown extension"):
        load_indices(tmp_path / "ind.csv")


def test_relative_to_cwd_is_last(tmp_path, monkeypatch):
    make_stack(tmp_path / "cwd" / "c.mrcs", 2, 8)
    meta = tmp_path / "meta"
    meta.mkdir()
    star = write_star(meta / "p.star", ["2@c.mrcs"])
    monkeypatch.chdir(tmp_path / "cwd")
    t = load_particles(star)
    assert t.image_paths[0] == os.path.join(tmp_path, "cwd", "c.mrcs")
    make_stack(meta / "c.mrcs", 2, 8)  # next to the metadata wins over the cwd
    assert load_particles(star).image_paths[0] == str(meta / "c.mrcs")
