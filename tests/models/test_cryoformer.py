"""The CryoFormer decoder behind the decoder interface: both forward models agree, the Fourier
variant is Hermitian, configs rebuild it, attention maps are distributions, and it trains
(homogeneous and heterogeneous) from TrainConfig on small simulated sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoscape.data.training import fourier_pixels
from cryoscape.fourier.fsc import fourier_shell_correlation
from cryoscape.io.mrc import read_mrc
from cryoscape.models.base import build_decoder
from cryoscape.models.realspace import column_points

def _simulate(root, name, *, n, D, heterogeneity, extra=()):
    from cryoscape.cli.main import main

    out = root / name
    if not (out / "particles.star").is_file():
        assert main(["simulate", "-o", str(out), "-n", str(n), "-D", str(D), "--snr", "1", "--heterogeneity",
                     heterogeneity, "--seed", "0", "--oversampling", "1", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def sim_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cryoformer_sims")


SMALL = dict(n_levels=4, log2_table_size=12, base_resolution=4, n_queries=8, query_dim=16, n_blocks=1, n_heads=2,
             deform_width=32)


def _decoder(D=12, zdim=0, **kw):
    torch.manual_seed(0)
    opts = {**SMALL, **kw}
    dec = build_decoder("cryoformer", box_size=D, zdim=zdim, **opts)
    with torch.no_grad():  # a non-trivial density
        dec.grid.tables.uniform_(-1, 1)
        dec.ffn[-1].bias.fill_(0.0)
    return dec.eval()


def test_real_space_images_equal_the_central_slices_of_the_map_on_grid_frequencies():
    """predict_images (rendering, r = D) equals forward() (3-D FFT of eval_volume) where the slice
    frequencies fall on the grid: identity and 90-degree rotations.  Every voxel (depth_stride 1): this
    random grid has content to the corners of the box, which a stride of 2 would alias."""
    D = 12
    dec = _decoder(D, render_size=D, depth_stride=1, radius_fraction=0.9)
    pixels = fourier_pixels(D)
    R = torch.stack([torch.eye(3), torch.tensor([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])])
    with torch.no_grad():
        rendered = dec.predict_images(R, pixels, None, None)
        from cryoscape.train.likelihood import slice_points
        sliced = dec(slice_points(R, pixels.freqs_cycles_per_pixel), None)
    torch.testing.assert_close(rendered, sliced, rtol=1e-4, atol=1e-4 * float(sliced.abs().max()))


def test_rendered_positions_reach_the_hash_grid_in_float32_under_autocast():
    """Under bfloat16 autocast the world positions R^T x stay float32 and exact: rounded to bfloat16 they
    moved by up to a quarter pixel and sent the grid down its slow PyTorch path (2x slower training)."""
    D = 16
    dec = _decoder(D, render_size=8)
    pixels = fourier_pixels(D)
    R = torch.stack([torch.eye(3), torch.tensor([[0.36, 0.48, -0.8], [-0.8, 0.6, 0.0], [0.48, 0.64, 0.6]])])
    seen = []
    dec.grid.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        dec.predict_images(R, pixels, None, None)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            dec.predict_images(R, pixels, None, None)
    exact, under = seen
    assert under.dtype == torch.float32
    assert torch.equal(under, exact)


def test_density_is_zero_outside_the_sphere_and_non_negative():
    dec = _decoder(16, radius_fraction=0.5)
    vol = dec.eval_volume(None)
    assert float(vol.min()) >= 0 and float(vol.max()) > 0
    axis = torch.arange(16) - 8
    r2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    assert float(vol[r2 > 16].abs().max()) == 0.0


def test_fourier_variant_is_hermitian_and_rebuilds_from_its_config():
    dec = _decoder(12, zdim=2, space="fourier")
    k = torch.rand(1, 50, 3) - 0.5
    z = torch.randn(1, 2)
    with torch.no_grad():
        a, b = dec(k, z), dec(-k, z)
    torch.testing.assert_close(a, b.conj())
    twin = build_decoder("cryoformer", **dec.config)
    twin.load_state_dict(dec.state_dict())
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(k, z), a)


def test_attention_maps_are_distributions_over_the_queries_inside_the_sphere():
    dec = _decoder(12, zdim=1)
    att = dec.attention_volumes(torch.tensor([0.3]))
    assert att.shape == (8, 12, 12, 12)
    total = att.sum(0)
    inside = total > 0
    torch.testing.assert_close(total[inside], torch.ones_like(total[inside]))
    assert int(inside.sum()) == len(column_points(12, 12, radius_fraction=0.9))


def test_heterogeneous_context_changes_the_density_with_the_latent():
    dec = _decoder(12, zdim=1)
    a, b = dec.eval_volume(torch.tensor([-2.0])), dec.eval_volume(torch.tensor([2.0]))
    assert float((a - b).abs().max()) > 1e-3 * float(a.abs().max())


def test_deformation_starts_as_the_identity_and_then_moves_the_density():
    """The deformation path's last layer starts at zero (the map of a decoder without it); a non-zero
    displacement field changes the map with the latent, and gradients reach it through the grid lookup."""
    plain = _decoder(12, zdim=1, deformation=False)
    deformed = _decoder(12, zdim=1)  # the default
    own = {k: v for k, v in deformed.state_dict().items() if k.startswith("point_deformation.")}
    deformed.load_state_dict({**plain.state_dict(), **own})
    z = torch.tensor([1.5])
    torch.testing.assert_close(deformed.eval_volume(z), plain.eval_volume(z))
    with torch.no_grad():
        deformed.point_deformation.out.bias.fill_(0.05)
        deformed.point_deformation.out.weight.normal_(0, 0.05)
    a, b = deformed.eval_volume(torch.tensor([-2.0])), deformed.eval_volume(torch.tensor([2.0]))
    assert float((a - b).abs().max()) > 1e-2 * float(a.abs().max())
    deformed.eval_volume(z, grad=True).square().sum().backward()
    assert float(deformed.point_deformation.point.weight.grad.abs().sum()) > 0


def test_weights_saved_without_the_deformation_load_as_that_model():
    """A state saved by a decoder without the deformation (the default before 2026-12-04) loads into one
    built with today's default and gives the same map."""
    old = _decoder(12, zdim=1, deformation=False)
    new = _decoder(12, zdim=1)
    assert new.point_deformation is not None
    new.load_state_dict(old.state_dict())
    assert new.point_deformation is None and new.config["deformation"] is False
    z = torch.tensor([0.7])
    torch.testing.assert_close(new.eval_volume(z), old.eval_volume(z))


def test_latent_to_points_and_grid_learning_rate_options():
    """``latent_to_points`` adds the latent to every point's FFN (``latent_to_spatial``: to the spatial MLP);
    ``grid_lr_scale`` puts the hash-grid tables in their own optimiser group (the others at the base rate)."""
    dec = _decoder(12, zdim=1, latent_to_points=True, grid_lr_scale=0.1)
    a, b = dec.eval_volume(torch.tensor([-2.0])), dec.eval_volume(torch.tensor([2.0]))
    assert float((a - b).abs().max()) > 1e-3 * float(a.abs().max())
    groups = dec.optimizer_param_groups()
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    assert groups[0]["params"] == [dec.grid.tables]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in dec.parameters())
    assert _decoder(12, zdim=1).optimizer_param_groups() is None
    spatial = _decoder(12, zdim=1, latent_to_spatial=True)
    a, b = spatial.eval_volume(torch.tensor([-2.0])), spatial.eval_volume(torch.tensor([2.0]))
    assert float((a - b).abs().max()) > 1e-3 * float(a.abs().max())


def test_adam_steps_by_the_learning_rate_on_gradients_far_below_torchs_eps():
    """CryoFormer's gradients start near zero with its density (README: the hash tables' RMS 1e-9 - 1e-10
    in the first epoch at SNR 0.001).  Adam's first step is ``lr * g / (|g| + eps)``: with the decoder's
    ``adam_eps`` the optimiser that training builds moves every parameter by the learning rate; with
    torch's 1e-8 by 1% of it, which held the low-SNR runs still for epochs."""
    from cryoscape.train.config import TrainConfig
    from cryoscape.train.model import build_optimizers

    lr, steps = 1e-3, {}
    for eps in (None, 1e-8):
        dec = build_decoder("cryoformer", box_size=12, zdim=0, **SMALL, **({} if eps is None else {"adam_eps": eps}))
        before = [p.detach().clone() for p in dec.parameters()]
        optimizer, _ = build_optimizers(TrainConfig(particles="unused.mrcs", lr=lr), dec, None)
        assert optimizer.param_groups[0]["eps"] == (eps or dec.adam_eps())
        for p in dec.parameters():
            p.grad = torch.full_like(p, 1e-10)
        optimizer.step()
        steps[eps] = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, dec.parameters())])
    assert dec.adam_eps() == 1e-8 and build_decoder("cryoformer", box_size=12, zdim=0, **SMALL).adam_eps() < 1e-12
    torch.testing.assert_close(steps[None], torch.full_like(steps[None], lr), rtol=1e-3, atol=0)
    assert float(steps[1e-8].max()) < 0.011 * lr


def test_latent_warmup_gates_the_latent_over_the_first_steps():
    """With ``latent_warmup_steps`` the map ignores the latent at step 0 and follows it fully after the
    warm-up; the step count is saved with the model."""
    dec = _decoder(12, zdim=1, latent_to_points=True, latent_warmup_steps=4)
    a, b = dec.eval_volume(torch.tensor([-2.0])), dec.eval_volume(torch.tensor([2.0]))
    torch.testing.assert_close(a, b)
    for _ in range(2):
        dec.after_optimizer_step()
    assert dec.latent_gate() == 0.5
    for _ in range(3):
        dec.after_optimizer_step()
    assert dec.latent_gate() == 1.0 and int(dec.state_dict()["optimizer_steps"]) == 5
    a, b = dec.eval_volume(torch.tensor([-2.0])), dec.eval_volume(torch.tensor([2.0]))
    assert float((a - b).abs().max()) > 1e-3 * float(a.abs().max())


# ---------------------------------------------------------------------------------------------
# training through the engine
# ---------------------------------------------------------------------------------------------
def test_homogeneous_training_reconstructs_the_map(sim_root, tmp_path):
    """600 images of 16 px at SNR 1, 3 epochs: FSC to the truth > 0.5 up to 3/4 Nyquist (the decoder at
    its paper sizes reached FSC 0.95 to shell 10 of 12 at D=24 in 3 epochs by the CLI)."""
    from cryoscape.train.config import TrainConfig
    from cryoscape.train.loop import run_training
    data = _simulate(sim_root, "hom16", n=600, D=16, heterogeneity="none", extra=("--shift-max-pixel", "1"))
    config = TrainConfig(particles=str(data / "particles.star"), decoder="cryoformer", decoder_options=dict(SMALL),
                         num_epochs=3, batch_size=8, lr=2e-3, progress=False, checkpoint_every=100)
    result = run_training(config, tmp_path / "run")
    truth, _ = read_mrc(data / "gt_volumes" / "vol_000.mrc")
    _, fsc = fourier_shell_correlation(result.decoder.eval_volume(None), torch.as_tensor(truth))
    assert float(fsc[:7].min()) > 0.5, fsc
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_heterogeneous_training_writes_latents_and_its_loss_falls(sim_root, tmp_path):
    from cryoscape.train.config import TrainConfig
    from cryoscape.train.loop import run_training

    tiny_dataset = _simulate(sim_root, "tiny", n=64, D=16, heterogeneity="discrete",
                             extra=("--n-classes", "2", "--shift-max-pixel", "1"))
    config = TrainConfig(particles=str(tiny_dataset / "particles.star"), decoder="cryoformer", zdim=1,
                         decoder_options=dict(SMALL), num_epochs=3, batch_size=8, lr=2e-3, beta=0.05,
                         enc_layers=2, enc_dim=32, progress=False, checkpoint_every=100, teacher_epochs=0)
    result = run_training(config, tmp_path / "run")
    z = np.load(tmp_path / "run" / "z.2.npy")
    assert z.shape == (64, 1) and np.isfinite(z).all()
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # analyze's attention section: per-query maps that sum to 1 in the sphere, and their change map
    from cryoscape.report.attention import attention_section

    (tmp_path / "figs").mkdir()
    section = attention_section(tmp_path / "run", tmp_path / "an", tmp_path / "figs", z=z, epoch=2)
    assert section is not None and (tmp_path / "figs" / "attention_change.png").stat().st_size > 1000
    maps = np.stack([read_mrc(tmp_path / "an" / "attention" / f"query_{j:02d}.mrc")[0] for j in range(8)])
    total = maps.sum(0)
    np.testing.assert_allclose(total[total > 0], 1.0, atol=1e-4)
    change, _ = read_mrc(tmp_path / "an" / "attention" / "change.mrc")
    assert change.shape == (16, 16, 16) and float(change.max()) > 0
    # cryoscape analyze adds the section to its report and writes the same maps
    from cryoscape.cli.main import main

    assert main(["analyze", str(tmp_path / "run"), "-o", str(tmp_path / "analyze"), "--ksample", "2", "--pc", "1",
                 "--n-per-pc", "2", "--no-progress"]) == 0
    assert "Attention maps" in (tmp_path / "analyze" / "report.html").read_text()
    again, _ = read_mrc(tmp_path / "analyze" / "attention" / "change.mrc")
    np.testing.assert_allclose(again, change, atol=1e-6)


def test_abinit_final_epochs_train_cryoformer_on_the_searched_poses(sim_root, tmp_path):
    """``abinit --decoder cryoformer --search-decoder neural_field``: the neural field searches, the
    CryoFormer takes over in the final epochs (its checkpoint) and its loss falls there."""
    from cryoscape.cli.main import main
    from cryoscape.train.checkpoint import load_checkpoint

    data = _simulate(sim_root, "tiny_hom", n=64, D=16, heterogeneity="none")
    opts = [x for kv in ("render_size=8", "n_levels=4", "n_queries=8", "query_dim=16", "n_blocks=1")
            for x in ("--decoder-opt", kv)]
    out = tmp_path / "ab"
    assert main(["abinit", str(data / "particles.star"), "-o", str(out), "-n", "5", "--final-epochs", "3",
                 "--decoder", "cryoformer", "--search-decoder", "neural_field", *opts, "--no-progress"]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["decoder"]["name"] == "cryoformer"
    losses = [h["loss"] for h in state["history"][2:]]
    assert losses[-1] < losses[0], losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_hash_grid_and_rendering_agree_on_cuda_and_cpu():
    """The same decoder renders the same images (and gradients reach the tables) on CUDA as on the CPU."""
    dec = _decoder(12, zdim=1, render_size=12)
    pixels = fourier_pixels(12)
    R = torch.linalg.qr(torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(0)))[0]
    R = R * torch.det(R).sign()[:, None, None]
    z = torch.randn(3, 1)
    with torch.no_grad():
        cpu = dec.predict_images(R, pixels, z, None)
    gpu_dec = dec.to("cuda")
    out = gpu_dec.predict_images(R.cuda(), pixels.to("cuda"), z.cuda(), None)
    out.abs().square().sum().backward()
    torch.testing.assert_close(out.detach().cpu(), cpu, rtol=1e-3, atol=1e-3 * float(cpu.abs().max()))
    assert float(gpu_dec.grid.tables.grad.abs().sum()) > 0
