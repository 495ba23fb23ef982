"""Real files both ways with RELION 3.1 (Debian's package; scripts/testdeps/relion.sh installs it):
RELION reconstructs what cryoscape writes, cryoscape reads what RELION writes."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from cryoscape.cli.main import main
from cryoscape.fourier.fsc import fourier_shell_correlation
from cryoscape.io.mrc import read_mrc
from cryoscape.io.particles import load_particles
from cryoscape.io.star import read_star_blocks

pytestmark = pytest.mark.skipif(shutil.which("relion_refine") is None,
                                reason="RELION is not installed (scripts/testdeps/relion.sh installs it)")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("relion") / "sim"
    assert main(["simulate", "-o", str(root), "-n", "200", "-D", "32", "--snr", "0.1", "--heterogeneity", "discrete",
                 "--n-classes", "1", "--hinge-range-deg", "0", "20", "--seed", "1"]) == 0
    return root


def _map(path):
    return torch.as_tensor(read_mrc(path)[0].copy()).double()


def test_relion_reconstruct_reproduces_our_backprojection(sim, tmp_path):
    """relion_reconstruct on a .star cryoscape wrote (poses, shifts, CTF, optics) gives the map our
    backprojection gives: same sign and hand, FSC > 0.85 over the first half of the shells."""
    subprocess.run(["relion_reconstruct", "--i", "particles.star", "--o", str(tmp_path / "relion.mrc"), "--ctf"],
                   cwd=sim, check=True, capture_output=True)
    assert main(["backproject", str(sim / "particles.star"), "-o", str(tmp_path / "bp"), "--no-progress"]) == 0
    _, fsc = fourier_shell_correlation(_map(tmp_path / "relion.mrc"), _map(tmp_path / "bp" / "map.mrc"))
    assert fsc[1:9].min() > 0.85, fsc


def test_we_read_relions_data_star_class_map_and_model_star(sim, tmp_path):
    """One iteration of relion_refine (3D classification, K = 1) from the true map: its
    run_it001_data.star reads with CTF and poses (our backprojection with RELION's poses matches
    RELION's class map), and the class map and _model.star read too."""
    out = tmp_path / "run"
    subprocess.run(["relion_refine", "--i", "particles.star", "--o", str(out), "--ref", "gt_volumes/vol_000.mrc",
                    "--firstiter_cc", "--ini_high", "30", "--K", "1", "--iter", "1", "--tau2_fudge", "4",
                    "--particle_diameter", "200", "--ctf", "--j", "1", "--healpix_order", "2", "--offset_range", "2",
                    "--offset_step", "2", "--sym", "C1", "--dont_combine_weights_via_disc", "--pool", "10",
                    "--pad", "1", "--random_seed", "0"], cwd=sim, check=True, capture_output=True)
    # (RELION seeds from the clock by default: unseeded, the first two shells' FSC below was 0.40-0.68 over runs)
    data = load_particles(tmp_path / "run_it001_data.star", datadir=sim)
    truth = load_particles(sim / "particles.star")
    assert len(data) == len(truth) and data.ctf is not None
    assert np.allclose(data.rotations @ data.rotations.transpose(0, 2, 1), np.eye(3), atol=1e-5)
    class_map = _map(tmp_path / "run_it001_class001.mrc")
    assert class_map.shape == (32, 32, 32)
    assert main(["backproject", str(tmp_path / "run_it001_data.star"), "--datadir", str(sim), "-o",
                 str(tmp_path / "bp"), "--no-progress"]) == 0
    _, fsc = fourier_shell_correlation(class_map, _map(tmp_path / "bp" / "map.mrc"))
    # after one iteration RELION's map is low-passed (30 A = 8 shells) and noisy: the lowest shells agree
    assert fsc[1:3].mean() > 0.5, fsc
    model = read_star_blocks(tmp_path / "run_it001_model.star")
    classes = model["model_classes"]
    assert np.isclose(float(classes["rlnClassDistribution"].iloc[0]), 1.0)
