"""``cryoscape train`` from the command line: inputs in several formats, --ind, --resume, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from cryoscape.cli.main import main
from cryoscape.train.checkpoint import load_checkpoint

SMALL = ["--dec-layers", "1", "--dec-dim", "16", "--enc-layers", "1", "--enc-dim", "16", "-b", "16",
         "--lr", "1e-3", "--no-progress", "--device", "cpu", "--norm-images", "64"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_train") / "sim"
    assert main(["simulate", "-o", str(out), "-n", "48", "-D", "16", "--snr", "1", "--heterogeneity", "discrete",
                 "--n-classes", "2", "--seed", "5", "--oversampling", "1"]) == 0
    return out


def test_star_and_cryodrgn_inputs_train_alike(dataset, tmp_path):
    star_run, mrcs_run = tmp_path / "star", tmp_path / "mrcs"
    assert main(["train", str(dataset / "particles.star"), "-o", str(star_run), "--zdim", "1", "-n", "2", *SMALL]) == 0
    assert main(["train", str(dataset / "particles.mrcs"), "--poses", str(dataset / "poses.pkl"),
                 "--ctf", str(dataset / "ctf.pkl"), "-o", str(mrcs_run), "--zdim", "1", "-n", "2", *SMALL]) == 0
    a = load_checkpoint(star_run / "checkpoint.pt")
    b = load_checkpoint(mrcs_run / "checkpoint.pt")
    # ctf.pkl is float32 and poses.pkl stores shifts as box fractions: same training up to rounding
    np.testing.assert_allclose([h["loss"] for h in a["history"]], [h["loss"] for h in b["history"]], rtol=1e-3)
    np.testing.assert_allclose(np.load(star_run / "z.1.npy"), np.load(mrcs_run / "z.1.npy"), rtol=1e-2, atol=1e-3)
    config = yaml.safe_load((mrcs_run / "config.yaml").read_text())
    assert config["arguments"]["poses"].endswith("poses.pkl")
    assert config["training"]["ctf"].endswith("ctf.pkl")
    assert config["data"]["pixel_size_angstrom"] == pytest.approx(15.625)


def test_ind_selects_particles_and_resume_continues(dataset, tmp_path):
    ind = np.arange(0, 48, 2)
    np.save(tmp_path / "ind.npy", ind)
    run = tmp_path / "run"
    assert main(["train", str(dataset / "particles.star"), "--ind", str(tmp_path / "ind.npy"), "-o", str(run),
                 "--zdim", "2", "-n", "1", "--checkpoint-every", "1", *SMALL]) == 0
    assert np.load(run / "z.0.npy").shape == (24, 2)
    assert main(["train", "--resume", str(run), "-n", "3", "--no-progress"]) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 3
    assert sorted(p.name for p in run.glob("weights.*.pt")) == ["weights.0.pt", "weights.1.pt", "weights.2.pt"]
    assert np.load(run / "z.2.npy").shape == (24, 2)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["resumed_from_epoch"] == 0 and config["training"]["num_epochs"] == 3
    log = (run / "run.log").read_text()
    assert "resuming" in log and "epoch 3/3" in log


def test_load_starts_a_new_run_from_weights(dataset, tmp_path):
    first = tmp_path / "first"
    assert main(["train", str(dataset / "particles.star"), "-o", str(first), "-n", "1", *SMALL]) == 0
    second = tmp_path / "second"
    assert main(["train", str(dataset / "particles.star"), "-o", str(second), "-n", "2",
                 "--load", str(first / "weights.0.pt"), *SMALL]) == 0
    state = load_checkpoint(second / "checkpoint.pt")
    assert state["epoch"] == 1 and len(state["history"]) == 1  # only the epoch trained here
    assert not (second / "weights.0.pt").exists()


def test_errors_are_one_sentence(dataset, tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.star"), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.star" in err and len(err.splitlines()) == 1
    assert main(["train", str(dataset / "particles.star")]) == 2
    assert "-o" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "checkpoint.pt" in capsys.readouterr().err
    assert main(["train", str(dataset / "particles.mrcs"), "-o", str(tmp_path / "r2"), *SMALL]) == 2
    assert "--poses" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(dataset / "particles.star"), "-o", str(tmp_path / "r3"), "--beta", "lots"])
    assert main(["train", str(dataset / "particles.star"), "-o", str(tmp_path / "r4"), "--decoder", "nope"]) == 2
    assert "neural_field" in capsys.readouterr().err
    # the default decoder (the basis) is a Fourier-space model: one sentence naming the two ways out
    assert main(["train", str(dataset / "particles.star"), "-o", str(tmp_path / "r5"), "--domain", "hartley",
                 *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert "--domain fourier, or --decoder neural_field" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1  # said before any image is read (no loading line before it)


def test_nan_loss_exits_with_a_learning_rate_hint(dataset, tmp_path, capsys, monkeypatch):
    from cryoscape.train import objective as loop

    real = loop.squared_error
    monkeypatch.setattr(loop, "squared_error", lambda p, t, px: real(p, t, px) * float("inf"))
    assert main(["train", str(dataset / "particles.star"), "-o", str(tmp_path / "r"), "-n", "2", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "training loss became" in err and "--lr 0.0001" in err and "no checkpoint" in err


def test_odd_box_hartley_conv_encoder_amp_and_lazy_reading(tmp_path):
    data = tmp_path / "odd"
    assert main(["simulate", "-o", str(data), "-n", "48", "-D", "15", "--snr", "1", "--heterogeneity", "none",
                 "--seed", "0", "--oversampling", "1", "--shift-max-pixel", "1"]) == 0
    run = tmp_path / "run"
    assert main(["train", str(data / "particles.star"), "-o", str(run), "-n", "2", "--zdim", "1", "--encoder", "conv",
                 "--domain", "hartley", "--decoder", "neural_field", "--amp", "--lazy", *SMALL]) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["data"]["box_size"] == 15 and state["decoder"]["config"]["domain"] == "hartley"
    assert state["encoder"]["config"]["kind"] == "conv"
    assert np.isfinite([h["loss"] for h in state["history"]]).all()
    assert "bfloat16" in (run / "run.log").read_text()
    assert main(["volumes", str(run), "--z-values", "0.3", "-o", str(tmp_path / "maps"), "--box-size", "11",
                 "--no-progress", "--device", "cpu"]) == 0
    from cryoscape.io.mrc import read_mrc

    volume, pixel = read_mrc(tmp_path / "maps" / "vol_000.mrc")
    assert volume.shape == (11, 11, 11) and pixel == pytest.approx(16.6667 * 15 / 11, rel=1e-3)
