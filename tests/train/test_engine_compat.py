"""Runs made by the training loops before the engine (tests/data/engine_v0) resume with it, and the
result equals a run made entirely by the engine: the rebuild changed no arithmetic."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from cryoscape.cli.main import main
from cryoscape.train.checkpoint import load_checkpoint, save_checkpoint

OLD = Path(__file__).resolve().parents[1] / "data" / "engine_v0"
COMMON = ["--no-amp", "--no-progress", "--seed", "1"]


def _old_run(tmp_path: Path, name: str, particles: Path) -> Path:
    """The old checkpoint in a run folder of its own, pointed at this session's copy of the data."""
    run = tmp_path / f"old_{name}"
    run.mkdir()
    state = load_checkpoint(OLD / f"{name}_checkpoint.pt")
    state["config"]["particles"] = str(particles)
    save_checkpoint(run / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    return run


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a["decoder"]["state"][k], b["decoder"]["state"][k]) for k in a["decoder"]["state"])


def test_old_train_checkpoint_resumes_to_the_engines_result(tiny_dataset, tmp_path):
    star = tiny_dataset / "particles.star"
    old = _old_run(tmp_path, "train", star)
    assert main(["train", "--resume", str(old), "-n", "3", "--no-progress"]) == 0
    new = tmp_path / "new"
    assert main(["train", str(star), "-n", "3", "--zdim", "2", "--dec-dim", "32", "--enc-dim", "32",
                 "--dec-layers", "2", "--enc-layers", "2", "-b", "8", "--refine-poses", *COMMON, "-o", str(new)]) == 0
    a, b = load_checkpoint(old / "checkpoint.pt"), load_checkpoint(new / "checkpoint.pt")
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert _same_weights(a, b) and np.array_equal(np.load(old / "z.2.npy"), np.load(new / "z.2.npy"))


def test_old_abinit_checkpoint_resumes_to_the_engines_result(tiny_dataset, tmp_path):
    star = tiny_dataset / "particles.star"
    old = _old_run(tmp_path, "abinit", star)
    assert main(["abinit", "--resume", str(old), "-n", "4", "--no-progress"]) == 0
    new = tmp_path / "new"
    assert main(["abinit", str(star), "-n", "4", "--dec-dim", "32", "--dec-layers", "2", "-b", "8", "--pretrain", "64",
                 "--search-every", "2", *COMMON, "-o", str(new)]) == 0
    a, b = load_checkpoint(old / "checkpoint.pt"), load_checkpoint(new / "checkpoint.pt")
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert _same_weights(a, b) and torch.equal(a["abinit"]["rotations"], b["abinit"]["rotations"])


def test_a_checkpoint_of_another_model_is_refused_with_one_sentence(tiny_dataset, tmp_path, capsys):
    old = _old_run(tmp_path, "train", tiny_dataset / "particles.star")
    state = load_checkpoint(old / "checkpoint.pt")
    state["config"]["dec_dim"] = 64  # the weights are 32 wide
    save_checkpoint(old / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    assert main(["train", "--resume", str(old), "-n", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "does not fit this model" in err and "Traceback" not in err
