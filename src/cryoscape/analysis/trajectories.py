"""Trajectories through latent space: straight lines and graph traversal (thesis 4.3.2, 4.4.12).

Three kinds of path give the latents at which a movie of maps is generated:

* along a principal component (:func:`cryoscape.analysis.latent.pc_traversal`);
* **straight lines** between anchor latents (:func:`linear_trajectory`), which may cross empty
  regions of latent space where the decoder's maps are not supported by any particle;
* **graph traversal** (:func:`graph_traversal`), which stays on the data: a neighbour graph
  links particle latents closer than a distance threshold, and Dijkstra's algorithm finds the
  shortest path through it from anchor to anchor; the maps are made at the visited particles'
  latents.

The neighbour graph (thesis 4.4.12)
-----------------------------------
Two particles are neighbours when their latents are closer than a threshold chosen so that the
average number of neighbours per particle is ``avg_neighbors`` (5), and no particle keeps more
than ``max_neighbors`` (10).  Candidate edges are each particle's ``max_neighbors`` nearest
latents (exact search, scikit-learn); they are added shortest first, skipping an edge when one of
its ends already has ``max_neighbors``, until the graph holds ``avg_neighbors * N / 2`` edges.
Adding edges in order of length up to a count is a distance threshold (the last edge's length,
reported as ``threshold``), and the degree cap is the pruning, applied while building so that it
keeps the shortest edges of crowded particles.  Only each particle's ``max_neighbors`` nearest
latents can be edges, so no pairwise distance matrix is ever built.  Edges are undirected and
weighted by their Euclidean length.

Such a graph joins only particles in well-populated, connected regions: separate clusters
(discrete states) are separate parts of the graph, and so are stretches of a thin, curve-like
distribution where a gap between particles is longer than the threshold (5 neighbours on
average percolate through 2-D and higher-dimensional clouds but break a 1-D chain often).
Anchors in different parts have no path; the error says so, and a larger ``avg_neighbors``
(a larger threshold) joins more.  k-means on-data centres make good anchors because they sit
in dense regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from cryoscape.errors import InputError

__all__ = [
    "linear_trajectory",
    "NeighbourGraph",
    "build_neighbour_graph",
    "shortest_path",
    "GraphPath",
    "graph_traversal",
    "order_anchors",
]


def linear_trajectory(anchors: np.ndarray, *, n_points: int = 10) -> np.ndarray:
    """Latents on straight segments through ``anchors (A >= 2, zdim)``, ``n_points`` per segment.

    Each segment runs from one anchor to the next, both ends included; the joint anchor of two
    segments is kept once, so the path has ``(A - 1) * (n_points - 1) + 1`` latents.
    """
    anchors = np.atleast_2d(np.asarray(anchors, dtype=np.float64))
    if anchors.shape[0] < 2:
        raise InputError(f"a straight-line trajectory needs at least 2 anchors, got {anchors.shape[0]}.")
    if n_points < 2:
        raise InputError(f"{n_points} points per segment cannot reach both ends; pass 2 or more.")
    t = np.linspace(0.0, 1.0, n_points)[:, None]
    parts = [anchors[0][None]]
    for a, b in zip(anchors[:-1], anchors[1:]):
        parts.append((a + t * (b - a))[1:])
    return np.concatenate(parts).astype(np.float32)


@dataclass
class NeighbourGraph:
    """An undirected neighbour graph over particle latents.

    Attributes
    ----------
    adjacency
        ``(N, N)`` symmetric ``scipy.sparse.csr_matrix`` of edge lengths (0 where no edge).
    threshold
        The longest edge kept: the distance threshold.
    avg_neighbors
        Mean number of neighbours per particle.
    max_degree
        Largest number of neighbours of any particle.
    """

    adjacency: sp.csr_matrix
    threshold: float
    avg_neighbors: float
    max_degree: int

    @property
    def n_nodes(self) -> int:
        """Number of particles."""
        return int(self.adjacency.shape[0])

    def has_edge(self, i: int, j: int) -> bool:
        """Whether particles ``i`` and ``j`` are neighbours."""
        row = self.adjacency.indices[self.adjacency.indptr[i] : self.adjacency.indptr[i + 1]]
        return bool(np.any(row == j))


def build_neighbour_graph(z: np.ndarray, *, avg_neighbors: float = 5.0, max_neighbors: int = 10) -> NeighbourGraph:
    """Neighbour graph of latents ``z (N, zdim)`` (module docstring; thesis 4.4.12).

    Parameters
    ----------
    avg_neighbors
        Target mean number of neighbours (sets the distance threshold).
    max_neighbors
        No particle has more neighbours than this.
    """
    from sklearn.neighbors import NearestNeighbors

    z = np.asarray(z, dtype=np.float64)
    n = z.shape[0]
    if n < 2:
        raise InputError(f"a neighbour graph needs at least 2 particles, got {n}.")
    if max_neighbors < 1 or not 0 < avg_neighbors <= max_neighbors:
        raise InputError(f"--avg-neighbors {avg_neighbors:g} and --max-neighbors {max_neighbors} need "
                         "0 < average <= maximum (e.g. 5 and 10).")
    k = int(min(max_neighbors, n - 1))
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    rows = np.repeat(np.arange(n), k + 1)
    cols = idx.ravel()
    d = dist.ravel()
    keep = rows != cols  # drop each particle itself (not always column 0 when latents repeat)
    rows, cols, d = rows[keep], cols[keep], d[keep]
    a, b = np.minimum(rows, cols), np.maximum(rows, cols)
    # unique undirected candidate edges, shortest first (ties broken by the node indices)
    key = a.astype(np.int64) * n + b
    key, first = np.unique(key, return_index=True)
    a, b, d = a[first], b[first], d[first]
    order = np.lexsort((b, a, d))
    a, b, d = a[order], b[order], d[order]
    target = int(round(avg_neighbors * n / 2))
    degree = np.zeros(n, dtype=np.int64)
    chosen = np.zeros(a.shape[0], dtype=bool)
    count = 0
    a_list, b_list = a.tolist(), b.tolist()
    deg = degree.tolist()
    for e in range(len(a_list)):
        if count >= target:
            break
        i, j = a_list[e], b_list[e]
        if deg[i] < max_neighbors and deg[j] < max_neighbors:
            deg[i] += 1
            deg[j] += 1
            chosen[e] = True
            count += 1
    a, b, d = a[chosen], b[chosen], d[chosen]
    # a zero length would vanish from a sparse matrix: keep duplicates connected by a tiny length
    w = np.maximum(d, np.finfo(np.float64).tiny)
    adjacency = sp.coo_matrix((np.concatenate([w, w]), (np.concatenate([a, b]), np.concatenate([b, a]))),
                              shape=(n, n)).tocsr()
    degree = np.diff(adjacency.indptr)
    return NeighbourGraph(adjacency=adjacency, threshold=float(d.max()) if d.size else 0.0,
                          avg_neighbors=float(degree.mean()), max_degree=int(degree.max()))


def shortest_path(graph: NeighbourGraph, source: int, target: int) -> np.ndarray:
    """Nodes of the shortest path from ``source`` to ``target`` (both included), Dijkstra.

    Raises
    ------
    InputError
        When the two particles lie in different connected parts of the graph.
    """
    from scipy.sparse.csgraph import dijkstra

    n = graph.n_nodes
    for node in (source, target):
        if not 0 <= node < n:
            raise InputError(f"anchor {node} is not a particle index of this run (0 to {n - 1}); "
                             "pass indices within that range.")
    if source == target:
        return np.array([source], dtype=np.int64)
    dist, pred = dijkstra(graph.adjacency, directed=False, indices=source, return_predecessors=True)
    if not np.isfinite(dist[target]):
        from scipy.sparse.csgraph import connected_components

        n_parts, part = connected_components(graph.adjacency, directed=False)
        sizes = np.bincount(part)
        raise InputError(f"particles {source} and {target} are not connected in the neighbour graph (threshold "
                         f"{graph.threshold:.4g}, {graph.avg_neighbors:.2f} neighbours on average, {n_parts} separate "
                         f"parts; theirs hold {sizes[part[source]]} and {sizes[part[target]]} particles); pass anchors "
                         "in the same region of latent space (e.g. --kmeans-anchors) or raise --avg-neighbors.")
    path = [target]
    while path[-1] != source:
        path.append(int(pred[path[-1]]))
    return np.array(path[::-1], dtype=np.int64)


@dataclass
class GraphPath:
    """A path through the neighbour graph visiting anchors in order.

    Attributes
    ----------
    indices
        ``(L,)`` particle indices visited, from the first anchor to the last.
    anchors
        ``(A,)`` the anchors, in order.
    anchor_positions
        ``(A,)`` position of each anchor in ``indices``.
    lengths
        ``(L,)`` cumulative latent-space length along the path (0 at the start).
    graph
        The neighbour graph the path runs through.
    """

    indices: np.ndarray
    anchors: np.ndarray
    anchor_positions: np.ndarray
    lengths: np.ndarray
    graph: NeighbourGraph


def graph_traversal(z: np.ndarray, anchors: np.ndarray | list[int], *, avg_neighbors: float = 5.0,
                    max_neighbors: int = 10, graph: NeighbourGraph | None = None) -> GraphPath:
    """Shortest data-supported path through particle ``anchors`` (indices into ``z``), thesis 4.4.12.

    The neighbour graph is built from ``z`` unless given; consecutive anchors are joined by
    Dijkstra's shortest path and the pieces concatenated (each joint anchor kept once).
    """
    z = np.asarray(z, dtype=np.float64)
    anchors = np.asarray(anchors, dtype=np.int64).ravel()
    if anchors.size < 2:
        raise InputError(f"graph traversal needs at least 2 anchors, got {anchors.size}; pass two or more "
                         "particle indices or k-means anchors.")
    if graph is None:
        graph = build_neighbour_graph(z, avg_neighbors=avg_neighbors, max_neighbors=max_neighbors)
    nodes = [np.array([anchors[0]])]
    positions = [0]
    total = 1
    for a, b in zip(anchors[:-1], anchors[1:]):
        piece = shortest_path(graph, int(a), int(b))
        nodes.append(piece[1:])
        total += piece.size - 1
        positions.append(total - 1)
    indices = np.concatenate(nodes).astype(np.int64)
    steps = np.linalg.norm(np.diff(z[indices], axis=0), axis=1)
    lengths = np.concatenate([[0.0], np.cumsum(steps)])
    return GraphPath(indices=indices, anchors=anchors, anchor_positions=np.asarray(positions, dtype=np.int64),
                     lengths=lengths, graph=graph)


def order_anchors(points: np.ndarray) -> np.ndarray:
    """Order ``points (A, zdim)`` into a short chain: the permutation of the visiting order.

    Starts at the point with the lowest coordinate on the points' first principal axis and
    repeatedly moves to the nearest unvisited point (used to string k-means anchors together).
    """
    p = np.atleast_2d(np.asarray(points, dtype=np.float64))
    m = p.shape[0]
    if m <= 2:
        return np.arange(m)
    centred = p - p.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    start = int(np.argmin(centred @ vt[0]))
    order = [start]
    left = set(range(m)) - {start}
    while left:
        last = p[order[-1]]
        nxt = min(left, key=lambda j: (float(np.sum((p[j] - last) ** 2)), j))
        order.append(nxt)
        left.remove(nxt)
    return np.asarray(order, dtype=np.int64)
