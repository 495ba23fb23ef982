"""Pictures of maps: the shaded isosurface of a ball is a disc of its radius, central slices are the
planes through D//2, Otsu's level splits density from solvent, meshes lie on the surface, and the
ChimeraX file opens the set at that level; the analysis report carries them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryoscape.report.mapviews import (
    central_slices,
    isosurface_level,
    isosurface_mesh,
    render_isosurface,
    write_chimerax_script,
)


def _ball(D: int, radius: float, centre_shift=(0, 0, 0)) -> np.ndarray:
    c = np.arange(D) - D // 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    r = np.sqrt((zz - centre_shift[0]) ** 2 + (yy - centre_shift[1]) ** 2 + (xx - centre_shift[2]) ** 2)
    return (1.0 / (1.0 + np.exp(2.0 * (r - radius)))).astype(np.float32)  # smooth edge, 0.5 at the radius


@pytest.mark.parametrize("D", [31, 32])
def test_isosurface_of_a_ball_is_a_disc_of_its_radius(D):
    radius = 0.3 * D
    for elevation, azimuth in ((0, 0), (35, 60)):
        image = render_isosurface(_ball(D, radius), 0.5, elevation_deg=elevation, azimuth_deg=azimuth)
        hit = ~np.all(image == 1.0, axis=-1)
        assert hit.sum() == pytest.approx(np.pi * radius**2, rel=0.08)
        rows, cols = np.nonzero(hit)
        assert rows.mean() == pytest.approx(D // 2, abs=0.5) and cols.mean() == pytest.approx(D // 2, abs=0.5)
    # shading: the middle of the disc faces the viewer (bright), its rim does not
    image = render_isosurface(_ball(D, radius), 0.5, elevation_deg=0, azimuth_deg=0)
    assert image[D // 2, D // 2].sum() > image[D // 2, D // 2 + int(radius) - 1].sum()


def test_a_shifted_ball_is_drawn_where_it_is():
    D = 32
    image = render_isosurface(_ball(D, 5, centre_shift=(0, 6, -4)), 0.5, elevation_deg=0, azimuth_deg=0)
    rows, cols = np.nonzero(~np.all(image == 1.0, axis=-1))
    assert rows.mean() == pytest.approx(D // 2 + 6, abs=0.5) and cols.mean() == pytest.approx(D // 2 - 4, abs=0.5)


@pytest.mark.parametrize("D", [7, 8])
def test_central_slices_pass_through_the_origin_voxel(D):
    v = np.arange(D**3, dtype=np.float32).reshape(D, D, D)
    xy, xz, yz = central_slices(v)
    c = D // 2
    np.testing.assert_array_equal(xy, v[c])
    np.testing.assert_array_equal(xz, v[:, c, :])
    np.testing.assert_array_equal(yz, v[:, :, c])


def test_otsu_level_separates_density_from_solvent():
    rng = np.random.default_rng(0)
    v = rng.normal(0.0, 0.05, size=(24, 24, 24)).astype(np.float32)
    v[8:16, 8:16, 8:16] += 1.0
    level = isosurface_level(v)
    assert 0.15 < level < 0.85  # (Otsu leans towards the larger class, the solvent)
    assert np.mean(v > level) == pytest.approx(8**3 / 24**3, rel=0.02)


def test_mesh_vertices_lie_on_the_sphere():
    D, radius = 32, 9.0
    vertices, faces = isosurface_mesh(_ball(D, radius), 0.5)
    r = np.linalg.norm(vertices - D // 2, axis=1)
    assert faces.shape[1] == 3 and faces.max() < len(vertices)
    assert r.mean() == pytest.approx(radius, abs=0.15) and r.std() < 0.2
    empty_v, empty_f = isosurface_mesh(_ball(D, radius), 2.0)  # above the maximum: no surface
    assert empty_v.shape == (0, 3) and empty_f.shape == (0, 3)


def test_chimerax_script_opens_the_set_at_the_level(tmp_path):
    maps = [tmp_path / "set" / f"vol_{i:03d}.mrc" for i in range(3)]
    script = write_chimerax_script(tmp_path / "set" / "maps.cxc", maps, level=0.0123, title="three maps")
    lines = [line for line in script.read_text().splitlines() if not line.startswith("#")]
    assert lines[0] == "open vol_000.mrc vol_001.mrc vol_002.mrc format mrc vseries true"
    assert lines[1] == "volume #1 level 0.0123 style surface"


def test_analysis_report_shows_the_maps_and_writes_cxc(three_class_analysis):
    res = three_class_analysis
    html = res.report.read_text()
    for name in ("kmeans_map_views.png", "pc1_map_views.png", "pc2_map_views.png"):
        assert f"figures/{name}" in html and (res.outdir / "figures" / name).stat().st_size > 5000
    cxc = (res.outdir / "kmeans3" / "maps.cxc").read_text()
    opened = cxc.splitlines()[2].split()[1:4]
    assert opened == [p.name for p in res.kmeans_maps.paths]
    level = float(cxc.splitlines()[3].split()[3])
    from cryoscape.analysis.maps import read_map_set

    volumes = read_map_set(res.kmeans_maps.paths)
    assert level == pytest.approx(isosurface_level(volumes), rel=1e-5)
    assert volumes.min() < level < volumes.max()
    assert 'href="kmeans3/maps.cxc"' in html
