"""``cryoscape volumes``: maps equal the decoder's, with the right box and pixel size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoscape.cli.main import main
from cryoscape.errors import InputError
from cryoscape.io.mrc import read_mrc
from cryoscape.train.config import TrainConfig
from cryoscape.train.loop import run_training
from cryoscape.train.volumes import load_trained_model, read_latents


@pytest.fixture(scope="module")
def vae_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae_run")
    config = TrainConfig(particles=str(tiny_dataset / "particles.star"), zdim=2, num_epochs=2, dec_layers=1,
                         dec_dim=16, enc_layers=1, enc_dim=16, batch_size=16, lr=1e-2, progress=False,
                         checkpoint_every=1)
    run_training(config, out)
    return out


def test_volumes_equal_eval_volume_with_box_and_pixel_size(vae_run, tmp_path):
    out = tmp_path / "maps"
    code = main(["volumes", str(vae_run), "--z-values", "0.5", "-1.0", "-2", "0.25", "-o", str(out),
                 "--box-size", "12", "--no-progress", "--device", "cpu"])
    assert code == 0
    decoder, _, state = load_trained_model(vae_run)
    assert state["epoch"] == 1
    zs = [torch.tensor([0.5, -1.0]), torch.tensor([-2.0, 0.25])]
    for i, z in enumerate(zs):
        volume, pixel = read_mrc(out / f"vol_{i:03d}.mrc")
        assert volume.shape == (12, 12, 12)
        assert pixel == pytest.approx(15.625 * 16 / 12, rel=1e-5)
        np.testing.assert_allclose(volume, decoder.eval_volume(z, box_size=12).numpy(), rtol=1e-5, atol=1e-6)
    assert not (out / "vol_002.mrc").exists()
    np.testing.assert_allclose(np.loadtxt(out / "z_values.txt"), [[0.5, -1.0], [-2.0, 0.25]])
    # the two latents give different maps
    a, _ = read_mrc(out / "vol_000.mrc")
    b, _ = read_mrc(out / "vol_001.mrc")
    assert np.abs(a - b).max() > 1e-6


def test_volumes_epoch_flip_invert_and_latent_file(vae_run, tmp_path):
    z = np.array([[0.1, 0.2]], dtype=np.float32)
    np.save(tmp_path / "z.npy", z)
    out = tmp_path / "maps"
    assert main(["volumes", str(vae_run), "--z", str(tmp_path / "z.npy"), "--epoch", "0", "--flip", "--invert",
                 "-o", str(out), "--no-progress", "--device", "cpu"]) == 0
    decoder, _, state = load_trained_model(vae_run, epoch=0)
    assert state["epoch"] == 0
    expected = -decoder.eval_volume(torch.as_tensor(z[0])).flip(0).numpy()
    volume, pixel = read_mrc(out / "vol_000.mrc")
    assert volume.shape == (16, 16, 16) and pixel == pytest.approx(15.625, rel=1e-5)
    np.testing.assert_allclose(volume, expected, rtol=1e-5, atol=1e-6)
    latest, _, _ = load_trained_model(vae_run)
    assert np.abs(latest.eval_volume(torch.as_tensor(z[0])).numpy() - decoder.eval_volume(torch.as_tensor(z[0])).numpy()).max() > 0


def test_volumes_bad_input_is_one_clear_error(vae_run, tmp_path, capsys):
    assert main(["volumes", str(vae_run), "--z-values", "1", "2", "3", "-o", str(tmp_path / "m")]) == 2
    assert "zdim 2" in capsys.readouterr().err
    assert main(["volumes", str(vae_run), "--epoch", "7", "--z-values", "1", "2", "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "epoch 7" in err and "0, 1" in err
    assert main(["volumes", str(vae_run), "-o", str(tmp_path / "m")]) == 2
    assert "latent" in capsys.readouterr().err
    with pytest.raises(InputError, match="not a multiple"):
        read_latents(values=[1.0, 2.0, 3.0], zdim=2)
    np.savetxt(tmp_path / "z3.txt", np.ones((4, 3)))
    with pytest.raises(InputError, match=r"shape \(4, 3\)"):
        read_latents(tmp_path / "z3.txt", zdim=2)
    assert read_latents(values=[1.0, 2.0, 3.0, 4.0], zdim=2).shape == (2, 2)


def test_homogeneous_run_gives_one_map(tiny_dataset, tmp_path):
    config = TrainConfig(particles=str(tiny_dataset / "particles.star"), num_epochs=1, dec_layers=1, dec_dim=16,
                         batch_size=32, progress=False)
    run_training(config, tmp_path / "run")
    out = tmp_path / "maps"
    assert main(["volumes", str(tmp_path / "run"), "-o", str(out), "--lowpass", "40", "--no-progress",
                 "--device", "cpu"]) == 0
    volume, pixel = read_mrc(out / "vol_000.mrc")
    assert volume.shape == (16, 16, 16) and pixel == pytest.approx(15.625, rel=1e-5)
    from cryoscape.fourier.filters import lowpass_filter

    decoder, _, _ = load_trained_model(tmp_path / "run")
    expected = lowpass_filter(decoder.eval_volume(None), 40.0, 15.625, ndim=3).numpy()
    np.testing.assert_allclose(volume, expected, rtol=1e-5, atol=1e-6)
    # the map written at the end of training is the same unfiltered map
    reconstruct, _ = read_mrc(tmp_path / "run" / "reconstruct.0.mrc")
    np.testing.assert_allclose(reconstruct, decoder.eval_volume(None).numpy(), rtol=1e-5, atol=1e-6)
