"""A run folder without training: a simulated particle file, its config.yaml and latents we choose.

The latents are three well-separated 2-D blobs (known membership), so selections, exports and
colourings have exact expected answers; the folder has no checkpoint, so the dashboard offers no
maps (tests that need maps live in tests/report, beside the trained 3-class model, and in
test_time_to_first_map.py).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

N = 300


@pytest.fixture(scope="session")
def latent_run(tmp_path_factory) -> Path:
    from cryoscape.cli.main import main
    from cryoscape.io.run_folder import write_config

    root = tmp_path_factory.mktemp("dashboard_run")
    assert main(["simulate", "-o", str(root / "sim"), "-n", str(N), "-D", "16", "--snr", "1", "--seed", "2"]) == 0
    run = root / "run"
    run.mkdir()
    write_config(run, "train", {"particles": str(root / "sim" / "particles.star"), "num_epochs": 3})
    rng = np.random.default_rng(0)
    blob = np.repeat(np.arange(3), N // 3)
    centres = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    z = centres[blob] + rng.normal(scale=0.5, size=(N, 2))
    np.save(run / "z.2.npy", z.astype(np.float32))
    np.save(run / "blob.npy", blob)
    return run


CHROMIUM = Path(os.environ.get("CRYOSCAPE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Chromium's path (``make test`` installs it with scripts/testdeps/browser.sh); skips saying what is missing."""
    reason = None
    if importlib.util.find_spec("playwright") is None:
        reason = "the python package playwright is not installed (make test installs it: scripts/testdeps/browser.sh)"
    elif not CHROMIUM.is_file():
        reason = f"no Chromium at {CHROMIUM} (make test installs Debian's chromium: scripts/testdeps/browser.sh)"
    if reason:
        warnings.warn(f"browser test skipped: {reason}", UserWarning, stacklevel=2)
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture(scope="session")
def chromium_args() -> list[str]:
    """Chromium's command-line options: headless, no sandbox (containers), no network of its own."""
    return list(CHROMIUM_ARGS)
