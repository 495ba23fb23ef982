"""The decoder interface every volume representation implements, and the decoder registry.

A decoder is a (possibly latent-conditioned) 3-D map.  Every decoder answers two questions, so a
new representation (neural field, voxel basis, transformer, atomic model) is one file in models/
registered by name, with no change to training or analysis:

1. ``decoder(coords, z)``: the map's transform at 3-D frequencies ``coords`` for latents ``z``
   (the central-slice points of a batch of images), in the decoder's ``domain``;
2. ``decoder.eval_volume(z, box_size=...)``: the real-space map for one latent.

Optional training hooks are declared here with no-op defaults (the training engine calls them on
every decoder and never asks ``getattr``): :meth:`VolumeDecoder.optimizer_param_groups`,
:meth:`~VolumeDecoder.set_data_spectrum` (with :attr:`~VolumeDecoder.wants_data_spectrum`),
:meth:`~VolumeDecoder.warm_start` (with :attr:`~VolumeDecoder.wants_warm_start`),
:meth:`~VolumeDecoder.refit` (with :attr:`~VolumeDecoder.wants_refit`),
:meth:`~VolumeDecoder.latent_errors` (many latents scored per image at once),
:meth:`~VolumeDecoder.regularization_loss`, :meth:`~VolumeDecoder.after_optimizer_step`,
:meth:`~VolumeDecoder.predict_images` (a real-space image formation) and
:meth:`~VolumeDecoder.attention_volumes` (maps for analysis).

Units and conventions
---------------------
* Frequencies are in **cycles per training pixel**: ``k = index / D`` where ``D`` is the box the
  decoder was trained at, so ``|k| <= 0.5`` is Nyquist.  A slice point of image pixel
  ``(kx, ky)`` under pose ``R`` is ``R^T (kx, ky, 0)`` (fourier/slicing.py).
* ``domain == "fourier"``: outputs are complex Fourier coefficients.  The represented map is
  real, so ``F(-k) = conj F(k)``; a Fourier decoder must honour this exactly (e.g. evaluate the
  half-space ``k_z > 0 or (k_z = 0 and ...)`` and conjugate the rest), which lets the training
  loop evaluate only half of each slice.
* ``domain == "hartley"``: outputs are real Hartley coefficients ``Re F - Im F``; the loop
  evaluates whole slices.
* Outputs are in the units of the training data's normalised transform (the training loop
  divides image transforms by one global scale, recorded in the run's config); ``eval_volume``
  returns the map in those units, real space ``[z, y, x]`` with origin at ``D//2``.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["VolumeDecoder", "register_decoder", "build_decoder", "build_saved_decoder", "decoder_class",
           "decoder_names"]


class VolumeDecoder(nn.Module, abc.ABC):
    """Base class of all volume representations.

    Subclasses set ``name`` (registry key), ``domain`` ("fourier" or "hartley"), and keep the
    keyword arguments they were built with in ``self.config`` so that
    ``build_decoder(name, **config)`` rebuilds an identical (untrained) module.
    """

    name: str = ""
    domain: str = "fourier"
    #: whether :meth:`set_data_spectrum` uses the data's spectrum (the engine estimates it only then)
    wants_data_spectrum: bool = False
    #: whether :meth:`warm_start` uses the data (the engine then streams it once before training)
    wants_warm_start: bool = False
    #: whether :meth:`refit` re-estimates the maps from the data at fixed latents (the engine then
    #: streams the data once more after the last epoch, train/refit.py)
    wants_refit: bool = False
    #: share of a run's final epochs whose latents the engine searches against the decoder when
    #: ``--latent-search-epochs`` is not given (train/latent_search.py; 0: none)
    latent_search_fraction: float = 0.0
    #: epochs of a voxel-basis run that teaches a new ``train`` run's VAE encoder its latent before this
    #: decoder trains, when ``--teacher-epochs`` is not given (train/teacher.py; 0: none)
    teacher_epochs: int = 0
    #: set by the training engine in data-parallel runs: sums a tensor over the processes, for
    #: statistics of a whole batch (``None``: one process holds the whole batch)
    process_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: the same for the rows of a tensor (e.g. a batch's latents) from every process, in rank order
    process_gather_rows: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def upgrade_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A ``config`` saved by an older version, with the options added since set to what that version
        did (not to today's defaults, which may differ): :func:`build_saved_decoder` rebuilds the decoder
        a checkpoint was trained with.  The default changes nothing."""
        return dict(config)

    def __init__(self, *, box_size: int, zdim: int = 0):
        super().__init__()
        self.box_size = int(box_size)
        self.zdim = int(zdim)
        self.config: dict[str, Any] = {"box_size": self.box_size, "zdim": self.zdim}

    def check_latent(self, z: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """``z`` checked against ``zdim`` and a batch of ``batch`` (``(B, zdim)`` or ``(1, zdim)``);
        ``None`` for a homogeneous decoder.  Raises ``ValueError`` on a mismatch."""
        if self.zdim == 0:
            if z is not None and z.numel() > 0:
                raise ValueError("this decoder has zdim=0 (homogeneous) but a latent z was given")
            return None
        if z is None:
            raise ValueError(f"this decoder needs a latent z of dimension {self.zdim}")
        if z.dim() != 2 or z.shape[-1] != self.zdim:
            raise ValueError(f"z must have shape (B, {self.zdim}), got {tuple(z.shape)}")
        if z.shape[0] not in (1, batch) and batch != 1:
            raise ValueError(f"z has {z.shape[0]} rows but coords has batch size {batch}")
        return z

    # ---- optional training hooks (no-op defaults; see train/model.py and train/trainer.py)
    def optimizer_param_groups(self) -> list[dict[str, Any]] | None:
        """Parameter groups for the optimisers, or ``None`` (default): all parameters in one group.

        Each group is a dict with ``params`` and optionally ``lr_scale`` (the group trains at
        ``lr_scale * --lr``) and ``sparse`` (``True``: sparse gradients, a row-sparse Adam).
        """
        return None

    def adam_eps(self) -> float | None:
        """Adam's epsilon for the dense parameter groups, or ``None`` (default): torch's ``1e-8``.

        Adam divides by ``sqrt(v) + eps``: a decoder whose gradients start near or below ``1e-8``
        (CryoFormer's, whose density starts near zero) would otherwise take steps shrunk by ``eps``
        rather than set by ``lr``.
        """
        return None

    def set_data_spectrum(self, shell_rms: torch.Tensor, *, mean_ctf_squared: float | None = None) -> None:
        """Receive the data's per-shell RMS amplitude before a new run (when :attr:`wants_data_spectrum`)."""

    def warm_start(self, slices) -> dict[str, Any] | None:
        """Start from the data with known poses before a new run (when :attr:`wants_warm_start`).

        ``slices`` yields ``(coords, target, ctf, pixel_weights)`` per batch (train/warm_start.py).
        Returns a summary dict for the log, or ``None``.
        """
        return None

    def refit(self, slices, latents: torch.Tensor | None, *, final: bool = True) -> dict[str, Any] | None:
        """Re-estimate the maps in closed form at fixed latents and known poses (when
        :attr:`wants_refit`), e.g. after the last epoch (train/refit.py).

        ``slices()`` returns a fresh iterator (a decoder may pass over the data more than once) of
        ``(coords, target, ctf, pixel_weights, z)`` per batch, ``z (B, zdim)`` the images'
        latents; ``latents (N, zdim)`` are those of all images (``None`` when homogeneous).
        ``final``: the run's last refit, whose maps are the result (a decoder may spend more on
        it than on the refits between epochs).  Returns a summary dict for the log, or ``None``.
        """
        return None

    def latent_errors(self, coords: torch.Tensor, target: torch.Tensor, ctf: torch.Tensor | None,
                      pixel_weights: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor | None:
        """``(B, C)`` squared errors ``sum_p w_p |target - ctf * F(R^T k_p, z_c)|^2`` of every image
        of a posed batch (``coords (B, P, 3)``, ``target (B, P)``, ``ctf (B, P)`` or ``None``,
        ``pixel_weights (P,)``, as ``refit``'s slices) against the decoder at each of
        ``candidates (C, zdim)``, or ``None`` (default): the decoder has no path cheaper than ``C``
        forward passes, and the latent step after the final refit (train/refit.py) is skipped."""
        return None

    def regularization_loss(self, *, n_images: int) -> torch.Tensor | None:
        """A prior per image added to every batch's loss, or ``None`` (default: no prior)."""
        return None

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step (e.g. to project parameters onto a constraint)."""

    def write_atomic_model(self, path, z: torch.Tensor | None = None):
        """Write the atomic model the decoder represents at latent ``z`` to ``path`` (.pdb/.cif) and
        return the path, or return ``None`` (default: a decoder of maps only)."""
        return None

    def predict_images(self, rotations: torch.Tensor, pixels, z: torch.Tensor | None,
                       ctf: torch.Tensor | None) -> torch.Tensor | None:
        """The model's images at the training pixels, for a decoder whose image formation is not a
        central slice (e.g. a real-space density rendered by projection), or ``None`` (default).

        ``rotations`` ``(B, 3, 3)``, ``pixels`` the training pixels (``FourierPixels``), ``z``
        ``(B, zdim)`` or ``None``, ``ctf`` ``(B, P)`` or ``None``.  Returns ``(B, P)`` values in the
        decoder's domain, the CTF applied, like the slice path it replaces; the image shifts are
        undone on the data (train/likelihood.py).  ``None`` keeps the slice path
        ``c(k) * decoder(R^T k, z)`` (train/likelihood.py ``predict_values``).
        """
        return None

    def attention_volumes(self, z: torch.Tensor | None = None, *, box_size: int | None = None) -> torch.Tensor | None:
        """``(N, n, n, n)`` maps of what parts of the map a decoder's N attention queries look at, or
        ``None`` (default: the decoder has none).  ``analyze`` writes them as .mrc files."""
        return None

    @abc.abstractmethod
    def forward(self, coords: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Map values at 3-D frequencies.

        Parameters
        ----------
        coords
            ``(B, P, 3)`` frequencies ``(kx, ky, kz)`` in cycles per training pixel.
        z
            ``(B, zdim)`` latents, or ``None`` for a homogeneous decoder (``zdim == 0``).

        Returns
        -------
        ``(B, P)`` complex (fourier domain) or real (hartley domain) values.
        """

    @abc.abstractmethod
    def eval_volume(self, z: torch.Tensor | None = None, *, box_size: int | None = None) -> torch.Tensor:
        """Real-space map ``(n, n, n)`` for one latent ``(zdim,)`` (``n = box_size or D``).

        A box smaller than the training box keeps the pixel size ratio ``D / n`` larger pixels
        (frequencies are cropped to ``n / (2 D)``), like Fourier-crop downsampling.
        """


_REGISTRY: dict[str, Callable[..., VolumeDecoder]] = {}


def register_decoder(name: str) -> Callable[[type], type]:
    """Class decorator: make a decoder buildable by ``build_decoder(name, ...)``."""

    def wrap(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def decoder_names() -> list[str]:
    """Names of the registered decoders."""
    _load_builtin_decoders()
    return sorted(_REGISTRY)


def decoder_class(name: str) -> Callable[..., VolumeDecoder]:
    """The registered class of decoder ``name`` (``ValueError`` when unknown)."""
    _load_builtin_decoders()
    if name not in _REGISTRY:
        raise ValueError(f"unknown decoder {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_decoder(name: str, **config: Any) -> VolumeDecoder:
    """Instantiate a registered decoder from its name and config (as saved in a run folder)."""
    _load_builtin_decoders()
    if name not in _REGISTRY:
        raise ValueError(f"unknown decoder {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name](**config)


def build_saved_decoder(name: str, config: dict[str, Any]) -> VolumeDecoder:
    """The decoder a checkpoint's ``{"name", "config"}`` describes, its config brought up to date by the
    class's :meth:`VolumeDecoder.upgrade_config`."""
    return build_decoder(name, **decoder_class(name).upgrade_config(config))


def _load_builtin_decoders() -> None:
    """Import the decoder modules shipped with cryoscape so they register themselves."""
    import importlib

    for module in ("cryoscape.models.neural_field", "cryoscape.models.basis", "cryoscape.models.cryoformer",
                   "cryoscape.models.atomic"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
