"""The training loop of ``cryoscape train``: homogeneous (decoder only) or heterogeneous (VAE).

Entry points
------------
:func:`run_training`
    Load the particles named in a :class:`~cryoscape.train.config.TrainConfig`, prepare the run
    folder (config.yaml, run.log) and train.  ``config.load`` style initialisation from a
    weights file is ``run_training(config, out, init_from=PATH)``.
:func:`resume_training`
    Continue a run from its folder (``checkpoint.pt`` and the config saved in it).
:func:`train_model`
    The loop itself, for an already loaded :class:`~cryoscape.io.particles.ParticleTable`.

Each epoch visits the particles in an order that depends only on ``(seed, epoch)``
(:func:`cryoscape.data.training.epoch_order`) and draws the VAE's reparameterisation noise from a
generator seeded by ``(seed, epoch)``; the checkpoint written at the end of every epoch holds the
model, optimiser states and generator states, so a run interrupted after epoch ``e`` and resumed
gives the same weights and latents, bit for bit on the CPU, as one that never stopped.  The
objective is documented in :mod:`cryoscape.train.likelihood`.

Run folder
----------
``config.yaml``  every option plus what rebuilds the model (decoder name and config, encoder
config, data normalisation, box and pixel size); ``run.log``; ``loss.png`` (loss per epoch and
within epochs); ``checkpoint.pt`` (latest epoch, atomically replaced);
``weights.E.pt`` (every ``checkpoint_every`` epochs and the last); for ``zdim > 0``
``z.E.npy`` / ``z_logvar.E.npy`` (per-particle posterior means and log-variances collected
during epoch ``E``, in particle order) and ``z.E.pkl`` (cryoDRGN format: pickled float32
``(N, zdim)`` means); for homogeneous runs ``reconstruct.E.mrc`` when weights are saved; with
``refine_poses`` ``poses.E.pkl`` (cryoDRGN format) when weights are saved.  Epochs ``E`` count
from 0 (cryoDRGN 4.x counts from 1: our ``z.0.npy`` is its ``z.1.pkl``).

Speed
-----
Images are read, normalised, transformed (one ``rfft2`` per batch, gathered at the training
pixels) and their CTF evaluated at those pixels only, in a background thread two batches ahead;
the training step is then the encoder, one decoder call on ``B x P`` slice points, and the
loss.  At D = 64 with 256 x 3 networks about 75-90 % of the step is the decoder's matrix products
(forward and backward).  ``amp`` runs encoder and decoder under bfloat16 autocast (about 2x faster
on an AVX512-BF16 CPU, the same per-image FSC in bench/train.py); the loss stays in float32.  It
is on by default where the hardware has fast bfloat16 (:func:`cryoscape.models.precision.resolve_amp`), like cryoDRGN's
default mixed precision on GPUs.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.data.training import (
    DataNormalization,
    ParticleDataset,
    TrainingBatch,
    epoch_order,
    iterate_batches,
)
from cryoscape.errors import InputError
from cryoscape.geometry.rotations import rotation_about_axis
from cryoscape.io.writers import atomic_write
from cryoscape.models.precision import amp_dtype, autocast, resolve_amp
from cryoscape.models.vae import kl_divergence, reparameterize
from cryoscape.train.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    weights_path,
)
from cryoscape.train.config import TrainConfig
from cryoscape.train.warm_start import warm_start_decoder
from cryoscape.train.likelihood import centre_values, predict_values, squared_error, to_domain
from cryoscape.train.poses import PoseCorrections

__all__ = [
    "TrainingDiverged",
    "TrainResult",
    "train_model",
    "run_training",
    "resume_training",
    "load_tables",
    "build_decoder_for",
    "build_encoder_for",
    "build_dataset",
    "build_optimizers",
    "prepare_likelihood_pixels",
    "checkpoint_state",
    "tilt_rotation",
]

log = logging.getLogger(__name__)

_STEPS_PER_EPOCH_IN_PLOT = 50
_PLOT_INTERVAL_SECONDS = 60.0


class TrainingDiverged(InputError):
    """The loss became NaN or infinite; the message says which checkpoint is intact and what to do."""


@dataclass
class TrainResult:
    """What :func:`train_model` returns (everything is also in the run folder)."""

    out_dir: Path
    epochs_done: int
    history: list[dict[str, float]]
    decoder: torch.nn.Module
    encoder: torch.nn.Module | None
    normalization: DataNormalization
    z_mean: np.ndarray | None
    z_logvar: np.ndarray | None


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks ``cuda`` when a GPU is present, else ``cpu``."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def tilt_rotation(tilt_deg: float, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stage tilt as a ``(3, 3)`` rotation ``T``: right-handed, ``tilt_deg`` about the image x axis.

    A particle with pose ``R`` in the untilted image has pose ``T @ R`` in the tilted image: the
    stage rotates the specimen in the microscope frame (image x = tilt axis, z = beam), after
    the particle's own orientation.  A world point ``X`` appears at ``(T R X)_xy``.  A negative
    ``tilt_deg`` tilts the other way.
    """
    return rotation_about_axis(
        torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), math.radians(float(tilt_deg))
    ).to(dtype)


def build_decoder_for(config: TrainConfig, box_size: int):
    """The decoder named by ``config.decoder``, built with the options it accepts.

    The common options (box, zdim, ``dec_layers`` as ``layers``, ``dec_dim`` as ``width``,
    ``domain``, ``pe_type`` as ``encoding``, ``pe_dim`` as ``n_freqs``, ``gaussian_scale``,
    ``seed``) are passed when the decoder's constructor takes them; ``decoder_options`` are
    passed as they are.
    """
    from cryoscape.models.base import _REGISTRY, build_decoder, decoder_names

    names = decoder_names()
    if config.decoder not in names:
        raise InputError(f"--decoder {config.decoder} is not a known decoder; choose one of {', '.join(names)}.")
    common: dict[str, Any] = {
        "box_size": box_size,
        "zdim": config.zdim,
        "layers": config.dec_layers,
        "width": config.dec_dim,
        "domain": config.domain,
        "encoding": config.pe_type,
        "n_freqs": config.pe_dim,
        "gaussian_scale": config.gaussian_scale,
        "seed": config.seed,
    }
    params = inspect.signature(_REGISTRY[config.decoder]).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in common.items() if takes_any or k in params}
    kwargs.update(config.decoder_options or {})
    try:
        decoder = build_decoder(config.decoder, **kwargs)
    except (TypeError, ValueError) as err:
        raise InputError(f"the decoder {config.decoder} could not be built with these options ({err}); "
                         "fix the --dec-*/--pe-*/--decoder-opt options.") from None
    if getattr(decoder, "domain", config.domain) != config.domain:
        raise InputError(f"the decoder {config.decoder} works in the {decoder.domain} domain but "
                         f"--domain {config.domain} was asked; pass --domain {decoder.domain}.")
    return decoder


def build_encoder_for(config: TrainConfig, box_size: int):
    """The VAE encoder (``None`` when ``zdim == 0``): an image encoder, or a tilt-pair encoder."""
    if config.zdim <= 0:
        return None
    from cryoscape.models.encoders import build_encoder

    enc_config = {
        "type": "tilt_pair" if config.tilt else "image",
        "box_size": box_size,
        "zdim": config.zdim,
        "kind": config.encoder,
        "layers": config.enc_layers,
        "width": config.enc_dim,
    }
    if config.enc_mask_radius_fraction is not None:
        enc_config["mask_radius_fraction"] = config.enc_mask_radius_fraction
    try:
        return build_encoder(enc_config)
    except (TypeError, ValueError) as err:
        raise InputError(f"the encoder could not be built ({err}); fix the --encoder/--enc-* options.") from None


def load_tables(config: TrainConfig):
    """The particle table (and tilted table) named in ``config``, with ``ind``/``first`` applied."""
    from cryoscape.io.particles import load_particles, select_particles

    if not config.particles:
        raise InputError("no particles were given; pass a .star, .cs, .txt or .mrcs file.")
    table = load_particles(
        config.particles,
        datadir=config.datadir,
        poses_path=config.poses,
        ctf_path=config.ctf,
        pixel_size_angstrom=config.pixel_size_angstrom,
    )
    n_all = len(table)
    table = select_particles(table, ind=config.ind, first=config.first)
    tilted = None
    if config.tilt:
        tilted = load_particles(
            config.tilt,
            datadir=config.datadir,
            poses_path=config.tilt_poses,
            ctf_path=config.tilt_ctf,
            pixel_size_angstrom=config.pixel_size_angstrom,
        )
        if len(tilted) != n_all:
            raise InputError(
                f"{config.tilt} holds {len(tilted)} tilted particles but {config.particles} has {n_all}; "
                "pass the tilted partner of every untilted particle, in the same order."
            )
        tilted = select_particles(tilted, ind=config.ind, first=config.first)
    return table, tilted


def _prepare_tilted_table(table, tilted, tilt_deg: float):
    """The tilted table with poses ``T @ R`` of the untilted particles (and a CTF, shifts)."""
    T = tilt_rotation(tilt_deg, dtype=torch.float64).numpy()
    if tilted.box_size != table.box_size:
        raise InputError(
            f"{tilted.source_path} holds {tilted.box_size}-pixel images but the untilted particles are "
            f"{table.box_size} pixels; extract both in the same box."
        )
    ctf = tilted.ctf
    pixel = tilted.pixel_size_angstrom
    if ctf is None:
        log.info("%s has no CTF parameters; using the untilted particles' CTF for the tilted images",
                 tilted.source_path)
        ctf = table.ctf
        pixel = table.pixel_size_angstrom
    shifts = tilted.shifts_pixel
    if shifts is None:
        log.info("%s has no shifts; the tilted particles are taken as centred", tilted.source_path)
        shifts = np.zeros((len(tilted), 2))
    return dataclasses.replace(
        tilted,
        rotations=np.einsum("ij,njk->nik", T, np.asarray(table.rotations, dtype=np.float64)),
        shifts_pixel=shifts,
        ctf=ctf,
        pixel_size_angstrom=pixel,
    )


def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    value = int(np.random.SeedSequence([int(seed), int(epoch), 0x5A]).generate_state(1, dtype=np.uint64)[0] >> 1)
    gen = torch.Generator(device=device)
    gen.manual_seed(value)
    return gen


def _pose_param_groups(poses: PoseCorrections, pose_lr: float, box_size: int) -> list[dict[str, Any]]:
    """Rotation corrections at ``pose_lr`` (radians per step); shifts at ``pose_lr * D / 4`` pixels.

    A rotation by ``a`` radians moves the edge of a particle of radius ``~D/4`` by ``a * D / 4``
    pixels, so the two learning rates move the image by comparable amounts.
    """
    groups = [{"params": [poses.rotation.weight], "lr": pose_lr}]
    if poses.shift is not None:
        groups.append({"params": [poses.shift.weight], "lr": pose_lr * box_size / 4})
    return groups


def _make_adam(params, *, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam, fused into one kernel where this torch build supports it for the parameters' device."""
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _model_param_groups(decoder, encoder, lr: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(dense groups, sparse groups)`` of the decoder and encoder parameters.

    Generic decoder hook ``optimizer_param_groups()``: a decoder may return its own parameter
    groups, dicts with ``params`` and optionally ``lr_scale`` (the group's learning rate is
    ``lr_scale * --lr``; kept in the optimiser state, so resuming with another ``--lr`` keeps the
    ratio) and ``sparse`` (``True``: the parameters get ``torch.sparse_coo`` gradients and are
    updated by a row-sparse Adam, :class:`cryoscape.models.sparse_slice.RowSparseAdam`, without
    weight decay).  The encoder then forms a group of its own.  Without the hook, decoder and
    encoder share one group at ``--lr`` (as runs before the hook existed, so their checkpoints load).
    """
    enc = [] if encoder is None else list(encoder.parameters())
    hook = getattr(decoder, "optimizer_param_groups", None)
    if hook is None:
        return [{"params": list(decoder.parameters()) + enc, "lr": lr, "lr_scale": 1.0}], []
    dense, sparse = [], []
    for group in hook():
        group = dict(group)
        is_sparse = bool(group.pop("sparse", False))
        group["lr_scale"] = float(group.get("lr_scale", 1.0))
        group["lr"] = lr * group["lr_scale"]
        (sparse if is_sparse else dense).append(group)
    if enc:
        dense.append({"params": enc, "lr": lr, "lr_scale": 1.0})
    return dense, sparse


def _set_group_lrs(optimizer, lr: float) -> None:
    """``lr_scale * lr`` for every group (``lr_scale`` 1 where a group has none)."""
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr * float(group.get("lr_scale", 1.0))


def build_dataset(config: TrainConfig, table, *, resume_state: dict[str, Any] | None = None) -> ParticleDataset:
    """``table`` as training data, its normalisation fitted (or taken from ``resume_state``)."""
    dataset = ParticleDataset(
        table, domain=config.domain, use_ctf=config.use_ctf, in_memory=False if config.lazy else None
    )
    if resume_state is not None:
        dataset.normalization = DataNormalization.from_dict(resume_state["normalization"])
    else:
        dataset.fit_normalization(
            invert=config.invert_data,
            window=config.window,
            window_inner_radius_fraction=config.window_inner_radius_fraction,
            window_outer_radius_fraction=config.window_outer_radius_fraction,
            n_sample=config.n_normalization_images,
            seed=config.seed,
        )
    return dataset


def build_optimizers(config: TrainConfig, decoder, encoder):
    """``(Adam or None, row-sparse Adam or None)`` for the decoder and encoder (:func:`_model_param_groups`)."""
    dense_groups, sparse_groups = _model_param_groups(decoder, encoder, config.lr)
    # (a decoder whose parameters all have sparse gradients, e.g. a homogeneous voxel map, has no dense group)
    optimizer = _make_adam(dense_groups, lr=config.lr, weight_decay=config.weight_decay) if dense_groups else None
    sparse_optimizer = None
    if sparse_groups:
        from cryoscape.models.sparse_slice import RowSparseAdam

        sparse_optimizer = RowSparseAdam(sparse_groups, lr=config.lr)
    return optimizer, sparse_optimizer


def prepare_likelihood_pixels(config: TrainConfig, dataset: ParticleDataset, decoder, *, fresh: bool):
    """The training pixels with the likelihood's weights (``--noise-model``), on the CPU.

    Also calls the decoder hook ``set_data_spectrum(shell_rms, mean_ctf_squared=...)`` when
    ``fresh`` (a new run, not a resumed one): the per-shell RMS of the data (seed 003 eq. 5) and
    the mean CTF^2, for decoders that precondition or regularise Fourier-grid parameters with them.
    """
    pixels = dataset.pixels
    wants_spectrum = fresh and hasattr(decoder, "set_data_spectrum")
    if config.noise_model == "spectral" or wants_spectrum:
        from cryoscape.train.noise import estimate_noise_spectrum, spectral_pixel_weights

        spectrum = estimate_noise_spectrum(dataset, n_images=config.n_normalization_images, seed=config.seed)
        if config.noise_model == "spectral":
            pixels = spectral_pixel_weights(pixels, spectrum)
        if wants_spectrum:
            decoder.set_data_spectrum(torch.as_tensor(spectrum.shell_rms), mean_ctf_squared=spectrum.mean_ctf_squared)
    return pixels


def checkpoint_state(*, epoch: int, config: TrainConfig, decoder, encoder, optimizer, sparse_optimizer,
                     normalization: DataNormalization, history, steps, box_size: int, pixel_size: float,
                     n_particles: int, poses: PoseCorrections | None = None, pose_optimizer=None,
                     decoder_name: str | None = None) -> dict[str, Any]:
    """The checkpoint dict of :mod:`cryoscape.train.checkpoint` after ``epoch`` (generator states
    included); ``decoder_name`` (default ``config.decoder``) names the registered decoder class."""
    return {
        "epoch": epoch,
        "decoder": {"name": decoder_name or config.decoder, "config": dict(decoder.config),
                    "state": decoder.state_dict()},
        "encoder": None if encoder is None else {"config": dict(encoder.config), "state": encoder.state_dict()},
        "poses": None if poses is None else {
            "representation": poses.representation, "refine_shifts": poses.refine_shifts,
            "state": poses.state_dict(),
        },
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "pose_optimizer": None if pose_optimizer is None else pose_optimizer.state_dict(),
        "sparse_optimizer": None if sparse_optimizer is None else sparse_optimizer.state_dict(),
        "rng": capture_rng_state(),
        "normalization": normalization.to_dict(),
        "history": history,
        "steps": steps,
        "config": config.to_dict(),
        "data": {"box_size": box_size, "pixel_size_angstrom": pixel_size, "n_particles": n_particles},
    }


# --------------------------------------------------------------------------------------------
# the loss of one batch
# --------------------------------------------------------------------------------------------
def batch_loss(
    batch: TrainingBatch,
    *,
    decoder: torch.nn.Module,
    encoder: torch.nn.Module | None,
    poses: PoseCorrections | None,
    pixels,
    domain: str,
    beta: float,
    generator: torch.Generator | None = None,
    tilt_matrix: torch.Tensor | None = None,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """Loss of one batch (:mod:`cryoscape.train.likelihood`) and its parts.

    Returns a dict with ``loss`` (scalar to minimise), ``error`` (mean squared error term),
    ``kl`` (mean KL, 0 without encoder), and ``mu``, ``logvar`` (``(B, zdim)``, or ``None``).
    """
    D = pixels.box_size
    device = batch.values.device
    rot, shifts = batch.rotations, batch.shifts_pixel
    if poses is not None:
        rot, shifts = poses(batch.indices, rot, shifts)
    target = to_domain(centre_values(batch.values, pixels.coords_index, shifts, D), domain)
    tilted = batch.tilted
    mu = logvar = z = None
    with autocast(device, amp):
        if encoder is not None:
            if tilted is not None:
                mu, logvar = encoder(batch.images, tilted.images)
            else:
                mu, logvar = encoder(batch.images)
            mu, logvar = mu.float(), logvar.float()
            z = reparameterize(mu, logvar, generator=generator)
        if tilted is not None:
            rot_t = tilt_matrix.to(rot.dtype) @ rot
            t_target = to_domain(centre_values(tilted.values, pixels.coords_index, tilted.shifts_pixel, D), domain)
            ctf = None if batch.ctf is None else torch.cat([batch.ctf, tilted.ctf])
            pred = predict_values(decoder, torch.cat([rot, rot_t]), pixels, None if z is None else torch.cat([z, z]), ctf)
            target = torch.cat([target, t_target])
        else:
            pred = predict_values(decoder, rot, pixels, z, batch.ctf)
    pred = pred.to(torch.complex64) if pred.is_complex() else pred.float()
    error = squared_error(pred, target, pixels)
    if tilted is not None:
        B = batch.values.shape[0]
        error = error[:B] + error[B:]
    error = error.mean()
    if mu is not None:
        kl = kl_divergence(mu, logvar).mean()
        loss = error + (beta / pixels.n_circle) * kl
    else:
        kl = torch.zeros((), device=device)
        loss = error
    return {"loss": loss, "error": error, "kl": kl, "mu": mu, "logvar": logvar}


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
def _write_latents(out: Path, epoch: int, z_mean: np.ndarray, z_logvar: np.ndarray) -> None:
    for name, arr in ((f"z.{epoch}.npy", z_mean), (f"z_logvar.{epoch}.npy", z_logvar)):
        with atomic_write(out / name, "wb") as f:
            np.save(f, arr.astype(np.float32))
    with atomic_write(out / f"z.{epoch}.pkl", "wb") as f:
        pickle.dump(z_mean.astype(np.float32), f, protocol=4)


def plot_losses(history: list[dict[str, Any]], steps: list[tuple[float, float]], path: Path) -> None:
    """Loss per epoch (markers) and within epochs (thin line) into ``path`` (object API, no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    if steps:
        s = np.asarray(steps, dtype=np.float64)
        ax.plot(s[:, 0], s[:, 1], color="0.6", linewidth=0.8, label="within epoch")
    if history:
        e = np.array([h["epoch"] + 1 for h in history], dtype=np.float64)
        ax.plot(e, [h["loss"] for h in history], "o-", color="C0", label="epoch mean")
        if any(h.get("kl", 0.0) > 0 for h in history):
            ax.plot(e, [h["error"] for h in history], "s--", color="C1", markersize=3, label="squared error")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")


def _write_run_config(out: Path, config: TrainConfig, arguments: dict | None, *, decoder, encoder,
                      normalization: DataNormalization, box_size: int, pixel_size: float,
                      n_particles: int, resumed_from: int | None, command: str = "train",
                      decoder_name: str | None = None) -> None:
    from cryoscape.io.run_folder import write_config

    write_config(
        out,
        command,
        arguments if arguments is not None else config.to_dict(),
        training=config.to_dict(),
        model={
            "decoder": {"name": decoder_name or config.decoder, "config": dict(decoder.config)},
            "encoder": None if encoder is None else dict(encoder.config),
            "zdim": int(decoder.config.get("zdim", config.zdim)),  # the model's (abinit's search phase: 0)
            "domain": config.domain,
        },
        data={
            "box_size": int(box_size),
            "pixel_size_angstrom": None if not math.isfinite(pixel_size) else float(pixel_size),
            "n_particles": int(n_particles),
            "normalization": normalization.to_dict(),
        },
        resumed_from_epoch=resumed_from,
    )


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
def train_model(
    config: TrainConfig,
    table,
    out_dir: str | Path,
    *,
    tilted_table=None,
    resume_state: dict[str, Any] | None = None,
    continue_run: bool = False,
    arguments: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a decoder (and encoder) on ``table``; write the run folder ``out_dir``.

    Parameters
    ----------
    config
        All options (:class:`TrainConfig`).
    table
        The particles (:class:`cryoscape.io.particles.ParticleTable`) with poses and CTF.
    out_dir
        Run folder (created).
    tilted_table
        The tilted partners of ``table``'s particles, same order (``config.tilt`` mode).
    resume_state
        A checkpoint dict: start from its weights, optimiser and generator states, data
        normalisation and epoch (``--resume`` / ``--load``).
    continue_run
        Resuming in the same folder (``--resume``): keep its loss history.
    arguments
        The command-line arguments, recorded in config.yaml.

    Raises
    ------
    TrainingDiverged
        The loss became NaN or infinite (the last checkpoint on disk is left intact).
    """
    try:
        config.validate()
    except ValueError as err:
        raise InputError(f"{err}.") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.beta == "anneal" and config.beta_anneal_epochs is None:
        # fixed now, so that resuming with another --num-epochs keeps the schedule
        config = dataclasses.replace(config, beta_anneal_epochs=max(1, math.ceil(config.num_epochs / 4)))
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)

    dataset = build_dataset(config, table, resume_state=resume_state)
    normalization = dataset.normalization
    D = dataset.box_size
    N = len(dataset)
    tilted_dataset = None
    tilt_matrix = None
    if config.tilt:
        if tilted_table is None:
            raise InputError("--tilt was given but no tilted particles were loaded; pass the tilted .star/.mrcs file.")
        tilted_dataset = ParticleDataset(
            _prepare_tilted_table(table, tilted_table, config.tilt_deg),
            domain=config.domain,
            use_ctf=config.use_ctf,
            in_memory=False if config.lazy else None,
            normalization=normalization,
        )
        tilt_matrix = tilt_rotation(config.tilt_deg).to(device)

    decoder = build_decoder_for(config, D).to(device)
    encoder = build_encoder_for(config, D)
    if encoder is not None:
        encoder = encoder.to(device)
    poses = None
    if config.refine_poses:
        poses = PoseCorrections(
            dataset.rotations, representation=config.pose_representation, refine_shifts=config.refine_shifts
        ).to(device)
    params = list(decoder.parameters()) + ([] if encoder is None else list(encoder.parameters()))
    optimizer, sparse_optimizer = build_optimizers(config, decoder, encoder)
    pose_optimizer = None
    if poses is not None:
        pose_optimizer = torch.optim.SparseAdam(_pose_param_groups(poses, config.pose_lr, D), lr=config.pose_lr)
    amp = resolve_amp(config.amp, device)
    if amp:
        log.info("mixed precision%s: encoder and decoder in %s on %s (--no-amp for float32)",
                 "" if config.amp else " (automatic)", amp_dtype(device), device)
    elif config.amp:
        log.info("--amp is not available on %s; training in float32", device)
    else:
        log.info("training in float32%s", "" if config.amp is False else
                 f" (this {device.type} has no fast bfloat16; --amp forces mixed precision)")

    start_epoch = 0
    history: list[dict[str, Any]] = []
    steps: list[tuple[float, float]] = []
    resumed_from = None
    if resume_state is not None:
        try:
            decoder.load_state_dict(resume_state["decoder"]["state"])
            if encoder is not None:
                if resume_state.get("encoder") is None:
                    raise KeyError("encoder")
                encoder.load_state_dict(resume_state["encoder"]["state"])
            if poses is not None and resume_state.get("poses") is not None:
                poses.load_state_dict(resume_state["poses"]["state"])
            if optimizer is not None:
                optimizer.load_state_dict(resume_state["optimizer"])
            if pose_optimizer is not None and resume_state.get("pose_optimizer") is not None:
                pose_optimizer.load_state_dict(resume_state["pose_optimizer"])
            if sparse_optimizer is not None and resume_state.get("sparse_optimizer") is not None:
                sparse_optimizer.load_state_dict(resume_state["sparse_optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise InputError(
                f"the checkpoint does not fit this model ({type(err).__name__}: {str(err)[:200]}); "
                "use the same --zdim, --decoder and --enc/--dec sizes as the run that wrote it."
            ) from None
        _set_group_lrs(optimizer, config.lr)  # options given now win (e.g. a lower --lr)
        _set_group_lrs(sparse_optimizer, config.lr)
        for group in [] if optimizer is None else optimizer.param_groups:
            group["weight_decay"] = config.weight_decay
        if pose_optimizer is not None:
            for group, fresh in zip(pose_optimizer.param_groups, _pose_param_groups(poses, config.pose_lr, D)):
                group["lr"] = fresh["lr"]
        start_epoch = int(resume_state["epoch"]) + 1
        resumed_from = int(resume_state["epoch"])
        if continue_run:
            history = list(resume_state.get("history", []))
            steps = [tuple(s) for s in resume_state.get("steps", [])]
        restore_rng_state(resume_state.get("rng"))

    pixel_size = dataset.pixel_size_angstrom
    _write_run_config(out, config, arguments, decoder=decoder, encoder=encoder, normalization=normalization,
                      box_size=D, pixel_size=pixel_size, n_particles=N, resumed_from=resumed_from)
    n_params = sum(p.numel() for p in params)
    log.info(
        "training %s: %d particles, box %d, %s domain (%d pixels per image), zdim %d, %d parameters, "
        "batch %d, lr %g, on %s; epochs %d to %d",
        "a VAE" if encoder is not None else "a homogeneous decoder", N, D, config.domain,
        len(dataset.pixels), config.zdim, n_params, config.batch_size, config.lr, device,
        start_epoch, config.num_epochs - 1,
    )
    if start_epoch >= config.num_epochs:
        log.info("the run already finished %d epochs; pass a larger --num-epochs to train more", start_epoch)

    # Generic decoder hooks (all optional): set_data_spectrum (see prepare_likelihood_pixels);
    # warm_start(slices) before the first epoch of a new run (train/warm_start.py);
    # regularization_loss(n_images=N) -> scalar or None, added to every batch's loss (a prior,
    # per image); after_optimizer_step() after every step.
    pixels = prepare_likelihood_pixels(config, dataset, decoder, fresh=resume_state is None)
    regularization = getattr(decoder, "regularization_loss", None)
    after_step = getattr(decoder, "after_optimizer_step", None)
    pixels = pixels.to(device)
    if resume_state is None and config.warm_start_images:
        # decoders with a warm_start hook start from the consensus map (train/warm_start.py; set-up
        # like the noise spectrum above: logged with its own time, not in the first epoch's)
        warm_start_decoder(decoder, dataset, pixels, max_images=config.warm_start_images, seed=config.seed,
                           domain=config.domain, device=device)

    def get_batch(indices: np.ndarray) -> TrainingBatch:
        batch = dataset.get_batch(indices)
        if tilted_dataset is not None:
            batch.tilted = tilted_dataset.get_batch(indices)
        return batch

    zdim = config.zdim
    z_mean = z_logvar = None
    last_good = None
    if resume_state is not None and continue_run:
        last_good = (start_epoch - 1, out / CHECKPOINT_NAME)
    from tqdm.auto import tqdm

    n_batches = math.ceil(N / config.batch_size)
    check_every = 1 if device.type == "cpu" else 16
    plot_every = max(1, n_batches // _STEPS_PER_EPOCH_IN_PLOT)
    run_start = last_plot = time.perf_counter()
    epochs_this_call = 0
    for epoch in range(start_epoch, config.num_epochs):
        t0 = time.perf_counter()
        decoder.train()
        if encoder is not None:
            encoder.train()
        order = epoch_order(N, seed=config.seed, epoch=epoch, shuffle=config.shuffle)
        generator = _epoch_generator(config.seed, epoch, device) if encoder is not None else None
        if zdim > 0:
            z_mean = np.zeros((N, zdim), dtype=np.float32)
            z_logvar = np.zeros((N, zdim), dtype=np.float32)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, error, kl (weighted by batch size)
        window = torch.zeros((), dtype=torch.float64, device=device)
        window_n = 0
        seen = 0
        bar = tqdm(total=N, unit="img", desc=f"epoch {epoch + 1}/{config.num_epochs}",
                   disable=not config.progress, leave=False, dynamic_ncols=True)
        for b, batch in enumerate(iterate_batches(get_batch, order, config.batch_size, prefetch=config.prefetch)):
            batch = batch.to(device, non_blocking=True)
            B = int(batch.indices.shape[0])
            beta = config.beta_at(epoch + b / n_batches)
            parts = batch_loss(
                batch, decoder=decoder, encoder=encoder, poses=poses, pixels=pixels, domain=config.domain,
                beta=beta, generator=generator, tilt_matrix=tilt_matrix, amp=amp,
            )
            if regularization is not None:
                prior = regularization(n_images=N)
                if prior is not None:
                    parts["loss"] = parts["loss"] + prior
            loss = parts["loss"]
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            if sparse_optimizer is not None:
                sparse_optimizer.zero_grad(set_to_none=True)
            if pose_optimizer is not None:
                pose_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
            if sparse_optimizer is not None:
                sparse_optimizer.step()
            if after_step is not None:
                after_step()
            if pose_optimizer is not None and epoch >= config.pose_start_epoch:
                pose_optimizer.step()
            with torch.no_grad():
                detached = torch.stack([loss.detach(), parts["error"].detach(), parts["kl"].detach()]).double()
                sums += detached * B
                window += detached[0] * B
                window_n += B
            if parts["mu"] is not None:
                idx = batch.indices.numpy()
                z_mean[idx] = parts["mu"].detach().cpu().numpy()
                z_logvar[idx] = parts["logvar"].detach().cpu().numpy()
            seen += B
            if (b + 1) % check_every == 0 or b + 1 == n_batches:
                value = float(loss.detach()) if check_every == 1 else float(sums[0] / max(seen, 1))
                if not math.isfinite(value):
                    bar.close()
                    _raise_diverged(config, out, epoch, b, value, last_good)
                if config.progress:
                    bar.set_postfix(loss=f"{float(sums[0]) / seen:.4g}", refresh=False)
            if (b + 1) % plot_every == 0 or b + 1 == n_batches:
                steps.append((epoch + (b + 1) / n_batches, float(window) / max(window_n, 1)))
                window.zero_()
                window_n = 0
            bar.update(B)
        bar.close()

        totals = (sums / max(seen, 1)).tolist()
        if not all(math.isfinite(v) for v in totals):
            _raise_diverged(config, out, epoch, n_batches - 1, totals[0], last_good)
        seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch, "loss": totals[0], "error": totals[1], "kl": totals[2],
            "beta": config.beta_at(epoch + 1), "seconds": seconds, "images_per_second": seen / max(seconds, 1e-9),
        }
        history.append(record)
        epochs_this_call += 1

        # ---- outputs of the epoch: latents, checkpoint, weights, plot
        if zdim > 0:
            _write_latents(out, epoch, z_mean, z_logvar)
        state = checkpoint_state(
            epoch=epoch, config=config, decoder=decoder, encoder=encoder, optimizer=optimizer,
            sparse_optimizer=sparse_optimizer, poses=poses, pose_optimizer=pose_optimizer,
            normalization=normalization, history=history, steps=steps, box_size=D, pixel_size=pixel_size,
            n_particles=N,
        )
        save_checkpoint(out / CHECKPOINT_NAME, state)
        last_good = (epoch, out / CHECKPOINT_NAME)
        is_last = epoch == config.num_epochs - 1
        keep = is_last or (epoch + 1) % config.checkpoint_every == 0
        if keep:
            save_checkpoint(weights_path(out, epoch), state)
            _write_epoch_extras(out, epoch, decoder, poses, dataset, pixel_size)
        if keep or time.perf_counter() - last_plot > _PLOT_INTERVAL_SECONDS:
            plot_losses(history, steps, out / "loss.png")  # ~0.3 s, so not after every short epoch
            last_plot = time.perf_counter()

        remaining = config.num_epochs - epoch - 1
        per_epoch = (time.perf_counter() - run_start) / epochs_this_call
        log.info(
            "epoch %d/%d: loss %.5g (squared error %.5g, KL %.4g, beta %.3g) in %.1f s, %.0f img/s%s",
            epoch + 1, config.num_epochs, totals[0], totals[1], totals[2], record["beta"], seconds,
            record["images_per_second"],
            f"; about {_format_seconds(per_epoch * remaining)} left" if remaining else "",
        )

    return TrainResult(
        out_dir=out, epochs_done=start_epoch + epochs_this_call,
        history=history, decoder=decoder, encoder=encoder, normalization=normalization,
        z_mean=z_mean, z_logvar=z_logvar,
    )


def _write_epoch_extras(out: Path, epoch: int, decoder, poses, dataset: ParticleDataset, pixel_size: float) -> None:
    """Map of a homogeneous decoder and refined poses, written with the weights."""
    from cryoscape.io.cryodrgn import write_poses_pkl
    from cryoscape.io.mrc import write_mrc

    if decoder.zdim == 0:
        was_training = decoder.training
        decoder.eval()
        volume = decoder.eval_volume(None)
        decoder.train(was_training)
        write_mrc(out / f"reconstruct.{epoch}.mrc", volume.cpu().numpy(),
                  pixel_size_angstrom=pixel_size if math.isfinite(pixel_size) else 1.0)
    if poses is not None:
        R, t = poses.corrected(dataset.rotations, dataset.shifts_pixel)
        write_poses_pkl(out / f"poses.{epoch}.pkl", R, t, box_size=dataset.box_size)


def _format_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _raise_diverged(config: TrainConfig, out: Path, epoch: int, batch: int, value: float, last_good) -> None:
    if last_good is None:
        kept = "no checkpoint had been written yet"
        then = f"restart with a lower learning rate, e.g. --lr {config.lr / 10:g} (now {config.lr:g})"
    else:
        kept = f"the checkpoint of epoch {last_good[0]} ({last_good[1]}) is intact"
        then = (f"lower the learning rate, e.g. --lr {config.lr / 10:g} (now {config.lr:g}), and continue with "
                f"cryoscape train --resume {out} --lr {config.lr / 10:g}, or restart")
    raise TrainingDiverged(
        f"the training loss became {value} in epoch {epoch} (batch {batch}); {kept}; {then}."
    )


# --------------------------------------------------------------------------------------------
# entry points for the command line
# --------------------------------------------------------------------------------------------
def run_training(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    arguments: dict[str, Any] | None = None,
    init_from: str | Path | None = None,
) -> TrainResult:
    """Load the particles of ``config``, set up the run folder and log, and train.

    ``init_from``: a ``checkpoint.pt`` / ``weights.E.pt`` (or a run folder) whose weights,
    optimiser state, normalisation and epoch the new run starts from (cryoDRGN's ``--load``).
    """
    from cryoscape.io.run_folder import attach_log_file, detach_log_file

    try:
        config.validate()
    except ValueError as err:
        raise InputError(f"{err}.") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = attach_log_file(out / "run.log")
    try:
        resume_state = None
        if init_from is not None:
            resume_state = load_checkpoint(find_checkpoint(init_from))
            log.info("starting from %s (epoch %d)", init_from, resume_state["epoch"])
        table, tilted = load_tables(config)
        return train_model(config, table, out, tilted_table=tilted, resume_state=resume_state,
                           arguments=arguments)
    finally:
        detach_log_file(handler)


_RESUME_OVERRIDES = ("num_epochs", "lr", "weight_decay", "pose_lr", "device", "progress", "checkpoint_every",
                     "prefetch", "datadir", "amp", "lazy")


def load_resume_state(run: Path, config_class: type, overrides: dict[str, Any], allowed: tuple[str, ...], *,
                      command: str) -> tuple[dict[str, Any], Any]:
    """``(checkpoint state, config)`` of the run folder ``run`` to resume, with ``overrides`` (only
    the ``allowed`` keys; ``None`` values are ignored) applied to the saved config."""
    if not (run / CHECKPOINT_NAME).is_file():
        raise InputError(f"{run} holds no {CHECKPOINT_NAME}; pass the output folder of a cryoscape {command} run "
                         "that finished at least one epoch.")
    state = load_checkpoint(run / CHECKPOINT_NAME)
    config = config_class.from_dict(state["config"])
    for key, value in overrides.items():
        if key not in allowed:
            raise ValueError(f"{key} cannot be changed when resuming")
        if value is not None:
            setattr(config, key, value)
    return state, config


def check_particle_count(config: TrainConfig, table, state: dict[str, Any]) -> None:
    """Refuse to resume when the particle files now give another number of particles."""
    if len(table) != state["data"]["n_particles"]:
        raise InputError(f"{config.particles} now gives {len(table)} particles but the run was trained on "
                         f"{state['data']['n_particles']}; restore the original particle files.")


def resume_training(
    run_dir: str | Path,
    *,
    arguments: dict[str, Any] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Continue the run in ``run_dir`` from its ``checkpoint.pt``, in the same folder.

    ``overrides`` may change ``num_epochs`` (to train longer), ``lr``, ``weight_decay``,
    ``pose_lr``, ``device``, ``progress``, ``checkpoint_every``, ``prefetch``, ``datadir``,
    ``amp`` and ``lazy``; everything else comes from the checkpoint.
    """
    from cryoscape.io.run_folder import attach_log_file, detach_log_file

    run = Path(run_dir)
    state, config = load_resume_state(run, TrainConfig, overrides, _RESUME_OVERRIDES, command="train")
    handler = attach_log_file(run / "run.log")
    try:
        log.info("resuming %s after epoch %d", run, state["epoch"])
        table, tilted = load_tables(config)
        check_particle_count(config, table, state)
        return train_model(config, table, run, tilted_table=tilted, resume_state=state, continue_run=True,
                           arguments=arguments)
    finally:
        detach_log_file(handler)
