"""What is trained: a decoder, an optional encoder, and their optimisers (:class:`Model`).

The decoder is the one named by the config (models/ registry), the encoder the VAE's image or
tilt-pair encoder (``zdim > 0``).  Parameter groups come from the decoder's
:meth:`~cryoscape.models.base.VolumeDecoder.optimizer_param_groups` hook: dense groups share one
Adam, sparse groups (voxel tables with ``torch.sparse_coo`` gradients) a row-sparse Adam.  A
:class:`Model` can be rebuilt from a seed (:meth:`Model.reset`: the thesis's resets in ab
initio) and saved and loaded as the ``decoder`` / ``encoder`` / ``optimizer`` /
``sparse_optimizer`` entries of a checkpoint (:mod:`cryoscape.train.checkpoint`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from cryoscape.errors import InputError
from cryoscape.train.config import TrainConfig

__all__ = ["Model", "resolve_device", "build_decoder_for", "check_options", "check_decoder_domain", "build_encoder_for",
           "build_optimizers"]


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` picks ``cuda`` when a GPU is present, else ``cpu``."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_decoder_for(config: TrainConfig, box_size: int):
    """The decoder named by ``config.decoder``, built with the options it accepts.

    The common options (box, zdim, ``dec_layers`` as ``layers``, ``dec_dim`` as ``width``,
    ``domain``, ``pe_type`` as ``encoding``, ``pe_dim`` as ``n_freqs``, ``gaussian_scale``,
    ``seed``) are passed when the decoder's constructor takes them; ``decoder_options`` are
    passed as they are.
    """
    from cryoscape.models.base import build_decoder, decoder_names

    names = decoder_names()
    if config.decoder not in names:
        raise InputError(f"--decoder {config.decoder} is not a known decoder; choose one of {', '.join(names)}.")
    common = _flag_options(config, box_size)
    kwargs = {k: v for k, v in common.items() if _takes(config.decoder, k)}
    kwargs.update(config.decoder_options or {})
    try:
        decoder = build_decoder(config.decoder, **kwargs)
    except (TypeError, ValueError) as err:
        raise InputError(f"the decoder {config.decoder} could not be built with these options ({err}); "
                         "fix the --dec-*/--pe-*/--decoder-opt options.") from None
    if decoder.domain != config.domain:
        raise _domain_error(config, decoder.domain)
    return decoder


def _flag_options(config: TrainConfig, box_size: int) -> dict[str, Any]:
    """The decoder options train takes from its own flags (:func:`build_decoder_for`)."""
    return {
        "box_size": box_size, "zdim": config.zdim, "layers": config.dec_layers, "width": config.dec_dim,
        "domain": config.domain, "encoding": config.pe_type, "n_freqs": config.pe_dim,
        "gaussian_scale": config.gaussian_scale, "seed": config.seed,
    }


def saved_decoder_options(config: TrainConfig, state: dict[str, Any]) -> dict[str, Any]:
    """The ``decoder_options`` a run resumed from checkpoint ``state`` continues with: its own, plus every
    option whose saved value (brought up to date by the class's ``upgrade_config``) differs from what this
    version would build from them, so that a default changed since the checkpoint does not change the model
    in the middle of a run.  The options train takes from its own flags stay theirs (a checkpoint whose
    flags and weights disagree is refused when the weights are loaded); unchanged when the checkpoint holds
    another decoder."""
    from cryoscape.models.base import decoder_class

    options = dict(config.decoder_options or {})
    spec = state.get("decoder") or {}
    if spec.get("name") != config.decoder:
        return options
    saved = decoder_class(config.decoder).upgrade_config(spec["config"])
    with torch.random.fork_rng(devices=[]):  # a throwaway build: the run's generator is left as it was
        today = build_decoder_for(config, int(saved["box_size"])).config
    flags = _flag_options(config, 0)
    options.update({k: v for k, v in saved.items() if k in today and k not in flags and today[k] != v})
    return options


def check_options(config: TrainConfig) -> None:
    """The checks a run makes before it reads any image: :meth:`TrainConfig.validate` and the
    decoder's domain (:func:`check_decoder_domain`), each failure one :class:`InputError` sentence."""
    try:
        config.validate()
    except ValueError as err:
        raise InputError(f"{err}.") from None
    check_decoder_domain(config)


def check_decoder_domain(config: TrainConfig) -> None:
    """Raise :func:`build_decoder_for`'s domain error before any image is read: a decoder whose
    constructor takes no ``domain`` works in its class's domain only (the voxel basis: Fourier)."""
    from cryoscape.models.base import decoder_class, decoder_names

    if config.decoder not in decoder_names():
        return  # build_decoder_for names the known decoders
    domain = decoder_class(config.decoder).domain
    if not _takes(config.decoder, "domain") and domain != config.domain:
        raise _domain_error(config, domain)


def _takes(decoder: str, option: str) -> bool:
    """Whether the constructor of the registered decoder ``decoder`` accepts the keyword ``option``."""
    from cryoscape.models.base import decoder_class

    params = inspect.signature(decoder_class(decoder)).parameters
    return option in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _domain_error(config: TrainConfig, decoder_domain: str) -> InputError:
    hartley = ", or --decoder neural_field for the Hartley domain" if config.domain == "hartley" else ""
    return InputError(f"the decoder {config.decoder} works in the {decoder_domain} domain but "
                      f"--domain {config.domain} was asked; pass --domain {decoder_domain}{hartley}.")


def build_encoder_for(config: TrainConfig, box_size: int):
    """The VAE encoder (``None`` when ``zdim == 0``): an image encoder, or a tilt-pair encoder."""
    if config.zdim <= 0:
        return None
    from cryoscape.models.encoders import build_encoder

    enc_config = {
        "type": "tilt_pair" if config.tilt else "image", "box_size": box_size, "zdim": config.zdim,
        "kind": config.encoder, "layers": config.enc_layers, "width": config.enc_dim,
    }
    if config.enc_mask_radius_fraction is not None:
        enc_config["mask_radius_fraction"] = config.enc_mask_radius_fraction
    if config.enc_lowpass_fraction is not None:
        enc_config["lowpass_fraction"] = config.enc_lowpass_fraction
    try:
        return build_encoder(enc_config)
    except (TypeError, ValueError) as err:
        raise InputError(f"the encoder could not be built ({err}); fix the --encoder/--enc-* options.") from None


def _make_adam(params, *, lr: float, weight_decay: float, eps: float | None = None) -> torch.optim.Adam:
    """Adam, fused into one kernel where this torch build supports it for the parameters' device
    (``eps``: ``None`` for torch's default)."""
    kwargs = {"lr": lr, "weight_decay": weight_decay, **({} if eps is None else {"eps": float(eps)})}
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, **kwargs)


def model_param_groups(decoder, encoder, lr: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(dense groups, sparse groups)`` of the decoder and encoder parameters.

    A decoder without groups of its own (the hook returns ``None``) shares one group with the
    encoder at ``--lr`` (as runs before the hook existed, so their checkpoints load).  Otherwise
    each group trains at ``lr_scale * --lr`` (the scale is kept in the optimiser state, so
    resuming with another ``--lr`` keeps the ratio) and the encoder forms a group of its own.
    """
    enc = [] if encoder is None else list(encoder.parameters())
    groups = decoder.optimizer_param_groups()
    if groups is None:
        return [{"params": list(decoder.parameters()) + enc, "lr": lr, "lr_scale": 1.0}], []
    dense, sparse = [], []
    for group in groups:
        group = dict(group)
        is_sparse = bool(group.pop("sparse", False))
        group["lr_scale"] = float(group.get("lr_scale", 1.0))
        group["lr"] = lr * group["lr_scale"]
        (sparse if is_sparse else dense).append(group)
    if enc:
        dense.append({"params": enc, "lr": lr, "lr_scale": 1.0})
    return dense, sparse


def build_optimizers(config: TrainConfig, decoder, encoder):
    """``(Adam or None, row-sparse Adam or None)`` for the decoder and encoder (:func:`model_param_groups`)."""
    dense_groups, sparse_groups = model_param_groups(decoder, encoder, config.lr)
    # (a decoder whose parameters all have sparse gradients, e.g. a homogeneous voxel map, has no dense group)
    optimizer = None
    if dense_groups:
        optimizer = _make_adam(dense_groups, lr=config.lr, weight_decay=config.weight_decay, eps=decoder.adam_eps())
    sparse_optimizer = None
    if sparse_groups:
        from cryoscape.models.sparse_slice import RowSparseAdam

        sparse_optimizer = RowSparseAdam(sparse_groups, lr=config.lr)
    return optimizer, sparse_optimizer


def set_group_lrs(optimizer, lr: float) -> None:
    """``lr_scale * lr`` for every group (``lr_scale`` 1 where a group has none)."""
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr * float(group.get("lr_scale", 1.0))


class Model:
    """Decoder, encoder and their optimisers, built from ``config`` for a box of ``box_size``.

    ``seed``: build under this torch seed without disturbing the global generator (a rebuilt
    model in the middle of a run); ``None``: build from the global generator as it is.
    """

    def __init__(self, config: TrainConfig, box_size: int, device: torch.device, *, seed: int | None = None):
        self.config, self.box_size, self.device = config, int(box_size), device
        if seed is None:
            self._build()
        else:
            self.reset(seed)

    def _build(self) -> None:
        self.decoder = build_decoder_for(self.config, self.box_size).to(self.device)
        encoder = build_encoder_for(self.config, self.box_size)
        self.encoder = None if encoder is None else encoder.to(self.device)
        self.optimizer, self.sparse_optimizer = build_optimizers(self.config, self.decoder, self.encoder)

    def reset(self, seed: int) -> None:
        """New weights (from ``seed``) and fresh optimiser states; the global generator is left as it was."""
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self._build()
        finally:
            torch.random.set_rng_state(state)

    @property
    def zdim(self) -> int:
        return int(self.decoder.zdim)

    @property
    def name(self) -> str:
        """The registry name of the decoder."""
        return self.config.decoder

    def modules(self) -> list[torch.nn.Module]:
        return [self.decoder] + ([] if self.encoder is None else [self.encoder])

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def optimizers(self) -> list:
        return [o for o in (self.optimizer, self.sparse_optimizer) if o is not None]

    def train(self, mode: bool = True) -> None:
        for m in self.modules():
            m.train(mode)

    def set_lr(self, lr: float, *, weight_decay: float | None = None) -> None:
        """Learning rates (and weight decay of the dense groups) given now win over the saved ones."""
        for opt in self.optimizers():
            set_group_lrs(opt, lr)
        if weight_decay is not None and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["weight_decay"] = weight_decay

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries of the model (decoder name, configs, weights, optimiser states)."""
        return {
            "decoder": {"name": self.config.decoder, "config": dict(self.decoder.config),
                        "state": self.decoder.state_dict()},
            "encoder": None if self.encoder is None else {"config": dict(self.encoder.config),
                                                          "state": self.encoder.state_dict()},
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "sparse_optimizer": None if self.sparse_optimizer is None else self.sparse_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict` entries; a checkpoint of another model raises one clear sentence."""
        try:
            self.decoder.load_state_dict(state["decoder"]["state"])
            if self.encoder is not None:
                if state.get("encoder") is None:
                    raise KeyError("encoder")
                self.encoder.load_state_dict(state["encoder"]["state"])
            if self.optimizer is not None and state.get("optimizer") is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            if self.sparse_optimizer is not None and state.get("sparse_optimizer") is not None:
                self.sparse_optimizer.load_state_dict(state["sparse_optimizer"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            detail = " ".join(line.strip() for line in str(err).splitlines())[:240]
            raise InputError(
                f"the checkpoint does not fit this model ({type(err).__name__}: {detail}); "
                "use the same --zdim, --decoder and --enc/--dec sizes as the run that wrote it."
            ) from None

    def zero_grad(self, extra: list | tuple = ()) -> None:
        for opt in (*self.optimizers(), *extra):
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One optimiser step of every group, then the decoder's after-step hook."""
        for opt in self.optimizers():
            opt.step()
        self.decoder.after_optimizer_step()
