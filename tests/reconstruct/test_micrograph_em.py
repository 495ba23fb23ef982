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


def test_turned_grid_keeps_each_parent_next_to_its_children():
    """The coarse-to-fine search turns the parent grid with the stage's grid: a child is as close to
    its parent as on the unturned grid (a turn applied on one side only would scatter them)."""
    from scipy.spatial.transform import Rotation

    from cryoscape.reconstruct.micrograph_em import local_search

    def max_parent_child_angle_deg(turn):
        search = local_search(torch.zeros(8, 8, 8), 1, 8, 4, turn)
        fine = stage_rotations(1) if turn is None else stage_rotations(1) @ turn
        rel = search.rotations[:, None].transpose(-1, -2) @ fine[search.children]  # (K_parent, 8, 3, 3)
        cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
        return float(torch.rad2deg(torch.arccos(cos)).max())

    turn = torch.as_tensor(Rotation.random(random_state=np.random.default_rng(4)).as_matrix(), dtype=torch.float32)
    plain = max_parent_child_angle_deg(None)
    assert plain < 30.0
    assert max_parent_child_angle_deg(turn) == pytest.approx(plain, abs=0.05)


def test_em_iteration_turns_the_grid_unless_told_not_to(tmp_path):
    D = 16
    ens, truth, table, _ = _grid_micrographs(tmp_path, D=D, G=1, per=6, seed=2, size=128)
    source = MicrographPatches(table, D, tmp_path / "cache", use_ctf=False)
    volume = torch.from_numpy(ens.volumes[0])
    sigma2 = 0.01 * float(source.patches(0, D).var())

    def run(turn_grid, seed):
        out = em_iteration(volume, source, Stage(D, -1, 1), rho0=0.5, sigma2=sigma2,
                           rng=np.random.default_rng(seed), turn_grid=turn_grid)
        return out[0]

    fixed = run(False, 0)
    torch.testing.assert_close(run(False, 1), fixed)  # the fixed grid does not depend on the draw
    turned_a, turned_b = run(True, 0), run(True, 1)
    # particles sit on the fixed grid's rotations, so the fixed grid fits them best; turned grids differ per draw
    assert (turned_a - turned_b).norm() > 0.05 * turned_a.norm()
    truth_map = volume.double()

    def corr(v):
        v = v.double()
        return float((v * truth_map).sum() / (v.norm() * truth_map.norm()))

    assert corr(fixed) > corr(turned_a) - 0.02


def test_independent_half_maps_are_each_refined_and_resumed(tmp_path):
    """With ``regularization="fsc"`` and independent halves, even and odd micrographs are aligned against
    their own half-map, which the run carries (and its checkpoint keeps) from iteration to iteration."""
    from cryoscape.reconstruct.micrograph_em import run_micrograph_em

    D = 16
    ens, truth, table, _ = _grid_micrographs(tmp_path, D=D, G=2, per=8, seed=3, size=128)
    volume = torch.from_numpy(ens.volumes[0]).float()
    kwargs = dict(box_size=D, out_dir=tmp_path / "run", regularization="fsc", independent_halves=True,
                  use_ctf=False, sigma=0.05 * float(volume.std()) * D)
    state = run_micrograph_em(table, volume, schedule=[Stage(D, -1, 1)], **kwargs)
    halves = state.half_volumes
    assert halves is not None and halves.shape == (2, D, D, D)
    assert (halves[0] - halves[1]).norm() > 1e-3 * halves[0].norm()  # each from its own micrographs
    longer = [Stage(D, -1, 2)]
    run_micrograph_em(table, volume, schedule=longer, **kwargs)
    (tmp_path / "run" / "iterations.tsv").unlink()
    resumed = run_micrograph_em(table, volume, schedule=longer, resume=True, **kwargs)
    assert len(resumed.history) == 2 and resumed.half_volumes.shape == (2, D, D, D)


def test_band_limited_first_pass_keeps_the_map_and_the_empty_fraction(tmp_path):
    """A first pass at half the box over every rotation, then only each patch's 8 most probable rotation
    pairs (of 36) at the full box: the map and ``rho0`` stay near the exhaustive E-step's.  The first pass
    can miss the pose of a patch that shows only a corner of a particle, which such a patch then puts on
    "empty": ``rho0`` comes out higher."""
    from cryoscape.reconstruct.micrograph_em import local_search

    D = 32
    ens, truth, table, _ = _grid_micrographs(tmp_path, D=D, G=1, per=8, seed=4, size=256)
    source = MicrographPatches(table, D, tmp_path / "cache", use_ctf=False)
    volume = torch.from_numpy(ens.volumes[0]).float()
    sigma2 = 0.1 * float(source.patches(0, D).var())
    rotations = stage_rotations(-1)
    search = local_search(volume, -1, D, None, coarse_box=16, rotations=rotations, n_pairs=8)
    assert search.box_size == 16 and search.children is None and search.proj_ft.shape == (72, 16, 16)
    assert local_search(volume, -1, D, None, coarse_box=0, rotations=rotations, n_pairs=8) is None

    def run(**kwargs):
        return em_iteration(volume, source, Stage(D, -1, 1), rho0=0.5, sigma2=sigma2, rng=np.random.default_rng(0),
                            **kwargs)

    def corr(a, b):
        a, b = a.double(), b.double()
        return float((a * b).sum() / (a.norm() * b.norm()))

    exhaustive, coarse = run(), run(coarse_box=16, coarse_pairs=8)
    assert exhaustive[1] < coarse[1] < exhaustive[1] + 0.06  # rho0
    assert corr(exhaustive[0], coarse[0]) > 0.97
    assert corr(coarse[0], volume) > corr(exhaustive[0], volume) - 0.01


def test_sampled_first_pass_keeps_the_exhaustive_posteriors(tmp_path):
    """The default first pass (``--coarse-box auto``): each patch's most probable rotation pairs plus a
    weighted uniform sample of the others.  On a small case (4 + 8 of 36 pairs) it keeps ``rho0`` and the map
    of the exhaustive E-step (measured: rho0 0.565 against 0.564, map correlation 0.9996), where keeping the
    top 12 pairs alone puts the pairs left out on "empty" (rho0 +0.04) and moves the map (correlation 0.97)."""
    from cryoscape.reconstruct.micrograph_em import stage_coarse_box

    D = 32
    ens, truth, table, _ = _grid_micrographs(tmp_path, D=D, G=1, per=8, seed=4, size=256)
    source = MicrographPatches(table, D, tmp_path / "cache", use_ctf=False)
    volume = torch.from_numpy(ens.volumes[0]).float()
    sigma2 = 0.1 * float(source.patches(0, D).var())

    def run(**kwargs):
        return em_iteration(volume, source, Stage(D, -1, 1), rho0=0.5, sigma2=sigma2, rng=np.random.default_rng(0),
                            **kwargs)

    def corr(a, b):
        a, b = a.double(), b.double()
        return float((a * b).sum() / (a.norm() * b.norm()))

    exhaustive = run()
    sampled = run(coarse_box=16, coarse_pairs=4, coarse_sampled=8)
    top_only = run(coarse_box=16, coarse_pairs=12)
    assert abs(sampled[1] - exhaustive[1]) < 0.01 < top_only[1] - exhaustive[1]  # rho0
    assert corr(sampled[0], exhaustive[0]) > 0.995 > corr(top_only[0], exhaustive[0])
    # auto: half the box of level-0 stages of box >= 32; explicit values as given
    assert stage_coarse_box(Stage(32, 0, 1), None) == 16 and stage_coarse_box(Stage(64, 0, 1), None) == 32
    assert stage_coarse_box(Stage(16, 0, 1), None) == 0 and stage_coarse_box(Stage(32, 1, 1), None) == 0
    assert stage_coarse_box(Stage(32, 0, 1), 0) == 0 and stage_coarse_box(Stage(32, 1, 1), 16) == 16


def test_independent_halves_with_a_constant_regularisation_log_their_fsc(tmp_path):
    """Independent halves no longer need ``regularization="fsc"``: with the constant Wiener term each half is
    refined against its own map and the log gains the half-map FSC area (on the full box's shells)."""
    from cryoscape.reconstruct.micrograph_em import half_fsc_score, run_micrograph_em

    D = 16
    ens, truth, table, _ = _grid_micrographs(tmp_path, D=D, G=2, per=8, seed=3, size=128)
    volume = torch.from_numpy(ens.volumes[0]).float()
    state = run_micrograph_em(table, volume, box_size=D, out_dir=tmp_path / "run", independent_halves=True,
                              use_ctf=False, sigma=0.05 * float(volume.std()) * D, schedule=[Stage(D, -1, 2)])
    assert state.half_volumes is not None and state.half_volumes.shape == (2, D, D, D)
    assert (state.half_volumes[0] - state.half_volumes[1]).norm() > 1e-3 * state.half_volumes[0].norm()
    scores = [row["half_fsc_auc"] for row in state.history]
    assert len(scores) == 2 and all(0 < s <= 1 for s in scores)
    assert "half_fsc_auc" in (tmp_path / "run" / "iterations.tsv").read_text().splitlines()[0]
    # a stage at half the box covers half the full box's shells
    assert half_fsc_score(torch.ones(5), 16) == pytest.approx(0.5)
    assert half_fsc_score(torch.tensor([1.0, 1.0, -0.5, 1.0, 1.0]), 8) == pytest.approx(0.75)


def test_a_given_step_averages_the_m_step_sums(tmp_path):
    """``step`` (``--average all``: ``1 / t``) mixes this iteration's Fourier sums into the previous ones with that
    weight, also at a patch fraction of 1 (where the default keeps no running average)."""
    D = 16
    ens, truth, table, _ = _grid_micrographs(tmp_path, D=D, G=1, per=6, seed=2, size=128)
    source = MicrographPatches(table, D, tmp_path / "cache", use_ctf=False)
    volume = torch.from_numpy(ens.volumes[0])
    sigma2 = 0.01 * float(source.patches(0, D).var())

    def sums(**kwargs):
        return em_iteration(volume, source, Stage(D, -1, 1), rho0=0.5, sigma2=sigma2, rng=np.random.default_rng(0),
                            **kwargs)[3]["sums"]

    fresh = sums()
    previous = torch.rand_like(fresh) * fresh.abs().max()
    torch.testing.assert_close(sums(previous_sums=previous), fresh)  # fraction 1: no average by default
    torch.testing.assert_close(sums(previous_sums=previous, step=0.25), 0.25 * fresh + 0.75 * previous)
