"""Checkpoints of a training run: written atomically, read back to resume or to decode maps.

A checkpoint is one ``torch.save`` file holding a dict:

``format``, ``version``
    ``"cryoscape-train"``, 1.
``epoch``
    0-based index of the last completed epoch (the run resumes at ``epoch + 1``).
``decoder``
    ``{"name", "config", "state"}``: ``build_decoder(name, **config)`` then ``load_state_dict``.
``encoder``
    ``{"config", "state"}`` or ``None`` (homogeneous runs).
``poses``
    ``{"representation", "refine_shifts", "state"}`` or ``None`` (no pose refinement).
``optimizer``, ``pose_optimizer``, ``grad_scaler``
    Optimiser states (``None`` where unused).
``rng``
    torch / numpy / python (and CUDA) generator states at the end of the epoch.
``normalization``
    :class:`cryoscape.data.training.DataNormalization` as a dict.
``history``
    Per-epoch records (loss, squared error, KL, seconds).
``config``
    The run's :class:`cryoscape.train.config.TrainConfig` as a dict.
``data``
    ``box_size``, ``pixel_size_angstrom``, ``n_particles``.
``partial``
    Only in a mid-epoch checkpoint (``checkpoint.partial.pt``, ``--checkpoint-minutes``): the
    epoch in progress (``epoch`` is then the last completed one), how many of its batches and
    images are done, its loss sums, latents so far and noise generator state
    (:class:`cryoscape.train.trainer.EpochProgress`).  It is removed when the epoch ends;
    :func:`load_latest_checkpoint` takes it only when it is newer than ``checkpoint.pt``.

The file is written to a temporary name beside its target and moved into place with
``os.replace``, so a run killed while saving keeps the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.errors import InputError
from cryoscape.io.writers import atomic_write

__all__ = [
    "CHECKPOINT_NAME",
    "PARTIAL_CHECKPOINT_NAME",
    "load_latest_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "weights_path",
    "available_epochs",
    "find_checkpoint",
    "refuse_to_overwrite_run",
    "capture_rng_state",
    "restore_rng_state",
]

CHECKPOINT_NAME = "checkpoint.pt"
PARTIAL_CHECKPOINT_NAME = "checkpoint.partial.pt"
FORMAT = "cryoscape-train"
VERSION = 1
_WEIGHTS_RE = re.compile(r"^weights\.(\d+)\.pt$")


def weights_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """``RUN/weights.EPOCH.pt``."""
    return Path(run_dir) / f"weights.{int(epoch)}.pt"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (see the module docstring) atomically to ``path``."""
    path = Path(path)
    content = {"format": FORMAT, "version": VERSION, **state}
    with atomic_write(path, "wb") as f:
        torch.save(content, f)
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; bad files raise :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass a training run folder or a weights.EPOCH.pt file.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user error
        raise InputError(f"{path} could not be read as a cryoscape checkpoint ({type(err).__name__}); "
                         "pass a checkpoint.pt or weights.EPOCH.pt written by cryoscape train.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path} is not a cryoscape training checkpoint; pass a checkpoint.pt or "
                         "weights.EPOCH.pt written by cryoscape train.")
    return state


def load_latest_checkpoint(run_dir: str | os.PathLike, *, command: str = "train") -> dict[str, Any]:
    """The newest state of the run in ``run_dir``: its mid-epoch checkpoint when that is ahead of
    ``checkpoint.pt`` (a run stopped inside an epoch), else ``checkpoint.pt``."""
    run = Path(run_dir)
    full = run / CHECKPOINT_NAME
    partial = run / PARTIAL_CHECKPOINT_NAME
    state = load_checkpoint(full) if full.is_file() else None
    if partial.is_file():
        candidate = load_checkpoint(partial)
        done = -1 if state is None else int(state["epoch"])
        if int(candidate["partial"]["epoch"]) > done:
            return candidate
    if state is None:
        raise InputError(f"{run} holds no {CHECKPOINT_NAME}; pass the output folder of a cryoscape {command} run "
                         "that has written a checkpoint (after its first epoch, or within it with "
                         "--checkpoint-minutes).")
    return state


def available_epochs(run_dir: str | os.PathLike) -> list[int]:
    """Epochs with a ``weights.EPOCH.pt`` file in ``run_dir``, ascending."""
    out = []
    for p in Path(run_dir).glob("weights.*.pt"):
        m = _WEIGHTS_RE.match(p.name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def refuse_to_overwrite_run(out_dir: str | os.PathLike, command: str) -> None:
    """A new run must not overwrite another run's checkpoints (no run loses work): InputError when
    ``out_dir`` already holds ``checkpoint.pt`` or ``checkpoint.partial.pt``."""
    out = Path(out_dir)
    found = [name for name in (CHECKPOINT_NAME, PARTIAL_CHECKPOINT_NAME) if (out / name).is_file()]
    if found:
        raise InputError(f"{out} already holds a run ({found[0]}); continue it with `cryoscape {command} --resume "
                         f"{out}`, or pass another -o (or delete that folder) to start a new one.")


def find_checkpoint(run_dir: str | os.PathLike, epoch: int | None = None) -> Path:
    """The file holding ``epoch`` of a run (default: the latest, ``checkpoint.pt``).

    A path to a ``.pt`` file is returned unchanged.  Raises :class:`InputError` naming the
    epochs that exist when ``epoch`` has no file.
    """
    run = Path(run_dir)
    if run.is_file():
        return run
    if not run.is_dir():
        raise InputError(f"{run} was not found; pass the output folder of cryoscape train.")
    latest = run / CHECKPOINT_NAME
    if epoch is None or epoch < 0:
        if latest.is_file():
            return latest
        epochs = available_epochs(run)
        if not epochs:
            raise InputError(f"{run} holds no checkpoint.pt or weights.EPOCH.pt; pass the output folder "
                             "of a cryoscape train run that finished at least one epoch.")
        return weights_path(run, epochs[-1])
    path = weights_path(run, epoch)
    if path.is_file():
        return path
    if latest.is_file():
        state = torch.load(latest, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and state.get("epoch") == epoch:
            return latest
    epochs = available_epochs(run)
    listed = ", ".join(str(e) for e in epochs) or "none"
    raise InputError(f"{run} has no weights for epoch {epoch} (saved epochs: {listed}); "
                     "pass one of those to --epoch.")


def capture_rng_state() -> dict[str, Any]:
    """The torch, numpy and python global generator states (and CUDA's when present)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any] | None) -> None:
    """Restore generator states captured by :func:`capture_rng_state` (missing parts are skipped)."""
    if not state:
        return
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):  # different number of GPUs on resume
            pass
