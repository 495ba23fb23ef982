#!/usr/bin/env python
"""Run ``cryoscape`` with bfloat16 matrix products emulated, for accuracy on a CPU without bfloat16.

On a CPU without AVX512-BF16/AMX, PyTorch's bfloat16 matrix products run through a slow generic
path (bench/README.md has the figure), so ``train --amp`` there measures nothing useful about time
and is slow at the benchmark's sizes.  This wrapper keeps what
autocast decides (which products run in bfloat16, which stay float32: the same code path as
``--amp`` on a CPU that has bfloat16) and replaces only the arithmetic of a product whose operands
are bfloat16: they are widened to float32 (exactly), multiplied with float32 accumulation, and the
result is rounded back to bfloat16.  That is what AVX512-BF16 and AMX do (bfloat16 operands, float32
accumulation); only the order of the float32 additions may differ.  So the maps and latents it
trains are the bfloat16 ones; its images/s are not (the interception costs Python time per
operation).

The interception is on only where bfloat16 products can occur: inside cryoscape's autocast regions
(``cryoscape.models.precision.autocast`` when enabled) and in backward passes.  Everywhere else it
stays off, because a Python dispatch mode makes some operations very slow (a batched
``torch.linalg.solve``, as in the basis refit, runs far slower under it).

Usage: ``python bench/bf16_emulation.py train ... --amp`` (any cryoscape command line).
"""

from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cryoscape.cli.main: before the first torch import
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

aten = torch.ops.aten
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.addbmm.default,
            aten.dot.default, aten.mv.default, aten.addmv.default}


class Bfloat16Products(TorchDispatchMode):
    """A product with bfloat16 operands computed in float32 and rounded to bfloat16."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            wide = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
            return func(*wide, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


@contextlib.contextmanager
def installed():
    """The interception on inside cryoscape's enabled autocast regions and in backward passes
    (``cryoscape.models.precision.autocast`` and ``torch.Tensor.backward`` patched; restored on exit)."""
    import cryoscape.models.precision as precision

    original, backward = precision.autocast, torch.Tensor.backward

    @contextlib.contextmanager
    def autocast(device, enabled):
        with original(device, enabled), (Bfloat16Products() if enabled else contextlib.nullcontext()):
            yield

    def backward_rounded(self, *args, **kwargs):
        with Bfloat16Products():
            return backward(self, *args, **kwargs)

    def swap(old, new):  # in precision, and in every cryoscape module that imported the name
        for module in list(sys.modules.values()):
            if module.__name__.startswith("cryoscape") and getattr(module, "autocast", None) is old:
                module.autocast = new

    swap(original, autocast)
    torch.Tensor.backward = backward_rounded
    try:
        yield
    finally:
        swap(autocast, original)  # modules imported meanwhile took the patched one
        torch.Tensor.backward = backward


def main(argv: list[str]) -> int:
    with installed():
        from cryoscape.cli.main import main as cryoscape_main

        return cryoscape_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
