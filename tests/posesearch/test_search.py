"""Hierarchical pose search: recovers poses of noiseless images, scores exactly, is memory-bounded,
and behaves the same for Fourier/Hartley decoders and for the heterogeneous (per-image) path.

The images here are made from the decoder itself (``X = c V(R^T k) e^{+2 pi i k.t/D}``), so the
true pose has zero error and any miss is the search's fault.  The map is the built-in molecule as
an interpolated Fourier volume (:class:`VoxelMap`), an exact stand-in for a trained decoder; a
trained neural decoder is tested in tests/train/test_abinit.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoscape.data.training import fourier_pixels
from cryoscape.fourier.slicing import prepare_projection_volume, sample_trilinear, slice_coordinates
from cryoscape.geometry.rotations import random_rotations, rotation_angle_between
from cryoscape.geometry.so3_grid import so3_grid_resolution, so3_grid_rotations
from cryoscape.models.base import VolumeDecoder
from cryoscape.posesearch.search import SearchSettings, grid_rotations, half_plane_pixels, search_poses


class VoxelMap(VolumeDecoder):
    """A map's Fourier transform (2x padded, gridding-corrected) read by trilinear interpolation."""

    def __init__(self, volume: np.ndarray, domain: str = "fourier", zdim: int = 0):
        super().__init__(box_size=volume.shape[-1], zdim=zdim)
        self.domain = domain
        self.ft = prepare_projection_volume(torch.as_tensor(volume, dtype=torch.float64), oversampling=2)
        self.ft = (self.ft / self.ft.abs().max()).to(torch.complex64)
        self.Dp = self.ft.shape[0]

    def fourier(self, coords):
        return sample_trilinear(self.ft, coords.float() * self.Dp)

    def forward(self, coords, z=None):
        F = self.fourier(coords)
        return F.real - F.imag if self.domain == "hartley" else F

    def eval_volume(self, z=None, *, box_size=None):
        raise NotImplementedError


@pytest.fixture(scope="module")
def molecule_48():
    from cryoscape.simulate.ensembles import _render_hinge
    from cryoscape.simulate.molecule import default_pixel_size_angstrom

    px = default_pixel_size_angstrom(48)
    return _render_hinge(30.0, 48, px, 3 * px)


def make_images(decoder: VoxelMap, n: int, *, shift_max: float, seed: int, ctf: bool = False):
    D = decoder.box_size
    pix = fourier_pixels(D)
    gen = torch.Generator().manual_seed(seed)
    R = random_rotations(n, generator=gen)
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * shift_max
    Y = decoder.fourier(slice_coordinates(R, pix.freqs_cycles_per_pixel))
    c = None
    if ctf:  # a CTF-like oscillation with zeros, different per image
        r = pix.coords_index.norm(dim=-1) / D
        c = torch.cos(2 * math.pi * (3 + 4 * torch.rand(n, 1, generator=gen)) * r) * 0.9 + 0.1
        Y = Y * c
    angle = (t @ pix.coords_index.T) * (2 * math.pi / D)  # observed = centred e^{+2 pi i k.t / D}
    X = Y * torch.polar(torch.ones_like(angle), angle)
    return pix, X, c, R, t


FAST = dict(k_min=10, k_max=24, t_extent_pixel=3.0, t_n_per_axis=5)
# behaviour tests: a 30-degree base grid, 2 rounds, small bands (the numbers, not the accuracy, matter)
CHEAP = dict(base_level=0, n_refine=2, n_keep_base=8, k_min=8, k_max=12, t_extent_pixel=2.0, t_n_per_axis=3)


def angles_deg(A, B):
    return torch.rad2deg(rotation_angle_between(A.double(), B.double()))


def test_grid_rotations_match_the_so3_grid():
    gen = torch.Generator().manual_seed(0)
    for level in (0, 1, 3):
        nside, n_psi = so3_grid_resolution(level)
        ids = torch.stack([torch.randint(0, 12 * nside**2, (300,), generator=gen),
                           torch.randint(0, n_psi, (300,), generator=gen)], dim=-1)
        torch.testing.assert_close(grid_rotations(ids, level), so3_grid_rotations(ids, level), atol=1e-6, rtol=0)


def test_search_recovers_noiseless_poses_to_the_final_grid(molecule_48):
    """Median angle below the final grid spacing (0.94 deg), shifts within the final shift grid,
    and at most 1 image in 20 more than 5 degrees off (32 base candidates, see
    SearchSettings.n_keep_base; measured 1 of 48, at 5.1 degrees, with the CTF-like modulation)."""
    dec = VoxelMap(molecule_48)
    pix, X, c, R, t = make_images(dec, 24, shift_max=2.0, seed=1, ctf=True)
    settings = SearchSettings(**FAST)
    res = search_poses(dec, X, coords_index=pix.coords_index, weights=pix.weights, ctf=c, settings=settings,
                       return_candidates=True)
    ang = angles_deg(res.rotations, R)
    assert float(ang.median()) < settings.final_spacing_deg(), ang
    assert float((ang > 5).float().mean()) <= 0.05, ang
    shift_err = (res.shifts_pixel - t).norm(dim=-1)
    assert float(shift_err.median()) < settings.final_shift_spacing_pixel() * 1.5
    assert res.level == settings.base_level + settings.n_refine
    # candidates are sorted by error and the best one is the answer
    assert torch.all(res.candidate_errors[:, 1:] >= res.candidate_errors[:, :1])
    torch.testing.assert_close(res.candidate_rotations[:, 0], res.rotations)


def test_reported_error_is_the_squared_error_of_the_returned_pose(molecule_48):
    """The GEMM identity |A - B|^2 = |A|^2 + |B|^2 - 2 Re(A* B) with shifts applied to the image
    gives the same number as computing the residual directly (noisy images, CTF)."""
    dec = VoxelMap(molecule_48)
    pix, X, c, R, t = make_images(dec, 12, shift_max=2.0, seed=2, ctf=True)
    X = X + 0.05 * torch.randn(X.shape, generator=torch.Generator().manual_seed(3), dtype=torch.complex64)
    settings = SearchSettings(**CHEAP)
    res = search_poses(dec, X, coords_index=pix.coords_index, weights=pix.weights, ctf=c, settings=settings)
    D = dec.box_size
    band = pix.coords_index.norm(dim=-1) < settings.radius_at(settings.n_refine, D)
    k = pix.coords_index[band]
    model = dec.fourier(slice_coordinates(res.rotations, k / D)) * c[:, band]
    angle = (res.shifts_pixel @ k.T) * (-2 * math.pi / D)
    centred = X[:, band] * torch.polar(torch.ones_like(angle), angle)
    w = pix.weights[band]
    direct = ((model - centred).abs().square() * w).sum(-1) / w.sum()
    torch.testing.assert_close(res.errors, direct, rtol=2e-4, atol=1e-6)


def test_memory_bound_does_not_change_the_result(molecule_48):
    dec = VoxelMap(molecule_48)
    pix, X, c, R, t = make_images(dec, 10, shift_max=2.0, seed=4)
    big = search_poses(dec, X, coords_index=pix.coords_index, weights=pix.weights,
                       settings=SearchSettings(**CHEAP, max_elements=2**26))
    small = search_poses(dec, X, coords_index=pix.coords_index, weights=pix.weights,
                         settings=SearchSettings(**CHEAP, max_elements=5000), image_chunk=3)
    assert torch.equal(big.ids, small.ids)
    torch.testing.assert_close(big.shifts_pixel, small.shifts_pixel)
    torch.testing.assert_close(big.errors, small.errors, rtol=1e-4, atol=1e-6)


def test_hartley_decoder_and_whole_circle_pixels_give_the_same_poses(molecule_48):
    """A Hartley decoder searched on the whole circle (weights 1) equals a Fourier decoder on the
    half-plane (weights 2): the objective is the same number."""
    four = VoxelMap(molecule_48, "fourier")
    hart = VoxelMap(molecule_48, "hartley")
    pix, X, c, R, t = make_images(four, 8, shift_max=2.0, seed=5)
    settings = SearchSettings(**CHEAP)
    a = search_poses(four, X, coords_index=pix.coords_index, weights=pix.weights, settings=settings)
    full = fourier_pixels(four.box_size, domain="hartley")
    # the whole circle's values: the half-plane values and their conjugates at -k
    lookup = {tuple(k.tolist()): i for i, k in enumerate(pix.coords_index)}
    cols, conj = [], []
    for k in full.coords_index.tolist():
        if tuple(k) in lookup:
            cols.append(lookup[tuple(k)])
            conj.append(False)
        else:
            cols.append(lookup[(-k[0], -k[1])])
            conj.append(True)
    Xf = X[:, cols]
    Xf = torch.where(torch.tensor(conj), Xf.conj(), Xf)
    b = search_poses(hart, Xf, coords_index=full.coords_index, weights=full.weights, settings=settings)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.errors, b.errors, rtol=1e-3, atol=1e-6)
    mask, w = half_plane_pixels(full.coords_index)
    assert int(mask.sum()) == len(pix) and float(w.sum()) == float(pix.weights.sum())


@pytest.mark.parametrize("anchors", [None, 2])
def test_heterogeneous_path_matches_homogeneous_for_a_latent_free_map(molecule_48, anchors):
    """Per-image lattices (base grid) or latent-anchor lattices (base grid and first round), then
    direct slices at each image's latent (refinement), find the same poses as the shared lattice,
    for a decoder that takes a latent but ignores it."""

    class WithLatent(VoxelMap):
        latents_seen = 0

        def forward(self, coords, z=None):
            if z is not None:
                assert z.shape == (coords.shape[0], 2)
                WithLatent.latents_seen += z.shape[0]
            return super().forward(coords)

    dec = WithLatent(molecule_48, zdim=2)
    pix, X, c, R, t = make_images(dec, 3, shift_max=1.0, seed=6)
    settings = SearchSettings(**FAST, latent_anchors=anchors)
    hom = search_poses(dec, X, coords_index=pix.coords_index, weights=pix.weights, settings=settings)
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    het = search_poses(dec, X, coords_index=pix.coords_index, weights=pix.weights, settings=settings, z=z)
    assert WithLatent.latents_seen >= 3 * (settings.n_refine - 1)  # the late rounds used every image's latent
    ang = angles_deg(het.rotations, R)
    assert float(ang.max()) < 2 * settings.final_spacing_deg()
    assert float(angles_deg(het.rotations, hom.rotations).max()) < 2 * settings.final_spacing_deg()


@pytest.mark.parametrize("D", [33, 32])
def test_odd_and_even_boxes(D):
    """Odd and even boxes: the search recovers poses of a smooth asymmetric blob map."""
    x = torch.arange(D, dtype=torch.float64) - D // 2
    zz, yy, xx = torch.meshgrid(x, x, x, indexing="ij")
    vol = torch.zeros_like(xx)
    for cx, cy, cz, s in ((0, 0, 0, 4.0), (6, 1, -2, 2.5), (-3, 7, 2, 2.0), (1, -4, 6, 1.5)):
        vol += torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2) / (2 * s * s))
    dec = VoxelMap(vol.numpy())
    pix, X, c, R, t = make_images(dec, 8, shift_max=1.5, seed=7)
    res = search_poses(dec, X, coords_index=pix.coords_index, weights=pix.weights,
                       settings=SearchSettings(k_min=6, k_max=12, t_extent_pixel=2.0, t_n_per_axis=5))
    ang = angles_deg(res.rotations, R)
    assert float(ang.median()) < 1.5, ang
    assert float((res.shifts_pixel - t).norm(dim=-1).median()) < 0.2
