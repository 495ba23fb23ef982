"""A latent teacher: a new run's VAE encoder starts from a finished run's (``--init-encoder RUN``).

Why: a decoder that learns its latent slowly (CryoFormer, whose hash grid fits the mean map before
the latent is of any use to it) can take the latent of a decoder that learns it fast (the voxel
basis: a 1000-image hinge in seconds) and spend its own epochs learning to *use* it.  The encoder is
the VAE's image encoder, independent of the decoder, so its weights carry over between decoders
trained on the same particles (it reads images normalised as in its own run, so a teacher trained
on other particles or another box does not fit); from there it trains with the new decoder as usual
(keeping it fixed for the first epochs was measured and did not help; README "Choosing a decoder:
CryoFormer").

The automatic teacher (``--teacher-epochs N``; by default the decoder's
:attr:`~cryoscape.models.base.VolumeDecoder.teacher_epochs`, 12 for CryoFormer, 0 for the others):
a fresh run with a latent first trains that voxel-basis run itself, in ``RUN/teacher`` (a complete
run folder with its own run.log), and starts its encoder from it.  Why by default for CryoFormer: on
the D=64 hinge with enough images to learn it, its latent alone collapsed onto the prior while the
basis ordered the hinge in a fraction of the time (README "Choosing a decoder: CryoFormer", *The
latent at D=64*).  A finished teacher in ``RUN/teacher`` (a run stopped after it) is reused when it
was trained on the same particles and poses with the same encoder, length and seed; otherwise the run stops
with one sentence naming the options that differ.

``cryoscape train`` has both options, for a run that starts fresh (a resumed run has its own encoder
in its checkpoint; ``--load`` brings one).  ``cryoscape abinit`` has ``--teacher-epochs``: when its new
VAE takes over from the homogeneous search model (the switch of train/abinit.py), the teacher is
trained on the poses found so far (:meth:`~cryoscape.train.pose_sources.PoseSource.posed_table`) and
the VAE's encoder starts from it (:meth:`~cryoscape.train.trainer.Trainer.teach`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import torch

from cryoscape.errors import InputError
from cryoscape.train.checkpoint import available_epochs, find_checkpoint, load_checkpoint
from cryoscape.train.config import TrainConfig

__all__ = ["copy_encoder", "teacher_epochs_for", "teacher_config", "train_teacher"]

log = logging.getLogger(__name__)


def copy_encoder(encoder: torch.nn.Module | None, source: str | Path) -> None:
    """Load the encoder weights of the run (folder, ``checkpoint.pt`` or ``weights.E.pt``) ``source``.

    Raises :class:`InputError` when this run has no encoder (``zdim 0``), the source has none, or
    their shapes differ (``--zdim``, ``--encoder``, ``--enc-layers/--enc-dim``, box size).
    """
    if encoder is None:
        raise InputError("--init-encoder copies a VAE encoder, so it needs --zdim > 0.")
    path = find_checkpoint(source)
    entry = load_checkpoint(path).get("encoder")
    if entry is None:
        raise InputError(f"{path} holds no encoder (a homogeneous run); pass a run trained with --zdim > 0.")
    theirs, ours = dict(entry["config"]), dict(encoder.config)
    detail = _differences(theirs, ours, sorted(set(theirs) | set(ours)), "here")
    if detail:
        raise InputError(f"the encoder of {path} differs from this run's ({detail}); use the same --zdim, "
                         "--encoder and --enc-* options as that run.")
    encoder.load_state_dict(entry["state"])
    log.info("encoder: copied from %s", path)


def teacher_epochs_for(config) -> int:
    """The epochs of the teacher a fresh ``train`` run trains first (0: none): ``--teacher-epochs``, else the
    decoder's default; none without a latent, for the basis itself, or when ``--init-encoder`` names one."""
    from cryoscape.models.base import decoder_class

    if config.init_encoder and config.teacher_epochs:
        raise InputError("--init-encoder names a teacher run, so leave --teacher-epochs out (or pass 0).")
    if config.zdim <= 0 or config.init_encoder or config.decoder == "basis":
        return 0
    if config.teacher_epochs is not None:
        return int(config.teacher_epochs)
    return int(decoder_class(config.decoder).teacher_epochs)


def teacher_config(config):
    """The teacher run's options (a ``cryoscape train`` :class:`~cryoscape.train.config.TrainConfig`, also for
    an ab initio student): the voxel basis at its own defaults (learning rate, batch, width) in its Fourier
    domain, with the student's data, encoder, latent and KL weight, on the table's poses (neither refined nor
    predicted), and without the refits after its epochs (they re-solve its maps and latents, not its
    encoder, the one thing the student takes)."""
    epochs = int(config.teacher_epochs)
    train_options = TrainConfig.from_dict(config.to_dict())  # train's options only (an AbinitConfig has more)
    return dataclasses.replace(train_options, decoder="basis", decoder_options={}, domain="fourier", lr=None,
                               batch_size=None, dec_dim=None, num_epochs=epochs, refine_poses=False,
                               pose_source="table", latent_search_epochs=None, latent_search_start=None, refit=False,
                               refit_latents=False, init_encoder=None, teacher_epochs=0, checkpoint_every=epochs)


def train_teacher(config, table, out: str | Path, *, tilted_table=None, dist=None) -> Path:
    """Train the teacher of ``config`` (``config.teacher_epochs`` epochs of :func:`teacher_config`) in
    ``out/teacher``, or reuse a finished one there; returns its folder."""
    from cryoscape.train.loop import train_model

    folder = Path(out) / "teacher"
    teacher = teacher_config(config)
    if _finished_epochs(folder) >= teacher.num_epochs:
        _check_same_teacher(folder, teacher)
        log.info("teacher: the finished voxel-basis run in %s starts the encoder", folder)
        return folder
    epochs = f"{teacher.num_epochs} epoch{'' if teacher.num_epochs == 1 else 's'}"
    log.info("teacher: a voxel-basis run of %s in %s (its own run.log) first, to start the encoder from "
             "(--teacher-epochs 0: none)", epochs, folder)
    t0 = time.perf_counter()
    with _own_log(folder, dist is None or dist.is_main):
        train_model(teacher, table, folder, tilted_table=tilted_table, dist=dist)
    log.info("teacher: %s in %.1f s", epochs, time.perf_counter() - t0)
    return folder


#: the options that make a finished teacher this run's teacher (its data and poses, its encoder, its length and seed)
_SAME_TEACHER = ("particles", "poses", "ctf", "zdim", "encoder", "enc_layers", "enc_dim", "num_epochs", "seed")


def _check_same_teacher(folder: Path, teacher) -> None:
    """Raise :class:`InputError` when the finished run in ``folder`` was trained with other
    :data:`_SAME_TEACHER` options than ``teacher`` (a run folder reused after its options changed)."""
    theirs = load_checkpoint(find_checkpoint(folder)).get("config", {})
    detail = _differences(theirs, teacher.to_dict(), _SAME_TEACHER, "now")
    if detail:
        raise InputError(f"{folder} holds a teacher trained with other options ({detail}); remove that folder to "
                         "train a new one, or pass --teacher-epochs 0.")


def _differences(theirs: dict, ours: dict, keys, ours_word: str) -> str:
    """``"key: THEIRS there, OURS <ours_word>"`` for each of ``keys`` whose values differ, comma-separated
    ("" when none does): the detail of the errors above."""
    return ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} {ours_word}" for k in keys
                     if theirs.get(k) != ours.get(k))


def _finished_epochs(folder: Path) -> int:
    """Epochs a run in ``folder`` finished, by its last ``weights.E.pt`` (the teacher writes one, after its
    last epoch; 0 when there is none)."""
    return max(available_epochs(folder), default=-1) + 1


@contextlib.contextmanager
def _own_log(folder: Path, main: bool):
    """While the teacher trains, the package's records go to its own run.log (and the console), not the
    student's (whose run.log then holds only its own epochs)."""
    from cryoscape.io.run_folder import attach_log_file, detach_log_file

    if not main:
        yield
        return
    logger = logging.getLogger("cryoscape")
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    for h in files:
        logger.removeHandler(h)
    folder.mkdir(parents=True, exist_ok=True)
    handler = attach_log_file(folder / "run.log")
    try:
        yield
    finally:
        detach_log_file(handler)
        for h in files:
            logger.addHandler(h)
