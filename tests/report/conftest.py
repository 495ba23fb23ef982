"""A small trained model of a 3-class simulated dataset, and its analysis (made once per session).

The classes are spherically symmetric (a compact ball and two thin shells of different radii), so
every view of a class looks alike and a tiny VAE separates them in a few epochs: 400 images of
16 px at SNR 1, zdim 2, 5 epochs, ~10 s on 2 CPU cores (measured ARI 0.98 at the last epoch).
The built-in hinge molecule's classes need ~20 epochs on 32 px images for that (see
tests/train/test_heterogeneity.py), too slow for the default suite.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path(os.environ.get("CRYOSCAPE_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
N_IMAGES = 400
BOX = 16


def _ball_and_shells(D: int) -> list[np.ndarray]:
    c = np.arange(D) - D // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt(xx**2 + yy**2 + zz**2)
    ball = np.exp(-(r**2) / (2 * 1.2**2))
    return [ball] + [np.exp(-((r - radius) ** 2) / (2 * 0.8**2)) for radius in (0.18 * D, 0.32 * D)]


@pytest.fixture(scope="session")
def three_class_dataset(tmp_path_factory) -> Path:
    from cryoscape.cli.main import main
    from cryoscape.io.mrc import write_mrc

    root = tmp_path_factory.mktemp("three_classes")
    files = []
    for i, volume in enumerate(_ball_and_shells(BOX)):
        files.append(root / f"class_{i}.mrc")
        write_mrc(files[-1], volume, pixel_size_angstrom=4.0)
    out = root / "sim"
    assert main(["simulate", "-o", str(out), "-n", str(N_IMAGES), "--snr", "1", "--classes", *map(str, files),
                 "--seed", "3", "--oversampling", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def three_class_run(three_class_dataset) -> Path:
    from cryoscape.train.config import TrainConfig
    from cryoscape.train.loop import run_training

    run = three_class_dataset.parent / "run"
    # the neural field, with the settings these analysis tests were written for
    config = TrainConfig(particles=str(three_class_dataset / "particles.star"), decoder="neural_field", zdim=2,
                         num_epochs=5, batch_size=8,
                         dec_layers=2, dec_dim=64, enc_layers=2, enc_dim=64, encoder="resmlp", lr=1e-3, beta=0.05,
                         progress=False, checkpoint_every=100, device="cpu", amp=False)
    run_training(config, run)
    return run


@pytest.fixture(scope="session")
def three_class_analysis(three_class_run):
    """``cryoscape analyze`` with k = 3, 2 PCs of 3 maps each, UMAP on."""
    from cryoscape.report.analyze import AnalyzeOptions, analyze_run

    return analyze_run(three_class_run, AnalyzeOptions(ksample=3, n_pcs=2, n_per_pc=3), progress=False)


def _skip(reason: str) -> None:
    warnings.warn(f"browser test skipped: {reason}", UserWarning, stacklevel=2)
    print(f"browser test skipped: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Chromium's path; skips (before the trained-model fixtures are built) where it cannot run.

    ``make test`` installs both (scripts/testdeps/browser.sh); the skip says what is missing.
    """
    if importlib.util.find_spec("playwright") is None:
        _skip("the python package playwright is not installed (make test installs it: scripts/testdeps/browser.sh)")
    if not CHROMIUM.is_file():
        _skip(f"no Chromium at {CHROMIUM} (make test installs Debian's chromium: scripts/testdeps/browser.sh; "
              "or set CRYOSCAPE_CHROMIUM)")
    return CHROMIUM


@pytest.fixture(scope="session")
def chromium_args() -> list[str]:
    """Chromium's command-line options: headless, no sandbox (containers), no network of its own."""
    return list(ARGS)
