"""Data-parallel training with ``torch.distributed``: the process group and its collectives.

``torchrun --nproc-per-node N $(which cryoscape) train ...`` (or ``abinit``) starts N processes
with the standard environment (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); :meth:`Distributed.from_environment` joins the group (NCCL on GPUs, gloo on CPUs)
and each process takes ``cuda:LOCAL_RANK`` when GPUs are present.  Without that environment
(``WORLD_SIZE`` unset or 1) everything here is a no-op, so one process trains exactly as before.

How the work is split (the same on every process, so no scheduler is needed):

* every process computes the same epoch order (from ``(seed, epoch)``) and walks the same global
  batches; each takes a contiguous share of every batch (:meth:`Distributed.shard`);
* after the backward pass the gradients are summed over processes (:meth:`sync_gradients`): one
  all-reduce of all dense gradients flattened into one buffer, and an all-gather of the touched
  rows of sparse gradients (voxel tables, per-particle pose corrections), so every process takes
  the same optimiser step and the models stay identical;
* pose searches split each chunk the same way and all-gather the poses found (:meth:`gather_rows`);
* process 0 alone writes files.

Why not ``DistributedDataParallel``: DDP wraps one module whose ``forward`` must be the training
call and reduces dense gradients; here the loss calls the decoder several ways (slices, the search
lattice), the voxel basis and the pose corrections have sparse row gradients that DDP does not
reduce, and the networks are small (about a million parameters), so overlapping communication
with the backward pass, DDP's main gain, buys little.  One reduction per step after the backward
pass gives the same gradients for every decoder with no per-decoder code.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Distributed", "exit_worker", "finish_process"]

log = logging.getLogger(__name__)


@dataclass
class Distributed:
    """This process's place in the group: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @classmethod
    def from_environment(cls, device_name: str | None = "auto") -> "Distributed":
        """Join the process group described by torchrun's environment (one process: no group)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device_name in (None, "auto", "cuda")
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        else:
            # processes sharing a node share its cores
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        log.info("process %d of %d (%s)", rank, world, backend)
        return cls(rank=rank, world_size=world, local_rank=local_rank, backend=backend)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes files."""
        return self.rank == 0

    def device(self, name: str | None) -> torch.device | None:
        """``cuda:LOCAL_RANK`` under NCCL (``None``: let the config decide)."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return None

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.cuda() if self.backend == "nccl" else t.cpu()

    def shard(self, n: int) -> np.ndarray:
        """Positions in a global batch of ``n`` that this process trains on (contiguous, sizes within 1)."""
        bounds = np.linspace(0, n, self.world_size + 1).round().astype(np.int64)
        return np.arange(bounds[self.rank], bounds[self.rank + 1])

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes, in place (returned)."""
        if self.enabled:
            buf = self._comm(tensor)
            dist.all_reduce(buf)
            if buf is not tensor:
                tensor.copy_(buf)
        return tensor

    def sum_array(self, array: np.ndarray) -> np.ndarray:
        """Sum a numpy array over processes (a new array)."""
        if not self.enabled:
            return array
        return self.sum_(torch.from_numpy(np.ascontiguousarray(array))).numpy()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_rows(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Concatenate each tensor's rows from every process, in rank order (row counts may differ)."""
        if not self.enabled:
            return tensors
        n = torch.tensor([tensors[0].shape[0]], dtype=torch.int64)
        counts = [self._comm(torch.zeros(1, dtype=torch.int64)) for _ in range(self.world_size)]
        dist.all_gather(counts, self._comm(n))
        counts = [int(c) for c in counts]
        top = max(counts)
        out = []
        for t in tensors:
            padded = t.new_zeros((top, *t.shape[1:]))
            padded[: t.shape[0]] = t
            parts = [self._comm(torch.empty_like(padded)) for _ in range(self.world_size)]
            dist.all_gather(parts, self._comm(padded))
            out.append(torch.cat([p[:c].to(t.device) for p, c in zip(parts, counts)]))
        return tuple(out)

    def sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over processes (dense: one all-reduce; sparse: rows gathered).

        A parameter that has no gradient on any process keeps none (Adam then leaves it alone, as
        one process would).
        """
        if not self.enabled:
            return
        dense = [p for p in params if p.requires_grad and not (p.grad is not None and p.grad.is_sparse)]
        sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
        self._sync_dense(dense)
        n_sparse = torch.tensor([len(sparse)], dtype=torch.int64)
        self.sum_(n_sparse)
        if int(n_sparse) != len(sparse) * self.world_size:
            raise RuntimeError("processes disagree on which gradients are sparse")
        for p in sparse:
            self._sync_sparse(p)

    def _sync_dense(self, params: list[torch.nn.Parameter]) -> None:
        if not params:
            return
        ref = params[0]
        present = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], dtype=ref.dtype)
        flat = torch.cat([present.to(ref.device)] + [
            (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1).to(ref.dtype) for p in params])
        self.sum_(flat)
        offset = len(params)
        for i, p in enumerate(params):
            n = p.numel()
            if float(flat[i]) > 0:
                p.grad = flat[offset: offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def _sync_sparse(self, p: torch.nn.Parameter) -> None:
        g = p.grad.coalesce()
        idx, values = self.gather_rows(g.indices().T.contiguous(), g.values())
        p.grad = torch.sparse_coo_tensor(idx.T, values, g.shape).coalesce()

    def close(self, *, wait: bool = True) -> None:
        """Leave the group; with ``wait`` (a run that ended normally) every process first waits
        for the others, so none tears down a connection another still uses."""
        if self.enabled and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker whose command has returned: flush the logs and standard streams, then
    leave without the interpreter's teardown.

    The run has already left its process group (:meth:`Distributed.close`).  Tearing down the
    interpreter and the C++ statics after that occasionally aborted one worker on gloo
    ("terminate called without an active exception", seen once in CI on an ab initio run that had
    written all its files), which torchrun reports as a failed run; nothing is left to tear down
    that the operating system does not free.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def finish_process(code: int) -> int:
    """The end of a command: a torchrun worker (``WORLD_SIZE`` > 1) leaves through :func:`exit_worker`;
    a plain process gets ``code`` back to return."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_worker(code)
    return code
