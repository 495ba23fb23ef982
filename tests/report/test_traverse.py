"""``traverse_run``: a graph path inside one class of the trained 3-class model, thinned to a
few maps with the anchors kept, and its maps along the path."""

from __future__ import annotations

import numpy as np
from scipy.sparse.csgraph import connected_components

from cryoscape.analysis.trajectories import build_neighbour_graph
from cryoscape.io.mrc import read_mrc
from cryoscape.report.traverse import TraverseOptions, traverse_run


def test_graph_path_within_a_class_thinned_with_anchors_kept(three_class_run, three_class_dataset, tmp_path):
    z = np.load(three_class_run / "z.4.npy")
    truth = np.load(three_class_dataset / "ground_truth.npz")["state_index"]
    _, part = connected_components(build_neighbour_graph(z).adjacency, directed=False)
    main = np.flatnonzero(part == np.bincount(part).argmax())
    # three anchors in the biggest connected part: its two most distant members and one between
    d = np.linalg.norm(z[main][:, None] - z[main][None], axis=-1)
    i, j = np.unravel_index(d.argmax(), d.shape)
    middle = main[np.argmin(np.abs(d[i] - d[i, j] / 2) + np.abs(d[j] - d[i, j] / 2))]
    anchors = [int(main[i]), int(middle), int(main[j])]
    res = traverse_run(three_class_run, TraverseOptions(along="graph", anchors=anchors, max_maps=5),
                       outdir=tmp_path / "g", progress=False)
    full = np.loadtxt(tmp_path / "g" / "path_indices.txt", dtype=np.int64)
    assert full[0] == anchors[0] and full[-1] == anchors[-1] and anchors[1] in full
    assert all(res.path.graph.has_edge(int(a), int(b)) for a, b in zip(full[:-1], full[1:]))
    assert len(set(truth[full])) == 1  # a connected part of the graph is one class
    kept = res.map_indices
    assert set(anchors) <= set(kept.tolist()) and kept.size <= 5 + 3
    position = -1
    for k in kept.tolist():  # the maps follow the path's order
        position = full.tolist().index(k, position + 1)
    assert len(res.maps.paths) == kept.size
    np.testing.assert_allclose(np.loadtxt(tmp_path / "g" / "z_values.txt", ndmin=2), z[kept], rtol=1e-5, atol=1e-6)
    volume, _ = read_mrc(res.maps.paths[0])
    assert volume.shape == (16, 16, 16) and np.isfinite(volume).all()
    assert "Dijkstra" in res.report.read_text()
