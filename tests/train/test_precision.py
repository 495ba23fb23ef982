"""Mixed precision: the automatic choice and what it may not change (the loss stays float32)."""

from __future__ import annotations

import torch

from cryoscape.models import precision
from cryoscape.models.precision import resolve_amp


def test_explicit_setting_wins(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    cpu = torch.device("cpu")
    assert resolve_amp(False, cpu) is False
    assert resolve_amp(True, cpu) is True


def test_automatic_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    assert resolve_amp(None, cpu) is True
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: False)
    assert resolve_amp(None, cpu) is False


def test_no_mixed_precision_on_other_devices():
    assert resolve_amp(True, torch.device("meta")) is False
    assert resolve_amp(None, torch.device("meta")) is False


def test_cpu_flag_reader_agrees_with_proc_cpuinfo():
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert precision.cpu_has_native_bfloat16() is False
        return
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    assert precision.cpu_has_native_bfloat16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_float32_linear_stays_float32_under_autocast_where_linear_drops_to_bfloat16():
    from torch import nn

    from cryoscape.models.precision import Float32Linear, autocast

    torch.manual_seed(0)
    narrow, plain = Float32Linear(64, 3), nn.Linear(64, 3)
    plain.load_state_dict(narrow.state_dict())  # the same parameters as nn.Linear
    x = torch.randn(1000, 64, dtype=torch.bfloat16, requires_grad=True)
    with autocast("cpu", enabled=True):
        out, low = narrow(x), plain(x)
    assert out.dtype == torch.float32 and low.dtype == torch.bfloat16
    torch.testing.assert_close(out, plain(x.float()), rtol=0, atol=0)  # exactly the float32 layer
    assert float((low.float() - out).detach().abs().max()) > 1e-3  # what bfloat16 would have rounded
    out.square().sum().backward()
    assert narrow.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
