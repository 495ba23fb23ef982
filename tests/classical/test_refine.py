"""cryoscape refine end to end: accuracy against the truth and true-pose backprojection, resume,
clear errors."""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
import starfile
import torch

from cryoscape.cli.main import main
from cryoscape.fourier.fsc import fourier_shell_correlation
from cryoscape.io.mrc import read_mrc
from cryoscape.geometry.align import pose_errors
from cryoscape.io.particles import load_particles


def _simulate(out, n, D, *, hinge, seed, shift=0.0):
    lo, hi = hinge - 10, hinge + 10  # one class at the middle of the range
    args = ["simulate", "-o", str(out), "-n", str(n), "-D", str(D), "--snr", "0.1", "--heterogeneity", "discrete",
            "--n-classes", "1", "--hinge-range-deg", str(lo), str(hi), "--seed", str(seed)]
    if shift:
        args += ["--shift-max-pixel", str(shift)]
    assert main(args) == 0


def _map(path):
    return torch.as_tensor(read_mrc(path)[0].copy()).double()


def _resolution_shell(folder, D):
    fsc = np.loadtxt(folder / "fsc.txt")
    curve = fsc[:, -1]
    below = np.nonzero(curve < 0.143)[0]
    return D / 2 if len(below) == 0 else below[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine_small")
    _simulate(root / "data", 400, 32, hinge=10, seed=1, shift=1.5)
    _simulate(root / "init", 2, 32, hinge=50, seed=2)
    return root


def test_refine_runs_resumes_and_writes_relion_and_cryodrgn_poses(small, capsys):
    out = small / "run"
    args = ["refine", str(small / "data" / "particles.star"), "--initial-map",
            str(small / "init" / "gt_volumes" / "vol_000.mrc"), "-o", str(out), "--max-level", "3", "-b", "128"]
    assert main(args + ["--max-iterations", "2"]) == 0
    assert main(args + ["--max-iterations", "3", "--resume"]) == 0
    history = np.genfromtxt(out / "iterations.tsv", names=True, delimiter="\t", dtype=None, encoding=None)
    assert list(history["iteration"]) == [1, 2, 3]
    # from a 40 A start the half-maps agree to well beyond it (D = 32 is too coarse for poses
    # to be checked here: the 5,000-image test below checks them)
    assert (history["resolution_angstrom"] < 30.0).all(), history["resolution_angstrom"]
    refined = load_particles(out / "particles.star")
    rows = starfile.read(out / "particles.star")["particles"]
    assert set(rows["rlnRandomSubset"]) == {1, 2}
    assert (rows["rlnMaxValueProbDistribution"] > 0).all()
    from cryoscape.io.cryodrgn import read_poses_pkl

    rots, _ = read_poses_pkl(out / "poses.pkl", box_size=32)
    assert np.allclose(rots, refined.rotations, atol=1e-4)
    if shutil.which("relion_reconstruct"):  # RELION reads our refinement: its map matches ours
        subprocess.run(["relion_reconstruct", "--i", str(out / "particles.star"), "--o", str(out / "relion.mrc"),
                        "--ctf"], check=True, capture_output=True)
        _, fsc = fourier_shell_correlation(_map(out / "relion.mrc"), _map(out / "map.mrc"))
        assert fsc[1:6].min() > 0.8, fsc
    # an existing run is not overwritten without --resume: one sentence, exit 2
    capsys.readouterr()
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_refine_initial_map_of_the_wrong_box_is_one_sentence(small, tmp_path, capsys):
    from cryoscape.io.mrc import write_mrc

    write_mrc(tmp_path / "m.mrc", np.zeros((16, 16, 16), np.float32), pixel_size_angstrom=1.0)
    code = main(["refine", str(small / "data" / "particles.star"), "--initial-map", str(tmp_path / "m.mrc"),
                 "-o", str(tmp_path / "out")])
    assert code == 2
    assert "resample the map" in capsys.readouterr().err


@pytest.mark.slow
def test_refine_matches_true_pose_backprojection_on_5000_images(tmp_path):
    """The issue's test: D=64, SNR 0.1, 5,000 images; the initial map is another conformation
    (hinge 50 vs 10 degrees) low-passed to 40 A.  Gold-standard resolution within one shell of
    backprojection with the true poses (measured 8.25 A, shell 30.3, vs 8.20 A, shell 30.5) and the
    issue's median rotation error below 2 degrees: measured 1.995 end to end at 2 threads
    (bench/results/refine_2026-12-04_n5000.txt) and 1.997 at 1 thread, with the tight reference
    mask, four stalled iterations at the finest level and the final pose pass against the joined
    map (2.24 before them).  The floor on these images is near 2: one E-step against the TRUE map
    gives 2.06 (refine_2026-12-04_n5000_mask.txt), so the margin cannot be wide."""
    D = 64
    _simulate(tmp_path / "data", 5000, D, hinge=10, seed=1, shift=3.0)
    _simulate(tmp_path / "init", 2, D, hinge=50, seed=2)
    star = str(tmp_path / "data" / "particles.star")
    assert main(["backproject", star, "-o", str(tmp_path / "bp"), "--regularization", "fsc", "--no-progress"]) == 0
    assert main(["refine", star, "--initial-map", str(tmp_path / "init" / "gt_volumes" / "vol_000.mrc"),
                 "-o", str(tmp_path / "ref")]) == 0
    assert _resolution_shell(tmp_path / "ref", D) >= _resolution_shell(tmp_path / "bp", D) - 1
    refined = load_particles(tmp_path / "ref" / "particles.star")
    truth = load_particles(star)
    errors = pose_errors(refined.rotations, truth.rotations, flip=False)
    assert errors["angle_deg_median"] < 2.0, errors


def test_posterior_mean_pose_is_the_weighted_chordal_mean():
    """Two rotations about z (0 and theta) with weights 1 - w and w: the chordal L2 mean is the
    rotation about z by atan2(w sin theta, 1 - w + w cos theta); the shift is the weighted mean."""
    from cryoscape.classical.em import BatchPosterior
    from cryoscape.geometry.rotations import rotvec_to_matrix

    theta, w = math.radians(6.0), 0.3
    rotations = rotvec_to_matrix(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, theta]], dtype=torch.float64))
    post = BatchPosterior(rotations=rotations[None].float(), shifts_pixel=torch.tensor([[[0.0, 1.0], [2.0, -1.0]]]),
                          weights=torch.tensor([[1 - w, w]]), best_ids=torch.zeros(1, 2, dtype=torch.long),
                          log_evidence=torch.zeros(1), level=1)
    mean_rotation, mean_shift = post.mean_pose()
    expected = rotvec_to_matrix(torch.tensor([[0.0, 0.0, math.atan2(w * math.sin(theta), 1 - w + w * math.cos(theta))]],
                                             dtype=torch.float64))
    assert torch.allclose(mean_rotation.double(), expected, atol=1e-6)
    assert torch.allclose(mean_shift, torch.tensor([[0.6, 0.4]]), atol=1e-6)
    # the argmax would be the identity: the mean moved 1.8 degrees (w theta to first order) toward theta
    assert math.degrees(math.atan2(float(mean_rotation[0, 1, 0]), float(mean_rotation[0, 0, 0]))) > 1.7


@pytest.mark.parametrize("needed", [4, 2])
def test_the_run_ends_after_finest_level_iterations_stalled_iterations_at_the_finest_level(needed):
    """At ``max_level`` an iteration without a resolution gain counts as stalled; the run ends
    after ``finest_level_iterations`` of them (default 4) once the poses have settled."""
    import cryoscape.classical.refine as rf

    settings = rf.RefineSettings() if needed == 4 else rf.RefineSettings(finest_level_iterations=needed)
    state = rf.RefineState(
        iteration=7, level=settings.max_level, local=True, half_maps=torch.zeros(2, 4, 4, 4), sigma2=torch.ones(3),
        rotations=torch.eye(3)[None], shifts_pixel=torch.zeros(1, 2), best_ids=torch.zeros(1, 2, dtype=torch.long),
        ids_level=settings.max_level, max_probability=torch.zeros(1), sets=np.zeros(1, dtype=np.int64),
        band_radius=32.0, best_resolution_shell=30.0)
    count = 0
    while not state.converged:
        rf._advance(state, settings, 30.1, 64, pose_change_deg=0.3)
        count += 1
        assert count <= 10
    assert count == needed


@pytest.mark.parametrize("which", ["joined", "half"])
def test_final_pose_pass_searches_the_joined_map_by_default(which, monkeypatch):
    """The final pass's reference is the joined map (``final_pose_reference="joined"``, the default)
    times the solvent mask for both half-sets, or each half-set's own half-map."""
    import cryoscape.classical.refine as rf

    D, n = 16, 4
    gen = torch.Generator().manual_seed(0)
    state = rf.RefineState(
        iteration=3, level=2, local=True, half_maps=torch.rand(2, D, D, D, generator=gen),
        sigma2=torch.ones(D // 2 + 1), rotations=torch.eye(3).repeat(n, 1, 1), shifts_pixel=torch.zeros(n, 2),
        best_ids=torch.zeros(n, 2, dtype=torch.long), ids_level=2, max_probability=torch.zeros(n),
        sets=np.array([0, 1, 0, 1]), band_radius=6.0,
        reference_mask=torch.rand(D, D, D, generator=gen), final_map=torch.rand(D, D, D, generator=gen))
    source = rf.ImageSource(lambda idx: np.zeros((len(idx), D, D), np.float32), D)
    seen = []
    original = rf.Reference.from_volume
    monkeypatch.setattr(rf.Reference, "from_volume", lambda volume, **kw: seen.append(volume) or original(volume, **kw))
    settings = rf.RefineSettings() if which == "joined" else rf.RefineSettings(final_pose_reference="half")
    assert rf.RefineSettings().final_pose_reference == "joined"
    rf._final_pose_pass(source, state, settings)
    expected = [state.final_map] * 2 if which == "joined" else [state.half_maps[0], state.half_maps[1]]
    assert len(seen) == 2
    for volume, base in zip(seen, expected):
        assert torch.allclose(volume, base * state.reference_mask)
    assert state.poses_polished


@pytest.mark.parametrize("command", ["refine", "classify", "postprocess", "backproject"])
def test_an_existing_file_as_output_folder_is_one_sentence(command, tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.write_text("x")
    args = {"refine": ["refine", "p.star", "--initial-map", "m.mrc"],
            "classify": ["classify", "p.star", "--initial-map", "m.mrc"],
            "postprocess": ["postprocess", "h1.mrc", "h2.mrc"],
            "backproject": ["backproject", "p.star"]}[command]
    if command == "postprocess":
        from cryoscape.io.mrc import write_mrc

        for name in ("h1.mrc", "h2.mrc"):
            write_mrc(tmp_path / name, np.zeros((8, 8, 8), np.float32), pixel_size_angstrom=1.0)
        args = ["postprocess", str(tmp_path / "h1.mrc"), str(tmp_path / "h2.mrc")]
    assert main(args + ["-o", str(existing)]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_initial_map_from_a_run_folder_is_its_last_map(tmp_path, capsys):
    """--initial-map accepts an abinit (or train) run folder: its highest-epoch reconstruct.E.mrc."""
    from cryoscape.classical.runs import read_initial_map
    from cryoscape.errors import InputError
    from cryoscape.io.mrc import write_mrc

    for epoch, value in ((2, 1.0), (10, 3.0), (9, 2.0)):
        write_mrc(tmp_path / f"reconstruct.{epoch}.mrc", np.full((8, 8, 8), value, np.float32), pixel_size_angstrom=1.0)
    assert float(read_initial_map(tmp_path, 8).mean()) == 3.0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="without reconstruct.E.mrc"):
        read_initial_map(empty, 8)
