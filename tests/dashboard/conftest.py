"""A run folder without training: a simulated particle file, its config.yaml and latents we choose.

The latents are three well-separated 2-D blobs (known membership), so selections, exports and
colourings have exact expected answers; the folder has no checkpoint, so the dashboard offers no
maps (tests that need maps live in tests/report, beside the trained 3-class model, and in
test_time_to_first_map.py).
"""

from __future__ import annotations

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
