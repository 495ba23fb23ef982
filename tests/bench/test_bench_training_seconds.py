"""bench/train.py reads every epoch's training time from run.log, marching epochs included."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def test_training_seconds_counts_marching_epochs(tmp_path):
    from train import training_seconds

    (tmp_path / "run.log").write_text(
        "x INFO epoch 1/3 (marching, band 12 px): loss 1 (squared error 1, KL 0, beta 1) in 2.5 s, 400 img/s\n"
        "x INFO epoch 2/3 (marching, band 24 px): loss 1 (squared error 1, KL 0, beta 1) in 3.0 s, 333 img/s\n"
        "x INFO epoch 3/3: loss 1 (squared error 1, KL 0, beta 1) in 4.0 s, 250 img/s\n"
        "x INFO epoch 3: latents searched against the decoder from now on (32 points)\n")
    assert training_seconds(tmp_path, tmp_path / "none.log", "cryoscape") == 9.5
