"""Meshes out of marching cubes made whole: copies of a vertex merged, only the largest component kept."""

from __future__ import annotations

import numpy as np


# Vertex positions (in voxels) are merged when equal at this quantum: the copies of a vertex
# on a face shared by two blocks differ by float rounding only (~1e-13).
MERGE_QUANTUM = 2.0**-16


def empty_mesh_arrays():
    """(vertices (0, 3) float64, faces (0, 3) int64): no surface."""
    return np.zeros((0, 3), np.float64), np.zeros((0, 3), np.int64)


def merge_vertices(vertices, faces, quantum=MERGE_QUANTUM):
    """Merge vertices equal up to `quantum`, drop faces that became degenerate and unused vertices.

    vertices: (V, 3) float, any units (index units here: quantum is in voxels); faces: (F, 3) int.
    Returns (vertices (V', 3) float64, faces (F', 3) int64). Keeps each group's first vertex.
    """
    if len(faces) == 0:
        return empty_mesh_arrays()
    vertices = np.asarray(vertices, np.float64)
    keys = np.round(vertices / quantum).astype(np.int64)
    # One lexsort of the three key columns: ~2x faster than np.unique(axis=0) at 512 (0.35 M vertices).
    order = np.lexsort(keys.T[::-1])
    sorted_keys = keys[order]
    starts = np.ones(len(order), bool)
    starts[1:] = (sorted_keys[1:] != sorted_keys[:-1]).any(axis=1)
    group = np.empty(len(order), np.int64)
    group[order] = np.cumsum(starts) - 1
    faces = group[faces]
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    return _compact(vertices[order[starts]], faces)


def _compact(vertices, faces):
    """Drop vertices no face uses; renumber faces."""
    used = np.zeros(len(vertices), dtype=bool)
    used[faces.reshape(-1)] = True
    remap = np.cumsum(used) - 1
    return vertices[used], remap[faces]


def keep_largest_component(vertices, faces):
    """The connected component (through shared vertices) with the most faces."""
    if len(faces) == 0:
        return vertices, faces
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(len(vertices),) * 2)
    _, label = connected_components(graph, directed=False)
    face_label = label[faces[:, 0]]
    keep = face_label == np.bincount(face_label).argmax()
    return _compact(vertices, faces[keep])
