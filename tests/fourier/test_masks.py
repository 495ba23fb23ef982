"""Hard, soft and threshold masks of fourier/masks.py."""

import pytest
import torch

from cryoscape.fourier import grids
from cryoscape.fourier.masks import (
    circular_mask_2d,
    soft_circular_mask_2d,
    soft_spherical_mask_3d,
    spherical_mask_3d,
    threshold_mask,
)


@pytest.mark.parametrize("D", [15, 16])
def test_hard_masks_have_the_right_radius(D):
    c, r = D // 2, 5
    mask = circular_mask_2d(D, r)
    assert mask.dtype == torch.bool
    assert mask[c, c + r] and mask[c - r, c] and not mask[c, c + r + 1] and not mask[c + 4, c + 4]
    assert mask[c + 3, c + 4]  # distance exactly 5
    assert mask.sum().item() == (grids.radius_2d_index(D) <= r).sum().item()
    ball = spherical_mask_3d(D, r)
    assert ball[c, c, c + r] and ball[c + r, c, c] and not ball[c + r + 1, c, c] and not ball[c + 3, c + 3, c + 3]
    # The ball is centred at D//2: symmetric about it (within the box).
    assert torch.equal(ball[c - r : c + r + 1].flip(0), ball[c - r : c + r + 1])


@pytest.mark.parametrize("D", [21, 22])
def test_soft_edges_are_raised_cosines(D):
    c, r, w = D // 2, 4.0, 4.0
    soft = soft_circular_mask_2d(D, r, edge_width_pixel=w, dtype=torch.float64)
    row = soft[c, c:]
    assert row[:5].tolist() == [1.0] * 5  # inside the radius
    assert row[6].item() == pytest.approx(0.5)  # middle of the edge, r + w/2
    assert row[5].item() == pytest.approx(0.5 * (1 + 0.7071067811865476))  # a quarter into the edge
    assert row[8:].abs().max().item() == 0.0
    ball = soft_spherical_mask_3d(D, r, edge_width_pixel=w, dtype=torch.float64)
    assert ball[c, c, c + 6].item() == pytest.approx(0.5)
    assert ball[c + 6, c, c].item() == pytest.approx(0.5)
    assert ball[c, c, c].item() == 1.0 and ball[c + 8, c, c].item() == 0.0
    assert 0.0 <= ball.min().item() and ball.max().item() <= 1.0


@pytest.mark.parametrize("D", [23, 24])
def test_threshold_mask_contains_the_dilated_object(D):
    g = torch.Generator().manual_seed(0)
    r_obj, dilate, edge = 4.0, 3.0, 5.0
    radius = grids.radius_3d_index(D, dtype=torch.float64)
    volume = (radius <= r_obj).double() * 2.0 + 0.05 * torch.randn(D, D, D, generator=g, dtype=torch.float64)
    mask = threshold_mask(volume, dilate_pixel=dilate, edge_width_pixel=edge)
    assert mask.shape == volume.shape and mask.dtype == torch.float64
    assert 0.0 <= mask.min().item() and mask.max().item() <= 1.0
    # The object and everything within the dilation distance of it is fully inside (less up to
    # one voxel: the thresholded ball is discrete).
    assert (mask[radius <= r_obj + dilate - 0.9] == 1.0).all()
    # Far away it is zero; in between it falls off.
    assert (mask[radius >= r_obj + dilate + edge + 1.0] == 0.0).all()
    shell = (radius > r_obj + dilate + 1.0) & (radius < r_obj + dilate + edge - 1.0)
    assert ((mask[shell] > 0.0) & (mask[shell] < 1.0)).all()


def test_threshold_mask_explicit_threshold_and_float32():
    D = 20
    volume = torch.zeros(D, D, D)
    volume[10, 10, 10] = 1.0
    volume[10, 10, 14] = 0.1
    # Default threshold: half the 99.99th percentile (here 0.5 * 0.28) keeps only the bright voxel.
    default = threshold_mask(volume, dilate_pixel=1.0, edge_width_pixel=2.0)
    assert default.dtype == torch.float32
    assert default[10, 10, 14].item() == 0.0 and default[10, 10, 11].item() == 1.0
    low = threshold_mask(volume, threshold=0.05, dilate_pixel=1.0, edge_width_pixel=2.0)
    assert low[10, 10, 14].item() == 1.0 and low[10, 10, 15].item() == 1.0
    assert low[10, 10, 16].item() == pytest.approx(0.5)  # distance 2: middle of the edge
    # A threshold above every value gives an empty mask.
    assert threshold_mask(volume, threshold=5.0).abs().max().item() == 0.0
