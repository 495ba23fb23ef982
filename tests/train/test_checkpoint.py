"""Checkpoints: atomic writes, bad files, epoch lookup, generator states."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cryoscape.errors import InputError
from cryoscape.train.checkpoint import (
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    weights_path,
)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 0, "w": torch.arange(5)})
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 1, "w": torch.zeros(5)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 0 and torch.equal(state["w"], torch.arange(5))


def test_bad_files_and_missing_epochs_are_input_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a cryoscape training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(InputError, match="no checkpoint"):
        find_checkpoint(tmp_path)
    save_checkpoint(weights_path(tmp_path, 4), {"epoch": 4})
    save_checkpoint(weights_path(tmp_path, 9), {"epoch": 9})
    assert find_checkpoint(tmp_path) == weights_path(tmp_path, 9)  # latest without checkpoint.pt
    assert find_checkpoint(tmp_path, 4) == weights_path(tmp_path, 4)
    with pytest.raises(InputError, match=r"saved epochs: 4, 9"):
        find_checkpoint(tmp_path, 5)


def test_generator_states_round_trip():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    state = capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
