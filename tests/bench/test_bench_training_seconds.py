"""bench/train.py reads every epoch's training time from run.log, marching epochs included."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench_train():
    """bench/train.py by path (the name ``train`` is also the tests' own package)."""
    sys.path.insert(0, str(BENCH))  # for its ``common`` import
    spec = importlib.util.spec_from_file_location("bench_train", BENCH / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_seconds_counts_marching_epochs(tmp_path):
    training_seconds = _bench_train().training_seconds

    (tmp_path / "run.log").write_text(
        "x INFO epoch 1/3 (marching, band 12 px): loss 1 (squared error 1, KL 0, beta 1) in 2.5 s, 400 img/s\n"
        "x INFO epoch 2/3 (marching, band 24 px): loss 1 (squared error 1, KL 0, beta 1) in 3.0 s, 333 img/s\n"
        "x INFO epoch 3/3: loss 1 (squared error 1, KL 0, beta 1) in 4.0 s, 250 img/s\n"
        "x INFO epoch 3: latents searched against the decoder from now on (32 points)\n")
    assert training_seconds(tmp_path, tmp_path / "none.log", "cryoscape") == 9.5
