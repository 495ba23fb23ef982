"""Poses predicted from each image by an orientation encoder (CryoFormer, ``--pose-source encoder``).

:class:`PredictedPoses` is a :class:`~cryoscape.train.pose_sources.PoseSource`: every batch's
rotations and shifts are the :class:`~cryoscape.models.orientation.OrientationEncoder`'s outputs
for its images, so the image loss refines the encoder end to end (the paper's refinement; it
cannot find poses ab initio, it needs consensus poses to start from).

0. **Residual** (``residual=True``, the default, ``--pose-encoder residual``): the encoder predicts a
   correction composed with each image's table pose (models/orientation.py), starting exactly at
   the table's poses: no pre-training.  The absolute form (``--pose-encoder absolute``, the paper's)
   predicts the pose itself and is first pre-trained (1.); an MLP memorises the poses of a small
   data set only approximately, so it starts worse than the table (README).
1. **Pre-training** (absolute form; once, before the first epoch; a resumed run skips it): the encoder is fitted
   to the particle table's poses with the paper's loss (models/orientation.py) for
   ``pretrain_epochs`` passes over the images, batches of 64, Adam at ``pretrain_lr`` (3e-4; the
   defaults 4 x 256 at 3e-4 were chosen by measurement over the paper's 10 x 128, README).
2. **Refinement**: the encoder's optimiser (Adam at ``lr``; 0 freezes the encoder) steps after the
   model's in every epoch from ``start_epoch``.

Outputs after every epoch: ``poses.E.pkl`` (cryoDRGN format) and ``poses.E.star`` (the particle
table with these poses, when its pixel size is known), the poses each image had when it was last
trained in the epoch; ``particles.star`` after the last epoch.  ``cryoscape evaluate --poses``
scores them.  In data-parallel runs each process records the rows it trains, and process 0 writes
its own rows' predictions together with the table's poses elsewhere (a known limitation).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.data.training import TrainingBatch
from cryoscape.errors import InputError
from cryoscape.geometry.rotations import rotation_angle_between
from cryoscape.models.orientation import OrientationEncoder, pose_pretraining_loss
from cryoscape.train.pose_sources import PoseSource, Shard

__all__ = ["PredictedPoses"]

log = logging.getLogger(__name__)

PRETRAIN_BATCH = 64


class PredictedPoses(PoseSource):
    """Poses from an orientation encoder, pre-trained on the table's poses then refined (module docstring)."""

    def __init__(self, dataset, table=None, *, layers: int = 4, width: int = 256, pretrain_epochs: int = 200,
                 pretrain_lr: float = 3e-4, lr: float = 1e-4, start_epoch: int = 0, seed: int = 0,
                 residual: bool = True):
        self.dataset, self.table = dataset, table
        self.layers, self.width = int(layers), int(width)
        self.pretrain_epochs, self.pretrain_lr, self.lr = int(pretrain_epochs), float(pretrain_lr), float(lr)
        self.start_epoch, self.seed, self.residual = int(start_epoch), int(seed), bool(residual)
        self.pretrained = False
        self.pretrain_record: dict[str, float] = {}
        self.rotations = dataset.rotations.clone().float()
        self.shifts = dataset.shifts_pixel.clone().float()
        self.table_rotations, self.table_shifts = self.rotations.clone(), self.shifts.clone()

    def setup(self, device: torch.device) -> None:
        self.device = device
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed + 101)
        try:
            self.encoder = OrientationEncoder(box_size=self.dataset.box_size, layers=self.layers,
                                              width=self.width, residual=self.residual).to(device)
        finally:
            torch.random.set_rng_state(state)
        self.optimizer = torch.optim.Adam(self.encoder.parameters(), lr=max(self.lr, 1e-12))

    def set_lr(self, lr: float) -> None:
        """``--pose-lr`` on resume does not apply here (the encoder's rate is ``pose_encoder_lr``)."""

    # ---- pre-training
    def begin_epoch(self, epoch: int, plan) -> None:
        if not self.pretrained:
            self.pretrain()

    def pretrain(self) -> dict[str, float]:
        """Fit the encoder to the table's poses; returns (and logs) its median errors on the training images.

        The residual form starts at the table's poses: nothing to fit (its errors are 0)."""
        if self.residual:
            self.pretrained = True
            self.pretrain_record = {"pretrain_rotation_error_deg": 0.0, "pretrain_shift_error_pixel": 0.0}
            return self.pretrain_record
        opt = torch.optim.Adam(self.encoder.parameters(), lr=self.pretrain_lr)
        rng = np.random.default_rng(self.seed + 7)
        n = len(self.dataset)
        self.encoder.train(True)
        for _ in range(self.pretrain_epochs):
            order = rng.permutation(n)
            for start in range(0, n, PRETRAIN_BATCH):
                idx = np.sort(order[start:start + PRETRAIN_BATCH])
                R, t = self.encoder(self.dataset.read_preprocessed(idx).to(self.device))
                loss = pose_pretraining_loss(R, t, self.dataset.rotations[idx].to(self.device),
                                             self.dataset.shifts_pixel[idx].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.pretrained = True
        R, t = self.predict_all()
        self.rotations, self.shifts = R, t
        err = torch.rad2deg(rotation_angle_between(R.double(), self.dataset.rotations.double()))
        shift_err = (t - self.dataset.shifts_pixel.float()).norm(dim=-1)
        self.pretrain_record = {"pretrain_rotation_error_deg": float(err.median()),
                                "pretrain_shift_error_pixel": float(shift_err.median())}
        log.info("orientation encoder pre-trained for %d epochs on the table's poses: median error %.2f deg, "
                 "%.2f px", self.pretrain_epochs, *self.pretrain_record.values())
        return self.pretrain_record

    def predict_all(self, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, 3, 3)`` rotations and ``(N, 2)`` shifts the encoder predicts now for every particle (CPU)."""
        was = self.encoder.training
        self.encoder.train(False)
        Rs, ts = [], []
        with torch.no_grad():
            for start in range(0, len(self.dataset), batch_size):
                idx = np.arange(start, min(len(self.dataset), start + batch_size))
                R, t = self._predict(self.dataset.read_preprocessed(idx), idx)
                Rs.append(R.cpu())
                ts.append(t.cpu())
        self.encoder.train(was)
        return torch.cat(Rs), torch.cat(ts)

    def _predict(self, images: torch.Tensor, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's poses of ``images`` (rows ``idx`` of the table; the residual form needs their poses)."""
        if not self.residual:
            return self.encoder(images.to(self.device))
        idx = torch.as_tensor(idx, dtype=torch.long)
        return self.encoder(images.to(self.device), self.table_rotations[idx].to(self.device),
                            self.table_shifts[idx].to(self.device))

    # ---- training
    def poses(self, batch: TrainingBatch, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        frozen = self.lr <= 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            idx = batch.indices.cpu()
            R, t = self._predict(batch.images, idx)
        self.rotations[idx], self.shifts[idx] = R.detach().cpu(), t.detach().cpu()
        return R, t

    def posed(self, batch: TrainingBatch) -> TrainingBatch:
        idx = batch.indices
        return dataclasses.replace(batch, rotations=self.rotations[idx].to(batch.values.device),
                                   shifts_pixel=self.shifts[idx].to(batch.values.device))

    def final_poses(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        return self.rotations.double().numpy(), self.shifts.double().numpy()

    def optimizers(self, epoch: int) -> list:
        return [self.optimizer] if self.lr > 0 and epoch >= self.start_epoch else []

    def all_optimizers(self) -> list:
        return [self.optimizer]

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.encoder.parameters())

    def epoch_record(self) -> dict[str, float]:
        return dict(self.pretrain_record)

    # ---- outputs and checkpoints
    def write(self, out: Path, epoch: int, *, keep: bool, last: bool) -> None:
        from cryoscape.io.cryodrgn import write_poses_pkl
        from cryoscape.io.star import write_star

        R, t = self.rotations.double().numpy(), self.shifts.double().numpy()
        write_poses_pkl(out / f"poses.{epoch}.pkl", R, t, box_size=self.dataset.box_size)
        if self.table is None:
            return
        pixel = np.asarray(self.table.pixel_size_angstrom)
        if not (np.isfinite(pixel) & (pixel > 0)).all():
            return
        posed = dataclasses.replace(self.table, rotations=R, shifts_pixel=t)
        write_star(out / f"poses.{epoch}.star", posed)
        if last:
            write_star(out / "particles.star", posed)

    def state_dict(self) -> dict[str, Any]:
        return {"orientation_encoder": {"config": dict(self.encoder.config), "state": self.encoder.state_dict(),
                                        "optimizer": self.optimizer.state_dict(), "pretrained": self.pretrained,
                                        "rotations": self.rotations.clone(), "shifts_pixel": self.shifts.clone(),
                                        "pretrain_record": dict(self.pretrain_record)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("orientation_encoder")
        if saved is None:
            raise InputError("the checkpoint holds no orientation encoder; resume it without --pose-source encoder.")
        try:
            self.encoder.load_state_dict(saved["state"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise InputError(f"the checkpoint's orientation encoder does not fit ({err}); resume with the "
                             "--pose-encoder-* options of the run that wrote it.") from None
        self.pretrained = bool(saved["pretrained"])
        self.rotations = torch.as_tensor(saved["rotations"], dtype=torch.float32)
        self.shifts = torch.as_tensor(saved["shifts_pixel"], dtype=torch.float32)
        self.pretrain_record = dict(saved.get("pretrain_record", {}))
