"""Ab initio reconstruction (``cryoscape abinit``): learn a map and the particles' poses together.

The schedule (thesis 5.3.3, Fig. 5-1e)
--------------------------------------
1. **Warm-up**: ``pretrain_images`` images are fitted with uniformly random rotations (zero
   shifts).  The model becomes a rotationally blurred average: the right size, density and
   radial profile, which is what the first pose search needs to get started.
2. **Search epochs** (every ``search_every``-th epoch, starting at epoch 0): the particles are
   visited in chunks; each chunk's poses are searched with the current model
   (:func:`cryoscape.posesearch.search.search_poses`: exhaustive base grid, then ``n_refine``
   rounds of local refinement) and the model is then trained on that chunk with the new poses,
   so it improves within the epoch.  Small chunks make this a stochastic EM: the model that
   searches the next chunk has already learnt from the last one.  On 2000 images at SNR 0.1
   (D = 64) chunks of 64 images reached a median rotation error of 6 degrees after five searches
   where chunks of 500 stalled at 60 degrees.  A homogeneous search evaluates the decoder once
   per chunk on a lattice whose size grows as ``k_top^3``, so the chunk grows with the band:
   ``search_chunk * (k_top / k_min)^3`` images (at most 32 times ``search_chunk``), which keeps
   that evaluation a small share of the search.
3. **Reuse epochs** (the others): ordinary training with the latest poses.  A pose search costs
   several training passes, while the model needs many gradient steps per pose update, so
   reusing poses for ``search_every - 1`` epochs buys model quality cheaply (thesis: N = 5).
4. Optional **resets** (``reset_epochs``, ``reset_before_final``): the model and the optimiser
   are re-initialised while the poses are kept.  This cures the "vanishing gradients" pathology
   of coordinate networks trained on a moving target (thesis 5.3.3, Fig. 5-4): early, blurry
   poses teach the network a constant at high frequencies that later gradients cannot undo.
   A reset is only allowed before an epoch that does not search (a search with an untrained
   model would throw the poses away).
5. Optional **final epochs** (``final_epochs``) with the poses fixed, on the whole frequency
   circle.

Heterogeneous runs (``zdim > 0``) have two phases by default (:meth:`AbinitConfig.vae_start`):
a homogeneous model (``zdim`` 0, the fast lattice search) runs steps 1-4, and at the first final
epoch a new VAE (decoder and encoder, fresh weights) takes over and learns the heterogeneity on
the poses found (``vae_start_epoch`` moves the switch; 0 is the thesis's schedule, the VAE
searching from the start with latents from its encoder).  On the 1000-image, 32-px hinge test the
VAE-from-the-start schedule reached 8.9 degrees and a latent that followed the pose errors
(|Spearman| 0.18); the two-phase one 7.1 degrees and |Spearman| 0.878 to the hinge angle.

A decoder that does not align from random poses (the voxel basis: a voxel map has no smoothness
of its own) trains in the second phase only: the search model is another decoder
(:meth:`AbinitConfig.pose_search_decoder`, the neural field by default for the basis), and the
switch happens at the first final epoch also when ``zdim`` is 0.  Whenever a model is rebuilt
after poses were found (the switch, a reset), a decoder with a warm-start hook starts from the
backprojection with the current poses (:mod:`cryoscape.train.warm_start`).

Frequency marching
------------------
Each search runs from the band ``|k| < k_min`` (base grid) to ``k_top(epoch)`` (last round), and
``k_top`` grows linearly from ``k_min`` at epoch 0 to ``k_max`` at epoch ``k_ramp_epochs``
(default: the last search epoch): early models have no high-resolution content worth aligning
to, and the searches are cheaper.  With ``band_limit_training`` (default) training uses the same
band until the final epochs, so early epochs are faster too and the network does not fit noise
at frequencies the poses cannot yet support.  Frequencies are radii in Fourier pixels
(``|k| * D``, Nyquist ``D / 2``).  With ``adaptive_refine`` (default) a search also stops
refining once its grid is finer than its top band can resolve, about ``1 / k_top`` radians (the
turn that moves the band's edge by one Fourier pixel): 2 rounds at 12 pixels, 4 at 32, from the
15-degree base grid.

What is reused from ``cryoscape train``
----------------------------------------
Data loading and normalisation, the model and optimiser construction (including decoder hooks),
the likelihood (:func:`cryoscape.train.loop.batch_loss`), checkpoints and the run folder all come
from :mod:`cryoscape.train.loop`, so an ab initio run folder is a training run folder:
``config.yaml`` (command ``abinit``), ``run.log``, ``checkpoint.pt``, ``weights.E.pt``,
``reconstruct.E.mrc`` (homogeneous), ``z.E.npy`` / ``z_logvar.E.npy`` / ``z.E.pkl`` (VAE), and
``cryoscape analyze`` / ``volumes`` read it unchanged.  In addition every epoch writes its poses:

``poses.E.npz``  (ours) ``rotations`` (N, 3, 3), ``shifts_pixel`` (N, 2, RELION sign),
                 ``search_error`` (N,), ``searched_epoch`` (N,), ``wall_seconds`` (since the
                 run started, for time-to-accuracy curves);
``poses.E.pkl``  cryoDRGN's format (``(rots, trans = shifts / D)``), usable as ``--poses``;
and the last epoch writes ``particles.star`` (RELION 3.1 with the poses) when the pixel size is
known.  Checkpoints hold the poses, so ``resume_abinit`` continues a run exactly where it
stopped (a reuse epoch resumes with the poses of the last search).
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
from cryoscape.geometry.rotations import random_rotations, rotation_angle_between
from cryoscape.geometry.so3_grid import base_grid_spacing_deg
from cryoscape.io.writers import atomic_write
from cryoscape.posesearch.lattice import evaluate_lattice
from cryoscape.posesearch.search import SearchSettings, grid_summary, half_plane_pixels, search_poses
from cryoscape.train.checkpoint import (
    CHECKPOINT_NAME,
    restore_rng_state,
    save_checkpoint,
    weights_path,
)
from cryoscape.train.config import TrainConfig
from cryoscape.train.loop import (
    TrainResult,
    _epoch_generator,
    _format_seconds,
    _raise_diverged,
    _write_latents,
    _write_run_config,
    batch_loss,
    build_dataset,
    build_decoder_for,
    build_encoder_for,
    build_optimizers,
    check_particle_count,
    checkpoint_state,
    load_resume_state,
    load_tables,
    plot_losses,
    prepare_likelihood_pixels,
    resolve_device,
)
from cryoscape.models.precision import resolve_amp
from cryoscape.train.warm_start import warm_start_decoder

__all__ = ["AbinitConfig", "AbinitResult", "run_abinit", "resume_abinit", "abinit_model", "epoch_plan"]

log = logging.getLogger(__name__)

SEARCH, REUSE, FINAL = "search", "reuse", "final"


@dataclass
class AbinitConfig(TrainConfig):
    """Options of ``cryoscape abinit``: those of :class:`TrainConfig` (data, model, optimiser) plus
    the schedule and the pose search grid (see the module docstring and ``cryoscape abinit --help``).

    ``poses``, ``refine_poses`` and tilt pairs do not apply (the poses are what is searched);
    ``warm_start_images`` applies when the model is rebuilt after poses were found (the VAE
    switch, a reset): a decoder with a warm-start hook (the basis) then starts from the
    backprojection with the current poses instead of from zero.
    """

    # ---- defaults that differ from cryoscape train's (what the tests and bench/abinit.py validate:
    # a consensus map needs less capacity than a heterogeneous ensemble, and the stochastic
    # search/train alternation needs a model that follows the poses quickly)
    dec_dim: int = 128
    lr: float = 1e-3
    batch_size: int = 16
    num_epochs: int = 16
    # ---- schedule
    pretrain_images: int = 4000
    search_every: int = 2
    final_epochs: int = 0
    reset_epochs: list[int] = field(default_factory=list)
    reset_before_final: bool = False
    vae_start_epoch: int | None = None  # None: the first final epoch with --zdim and --final-epochs, else 0
    search_decoder: str | None = None  # None: the decoder itself, the neural field for the voxel basis
    search_chunk: int = 64
    band_limit_training: bool = True
    # ---- pose search
    base_level: int = 1
    n_refine: int = 4
    n_keep: int = 8
    n_keep_base: int | None = 32
    k_min: float = 12.0
    k_max: float = 32.0
    k_ramp_epochs: int | None = None
    t_extent_pixel: float = 10.0
    t_n_per_axis: int = 7
    search_oversampling: float = 2.0
    adaptive_refine: bool = True

    def validate(self) -> None:
        """:meth:`TrainConfig.validate` plus the schedule's own checks."""
        super().validate()
        if self.tilt:
            raise ValueError("cryoscape abinit does not take tilt pairs; run cryoscape train --tilt on its poses")
        if self.refine_poses:
            raise ValueError("--refine-poses does not apply to abinit (the poses are searched)")
        if self.search_every < 1:
            raise ValueError(f"--search-every must be at least 1, got {self.search_every}")
        if not 0 <= self.final_epochs < self.num_epochs:
            raise ValueError(f"--final-epochs must be between 0 and --num-epochs - 1 ({self.num_epochs - 1}), "
                             f"got {self.final_epochs}")
        if self.pretrain_images < 0 or self.search_chunk < 1:
            raise ValueError("--pretrain must be >= 0 and --search-chunk >= 1")
        plan = epoch_plan(self)
        if self.vae_start_epoch is not None:
            if not 0 <= self.vae_start_epoch < self.num_epochs:
                raise ValueError(f"--vae-start-epoch must be between 0 and --num-epochs - 1 ({self.num_epochs - 1}), "
                                 f"got {self.vae_start_epoch}")
            if self.vae_start_epoch and self.zdim <= 0 and not self.switches_decoder():
                raise ValueError("--vae-start-epoch needs --zdim > 0 (it is when the VAE takes over from the "
                                 "homogeneous model)")
        if self.search_decoder is not None:
            from cryoscape.models.base import decoder_names

            if self.search_decoder not in decoder_names():
                raise ValueError(f"--search-decoder {self.search_decoder} is not a known decoder; choose one of "
                                 f"{', '.join(decoder_names())}")
        if self.switches_decoder() and not self.vae_start():
            raise ValueError(f"--decoder {self.decoder} trains after the {self.pose_search_decoder()} has searched "
                             f"the poses, which needs --final-epochs N (or --vae-start-epoch with --zdim); or pass "
                             f"--search-decoder {self.decoder} to search with it from the start")
        start = self.vae_start()
        if start and plan[start] == SEARCH:
            raise ValueError(f"--vae-start-epoch {start} is a search epoch; the new VAE must first "
                             "train on the poses (choose an epoch that is not a multiple of --search-every)")
        for e in self.reset_epochs:
            if not 0 < e < self.num_epochs:
                raise ValueError(f"--reset-epochs {e} is outside epochs 1..{self.num_epochs - 1}")
            if plan[e] == SEARCH:
                raise ValueError(f"--reset-epochs {e} is a search epoch; a reset must come before an epoch that "
                                 "reuses the poses (choose an epoch that is not a multiple of --search-every)")
        self.search_settings(64).validate()

    # ---- derived values
    def pose_search_decoder(self) -> str:
        """The decoder of the model that searches the poses: ``search_decoder``, or by default the
        decoder itself, except for the voxel basis, which does not align from random poses (on the
        32-px hinge its searches stalled at 62-74 degrees, with or without a Wiener backprojection
        after every search: a voxel map has no smoothness of its own), so the neural field
        searches and the basis takes over at the first final epoch."""
        if self.search_decoder is not None:
            return self.search_decoder
        return "neural_field" if self.decoder == "basis" else self.decoder

    def switches_decoder(self) -> bool:
        """Whether the poses are searched with another decoder than the one trained at the end."""
        return self.pose_search_decoder() != self.decoder

    def vae_start(self) -> int:
        """The epoch at which the final model (the VAE, or the ``--decoder`` when another decoder
        searched the poses) takes over from the homogeneous search model (0: no such phase):
        ``vae_start_epoch``, or by default, with ``zdim > 0`` or a search decoder of its own and
        final epochs, the first final epoch (the homogeneous model searches the poses, the final
        model learns on them), else 0 (the thesis's schedule: the VAE searches from the start)."""
        if self.zdim <= 0 and not self.switches_decoder():
            return 0
        if self.vae_start_epoch is not None:
            return int(self.vae_start_epoch)
        return self.num_epochs - self.final_epochs if self.final_epochs > 0 else 0

    def phase_config(self, epoch: int) -> "AbinitConfig":
        """The options of the model trained at ``epoch``: the homogeneous search model (``zdim`` 0,
        :meth:`pose_search_decoder`) before :meth:`vae_start`, else these."""
        if epoch < self.vae_start():
            if self.switches_decoder():  # the final decoder's options are not the search decoder's
                return dataclasses.replace(self, zdim=0, decoder=self.pose_search_decoder(), decoder_options={})
            return dataclasses.replace(self, zdim=0)
        return self

    def search_epochs(self) -> list[int]:
        """The epochs that search poses."""
        return [e for e, kind in enumerate(epoch_plan(self)) if kind == SEARCH]

    def band_at(self, epoch: int, box_size: int) -> float:
        """``k_top``: the search's top band (and the training band) at ``epoch``, in Fourier pixels."""
        nyquist = box_size / 2.0
        searches = [e for e in self.search_epochs() if e <= epoch]
        last = searches[-1] if searches else 0
        ramp = self.k_ramp_epochs if self.k_ramp_epochs is not None else (self.search_epochs() or [0])[-1]
        frac = 1.0 if ramp <= 0 else min(1.0, last / ramp)
        k_min = min(self.k_min, nyquist)
        return min(k_min + (min(self.k_max, nyquist) - k_min) * frac, nyquist)

    def chunk_at(self, k_top: float, box_size: int) -> int:
        """Images per search chunk when the top band is ``k_top`` (see the module docstring)."""
        k_min = min(self.k_min, box_size / 2.0)
        growth = min(32.0, max(1.0, k_top / k_min) ** 3)
        return max(1, int(round(self.search_chunk * growth)))

    def search_settings(self, box_size: int, *, k_top: float | None = None, amp: bool = False) -> SearchSettings:
        """The :class:`SearchSettings` of a search whose last round uses the band ``k_top``."""
        nyquist = box_size / 2.0
        k_min = min(self.k_min, nyquist)
        k_top = max(k_min, min(k_top if k_top is not None else self.k_max, nyquist))
        n_refine = self.n_refine
        if self.adaptive_refine:
            # stop refining once the grid is finer than the band can resolve: about 1 / k_top radians
            # (the angle that moves the band's edge by one Fourier pixel)
            base = base_grid_spacing_deg(self.base_level)
            n_refine = min(n_refine, max(1, math.ceil(math.log2(base / math.degrees(1.0 / k_top)))))
        return SearchSettings(
            base_level=self.base_level, n_refine=n_refine, n_keep=self.n_keep, n_keep_base=self.n_keep_base,
            k_min=k_min, k_max=k_top,
            t_extent_pixel=self.t_extent_pixel, t_n_per_axis=self.t_n_per_axis,
            oversampling=self.search_oversampling, amp=amp,
        )


def epoch_plan(config: AbinitConfig) -> list[str]:
    """Kind of every epoch: ``"search"``, ``"reuse"`` or ``"final"`` (module docstring)."""
    n_search_part = config.num_epochs - config.final_epochs
    return [FINAL if e >= n_search_part else (SEARCH if e % config.search_every == 0 else REUSE)
            for e in range(config.num_epochs)]


@dataclass
class AbinitResult(TrainResult):
    """:class:`TrainResult` plus the final poses (also in the run folder)."""

    rotations: np.ndarray | None = None  # (N, 3, 3)
    shifts_pixel: np.ndarray | None = None  # (N, 2)


# --------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------
def _band_pixels(pixels: FourierPixels, radius: float) -> tuple[FourierPixels, torch.Tensor | None]:
    """The training pixels with ``|k| < radius`` and the mask that selects them (``None``: all)."""
    r2 = pixels.coords_index.square().sum(-1)
    if radius >= pixels.box_size / 2.0:
        return pixels, None
    mask = r2 < radius * radius
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


def _with_poses(batch: TrainingBatch, rotations: torch.Tensor, shifts: torch.Tensor) -> TrainingBatch:
    idx = batch.indices
    dev = batch.values.device
    return dataclasses.replace(batch, rotations=rotations[idx].to(dev), shifts_pixel=shifts[idx].to(dev))


class _Model:
    """Decoder, encoder and their optimisers (rebuilt from scratch by :meth:`reset`)."""

    def __init__(self, config: AbinitConfig, box_size: int, device: torch.device, *, seed: int | None = None):
        self.config, self.box_size, self.device = config, box_size, device
        if seed is None:
            self.build()
        else:
            self.reset(seed)

    def build(self) -> None:
        self.decoder = build_decoder_for(self.config, self.box_size).to(self.device)
        encoder = build_encoder_for(self.config, self.box_size)
        self.encoder = None if encoder is None else encoder.to(self.device)
        self.optimizer, self.sparse_optimizer = build_optimizers(self.config, self.decoder, self.encoder)
        self.regularization = getattr(self.decoder, "regularization_loss", None)
        self.after_step = getattr(self.decoder, "after_optimizer_step", None)

    def reset(self, seed: int) -> None:
        """New weights (from ``seed``) and fresh optimiser states; the data spectrum hook is re-applied by the caller."""
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.build()
        finally:
            torch.random.set_rng_state(state)

    def step(self, loss: torch.Tensor) -> None:
        for opt in (self.optimizer, self.sparse_optimizer):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in (self.optimizer, self.sparse_optimizer):
            if opt is not None:
                opt.step()
        if self.after_step is not None:
            self.after_step()

    def n_parameters(self) -> int:
        params = list(self.decoder.parameters()) + ([] if self.encoder is None else list(self.encoder.parameters()))
        return sum(p.numel() for p in params)


class _PosedDataset:
    """The training set with the current poses in its batches (what the warm start reads)."""

    def __init__(self, dataset, rotations: torch.Tensor, shifts: torch.Tensor):
        self.dataset, self.rotations, self.shifts = dataset, rotations, shifts

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(self, indices: np.ndarray) -> TrainingBatch:
        return _with_poses(self.dataset.get_batch(indices), self.rotations, self.shifts)


def _concat_batches(batches: list[TrainingBatch]) -> TrainingBatch:
    def cat(name):
        parts = [getattr(b, name) for b in batches]
        return None if parts[0] is None else torch.cat(parts)

    return TrainingBatch(indices=cat("indices"), images=cat("images"), values=cat("values"),
                         rotations=cat("rotations"), shifts_pixel=cat("shifts_pixel"), ctf=cat("ctf"))


def _write_poses(out: Path, epoch: int, rotations: torch.Tensor, shifts: torch.Tensor, errors: torch.Tensor,
                 searched: torch.Tensor, box_size: int, wall_seconds: float) -> None:
    from cryoscape.io.cryodrgn import write_poses_pkl

    R = rotations.double().numpy()
    t = shifts.double().numpy()
    with atomic_write(out / f"poses.{epoch}.npz", "wb") as f:
        np.savez(f, rotations=R, shifts_pixel=t, search_error=errors.numpy().astype(np.float32),
                 searched_epoch=searched.numpy().astype(np.int32), wall_seconds=np.float64(wall_seconds),
                 box_size=np.int64(box_size))
    write_poses_pkl(out / f"poses.{epoch}.pkl", R, t, box_size=box_size)


def _write_star(out: Path, table, rotations: torch.Tensor, shifts: torch.Tensor) -> None:
    from cryoscape.io.star import write_star

    bad = ~(np.isfinite(table.pixel_size_angstrom) & (table.pixel_size_angstrom > 0))
    if bad.any():
        log.info("particles.star not written: %d particles have no pixel size (pass --pixel-size)", int(bad.sum()))
        return
    posed = dataclasses.replace(table, rotations=rotations.double().numpy(), shifts_pixel=shifts.double().numpy())
    write_star(out / "particles.star", posed)


# --------------------------------------------------------------------------------------------
# the schedule
# --------------------------------------------------------------------------------------------
def abinit_model(
    config: AbinitConfig,
    table,
    out_dir: str | Path,
    *,
    resume_state: dict[str, Any] | None = None,
    arguments: dict[str, Any] | None = None,
) -> AbinitResult:
    """Ab initio reconstruction of ``table``'s particles into the run folder ``out_dir``.

    Parameters
    ----------
    config
        :class:`AbinitConfig`.
    table
        The particles (:class:`cryoscape.io.particles.ParticleTable`, poses not needed; any
        poses it holds are ignored).
    out_dir
        Run folder (created).
    resume_state
        A checkpoint of an ab initio run in ``out_dir`` to continue.
    arguments
        Command-line arguments, recorded in config.yaml.
    """
    try:
        config.validate()
    except ValueError as err:
        raise InputError(f"{err}.") from None
    # schedule lengths that default to "the whole run" are fixed now, so that resuming with another
    # --num-epochs keeps them
    if config.beta == "anneal" and config.beta_anneal_epochs is None:
        config = dataclasses.replace(config, beta_anneal_epochs=max(1, math.ceil(config.num_epochs / 4)))
    if config.k_ramp_epochs is None:
        config = dataclasses.replace(config, k_ramp_epochs=(config.search_epochs() or [0])[-1])
    # the phases are fixed at the start of a run (a resume with other final epochs keeps them)
    if config.search_decoder is None:
        config = dataclasses.replace(config, search_decoder=config.pose_search_decoder())
    if config.vae_start_epoch is None and (config.zdim > 0 or config.switches_decoder()):
        config = dataclasses.replace(config, vae_start_epoch=config.vae_start())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    N = len(table)
    # the poses are unknown: placeholders satisfy the dataset, the search fills them in
    table = dataclasses.replace(table, rotations=np.broadcast_to(np.eye(3), (N, 3, 3)).copy(),
                                shifts_pixel=np.zeros((N, 2)))
    dataset = build_dataset(config, table, resume_state=resume_state)
    D = dataset.box_size
    normalization = dataset.normalization
    first_epoch = 0 if resume_state is None else int(resume_state["epoch"]) + 1
    model = _Model(config.phase_config(first_epoch), D, device)
    amp = resolve_amp(config.amp, device)
    plan = epoch_plan(config)

    rotations = random_rotations(N, generator=torch.Generator().manual_seed(config.seed + 17))
    shifts = torch.zeros(N, 2)
    search_errors = torch.full((N,), float("nan"))
    searched_epoch = torch.full((N,), -1, dtype=torch.int64)
    start_epoch = 0
    history: list[dict[str, Any]] = []
    steps: list[tuple[float, float]] = []
    wall_offset = 0.0
    if resume_state is not None:
        start_epoch = _restore(resume_state, model, config)
        saved = resume_state["abinit"]
        rotations = torch.as_tensor(saved["rotations"], dtype=torch.float32)
        shifts = torch.as_tensor(saved["shifts_pixel"], dtype=torch.float32)
        search_errors = torch.as_tensor(saved["search_error"], dtype=torch.float32)
        searched_epoch = torch.as_tensor(saved["searched_epoch"], dtype=torch.int64)
        wall_offset = float(saved.get("wall_seconds", 0.0))
        history = list(resume_state.get("history", []))
        steps = [tuple(s) for s in resume_state.get("steps", [])]
        restore_rng_state(resume_state.get("rng"))

    pixel_size = dataset.pixel_size_angstrom
    _write_run_config(out, config, arguments, decoder=model.decoder, encoder=model.encoder,
                      normalization=normalization, box_size=D, pixel_size=pixel_size, n_particles=N,
                      resumed_from=None if resume_state is None else start_epoch - 1, command="abinit",
                      decoder_name=model.config.decoder)
    pixels = prepare_likelihood_pixels(config, dataset, model.decoder, fresh=resume_state is None).to(device)
    # the search scores poses with the same likelihood, on the half-plane (Hartley sets hold the whole circle)
    if config.domain == "hartley":
        half_mask, half_w = half_plane_pixels(pixels.coords_index)
        search_coords = pixels.coords_index[half_mask]
        search_weights = pixels.weights[half_mask] * half_w.to(device)
    else:
        half_mask = None
        search_coords, search_weights = pixels.coords_index, pixels.weights

    log.info("ab initio %s: %d particles, box %d, %s domain, zdim %d, %d parameters, batch %d, lr %g, on %s%s",
             "VAE" if model.encoder is not None else (
                 f"homogeneous reconstruction ({config.pose_search_decoder()}), then from epoch "
                 f"{config.vae_start() + 1} the {config.decoder} {'VAE' if config.zdim > 0 else 'model'}"
                 if config.vae_start() else "homogeneous reconstruction"), N, D, config.domain,
             config.zdim, model.n_parameters(), config.batch_size, config.lr, device,
             ", mixed precision" if amp else "")
    log.info("schedule: %s", ", ".join(f"{e}:{k}" for e, k in enumerate(plan)))
    log.info("pose search: %s", grid_summary(config.search_settings(D), D))

    def get_batch(indices: np.ndarray) -> TrainingBatch:
        return dataset.get_batch(indices)

    run_start = time.perf_counter() - wall_offset
    last_plot = time.perf_counter()
    last_good = None if resume_state is None else (start_epoch - 1, out / CHECKPOINT_NAME)

    def train_on(batch: TrainingBatch, band_pixels: FourierPixels, band_mask, epoch_float: float, generator):
        parts = batch_loss(_restrict(batch, band_mask), decoder=model.decoder, encoder=model.encoder, poses=None,
                           pixels=band_pixels, domain=config.domain, beta=config.beta_at(epoch_float),
                           generator=generator, amp=amp)
        if model.regularization is not None:
            prior = model.regularization(n_images=N)
            if prior is not None:
                parts["loss"] = parts["loss"] + prior
        model.step(parts["loss"])
        return parts

    # ---- warm-up with random poses (only when starting afresh)
    if resume_state is None and config.pretrain_images > 0:
        t0 = time.perf_counter()
        band_pixels, band_mask = _band_pixels(pixels, config.band_at(0, D) if config.band_limit_training else D)
        gen = torch.Generator().manual_seed(config.seed + 29)
        seen, total = 0, 0.0
        rounds = math.ceil(config.pretrain_images / N)
        for r in range(rounds):
            order = epoch_order(N, seed=config.seed + 1, epoch=r, shuffle=True)[: config.pretrain_images - seen]
            for batch in iterate_batches(get_batch, order, config.batch_size, prefetch=config.prefetch):
                B = len(batch.indices)
                batch = dataclasses.replace(batch, rotations=random_rotations(B, generator=gen),
                                            shifts_pixel=torch.zeros(B, 2)).to(device)
                parts = train_on(batch, band_pixels, band_mask, 0.0, None)
                value = float(parts["loss"].detach())
                if not math.isfinite(value):
                    _raise_diverged(config, out, -1, seen // config.batch_size, value, None)
                total += value * B
                seen += B
        log.info("warm-up: %d images with random poses, loss %.5g, %.1f s", seen, total / max(seen, 1),
                 time.perf_counter() - t0)

    z_mean = z_logvar = None
    for epoch in range(start_epoch, config.num_epochs):
        t0 = time.perf_counter()
        kind = plan[epoch]
        rebuilt = False
        phase = config.phase_config(epoch)
        if (model.config.zdim, model.config.decoder) != (phase.zdim, phase.decoder):
            # the search phase is over: a new model (the VAE, or the final decoder) trains on its poses
            model = _Model(phase, D, device, seed=config.seed + 2000 + epoch)
            prepare_likelihood_pixels(config, dataset, model.decoder, fresh=True)
            _write_run_config(out, config, arguments, decoder=model.decoder, encoder=model.encoder,
                              normalization=normalization, box_size=D, pixel_size=pixel_size, n_particles=N,
                              resumed_from=None if resume_state is None else start_epoch - 1, command="abinit",
                              decoder_name=model.config.decoder)
            if config.switches_decoder():
                log.info("epoch %d: the %s %s (zdim %d) takes over from the homogeneous %s model (poses kept)",
                         epoch + 1, config.decoder, "VAE" if config.zdim > 0 else "model", config.zdim,
                         config.pose_search_decoder())
            else:
                log.info("epoch %d: the VAE (zdim %d) takes over from the homogeneous model (poses kept)", epoch + 1,
                         config.zdim)
            rebuilt = True
        zdim = model.config.zdim
        if epoch in config.reset_epochs or (kind == FINAL and config.reset_before_final and
                                            epoch == config.num_epochs - config.final_epochs):
            model.reset(config.seed + 1000 + epoch)
            pixels_hook = getattr(model.decoder, "set_data_spectrum", None)
            if pixels_hook is not None:
                prepare_likelihood_pixels(config, dataset, model.decoder, fresh=True)
            log.info("epoch %d: model and optimiser reset (poses kept)", epoch + 1)
            rebuilt = True
        if rebuilt and config.warm_start_images and bool((searched_epoch >= 0).any()):
            # a decoder with a warm-start hook (the basis) starts from the backprojection with the
            # poses found, not from zero (train/warm_start.py)
            warm_start_decoder(model.decoder, _PosedDataset(dataset, rotations, shifts), pixels,
                               max_images=config.warm_start_images, seed=config.seed + epoch, domain=config.domain,
                               device=device)
        k_top = config.band_at(epoch, D)
        band = k_top if (config.band_limit_training and kind != FINAL) else D
        band_pixels, band_mask = _band_pixels(pixels, band)
        settings = config.search_settings(D, k_top=k_top, amp=amp)
        order = epoch_order(N, seed=config.seed, epoch=epoch, shuffle=config.shuffle)
        generator = _epoch_generator(config.seed, epoch, device) if model.encoder is not None else None
        if zdim > 0:
            z_mean = np.zeros((N, zdim), dtype=np.float32)
            z_logvar = np.zeros((N, zdim), dtype=np.float32)
        sums = torch.zeros(3, dtype=torch.float64)
        seen = 0
        search_seconds = 0.0
        previous = rotations.clone() if kind == SEARCH else None
        n_batches = math.ceil(N / config.batch_size)
        per_chunk = max(1, config.chunk_at(k_top, D) // config.batch_size) if kind == SEARCH else 1
        pending: list[TrainingBatch] = []
        batch_iter = iterate_batches(get_batch, order, config.batch_size, prefetch=config.prefetch)
        b = 0
        for raw in batch_iter:
            pending.append(raw)
            if len(pending) < per_chunk and seen + sum(len(p.indices) for p in pending) < N:
                continue
            chunk, pending = pending, []
            if kind == SEARCH:
                ts = time.perf_counter()
                _search_chunk(chunk, model, config, settings, search_coords, search_weights, half_mask, device,
                              rotations, shifts, search_errors, searched_epoch, epoch)
                search_seconds += time.perf_counter() - ts
            for batch in chunk:
                batch = _with_poses(batch, rotations, shifts).to(device)
                B = len(batch.indices)
                parts = train_on(batch, band_pixels, band_mask, epoch + b / n_batches, generator)
                loss = float(parts["loss"].detach())
                if not math.isfinite(loss):
                    _raise_diverged(config, out, epoch, b, loss, last_good)
                sums += torch.tensor([loss, float(parts["error"].detach()), float(parts["kl"].detach())],
                                     dtype=torch.float64) * B
                if parts["mu"] is not None:
                    idx = batch.indices.numpy()
                    z_mean[idx] = parts["mu"].detach().cpu().numpy()
                    z_logvar[idx] = parts["logvar"].detach().cpu().numpy()
                seen += B
                b += 1
                if b % max(1, n_batches // 50) == 0 or seen == N:
                    steps.append((epoch + seen / N, float(sums[0]) / max(seen, 1)))
        totals = (sums / max(seen, 1)).tolist()
        seconds = time.perf_counter() - t0
        wall = time.perf_counter() - run_start
        record = {
            "epoch": epoch, "kind": kind, "loss": totals[0], "error": totals[1], "kl": totals[2],
            "beta": config.beta_at(epoch + 1), "band_pixel": float(band), "search_band_pixel": float(k_top),
            "seconds": seconds, "search_seconds": search_seconds, "wall_seconds": wall,
            "images_per_second": seen / max(seconds, 1e-9),
        }
        if previous is not None:
            moved = torch.rad2deg(rotation_angle_between(previous.double(), rotations.double()))
            record["median_pose_change_deg"] = float(moved.median())
            record["mean_search_error"] = float(search_errors.mean())
        history.append(record)

        # ---- outputs of the epoch
        if zdim > 0:
            _write_latents(out, epoch, z_mean, z_logvar)
        _write_poses(out, epoch, rotations, shifts, search_errors, searched_epoch, D, wall)
        state = checkpoint_state(
            epoch=epoch, config=config, decoder=model.decoder, encoder=model.encoder, optimizer=model.optimizer,
            sparse_optimizer=model.sparse_optimizer, normalization=normalization, history=history, steps=steps,
            box_size=D, pixel_size=pixel_size, n_particles=N, decoder_name=model.config.decoder,
        )
        state["abinit"] = {
            "rotations": rotations.clone(), "shifts_pixel": shifts.clone(), "search_error": search_errors.clone(),
            "searched_epoch": searched_epoch.clone(), "wall_seconds": wall,
        }
        save_checkpoint(out / CHECKPOINT_NAME, state)
        last_good = (epoch, out / CHECKPOINT_NAME)
        is_last = epoch == config.num_epochs - 1
        if is_last or (epoch + 1) % config.checkpoint_every == 0:
            save_checkpoint(weights_path(out, epoch), state)
        if zdim == 0:
            _write_map(out, epoch, model.decoder, pixel_size)
        if is_last:
            _write_star(out, table, rotations, shifts)
        if is_last or kind == SEARCH or time.perf_counter() - last_plot > 60.0:
            plot_losses(history, steps, out / "loss.png")  # ~0.3 s, so not after every short epoch
            last_plot = time.perf_counter()
        remaining = config.num_epochs - epoch - 1
        extra = ""
        if kind == SEARCH:
            extra = (f"; search {search_seconds:.1f} s (band {settings.k_min:g}-{settings.k_max:g} px), "
                     f"median pose change {record['median_pose_change_deg']:.1f} deg")
        log.info("epoch %d/%d (%s, band %.0f px): loss %.5g (KL %.4g) in %.1f s%s%s", epoch + 1, config.num_epochs,
                 kind, band, totals[0], totals[2], seconds, extra,
                 f"; about {_format_seconds(seconds * remaining)} left" if remaining else "")

    return AbinitResult(
        out_dir=out, epochs_done=len(history), history=history, decoder=model.decoder, encoder=model.encoder,
        normalization=normalization, z_mean=z_mean, z_logvar=z_logvar,
        rotations=rotations.double().numpy(), shifts_pixel=shifts.double().numpy(),
    )


def _search_chunk(chunk: list[TrainingBatch], model: _Model, config: AbinitConfig, settings: SearchSettings,
                  coords: torch.Tensor, weights: torch.Tensor, half_mask, device: torch.device,
                  rotations: torch.Tensor, shifts: torch.Tensor, errors: torch.Tensor, searched: torch.Tensor,
                  epoch: int) -> None:
    """Search the poses of the images in ``chunk`` with the current model; store them in place."""
    batch = _concat_batches(chunk)
    values = batch.values.to(device)
    ctf = None if batch.ctf is None else batch.ctf.to(device)
    if half_mask is not None:
        values = values[:, half_mask]
        ctf = None if ctf is None else ctf[:, half_mask]
    z = None
    lattice = None
    was_training = model.decoder.training
    model.decoder.eval()
    try:
        with torch.no_grad():
            if model.encoder is not None:
                model.encoder.eval()
                mu, _ = model.encoder(batch.images.to(device))
                z = mu.float()
                model.encoder.train(was_training)
            else:
                lattice = evaluate_lattice(model.decoder, radius_index=settings.radius_at(settings.n_refine,
                                                                                          model.box_size),
                                           oversampling=settings.oversampling, amp=settings.amp)
            result = search_poses(model.decoder, values, coords_index=coords, weights=weights, ctf=ctf, z=z,
                                  settings=settings, lattice=lattice)
    finally:
        model.decoder.train(was_training)
    idx = batch.indices
    rotations[idx] = result.rotations.float().cpu()
    shifts[idx] = result.shifts_pixel.float().cpu()
    errors[idx] = result.errors.float().cpu()
    searched[idx] = epoch


def _write_map(out: Path, epoch: int, decoder, pixel_size: float) -> None:
    from cryoscape.io.mrc import write_mrc

    was_training = decoder.training
    decoder.eval()
    volume = decoder.eval_volume(None)
    decoder.train(was_training)
    write_mrc(out / f"reconstruct.{epoch}.mrc", volume.cpu().numpy(),
              pixel_size_angstrom=pixel_size if math.isfinite(pixel_size) else 1.0)


def _restore(state: dict[str, Any], model: _Model, config: AbinitConfig) -> int:
    """Load weights and optimiser states of a checkpoint; returns the epoch to start at."""
    if state.get("abinit") is None:
        raise InputError("the checkpoint was not written by cryoscape abinit (it holds no poses); "
                         "continue it with cryoscape train --resume instead.")
    try:
        model.decoder.load_state_dict(state["decoder"]["state"])
        if model.encoder is not None:
            model.encoder.load_state_dict(state["encoder"]["state"])
        if model.optimizer is not None and state.get("optimizer") is not None:
            model.optimizer.load_state_dict(state["optimizer"])
        if model.sparse_optimizer is not None and state.get("sparse_optimizer") is not None:
            model.sparse_optimizer.load_state_dict(state["sparse_optimizer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise InputError(f"the checkpoint does not fit this model ({type(err).__name__}: {str(err)[:200]}); "
                         "resume with the options of the run that wrote it.") from None
    for opt in (model.optimizer, model.sparse_optimizer):
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = config.lr * float(group.get("lr_scale", 1.0))
    return int(state["epoch"]) + 1


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------
def run_abinit(config: AbinitConfig, out_dir: str | Path, *, arguments: dict[str, Any] | None = None) -> AbinitResult:
    """Load the particles of ``config``, set up the run folder and its log, and run :func:`abinit_model`."""
    from cryoscape.io.run_folder import attach_log_file, detach_log_file

    try:
        config.validate()
    except ValueError as err:
        raise InputError(f"{err}.") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = attach_log_file(out / "run.log")
    try:
        table, _ = load_tables(config)
        return abinit_model(config, table, out, arguments=arguments)
    finally:
        detach_log_file(handler)


_RESUME_OVERRIDES = ("num_epochs", "final_epochs", "lr", "device", "progress", "checkpoint_every", "prefetch",
                     "datadir", "amp", "lazy", "search_chunk")


def resume_abinit(run_dir: str | Path, *, arguments: dict[str, Any] | None = None, **overrides: Any) -> AbinitResult:
    """Continue the ab initio run in ``run_dir`` from its ``checkpoint.pt`` (same folder).

    ``overrides`` may change ``num_epochs`` (to run longer), ``final_epochs``, ``lr``, ``device``,
    ``progress``, ``checkpoint_every``, ``prefetch``, ``datadir``, ``amp``, ``lazy`` and
    ``search_chunk``; everything else comes from the checkpoint.
    """
    from cryoscape.io.run_folder import attach_log_file, detach_log_file

    run = Path(run_dir)
    state, config = load_resume_state(run, AbinitConfig, overrides, _RESUME_OVERRIDES, command="abinit")
    if "search_decoder" not in state.get("config", {}):  # written before search decoders: one decoder throughout
        config = dataclasses.replace(config, search_decoder=config.decoder)
    handler = attach_log_file(run / "run.log")
    try:
        log.info("resuming %s after epoch %d", run, state["epoch"])
        table, _ = load_tables(config)
        check_particle_count(config, table, state)
        return abinit_model(config, table, run, resume_state=state, arguments=arguments)
    finally:
        detach_log_file(handler)
