"""The occupancy grid (models/occupancy.py) and CryoFormer's use of it: empty cells are found, dilated,
forgotten slowly and re-occupied; the pruned density equals the full one on the kept points and is 0
elsewhere; training refreshes the grid after its warm-up; weights saved without a grid load as before."""

from __future__ import annotations

import pytest
import torch

from cryoscape.models.base import build_decoder
from cryoscape.models.occupancy import OccupancyGrid

SMALL = dict(n_levels=4, log2_table_size=12, base_resolution=4, n_queries=8, query_dim=16, n_blocks=1, n_heads=2,
             deform_width=32)


def _ball(centre, radius: float, value: float = 1.0):
    """A density function: ``value`` inside the ball (world units), 0 outside, one row."""
    c = torch.tensor(centre, dtype=torch.float32)
    return lambda world: ((world - c).norm(dim=-1) <= radius).float() * value


def test_cells_index_the_box_and_every_cell_is_occupied_before_the_first_refresh():
    grid = OccupancyGrid(16, resolution=4)
    corners = torch.tensor([[-8.0, -8.0, -8.0], [7.9, -8.0, -8.0], [-8.0, 7.9, -8.0], [-8.0, -8.0, 7.9], [20.0, 0, 0]])
    assert grid.cells(corners).tolist() == [0, 3, 12, 48, 4 * 2 + 3 + 16 * 2]  # clamped outside the box
    assert not grid.refreshed and bool(grid.contains(torch.randn(100, 3) * 5).all())


def test_refresh_keeps_the_cells_with_density_plus_a_dilated_ring():
    tight = OccupancyGrid(32, resolution=8, dilation=0)
    wide = OccupancyGrid(32, resolution=8, dilation=1)
    for grid in (tight, wide):
        torch.manual_seed(0)  # the same random points for both
        for _ in range(20):  # random points per cell: the ball's cells are found within a few refreshes
            grid.refresh(_ball((0.0, 0.0, 0.0), 6.0))
    # the ball of radius 6 around the centre lies in the central 4x4x4 cells (4 px each), the far corners are empty
    occ = tight.occupied
    assert bool(occ[2:6, 2:6, 2:6].any()) and not bool(occ[0, 0, 0]) and not bool(occ[7, 7, 7])
    assert not bool(occ[0].any()) and not bool(occ[-1].any())
    dilated = torch.nn.functional.max_pool3d(occ[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    assert torch.equal(wide.occupied, dilated) and wide.occupied.sum() > tight.occupied.sum()
    inside, outside = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[-15.0, -15.0, -15.0]])
    assert bool(tight.contains(inside)) and not bool(tight.contains(outside))


def test_an_isolated_maximum_does_not_occupy_its_cell_but_a_domain_does():
    """A noisy map's isolated maxima (one cell as dense as the molecule) are averaged with their empty
    neighbours and dropped; a domain of 4 x 4 x 4 cells is kept, and so is its faint (25%) neighbour domain,
    whose outer cells the average alone would drop (with their empty neighbours they fall below 0.2) and
    the default dilation of one cell restores."""
    grid = OccupancyGrid(64, resolution=16)
    values = torch.zeros(16, 16, 16)
    values[2:6, 2:6, 2:6] = 1.0  # the molecule
    values[2:6, 2:6, 6:10] = 0.25  # a faint domain next to it
    values[12, 12, 12] = 1.0  # an isolated maximum
    grid.refresh(lambda world: values.reshape(-1)[grid.cells(world)])
    assert bool(grid.occupied[2:6, 2:6, 2:10].all())
    assert not bool(grid.occupied[12, 12, 12]) and not bool(grid.occupied[8:, 8:, 8:].any())
    assert not bool(grid.occupied[8:].any()) and not bool(grid.occupied[:, 8:].any())  # within 2 cells of the domains
    assert not bool(grid.occupied[..., 12:].any())


def test_the_threshold_counts_from_the_background_and_a_map_without_shape_is_not_pruned():
    """A noisy map's background sits well above 0: the threshold is measured from it (here 40% of the
    peak: a rule relative to the peak alone would keep every cell), while a near-uniform level (a model's
    start, the background above half the peak) prunes nothing."""
    grid = OccupancyGrid(64, resolution=16)
    values = torch.full((16, 16, 16), 0.4)
    values[2:6, 2:6, 2:6] = 1.0
    grid.refresh(lambda world: values.reshape(-1)[grid.cells(world)])
    assert bool(grid.occupied[2:6, 2:6, 2:6].all()) and not bool(grid.occupied[8:].any())
    assert 0.01 < float(grid.occupied.float().mean()) < 0.1
    flat = OccupancyGrid(64, resolution=16)
    values = 1.0 + 0.01 * torch.rand(16, 16, 16, generator=torch.Generator().manual_seed(0))
    flat.refresh(lambda world: values.reshape(-1)[flat.cells(world)])
    assert flat.refreshed and bool(flat.occupied.all())


def test_level_decays_so_density_that_moved_is_followed_and_the_old_place_forgotten():
    torch.manual_seed(0)
    grid = OccupancyGrid(32, resolution=8, dilation=0, decay=0.5, threshold=0.01)
    a, b = torch.tensor([[-10.0, -10.0, -10.0]]), torch.tensor([[10.0, 10.0, 10.0]])
    for _ in range(10):
        grid.refresh(_ball((-10.0, -10.0, -10.0), 5.0))
    assert bool(grid.contains(a)) and not bool(grid.contains(b))
    grid.refresh(_ball((10.0, 10.0, 10.0), 5.0))  # a new place is occupied at once ...
    assert bool(grid.contains(b)) and bool(grid.contains(a))  # ... and the old one is still kept
    for _ in range(15):  # 0.5^7 < 0.01: forgotten after a few more refreshes
        grid.refresh(_ball((10.0, 10.0, 10.0), 5.0))
    assert bool(grid.contains(b)) and not bool(grid.contains(a))


def test_occupancy_options_are_checked():
    with pytest.raises(ValueError, match="occupancy grid"):
        OccupancyGrid(16, threshold=1.5)


def _cryoformer(zdim: int = 0, box_size: int = 16, **kw):
    torch.manual_seed(0)
    dec = build_decoder("cryoformer", box_size=box_size, zdim=zdim, **{**SMALL, **kw})
    with torch.no_grad():
        dec.grid.tables.uniform_(-1, 1)
        dec.ffn[-1].bias.fill_(0.0)
    return dec


def test_pruned_density_equals_the_full_one_on_occupied_cells_and_is_zero_elsewhere():
    dec = _cryoformer()
    dec.occupancy.refresh(_ball((3.0, 0.0, -2.0), 4.0))  # an occupancy unrelated to the density
    world = (torch.rand(2, 500, 3, generator=torch.Generator().manual_seed(1)) - 0.5) * 16
    context = dec.image_context(None, 2).expand(2)
    keep = dec._queried(world)
    assert 0 < int(keep.sum()) < keep.numel() // 2
    full = dec._density_values(world, context) * keep
    pruned = dec.density(world, context)
    torch.testing.assert_close(pruned, full)
    pruned.sum().backward()  # the pruned path is differentiable through the kept points
    assert float(dec.grid.tables.grad.abs().sum()) > 0
    far = torch.full((1, 10, 3), -7.5)  # a chunk with no occupied point: zeros, the network not queried
    assert torch.equal(dec.density(far, dec.image_context(None, 1)), torch.zeros(1, 10))
    volume = dec.eval_volume()
    cells = dec.occupancy.cells(dec._grid_points(16, "cpu"))[0]
    assert float(volume.reshape(-1)[~dec.occupancy.occupied.reshape(-1)[cells]].abs().max()) == 0.0


def test_training_refreshes_the_grid_after_its_warm_up_and_old_weights_load_without_it():
    from cryoscape.data.training import fourier_pixels

    dec = _cryoformer(occupancy_warmup_steps=3, occupancy_every=2).train()
    R, pixels = torch.eye(3).expand(2, 3, 3), fourier_pixels(16)
    for step in range(1, 6):
        dec.predict_images(R, pixels, None, None)
        assert dec.occupancy.refreshed == (step >= 3) and int(dec.occupancy_steps) == step
    assert float(dec.state_dict()["occupancy.level"].max()) > 0
    before_prior = {k: v for k, v in dec.state_dict().items() if k != "occupancy.prior"}  # saved before the prior
    loaded = _cryoformer()
    loaded.load_state_dict(before_prior)
    assert bool(loaded.occupancy.prior.all()) and torch.equal(loaded.occupancy.level, dec.occupancy.level)
    old = {k: v for k, v in dec.state_dict().items() if not k.startswith("occupancy")}
    again = _cryoformer()
    again.load_state_dict(old)
    assert again.occupancy is None and again.config["occupancy"] is False
    torch.testing.assert_close(again.eval_volume(), _cryoformer(occupancy=False).eval_volume())


def test_a_data_parallel_refresh_keeps_the_grid_of_one_process_with_the_whole_batch():
    """Two processes, each with half of the batch's latents, gather the whole batch's latents
    (``process_gather_rows``) and draw the same points and cell-to-latent assignment (seeded by the
    step): the grid one process gets from all.  Each cell is queried once per refresh, at one latent."""
    kw = dict(zdim=1, deformation_init_scale=0.5, occupancy_warmup_steps=1, occupancy_every=1)
    z = torch.tensor([[-2.0], [2.0]])
    one, two = _cryoformer(**kw), _cryoformer(**kw)
    queried = []
    one.point_values = _counting(one.point_values, queried)
    with torch.no_grad():
        one._refresh_occupancy(z)
        two.process_gather_rows = lambda rows: torch.cat([rows, z[1:]])  # the second process's latents
        two._refresh_occupancy(z[:1])
    assert one.occupancy.refreshed and queried == [one.occupancy.resolution ** 3]
    torch.testing.assert_close(two.occupancy.level, one.occupancy.level)
    assert torch.equal(two.occupancy.occupied, one.occupancy.occupied)
    alone = _cryoformer(**kw)  # one process with only its own half differs
    with torch.no_grad():
        alone._refresh_occupancy(z[:1])
    assert not torch.allclose(alone.occupancy.level, one.occupancy.level)


def _counting(point_values, counts: list[int]):
    def wrapped(u, context, **kw):
        counts.append(u.shape[0] * u.shape[1])
        return point_values(u, context, **kw)
    return wrapped


def test_training_renders_half_the_lattice_until_the_grid_prunes():
    """``coarse_start=true``: while the occupancy grid has pruned nothing, training renders on half the lattice
    (an eighth of the points), so the pixels beyond a quarter of the band are predicted as 0; once the grid
    prunes, and in maps and evaluation, the full lattice."""
    from cryoscape.data.training import fourier_pixels

    dec = _cryoformer(box_size=32, coarse_start=True).train()
    assert dec.render_size == 32 and dec._training_render_size() == 16
    pixels = fourier_pixels(32)
    far = pixels.coords_index.square().sum(-1) >= 8 ** 2
    R = torch.eye(3).expand(2, 3, 3)
    with torch.no_grad():
        coarse = dec.predict_images(R, pixels, None, None)
        assert float(coarse[:, far].abs().max()) == 0.0 and float(coarse[:, ~far].abs().max()) > 0
        dec.occupancy.refresh(_ball((0.0, 0.0, 0.0), 6.0))  # the grid prunes: the full lattice from now on
        assert dec._training_render_size() == 32
        assert float(dec.predict_images(R, pixels, None, None)[:, far].abs().max()) > 0
    assert _cryoformer(box_size=32).train()._training_render_size() == 32  # off by default


def test_a_consensus_prior_is_held_until_the_models_map_has_a_shape_and_kept_after():
    """``set_prior``: the cells a consensus map occupies, by the rule dilated one cell further, held before the
    first refresh and by refreshes while the model's map has no shape (near-uniform); once it has one the
    model's cells are added to the prior's (``keep_prior``, default) or replace them; a consensus without
    shape leaves every cell occupied, and a prior of every cell is not kept (the grid still prunes)."""
    grid = OccupancyGrid(64, resolution=16)
    levels = torch.zeros(16, 16, 16)
    levels[6:10, 6:10, 6:10] = 1.0
    grid.set_prior(levels)
    # one cell more than a refresh from the same levels keeps
    refreshed = OccupancyGrid(64, resolution=16)
    refreshed.refresh(lambda world: levels.reshape(-1)[refreshed.cells(world)])
    expected = torch.nn.functional.max_pool3d(refreshed.occupied[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    assert expected.sum() > refreshed.occupied.sum() and bool(expected[4:12, 4:12, 4:12].all())
    assert not bool(expected[:2].any()) and not bool(expected[..., 14:].any())
    assert torch.equal(grid.prior, expected) and torch.equal(grid.occupied, expected) and grid.prunes
    uniform = 1.0 + 0.01 * torch.rand(16, 16, 16, generator=torch.Generator().manual_seed(0))
    grid.refresh(lambda world: uniform.reshape(-1)[grid.cells(world)])
    assert grid.refreshed and torch.equal(grid.occupied, expected)
    shaped = torch.zeros(16, 16, 16)
    shaped[2:6, 2:6, 2:6] = 1.0
    kept, moved = OccupancyGrid(64, resolution=16), OccupancyGrid(64, resolution=16, keep_prior=False)
    for g in (kept, moved):
        g.set_prior(levels)
        g.refresh(lambda world: shaped.reshape(-1)[g.cells(world)])
        assert bool(g.occupied[2:6, 2:6, 2:6].all())
    assert not bool(moved.occupied[9:].any()) and not bool(moved.occupied[expected].all())
    assert bool(kept.occupied[expected].all()) and kept.occupied.sum() > expected.sum()
    blank = OccupancyGrid(64, resolution=16)
    blank.set_prior(uniform)
    assert bool(blank.prior.all()) and not blank.prunes
    blank.refresh(lambda world: shaped.reshape(-1)[blank.cells(world)])
    assert blank.prunes and not bool(blank.occupied[12:].any())


def test_training_starts_the_grid_from_the_consensus_map_of_the_posed_data(tmp_path):
    """``train --decoder cryoformer`` on posed data: the warm start backprojects the images and the grid starts
    with the consensus's cells (a quarter of the box for the D=32 hinge), which hold all of the molecule's
    density in every conformation; the log says so.  Without the warm start the grid starts with every cell."""
    import mrcfile
    import numpy as np

    from cryoscape.cli.main import main
    from cryoscape.train.config import TrainConfig
    from cryoscape.train.loop import run_training
    from cryoscape.train.volumes import load_trained_model

    data = tmp_path / "hinge"
    assert main(["simulate", "-o", str(data), "-n", "64", "-D", "32", "--snr", "1", "--heterogeneity", "hinge",
                 "--seed", "0", "--oversampling", "1"]) == 0
    truth = np.load(data / "ground_truth.npz")
    truth = torch.tensor(np.max([mrcfile.read(data / f) for f in truth["volume_files"]], 0)).clamp_min(0)
    ax = torch.arange(32, dtype=torch.float32) - 16
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    voxels = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    shares = {}
    for name, images in (("prior", 20000), ("none", 0)):
        config = TrainConfig(particles=str(data / "particles.star"), decoder="cryoformer", zdim=1,
                             decoder_options=dict(SMALL), num_epochs=1, batch_size=8, progress=False,
                             warm_start_images=images, checkpoint_every=100, teacher_epochs=0)
        run_training(config, tmp_path / name)
        grid = load_trained_model(tmp_path / name)[0].occupancy
        kept = grid.prior.reshape(-1)[grid.cells(voxels)].reshape(32, 32, 32)
        shares[name] = float(grid.prior.float().mean())
        assert float((truth * kept).sum() / truth.sum()) > 0.9999
    assert 0.1 < shares["prior"] < 0.4 and shares["none"] == 1.0
    assert "the occupancy grid starts with" in (tmp_path / "prior" / "run.log").read_text()


def test_the_warm_start_names_the_whole_band_when_the_data_resolve_beyond_the_rendered_one():
    """The log's hint: a half-map FSC above 0.143 past ``render_size / 2`` shells (what a ``render_size^3``
    lattice predicts) names ``render_size=D`` and its cost; none when the FSC falls inside the band, when
    the whole band is rendered already, or for the Fourier-space variant (which has no lattice)."""
    def fsc(falls_at: int, shells: int = 17):
        return torch.where(torch.arange(shells) < falls_at, 0.9, 0.05)

    half = build_decoder("cryoformer", box_size=32, zdim=0, render_size=16, **SMALL)
    advice = half._band_advice(fsc(12))
    assert "resolve to shell 12" in advice and "render_size=32" in advice and "about 8x the points" in advice
    assert half._band_advice(fsc(8)) == ""  # shell 8 is the band's edge: |k| < 8 is rendered, 8 itself not used
    advice = build_decoder("cryoformer", box_size=64, zdim=0, **SMALL)._band_advice(fsc(26, 33))  # the 48^3 default
    assert "beyond the 48^3 lattice's band of 24" in advice and "about 2.4x the points" in advice  # (64 / 48)^3 = 2.37
    assert build_decoder("cryoformer", box_size=32, zdim=0, render_size=32, **SMALL)._band_advice(fsc(16)) == ""
    assert build_decoder("cryoformer", box_size=32, zdim=0, render_size=16, space="fourier",
                         **SMALL)._band_advice(fsc(12)) == ""


def test_beside_a_kept_prior_the_models_cells_count_from_the_median_cell():
    """Outside a kept consensus prior a cell joins only above ``threshold`` of the way from the median cell's
    level (the background's typical one) to the highest: a low-SNR map's noise patch, above the lowest cell's
    level but not the median's, stays out (a grid without a kept prior, counting from the lowest, takes it in),
    while density well above the background does join."""
    background = 0.4 * torch.rand(16, 16, 16, generator=torch.Generator().manual_seed(0))
    consensus = torch.zeros(16, 16, 16)
    consensus[6:10, 6:10, 6:10] = 1.0
    levels = background.clone()
    levels[6:10, 6:10, 6:10] = 1.0  # the molecule, inside the prior
    levels[1:4, 1:4, 1:4] = 0.33  # a noise patch far from it
    levels[12:15, 1:4, 12:15] = 0.9  # a part the consensus missed
    kept, not_kept = OccupancyGrid(64, resolution=16), OccupancyGrid(64, resolution=16, keep_prior=False)
    for g in (kept, not_kept):
        g.set_prior(consensus)
        g.refresh(lambda world, g=g: levels.reshape(-1)[g.cells(world)])
        assert bool(g.occupied[13, 2, 13]) and bool(g.occupied[7:9, 7:9, 7:9].all())
    assert bool(kept.occupied[kept.prior].all())
    assert bool(not_kept.occupied[2, 2, 2]) and not bool(kept.occupied[2, 2, 2])
    assert kept.occupied[:4, :4, :4].sum() == 0 and not_kept.occupied[:4, :4, :4].sum() > 20
