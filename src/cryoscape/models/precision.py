"""Mixed precision: when to use it and the one autocast context every layer above uses.

Only the matrix products of encoders and decoders run in low precision (bfloat16: 8-bit mantissa,
float32 exponent range, so no loss scaling); positions (the slice geometry, CryoFormer's rendering
points), positional encodings, the image formation model, losses, FFTs and weights stay in float32,
and so do a network's narrow layers run on many points (:class:`Float32Linear`).
Training (train/loop.py, train/abinit.py), pose search (posesearch/) and map generation
(analysis/maps.py) all decide with :func:`resolve_amp` and enter :func:`autocast`, so
``--amp/--no-amp`` means the same thing everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["cpu_has_native_bfloat16", "resolve_amp", "amp_dtype", "autocast", "Float32Linear"]


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (x86 AVX512-BF16 or AMX-BF16, Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_amp(setting: bool | None, device: torch.device) -> bool:
    """Whether to run in mixed precision: ``setting`` (``--amp``/``--no-amp``) or automatic.

    Automatic (``None``) turns it on where low precision is both fast and safe: CUDA GPUs with
    bfloat16 (Ampere and later) and CPUs with bfloat16 instructions.  bench/train.py measures the
    same per-image FSC with and without it.
    """
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return False
    if setting is not None:
        return bool(setting)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bfloat16()


def amp_dtype(device: torch.device) -> torch.dtype:
    """The low precision: bfloat16 (float16 on GPUs without bfloat16)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device | str, enabled: bool):
    """Autocast context for the matrix products (a disabled one when ``enabled`` is false).

    On GPUs this is the usual autocast; on CPUs with bfloat16 instructions (AVX512-BF16, AMX) it
    roughly halves the time of the decoder's matrix products.  float16 (older GPUs) needs no
    loss scaling here because gradients of the per-pixel mean squared error are not tiny.
    """
    device = torch.device(device)
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, dtype=amp_dtype(device))
    return torch.autocast(device_type=device.type if device.type in ("cuda", "cpu") else "cpu", enabled=False)


class Float32Linear(nn.Linear):
    """A linear layer that stays in float32 under autocast (its input is cast up, its output is float32).

    For a network's narrow layers (a few inputs or outputs, e.g. coordinates in, a density out) run
    on many points: their products cost little in any precision, while the weight gradient, a
    reduction over all the points into a thin matrix, ran several times slower in the CPU's bfloat16
    than in float32 (README, "Choosing a decoder: CryoFormer").  Same parameters as ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())
