"""A low-pass consensus map from posed slices: what a decoder may start from before training.

With known poses the consensus map is one pass of backprojection away.  A decoder's warm start
(:meth:`~cryoscape.models.base.VolumeDecoder.warm_start`, driven by ``train/warm_start.py``) receives the
data as the loss sees it: per batch the slice frequencies ``R^T k`` ``(B, P, 3)`` (cycles per pixel),
the observed coefficients ``(B, P)`` (Fourier: complex, half-plane pixels; Hartley: real, the whole
circle) with the particle shifts undone, the CTF ``(B, P)`` and the pixel weights ``(P,)``.

:func:`lowpass_backprojection` inserts the frequencies up to ``L = band_index`` (cycles per box) into
the centred cube ``[-L-1, L+1]^3`` of integer frequencies (trilinear weights on the 8 corners, the
transpose of the slice's interpolation; a Fourier half-plane pixel also at its Friedel mate), in two
half-sets of alternating images, and solves the per-shell Wiener
estimate ``sum w c X / (sum w c^2 + <sum w c^2>_shell / SSNR_shell)`` with the SSNR from the half-map
FSC (as the structural basis's warm start and RELION's reconstruction).  Cheap (a ``(2L + 3)^3``
cube), coarse on purpose: CryoFormer reads its occupancy grid's first cells from it
(:meth:`cryoscape.models.cryoformer.CryoFormer.warm_start`), where a cell is a few pixels wide.
"""

from __future__ import annotations

import torch
from torch import nn

from cryoscape.fourier.fft import ifft3_center, iht3_center
from cryoscape.fourier.grids import shell_index_3d
from cryoscape.models.subspace_fit import ssnr_from_halves

__all__ = ["lowpass_backprojection", "cell_maxima"]


def lowpass_backprojection(slices, box_size: int, band_index: int, *, domain: str = "fourier",
                           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """The Wiener-filtered consensus map of ``slices`` below ``band_index`` cycles per box.

    Returns ``(map, fsc, n_images)``: ``map`` ``(n, n, n)`` ``[z, y, x]`` real, ``n = 2 L + 3``, sampling
    the (periodic) box every ``box_size / n`` pixels with the origin at index ``n // 2``; ``fsc``
    ``(L + 1,)`` the half-maps' FSC per integer shell.
    """
    L = max(1, int(band_index))
    n = 2 * L + 3
    fourier = domain == "fourier"
    # per half-set and voxel, real columns (accumulated with index_add_ on any device): the numerator
    # sum w c X (real and imaginary parts, or the Hartley value) and the weight sum w c^2
    sums = torch.zeros(2 * n ** 3, 3 if fourier else 2, dtype=torch.float64, device=device)
    n_images = 0
    for coords, target, ctf, pixel_weights in slices:
        index = coords.to(device, torch.float64) * box_size
        keep = index[0].norm(dim=-1) <= L  # |R^T k| = |k|: the same pixels in every image
        index, target = index[:, keep], target.to(device)[:, keep]
        c = torch.ones(target.shape, dtype=torch.float64, device=device) if ctf is None else \
            ctf.to(device, torch.float64)[:, keep]
        w = pixel_weights.to(device, torch.float64)[keep]
        data = torch.view_as_real(target.to(torch.complex128)) if fourier else target.to(torch.float64)[..., None]
        columns = torch.cat([data * (c * w)[..., None], (c.square() * w)[..., None]], -1)  # (B, P, C)
        half = ((torch.arange(target.shape[0], device=device) + n_images) % 2 * n ** 3)[:, None]
        mates = ((index, columns),)
        if fourier:  # a half-plane pixel also stands for its Friedel mate: -k, the conjugate value
            mates += ((-index, columns * columns.new_tensor([1.0, -1.0, 1.0])),)
        for points, values in mates:
            for flat, corner in _corners(points, L + 1):
                rows = (values * corner[..., None]).reshape(-1, values.shape[-1])
                sums.index_add_(0, (flat + half).reshape(-1), rows)
        n_images += int(target.shape[0])
    if n_images < 2:
        raise ValueError("a consensus map needs at least two images")
    sums = sums.reshape(2, n ** 3, -1)
    num = torch.complex(sums[..., 0], sums[..., 1]) if fourier else sums[..., 0]
    wsum = sums[..., -1]
    shells = shell_index_3d(n, device=num.device).clamp(max=L + 1).reshape(-1)  # L + 1: beyond the band
    fsc, ssnr = _halves_fsc(num, wsum, shells, L)
    return _wiener(num.sum(0), wsum.sum(0), ssnr, shells, L, domain), fsc, n_images


def _corners(points: torch.Tensor, M: int):
    """Yield ``(flat index, trilinear weight)`` ``(...)`` of the 8 corners of ``points`` ``(..., 3)`` (x, y, z;
    within ``M - 1`` of the origin) in the cube ``[-M, M]^3``, flattened ``[z, y, x]``."""
    base = points.floor()
    frac = points - base
    q = base.long() + M
    n = 2 * M + 1
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                weight = ((frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1])
                          * (frac[..., 2] if dz else 1 - frac[..., 2]))
                yield ((q[..., 2] + dz) * n + q[..., 1] + dy) * n + q[..., 0] + dx, weight


def _halves_fsc(num: torch.Tensor, wsum: torch.Tensor, shells: torch.Tensor,
                L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fsc, ssnr)`` per shell ``0..L`` of the two half-sets' gridding estimates."""
    halves = torch.where(wsum > 0, num / wsum.clamp_min(1e-30), torch.zeros_like(num))
    fsc, ssnr = ssnr_from_halves(halves[0].unsqueeze(-1), halves[1].unsqueeze(-1), shells, L + 2)
    return fsc[: L + 1, 0], ssnr[: L + 1, 0]


def _wiener(total_n: torch.Tensor, total_w: torch.Tensor, ssnr: torch.Tensor, shells: torch.Tensor, L: int,
            domain: str) -> torch.Tensor:
    """The real map of the full set's per-shell Wiener estimate (0 beyond the band, shell ``L + 1``)."""
    counts = torch.bincount(shells, minlength=L + 2).double()
    mean_w = torch.bincount(shells, weights=total_w, minlength=L + 2) / counts.clamp_min(1)
    reg = torch.cat([mean_w[: L + 1] / ssnr, mean_w.new_full((1,), float("inf"))])[shells]
    cube = (total_n / (total_w + reg).clamp_min(1e-30)).reshape(2 * L + 3, 2 * L + 3, 2 * L + 3)
    volume = ifft3_center(cube).real if domain == "fourier" else iht3_center(cube)
    return volume.float()


def cell_maxima(volume: torch.Tensor, box_size: int, resolution: int) -> torch.Tensor:
    """The maximum of a map ``(n, n, n)`` (as :func:`lowpass_backprojection` returns) over each of the
    ``resolution^3`` cells of the box ``[-D/2, D/2)^3``: trilinear samples at 2 points per cell along
    each axis, the larger of each cell's 8."""
    n, r = volume.shape[-1], int(resolution)
    world = (torch.arange(2 * r, device=volume.device, dtype=torch.float32) + 0.5) / (2 * r) - 0.5  # box fractions
    u = (world * n + n // 2) / (n - 1) * 2 - 1  # grid_sample's [-1, 1] with align_corners
    zz, yy, xx = torch.meshgrid(u, u, u, indexing="ij")
    grid = torch.stack([xx, yy, zz], -1)[None]
    samples = nn.functional.grid_sample(volume[None, None].float(), grid, mode="bilinear", align_corners=True,
                                        padding_mode="border")
    return nn.functional.max_pool3d(samples, 2)[0, 0]
