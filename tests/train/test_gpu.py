"""The CUDA paths of the training engine (marked ``gpu``: run with ``pytest -m gpu`` on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoscape.train.abinit import AbinitConfig, run_abinit
from cryoscape.train.checkpoint import load_checkpoint
from cryoscape.train.config import TrainConfig
from cryoscape.train.loop import resume_training, run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("decoder", ["neural_field", "basis", "cryoformer"])
@pytest.mark.parametrize("amp", [False, True])
def test_training_on_cuda_learns_and_resumes(tiny_dataset, tmp_path, decoder, amp):
    config = TrainConfig(particles=str(tiny_dataset / "particles.star"), zdim=2, decoder=decoder, num_epochs=3,
                         device="cuda", amp=amp, progress=False, seed=0)
    result = run_training(config, tmp_path / "run")
    assert next(result.decoder.parameters()).is_cuda
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    resumed = resume_training(tmp_path / "run", num_epochs=4)
    assert resumed.history[-1]["epoch"] == 3 and np.isfinite(np.load(tmp_path / "run" / "z.3.npy")).all()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(torch.isfinite(v.float()).all() for v in state["decoder"]["state"].values())


def test_abinit_on_cuda(tiny_dataset, tmp_path):
    config = AbinitConfig(particles=str(tiny_dataset / "particles.star"), num_epochs=3, dec_dim=32, batch_size=8,
                          pretrain_images=64, device="cuda", progress=False)
    result = run_abinit(config, tmp_path / "run")
    assert result.rotations.shape == (64, 3, 3) and np.isfinite(result.history[-1]["loss"])
