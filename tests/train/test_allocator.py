"""The process set-up the command entry point does: glibc keeps large freed blocks for reuse."""

from __future__ import annotations

import sys

import pytest

from cryoscape.train.allocator import keep_large_allocations


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_allocations_are_kept_unless_turned_off(monkeypatch):
    monkeypatch.setenv("CRYOSCAPE_KEEP_ALLOCATIONS", "0")
    assert keep_large_allocations() is False
    monkeypatch.delenv("CRYOSCAPE_KEEP_ALLOCATIONS")
    assert keep_large_allocations() is True  # mallopt accepted both settings
