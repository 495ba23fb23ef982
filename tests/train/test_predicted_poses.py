"""The orientation encoder pose source (train/predicted_poses.py): pre-trained on true poses it
predicts held-out images' poses; through the engine it writes per-epoch poses that equal its
predictions and that `cryoscape evaluate` scores."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cryoscape.geometry.rotations import rotation_angle_between
from cryoscape.train.config import TrainConfig
from cryoscape.train.inputs import build_dataset, load_tables
from cryoscape.train.predicted_poses import PredictedPoses

from .conftest import simulate

N_TRAIN, N_HELD = 2500, 500
LAYERS, WIDTH = 4, 256


@pytest.fixture(scope="module")
def pose_data(sim_root):
    """3000 images of 16 px, one map, SNR 10, shifts up to 1 px."""
    return simulate(sim_root, "pose16", n=N_TRAIN + N_HELD, D=16, snr="10", heterogeneity="none", seed=1,
                    extra=("--shift-max-pixel", "1"))


def _errors(R, t, dataset):
    rot = torch.rad2deg(rotation_angle_between(R.double(), dataset.rotations.double()))
    return rot, (t - dataset.shifts_pixel.float()).norm(dim=-1)


@pytest.mark.slow
def test_pretrained_encoder_predicts_held_out_poses(pose_data):
    """Pre-trained (the paper's loss, 200 passes, lr 3e-4) on 2500 images' true poses, the encoder fits
    them (median 5.7 degrees measured) and predicts 500 other images' rotations to a median of
    67.6 degrees (measured; a random rotation is 126 degrees off) and their shifts to 0.17 px: it
    memorises a data set's poses far better than it generalises (README "Choosing a decoder:
    CryoFormer").  Minutes on 2 cores."""
    config = TrainConfig(particles=str(pose_data / "particles.star"), pose_source="encoder",
                         pose_encoder="absolute")
    table, _ = load_tables(config)
    train = build_dataset(config, table.subset(np.arange(N_TRAIN)))
    held = build_dataset(config, table.subset(np.arange(N_TRAIN, N_TRAIN + N_HELD)))
    held.normalization = train.normalization
    source = PredictedPoses(train, layers=LAYERS, width=WIDTH, pretrain_epochs=200, pretrain_lr=3e-4,
                            residual=False)
    source.setup(torch.device("cpu"))
    before = float(_errors(*source.predict_all(), train)[0].median())
    record = source.pretrain()
    source.encoder.eval()
    with torch.no_grad():
        R, t = source.encoder(held.read_preprocessed(np.arange(N_HELD)))
    rot, shift = _errors(R, t, held)
    assert before > 90
    assert record["pretrain_rotation_error_deg"] < 15, record
    assert float(rot.median()) < 85, float(rot.median())
    assert float(shift.median()) < 0.3, float(shift.median())


def test_engine_writes_the_encoder_poses_each_epoch_and_evaluate_scores_them(tiny_dataset, tmp_path):
    from cryoscape.cli.main import main
    from cryoscape.io.cryodrgn import read_poses_pkl
    from cryoscape.io.star import read_star
    from cryoscape.train.loop import run_training

    options = dict(render_size=8, n_levels=2, log2_table_size=10, base_resolution=4, n_queries=4, query_dim=8,
                   n_blocks=1, n_heads=2)
    config = TrainConfig(particles=str(tiny_dataset / "particles.star"), decoder="cryoformer", decoder_options=options,
                         pose_source="encoder", pose_pretrain_epochs=30, num_epochs=2, batch_size=16, progress=False,
                         checkpoint_every=100, pose_start_epoch=0)
    run = tmp_path / "run"
    result = run_training(config, run)
    poses = []
    for epoch in (0, 1):
        R, t = read_poses_pkl(run / f"poses.{epoch}.pkl", box_size=16)
        assert R.shape == (64, 3, 3) and np.isfinite(R).all()
        np.testing.assert_allclose(np.einsum("nij,nkj->nik", R, R), np.broadcast_to(np.eye(3), R.shape), atol=1e-5)
        star = read_star(run / f"poses.{epoch}.star")
        np.testing.assert_allclose(star.rotations, R, atol=1e-5)
        np.testing.assert_allclose(star.shifts_pixel, t, atol=1e-4)
        poses.append(R)
    # the image loss refined the encoder: the poses moved between the epochs
    moved = np.degrees(np.asarray(rotation_angle_between(torch.as_tensor(poses[0]), torch.as_tensor(poses[1]))))
    assert float(np.median(moved)) > 0.01
    assert 0 <= result.history[0]["pretrain_rotation_error_deg"] < 180
    assert main(["evaluate", str(run), "--truth", str(tiny_dataset), "--poses", str(run / "poses.1.pkl"),
                 "--no-progress", "-o", str(tmp_path / "eval")]) == 0


def test_resumed_run_keeps_the_encoder_and_equals_the_uninterrupted_run(tiny_dataset, tmp_path):
    """Stopped after epoch 0 and resumed (no second pre-training), the poses of epoch 1 equal those of
    a run that never stopped."""
    from cryoscape.io.cryodrgn import read_poses_pkl
    from cryoscape.train.loop import resume_training, run_training

    options = dict(render_size=8, n_levels=2, log2_table_size=10, base_resolution=4, n_queries=4, query_dim=8,
                   n_blocks=1, n_heads=2)
    common = dict(particles=str(tiny_dataset / "particles.star"), decoder="cryoformer", decoder_options=options,
                  pose_source="encoder", pose_pretrain_epochs=10, batch_size=16, progress=False,
                  checkpoint_every=100, pose_start_epoch=0, amp=False)
    run_training(TrainConfig(num_epochs=2, **common), tmp_path / "whole")
    run_training(TrainConfig(num_epochs=1, **common), tmp_path / "part")
    resume_training(tmp_path / "part", num_epochs=2)
    assert "pre-trained" not in (tmp_path / "part" / "run.log").read_text().split("resuming")[-1]
    whole, _ = read_poses_pkl(tmp_path / "whole" / "poses.1.pkl", box_size=16)
    part, _ = read_poses_pkl(tmp_path / "part" / "poses.1.pkl", box_size=16)
    np.testing.assert_allclose(part, whole, atol=1e-6)


def test_residual_encoder_starts_exactly_at_the_table_poses(tiny_dataset):
    """The residual form needs no pre-training: before any step it predicts the table's poses (to float
    rounding), and a gradient step moves them."""
    config = TrainConfig(particles=str(tiny_dataset / "particles.star"), pose_source="encoder")
    table, _ = load_tables(config)
    dataset = build_dataset(config, table)
    source = PredictedPoses(dataset, layers=2, width=32, lr=1e-3)
    source.setup(torch.device("cpu"))
    assert source.pretrain() == {"pretrain_rotation_error_deg": 0.0, "pretrain_shift_error_pixel": 0.0}
    R, t = source.predict_all()
    err = torch.rad2deg(rotation_angle_between(R.double(), dataset.rotations.double()))
    assert float(err.max()) < 0.01, float(err.max())
    assert float((t - dataset.shifts_pixel.float()).abs().max()) < 1e-5
    idx = np.arange(16)
    R1, t1 = source._predict(dataset.read_preprocessed(idx), idx)
    loss = (R1[:, 0, 1] - 0.1).square().sum() + (t1 - 0.5).square().sum()
    loss.backward()
    source.optimizer.step()
    R2, _ = source.predict_all()
    moved = torch.rad2deg(rotation_angle_between(R2.double(), R.double()))
    assert float(moved.median()) > 1e-3
