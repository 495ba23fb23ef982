"""`cryoscape simulate` end to end on small inputs."""

import numpy as np
import pytest
import yaml

from cryoscape.cli.main import main
from cryoscape.io.mrc import read_mrc, write_mrc
from cryoscape.io.star import read_star
from cryoscape.simulate.volumes import render_gaussian_atoms


def test_simulate_builtin_hinge(tmp_path, capsys):
    out = tmp_path / "sim"
    code = main(["simulate", "-o", str(out), "-n", "80", "-D", "24", "--hinge-states", "5", "--snr", "0.2",
                 "--seed", "4", "--shift-max-pixel", "1.5", "--defocus-range-angstrom", "12000", "15000"])
    assert code == 0
    assert "wrote 80 images" in capsys.readouterr().out
    images, pixel = read_mrc(out / "particles.mrcs")
    assert images.shape == (80, 24, 24)
    gt = np.load(out / "ground_truth.npz")
    # image statistics: total variance = signal variance + noise variance, matching SNR 0.2
    signal_var, noise_std = float(gt["signal_variance"]), float(gt["noise_std"])
    assert signal_var / noise_std**2 == pytest.approx(0.2, rel=1e-6)
    assert images.var(dtype=np.float64) == pytest.approx(signal_var + noise_std**2, rel=0.1)
    assert len(gt["volume_files"]) == 5 and str(gt["kind"]) == "hinge"
    table = read_star(out / "particles.star")
    assert len(table) == 80
    assert table.ctf.defocus_u_angstrom.min() >= 12000 and table.ctf.defocus_u_angstrom.max() <= 15000
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["arguments"]["n_images"] == 80 and config["command"] == "simulate"


def test_simulate_discrete_classes_from_maps(tmp_path):
    maps = []
    for k, x in enumerate((-6.0, 6.0)):
        vol = render_gaussian_atoms(np.array([[x, 0.0, 0.0], [0.0, 4.0, 2.0]]), np.array([1.0, 0.5]), box_size=20,
                                    pixel_size_angstrom=2.0, resolution_angstrom=8.0)
        path = tmp_path / f"class{k}.mrc"
        write_mrc(path, vol, pixel_size_angstrom=2.0)
        maps.append(str(path))
    out = tmp_path / "disc"
    code = main(["simulate", "-o", str(out), "-n", "200", "--classes", *maps, "--populations", "1", "3",
                 "--snr", "inf"])
    assert code == 0
    gt = np.load(out / "ground_truth.npz")
    assert str(gt["kind"]) == "discrete" and float(gt["noise_std"]) == 0.0
    frac = np.bincount(gt["state_index"], minlength=2) / 200
    assert frac[1] == pytest.approx(0.75, abs=0.1)
    images, pixel = read_mrc(out / "particles.mrcs")
    assert images.shape == (200, 20, 20) and pixel == pytest.approx(2.0)


def test_simulate_bad_input_is_one_sentence(tmp_path, capsys):
    code = main(["simulate", "-o", str(tmp_path / "x"), "-n", "5", "--classes", str(tmp_path / "missing.mrc"),
                 str(tmp_path / "missing2.mrc")])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing.mrc" in err and "Traceback" not in err
    code = main(["simulate", "-o", str(tmp_path / "y"), "-n", "5", "--heterogeneity", "trajectory"])
    assert code == 2
