"""The training loop: a homogeneous map that matches the truth, Fourier vs Hartley, exact resume,
NaN handling, and the run folder's contents."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import yaml

from cryoscape.fourier.fsc import fourier_shell_correlation
from cryoscape.io.mrc import read_mrc
from cryoscape.train import objective as loop_module
from cryoscape.train.checkpoint import load_checkpoint
from cryoscape.train.config import TrainConfig
from cryoscape.train.loop import TrainingDiverged, resume_training, run_training


def tiny_config(dataset, **overrides) -> TrainConfig:
    options = dict(
        particles=str(dataset / "particles.star"), decoder="neural_field", dec_layers=1, dec_dim=16, enc_layers=1,
        enc_dim=16,
        batch_size=16, lr=1e-3, progress=False, checkpoint_every=1, n_normalization_images=64,
    )
    options.update(overrides)
    return TrainConfig(**options)


# ---------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------
def _all_tensors(state):
    out = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    for key in ("decoder", "encoder", "poses", "optimizer", "pose_optimizer"):
        walk(key, state[key])
    return out


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tiny_dataset, tmp_path):
    config = dict(zdim=1, refine_poses=True, batch_size=16, band_epochs=1)  # the same band ramp in both runs
    straight = run_training(tiny_config(tiny_dataset, num_epochs=2, **config), tmp_path / "straight")
    assert straight.epochs_done == 2
    first = run_training(tiny_config(tiny_dataset, num_epochs=1, **config), tmp_path / "resumed")
    assert first.epochs_done == 1
    resumed = resume_training(tmp_path / "resumed", num_epochs=2)
    assert resumed.epochs_done == 2

    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 1
    ta, tb = _all_tensors(a), _all_tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 10
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    for name in ("z.1.npy", "z_logvar.1.npy", "z.0.npy", "poses.1.pkl"):
        if name.endswith(".npy"):
            assert np.array_equal(np.load(tmp_path / "straight" / name), np.load(tmp_path / "resumed" / name)), name
        else:
            with open(tmp_path / "straight" / name, "rb") as f1, open(tmp_path / "resumed" / name, "rb") as f2:
                r1, r2 = pickle.load(f1), pickle.load(f2)
            assert np.array_equal(r1[0], r2[0]) and np.array_equal(r1[1], r2[1])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    # the poses really moved (so the pose optimiser state was exercised)
    with open(tmp_path / "straight" / "poses.1.pkl", "rb") as f:
        rots, trans = pickle.load(f)
    gt = np.load(tiny_dataset / "ground_truth.npz")
    assert 0 < np.abs(rots - gt["rotations"]).max() < 0.2
    # resuming a finished run trains nothing more
    again = resume_training(tmp_path / "resumed", num_epochs=2)
    assert again.epochs_done == 2 and again.history == b["history"]


# ---------------------------------------------------------------------------------------------
# NaN
# ---------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loop_module.squared_error

    def poisoned(pred, target, pixels):
        calls["n"] += 1
        error = real(pred, target, pixels)
        return error * float("nan") if calls["n"] == 6 else error  # 4 batches per epoch: epoch 1, batch 1

    monkeypatch.setattr(loop_module, "squared_error", poisoned)
    with pytest.raises(TrainingDiverged) as info:
        run_training(tiny_config(tiny_dataset, num_epochs=3, lr=2e-3), tmp_path / "run")
    message = str(info.value)
    assert "nan" in message and "epoch 1" in message
    assert "--lr 0.0002" in message and "checkpoint of epoch 0" in message
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["decoder"]["state"].values())
    assert not (tmp_path / "run" / "weights.1.pt").exists()


# ---------------------------------------------------------------------------------------------
# run folder
# ---------------------------------------------------------------------------------------------
def test_run_folder_has_config_log_plot_latents_and_weights(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    run_training(tiny_config(tiny_dataset, num_epochs=3, zdim=2, checkpoint_every=2), out)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["command"] == "train"
    assert config["model"]["decoder"]["name"] == "neural_field"
    assert config["model"]["decoder"]["config"]["box_size"] == 16
    assert config["model"]["decoder"]["config"]["zdim"] == 2
    assert config["model"]["encoder"]["zdim"] == 2
    assert config["data"]["box_size"] == 16
    assert config["data"]["pixel_size_angstrom"] == pytest.approx(15.625)
    norm = config["data"]["normalization"]
    assert norm["std"] > 0 and norm["fourier_scale"] > 1 and norm["window"] is False  # train's default: no window
    assert config["training"]["zdim"] == 2
    log = (out / "run.log").read_text()
    assert "epoch 3/3" in log and "img/s" in log
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # weights every 2 epochs and the last; latents every epoch
    assert sorted(p.name for p in out.glob("weights.*.pt")) == ["weights.1.pt", "weights.2.pt"]
    for e in range(3):
        z = np.load(out / f"z.{e}.npy")
        assert z.shape == (64, 2) and z.dtype == np.float32 and np.isfinite(z).all()
        with open(out / f"z.{e}.pkl", "rb") as f:
            zp = pickle.load(f)
        assert zp.dtype == np.float32 and np.array_equal(zp, z)
        assert np.load(out / f"z_logvar.{e}.npy").shape == (64, 2)
    assert np.abs(np.load(out / "z.2.npy")).sum() > 0
    # the checkpoint rebuilds the model
    state = load_checkpoint(out / "weights.2.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 3


def test_beta_schedules():
    c = TrainConfig(zdim=4, num_epochs=8)
    assert c.beta_at(0.3) == pytest.approx(0.25)  # default 1/zdim
    c.beta = "anneal"
    assert c.beta_at(0.0) == 0.0 and c.beta_at(1.0) == pytest.approx(0.5) and c.beta_at(5.0) == 1.0
    c.beta = 0.3
    assert c.beta_at(3.0) == 0.3
    assert TrainConfig(zdim=0).beta_at(1.0) == 0.0


# ---------------------------------------------------------------------------------------------
# homogeneous reconstruction quality, Fourier vs Hartley
# ---------------------------------------------------------------------------------------------
HOMOGENEOUS = dict(decoder="neural_field", num_epochs=3, dec_layers=2, dec_dim=64, batch_size=16, lr=1e-3,
                   n_normalization_images=1000)


@pytest.fixture(scope="module")
def homogeneous_maps(homogeneous_32, tmp_path_factory):
    out = tmp_path_factory.mktemp("hom")
    maps = {}
    for domain in ("fourier", "hartley"):
        config = TrainConfig(particles=str(homogeneous_32 / "particles.star"), domain=domain, progress=False,
                             checkpoint_every=100, **HOMOGENEOUS)
        result = run_training(config, out / domain)
        maps[domain] = (result.decoder.eval_volume(None), out / domain)
    return maps


def test_homogeneous_map_matches_the_truth(homogeneous_maps, homogeneous_32):
    """FSC(trained map, true map) > 0.5 at every shell up to half Nyquist (D/4 = 8 shells).

    Why this threshold: 1000 images at SNR 1 carry signal far beyond half Nyquist (a Wiener
    backprojection of the same data reaches FSC > 0.9 there), so a correct image formation model
    reaches it within a few epochs; an error in the pose, shift or CTF convention leaves FSC near 0
    beyond the first 2-3 shells, and an undertrained model stays below 0.5 in the middle shells.
    """
    truth, _ = read_mrc(homogeneous_32 / "gt_volumes" / "vol_000.mrc")
    volume, run = homogeneous_maps["fourier"]
    _, fsc = fourier_shell_correlation(volume, torch.as_tensor(truth))
    assert float(fsc[: 32 // 4 + 1].min()) > 0.5, fsc
    # the map written at the last epoch is that map, with the data's pixel size
    written, pixel = read_mrc(run / "reconstruct.2.mrc")
    assert pixel == pytest.approx(7.8125, rel=1e-4)
    np.testing.assert_allclose(written, volume.numpy(), rtol=1e-5, atol=1e-6)


def test_fourier_and_hartley_domains_reconstruct_the_same_map(homogeneous_maps):
    fourier, _ = homogeneous_maps["fourier"]
    hartley, _ = homogeneous_maps["hartley"]
    _, fsc = fourier_shell_correlation(fourier, hartley)
    assert float(fsc[: 32 // 4 + 1].min()) > 0.8, fsc


def test_trainer_resume_reads_the_checkpoint_once_and_continues(tiny_dataset, tmp_path, monkeypatch):
    """``Trainer.resume`` (the Python API for train and abinit runs) reads the latest checkpoint once,
    to choose the entry point, and hands it on."""
    from cryoscape.train import checkpoint, loop
    from cryoscape.train.trainer import Trainer

    run_training(tiny_config(tiny_dataset, num_epochs=1), tmp_path / "run")
    reads = []
    original = checkpoint.load_latest_checkpoint

    def counted(*args, **kwargs):
        reads.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_latest_checkpoint", counted)
    monkeypatch.setattr(loop, "load_latest_checkpoint", counted)
    result = Trainer.resume(tmp_path / "run", num_epochs=2)
    assert result.epochs_done == 2 and len(reads) == 1


def test_a_new_run_never_overwrites_another_runs_checkpoint(tiny_dataset, tmp_path, capsys):
    """No run loses work: training anew into a run folder is refused in one sentence that names --resume,
    and the old checkpoint is left as it was."""
    from cryoscape.cli.main import main

    run_training(tiny_config(tiny_dataset, num_epochs=1), tmp_path / "run")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    code = main(["train", str(tiny_dataset / "particles.star"), "-n", "1", "-o", str(tmp_path / "run"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a run" in err and f"--resume {tmp_path / 'run'}" in err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_the_time_left_counts_each_epoch_kind_at_its_own_mean():
    """The log's "about X left": ab initio's search, reuse and final epochs differ tenfold, so each later
    epoch is counted at the mean time of the finished epochs of its kind (of all, for a kind not seen yet)."""
    from cryoscape.train.trainer import remaining_seconds

    history = [{"kind": "search", "seconds": 10.0}, {"kind": "reuse", "seconds": 1.0},
               {"kind": "search", "seconds": 20.0}]
    assert remaining_seconds(history, ["reuse", "search"]) == pytest.approx(1.0 + 15.0)
    assert remaining_seconds(history, ["final", "final"]) == pytest.approx(2 * 31.0 / 3)
    assert remaining_seconds([{"seconds": 4.0}, {"seconds": 6.0}], ["train"] * 3) == pytest.approx(15.0)
    assert remaining_seconds(history, []) == 0.0


def test_a_resumed_run_keeps_the_decoder_it_was_saved_with(tiny_dataset, tmp_path):
    """A CryoFormer run saved before today's lattice defaults (its config names render_size 8 and has no
    depth_stride: every plane then) resumes with that lattice, not with the defaults of this version;
    the resumed decoder is the saved one, option for option."""
    from cryoscape.models.base import build_saved_decoder
    from cryoscape.train.model import build_decoder_for, saved_decoder_options

    config = tiny_config(tiny_dataset, decoder="cryoformer", zdim=1, num_epochs=1, teacher_epochs=0,
                         decoder_options={"render_size": 8, "n_levels": 2, "n_blocks": 1})
    run_training(config, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    saved = state["decoder"]["config"]
    assert (saved["render_size"], saved["depth_stride"]) == (8, 2)
    del saved["depth_stride"]  # as a checkpoint written before the depth stride
    state["config"]["decoder_options"] = {"n_levels": 2, "n_blocks": 1}  # before render_size was passed
    torch.save(state, path)

    restored = TrainConfig.from_dict(state["config"])
    options = saved_decoder_options(restored, state)
    assert options == {"n_levels": 2, "n_blocks": 1, "render_size": 8, "depth_stride": 1}
    built = build_decoder_for(TrainConfig.from_dict({**state["config"], "decoder_options": options}), 16)
    assert built.config == build_saved_decoder("cryoformer", saved).config
    assert build_saved_decoder("cryoformer", saved).depth_stride == 1
    assert build_saved_decoder("cryoformer", {**saved, "depth_stride": 2}).depth_stride == 2

    resumed = resume_training(tmp_path / "run", num_epochs=2)
    assert resumed.epochs_done == 2
    after = load_checkpoint(path)["decoder"]["config"]
    assert (after["render_size"], after["depth_stride"]) == (8, 1)
