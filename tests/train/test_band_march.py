"""Frequency marching in ``cryoscape train``: the band of each epoch, its fixing at the start of a run
(a resume keeps the ramp), old runs, and a training run whose decoder sees only the band's pixels."""

from __future__ import annotations

import pytest
import torch

from cryoscape.models.neural_field import NeuralField
from cryoscape.train.config import DEFAULT_BAND_STARTS, TrainConfig
from cryoscape.train.loop import resume_training, run_training
from cryoscape.train.schedule import ConstantSchedule, band_fraction_at


def test_band_fraction_rises_linearly_to_nyquist_and_stays():
    assert [band_fraction_at(e, 0.5, 4) for e in range(7)] == [0.5, 0.625, 0.75, 0.875, 1.0, 1.0, 1.0]
    assert band_fraction_at(0, 0.3, 0) == 1.0  # 0 epochs of marching: every pixel from the start
    assert band_fraction_at(0, 1.0, 9) == 1.0


def test_schedule_plans_the_band_in_fourier_pixels_and_a_resume_keeps_the_ramp():
    config = TrainConfig(num_epochs=5, band_start=0.5)
    schedule = ConstantSchedule(config)
    config = schedule.fixed(config)
    assert config.band_epochs == 4  # the last epoch trains every pixel
    schedule = ConstantSchedule(config)
    plans = [schedule.plan(e, 64) for e in range(5)]
    assert [p.band_pixel for p in plans] == [16.0, 20.0, 24.0, 28.0, None]
    assert [p.kind for p in plans] == ["marching"] * 4 + ["train"]
    assert plans[1].record == {"band_pixel": 20.0}
    # a resume to 10 epochs keeps the ramp fixed when the run started
    longer = TrainConfig.from_dict({**config.to_dict(), "num_epochs": 10})
    assert [ConstantSchedule(schedule.fixed(longer)).plan(e, 64).band_pixel for e in (3, 4, 9)] == [28.0, None, None]


def test_decoder_defaults_and_runs_saved_before_marching():
    for decoder in ("neural_field", "basis"):
        fixed = ConstantSchedule(TrainConfig(decoder=decoder)).fixed(TrainConfig(decoder=decoder, num_epochs=3))
        assert fixed.band_start == DEFAULT_BAND_STARTS.get(decoder, 1.0)
    assert DEFAULT_BAND_STARTS.get("basis", 1.0) == 1.0
    old = TrainConfig(num_epochs=3).to_dict()
    del old["band_start"], old["band_epochs"]
    restored = TrainConfig.from_dict(old)
    assert restored.band_start == 1.0  # it trained every pixel, and a resume goes on doing so
    assert ConstantSchedule(ConstantSchedule(restored).fixed(restored)).plan(0, 64).band_pixel is None


@pytest.mark.parametrize("options", [dict(band_start=0.0), dict(band_start=1.5), dict(band_epochs=-1)])
def test_bad_band_options_are_refused(options):
    with pytest.raises(ValueError, match="--band-"):
        TrainConfig(**options).validate()


def test_training_evaluates_only_the_band_then_every_pixel(tiny_dataset, tmp_path, monkeypatch):
    seen: list[int] = []
    real = NeuralField._forward_all

    def counting(self, coords, z):
        if torch.is_grad_enabled() and self.training:
            seen.append(coords.shape[-2])
        return real(self, coords, z)

    monkeypatch.setattr(NeuralField, "_forward_all", counting)
    config = TrainConfig(particles=str(tiny_dataset / "particles.star"), decoder="neural_field", zdim=1, num_epochs=2,
                         band_start=0.5,
                         dec_layers=1, dec_dim=16, enc_layers=1, enc_dim=16, batch_size=16, lr=1e-3,
                         progress=False, checkpoint_every=1, n_normalization_images=64)
    result = run_training(config, tmp_path / "run")
    assert [h.get("band_pixel") for h in result.history] == [4.0, None]  # D = 16: 0.5 x 8 pixels
    assert len(seen) == 8  # 64 images in batches of 16, two epochs
    band, full = seen[:4], seen[4:]
    assert len(set(band)) == 1 and len(set(full)) == 1
    assert 0.15 < band[0] / full[0] < 0.35  # the disc of half the radius: about a quarter of the pixels
    # a resume past the end of the ramp trains every pixel
    seen.clear()
    again = resume_training(tmp_path / "run", num_epochs=3)
    assert again.history[-1].get("band_pixel") is None and set(seen) == {full[0]}


def test_neural_field_trains_128_wide_by_default_and_saved_runs_keep_their_width():
    from cryoscape.cli.train import _config_from_args
    from cryoscape.cli.main import build_parser

    nf = {"decoder": "neural_field"}
    assert TrainConfig(**nf).dec_dim == 128  # README "Choosing a decoder": float32 speed
    assert TrainConfig().dec_dim == 256 and TrainConfig(**nf, dec_dim=256).dec_dim == 256  # the basis's mixing MLP
    saved = TrainConfig(**nf, dec_dim=256).to_dict()
    assert TrainConfig.from_dict(saved).dec_dim == 256
    del saved["dec_dim"]
    assert TrainConfig.from_dict(saved).dec_dim == 256  # a run saved without the field was 256 wide
    parser = build_parser()
    args = ["train", "p.mrcs", "-o", "r", "--decoder", "neural_field"]
    assert _config_from_args(parser.parse_args(args)).dec_dim == 128
    assert _config_from_args(parser.parse_args([*args, "--dec-dim", "64"])).dec_dim == 64
    assert _config_from_args(parser.parse_args(["train", "p.mrcs", "-o", "r"])).decoder == "basis"
