"""``cryoscape import``: conversion with --ind writes exactly the selected particles."""

from __future__ import annotations

import pickle
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryoscape.cli import import_
from cryoscape.cli.main import main
from cryoscape.io.particles import load_particles


def make_dataset(root: Path, box: int = 11, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(root / "stack.mrcs", overwrite=True) as m:
        m.set_data(np.zeros((n, box, box), np.float32))
        m.voxel_size = 1.5
    eulers = Rotation.random(n, random_state=7).as_euler("ZYZ", degrees=True)
    rows = "".join(
        f"{k + 1:06d}@stack.mrcs 1 {eulers[k, 0]:.6f} {eulers[k, 1]:.6f} {eulers[k, 2]:.6f} {0.5 * k:.6f} "
        f"{-0.25 * k:.6f} {10000 + 100 * k:.6f} {9500 + 100 * k:.6f} {3.0 * k:.6f} {k * 11} tag{k}\n"
        for k in range(n)
    )
    text = (
        "data_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n_rlnImagePixelSize #3\n"
        f"_rlnImageSize #4\n_rlnVoltage #5\n_rlnSphericalAberration #6\n_rlnAmplitudeContrast #7\n"
        f"opticsGroup1 1 1.500000 {box} 300.000000 2.700000 0.100000\n\n"
        "data_particles\n\nloop_\n_rlnImageName #1\n_rlnOpticsGroup #2\n_rlnAngleRot #3\n_rlnAngleTilt #4\n"
        "_rlnAnglePsi #5\n_rlnOriginXAngst #6\n_rlnOriginYAngst #7\n_rlnDefocusU #8\n_rlnDefocusV #9\n"
        "_rlnDefocusAngle #10\n_rlnRandomSubset #11\n_rlnCustomTag #12\n" + rows
    )
    (root / "particles.star").write_text(text)
    return root / "particles.star"


def test_module_interface():
    assert isinstance(import_.HELP, str) and "\n" not in import_.HELP
    assert import_.EXAMPLE.startswith("cryoscape import ")


def test_import_subset_to_every_format(tmp_path):
    star = make_dataset(tmp_path / "data")
    full = load_particles(star)
    ind = np.array([4, 1, 5])
    with open(tmp_path / "ind.pkl", "wb") as f:
        pickle.dump(ind, f)
    out = tmp_path / "out"
    code = main(["import", str(star), "--ind", str(tmp_path / "ind.pkl"),
                 "--out-star", str(out / "sub.star"), "--out-cs", str(out / "sub.cs"),
                 "--out-poses", str(out / "poses.pkl"), "--out-ctf", str(out / "ctf.pkl")])
    assert code == 0

    # rlnImageName is kept as the input had it (relative to the RELION project): read it from there
    sub = load_particles(out / "sub.star", datadir=tmp_path / "data")
    original = full.star_rows["rlnImageName"].to_numpy()[ind].tolist()
    assert sub.star_rows["rlnImageName"].tolist() == original
    assert sub.star_rows["rlnCustomTag"].tolist() == ["tag4", "tag1", "tag5"]
    assert sub.star_rows["rlnRandomSubset"].tolist() == [44, 11, 55]
    np.testing.assert_array_equal(sub.image_indices, ind)
    np.testing.assert_allclose(sub.rotations, full.rotations[ind], atol=1e-6)
    np.testing.assert_array_equal(sub.ctf.defocus_u_angstrom, full.ctf.defocus_u_angstrom[ind])

    cs = load_particles(out / "sub.cs")
    np.testing.assert_array_equal(cs.image_indices, ind)
    np.testing.assert_allclose(cs.rotations, full.rotations[ind], atol=1e-6)
    np.testing.assert_allclose(cs.shifts_pixel, full.shifts_pixel[ind], atol=1e-6)

    with open(out / "poses.pkl", "rb") as f:
        rots, trans = pickle.load(f)
    np.testing.assert_allclose(rots, full.rotations[ind], atol=1e-12)
    np.testing.assert_allclose(trans * 11, full.shifts_pixel[ind], atol=1e-12)
    with open(out / "ctf.pkl", "rb") as f:
        ctf = pickle.load(f)
    assert ctf.shape == (3, 9)
    np.testing.assert_array_equal(ctf[:, 0], 11)
    np.testing.assert_allclose(ctf[:, 1], 1.5)
    np.testing.assert_allclose(ctf[:, 2], [10400, 10100, 10500])


def test_import_stack_with_pickles_to_star(tmp_path):
    """A bare stack plus poses.pkl/ctf.pkl becomes a STAR file that reads back to the same values."""
    star = make_dataset(tmp_path / "data", box=10)
    main(["import", str(star), "--out-poses", str(tmp_path / "p.pkl"), "--out-ctf", str(tmp_path / "c.pkl")])
    code = main(["import", str(tmp_path / "data" / "stack.mrcs"), "--poses", str(tmp_path / "p.pkl"),
                 "--ctf", str(tmp_path / "c.pkl"), "--out-star", str(tmp_path / "rebuilt.star")])
    assert code == 0
    a, b = load_particles(star), load_particles(tmp_path / "rebuilt.star")
    np.testing.assert_allclose(b.rotations, a.rotations, atol=1e-6)
    np.testing.assert_allclose(b.shifts_pixel, a.shifts_pixel, atol=1e-5)
    np.testing.assert_allclose(b.ctf.defocus_v_angstrom, a.ctf.defocus_v_angstrom, rtol=1e-7)
    np.testing.assert_allclose(b.pixel_size_angstrom, 1.5, rtol=1e-6)


def test_import_errors_are_one_line(tmp_path, capsys):
    star = make_dataset(tmp_path / "data")
    (tmp_path / "data" / "stack.mrcs").unlink()
    assert main(["import", str(star), "--out-cs", str(tmp_path / "x.cs")]) == 2
    err = capsys.readouterr().err
    assert "particles.star" in err and "stack.mrcs" in err and "--datadir" in err
    assert "Traceback" not in err and not (tmp_path / "x.cs").exists()
    assert main(["import", str(star)]) == 2
    assert "--out-star" in capsys.readouterr().err
    # metadata-only conversion without the stacks
    assert main(["import", str(star), "--no-stack-check", "--out-cs", str(tmp_path / "x.cs")]) == 0
    assert len(np.load(tmp_path / "x.cs")) == 6


def test_import_index_out_of_range(tmp_path, capsys):
    star = make_dataset(tmp_path / "data")
    np.save(tmp_path / "ind.npy", np.array([0, 6]))
    assert main(["import", str(star), "--ind", str(tmp_path / "ind.npy"), "--out-star", str(tmp_path / "s.star")]) == 2
    assert "ind.npy holds index 6" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["--out-poses", "--out-ctf"])
def test_import_requires_poses_or_ctf(tmp_path, capsys, missing):
    with mrcfile.new(tmp_path / "s.mrcs") as m:
        m.set_data(np.zeros((2, 8, 8), np.float32))
    assert main(["import", str(tmp_path / "s.mrcs"), missing, str(tmp_path / "o.pkl")]) == 2
    assert "s.mrcs" in capsys.readouterr().err and not (tmp_path / "o.pkl").exists()


def test_import_absolute_paths_option(tmp_path):
    star = make_dataset(tmp_path / "data")
    out = tmp_path / "elsewhere" / "abs.star"
    assert main(["import", str(star), "--out-star", str(out), "--absolute-paths"]) == 0
    names = load_particles(out).star_rows["rlnImageName"]  # readable from anywhere
    assert all(n.split("@")[1].startswith("/") for n in names)


def test_relion_30_star_without_amplitude_contrast_reads_with_a_warning(tmp_path, caplog):
    """A RELION 3.0 export without rlnAmplitudeContrast: read with --amp-contrast's value and a
    warning; dropping a CTF column names only that column."""
    import logging

    star = make_dataset(tmp_path / "data")
    text = star.read_text().replace("_rlnAmplitudeContrast #7\n", "").replace(" 2.700000 0.100000", " 2.700000")
    no_amp = tmp_path / "data" / "no_amp.star"
    no_amp.write_text(text)
    with caplog.at_level(logging.WARNING):
        table = load_particles(no_amp, amplitude_contrast=0.07)
    assert "no rlnAmplitudeContrast" in caplog.text
    assert np.allclose(table.ctf.amplitude_contrast, 0.07)
    no_voltage = tmp_path / "data" / "no_voltage.star"
    no_voltage.write_text(text.replace("_rlnVoltage #5\n", "").replace(" 300.000000", ""))
    with pytest.raises(Exception) as err:
        load_particles(no_voltage).require_ctf()
    assert "has no CTF column rlnVoltage;" in str(err.value)
