"""DashboardSession: the dashboard's answers are those of the command-line tools (select, analyze, traverse)."""

from __future__ import annotations

import numpy as np
import pytest

from cryoscape.dashboard.session import DashboardOptions, DashboardSession
from cryoscape.errors import InputError


def _box_around(xy: np.ndarray, pad: float) -> np.ndarray:
    lo, hi = xy.min(0) - pad, xy.max(0) + pad
    return np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])


def test_lasso_selects_the_blob_and_matches_cryoscape_select(latent_run, tmp_path):
    from cryoscape.analysis.selection import select_from_run, write_polygon

    session = DashboardSession(latent_run)
    blob = np.load(latent_run / "blob.npy")
    xy = session.embedding("pc")
    polygon = _box_around(xy[blob == 1], 1.0)
    positions = session.select(polygon, "pc")
    assert positions.tolist() == np.flatnonzero(blob == 1).tolist()
    write_polygon(tmp_path / "poly.txt", polygon)
    cli = select_from_run(latent_run, tmp_path / "cli.star", polygon=str(tmp_path / "poly.txt"), embedding="pc")
    assert cli.positions.tolist() == positions.tolist()


def test_exports_are_subsets_of_the_original_particles(latent_run):
    import starfile

    from cryoscape.io.cryosparc import read_cs
    from cryoscape.io.particles import load_indices

    session = DashboardSession(latent_run)
    positions = np.array([5, 17, 150, 299, 17])
    paths = session.export(positions, "picked", "star", polygon=np.zeros((3, 2)), embedding="pc")
    original = starfile.read(latent_run.parent / "sim" / "particles.star")
    written = starfile.read(paths["subset"])
    # the rows as the original has them, rlnImageName included (as select writes subsets for RELION)
    assert written["particles"]["rlnImageName"].tolist() == \
        original["particles"]["rlnImageName"].iloc[[5, 17, 150, 299]].tolist()
    assert written["optics"].equals(original["optics"])  # the optics table is kept
    assert load_indices(paths["indices"], n_particles=300).tolist() == [5, 17, 150, 299]
    assert paths["subset"].parent == latent_run / "dashboard" and paths["polygon"].is_file()
    cs = session.export(positions, "picked", "cs")
    assert len(read_cs(cs["subset"], check_stacks=False)) == 4
    with pytest.raises(InputError, match="export name"):
        session.export(positions, "../escape", "star")


def test_colourings_are_the_commands_clusterings(latent_run):
    from cryoscape.analysis.latent import kmeans_on_data

    session = DashboardSession(latent_run)
    km = session.colouring("kmeans:3")
    reference = kmeans_on_data(session.z, 3, seed=0)
    assert km.categorical and km.values.tolist() == reference.labels.tolist()
    assert km.centres.tolist() == reference.center_indices.tolist()
    blob = np.load(latent_run / "blob.npy")
    gmm = session.colouring("gmm:3")
    assert all(len(set(gmm.values[blob == b])) == 1 for b in range(3))  # one component per blob
    labels = session.colouring("labels:blob.npy")
    assert labels.values.tolist() == blob.tolist()
    defocus = session.colouring("value:defocus_u_angstrom")
    assert not defocus.categorical and defocus.values.shape == (300,) and np.ptp(defocus.values) > 0
    with pytest.raises(PermissionError):
        session.colouring("labels:../../etc/passwd")
    with pytest.raises(InputError, match="colouring"):
        session.colouring("rainbow")


def test_without_weights_there_are_no_maps_and_it_says_why(latent_run):
    session = DashboardSession(latent_run)
    summary = session.summary()
    assert summary["maps"] is False and str(latent_run) in summary["maps_unavailable"]  # the reason, from train
    with pytest.raises(InputError, match="no maps"):
        session.decode(session.z[0])


def test_graph_path_is_traverses(latent_run):
    from cryoscape.analysis.trajectories import graph_traversal

    from scipy.sparse.csgraph import connected_components

    from cryoscape.analysis.trajectories import build_neighbour_graph

    session = DashboardSession(latent_run)
    _, part = connected_components(build_neighbour_graph(session.z).adjacency, directed=False)
    members = np.flatnonzero(part == np.bincount(part).argmax())
    d = np.linalg.norm(session.z[members][:, None] - session.z[members][None], axis=-1)
    i, j = np.unravel_index(d.argmax(), d.shape)
    ends = [int(members[i]), int(members[j])]
    got = session.graph_path(ends, max_maps=6)
    reference = graph_traversal(session.z, ends)
    assert got["indices"].tolist() == reference.indices.tolist()
    assert got["map_indices"][0] == ends[0] and got["map_indices"][-1] == ends[1] and got["map_indices"].size <= 6


def test_other_latents_with_z(latent_run, tmp_path):
    z = np.load(latent_run / "z.2.npy")
    np.save(tmp_path / "other.npy", z[:, ::-1])
    session = DashboardSession(latent_run, DashboardOptions(z_path=tmp_path / "other.npy"))
    np.testing.assert_array_equal(session.z, z[:, ::-1])
    with pytest.raises(InputError, match="not found"):
        DashboardSession(latent_run, DashboardOptions(z_path=tmp_path / "missing.npy"))


def test_one_dimensional_latents_are_drawn_on_a_line(latent_run, tmp_path):
    import pickle

    z1 = np.load(latent_run / "z.2.npy")[:, :1]
    with open(tmp_path / "z.pkl", "wb") as f:
        pickle.dump(z1, f)  # cryoDRGN writes its latents so
    session = DashboardSession(latent_run, DashboardOptions(z_path=tmp_path / "z.pkl"))
    xy = session.embedding("pc")
    assert xy.shape == (300, 2) and np.all(xy[:, 1] == 0)
    assert session.summary()["embeddings"] == ["pc", "z"]  # no UMAP of a line
    left = session.select(np.array([[-100, -1], [-3, -1], [-3, 1], [-100, 1]]), "z")
    assert left.tolist() == np.flatnonzero(z1[:, 0] < -3).tolist()
