"""Time from a click on a particle to its map on screen, D = 128, in headless Chromium on this machine's CPUs.

Two runs of the built-in hinge at D = 128 (8 images, one epoch, zdim 2: the weights' values do not
change the cost of decoding): the voxel basis decoder and the neural field, each with its default
architecture.  The figure is the page's own clock (``performance.now()``) from the click handler to
the end of drawing the mesh and the slices; it includes the request, the decoding, the marching cubes
and the transfer.  The floors (issue 18): basis under 2 s, neural field under 5 s, on 2 CPU cores; the
viewer's default box (64, same field of view) is asserted, unless the machine is busy with other work
(load average above twice its cores: then the figures are printed and the test skips saying so).  With CRYOSCAPE_FULL_BOX_TIMING=1 the full
128^3 box is measured and printed too (about 10 s more: the neural field decodes 128^3 in ~4 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LIMIT_S = {"basis": 2.0, "neural_field": 5.0}
BOXES = (64, 128) if os.environ.get("CRYOSCAPE_FULL_BOX_TIMING") == "1" else (64,)


@pytest.fixture(scope="module")
def runs_d128(tmp_path_factory) -> dict[str, Path]:
    from cryoscape.cli.main import main

    root = tmp_path_factory.mktemp("d128")
    assert main(["simulate", "-o", str(root / "sim"), "-n", "8", "-D", "128", "--snr", "1", "--seed", "1"]) == 0
    runs = {}
    for decoder in ("basis", "neural_field"):
        runs[decoder] = root / decoder
        assert main(["train", str(root / "sim" / "particles.star"), "--zdim", "2", "-n", "1", "-b", "8",
                     "--decoder", decoder, "--no-progress", "-o", str(runs[decoder])]) == 0
    return runs


def _first_map_seconds(browser, run: Path, view_box: int) -> dict:
    from cryoscape.dashboard.server import start_server
    from cryoscape.dashboard.session import DashboardOptions, DashboardSession

    session = DashboardSession(run, DashboardOptions(view_box=view_box))
    server = start_server(session, port=0, background=True)
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    try:
        page.goto(server.url_with_token)
        page.wait_for_function("window.cryoscape && window.cryoscape.ready === true", timeout=60_000)
        xy = session.embedding("pc")[0]
        point = page.evaluate("([x, y]) => window.cryoscape.dataToPage(x, y)", [float(xy[0]), float(xy[1])])
        page.mouse.click(point["x"], point["y"])
        page.wait_for_function("window.cryoscape.mapsShown >= 1", timeout=60_000)
        timing = page.evaluate("window.cryoscape.timings[0]")
        timing["box"] = page.evaluate("document.getElementById('slice-xy').naturalWidth")
        timing["triangles"] = page.evaluate("document.getElementById('iso').data[0].i.length")
        return timing
    finally:
        page.close()
        server.shutdown()


def test_first_map_within_the_floors_at_d128(chromium, chromium_args, runs_d128, capsys):
    from playwright.sync_api import sync_playwright

    results = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=chromium_args, headless=True)
        try:
            for decoder, run in runs_d128.items():
                for box in BOXES:
                    results[decoder, box] = _first_map_seconds(browser, run, box)
        finally:
            browser.close()
    with capsys.disabled():
        print()
        for (decoder, box), t in results.items():
            print(f"time to first map, D=128 {decoder}, {box}^3 view: {t['ms'] / 1000:.2f} s after the click "
                  f"(reply {t['reply_ms'] / 1000:.2f} s of which decoding {t['decode_seconds']:.2f} s, drawing "
                  f"{t['draw_ms'] / 1000:.2f} s; {t['triangles']} triangles)")
    for (decoder, box), t in results.items():
        assert t["box"] == box and t["triangles"] > 0 and not t["cached"]
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 2 * cores:  # a shared machine busy with other work: the figures are printed, not judged
        pytest.skip(f"load average {load:.1f} on {cores} cores: times printed above, floors not asserted")
    for decoder, limit in LIMIT_S.items():
        assert results[decoder, 64]["ms"] / 1000 < limit, results[decoder, 64]
