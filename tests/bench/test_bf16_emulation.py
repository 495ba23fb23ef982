"""bench/bf16_emulation.py: bfloat16 products emulated in float32 give bfloat16's results, and only
inside cryoscape's enabled autocast regions and backward passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bf16_emulation  # noqa: E402

from cryoscape.models import precision  # noqa: E402


def _mlp_step(mlp, x, autocast):
    """Output and input gradient of ``mlp`` run under ``autocast`` (forward) with backward after it."""
    x = x.clone().requires_grad_(True)
    with autocast:
        y = mlp(x)
    y.float().square().sum().backward()
    return y.detach().float(), x.grad


def test_emulated_products_match_native_bfloat16_to_rounding():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    x = torch.randn(128, 64)
    native = _mlp_step(mlp, x, torch.autocast("cpu", dtype=torch.bfloat16))
    with bf16_emulation.Bfloat16Products():
        emulated = _mlp_step(mlp, x, torch.autocast("cpu", dtype=torch.bfloat16))
    exact = _mlp_step(mlp, x, torch.autocast("cpu", enabled=False))
    for n, e, f in zip(native, emulated, exact):  # output, then input gradient
        # the same numbers but for the order of float32 additions: a rare last-bit difference
        assert (n != e).float().mean() < 0.01
        # and they are bfloat16's numbers, not float32's
        assert (n - e).abs().mean() < 0.01 * (n - f).abs().mean()


@pytest.mark.parametrize("enabled", [True, False])
def test_interception_only_in_enabled_autocast_and_backward(enabled):
    seen = {}
    mlp = torch.nn.Linear(8, 8)

    class Probe(torch.autograd.Function):  # records the mode active during backward
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            seen["backward"] = _get_current_dispatch_mode()
            return g

    with bf16_emulation.installed():
        with precision.autocast(torch.device("cpu"), enabled):
            seen["autocast"] = _get_current_dispatch_mode()
            y = mlp(Probe.apply(torch.randn(4, 8, requires_grad=True)))
        seen["outside"] = _get_current_dispatch_mode()
        y.float().sum().backward()
    assert isinstance(seen["autocast"], bf16_emulation.Bfloat16Products) is enabled
    assert y.dtype == (torch.bfloat16 if enabled else torch.float32)
    assert seen["outside"] is None
    assert isinstance(seen["backward"], bf16_emulation.Bfloat16Products)
    # restored on exit
    assert precision.autocast.__module__ == "cryoscape.models.precision"
    assert torch.Tensor.backward.__name__ == "backward"
