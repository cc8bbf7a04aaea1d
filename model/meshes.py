"""Small functions on closed triangle meshes: vertex normals, area-uniform surface samples and the
winding-number inside test. Meshes are (vertices (V, 3), faces (F, 3)) arrays in any one frame and unit.
"""

from __future__ import annotations

import numpy as np


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) unit area-weighted vertex normals of a triangle mesh (V, 3), (F, 3)."""
    tri = vertices[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 x area: area weighting
    idx = faces.reshape(-1)
    rep = np.repeat(fn, 3, axis=0)  # each face's normal once per corner
    vn = np.stack([np.bincount(idx, rep[:, c], minlength=len(vertices)) for c in range(3)], 1)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def surface_samples(vertices: np.ndarray, faces: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` area-uniform points on a triangle mesh and their face normals, both (count, 3) float64."""
    tri = vertices[faces].astype(np.float64)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = np.linalg.norm(cross, axis=1)
    if area.sum() <= 0:
        raise ValueError("mesh has zero surface area")
    face = rng.choice(len(faces), size=count, p=area / area.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1  # fold the unit square onto the triangle
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    t = tri[face]
    points = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])
    normals = cross[face] / np.maximum(area[face], 1e-20)[:, None]
    return points, normals


def winding_inside(parts, queries: np.ndarray) -> np.ndarray:
    """(N,) bool: inside any closed part, |fast winding number| > 0.5.

    parts: list of (vertices (V, 3), faces (F, 3)); queries (N, 3), same frame.
    """
    import igl

    q = np.ascontiguousarray(queries, dtype=np.float64)
    inside = np.zeros(len(q), dtype=bool)
    for v, f in parts:
        w = igl.fast_winding_number(np.ascontiguousarray(v, dtype=np.float64), np.ascontiguousarray(f, dtype=np.int64), q)
        inside |= np.abs(w) > 0.5
    return inside
