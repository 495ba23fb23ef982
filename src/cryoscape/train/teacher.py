"""A latent teacher: a new run's VAE encoder starts from a finished run's (``--init-encoder RUN``).

Why: a decoder that learns its latent slowly (CryoFormer, whose hash grid fits the mean map before
the latent is of any use to it) can take the latent of a decoder that learns it fast (the voxel
basis: a 1000-image hinge in seconds) and spend its own epochs learning to *use* it.  The encoder is
the VAE's image encoder, independent of the decoder, so its weights carry over between decoders
trained on the same particles (it reads images normalised as in its own run, so a teacher trained
on other particles or another box does not fit); from there it trains with the new decoder as usual
(keeping it fixed for the first epochs was measured and did not help; README "Choosing a decoder:
CryoFormer").

Only ``cryoscape train`` has this option, and only for a run that starts fresh (a resumed run
has its own encoder in its checkpoint).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cryoscape.errors import InputError

__all__ = ["copy_encoder"]

log = logging.getLogger(__name__)


def copy_encoder(encoder: torch.nn.Module | None, source: str | Path) -> None:
    """Load the encoder weights of the run (folder, ``checkpoint.pt`` or ``weights.E.pt``) ``source``.

    Raises :class:`InputError` when this run has no encoder (``zdim 0``), the source has none, or
    their shapes differ (``--zdim``, ``--encoder``, ``--enc-layers/--enc-dim``, box size).
    """
    from cryoscape.train.checkpoint import find_checkpoint, load_checkpoint

    if encoder is None:
        raise InputError("--init-encoder copies a VAE encoder, so it needs --zdim > 0.")
    path = find_checkpoint(source)
    entry = load_checkpoint(path).get("encoder")
    if entry is None:
        raise InputError(f"{path} holds no encoder (a homogeneous run); pass a run trained with --zdim > 0.")
    theirs, ours = dict(entry["config"]), dict(encoder.config)
    if theirs != ours:
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ)
        raise InputError(f"the encoder of {path} differs from this run's ({detail}); use the same --zdim, "
                         "--encoder and --enc-* options as that run.")
    encoder.load_state_dict(entry["state"])
    log.info("encoder: copied from %s", path)

