"""The analysis reports render in headless Chromium: every image loads, no console errors.

Needs the python ``playwright`` package and Debian's Chromium at /usr/bin/chromium, which
``make test`` installs (scripts/testdeps/browser.sh); where either is missing the test is skipped
and says why (the ``chromium`` fixture of conftest.py).
"""

from __future__ import annotations

from pathlib import Path


def _render(page, report: Path) -> dict:
    """Open ``report`` and return what loaded and what went wrong."""
    errors: list[str] = []
    failed: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("requestfailed", lambda req: failed.append(req.url))
    page.goto(report.resolve().as_uri(), wait_until="load")
    images = page.evaluate(
        "() => Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0,"
        " w: i.naturalWidth}))")
    return {"errors": errors, "failed": failed, "images": images, "title": page.title()}


def test_reports_render_in_headless_chromium(chromium, chromium_args, three_class_analysis, three_class_run, tmp_path):
    from playwright.sync_api import sync_playwright

    from cryoscape.report.traverse import TraverseOptions, traverse_run

    # (the three classes are separate islands of latent space, so no graph path joins them: a line does)
    traversal = traverse_run(three_class_run, TraverseOptions(along="line", kmeans_anchors=3, n_points=3),
                             outdir=tmp_path / "line", progress=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=chromium_args, headless=True)
        try:
            # analyze: 12 plots and 3 pictures of map sets (k-means centres, PC1, PC2); traverse: 3
            for report, n_min in ((three_class_analysis.report, 15), (traversal.report, 3)):
                page = browser.new_page()
                seen = _render(page, report)
                page.close()
                assert seen["errors"] == [] and seen["failed"] == [], seen
                assert len(seen["images"]) >= n_min
                broken = [i["src"] for i in seen["images"] if not i["ok"]]
                assert broken == [], broken
                assert "cryoscape" in seen["title"]
        finally:
            browser.close()
