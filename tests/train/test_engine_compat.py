"""Runs made by the training loops before the engine (tests/data/engine_v0) resume with it, and the
result equals a run made entirely by the engine (to the float rounding of the CPU the test runs on):
the rebuild changed no arithmetic."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from cryoscape.cli.main import main
from cryoscape.train.checkpoint import load_checkpoint, save_checkpoint

OLD = Path(__file__).resolve().parents[1] / "data" / "engine_v0"
COMMON = ["--no-amp", "--no-progress", "--seed", "1"]
#: The old checkpoints were written on an Intel CPU with AVX-512; a CPU with other SIMD paths rounds the
#: same arithmetic differently, so the comparison allows float rounding and nothing more.  On an
#: AVX2-only AMD EPYC the runs differed by 3e-8..2e-7 in the losses (relative), 6e-7 in the weights
#: (relative to the largest) and 2e-5 in the latents, and every searched pose was the same; on the CPU
#: that wrote them they are identical.  A change to the loop's arithmetic (an order of batches, a
#: learning rate, a normalisation) moves these by orders of magnitude more.
LOSS_RTOL, WEIGHT_RTOL, Z_ATOL = 1e-6, 1e-5, 2e-4


def _old_run(tmp_path: Path, name: str, particles: Path) -> Path:
    """The old checkpoint in a run folder of its own, pointed at this session's copy of the data."""
    run = tmp_path / f"old_{name}"
    run.mkdir()
    state = load_checkpoint(OLD / f"{name}_checkpoint.pt")
    state["config"]["particles"] = str(particles)
    save_checkpoint(run / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    return run


def _weight_difference(a: dict, b: dict) -> float:
    """The largest difference between the two runs' decoder weights, relative to the largest weight."""
    sa, sb = a["decoder"]["state"], b["decoder"]["state"]
    top = max(float(sa[k].abs().max()) for k in sa if sa[k].numel())
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa if sa[k].numel()) / top


def test_old_train_checkpoint_resumes_to_the_engines_result(tiny_dataset, tmp_path):
    star = tiny_dataset / "particles.star"
    old = _old_run(tmp_path, "train", star)
    assert main(["train", "--resume", str(old), "-n", "3", "--no-progress"]) == 0
    new = tmp_path / "new"
    assert main(["train", str(star), "-n", "3", "--zdim", "2", "--decoder", "neural_field", "--dec-dim", "32",
                 "--enc-dim", "32", "--dec-layers", "2", "--enc-layers", "2", "-b", "8", "--refine-poses",
                 "--window", *COMMON,  # the old run windowed its images (train's default then)
                 "-o", str(new)]) == 0
    a, b = load_checkpoint(old / "checkpoint.pt"), load_checkpoint(new / "checkpoint.pt")
    np.testing.assert_allclose([h["loss"] for h in a["history"]], [h["loss"] for h in b["history"]], rtol=LOSS_RTOL)
    assert _weight_difference(a, b) < WEIGHT_RTOL
    assert np.abs(np.load(old / "z.2.npy") - np.load(new / "z.2.npy")).max() < Z_ATOL


def test_old_abinit_checkpoint_resumes_to_the_engines_result(tiny_dataset, tmp_path):
    star = tiny_dataset / "particles.star"
    old = _old_run(tmp_path, "abinit", star)
    assert main(["abinit", "--resume", str(old), "-n", "4", "--no-progress"]) == 0
    new = tmp_path / "new"
    assert main(["abinit", str(star), "-n", "4", "--dec-dim", "32", "--dec-layers", "2", "-b", "8", "--pretrain", "64",
                 "--search-every", "2", *COMMON, "-o", str(new)]) == 0
    a, b = load_checkpoint(old / "checkpoint.pt"), load_checkpoint(new / "checkpoint.pt")
    np.testing.assert_allclose([h["loss"] for h in a["history"]], [h["loss"] for h in b["history"]], rtol=LOSS_RTOL)
    assert _weight_difference(a, b) < WEIGHT_RTOL
    ra, rb = a["abinit"]["rotations"], b["abinit"]["rotations"]
    assert ((ra - rb).abs().reshape(len(ra), -1).max(1).values < 1e-4).float().mean() > 0.95  # searched poses agree


def test_a_checkpoint_of_another_model_is_refused_with_one_sentence(tiny_dataset, tmp_path, capsys):
    old = _old_run(tmp_path, "train", tiny_dataset / "particles.star")
    state = load_checkpoint(old / "checkpoint.pt")
    state["config"]["dec_dim"] = 64  # the weights are 32 wide
    save_checkpoint(old / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    assert main(["train", "--resume", str(old), "-n", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "does not fit this model" in err and "Traceback" not in err
