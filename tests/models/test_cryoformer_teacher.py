"""The latent teacher (train/teacher.py): ``--init-encoder RUN`` copies a finished run's VAE encoder into a
new run (here a voxel-basis run into a CryoFormer run), which then trains it further; ``--teacher-epochs``
(CryoFormer's default) trains that basis run first, in RUN/teacher."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cryoscape.errors import InputError

TINY = ["--decoder-opt", "render_size=8", "--decoder-opt", "n_levels=2", "--decoder-opt", "log2_table_size=10",
        "--decoder-opt", "base_resolution=4", "--decoder-opt", "n_queries=4", "--decoder-opt", "query_dim=8",
        "--decoder-opt", "n_blocks=1", "--decoder-opt", "n_heads=2", "--decoder-opt", "deform_width=16"]
VAE = ["--zdim", "1", "--encoder", "resmlp", "--enc-layers", "1", "--enc-dim", "32", "--no-progress"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 16-px hinge and a 2-epoch basis run on it (the teacher)."""
    from cryoscape.cli.main import main

    root = tmp_path_factory.mktemp("teacher")
    data = root / "hinge16"
    assert main(["simulate", "-o", str(data), "-n", "48", "-D", "16", "--snr", "1", "--heterogeneity", "hinge",
                 "--seed", "0", "--oversampling", "1"]) == 0
    assert main(["train", str(data / "particles.star"), "-o", str(root / "basis"), "--decoder", "basis", "-n", "2",
                 *VAE]) == 0
    return data, root / "basis"


def _encoder_state(run):
    from cryoscape.train.checkpoint import find_checkpoint, load_checkpoint

    return load_checkpoint(find_checkpoint(run))["encoder"]["state"]


def _largest_change(a, b) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_init_encoder_copies_the_teacher_and_the_run_trains_it_from_there(teacher, tmp_path):
    """copy_encoder loads the basis run's encoder exactly; a 1-epoch CryoFormer run with --init-encoder ends
    near it (6 Adam steps at lr 1e-3 move a weight by at most ~6e-3), one without it far from it."""
    from cryoscape.cli.main import main
    from cryoscape.models.encoders import build_encoder
    from cryoscape.train.teacher import copy_encoder

    data, basis = teacher
    ref = _encoder_state(basis)
    encoder = build_encoder({"type": "image", "box_size": 16, "zdim": 1, "kind": "resmlp", "layers": 1, "width": 32})
    assert _largest_change(ref, encoder.state_dict()) > 0.1
    copy_encoder(encoder, basis)
    assert _largest_change(ref, encoder.state_dict()) == 0.0
    common = ["train", str(data / "particles.star"), "--decoder", "cryoformer", "-n", "1", "-b", "8", *VAE, *TINY]
    assert main([*common, "-o", str(tmp_path / "taught"), "--init-encoder", str(basis)]) == 0
    assert main([*common, "-o", str(tmp_path / "fresh"), "--teacher-epochs", "0"]) == 0
    moved = _largest_change(ref, _encoder_state(tmp_path / "taught"))
    assert 0.0 < moved < 0.02, moved
    assert _largest_change(ref, _encoder_state(tmp_path / "fresh")) > 0.1


def test_init_encoder_refuses_an_encoder_of_another_shape(teacher):
    from cryoscape.models.encoders import build_encoder
    from cryoscape.train.teacher import copy_encoder

    _, basis = teacher
    other = build_encoder({"type": "image", "box_size": 16, "zdim": 1, "kind": "resmlp", "layers": 1, "width": 64})
    with pytest.raises(InputError, match="width: 32 there, 64 here"):
        copy_encoder(other, basis)
    with pytest.raises(InputError, match="needs --zdim > 0"):
        copy_encoder(None, basis)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())  # left as it was


def test_teacher_epochs_follow_the_decoder_and_the_options():
    from cryoscape.train.config import TrainConfig
    from cryoscape.train.teacher import teacher_config, teacher_epochs_for

    def config(**kw):
        return TrainConfig(**{"particles": "p.star", "decoder": "cryoformer", "zdim": 4, **kw})

    assert teacher_epochs_for(config()) == 12  # CryoFormer's default
    assert teacher_epochs_for(config(teacher_epochs=3)) == 3
    assert teacher_epochs_for(config(teacher_epochs=0)) == 0
    assert teacher_epochs_for(config(zdim=0)) == 0
    assert teacher_epochs_for(config(decoder="neural_field")) == 0
    assert teacher_epochs_for(config(decoder="basis", teacher_epochs=5)) == 0  # the basis is its own teacher
    assert teacher_epochs_for(config(init_encoder="run_basis")) == 0
    with pytest.raises(InputError, match="leave --teacher-epochs out"):
        teacher_epochs_for(config(init_encoder="run_basis", teacher_epochs=3))
    with pytest.raises(ValueError, match="needs --zdim > 0"):
        config(zdim=0, teacher_epochs=2).validate()
    with pytest.raises(ValueError, match="0 \\(no teacher\\) or positive"):
        config(teacher_epochs=-1).validate()
    student = config(teacher_epochs=5, lr=3e-4, batch_size=8, refine_poses=True, enc_dim=64, beta=0.05,
                     decoder_options={"render_size": 8})
    teacher = teacher_config(student)
    assert (teacher.decoder, teacher.num_epochs, teacher.lr, teacher.batch_size) == ("basis", 5, 1e-3, 64)
    assert teacher.decoder_options == {} and not teacher.refine_poses and teacher.pose_source == "table"
    assert teacher.init_encoder is None and teacher.teacher_epochs == 0
    assert not teacher.refit and not teacher.refit_latents  # the student takes the encoder only
    assert (teacher.zdim, teacher.enc_dim, teacher.beta, teacher.particles) == (4, 64, 0.05, "p.star")


def test_train_trains_the_teacher_first_in_its_own_folder_and_starts_from_its_encoder(teacher, tmp_path):
    """``--teacher-epochs 2``: a 2-epoch basis run in RUN/teacher (its epochs in its own run.log), whose
    encoder the 1-epoch CryoFormer run starts from and ends near; a finished teacher is reused, not retrained."""
    from cryoscape.cli.main import main
    from cryoscape.io.particles import load_particles
    from cryoscape.train.checkpoint import load_checkpoint
    from cryoscape.train.config import TrainConfig
    from cryoscape.train.teacher import train_teacher

    data, _ = teacher
    run = tmp_path / "run"
    assert main(["train", str(data / "particles.star"), "--decoder", "cryoformer", "-n", "1", "-b", "8", *VAE, *TINY,
                 "--teacher-epochs", "2", "-o", str(run)]) == 0
    state = load_checkpoint(run / "teacher" / "checkpoint.pt")
    assert state["epoch"] == 1 and state["decoder"]["name"] == "basis"
    moved = _largest_change(state["encoder"]["state"], _encoder_state(run))
    assert 0.0 < moved < 0.02, moved
    student_log, teacher_log = (run / "run.log").read_text(), (run / "teacher" / "run.log").read_text()
    assert "epoch 2/2" in teacher_log and "epoch 2/2" not in student_log and "epoch 1/1" in student_log
    assert "teacher: 2 epochs in" in student_log and "encoder: copied from" in student_log
    saved = load_checkpoint(run / "checkpoint.pt")["config"]
    assert saved["teacher_epochs"] == 2 and saved["init_encoder"] == str(run / "teacher")
    before = (run / "teacher" / "checkpoint.pt").stat().st_mtime_ns
    config = TrainConfig(particles=str(data / "particles.star"), decoder="cryoformer", zdim=1, teacher_epochs=2,
                         encoder="resmlp", enc_layers=1, enc_dim=32)
    table = load_particles(str(data / "particles.star"))
    assert train_teacher(config, table, run) == run / "teacher"
    assert (run / "teacher" / "checkpoint.pt").stat().st_mtime_ns == before
    other = dataclasses.replace(config, enc_dim=64, seed=3)  # the folder reused after the options changed
    with pytest.raises(InputError, match="other options \\(enc_dim: 32 there, 64 now, seed: 0 there, 3 now\\)"):
        train_teacher(other, table, run)
    assert (run / "teacher" / "checkpoint.pt").stat().st_mtime_ns == before


def test_abinit_teacher_epochs_follow_the_decoder_and_the_switch():
    """``abinit``: the teacher's epochs are fixed at the start of the run, CryoFormer's default when a new
    VAE takes over at the first final epoch, none without that switch (refused when asked for)."""
    from cryoscape.train.abinit import AbinitConfig, AbinitSchedule

    def fixed(**kw):
        config = AbinitConfig(**{"particles": "p.star", "decoder": "cryoformer", "zdim": 2, "num_epochs": 6,
                                 "final_epochs": 2, **kw})
        config.validate()
        return AbinitSchedule(config).fixed(config)

    assert fixed().teacher_epochs == 12
    assert fixed(teacher_epochs=3).teacher_epochs == 3
    assert fixed(decoder="neural_field").teacher_epochs == 0
    assert fixed(zdim=0).teacher_epochs == 0
    assert fixed(final_epochs=0).teacher_epochs == 0  # the VAE searches from the start: no switch
    assert fixed().phase_config(0).teacher_epochs == 0  # the homogeneous search model has no latent
    with pytest.raises(ValueError, match="does not have \\(the VAE searches from the start\\)"):
        fixed(final_epochs=0, teacher_epochs=3)


def test_abinit_trains_the_teacher_at_the_switch_on_the_poses_it_found(teacher, tmp_path, monkeypatch):
    """``abinit --zdim 1 --decoder cryoformer --teacher-epochs 2``: at the first final epoch a 2-epoch basis
    VAE is trained in RUN/teacher on the poses of the last search-phase epoch (poses.E.npz), and the new
    CryoFormer VAE starts its encoder from it and ends near it after its one final epoch."""
    import numpy as np

    import cryoscape.train.trainer as trainer_module
    from cryoscape.cli.main import main
    from cryoscape.train.checkpoint import load_checkpoint

    data, _ = teacher
    seen = []
    real = trainer_module.train_teacher

    def recording(config, table, out, **kw):
        seen.append((config.teacher_epochs, np.array(table.rotations), np.array(table.shifts_pixel)))
        return real(config, table, out, **kw)

    monkeypatch.setattr(trainer_module, "train_teacher", recording)
    run = tmp_path / "ab"
    assert main(["abinit", str(data / "particles.star"), "-o", str(run), "-n", "3", "--final-epochs", "1",
                 "--search-decoder", "neural_field", "--decoder", "cryoformer", "--pretrain", "48",
                 "--teacher-epochs", "2", *VAE, *TINY]) == 0
    assert len(seen) == 1 and seen[0][0] == 2
    found = np.load(run / "poses.1.npz")
    np.testing.assert_allclose(seen[0][1], found["rotations"], atol=1e-6)
    np.testing.assert_allclose(seen[0][2], found["shifts_pixel"], atol=1e-5)
    state = load_checkpoint(run / "teacher" / "checkpoint.pt")
    assert state["epoch"] == 1 and state["decoder"]["name"] == "basis"
    moved = _largest_change(state["encoder"]["state"], _encoder_state(run))
    assert 0.0 < moved < 0.02, moved
    log = (run / "run.log").read_text()
    assert "teacher: 2 epochs in" in log and "encoder: copied from" in log and "epoch 2/2" not in log
    assert load_checkpoint(run / "checkpoint.pt")["config"]["teacher_epochs"] == 2
