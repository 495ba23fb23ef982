"""The lasso of ``cryoscape select --interactive``, driven without a window."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from cryoscape.report.selection import LassoSession, display_available


def test_lasso_keeps_the_loop_and_marks_points_inside():
    points = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0], [0.5, -0.5]])
    session = LassoSession(Figure(), points, axis_label="UMAP")
    assert session.vertices is None
    loop = [(-1.0, -1.0), (2.0, -1.0), (2.0, 2.0), (-1.0, 2.0)]
    session.on_select(loop)
    np.testing.assert_allclose(session.vertices, loop)
    colours = session.scatter.get_facecolors()
    red = colours[:, 0] > 0.8
    assert red.tolist() == [True, True, False, True]
    assert "3 of 4" in session.axes.get_title()
    assert session.axes.get_xlabel() == "UMAP1"


def test_no_display_is_reported(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    ok, reason = display_available()
    assert not ok and "DISPLAY" in reason
