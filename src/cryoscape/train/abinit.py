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
A decoder that learns its latent slowly (CryoFormer) has its new encoder start from a latent
teacher, a voxel-basis VAE of ``teacher_epochs`` epochs trained at the switch on the poses found
(train/teacher.py, in ``RUN/teacher``).

A decoder that does not align from random poses (the voxel basis: a voxel map has no smoothness
of its own) trains in the second phase only: the search model is another decoder
(:meth:`AbinitConfig.pose_search_decoder`, the neural field by default for the basis), and the
switch happens at the first final epoch also when ``zdim`` is 0; from there it trains on its own
batch size (:meth:`AbinitConfig.final_phase_batch_size`).  Whenever a model is rebuilt
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryoscape.geometry.so3_grid import base_grid_spacing_deg
from cryoscape.posesearch.search import SearchSettings, grid_summary
from cryoscape.train.checkpoint import refuse_to_overwrite_run
from cryoscape.train.config import DEFAULT_BATCH_SIZES, TrainConfig
from cryoscape.train.distributed import Distributed
from cryoscape.train.inputs import build_training_data, load_tables
from cryoscape.train.loop import check_particle_count, load_resume_state
from cryoscape.train.model import check_options
from cryoscape.train.pose_sources import SearchedPoses
from cryoscape.train.schedule import EpochPlan, Schedule
from cryoscape.train.teacher import teacher_epochs_for
from cryoscape.train.trainer import RunContext, Trainer, TrainResult

__all__ = ["AbinitConfig", "AbinitResult", "AbinitSchedule", "run_abinit", "resume_abinit", "abinit_model", "epoch_plan"]

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
    # search/train alternation needs a model that follows the poses quickly; the neural field aligns
    # from random poses, the basis does not)
    decoder: str = "neural_field"
    dec_dim: int = 128
    pe_type: str = "geom_lowf"  # the encoding bench/abinit.py's pose search was measured with (train's is gaussian)
    lr: float = 1e-3
    batch_size: int = 16
    num_epochs: int = 16
    refit_every: int | None = 0  # a basis refits after the last epoch only (between epochs: not measured here)
    window: bool = True  # the pose search was measured on windowed images (train's default without: not here)
    # ---- schedule
    pretrain_images: int = 4000
    search_every: int = 2
    final_epochs: int = 0
    reset_epochs: list[int] = field(default_factory=list)
    reset_before_final: bool = False
    vae_start_epoch: int | None = None  # None: the first final epoch with --zdim and --final-epochs, else 0
    search_decoder: str | None = None  # None: the decoder itself, the neural field for the voxel basis
    final_batch_size: int | None = None  # None: see final_phase_batch_size
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
        if self.final_batch_size is not None and self.final_batch_size < 1:
            raise ValueError(f"--final-batch-size must be at least 1, got {self.final_batch_size}")
        if self.final_batch_size is not None and not self.vae_start():
            raise ValueError("--final-batch-size applies from the switch to the final model, which this run does "
                             "not have; add --final-epochs N with --zdim or with another --decoder, or drop it")
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
        if self.teacher_epochs and not start:
            raise ValueError("--teacher-epochs starts the encoder of the VAE that takes over from the homogeneous "
                             "search model, which this run does not have (the VAE searches from the start); add "
                             "--final-epochs N, or drop it")
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

    def final_phase_batch_size(self) -> int:
        """Images per batch from :meth:`vae_start` on: ``final_batch_size``, or by default the final
        decoder's own batch size when another decoder searched the poses (train's default for it:
        the basis trains on batches of 64: on the 32-px hinge of the slow abinit test, at the
        search's batch of 8 its latent barely formed; README "Ab initio with the voxel basis"), else
        ``batch_size``."""
        if self.final_batch_size is not None:
            return int(self.final_batch_size)
        if self.switches_decoder():
            return int(DEFAULT_BATCH_SIZES.get(self.decoder, self.batch_size))
        return int(self.batch_size)

    def batch_size_at(self, epoch: int) -> int:
        """Images per batch at ``epoch``: ``batch_size``, then :meth:`final_phase_batch_size` from
        the switch to the final model (:meth:`vae_start`) on."""
        start = self.vae_start()
        return self.final_phase_batch_size() if start and epoch >= start else int(self.batch_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AbinitConfig":
        """:meth:`TrainConfig.from_dict`; a run saved before ``final_batch_size`` keeps one batch size
        (a run that switched decoders is given its ``batch_size``; any other has no switch to apply it)."""
        switched = d.get("search_decoder") not in (None, d.get("decoder"))
        if "num_epochs" in d and "final_batch_size" not in d and switched:
            d = {**d, "final_batch_size": d.get("batch_size")}
        return super().from_dict(d)

    def phase_config(self, epoch: int) -> "AbinitConfig":
        """The options of the model trained at ``epoch``: the homogeneous search model (``zdim`` 0,
        :meth:`pose_search_decoder`) before :meth:`vae_start`, else these."""
        if epoch < self.vae_start():
            if self.switches_decoder():  # the final decoder's options are not the search decoder's
                return dataclasses.replace(self, zdim=0, decoder=self.pose_search_decoder(), decoder_options={},
                                           teacher_epochs=0)
            return dataclasses.replace(self, zdim=0, teacher_epochs=0)
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


#: what :func:`abinit_model` returns: a :class:`~cryoscape.train.trainer.TrainResult` with the poses found
AbinitResult = TrainResult


class AbinitSchedule(Schedule):
    """Ab initio's epochs (module docstring): warm-up, search and reuse epochs with a widening band,
    resets, the switch from the homogeneous search model to the final model, and final epochs."""

    def __init__(self, config: AbinitConfig):
        self.config = config
        self.num_epochs = int(config.num_epochs)
        self.kinds = epoch_plan(config)

    def fixed(self, config: AbinitConfig) -> AbinitConfig:
        """Lengths that default to "the whole run", the phases and the teacher's epochs are fixed at the
        start of a run (a resume with another ``--num-epochs`` or other final epochs keeps them)."""
        if config.beta == "anneal" and config.beta_anneal_epochs is None:
            config = dataclasses.replace(config, beta_anneal_epochs=max(1, math.ceil(config.num_epochs / 4)))
        if config.k_ramp_epochs is None:
            config = dataclasses.replace(config, k_ramp_epochs=(config.search_epochs() or [0])[-1])
        if config.search_decoder is None:
            config = dataclasses.replace(config, search_decoder=config.pose_search_decoder())
        if config.vae_start_epoch is None and (config.zdim > 0 or config.switches_decoder()):
            config = dataclasses.replace(config, vae_start_epoch=config.vae_start())
        if config.teacher_epochs is None:  # the decoder's latent teacher at the switch (train/teacher.py)
            config = dataclasses.replace(config, teacher_epochs=teacher_epochs_for(config) if config.vae_start() else 0)
        return config

    def warmup(self, box_size: int) -> tuple[int, float | None]:
        c = self.config
        return c.pretrain_images, (c.band_at(0, box_size) if c.band_limit_training else None)

    def plan(self, epoch: int, box_size: int) -> EpochPlan:
        c, kind = self.config, self.kinds[epoch]
        k_top = c.band_at(epoch, box_size)
        band = k_top if (c.band_limit_training and kind != FINAL) else None
        reset = epoch in c.reset_epochs or (kind == FINAL and c.reset_before_final and
                                            epoch == c.num_epochs - c.final_epochs)
        return EpochPlan(
            kind=kind, model_config=c.phase_config(epoch), batch_size=c.batch_size_at(epoch),
            model_seed=c.seed + 2000 + epoch, reset_seed=c.seed + 1000 + epoch if reset else None,
            band_pixel=band, search=c.search_settings(box_size, k_top=k_top, amp=self.amp) if kind == SEARCH else None,
            search_images=c.chunk_at(k_top, box_size) if kind == SEARCH else 0, write_map=True,
            record={"kind": kind, "band_pixel": float(band if band is not None else box_size),
                    "search_band_pixel": float(k_top)}, switch_note=self._switch_note(),
        )

    amp: bool = False  # mixed precision of the searches (set by abinit_model from the device)

    def _switch_note(self) -> str:
        c = self.config
        if c.switches_decoder():
            return (f"the {c.decoder} {'VAE' if c.zdim > 0 else 'model'} (zdim {c.zdim}) takes over from the "
                    f"homogeneous {c.pose_search_decoder()} model (poses kept; batch {c.final_phase_batch_size()})")
        return f"the VAE (zdim {c.zdim}) takes over from the homogeneous model (poses kept)"

    def describe(self) -> str:
        c = self.config
        if c.vae_start():
            return (f"(homogeneous reconstruction with the {c.pose_search_decoder()}, then from epoch "
                    f"{c.vae_start() + 1} the {c.decoder} {'VAE' if c.zdim > 0 else 'model'})")
        return "(VAE)" if c.zdim > 0 else "(homogeneous reconstruction)"


def abinit_model(config: AbinitConfig, table, out_dir: str | Path, *, resume_state: dict[str, Any] | None = None,
                 arguments: dict[str, Any] | None = None, dist: Distributed | None = None) -> AbinitResult:
    """Ab initio reconstruction of ``table``'s particles into the run folder ``out_dir``.

    ``table``: the particles (:class:`cryoscape.io.particles.ParticleTable`; poses not needed, any
    it holds are ignored); ``resume_state``: a checkpoint of an ab initio run in ``out_dir`` to
    continue; ``arguments``: the command line, recorded in config.yaml.
    """
    check_options(config)
    config = AbinitSchedule(config).fixed(config)
    schedule = AbinitSchedule(config)
    dist = dist or Distributed()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    N = len(table)
    # the poses are unknown: placeholders satisfy the dataset, the search fills them in
    table = dataclasses.replace(table, rotations=np.broadcast_to(np.eye(3), (N, 3, 3)).copy(),
                                shifts_pixel=np.zeros((N, 2)))
    data = build_training_data(config, table, resume_state=resume_state)
    poses = SearchedPoses(table, n_particles=N, box_size=data.box_size, seed=config.seed, dist=dist)
    trainer = Trainer(config, data, poses, schedule, out_dir, command="abinit", arguments=arguments,
                      resume_state=resume_state, continue_run=True, dist=dist)
    schedule.amp = trainer.amp
    log.info("schedule: %s", ", ".join(f"{e}:{k}" for e, k in enumerate(schedule.kinds)))
    log.info("pose search: %s", grid_summary(config.search_settings(data.box_size), data.box_size))
    return trainer.fit()


def run_abinit(config: AbinitConfig, out_dir: str | Path, *, arguments: dict[str, Any] | None = None) -> AbinitResult:
    """Load the particles of ``config``, set up the run folder and its log, and run :func:`abinit_model`."""
    check_options(config)
    refuse_to_overwrite_run(out_dir, "abinit")
    with RunContext(out_dir) as dist:
        table, _ = load_tables(config)
        return abinit_model(config, table, out_dir, arguments=arguments, dist=dist)


_RESUME_OVERRIDES = ("num_epochs", "final_epochs", "lr", "device", "progress", "checkpoint_every",
                     "checkpoint_minutes", "prefetch", "datadir", "amp", "lazy", "cache_dir", "search_chunk")


def resume_abinit(run_dir: str | Path, *, arguments: dict[str, Any] | None = None,
                  state: dict[str, Any] | None = None, **overrides: Any) -> AbinitResult:
    """Continue the ab initio run in ``run_dir`` from its latest checkpoint (or ``state``, that
    checkpoint already read; same folder).

    ``overrides`` may change ``num_epochs`` (to run longer), ``final_epochs``, ``lr``, ``device``,
    ``progress``, ``checkpoint_every``, ``checkpoint_minutes``, ``prefetch``, ``datadir``, ``amp``,
    ``lazy`` and ``search_chunk``; everything else comes from the checkpoint.
    """
    run = Path(run_dir)
    state, config = load_resume_state(run, AbinitConfig, overrides, _RESUME_OVERRIDES, command="abinit",
                                      state=state)
    if "search_decoder" not in state.get("config", {}):  # written before search decoders: one decoder throughout
        config = dataclasses.replace(config, search_decoder=config.decoder)
    with RunContext(run) as dist:
        log.info("resuming %s after epoch %d", run, state["epoch"])
        table, _ = load_tables(config)
        check_particle_count(config, table, state)
        return abinit_model(config, table, run, resume_state=state, arguments=arguments, dist=dist)
