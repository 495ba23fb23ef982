"""Warm start: what a decoder takes from the posed data before the first epoch.

With known poses the consensus map is one pass of backprojection away, and a voxel decoder trained
by Adam from zero needs many epochs to get there (Adam moves every voxel by about its learning rate
per step, however strong its gradient). A decoder that wants it (``wants_warm_start``) implements
the hook ``warm_start(slices)`` (the structural basis starts its mean map from the backprojection,
:meth:`cryoscape.models.basis.StructuralBasis.warm_start`; CryoFormer its occupancy grid's cells,
:meth:`cryoscape.models.cryoformer.CryoFormer.warm_start`; the atomic model its blob width and
amplitude) and receives an iterator over the data, in batches, as exactly what the loss compares the
model with: the slice frequencies ``R^T k`` (cycles per pixel), the observed coefficients with the
particle shift undone (the loss's units), the CTF and the likelihood's pixel weights
(:mod:`cryoscape.train.likelihood`). The training loop calls :func:`warm_start_decoder` in new runs
(not resumed or loaded ones) unless ``--warm-start-images 0``; pose refinement starts from the same
poses. The images used are a random subset of at most ``warm_start_images``. Like the noise-spectrum
estimate before it, this is set-up: logged with its own time ("warm start: ... in X s"), not counted
in the first epoch's time (bench/decoders.py and bench/cryoformer.py report it and the throughput
with it included).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from cryoscape.data.training import ParticleDataset, iterate_batches
from cryoscape.fourier.fsc import first_shell_below
from cryoscape.train.likelihood import centre_values, slice_points, to_domain

__all__ = ["warm_start_decoder", "posed_slices"]

log = logging.getLogger(__name__)


def warm_start_decoder(
    decoder,
    dataset: ParticleDataset,
    pixels,
    *,
    max_images: int,
    batch_size: int = 64,
    seed: int = 0,
    domain: str = "fourier",
    device: torch.device | str = "cpu",
) -> dict[str, Any] | None:
    """Call ``decoder.warm_start`` with up to ``max_images`` images of ``dataset`` (a random
    subset, fixed by ``seed``); ``None`` when the decoder does not want it or ``max_images < 2``.

    Returns the hook's summary plus ``seconds``.
    """
    if not decoder.wants_warm_start or max_images < 2:
        return None
    t0 = time.perf_counter()
    n = len(dataset)
    rng = np.random.default_rng(seed)
    order = np.sort(rng.permutation(n)[: min(n, int(max_images))]) if max_images < n else np.arange(n)
    slices = posed_slices(dataset, pixels, order, batch_size=batch_size, domain=domain, device=device)
    summary = dict(decoder.warm_start((c, t, ctf, w) for c, t, ctf, w, _ in slices) or {})
    summary["seconds"] = time.perf_counter() - t0
    fsc = summary.get("fsc_half")
    where = ""
    if fsc is not None:
        where = f"; half-map FSC falls below 0.5 at shell {first_shell_below(fsc, 0.5)} of {pixels.box_size // 2}"
    if summary.get("note"):
        where += f"; {summary['note']}"
    log.info("warm start: %d posed images in %.1f s%s",
             summary.get("n_images", len(order)), summary["seconds"], where)
    return summary


def posed_slices(dataset, pixels, order: np.ndarray, *, batch_size: int, domain: str, device):
    """Yield ``(coords, target, ctf, pixel_weights, indices)`` for the images ``order`` of
    ``dataset`` in batches: the slice frequencies ``R^T k``, the observed coefficients with the
    particle shift undone (the loss's units), the CTF, the likelihood's pixel weights and the
    batch's image indices (what the warm start and the refit read)."""
    D = pixels.box_size
    freqs = pixels.freqs_cycles_per_pixel
    for indices, batch in iterate_batches(lambda i: (i, dataset.get_batch(i)), order, batch_size):
        batch = batch.to(device)
        target = to_domain(centre_values(batch.values, pixels.coords_index, batch.shifts_pixel, D), domain)
        yield slice_points(batch.rotations, freqs), target, batch.ctf, pixels.weights, indices
