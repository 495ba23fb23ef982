"""CryoFormer's orientation encoder: an image -> a rotation (6-D, Gram-Schmidt) and an in-plane shift.

Two forms (``residual``):

* **absolute** (the paper's): the MLP predicts the pose itself and must be pre-trained to the
  consensus poses, which an MLP memorises only approximately on a small data set;
* **residual**: the MLP predicts a correction, a rotation near the identity and a shift, composed
  with the consensus pose of the image (``R = dR R0``, ``t = t0 + dt``).  Its last layer starts at
  zero (identity, no shift), so the encoder starts exactly at the consensus poses without any
  pre-training and end-to-end refinement can only move from there.

An MLP (``layers`` x ``width``, ReLU; the paper's 10 x 128) reads the preprocessed image (the
encoder's input, ``(B, D, D)``) and returns 8 numbers: two 3-vectors, the first two rows of the
rotation (:func:`cryoscape.geometry.rotations.sixd_to_matrix`, continuous and differentiable), and
the shift in pixels (RELION's sign, as the particle table).  :func:`pose_pretraining_loss` is the
paper's pre-training loss against consensus poses; the training engine then refines the encoder by
the image loss (train/predicted_poses.py).
"""

from __future__ import annotations

import torch
from torch import nn

from cryoscape.geometry.rotations import sixd_to_matrix

__all__ = ["OrientationEncoder", "pose_pretraining_loss"]


class OrientationEncoder(nn.Module):
    """``(B, D, D)`` images -> ``(B, 3, 3)`` rotations and ``(B, 2)`` shifts in pixels."""

    def __init__(self, *, box_size: int, layers: int = 10, width: int = 128, residual: bool = False):
        super().__init__()
        self.residual = bool(residual)
        self.config = {"box_size": int(box_size), "layers": int(layers), "width": int(width),
                       "residual": self.residual}
        mods: list[nn.Module] = [nn.Flatten(), nn.Linear(box_size * box_size, width), nn.ReLU()]
        for _ in range(max(0, layers - 2)):
            mods += [nn.Linear(width, width), nn.ReLU()]
        mods.append(nn.Linear(width, 8))
        self.mlp = nn.Sequential(*mods)
        with torch.no_grad():  # start at the identity rotation and no shift (exactly, for the residual form)
            self.mlp[-1].weight.mul_(0.0 if self.residual else 0.1)
            self.mlp[-1].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0]))

    def forward(self, images: torch.Tensor, rotations: torch.Tensor | None = None,
                shifts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Poses of ``images``; the residual form composes its correction with the consensus
        ``rotations`` ``(B, 3, 3)`` and ``shifts`` ``(B, 2)`` (required there, ignored otherwise)."""
        out = self.mlp(images.to(self.mlp[1].weight.dtype)).float()
        R, t = sixd_to_matrix(out[:, :6]), out[:, 6:]
        if not self.residual:
            return R, t
        if rotations is None or shifts is None:
            raise ValueError("the residual orientation encoder needs the consensus rotations and shifts")
        return R @ rotations.to(R), t + shifts.to(t)


def pose_pretraining_loss(rotations: torch.Tensor, shifts: torch.Tensor, target_rotations: torch.Tensor,
                          target_shifts: torch.Tensor) -> torch.Tensor:
    """The paper's ``(1/9) ||R - R0||_F^2 + (1/2) ||t - t0||_1``, averaged over the batch."""
    rot = (rotations - target_rotations.to(rotations)).square().sum((-2, -1)) / 9.0
    shift = (shifts - target_shifts.to(shifts)).abs().sum(-1) / 2.0
    return (rot + shift).mean()
