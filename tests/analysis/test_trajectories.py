"""Trajectories: straight lines, the neighbour graph (mean and maximum degree), and graph
traversal that follows the data and only uses edges of the graph."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse.csgraph import dijkstra

from cryoscape.analysis.trajectories import (
    build_neighbour_graph,
    graph_traversal,
    linear_trajectory,
    order_anchors,
    shortest_path,
)
from cryoscape.errors import InputError


def _arc(n=2000, noise=0.01, seed=0):
    """Particles on a half ring (radius 0.8 to 1.2, angle t from 0 to pi) in 2 of 4 latent dimensions.

    A 2-D band: a graph with 5 neighbours on average percolates through it (a 1-D curve would
    break into many pieces at that density, see the module docstring of trajectories.py).
    """
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, np.pi, n))
    r = np.sqrt(rng.uniform(0.8**2, 1.2**2, n))
    z = np.zeros((n, 4))
    z[:, 0], z[:, 1] = r * np.cos(t), r * np.sin(t)
    return z + noise * rng.normal(size=z.shape), t


def _anchor_near(z, t, angle, graph):
    """The particle of the largest connected part of the graph nearest to (angle, radius 1)."""
    from scipy.sparse.csgraph import connected_components

    _, part = connected_components(graph.adjacency, directed=False)
    main = part == np.bincount(part).argmax()
    target = np.array([np.cos(angle), np.sin(angle), 0.0, 0.0])
    d = np.linalg.norm(z - target, axis=1)
    d[~main] = np.inf
    return int(np.argmin(d))


def test_linear_trajectory_runs_straight_through_the_anchors():
    anchors = np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 2.0]])
    path = linear_trajectory(anchors, n_points=5)
    assert path.shape == (9, 2)
    np.testing.assert_allclose(path[[0, 4, 8]], anchors)
    np.testing.assert_allclose(path[2], [0.5, 1.0])
    np.testing.assert_allclose(np.diff(path[4:], axis=0), [[0.5, 0.0]] * 4)
    with pytest.raises(InputError):
        linear_trajectory(anchors[:1])


def test_neighbour_graph_has_the_requested_degrees():
    z, _ = _arc()
    g = build_neighbour_graph(z, avg_neighbors=5, max_neighbors=10)
    a = g.adjacency
    degree = np.diff(a.indptr)
    assert degree.max() <= 10 and g.max_degree == degree.max()
    assert g.avg_neighbors == pytest.approx(5.0, abs=0.01)
    assert (a != a.T).nnz == 0  # undirected
    # a distance threshold: every edge is as long as the pair's distance and no longer than it
    rows, cols = a.nonzero()
    lengths = np.asarray(a[rows, cols]).ravel()
    np.testing.assert_allclose(lengths, np.linalg.norm(z[rows] - z[cols], axis=1), rtol=1e-9)
    assert lengths.max() == pytest.approx(g.threshold)
    # pruning is what keeps the cap: with a looser cap the same mean is reached with bigger degrees
    g3 = build_neighbour_graph(z, avg_neighbors=2.5, max_neighbors=3)
    assert g3.max_degree <= 3 and g3.avg_neighbors == pytest.approx(2.5, abs=0.01)


def test_graph_traversal_follows_the_data_through_graph_edges_to_the_anchors():
    z, t = _arc()
    graph = build_neighbour_graph(z)
    anchors = [_anchor_near(z, t, a, graph) for a in (0.05, np.pi / 2, np.pi - 0.05)]
    res = graph_traversal(z, anchors, graph=graph)
    path = res.indices
    assert path[0] == anchors[0] and path[-1] == anchors[-1]
    np.testing.assert_array_equal(path[res.anchor_positions], anchors)
    # every step is an edge of the graph
    assert all(res.graph.has_edge(int(i), int(j)) for i, j in zip(path[:-1], path[1:]))
    # Dijkstra: the path is as short as the graph allows between consecutive anchors
    for (a, b), (p, q) in zip(zip(anchors[:-1], anchors[1:]), zip(res.anchor_positions[:-1], res.anchor_positions[1:])):
        best = dijkstra(res.graph.adjacency, directed=False, indices=a)[b]
        assert res.lengths[q] - res.lengths[p] == pytest.approx(best)
    # it stays on the data (radius ~1) and sweeps the arc in order, unlike the straight chord
    radius = np.linalg.norm(z[path, :2], axis=1)
    assert radius.min() > 0.75 and radius.max() < 1.25
    assert np.all(np.diff(t[path]) > -0.1) and t[path[-1]] - t[path[0]] > 2.9
    chord = linear_trajectory(z[[anchors[0], anchors[-1]]], n_points=20)
    assert np.linalg.norm(chord[10, :2]) < 0.2  # through the empty middle


def test_disconnected_anchors_and_bad_indices_are_clear_errors():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(size=(200, 2)), 100 + rng.normal(size=(200, 2))])
    g = build_neighbour_graph(z)
    with pytest.raises(InputError, match="not connected"):
        shortest_path(g, 0, 399)
    with pytest.raises(InputError, match="0 to 399"):
        graph_traversal(z, [0, 400], graph=g)
    assert shortest_path(g, 5, 5).tolist() == [5]


def test_order_anchors_chains_nearest_first():
    pts = np.array([[3.0, 0.0], [0.0, 0.0], [1.0, 0.1], [2.0, 0.0]])
    order = order_anchors(pts)
    assert order.tolist() in ([1, 2, 3, 0], [0, 3, 2, 1])
