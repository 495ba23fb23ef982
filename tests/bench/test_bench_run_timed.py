"""bench/common.run_timed measures the child's memory, not the memory of the process that starts it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from common import run_timed  # noqa: E402


def test_peak_rss_is_the_childs_not_the_parents(tmp_path):
    held = np.ones(400 * 1024 * 1024 // 8)  # this process holds 400 MB while the child runs
    child = "import numpy as np, time; b = np.ones(150 * 1024 * 1024 // 8); time.sleep(0.4)"
    result = run_timed([sys.executable, "-c", child], log_path=tmp_path / "log.txt")
    assert held.sum() > 0
    assert 150 <= result.peak_rss_mb < 350, result.peak_rss_mb  # 150 MB array plus the interpreter


def test_peak_rss_counts_descendants(tmp_path):
    child = "import numpy as np, time; b = np.ones(200 * 1024 * 1024 // 8); time.sleep(1.0)"
    command = ["bash", "-c", f"{sys.executable} -c '{child}'"]
    result = run_timed(command, log_path=tmp_path / "log.txt")
    assert result.peak_rss_mb >= 200, result.peak_rss_mb  # the grandchild's array, seen through bash
