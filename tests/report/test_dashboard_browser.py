"""``cryoscape dashboard`` in headless Chromium, on the trained 3-class model.

A scripted lasso around one class selects exactly the particles inside it (the server's polygon test,
the one ``cryoscape select --polygon`` uses), the export writes their .star rows, a clicked particle
shows its map (a mesh whose triangle count follows the threshold slider), a graph path plays and is
saved as ``traverse`` would, the k-means centre maps appear, and a file outside the run folder is
refused.  Set CRYOSCAPE_SCREENSHOT_DIR (e.g. docs/images) to keep the screenshots.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHOTS = os.environ.get("CRYOSCAPE_SCREENSHOT_DIR")


@pytest.fixture(scope="module")
def dashboard(chromium, chromium_args, three_class_run, three_class_analysis):
    """``(page, session, server, console errors)``: one dashboard of the run in one browser page."""
    from playwright.sync_api import sync_playwright

    from cryoscape.dashboard.server import start_server
    from cryoscape.dashboard.session import DashboardSession

    session = DashboardSession(three_class_run)
    server = start_server(session, port=0, background=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=chromium_args, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1150})
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url_with_token)
        page.wait_for_function("window.cryoscape && window.cryoscape.ready === true", timeout=60_000)
        try:
            yield page, session, server, errors
        finally:
            browser.close()
            server.shutdown()


def _shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"dashboard_{name}.png"), full_page=False)


def _to_page(page, x: float, y: float) -> tuple[float, float]:
    p = page.evaluate("([x, y]) => window.cryoscape.dataToPage(x, y)", [float(x), float(y)])
    return p["x"], p["y"]


def _show_inside_the_axes(page, box: np.ndarray) -> None:
    """Set the scatter's axes to hold ``box`` with a margin: a box edge beyond the autoscaled axes
    puts the drawn lasso's start in the axis margin, where a drag pans the axis instead of drawing
    (an embedding from another CPU's training rounding put a class's box 5 px below the axes)."""
    lo, hi = box.min(0), box.max(0)
    pad = 0.15 * (hi - lo)
    page.evaluate("([x, y]) => Plotly.relayout('scatter', {'xaxis.range': x, 'yaxis.range': y})",
                  [[float(lo[0] - pad[0]), float(hi[0] + pad[0])], [float(lo[1] - pad[1]), float(hi[1] + pad[1])]])


def _clean_box(xy: np.ndarray, truth: np.ndarray) -> tuple[int, np.ndarray]:
    """``(class, box)``: a box around one class whose edges have no particle within 1.5 % of the axis
    range (so the pixel rounding of a drawn lasso cannot change what it holds)."""
    span = np.ptp(xy, axis=0)
    for c in range(int(truth.max()) + 1):
        for pad in (0.03, 0.05, 0.08):
            lo, hi = xy[truth == c].min(0) - pad * span, xy[truth == c].max(0) + pad * span
            box = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
            eps = 0.015 * span
            outer = np.all((xy > lo - eps) & (xy < hi + eps), axis=1)
            inner = np.all((xy > lo + eps) & (xy < hi - eps), axis=1)
            if not np.any(outer & ~inner):  # nothing within eps of the box's edges
                return c, box
    pytest.fail("no box with clean edges around any class")


def test_page_loads_with_every_particle_and_no_console_error(dashboard):
    page, session, _, errors = dashboard
    assert page.evaluate("window.cryoscape.x.length") == len(session.z) == 400
    assert "400 particles" in page.inner_text("#run-info")
    assert errors == []


def test_lasso_selects_exactly_the_particles_inside_and_exports_their_star_rows(dashboard, three_class_dataset):
    import starfile

    from cryoscape.analysis.selection import points_in_polygon

    page, session, _, errors = dashboard
    truth = np.load(three_class_dataset / "ground_truth.npz")["state_index"]
    xy = session.embedding("pc")
    target, box = _clean_box(xy, truth)
    expected = points_in_polygon(xy, box)
    assert np.mean(truth[expected] == target) > 0.9  # the box holds (mostly) that class
    _show_inside_the_axes(page, box)
    try:
        corners = [_to_page(page, *v) for v in np.vstack([box, box[:1]])]
        page.mouse.move(*corners[0])
        page.mouse.down()
        for (x0, y0), (x1, y1) in zip(corners[:-1], corners[1:]):
            for t in np.linspace(0, 1, 8)[1:]:
                page.mouse.move(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
        page.mouse.up()
        page.wait_for_function("window.cryoscape.selectionCount > 0", timeout=20_000)
    finally:  # the page is shared by the tests that follow: back to the autoscaled axes
        page.evaluate("Plotly.relayout('scatter', {'xaxis.autorange': true, 'yaxis.autorange': true})")
    selected = page.evaluate("Array.from(window.cryoscape.selected)")
    assert selected == expected.tolist()
    assert f"{expected.size} of 400 particles selected" in page.inner_text("#selection-count")
    _shot(page, "selection")

    page.fill("#export-name", "lasso_class")
    page.select_option("#export-format", "star")
    page.click("#export")
    page.wait_for_function("window.cryoscape.lastExport !== undefined", timeout=20_000)
    files = page.evaluate("window.cryoscape.lastExport.files")
    written = starfile.read(session.run / files["subset"])
    original = starfile.read(three_class_dataset / "particles.star")
    # the selected rows as the original has them (rlnImageName included, as select writes subsets)
    assert written["particles"]["rlnImageName"].tolist() == \
        original["particles"]["rlnImageName"].iloc[expected].tolist()
    assert errors == []


def test_a_clicked_particle_shows_its_map_and_the_threshold_changes_the_surface(dashboard):
    page, session, _, errors = dashboard
    index = int(session.colouring("kmeans:3").centres[0])
    clicked = _to_page(page, *session.embedding("pc")[index])
    page.mouse.click(*clicked)
    page.wait_for_function("window.cryoscape.mapsShown >= 1", timeout=30_000)
    timing = page.evaluate("window.cryoscape.timings[0]")
    print(f"\ntime to first map (16 px, neural field): {timing['ms'] / 1000:.2f} s after the click "
          f"(decode {timing['decode_seconds']:.3f} s)")
    shown = page.evaluate("window.cryoscape.mapShown")  # the clicked particle, or one drawn on top of it
    assert np.hypot(*np.subtract(_to_page(page, *session.embedding("pc")[shown]), clicked)) < 6
    triangles = page.evaluate("document.getElementById('iso').data[0].i.length")
    assert triangles > 0 and page.evaluate("document.getElementById('slice-xy').naturalWidth") == 16
    high = page.evaluate("(() => { const s = document.getElementById('level'); "
                         "return Number(s.min) + 0.9 * (Number(s.max) - Number(s.min)); })()")
    page.evaluate("(v) => { const s = document.getElementById('level'); s.value = v; "
                  "s.dispatchEvent(new Event('input')); }", high)
    page.wait_for_function("window.cryoscape.levelShown !== undefined", timeout=20_000)
    assert page.evaluate("document.getElementById('iso').data[0].i.length") < triangles
    _shot(page, "map")
    assert errors == []


def test_a_click_anywhere_on_pc1_pc2_decodes_the_latent_there(dashboard):
    page, session, _, errors = dashboard
    xy = session.embedding("pc")
    point = xy.min(0) + 0.15 * np.ptp(xy, axis=0)  # a corner of the plot, away from most particles
    before = page.evaluate("window.cryoscape.mapsShown")
    page.check("#free-point")
    page.mouse.click(*_to_page(page, *point))
    page.wait_for_function(f"window.cryoscape.mapsShown > {before}", timeout=30_000)
    page.uncheck("#free-point")
    clicked = np.array(page.evaluate("window.cryoscape.freePoint"))
    assert np.allclose(clicked, point, atol=0.02 * np.ptp(xy, axis=0).max())  # within a pixel or two
    latent = np.array(page.evaluate("window.cryoscape.volume.latent"))
    np.testing.assert_allclose(latent, session.pca.to_latent(clicked[None])[0], rtol=1e-5, atol=1e-5)
    assert errors == []


def test_graph_path_plays_and_saves_as_traverse(dashboard):
    from scipy.sparse.csgraph import connected_components

    from cryoscape.analysis.trajectories import build_neighbour_graph, graph_traversal

    page, session, _, errors = dashboard
    z = session.z
    _, part = connected_components(build_neighbour_graph(z).adjacency, directed=False)
    members = np.flatnonzero(part == np.bincount(part).argmax())
    d = np.linalg.norm(z[members][:, None] - z[members][None], axis=-1)
    i, j = np.unravel_index(d.argmax(), d.shape)
    a, b = int(members[i]), int(members[j])
    reference = graph_traversal(z, [a, b])
    page.check("#anchor-mode")
    page.evaluate("(a) => { window.cryoscape.anchors = a; }", [a, b])
    page.fill("#max-maps", "6")
    page.click("#path-find")
    page.wait_for_function("window.cryoscape.path !== null", timeout=20_000)
    assert page.evaluate("window.cryoscape.path.indices") == reference.indices.tolist()
    before = page.evaluate("window.cryoscape.mapsShown")
    frames = len(page.evaluate("window.cryoscape.path.map_indices"))
    page.click("#path-play")
    page.wait_for_function(f"window.cryoscape.mapsShown >= {before + frames}", timeout=60_000)
    page.click("#path-play")  # stop
    _shot(page, "trajectory")
    page.fill("#path-name", "path_a")
    page.click("#path-save")
    page.wait_for_function("window.cryoscape.savedPath !== undefined", timeout=60_000)
    saved = session.run / "dashboard" / "path_a"
    assert np.loadtxt(saved / "path_indices.txt", dtype=np.int64).tolist() == reference.indices.tolist()
    assert len(list(saved.glob("vol_*.mrc"))) == frames and (saved / "maps.cxc").is_file()
    page.uncheck("#anchor-mode")
    assert errors == []


def test_centre_maps_and_refused_files(dashboard):
    page, session, server, errors = dashboard
    page.fill("#centres-k", "3")
    page.click("#centres-show")
    page.wait_for_function("document.querySelectorAll('#centres img').length === 6", timeout=30_000)
    assert page.evaluate("Array.from(document.querySelectorAll('#centres img')).every(i => i.naturalWidth > 0)")
    inside = page.request.get(f"{server.url}/files/config.yaml")
    assert inside.status == 200 and b"train" in inside.body()
    outside = page.request.get(f"{server.url}/files/..%2Fsim%2Fparticles.star")  # ../sim/particles.star exists
    assert outside.status == 403
    assert errors == []
