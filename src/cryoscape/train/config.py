"""Every option of a training run, as one dataclass saved in the run's config.yaml and checkpoints.

The names follow cryoDRGN's command-line options where one exists (``enc_layers``, ``dec_dim``,
``zdim``, ``beta``...).  ``TrainConfig.from_dict(config.to_dict())`` round-trips, so a run is
rebuilt (and resumed) from its folder alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "DEFAULT_LEARNING_RATES", "DEFAULT_BATCH_SIZES", "DEFAULT_BAND_STARTS", "DEFAULT_DEC_DIMS"]

#: Adam learning rate when ``--lr`` is not given, by decoder.  The neural field's was chosen by
#: measurement (bench/decoders.py's data and protocol: D=64 / D=128 hinge, SNR 0.1, 2 epochs, batch
#: 8, 256 x 3, per-image FSC AUC of 100 images): 1e-4 (cryoDRGN's default) 0.732 / 0.752, 2e-4
#: 0.781, 4e-4 0.798 / 0.868, 1e-3 0.818 at D=64; cryoDRGN at its 1e-4: 0.750 / 0.748.  4e-4 is
#: taken rather than the best short-run value, 1e-3, to leave a margin for longer runs and
#: higher-SNR data (the tests and the demo train at 1e-3 without trouble).
#: The basis decoder's (with its batch of 64, below; its voxels learn at ``voxel_lr_scale`` times
#: it): D=64 AUC 0.763 / 0.756 / 0.751 at 4e-4 / 1e-3 / 2e-3, and on the 1000-image hinge of
#: tests/train/test_basis_training.py |Spearman| after 14 epochs 0.20 / 0.97 / 0.96: 1e-3 learns
#: the heterogeneity of a small set and keeps the maps clean.
#: CryoFormer's (the paper gives none; Adam as for the others), measured on 600 images of 24 px, SNR 1,
#: 3 epochs, batch 8, CPU-sized options (render_size 12): FSC AUC to the truth over the rendered band
#: 0.091 / 0.901 / 0.995 / 0.993 at lr 1e-4 / 3e-4 / 1e-3 / 3e-3 (over all shells 0.045 / 0.581 /
#: 0.682 / 0.557); README "Choosing a decoder: CryoFormer".
DEFAULT_LEARNING_RATES = {"neural_field": 4e-4, "basis": 1e-3, "cryoformer": 1e-3}
#: Images per batch when ``--batch-size`` is not given, by decoder (others: 8, cryoDRGN's).  A
#: basis step costs little per image and much per step (an optimiser pass over every voxel), so
#: it trains on batches of 64 (seed 003 trains its voxel model on larger batches than cryoDRGN's
#: too): 325 / 661 / 878 img/s at 8 / 32 / 64 at D=64 on 2 cores.
DEFAULT_BATCH_SIZES = {"basis": 64}
#: ``band_start`` when ``--band-start`` is not given, by decoder (others: 1, every epoch trains every
#: pixel).  Frequency marching (:func:`cryoscape.train.schedule.band_fraction_at`) is an option, off
#: by default: on the D=64 hinge (2000 images x 6 epochs, float32) ``--band-start 0.4`` gave the
#: neural field per-image FSC AUC 0.785, no better than cryoDRGN's 0.784, where the narrower decoder
#: below gave 0.803 (README "Choosing a decoder", float32 speed of the neural field).
DEFAULT_BAND_STARTS: dict[str, float] = {}
#: Decoder width (``--dec-dim``) when it is not given, by decoder (others: 256, cryoDRGN's 256 x 3).
#: The neural field's float32 step is almost all matrix products whose cost grows with the square of
#: the width; 128 x 3 has ~3.3x fewer FLOPs per pixel than 256 x 3 and on the D=64 hinge (2000 images
#: x 6 epochs, SNR 0.1, float32) learnt per-image FSC AUC 0.803 (cryoDRGN 4.3.1 at 256 x 3: 0.784);
#: speed and accuracy in README "Choosing a decoder" and bench/results/nf_speed_*.txt.
DEFAULT_DEC_DIMS = {"neural_field": 128}
FALLBACK_DEC_DIM = 256
FALLBACK_BATCH_SIZE = 8
FALLBACK_LEARNING_RATE = 1e-4
#: ``--refit-every`` unset: refit after every AUTO_REFIT_EVERY-th epoch when an epoch has at least
#: AUTO_REFIT_MIN_STEPS optimiser steps (8000 images at batch 64: 125), else only after the last
#: (1000 images: 16 steps, where refits between epochs kept the latent from forming; README)
AUTO_REFIT_EVERY = 2
AUTO_REFIT_MIN_STEPS = 100


@dataclass
class TrainConfig:
    """Options of ``cryoscape train`` (see ``cryoscape train --help`` for each one)."""

    # ---- data
    particles: str | None = None
    poses: str | None = None
    ctf: str | None = None
    datadir: str | None = None
    ind: str | None = None
    first: int | None = None
    pixel_size_angstrom: float | None = None
    use_ctf: bool = True
    invert_data: bool = True
    # no real-space window by default: the CTF spreads high frequencies far beyond the particle (at 2.5 um
    # defocus and 1 A pixels ~250 A at Nyquist), the model's CTF is periodic in the box, and a window cuts
    # what it predicts (README "Choosing a decoder": measured on both oracle datasets); --window turns it on
    window: bool = False
    window_inner_radius_fraction: float = 0.85
    window_outer_radius_fraction: float = 0.99
    lazy: bool = False
    shuffle_chunk: int = 0  # > 0: chunked shuffle of blocks of this many particles (data/training.py epoch_order)
    cache_dir: str | None = None  # float16 cache of the preprocessed images, for lazily read data (data/cache.py)
    n_normalization_images: int = 1000
    # tilt pairs
    tilt: str | None = None
    tilt_poses: str | None = None
    tilt_ctf: str | None = None
    tilt_deg: float = 45.0

    # ---- model
    zdim: int = 0
    # the voxel basis: better maps, latents and speed than the neural field on both oracle datasets
    # (README "Choosing a decoder"; bench/results/oracle_*.txt)
    decoder: str = "basis"
    decoder_options: dict[str, Any] = field(default_factory=dict)
    dec_layers: int = 3
    dec_dim: int | None = None  # None: DEFAULT_DEC_DIMS of the decoder
    domain: str = "fourier"
    pe_type: str = "gaussian"
    pe_dim: int | None = None
    gaussian_scale: float | None = None
    encoder: str = "resmlp"  # as the commands' --encoder (tests/train/test_config.py checks they agree)
    enc_layers: int = 3
    enc_dim: int = 256
    enc_mask_radius_fraction: float | None = None
    enc_lowpass_fraction: float | None = None  # the encoder reads images low-passed to this fraction of Nyquist
    noise_model: str = "white"

    # ---- optimisation
    num_epochs: int = 20
    batch_size: int | None = None  # None: DEFAULT_BATCH_SIZES of the decoder
    lr: float | None = None  # None: DEFAULT_LEARNING_RATES of the decoder
    weight_decay: float = 0.0
    beta: float | str | None = None
    beta_anneal_epochs: int | None = None
    # frequency marching (cryoscape train): the band trained in epoch 0 as a fraction of Nyquist (None: the
    # decoder's DEFAULT_BAND_STARTS, 1: off), widening linearly to Nyquist at epoch band_epochs (None: the last)
    band_start: float | None = None
    band_epochs: int | None = None
    refine_poses: bool = False
    refine_shifts: bool = True
    pose_lr: float = 3e-3
    # the pose learning rate of epoch e is pose_lr * pose_lr_decay ** (e - pose_start_epoch): below 1 the
    # corrections settle instead of wandering once their gradients are mostly noise (README, CryoFormer)
    pose_lr_decay: float = 1.0
    pose_start_epoch: int = 1
    pose_representation: str = "axis_angle"
    # where poses come from: "table" (the particle table's, refined with refine_poses) or "encoder"
    # (an orientation encoder pre-trained on the table's poses, then refined end to end: CryoFormer)
    pose_source: str = "table"
    # 4 x 256 at pre-training lr 3e-4, not the paper's 10 x 128: measured fits of 2500 poses 5.7 vs 50.5-70.3
    # degrees median (README "Choosing a decoder: CryoFormer")
    pose_encoder_layers: int = 4
    pose_encoder_dim: int = 256
    pose_pretrain_epochs: int = 200
    pose_encoder_lr: float = 1e-4  # 0: the pre-trained encoder is frozen
    # residual: a correction of the table's poses, starting exactly at them; absolute: the paper's, pre-trained
    pose_encoder: str = "residual"
    shuffle: bool = True
    seed: int = 0
    amp: bool | None = None  # None: automatic (see models.precision.resolve_amp)
    device: str = "auto"
    prefetch: int = 2
    checkpoint_every: int = 5
    checkpoint_minutes: float = 0.0  # > 0: also a mid-epoch checkpoint at most every this many minutes
    warm_start_images: int = 20000  # 0: off; decoders with a warm_start hook (train/warm_start.py)
    # decoders with a refit hook (train/refit.py): re-solve the maps at the final latents after the last epoch
    # (refit), and after every refit_every-th epoch (0: only after the last; None: every 2nd when an epoch has at
    # least 100 optimiser steps, else only after the last: every 2nd gave the best latents on 8000 images, 125
    # steps, but stopped a 1000-image set, 16 steps, from learning its latent at all; README)
    refit: bool = True
    refit_every: int | None = None
    # after the final refit: each image's latent re-estimated against the refitted maps (its posterior mean over
    # refit_latent_candidates of the run's own latents), then the maps refitted at those latents (train/refit.py)
    refit_latents: bool = True
    refit_latent_candidates: int = 512
    # latent search (train/latent_search.py): the last N epochs take each image's latent from a search against the
    # decoder (None: the decoder's latent_search_fraction of the run; 0: off), over latent_search_points candidates;
    # latent_search_start: the first searching epoch (-1: none), fixed when a run starts so a resume keeps it
    latent_search_epochs: int | None = None
    latent_search_start: int | None = None
    latent_search_points: int = 32
    # a latent teacher (train/teacher.py): the encoder starts from this finished run's (folder or .pt; train only,
    # fresh runs)
    init_encoder: str | None = None
    # an automatic teacher (train/teacher.py): a voxel-basis run of this many epochs (in RUN/teacher) starts the
    # encoder (None: the decoder's teacher_epochs; 0: none; fresh train runs with zdim > 0 only)
    teacher_epochs: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = DEFAULT_LEARNING_RATES.get(self.decoder, FALLBACK_LEARNING_RATE)
        if self.batch_size is None:
            self.batch_size = DEFAULT_BATCH_SIZES.get(self.decoder, FALLBACK_BATCH_SIZE)
        if self.dec_dim is None:
            self.dec_dim = DEFAULT_DEC_DIMS.get(self.decoder, FALLBACK_DEC_DIM)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML-safe values)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Rebuild from :meth:`to_dict` output; unknown keys are ignored (older/newer runs)."""
        names = {f.name for f in dataclasses.fields(cls)}
        if "num_epochs" in d and "band_start" not in d:  # a run saved before frequency marching: every pixel
            d = {**d, "band_start": 1.0}
        if "num_epochs" in d and "dec_dim" not in d:  # a run saved before per-decoder widths: 256
            d = {**d, "dec_dim": FALLBACK_DEC_DIM}
        if "num_epochs" in d and "latent_search_start" not in d:  # a run saved before latent search: none
            d = {**d, "latent_search_epochs": 0, "latent_search_start": -1}
        if "num_epochs" in d and "pose_encoder" not in d:  # a run saved before the residual encoder
            d = {**d, "pose_encoder": "absolute"}
            if d.get("decoder") == "atomic":  # ... and before the atomic decoder's local-geometry restraint
                d = {**d, "decoder_options": {"local_strength": 0.0, **(d.get("decoder_options") or {})}}
        if "num_epochs" in d and "refit" not in d:  # a run saved before the refit: none, as it trained
            d = {**d, "refit": False, "refit_every": 0}
        if "num_epochs" in d and "refit_latents" not in d:  # a run saved before the latent step: none
            d = {**d, "refit_latents": False}
        return cls(**{k: v for k, v in d.items() if k in names})

    def refit_every_for(self, n_images: int) -> int:
        """The epochs between refits (0: only after the last) of a run over ``n_images``:
        ``refit_every``, or when unset every :data:`AUTO_REFIT_EVERY`-th once an epoch has at least
        :data:`AUTO_REFIT_MIN_STEPS` optimiser steps."""
        if self.refit_every is not None:
            return self.refit_every
        return AUTO_REFIT_EVERY if math.ceil(n_images / self.batch_size) >= AUTO_REFIT_MIN_STEPS else 0

    # ---- derived values
    @property
    def heterogeneous(self) -> bool:
        """True when a latent space is learnt (``zdim > 0``)."""
        return self.zdim > 0

    def beta_at(self, epoch_float: float) -> float:
        """KL weight at a fractional epoch (``epoch + batch / n_batches``).

        ``beta`` a number: constant.  ``None``: ``1 / zdim`` (cryoDRGN's default).  ``"anneal"``:
        rises linearly from 0 to 1 over the first ``beta_anneal_epochs`` epochs
        (default: a quarter of ``num_epochs``, at least 1), then stays at 1.
        """
        if self.zdim <= 0:
            return 0.0
        if self.beta is None:
            return 1.0 / self.zdim
        if isinstance(self.beta, str):
            if self.beta != "anneal":
                return float(self.beta)
            n = self.beta_anneal_epochs or max(1, math.ceil(self.num_epochs / 4))
            return float(min(1.0, max(0.0, epoch_float / n)))
        return float(self.beta)

    def validate(self) -> None:
        """Raise ``ValueError`` for impossible option combinations (the CLI turns them into messages)."""
        if self.noise_model not in ("white", "spectral"):
            raise ValueError(f"--noise-model must be white or spectral, got {self.noise_model!r}")
        if self.domain not in ("fourier", "hartley"):
            raise ValueError(f"--domain must be fourier or hartley, got {self.domain!r}")
        if self.zdim < 0:
            raise ValueError(f"--zdim must be 0 (homogeneous) or positive, got {self.zdim}")
        if self.num_epochs < 1:
            raise ValueError(f"--num-epochs must be at least 1, got {self.num_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if isinstance(self.beta, str) and self.beta != "anneal":
            float(self.beta)  # raises ValueError for other words
        if self.tilt is not None and self.zdim <= 0:
            raise ValueError("--tilt pairs train the encoder, so they need --zdim > 0")
        if self.pose_representation not in ("axis_angle", "6d"):
            raise ValueError(f"--pose-representation must be axis_angle or 6d, got {self.pose_representation!r}")
        if not 0.0 < self.pose_lr_decay <= 1.0:
            raise ValueError(f"--pose-lr-decay must be in (0, 1] (1: constant), got {self.pose_lr_decay}")
        if self.pose_source not in ("table", "encoder"):
            raise ValueError(f"--pose-source must be table or encoder, got {self.pose_source!r}")
        if self.pose_source == "encoder" and self.refine_poses:
            raise ValueError("--refine-poses corrects the table's poses; with --pose-source encoder the encoder "
                             "refines them, so leave --refine-poses out")
        if self.refit_every is not None and self.refit_every < 0:
            raise ValueError(f"--refit-every must be 0 (only after the last epoch) or positive, got {self.refit_every}")
        if self.refit_latent_candidates < 2:
            raise ValueError(f"--refit-latent-candidates must be at least 2, got {self.refit_latent_candidates}")
        if self.warm_start_images < 0:
            raise ValueError(f"--warm-start-images must be 0 (off) or positive, got {self.warm_start_images}")
        if self.shuffle_chunk < 0:
            raise ValueError(f"--shuffle-chunk must be 0 (uniform shuffle) or positive, got {self.shuffle_chunk}")
        if not self.checkpoint_minutes >= 0:
            raise ValueError(f"--checkpoint-minutes must be 0 (off) or positive, got {self.checkpoint_minutes}")
        if self.band_start is not None and not 0.0 < self.band_start <= 1.0:
            raise ValueError(f"--band-start must be a fraction of Nyquist in (0, 1], got {self.band_start}")
        if self.band_epochs is not None and self.band_epochs < 0:
            raise ValueError(f"--band-epochs must be 0 (every pixel from the start) or positive, got {self.band_epochs}")
        if self.latent_search_epochs is not None and self.latent_search_epochs < 0:
            raise ValueError(f"--latent-search-epochs must be 0 (off) or positive, got {self.latent_search_epochs}")
        if self.latent_search_points < 2:
            raise ValueError(f"--latent-search-points must be at least 2, got {self.latent_search_points}")
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")
        if self.teacher_epochs is not None and self.teacher_epochs < 0:
            raise ValueError(f"--teacher-epochs must be 0 (no teacher) or positive, got {self.teacher_epochs}")
        if self.teacher_epochs and self.zdim <= 0:
            raise ValueError("--teacher-epochs trains a teacher for the VAE encoder, so it needs --zdim > 0")
