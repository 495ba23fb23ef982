"""The dashboard's maps are analyze's maps, cached; its loss curves are the checkpoint's history."""

from __future__ import annotations

import shutil

import numpy as np

from cryoscape.analysis.maps import MapOptions
from cryoscape.dashboard.session import DashboardOptions, DashboardSession


def test_decoded_map_equals_generate_maps_and_is_cached(three_class_run, tmp_path):
    from cryoscape.analysis.maps import generate_maps, load_map_model, read_map_set

    session = DashboardSession(three_class_run, DashboardOptions(view_box=12, maps=MapOptions(amp=False)))
    latent = session.z[7]
    volume, seconds, cached = session.decode(latent)
    assert volume.shape == (12, 12, 12) and not cached and seconds > 0
    reference = generate_maps(load_map_model(three_class_run), latent[None], tmp_path, box_size=12, amp=False,
                              progress=False)
    np.testing.assert_allclose(volume, read_map_set(reference.paths)[0], rtol=1e-5, atol=1e-6)
    again, seconds, cached = session.decode(latent.copy())
    assert cached and seconds == 0.0 and again is volume
    assert session.summary()["view_box"] == 12 and session.summary()["box_size"] == 16


def test_history_follows_the_checkpoint_and_says_when_training_continues(three_class_run, tmp_path):
    session = DashboardSession(three_class_run)
    h = session.history()
    assert h["epochs"] == [0, 1, 2, 3, 4] and h["planned_epochs"] == 5 and h["in_progress"] is False
    assert h["loss"][-1] < h["loss"][0]
    # the same run with more epochs planned: the page keeps polling
    run = tmp_path / "run"
    shutil.copytree(three_class_run, run, ignore=shutil.ignore_patterns("analysis.*", "dashboard", "traverse.*"))
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("num_epochs: 5", "num_epochs: 50"))
    assert DashboardSession(run).history()["in_progress"] is True
