"""`cryoscape downsample`: same images as the kernel, the right pixel size, clear errors."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from cryoscape.cli.main import main
from cryoscape.fourier.resample import downsample_images, downsample_volume
from cryoscape.io.mrc import read_mrc, read_mrc_header, write_mrc


@pytest.mark.parametrize("D, D_new", [(24, 12), (24, 11), (25, 16)])
def test_stack_downsample_matches_kernel(tmp_path, D, D_new):
    rng = np.random.default_rng(D + D_new)
    images = rng.normal(size=(9, D, D)).astype(np.float32)
    src = tmp_path / "particles.mrcs"
    write_mrc(src, images, pixel_size_angstrom=1.25)
    out = tmp_path / "small.mrcs"
    code = main(["downsample", str(src), "-D", str(D_new), "-o", str(out), "--batch-size", "4",
                 "--no-progress"])
    assert code == 0
    data, pixel = read_mrc(out)
    expected = downsample_images(torch.from_numpy(images), D_new).numpy()
    assert data.shape == (9, D_new, D_new)
    np.testing.assert_allclose(data, expected, rtol=0, atol=1e-6)
    assert pixel == pytest.approx(1.25 * D / D_new, rel=1e-6)
    assert read_mrc_header(out).ispg == 0  # written as an image stack


def test_volume_downsample(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    src = tmp_path / "map.mrc"
    write_mrc(src, vol, pixel_size_angstrom=2.0)
    out = tmp_path / "map_small.mrc"
    assert main(["downsample", str(src), "-D", "10", "-o", str(out)]) == 0
    data, pixel = read_mrc(out)
    np.testing.assert_allclose(data, downsample_volume(torch.from_numpy(vol), 10).numpy(),
                               atol=1e-6)
    assert pixel == pytest.approx(3.2)
    # --stack treats the cube as 16 images of 16x16
    out2 = tmp_path / "as_stack.mrcs"
    assert main(["downsample", str(src), "-D", "8", "-o", str(out2), "--stack",
                 "--no-progress"]) == 0
    np.testing.assert_allclose(read_mrc(out2)[0],
                               downsample_images(torch.from_numpy(vol), 8).numpy(), atol=1e-6)


def test_particle_list_input(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 12, 12)).astype(np.float32)
    b = rng.normal(size=(3, 12, 12)).astype(np.float32)
    write_mrc(tmp_path / "a.mrcs", a, pixel_size_angstrom=9.9)
    write_mrc(tmp_path / "b.mrcs", b, pixel_size_angstrom=9.9)
    paths = np.array([str(tmp_path / "b.mrcs"), str(tmp_path / "a.mrcs"), str(tmp_path / "a.mrcs")])
    indices = np.array([2, 4, 0])
    seen = {}

    def fake_load_particles(path, datadir=None):
        seen["args"] = (path, datadir)
        return types.SimpleNamespace(image_paths=paths, image_indices=indices, box_size=12,
                                     pixel_size_angstrom=np.array([1.5, 1.5, 1.5]))

    module = types.ModuleType("cryoscape.io.particles")
    module.load_particles = fake_load_particles
    monkeypatch.setitem(sys.modules, "cryoscape.io.particles", module)
    out = tmp_path / "p.mrcs"
    star = tmp_path / "particles.cs"  # (a .star input also writes a .star: see the test below)
    assert main(["downsample", str(star), "-D", "6", "-o", str(out), "--datadir", str(tmp_path),
                 "--no-progress"]) == 0
    assert seen["args"] == (str(star), str(tmp_path))
    data, pixel = read_mrc(out)
    expected = downsample_images(torch.from_numpy(np.stack([b[2], a[4], a[0]])), 6).numpy()
    np.testing.assert_allclose(data, expected, atol=1e-6)
    assert pixel == pytest.approx(3.0)  # the table's pixel size wins over the stack header


def test_errors_are_one_sentence(tmp_path, capsys):
    src = tmp_path / "s.mrcs"
    write_mrc(src, np.zeros((2, 8, 8), np.float32))
    assert main(["downsample", str(src), "-D", "16", "-o", str(tmp_path / "o.mrcs")]) == 2
    err = capsys.readouterr().err
    assert "box of 8 pixels, so -D must be at most 8" in err and "Traceback" not in err
    assert not (tmp_path / "o.mrcs").exists()
    assert main(["downsample", str(tmp_path / "missing.mrcs"), "-D", "4", "-o",
                 str(tmp_path / "o.mrcs")]) == 2
    assert "missing.mrcs does not exist" in capsys.readouterr().err
    assert main(["downsample", str(src), "-D", "4", "-o", str(src)]) == 2
    assert "also the input" in capsys.readouterr().err


def test_txt_stack_list_with_the_real_particle_loader(tmp_path):
    pytest.importorskip("cryoscape.io.particles")
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 10, 10)).astype(np.float32)
    b = rng.normal(size=(2, 10, 10)).astype(np.float32)
    write_mrc(tmp_path / "a.mrcs", a, pixel_size_angstrom=2.0)
    write_mrc(tmp_path / "b.mrcs", b, pixel_size_angstrom=2.0)
    (tmp_path / "list.txt").write_text("a.mrcs\nb.mrcs\n")
    out = tmp_path / "out.mrcs"
    assert main(["downsample", str(tmp_path / "list.txt"), "-D", "5", "-o", str(out),
                 "--no-progress"]) == 0
    data, pixel = read_mrc(out)
    expected = downsample_images(torch.from_numpy(np.concatenate([a, b])), 5).numpy()
    np.testing.assert_allclose(data, expected, atol=1e-6)
    assert pixel == pytest.approx(4.0)


def test_star_input_also_writes_a_star_of_the_new_stack(tmp_path, monkeypatch):
    """A RELION user's round trip: the new .star names the new stack, has the new box and pixel
    size in its optics table, the same shifts in angstroms, poses, CTF and any other column."""
    import starfile

    from cryoscape.io.star import read_star

    sim = tmp_path / "sim"
    assert main(["simulate", "-o", str(sim), "-n", "12", "-D", "24", "--hinge-states", "3", "--snr", "1",
                 "--seed", "3", "--shift-max-pixel", "2"]) == 0
    blocks = starfile.read(sim / "particles.star", always_dict=True)
    blocks["particles"]["rlnRandomSubset"] = np.arange(12) % 2 + 1  # a column we do not interpret
    starfile.write(blocks, sim / "particles.star", overwrite=True)
    before = read_star(sim / "particles.star")
    monkeypatch.chdir(tmp_path)  # names are written relative to the working directory, like RELION's
    assert main(["downsample", "sim/particles.star", "-D", "16", "-o", "small/p16.mrcs", "--no-progress"]) == 2
    (tmp_path / "small").mkdir()
    assert main(["downsample", "sim/particles.star", "-D", "16", "-o", "small/p16.mrcs", "--no-progress"]) == 0
    after = read_star(tmp_path / "small" / "p16.star")
    images, _ = read_mrc(tmp_path / "small" / "p16.mrcs")
    expected = downsample_images(torch.from_numpy(read_mrc(sim / "particles.mrcs")[0]), 16).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-5)
    assert after.box_size == 16 and np.allclose(after.pixel_size_angstrom, before.pixel_size_angstrom * 24 / 16)
    assert list(after.image_paths) == [str(tmp_path / "small" / "p16.mrcs")] * 12
    assert list(after.image_indices) == list(range(12))
    np.testing.assert_allclose(after.shifts_pixel * after.pixel_size_angstrom[:, None],
                               before.shifts_pixel * before.pixel_size_angstrom[:, None], atol=1e-5)
    assert np.abs(before.shifts_pixel).max() > 0.5
    np.testing.assert_allclose(after.rotations, before.rotations, atol=1e-5)
    np.testing.assert_allclose(after.ctf.defocus_u_angstrom, before.ctf.defocus_u_angstrom)
    written = starfile.read(tmp_path / "small" / "p16.star", always_dict=True)
    assert list(written["particles"]["rlnRandomSubset"]) == list(np.arange(12) % 2 + 1)
    assert written["particles"]["rlnImageName"].iloc[0] == "000001@small/p16.mrcs"
    assert int(written["optics"]["rlnImageSize"].iloc[0]) == 16
    # neither the .star that -o would write nor the stack may be an input
    assert main(["downsample", "sim/particles.star", "-D", "16", "-o", "sim/particles.mrcs", "--no-progress"]) == 2
    (tmp_path / "small" / "other.star").write_text((tmp_path / "small" / "p16.star").read_text())
    assert main(["downsample", "small/other.star", "-D", "8", "-o", "small/p16.mrcs", "--no-progress"]) == 2
    assert read_mrc(tmp_path / "small" / "p16.mrcs")[0].shape == (12, 16, 16)
