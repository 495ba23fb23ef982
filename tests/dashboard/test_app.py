"""The web layer: tokens, the loopback rule, JSON-only changes, and file routes confined to the run folder."""

from __future__ import annotations

import logging

import base64
import os

import numpy as np
import pytest

from cryoscape.dashboard.app import create_app
from cryoscape.dashboard.session import DashboardSession


@pytest.fixture(scope="module")
def session(latent_run):
    return DashboardSession(latent_run)


def test_loopback_without_token_refuses_other_host_names(session):
    client = create_app(session).test_client()
    assert client.get("/api/summary", base_url="http://127.0.0.1:8050").status_code == 200
    assert client.get("/api/summary", base_url="http://localhost:8050").status_code == 200
    # a page elsewhere that rebinds its own name to 127.0.0.1 sends its own Host
    assert client.get("/api/summary", base_url="http://evil.example:8050").status_code == 403


def test_token_is_required_and_remembered(session):
    client = create_app(session, token="s3cret-token").test_client()
    base = "http://10.0.0.5:8050"
    assert client.get("/", base_url=base).status_code == 403
    assert client.get("/api/summary?token=wrong-token", base_url=base).status_code == 403
    assert client.get("/api/summary", base_url=base, headers={"X-Cryoscape-Token": "s3cret-token"}).status_code == 200
    first = client.get("/?token=s3cret-token", base_url=base)
    assert first.status_code == 200 and "cryoscape_token=s3cret-token" in first.headers["Set-Cookie"]
    assert "HttpOnly" in first.headers["Set-Cookie"]
    assert client.get("/api/summary", base_url=base).status_code == 200  # the cookie now carries it


def test_files_are_confined_to_the_run_folder(session, latent_run):
    client = create_app(session).test_client()
    secret = latent_run.parent / "secret.txt"
    secret.write_text("not for the browser")
    link = latent_run / "link_out.txt"
    if not link.exists():
        os.symlink(secret, link)
    assert client.get("/files/config.yaml").status_code == 200
    for path in ("/files/../secret.txt", "/files/%2e%2e/secret.txt", "/files/link_out.txt",
                 f"/files/{secret}", "/files/..%2Fsecret.txt"):
        response = client.get(path, follow_redirects=True)
        assert response.status_code in (403, 404), path
        assert b"not for the browser" not in response.data
    assert client.get("/files/no_such_file").status_code == 404


def test_selection_api_and_changes_need_json(session, latent_run):
    client = create_app(session).test_client()
    blob = np.load(latent_run / "blob.npy")
    xy = session.embedding("pc")
    sel = xy[blob == 2]
    lo, hi = sel.min(0) - 1, sel.max(0) + 1
    polygon = [[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]]
    reply = client.post("/api/select", json={"polygon": polygon, "embedding": "pc"}).get_json()
    positions = np.frombuffer(base64.b64decode(reply["positions"]["b64"]), dtype="<i4")
    assert reply["count"] == 100 and positions.tolist() == np.flatnonzero(blob == 2).tolist()
    assert client.post("/api/select", data="polygon=1").status_code == 415
    bad = client.post("/api/select", json={"polygon": [[0, 0]], "embedding": "pc"})
    assert bad.status_code == 400 and "3 finite" in bad.get_json()["error"]
    assert client.get("/vendor/plotly.min.js").status_code == 200  # shipped with the plotly package


def test_history_of_a_run_without_checkpoint(session):
    h = create_app(session).test_client().get("/api/history").get_json()
    assert h["epochs"] == [] and h["planned_epochs"] == 3


def test_cli_bad_run_is_one_sentence(tmp_path, capsys):
    from cryoscape.cli.main import main

    assert main(["dashboard", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and err.count("\n") == 1


def test_the_request_log_does_not_show_the_token(session, caplog):
    """A browser's first request carries ?token= in its address; werkzeug's request log must not print it."""
    import urllib.request

    from cryoscape.dashboard.server import start_server

    running = start_server(session, host="127.0.0.1", port=0, token="s3cret-token", background=True)
    try:
        with caplog.at_level(logging.INFO, logger="werkzeug"):
            with urllib.request.urlopen(running.url_with_token, timeout=30) as reply:
                assert reply.status == 200
        logged = " ".join(r.getMessage() for r in caplog.records if r.name == "werkzeug")
        assert "GET /?token=*** HTTP" in logged and "s3cret-token" not in logged
    finally:
        running.shutdown()


def test_a_noisy_surface_is_sent_on_a_coarser_grid_and_a_clean_one_in_full():
    """The map reply keeps the browser's drawing bounded: at most MAX_TRIANGLES triangles (a noise map's
    surface at step 1 has several times more), while a smooth map keeps every voxel."""
    from cryoscape.dashboard.app import MAX_TRIANGLES, _map_reply
    from cryoscape.report.mapviews import isosurface_mesh

    noise = np.random.default_rng(0).normal(size=(64, 64, 64)).astype(np.float32)
    reply = _map_reply(noise, level=0.0)
    assert len(isosurface_mesh(noise, 0.0)[1]) > 2 * MAX_TRIANGLES
    assert reply["mesh_step"] > 1 and 0 < reply["faces"]["shape"][0] <= MAX_TRIANGLES
    x = np.linspace(-1, 1, 64)
    blob = np.exp(-(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2) / 0.2).astype(np.float32)
    smooth = _map_reply(blob, level=0.5)
    assert smooth["mesh_step"] == 1
    assert smooth["faces"]["shape"][0] == len(isosurface_mesh(blob, 0.5)[1]) > 1000
