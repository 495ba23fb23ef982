"""Micrograph EM (reconstruct/micrograph_em.py): empty-patch fraction, scale fit, downsampling, checkpoints."""

import numpy as np
import pytest
import torch

from cryoscape.io.micrographs import MicrographTable
from cryoscape.io.mrc import write_mrc
from cryoscape.reconstruct.micrograph_em import (
    MicrographPatches,
    Stage,
    default_schedule,
    downsample_micrograph,
    em_iteration,
    fit_initial_scale,
    stage_rotations,
)
from cryoscape.simulate.ensembles import build_ensemble
from cryoscape.simulate.micrographs import prepare_volumes, render_clean_micrograph, sample_micrograph_truth


def _grid_micrographs(tmp_path, *, D=16, G=2, per=10, seed=5, size=192):
    """Noiseless micrographs without CTF whose particles sit at rotations of the 72-point grid."""
    ens = build_ensemble(molecule="hinge", heterogeneity="none", hinge_range_deg=(0, 1), box_size=D)
    truth = sample_micrograph_truth(G, per, ens, shape=(size, size), seed=seed)
    grid = stage_rotations(-1).double().numpy()
    truth.rotations = grid[np.random.default_rng(seed).integers(0, len(grid), len(truth.rotations))]
    prepared = prepare_volumes(ens)
    paths, mics = [], []
    for g in range(G):
        mic = render_clean_micrograph(prepared, truth, g).numpy()
        write_mrc(tmp_path / f"m{g}.mrc", mic, pixel_size_angstrom=truth.pixel_size_angstrom, is_stack=False)
        paths.append(str(tmp_path / f"m{g}.mrc"))
        mics.append(mic)
    table = MicrographTable(np.array(paths, object), np.full(G, truth.pixel_size_angstrom), truth.ctf, np.zeros(G),
                            np.array(paths, object))
    return ens, truth, table, mics


def test_posterior_mass_on_empty_matches_the_true_empty_fraction(tmp_path):
    D = 16
    ens, truth, table, mics = _grid_micrographs(tmp_path, D=D)
    # a patch is truly empty when no projection reaches 0.1% of the brightest pixel in it
    peaks = np.concatenate([np.abs(m.reshape(12, D, 12, D)).max((1, 3)).reshape(-1) for m in mics])
    true_empty = float((peaks < 1e-3 * peaks.max()).mean())
    assert 0.6 < true_empty < 0.9
    source = MicrographPatches(table, D, tmp_path / "cache", use_ctf=False)
    volume = torch.from_numpy(ens.volumes[0])
    rho0, sigma2 = 0.5, 0.01 * float(source.patches(0, D).var())
    rng = np.random.default_rng(0)
    for _ in range(3):  # the map stays the truth: this checks the E-step and the rho0 update
        _, rho0, sigma2, stats = em_iteration(volume, source, Stage(D, -1, 1), rho0=rho0, sigma2=sigma2, rng=rng)
    assert stats["n_patches"] == 288
    assert rho0 == pytest.approx(true_empty, abs=0.05)


def test_downsample_micrograph_is_exact_for_band_limited_micrographs():
    y = torch.arange(64, dtype=torch.float64)[:, None]
    x = torch.arange(96, dtype=torch.float64)[None, :]
    mic = 3.0 + torch.cos(2 * torch.pi * 3 * y / 64) + torch.sin(2 * torch.pi * 5 * x / 96 + 0.3) * torch.cos(2 * torch.pi * 7 * y / 64)
    small = downsample_micrograph(mic, (32, 48))
    torch.testing.assert_close(small, mic[::2, ::2], atol=1e-10, rtol=0)  # values kept at the new samples


def test_initial_scale_is_found_by_likelihood(tmp_path):
    D = 16
    ens, truth, table, _ = _grid_micrographs(tmp_path, D=D, G=1, per=6, seed=2, size=128)
    source = MicrographPatches(table, D, tmp_path / "cache", use_ctf=False)
    volume = torch.from_numpy(ens.volumes[0]) / 64.0
    sigma2 = 1e-3 * float(source.patches(0, D).var())
    scale = fit_initial_scale(volume, source, Stage(D, -1, 1), rho0=0.5, sigma2=sigma2, n_patches=32)
    assert scale == 64.0


def test_default_schedule_marches_up_in_frequency():
    stages = default_schedule(64, 20)
    assert [s.box_size for s in stages] == [16, 32, 32]
    assert sum(s.iterations for s in stages) == 20
    assert stages[-1].so3_level > stages[0].so3_level and stages[-1].fraction < 1
