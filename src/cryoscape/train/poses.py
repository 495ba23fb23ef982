"""Per-particle pose corrections learnt by gradient descent (``--refine-poses``).

Every particle ``i`` gets a rotation correction and a shift correction, stored in sparse
embeddings so that a batch only touches (and the optimiser, ``torch.optim.SparseAdam``, only
updates) its own rows:

* ``representation="axis_angle"``: a rotation vector ``delta_i`` (initialised to 0) and
  ``R_i = expmap(delta_i) R0_i``: the correction rotates the particle in the image frame, after
  the input pose;
* ``representation="6d"``: the first two rows of ``R_i`` themselves (initialised from ``R0_i``),
  mapped to a rotation by Gram-Schmidt (:func:`cryoscape.geometry.rotations.sixd_to_matrix`);
* shifts: ``t_i = t0_i + dt_i`` with ``dt_i`` in pixels (initialised to 0), RELION sign.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cryoscape.geometry.rotations import matrix_to_sixd, rotvec_to_matrix, sixd_to_matrix

__all__ = ["PoseCorrections"]


class PoseCorrections(nn.Module):
    """Learnable corrections of ``n`` particles' rotations and shifts.

    Parameters
    ----------
    rotations
        ``(n, 3, 3)`` input rotations (used to initialise the 6-D representation; the axis-angle
        representation starts at zero and applies to whatever rotations are passed in).
    representation
        ``"axis_angle"`` or ``"6d"``.
    refine_shifts
        Learn shift corrections too.
    """

    def __init__(self, rotations: np.ndarray | torch.Tensor, *, representation: str = "axis_angle",
                 refine_shifts: bool = True):
        super().__init__()
        if representation not in ("axis_angle", "6d"):
            raise ValueError(f"representation must be 'axis_angle' or '6d', got {representation!r}")
        R0 = torch.as_tensor(np.asarray(rotations), dtype=torch.float32)
        n = R0.shape[0]
        self.representation = representation
        self.refine_shifts = bool(refine_shifts)
        dim = 3 if representation == "axis_angle" else 6
        self.rotation = nn.Embedding(n, dim, sparse=True)
        with torch.no_grad():
            if representation == "axis_angle":
                self.rotation.weight.zero_()
            else:
                self.rotation.weight.copy_(matrix_to_sixd(R0))
        self.shift = nn.Embedding(n, 2, sparse=True) if self.refine_shifts else None
        if self.shift is not None:
            with torch.no_grad():
                self.shift.weight.zero_()

    def forward(self, indices: torch.Tensor, rotations: torch.Tensor,
                shifts_pixel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrected ``(B, 3, 3)`` rotations and ``(B, 2)`` shifts of particles ``indices``."""
        idx = indices.to(self.rotation.weight.device)
        params = self.rotation(idx)
        if self.representation == "axis_angle":
            R = rotvec_to_matrix(params) @ rotations
        else:
            R = sixd_to_matrix(params)
        t = shifts_pixel if self.shift is None else shifts_pixel + self.shift(idx)
        return R, t

    @torch.no_grad()
    def corrected(self, rotations: torch.Tensor, shifts_pixel: torch.Tensor,
                  batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """All ``n`` corrected rotations and shifts, as float64 numpy arrays."""
        n = rotations.shape[0]
        Rs, ts = [], []
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            dev = self.rotation.weight.device
            R, t = self(idx, rotations[idx].to(dev), shifts_pixel[idx].to(dev))
            Rs.append(R.cpu().double())
            ts.append(t.cpu().double())
        return torch.cat(Rs).numpy(), torch.cat(ts).numpy()
