"""One training engine: ``Trainer(config, data, poses, schedule, out).fit()``.

The epoch loop is the same for every run; what differs is a strategy object:

* the :class:`~cryoscape.train.schedule.Schedule` says what each epoch is (which model, band,
  whether to search poses, resets): ``ConstantSchedule`` for ``train``, ``AbinitSchedule`` for
  ``abinit``;
* the :class:`~cryoscape.train.pose_sources.PoseSource` gives every batch its poses (known and
  optionally refined, searched, random);
* the loss (:mod:`cryoscape.train.objective`) is one image's or a tilt pair's.

Determinism and resuming
------------------------
Each epoch visits the particles in an order that depends only on ``(seed, epoch)``
(:func:`cryoscape.data.training.epoch_order`) and draws the VAE's reparameterisation noise from a
generator seeded by ``(seed, epoch)``.  The checkpoint written after every epoch holds the model,
optimiser, pose and generator states, so a run interrupted after epoch ``e`` and resumed gives the
same weights and latents, bit for bit on the CPU, as one that never stopped.  With
``checkpoint_minutes`` a checkpoint is also written inside epochs (``checkpoint.partial.pt``: the
same plus the epoch's position, its loss sums and latents so far, and the noise generator), so an
epoch of a million particles loses at most that many minutes; resuming from it continues the
epoch where it stopped and gives the same result as an uninterrupted run.  Every file is replaced
atomically, so ``kill -9`` at any moment leaves a run that resumes.

Processes
---------
Under ``torchrun`` every process runs this same loop on its share of every batch
(:mod:`cryoscape.train.distributed`); process 0 alone writes files.  A checkpoint holds no
per-process state, so a run resumes with any number of processes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.data.training import FourierPixels, TrainingBatch, epoch_order, iterate_batches
from cryoscape.errors import InputError
from cryoscape.models.precision import amp_dtype, resolve_amp
from cryoscape.train.checkpoint import (
    CHECKPOINT_NAME,
    PARTIAL_CHECKPOINT_NAME,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
    weights_path,
)
from cryoscape.train.distributed import Distributed
from cryoscape.train.inputs import TrainingData, likelihood_pixels
from cryoscape.train.latent_search import LatentSearch, first_search_epoch
from cryoscape.train.model import Model, resolve_device
from cryoscape.train.objective import ImageLoss, TiltPairLoss, tilt_rotation
from cryoscape.train.outputs import format_seconds, plot_losses, write_epoch_map, write_latents, write_run_config
from cryoscape.train.pose_sources import PoseSource, RandomPoses, Shard
from cryoscape.train.refit import refine_latents, refit_decoder, sampled_latents
from cryoscape.train.schedule import EpochPlan, Schedule
from cryoscape.train.teacher import copy_encoder, teacher_epochs_for, train_teacher
from cryoscape.train.warm_start import warm_start_decoder

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "RunContext", "band_pixels", "epoch_generator"]

log = logging.getLogger(__name__)

_STEPS_PER_EPOCH_IN_PLOT = 50
_PLOT_INTERVAL_SECONDS = 60.0


class TrainingDiverged(InputError):
    """The loss became NaN or infinite; the message says which checkpoint is intact and what to do."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns (everything is also in the run folder)."""

    out_dir: Path
    epochs_done: int
    history: list[dict[str, float]]
    decoder: torch.nn.Module
    encoder: torch.nn.Module | None
    normalization: Any
    z_mean: np.ndarray | None
    z_logvar: np.ndarray | None
    rotations: np.ndarray | None = None  # (N, 3, 3) poses found (ab initio)
    shifts_pixel: np.ndarray | None = None  # (N, 2)


def band_pixels(pixels: FourierPixels, radius: float | None) -> tuple[FourierPixels, torch.Tensor | None]:
    """The training pixels with ``|k| < radius`` and the mask that selects them (``None``: all)."""
    if radius is None or radius >= pixels.box_size / 2.0:
        return pixels, None
    mask = pixels.coords_index.square().sum(-1) < radius * radius
    sub = FourierPixels(
        box_size=pixels.box_size, domain=pixels.domain, coords_index=pixels.coords_index[mask],
        rfft_index=pixels.rfft_index[mask], conjugate=pixels.conjugate[mask], weights=pixels.weights[mask],
        # the error is the mean over the band, and the KL is weighed against the band's pixels
        n_circle=max(1, int(round(float(pixels.weights[mask].sum())))),
    )
    return sub, mask


def _restrict(batch: TrainingBatch, mask: torch.Tensor | None) -> TrainingBatch:
    if mask is None:
        return batch
    return dataclasses.replace(batch, values=batch.values[:, mask], ctf=None if batch.ctf is None else batch.ctf[:, mask])


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of an epoch's reparameterisation noise (from ``(seed, epoch)`` only)."""
    value = int(np.random.SeedSequence([int(seed), int(epoch), 0x5A]).generate_state(1, dtype=np.uint64)[0] >> 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(value)
    return gen


@dataclass
class EpochProgress:
    """The running state of an epoch: how far it got, its loss sums and latents so far."""

    epoch: int
    n_particles: int
    zdim: int
    device: torch.device
    batches_done: int = 0  # global batches
    images_done: int = 0  # global images
    seen: int = 0  # this process's images
    seconds_before: float = 0.0  # time spent in this epoch before a resume
    started: float = field(default_factory=time.perf_counter)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, error, kl x images
        self.window = torch.zeros((), dtype=torch.float64, device=self.device)
        self.window_n = 0
        self.z_mean = self.z_logvar = None
        if self.zdim > 0:
            self.z_mean = np.zeros((self.n_particles, self.zdim), dtype=np.float32)
            self.z_logvar = np.zeros((self.n_particles, self.zdim), dtype=np.float32)

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def state(self, dist: Distributed) -> dict[str, Any]:
        """Everything needed to continue the epoch, summed over processes."""
        return {
            "epoch": self.epoch, "batches_done": self.batches_done, "images_done": self.images_done,
            "seen": int(dist.sum_(torch.tensor([self.seen]))[0]), "seconds": self.seconds,
            "sums": dist.sum_(self.sums.clone()).cpu(),
            "z_mean": None if self.z_mean is None else dist.sum_array(self.z_mean),
            "z_logvar": None if self.z_logvar is None else dist.sum_array(self.z_logvar),
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def restore(self, state: dict[str, Any], dist: Distributed) -> None:
        """Continue from :meth:`state`; the sums and latents so far go to process 0 only."""
        self.batches_done, self.images_done = int(state["batches_done"]), int(state["images_done"])
        self.seconds_before = float(state["seconds"])
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        if dist.is_main:
            self.seen = int(state["seen"])
            self.sums += torch.as_tensor(state["sums"], dtype=torch.float64).to(self.device)
            if self.z_mean is not None and state.get("z_mean") is not None:
                self.z_mean[:] = state["z_mean"]
                self.z_logvar[:] = state["z_logvar"]


def remaining_seconds(history: list[dict[str, Any]], kinds: list[str]) -> float:
    """Seconds that epochs of ``kinds`` (their plans' kinds) will take: each at the mean time of the
    finished epochs of its kind (of all epochs where none was), since ab initio's search, reuse and
    final epochs differ in cost tenfold and more."""
    by_kind: dict[str, list[float]] = {}
    for record in history:
        by_kind.setdefault(record.get("kind", "train"), []).append(float(record["seconds"]))  # older runs: none
    every = [t for times in by_kind.values() for t in times]
    overall = sum(every) / max(1, len(every))
    return sum(sum(by_kind[k]) / len(by_kind[k]) if k in by_kind else overall for k in kinds)


class Trainer:
    """Train a model on ``data`` with poses from ``poses`` epoch by epoch as ``schedule`` says.

    Parameters
    ----------
    config
        The run's options (:class:`~cryoscape.train.config.TrainConfig` or a subclass), with the
        schedule's lengths already fixed (:meth:`Schedule.fixed`).
    data
        :class:`~cryoscape.train.inputs.TrainingData` (normalisation fitted or restored).
    poses, schedule
        The strategies (module docstring).
    out_dir
        The run folder.
    command
        ``train`` or ``abinit``: recorded in config.yaml.
    resume_state
        A checkpoint dict to start from (``--resume``, ``--load``, or a mid-epoch checkpoint).
    continue_run
        Resuming in the same folder: keep its loss history.
    """

    def __init__(self, config, data: TrainingData, poses: PoseSource, schedule: Schedule, out_dir: str | Path, *,
                 command: str = "train", arguments: dict[str, Any] | None = None,
                 resume_state: dict[str, Any] | None = None, continue_run: bool = False,
                 dist: Distributed | None = None):
        self.config, self.data, self.poses, self.schedule = config, data, poses, schedule
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dist = dist or Distributed()
        if self.dist.enabled:  # one process writes the float16 cache, the others then read it
            if self.dist.is_main:
                data.prepare_cache()
            self.dist.barrier()
        self.device = self.dist.device(config.device) or resolve_device(config.device)
        self.command, self.arguments = command, arguments
        self.N, self.D = len(data), data.box_size
        self.amp = resolve_amp(config.amp, self.device)
        self.history: list[dict[str, Any]] = []
        self.steps: list[tuple[float, float]] = []
        self.start_epoch, self.resumed_from, self.partial = 0, None, None
        self.search: LatentSearch | None = None  # this epoch's latent search (train/latent_search.py)
        self.previous_latents: np.ndarray | None = None
        self.fresh = resume_state is None
        model_epoch = 0 if resume_state is None else self._model_epoch(resume_state)
        self.model = Model(schedule.plan(model_epoch, self.D).model_config, self.D, self.device)
        self._share_statistics()
        self.poses.setup(self.device)
        self._log_precision()
        if resume_state is not None:
            self._restore(resume_state, continue_run)
        self.pixel_size = data.dataset.pixel_size_angstrom
        self._write_config()
        self.pixels = likelihood_pixels(config, data.dataset, self.model.decoder, fresh=self.fresh).to(self.device)
        self.poses.attach(self.pixels, self.device)
        self.loss = (ImageLoss(self.pixels, domain=config.domain, amp=self.amp) if data.tilted is None else
                     TiltPairLoss(self.pixels, domain=config.domain, amp=self.amp,
                                  tilt_matrix=tilt_rotation(config.tilt_deg).to(self.device)))
        self.run_start = time.perf_counter() - self.poses.wall_offset
        self.poses.clock = lambda: time.perf_counter() - self.run_start
        self.last_good = None if resume_state is None or not continue_run else (
            self.start_epoch - 1, self.out / CHECKPOINT_NAME)

    # ---- set-up
    @staticmethod
    def _model_epoch(state: dict[str, Any]) -> int:
        """The epoch whose model a checkpoint holds (the one in progress for a mid-epoch checkpoint)."""
        partial = state.get("partial")
        return int(partial["epoch"]) if partial is not None else max(0, int(state["epoch"]))

    def _share_statistics(self) -> None:
        """Batch statistics of the decoder over all processes (the basis's running ``s(z)`` moments; the
        whole batch's latents, from which CryoFormer refreshes its occupancy grid)."""
        if self.dist.enabled:
            self.model.decoder.process_sum = self.dist.sum_
            self.model.decoder.process_gather_rows = lambda rows: self.dist.gather_rows(rows)[0]

    def _log_precision(self) -> None:
        config, device = self.config, self.device
        if self.amp:
            log.info("mixed precision%s: encoder and decoder in %s on %s (--no-amp for float32)",
                     "" if config.amp else " (automatic)", amp_dtype(device), device)
        elif config.amp:
            log.info("--amp is not available on %s; training in float32", device)
        else:
            log.info("training in float32%s", "" if config.amp is False else
                     f" (this {device.type} has no fast bfloat16; --amp forces mixed precision)")

    def _restore(self, state: dict[str, Any], continue_run: bool) -> None:
        self.model.load_state_dict(state)
        self.poses.load_state_dict(state)
        self.model.set_lr(self.config.lr, weight_decay=self.config.weight_decay)
        self.poses.set_lr(self.config.pose_lr)
        self.start_epoch = int(state["epoch"]) + 1
        self.resumed_from = int(state["epoch"])
        self.partial = state.get("partial")
        if self.partial is not None:
            self.start_epoch = int(self.partial["epoch"])
        if continue_run:
            self.history = list(state.get("history", []))
            self.steps = [tuple(s) for s in state.get("steps", [])]
        restore_rng_state(state.get("rng"))

    def _write_config(self) -> None:
        if self.dist.is_main:
            write_run_config(self.out, self.config, self.arguments, model=self.model,
                             normalization=self.data.normalization, box_size=self.D, pixel_size=self.pixel_size,
                             n_particles=self.N, resumed_from=self.resumed_from, command=self.command,
                             world_size=self.dist.world_size)

    # ---- the run
    def fit(self) -> TrainResult:
        """Train to the schedule's last epoch; returns the final model and latents."""
        config = self.config
        log.info("%s %s: %d particles, box %d, %s domain (%d pixels per image), zdim %d, %d parameters, batch %d, "
                 "lr %g, on %s%s; epochs %d to %d", self.command, self.schedule.describe(), self.N, self.D,
                 config.domain, len(self.pixels), self.model.zdim, self.model.n_parameters(), config.batch_size,
                 config.lr, self.device, f", {self.dist.world_size} processes" if self.dist.enabled else "",
                 self.start_epoch, self.schedule.num_epochs - 1)
        if self.start_epoch >= self.schedule.num_epochs:
            log.info("the run already finished %d epochs; pass a larger --num-epochs to train more", self.start_epoch)
        if self.fresh:
            if config.init_encoder:  # a latent teacher (train/teacher.py)
                copy_encoder(self.model.encoder, config.init_encoder)
            if config.warm_start_images and self.poses.has_poses():
                self._warm_start(config.seed)
            self._warm_up()
        self.last_plot = time.perf_counter()
        self.epochs_this_call = 0
        progress = None
        for epoch in range(self.start_epoch, self.schedule.num_epochs):
            plan = self.schedule.plan(epoch, self.D)
            progress = self._begin_epoch(epoch, plan)
            self._run_epoch(plan, progress)
            self._end_epoch(plan, progress)
        self.dist.barrier()
        return self._result(progress)

    def _warm_start(self, seed: int) -> None:
        """A decoder that wants it starts from the backprojection with the current poses (set-up, logged)."""
        warm_start_decoder(self.model.decoder, _PosedData(self.data, self.poses), self.pixels,
                           max_images=self.config.warm_start_images, seed=seed, domain=self.config.domain,
                           device=self.device)

    def _warm_up(self) -> None:
        """The schedule's warm-up: images with uniformly random poses before the first epoch."""
        images, band = self.schedule.warmup(self.D)
        if images <= 0:
            return
        t0 = time.perf_counter()
        pixels, mask = band_pixels(self.pixels, band)
        loss = self.loss.with_pixels(pixels) if mask is not None else self.loss
        source = RandomPoses(torch.Generator().manual_seed(self.config.seed + 29))
        seen, total = 0, 0.0
        for r in range(math.ceil(images / self.N)):
            order = epoch_order(self.N, seed=self.config.seed + 1, epoch=r, shuffle=True)[: images - seen]
            for batch, shard in iterate_batches(self._local_batch, order, self.config.batch_size,
                                                prefetch=self.config.prefetch):
                if batch is None:  # fewer images than processes: skipped by all
                    continue
                parts = self._step(batch, shard, source, loss, mask, epoch=-1, beta=0.0, generator=None)
                value = float(parts["objective"].detach())
                if not math.isfinite(value):
                    self._diverged(-1, seen // self.config.batch_size, value)
                total += value * shard.size
                seen += shard.size
        log.info("warm-up: %d images with random poses, loss %.5g, %.1f s", seen, total / max(seen, 1),
                 time.perf_counter() - t0)

    def _begin_epoch(self, epoch: int, plan: EpochPlan) -> EpochProgress:
        """Build, reset or warm-start the model as the plan says; the epoch's progress (resumed or new)."""
        resuming = self.partial is not None and int(self.partial["epoch"]) == epoch
        if not resuming:
            self._apply_model_changes(epoch, plan)
        generator = epoch_generator(self.config.seed, epoch, self.device) if self.model.encoder is not None else None
        progress = EpochProgress(epoch, self.N, self.model.zdim, self.device, generator=generator)
        self.search = self._latent_search(epoch)
        self.poses.begin_epoch(epoch, plan)
        if resuming:
            progress.restore(self.partial, self.dist)
            self.poses.load_partial_state(self.partial.get("poses", {}))
            log.info("epoch %d: continuing after %d of %d images", epoch + 1, progress.images_done, self.N)
            self.partial = None
        self.model.train(True)
        return progress

    def _apply_model_changes(self, epoch: int, plan: EpochPlan) -> None:
        phase, rebuilt = plan.model_config, False
        switched = (self.model.zdim, self.model.name) != (phase.zdim, phase.decoder)
        if switched:
            self.model = Model(phase, self.D, self.device, seed=plan.model_seed)
            self._share_statistics()
            likelihood_pixels(self.config, self.data.dataset, self.model.decoder, fresh=True)
            self.resumed_from = None if self.fresh else self.resumed_from
            self._write_config()
            log.info("epoch %d: %s", epoch + 1, plan.switch_note or "a new model takes over")
            rebuilt = True
        if plan.reset_seed is not None:
            self.model.reset(plan.reset_seed)
            self._share_statistics()
            if self.model.decoder.wants_data_spectrum:
                likelihood_pixels(self.config, self.data.dataset, self.model.decoder, fresh=True)
            log.info("epoch %d: model and optimiser reset (poses kept)", epoch + 1)
            rebuilt = True
        if switched and self.model.encoder is not None:
            self.teach(phase)
        if rebuilt and self.config.warm_start_images and self.poses.has_poses():
            self._warm_start(self.config.seed + epoch)

    def teach(self, phase) -> None:
        """A new VAE that takes over mid-run (ab initio's switch) starts its encoder from a latent teacher
        trained on the poses found so far, when ``phase`` asks for one (train/teacher.py; ``cryoscape train``
        trains its teacher before the run instead).  The random state is the same after it as before, so a
        run that reuses a finished teacher (a resume) continues as one that trained it."""
        table = self.poses.posed_table()
        epochs = teacher_epochs_for(phase) if table is not None else 0
        if epochs <= 0:
            return
        rng = capture_rng_state()
        folder = train_teacher(dataclasses.replace(phase, teacher_epochs=epochs), table, self.out, dist=self.dist)
        restore_rng_state(rng)
        copy_encoder(self.model.encoder, folder)

    def _latent_search(self, epoch: int) -> LatentSearch | None:
        """The latent search of ``epoch`` (train/latent_search.py): from ``latent_search_start`` on (the
        last ``latent_search_epochs`` of the run when it started), over the previous epoch's latents."""
        start = self.config.latent_search_start
        if start is None:  # a config that was not fixed at the start of its run (e.g. ab initio's)
            start = first_search_epoch(self.config.latent_search_epochs, self.model.decoder.latent_search_fraction,
                                       self.schedule.num_epochs)
        if self.model.zdim == 0 or start < 0 or epoch < start:
            return None
        previous = self.previous_latents
        if previous is None and (self.out / f"z.{epoch - 1}.npy").exists():  # resumed: the folder has them
            previous = np.load(self.out / f"z.{epoch - 1}.npy")
        if epoch == start:
            log.info("epoch %d: latents searched against the decoder from now on (%d points)", epoch + 1,
                     self.config.latent_search_points)
        return LatentSearch.for_epoch(self.model.zdim, self.config.latent_search_points, previous)

    def _local_batch(self, indices: np.ndarray) -> tuple[TrainingBatch | None, Shard]:
        """This process's share of the global batch ``indices`` (``None`` when it holds no image)."""
        rows = self.dist.shard(len(indices))
        batch = self.data.get_batch(indices[rows]) if len(indices) >= self.dist.world_size else None
        return batch, Shard(len(indices), torch.as_tensor(rows))

    def _run_epoch(self, plan: EpochPlan, progress: EpochProgress) -> None:
        from tqdm.auto import tqdm

        epoch, B = progress.epoch, plan.batch_size
        pixels, mask = band_pixels(self.pixels, plan.band_pixel)
        loss = self.loss.with_pixels(pixels) if mask is not None else self.loss
        order = self.data.dataset.epoch_order(seed=self.config.seed, epoch=epoch, shuffle=self.config.shuffle)
        n_batches = math.ceil(self.N / B)
        per_chunk = self.poses.batches_per_chunk(plan)
        bar = tqdm(total=self.N, initial=progress.images_done, unit="img", leave=False, dynamic_ncols=True,
                   desc=f"epoch {epoch + 1}/{self.schedule.num_epochs}",
                   disable=not (self.config.progress and self.dist.is_main))
        last_checkpoint = time.perf_counter()
        chunk: list[tuple[TrainingBatch | None, Shard]] = []
        items = iterate_batches(self._local_batch, order[progress.batches_done * B:], B, prefetch=self.config.prefetch)
        for item in items:
            chunk.append(item)
            if len(chunk) < per_chunk and progress.batches_done + len(chunk) < n_batches:
                continue
            self.poses.prepare([b for b, _ in chunk], self.model, plan, epoch)
            for batch, shard in chunk:
                if batch is None:  # fewer images than processes (the tail of an epoch): skipped by all
                    progress.batches_done += 1
                    progress.images_done += shard.size
                    continue
                self._train_batch(batch, shard, loss, mask, progress, n_batches)
                bar.update(shard.size)
            chunk = []
            minutes = self.config.checkpoint_minutes
            if minutes and progress.batches_done < n_batches:
                due = time.perf_counter() - last_checkpoint >= minutes * 60
                if self.dist.enabled:  # one decision for all: the partial checkpoint's sums are collective
                    due = bool(self.dist.sum_(torch.tensor([float(due)]))[0] > 0)
                if due:
                    self._save_partial(progress)
                    last_checkpoint = time.perf_counter()
        bar.close()

    def _step(self, batch: TrainingBatch, shard: Shard, source: PoseSource, loss: ImageLoss, mask, *, epoch: int,
              beta: float, generator, search: LatentSearch | None = None) -> dict[str, torch.Tensor]:
        """One optimiser step on this process's share of a batch (all processes step together)."""
        extra = source.optimizers(epoch)
        self.model.zero_grad(extra=source.all_optimizers())
        batch = batch.to(self.device, non_blocking=True)
        rotations, shifts = source.poses(batch, shard)
        noise_rows = (shard.size, shard.rows) if self.dist.enabled else None
        parts = loss(_restrict(batch, mask), decoder=self.model.decoder, encoder=self.model.encoder,
                     rotations=rotations, shifts=shifts, beta=beta, generator=generator, share=shard.share,
                     noise_rows=noise_rows, search=search)
        prior = self.model.decoder.regularization_loss(n_images=self.N)
        if prior is not None:
            parts["loss"] = parts["loss"] + (prior if not self.dist.enabled else prior / self.dist.world_size)
            parts["objective"] = parts["objective"] + prior
        parts["loss"].backward()
        if self.dist.enabled:
            self.dist.sync_gradients(self.model.parameters() + source.parameters())
        self.model.step()
        for opt in extra:
            opt.step()
        return parts

    def _train_batch(self, batch, shard: Shard, loss: ImageLoss, mask, progress: EpochProgress,
                     n_batches: int) -> None:
        epoch, b = progress.epoch, progress.batches_done
        beta = self.config.beta_at(epoch + b / n_batches)
        parts = self._step(batch, shard, self.poses, loss, mask, epoch=epoch, beta=beta, generator=progress.generator,
                           search=self.search)
        progress.batches_done += 1
        progress.images_done += shard.size
        n = len(shard.rows)
        with torch.no_grad():
            detached = torch.stack([parts["objective"].detach(), parts["error"].detach(),
                                    parts["kl"].detach()]).double()
            progress.sums += detached * n
            progress.window += detached[0] * n
            progress.window_n += n
        if parts["mu"] is not None:
            idx = batch.indices.numpy()
            progress.z_mean[idx] = parts["mu"].detach().cpu().numpy()
            progress.z_logvar[idx] = parts["logvar"].detach().cpu().numpy()
        progress.seen += n
        check_every = 1 if self.device.type == "cpu" else 16
        if (progress.batches_done % check_every == 0 or progress.batches_done == n_batches):
            value = (float(parts["objective"].detach()) if check_every == 1 else
                     float(progress.sums[0] / max(progress.seen, 1)))
            if not math.isfinite(value):
                self._diverged(epoch, b, value)
        plot_every = max(1, n_batches // _STEPS_PER_EPOCH_IN_PLOT)
        if progress.batches_done % plot_every == 0 or progress.batches_done == n_batches:
            self.steps.append((epoch + progress.batches_done / n_batches,
                               float(progress.window) / max(progress.window_n, 1)))
            progress.window.zero_()
            progress.window_n = 0

    def _end_epoch(self, plan: EpochPlan, progress: EpochProgress) -> None:
        epoch = progress.epoch
        sums = self.dist.sum_(progress.sums.clone())
        seen = int(self.dist.sum_(torch.tensor([progress.seen]))[0])
        totals = (sums / max(seen, 1)).tolist()
        if not all(math.isfinite(v) for v in totals):
            self._diverged(epoch, progress.batches_done - 1, totals[0])
        seconds = progress.seconds
        record = {"epoch": epoch, "kind": plan.kind, **plan.record,
                  "loss": totals[0], "error": totals[1], "kl": totals[2], "beta": self.config.beta_at(epoch + 1),
                  "seconds": seconds, "wall_seconds": time.perf_counter() - self.run_start,
                  "images_per_second": seen / max(seconds, 1e-9), **self.poses.epoch_record()}
        self.history.append(record)
        self.epochs_this_call += 1
        if progress.z_mean is not None:
            progress.z_mean = self.dist.sum_array(progress.z_mean)
            progress.z_logvar = self.dist.sum_array(progress.z_logvar)
            self.previous_latents = progress.z_mean
        if self._refit_due(epoch):
            record["refit_seconds"] = self._refit(progress, final=epoch == self.schedule.num_epochs - 1)
        if self.dist.is_main:
            self._write_epoch(plan, progress)
        self._log_epoch(plan, record)

    def _refit(self, progress: EpochProgress, *, final: bool) -> float:
        """Re-solve the decoder's maps at the epoch's latents (train/refit.py); after the final refit
        (with ``refit_latents``) re-estimate the latents against the refitted maps, refit at them and
        keep them as the epoch's latents.  Returns the seconds spent."""
        config, decoder = self.config, self.model.decoder
        posed = _PosedData(self.data, self.poses)
        kwargs = dict(batch_size=max(config.batch_size, 64), domain=config.domain, device=self.device)
        t0 = time.perf_counter()
        latents = progress.z_mean if final else sampled_latents(progress.z_mean, progress.z_logvar,
                                                                 seed=config.seed + progress.epoch)
        summary = refit_decoder(decoder, posed, self.pixels, latents, final=final, **kwargs)
        if not (final and config.refit_latents and progress.z_mean is not None and summary
                and "skipped" not in summary):
            return time.perf_counter() - t0
        refined = refine_latents(decoder, posed, self.pixels, progress.z_mean,
                                 n_candidates=config.refit_latent_candidates, seed=config.seed, **kwargs)
        if refined is None:
            return time.perf_counter() - t0
        moved = float(np.sqrt(np.mean((refined[0] - progress.z_mean) ** 2)))
        log.info("refit: latents re-estimated against the refitted maps (posterior means over %d candidates; "
                 "rms change %.3f)", min(config.refit_latent_candidates, len(progress.z_mean)), moved)
        progress.z_mean, progress.z_logvar = refined[0], np.log(np.maximum(refined[1], 1e-12)).astype(np.float32)
        self.previous_latents = progress.z_mean
        refit_decoder(decoder, posed, self.pixels, progress.z_mean, final=True, **kwargs)
        return time.perf_counter() - t0

    def _refit_due(self, epoch: int) -> bool:
        """Whether the decoder's maps are re-solved after ``epoch`` (train/refit.py): ``refit`` on, a
        decoder that wants it, known poses, and the last epoch or every ``refit_every``-th."""
        config = self.config
        if not (config.refit and self.model.decoder.wants_refit and self.poses.has_poses()):
            return False
        last = epoch == self.schedule.num_epochs - 1
        every = config.refit_every_for(self.N)
        return last or (every > 0 and (epoch + 1) % every == 0)

    def _write_epoch(self, plan: EpochPlan, progress: EpochProgress) -> None:
        epoch, out = progress.epoch, self.out
        is_last = epoch == self.schedule.num_epochs - 1
        keep = is_last or (epoch + 1) % self.config.checkpoint_every == 0
        if progress.z_mean is not None:
            write_latents(out, epoch, progress.z_mean, progress.z_logvar)
        self.poses.write(out, epoch, keep=keep, last=is_last)
        state = self._checkpoint_state(epoch)
        save_checkpoint(out / CHECKPOINT_NAME, state)
        (out / PARTIAL_CHECKPOINT_NAME).unlink(missing_ok=True)
        self.last_good = (epoch, out / CHECKPOINT_NAME)
        if keep:
            save_checkpoint(weights_path(out, epoch), state)
        if self.model.zdim == 0 and (keep or plan.write_map):
            write_epoch_map(out, epoch, self.model.decoder, self.pixel_size)
        if keep:  # an atomic decoder's model (at the median latent of the epoch): model.E.pdb
            z_mid = None if progress.z_mean is None else torch.as_tensor(np.median(progress.z_mean, axis=0))
            self.model.decoder.write_atomic_model(out / f"model.{epoch}.pdb", z_mid)
        if keep or plan.search is not None or time.perf_counter() - self.last_plot > _PLOT_INTERVAL_SECONDS:
            plot_losses(self.history, self.steps, out / "loss.png")  # ~0.3 s, so not after every short epoch
            self.last_plot = time.perf_counter()

    def _log_epoch(self, plan: EpochPlan, record: dict[str, Any]) -> None:
        epoch = record["epoch"]
        later = [self.schedule.plan(e, self.D).kind for e in range(epoch + 1, self.schedule.num_epochs)]
        what = "" if plan.kind == "train" else f" ({plan.kind}, band {record.get('band_pixel', self.D):.0f} px)"
        extra = ""
        if plan.search is not None:
            extra = (f"; search {record['search_seconds']:.1f} s (band {plan.search.k_min:g}-{plan.search.k_max:g} "
                     f"px), median pose change {record['median_pose_change_deg']:.1f} deg")
        log.info("epoch %d/%d%s: loss %.5g (squared error %.5g, KL %.4g, beta %.3g) in %.1f s, %.0f img/s%s%s",
                 epoch + 1, self.schedule.num_epochs, what, record["loss"], record["error"], record["kl"],
                 record["beta"], record["seconds"], record["images_per_second"], extra,
                 f"; about {format_seconds(remaining_seconds(self.history, later))} left" if later else "")

    # ---- checkpoints
    def _checkpoint_state(self, epoch: int) -> dict[str, Any]:
        """The checkpoint dict after ``epoch`` (:mod:`cryoscape.train.checkpoint`)."""
        return {
            "epoch": epoch, **self.model.state_dict(), **self.poses.state_dict(), "rng": capture_rng_state(),
            "normalization": self.data.normalization.to_dict(), "history": self.history, "steps": self.steps,
            "config": self.config.to_dict(), "world_size": self.dist.world_size,
            "data": {"box_size": self.D, "pixel_size_angstrom": self.pixel_size, "n_particles": self.N},
        }

    def _save_partial(self, progress: EpochProgress) -> None:
        """A mid-epoch checkpoint (``checkpoint.partial.pt``): the epoch's position and sums with the model."""
        partial = progress.state(self.dist)
        partial["poses"] = self.poses.partial_state()
        if self.dist.is_main:
            state = self._checkpoint_state(progress.epoch - 1)
            state["partial"] = partial
            save_checkpoint(self.out / PARTIAL_CHECKPOINT_NAME, state)
            log.info("epoch %d: checkpoint after %d of %d images", progress.epoch + 1, progress.images_done, self.N)

    def _diverged(self, epoch: int, batch: int, value: float) -> None:
        config, out = self.config, self.out
        if self.last_good is None:
            kept = "no checkpoint had been written yet"
            then = f"restart with a lower learning rate, e.g. --lr {config.lr / 10:g} (now {config.lr:g})"
        else:
            kept = f"the checkpoint of epoch {self.last_good[0]} ({self.last_good[1]}) is intact"
            then = (f"lower the learning rate, e.g. --lr {config.lr / 10:g} (now {config.lr:g}), and continue with "
                    f"cryoscape {self.command} --resume {out} --lr {config.lr / 10:g}, or restart")
        raise TrainingDiverged(f"the training loss became {value} in epoch {epoch} (batch {batch}); {kept}; {then}.")

    def _result(self, progress: EpochProgress | None) -> TrainResult:
        rotations, shifts = self.poses.final_poses()
        return TrainResult(
            out_dir=self.out, epochs_done=self.start_epoch + self.epochs_this_call, history=self.history,
            decoder=self.model.decoder, encoder=self.model.encoder, normalization=self.data.normalization,
            z_mean=None if progress is None else progress.z_mean,
            z_logvar=None if progress is None else progress.z_logvar, rotations=rotations, shifts_pixel=shifts,
        )

    @classmethod
    def resume(cls, run_dir: str | Path, **overrides: Any) -> TrainResult:
        """Continue the run in ``run_dir`` (a ``train`` or ``abinit`` run) from its latest checkpoint."""
        from cryoscape.train.checkpoint import load_latest_checkpoint

        state = load_latest_checkpoint(Path(run_dir), command="train")
        if state.get("abinit") is not None:
            from cryoscape.train.abinit import resume_abinit

            return resume_abinit(run_dir, state=state, **overrides)
        from cryoscape.train.loop import resume_training

        return resume_training(run_dir, state=state, **overrides)


class _PosedData:
    """The training set with the pose source's current poses in its batches (what the warm start reads)."""

    def __init__(self, data: TrainingData, poses: PoseSource):
        self.data, self.poses = data, poses

    def __len__(self) -> int:
        return len(self.data)

    def get_batch(self, indices: np.ndarray) -> TrainingBatch:
        return self.poses.posed(self.data.dataset.get_batch(indices))


class RunContext:
    """``with RunContext(out) as dist``: join the process group (torchrun's environment; one
    process: no group), log to ``out/run.log`` (process 0), and leave the group at the end."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def __enter__(self) -> Distributed:
        from cryoscape.io.run_folder import attach_log_file

        self.dist = Distributed.from_environment()
        self.out.mkdir(parents=True, exist_ok=True)
        self.handler = attach_log_file(self.out / "run.log") if self.dist.is_main else None
        return self.dist

    def __exit__(self, *exc) -> None:
        from cryoscape.io.run_folder import detach_log_file

        if self.handler is not None:
            detach_log_file(self.handler)
        self.dist.close(wait=exc[0] is None)
