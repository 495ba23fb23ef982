"""Where each batch's poses come from: one :class:`PoseSource` per way of knowing them.

* :class:`KnownPoses` -- the particle table's poses (``cryoscape train``), optionally refined by
  gradient descent (:class:`~cryoscape.train.poses.PoseCorrections`, ``--refine-poses``);
* :class:`SearchedPoses` -- poses found by hierarchical search with the current model, chunk by
  chunk in the epochs the schedule marks as searches, reused in the others (``cryoscape abinit``);
* :class:`RandomPoses` -- uniformly random rotations and zero shifts (ab initio's warm-up).

The trainer asks a source the same questions whatever it is: how many batches make one chunk
(:meth:`PoseSource.batches_per_chunk`), to prepare a chunk before training on it
(:meth:`~PoseSource.prepare`: a search), the poses of a batch (:meth:`~PoseSource.poses`,
differentiable when refined), its optimisers, what to write after an epoch, and its checkpoint
entries.  An encoder that predicts poses is one more implementation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.data.training import TrainingBatch
from cryoscape.errors import InputError
from cryoscape.geometry.rotations import random_rotations, rotation_angle_between
from cryoscape.posesearch.lattice import evaluate_lattice
from cryoscape.posesearch.search import half_plane_pixels, search_poses
from cryoscape.train.distributed import Distributed
from cryoscape.train.outputs import write_poses, write_star
from cryoscape.train.poses import PoseCorrections

__all__ = ["PoseSource", "KnownPoses", "SearchedPoses", "RandomPoses", "Shard", "concat_batches"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's rows (``rows``, positions) of a global batch of ``size`` images."""

    size: int
    rows: torch.Tensor

    @property
    def share(self) -> float:
        """The fraction of the global batch's images held here."""
        return len(self.rows) / max(1, self.size)


class PoseSource:
    """Base class: poses stored in the batches themselves, nothing to prepare, save or write."""

    #: seconds the run had taken before it was resumed (the clock of the poses' ``wall_seconds``)
    wall_offset: float = 0.0
    #: the run's wall clock in seconds, set by the trainer
    clock = None

    def setup(self, device: torch.device) -> None:
        """Build learnable state on ``device`` (called once the model is built, before a checkpoint loads)."""

    def attach(self, pixels, device: torch.device) -> None:
        """Called once the training pixels (with the likelihood's weights) are known."""

    def set_lr(self, lr: float) -> None:
        """The pose learning rate given now wins over the saved one (resume)."""

    def final_poses(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(rotations, shifts)`` of every particle as float64 arrays, when this source found them."""
        return None, None

    def posed_table(self):
        """The particle table with the poses this source found so far (a latent teacher trains on them,
        train/teacher.py), or ``None`` when it found none (the table's own poses are the caller's)."""
        return None

    def batches_per_chunk(self, plan) -> int:
        """Batches trained after one :meth:`prepare` (1: prepare every batch)."""
        return 1

    def prepare(self, chunk: list[TrainingBatch], model, plan, epoch: int) -> None:
        """Get the poses of the images of ``chunk`` ready (e.g. search them) before training on it."""

    def poses(self, batch: TrainingBatch, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, 3)`` rotations and ``(B, 2)`` shifts (pixels) of the batch's images."""
        return batch.rotations, batch.shifts_pixel

    def has_poses(self) -> bool:
        """Whether the poses are good enough to backproject (a decoder's warm start)."""
        return True

    def posed(self, batch: TrainingBatch) -> TrainingBatch:
        """``batch`` with its current poses (no gradient), e.g. for the warm start."""
        return batch

    def optimizers(self, epoch: int) -> list:
        """Optimisers to step after the model's in ``epoch``."""
        return []

    def all_optimizers(self) -> list:
        return []

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def begin_epoch(self, epoch: int, plan) -> None:
        """Called before an epoch's first chunk (also when resuming inside it)."""

    def epoch_record(self) -> dict[str, float]:
        """Figures of the epoch for the history (e.g. the median pose change of a search)."""
        return {}

    def write(self, out: Path, epoch: int, *, keep: bool, last: bool) -> None:
        """Write the poses after ``epoch`` (``keep``: weights are saved too; ``last``: the last epoch)."""

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entries."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` entries of a checkpoint."""

    def partial_state(self) -> dict[str, Any]:
        """Extra state of an epoch in progress (a mid-epoch checkpoint)."""
        return {}

    def load_partial_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`partial_state`."""


class KnownPoses(PoseSource):
    """The table's poses; with ``refine`` learnt corrections (``--refine-poses``) from ``start_epoch``,
    at ``lr * lr_decay ** (epoch - start_epoch)`` in each epoch."""

    def __init__(self, dataset, *, refine: bool = False, representation: str = "axis_angle",
                 refine_shifts: bool = True, lr: float = 3e-3, lr_decay: float = 1.0, start_epoch: int = 1):
        self.dataset = dataset
        self.refine, self.representation, self.refine_shifts, self.lr = refine, representation, refine_shifts, lr
        self.lr_decay = float(lr_decay)
        self.corrections = None
        self.optimizer = None
        self.start_epoch = int(start_epoch)

    def setup(self, device: torch.device) -> None:
        if self.refine:
            self.corrections = PoseCorrections(self.dataset.rotations, representation=self.representation,
                                               refine_shifts=self.refine_shifts).to(device)
            self.optimizer = torch.optim.SparseAdam(self._groups(self.lr), lr=self.lr)

    def _groups(self, lr: float) -> list[dict[str, Any]]:
        """Rotation corrections at ``lr`` (radians per step); shifts at ``lr * D / 4`` pixels.

        A rotation by ``a`` radians moves the edge of a particle of radius ``~D/4`` by ``a * D / 4``
        pixels, so the two learning rates move the image by comparable amounts.
        """
        groups = [{"params": [self.corrections.rotation.weight], "lr": lr}]
        if self.corrections.shift is not None:
            groups.append({"params": [self.corrections.shift.weight], "lr": lr * self.dataset.box_size / 4})
        return groups

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        self._apply_lr(lr)

    def _apply_lr(self, lr: float) -> None:
        if self.optimizer is not None:
            for group, fresh in zip(self.optimizer.param_groups, self._groups(lr)):
                group["lr"] = fresh["lr"]

    def begin_epoch(self, epoch: int, plan) -> None:
        self._apply_lr(self.lr * self.lr_decay ** max(0, epoch - self.start_epoch))

    def poses(self, batch: TrainingBatch, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        if self.corrections is None:
            return batch.rotations, batch.shifts_pixel
        return self.corrections(batch.indices, batch.rotations, batch.shifts_pixel)

    def optimizers(self, epoch: int) -> list:
        return [self.optimizer] if self.optimizer is not None and epoch >= self.start_epoch else []

    def all_optimizers(self) -> list:
        return [] if self.optimizer is None else [self.optimizer]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.corrections is None else list(self.corrections.parameters())

    def write(self, out: Path, epoch: int, *, keep: bool, last: bool) -> None:
        if self.corrections is not None and keep:
            from cryoscape.io.cryodrgn import write_poses_pkl

            R, t = self.corrections.corrected(self.dataset.rotations, self.dataset.shifts_pixel)
            write_poses_pkl(out / f"poses.{epoch}.pkl", R, t, box_size=self.dataset.box_size)

    def state_dict(self) -> dict[str, Any]:
        c = self.corrections
        return {
            "poses": None if c is None else {"representation": c.representation, "refine_shifts": c.refine_shifts,
                                             "state": c.state_dict()},
            "pose_optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            if self.corrections is not None and state.get("poses") is not None:
                self.corrections.load_state_dict(state["poses"]["state"])
            if self.optimizer is not None and state.get("pose_optimizer") is not None:
                self.optimizer.load_state_dict(state["pose_optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise InputError(f"the checkpoint's pose corrections do not fit these particles ({err}); "
                             "resume with the particles and --refine-poses options of the run that wrote it.") from None


class RandomPoses(PoseSource):
    """Uniformly random rotations (drawn from ``generator`` for each global batch) and zero shifts."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def poses(self, batch: TrainingBatch, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        R = random_rotations(shard.size, generator=self.generator)
        if len(shard.rows) != shard.size:
            R = R[shard.rows]
        dev = batch.values.device
        return R.to(dev), torch.zeros(len(R), 2, device=dev)

    def has_poses(self) -> bool:
        return False


class SearchedPoses(PoseSource):
    """Poses searched with the current model in the schedule's search epochs, reused in the others.

    Holds every particle's rotation, shift, search error and the epoch of its last search; they
    are written after every epoch (``poses.E.npz``, ``poses.E.pkl``; ``particles.star`` after the
    last) and saved in checkpoints (the ``abinit`` entry).
    """

    def __init__(self, table, *, n_particles: int, box_size: int, seed: int, dist: Distributed):
        N = int(n_particles)
        self.table, self.box_size, self.dist = table, int(box_size), dist
        self.rotations = random_rotations(N, generator=torch.Generator().manual_seed(seed + 17))
        self.shifts = torch.zeros(N, 2)
        self.errors = torch.full((N,), float("nan"))
        self.searched_epoch = torch.full((N,), -1, dtype=torch.int64)
        self._previous = None
        self.search_seconds = 0.0

    def attach(self, pixels, device: torch.device) -> None:
        self.device = device
        # the search scores poses with the loss's likelihood on the half-plane (Hartley sets hold the circle)
        if pixels.domain == "hartley":
            self.half_mask, half_w = half_plane_pixels(pixels.coords_index)
            self.coords = pixels.coords_index[self.half_mask]
            self.weights = pixels.weights[self.half_mask] * half_w.to(pixels.weights.device)
        else:
            self.half_mask, self.coords, self.weights = None, pixels.coords_index, pixels.weights

    def final_poses(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        return self.rotations.double().numpy(), self.shifts.double().numpy()

    def posed_table(self):
        if not self.has_poses():
            return None
        rotations, shifts = self.final_poses()
        return dataclasses.replace(self.table, rotations=rotations, shifts_pixel=shifts)

    def batches_per_chunk(self, plan) -> int:
        return max(1, plan.search_images // plan.batch_size) if plan.search is not None else 1

    def poses(self, batch: TrainingBatch, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        dev = batch.values.device
        return self.rotations[batch.indices].to(dev), self.shifts[batch.indices].to(dev)

    def posed(self, batch: TrainingBatch) -> TrainingBatch:
        idx = batch.indices
        dev = batch.values.device
        return dataclasses.replace(batch, rotations=self.rotations[idx].to(dev), shifts_pixel=self.shifts[idx].to(dev))

    def has_poses(self) -> bool:
        return bool((self.searched_epoch >= 0).any())

    def begin_epoch(self, epoch: int, plan) -> None:
        self._previous = self.rotations.clone() if plan.search is not None else None
        self.search_seconds = 0.0

    def prepare(self, chunk: list[TrainingBatch], model, plan, epoch: int) -> None:
        if plan.search is None:
            return
        t0 = time.perf_counter()
        local = [b for b in chunk if b is not None]
        if local:
            batch = concat_batches(local)
            result = self._search(batch, model, plan.search)
            idx = batch.indices
            found = (idx, result.rotations.float().cpu(), result.shifts_pixel.float().cpu(),
                     result.errors.float().cpu())
        else:
            found = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3, 3), torch.zeros(0, 2), torch.zeros(0))
        idx, R, t, err = self.dist.gather_rows(*found)
        self.rotations[idx], self.shifts[idx], self.errors[idx] = R, t, err
        self.searched_epoch[idx] = epoch
        self.search_seconds += time.perf_counter() - t0

    def _search(self, batch: TrainingBatch, model, settings):
        values = batch.values.to(self.device)
        ctf = None if batch.ctf is None else batch.ctf.to(self.device)
        if self.half_mask is not None:
            values = values[:, self.half_mask]
            ctf = None if ctf is None else ctf[:, self.half_mask]
        z = lattice = None
        was_training = model.decoder.training
        model.train(False)
        try:
            with torch.no_grad():
                if model.encoder is not None:
                    mu, _ = model.encoder(batch.images.to(self.device))
                    z = mu.float()
                else:
                    lattice = evaluate_lattice(model.decoder, radius_index=settings.radius_at(settings.n_refine,
                                                                                              self.box_size),
                                               oversampling=settings.oversampling, amp=settings.amp)
                return search_poses(model.decoder, values, coords_index=self.coords, weights=self.weights, ctf=ctf,
                                    z=z, settings=settings, lattice=lattice)
        finally:
            model.train(was_training)

    def epoch_record(self) -> dict[str, float]:
        if self._previous is None:
            return {"search_seconds": 0.0}
        moved = torch.rad2deg(rotation_angle_between(self._previous.double(), self.rotations.double()))
        return {"search_seconds": self.search_seconds, "median_pose_change_deg": float(moved.median()),
                "mean_search_error": float(self.errors.mean())}

    def write(self, out: Path, epoch: int, *, keep: bool, last: bool) -> None:
        wall = self.clock() if self.clock is not None else 0.0
        write_poses(out, epoch, self.rotations, self.shifts, self.errors, self.searched_epoch, self.box_size, wall)
        if last:
            write_star(out, self.table, self.rotations, self.shifts)

    def state_dict(self) -> dict[str, Any]:
        wall = self.clock() if self.clock is not None else 0.0
        return {"abinit": {"rotations": self.rotations.clone(), "shifts_pixel": self.shifts.clone(),
                           "search_error": self.errors.clone(), "searched_epoch": self.searched_epoch.clone(),
                           "wall_seconds": wall}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("abinit")
        if saved is None:
            raise InputError("the checkpoint was not written by cryoscape abinit (it holds no poses); "
                             "continue it with cryoscape train --resume instead.")
        self.rotations = torch.as_tensor(saved["rotations"], dtype=torch.float32)
        self.shifts = torch.as_tensor(saved["shifts_pixel"], dtype=torch.float32)
        self.errors = torch.as_tensor(saved["search_error"], dtype=torch.float32)
        self.searched_epoch = torch.as_tensor(saved["searched_epoch"], dtype=torch.int64)
        self.wall_offset = float(saved.get("wall_seconds", 0.0))

    def partial_state(self) -> dict[str, Any]:
        return {"previous_rotations": self._previous, "search_seconds": self.search_seconds}

    def load_partial_state(self, state: dict[str, Any]) -> None:
        self._previous = state.get("previous_rotations")
        self.search_seconds = float(state.get("search_seconds", 0.0))


def concat_batches(batches: list[TrainingBatch]) -> TrainingBatch:
    """One batch of the images of several (CTF ``None`` stays ``None``)."""
    def cat(parts):
        parts = list(parts)
        return None if parts[0] is None else torch.cat(parts)

    return TrainingBatch(indices=cat(b.indices for b in batches), images=cat(b.images for b in batches),
                         values=cat(b.values for b in batches), rotations=cat(b.rotations for b in batches),
                         shifts_pixel=cat(b.shifts_pixel for b in batches), ctf=cat(b.ctf for b in batches))
