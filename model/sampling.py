"""Training points and their inside/outside labels, PIFu's scheme, labelled by winding number.

Points for one view live in that view's frame (the network's world frame, box units; see
model/render.py). Per view, `num_points` points:
- a share `surface_ratio / (surface_ratio + 1)` (16:1 by default) are surface points moved by
  isotropic N(0, sigma) noise, sigma = 5 cm = 0.05 box units;
- the rest uniform in the box [-1, 1]^3.

Labels: a point is inside when the generalised winding number of a closed part is > 0.5, OR-ed
over the parts (body, skirt). Winding numbers stay right where ray parity fails: posed bodies
overlap themselves a little (winding number 2), scans have seams, holes and inner shells.
`igl.fast_winding_number` matched the exact winding number on every body tried. The absolute
value is taken so that a part with inverted faces (common in scans) still labels its inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """How many points per view and how they are spread (box units, 0.01 per cm)."""

    num_points: int = 20000  # labelled points per view
    surface_ratio: float = 16.0  # near-surface : uniform, PIFu's 16:1
    sigma: float = 0.05  # 5 cm in box units
    num_surface_points: int = 4096  # surface points + normals per view, for evaluation


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


def surface_samples_parts(parts, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(count, 3) surface points and face normals spread over (vertices, faces) parts by area."""
    areas = []
    for v, f in parts:
        t = v[f]
        areas.append(np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1).sum())
    counts = rng.multinomial(count, np.asarray(areas) / np.sum(areas))
    pts, nrm = zip(*(surface_samples(v, f, c, rng) for (v, f), c in zip(parts, counts)))
    return np.concatenate(pts), np.concatenate(nrm)


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


def sample_query_points(parts, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """(num_points, 3) float64 PIFu training points for parts already in the view frame."""
    n_surface = int(round(config.num_points * config.surface_ratio / (config.surface_ratio + 1)))
    near, _ = surface_samples_parts(parts, n_surface, rng)
    near += rng.normal(0.0, config.sigma, near.shape)
    uniform = rng.uniform(-1.0, 1.0, (config.num_points - n_surface, 3))
    points = np.concatenate([near, uniform])
    return points[rng.permutation(len(points))]


@dataclass
class ViewPoints:
    """Points of one view in its frame: points (N, 3) float32, labels (N,) uint8 (1 inside),
    surface (M, 3) float32 with unit normals (M, 3) float32."""

    points: np.ndarray
    labels: np.ndarray
    surface: np.ndarray
    surface_normals: np.ndarray


def label_views(canonical_parts, transforms: list[np.ndarray], config: SamplingConfig, rng: np.random.Generator) -> list[ViewPoints]:
    """Labelled points for each view.

    canonical_parts: list of (vertices, faces) in the canonical frame (cm);
    transforms: per view, the (4, 4) view_from_canonical similarity (rotation x scale).
    Labels are computed once for all views in the canonical frame (a similarity keeps the
    winding number), one winding-number call per part instead of one per view and part.
    """
    per_view, canonical_queries = [], []
    for m in transforms:
        lin, t = m[:3, :3], m[:3, 3]
        view_parts = [(v.astype(np.float64) @ lin.T + t, f) for v, f in canonical_parts]
        q = sample_query_points(view_parts, config, rng)
        surf, nrm = surface_samples_parts(view_parts, config.num_surface_points, rng)
        per_view.append((q, surf, nrm))
        canonical_queries.append(np.linalg.solve(lin, (q - t).T).T)
    inside = winding_inside(canonical_parts, np.concatenate(canonical_queries))
    out, start = [], 0
    for q, surf, nrm in per_view:
        out.append(
            ViewPoints(
                points=q.astype(np.float32),
                labels=inside[start : start + len(q)].astype(np.uint8),
                surface=surf.astype(np.float32),
                surface_normals=nrm.astype(np.float32),
            )
        )
        start += len(q)
    return out
