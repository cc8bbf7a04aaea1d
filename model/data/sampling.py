"""Training points and their inside/outside labels, PIFu's scheme, labelled by winding number.

Points for one view live in that view's frame (the network's world frame, box units; see
model/data/render.py). Per view, `num_points` points in three groups:
- near the surface (`near_share`): surface points moved by isotropic N(0, sigma) noise, half with
  PIFu's sigma = 5 cm, half with `sigma_fine` = 1.5 cm, which pins the surface itself down;
- along the camera ray (`ray_share`): a surface point's x, y with z uniform within `ray_depth`
  (40 cm) of it. These are the points that teach depth: a pixel inside the silhouette is solid only
  between its front and back surfaces, and isotropic noise puts few points 10+ cm in front or
  behind (the shipped model trained without them mislabelled a quarter of those, a deep blob);
- the rest uniform in the box [-1, 1]^3.
PIFu's own scheme (16:1 near : uniform, one sigma) is `SamplingConfig.pifu()`.

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
    near_share: float = 0.7  # share of points near the surface
    ray_share: float = 0.2  # share on camera rays through the surface; the rest is uniform
    sigma: float = 0.05  # 5 cm in box units
    sigma_fine: float = 0.015  # half of the near points: 1.5 cm
    ray_depth: float = 0.4  # ray points lie within 40 cm of their surface point in z
    num_surface_points: int = 4096  # surface points + normals per view, for evaluation

    def __post_init__(self) -> None:
        if not (0 <= self.near_share and 0 <= self.ray_share and self.near_share + self.ray_share <= 1):
            raise ValueError(f"near_share {self.near_share} + ray_share {self.ray_share} must lie in [0, 1]")
        if min(self.sigma, self.sigma_fine, self.ray_depth) <= 0 or self.num_points <= 0:
            raise ValueError("sigma, sigma_fine, ray_depth and num_points must be positive")

    @classmethod
    def pifu(cls) -> "SamplingConfig":
        """PIFu's scheme: 16:1 near (sigma 5 cm) : uniform, no ray points."""
        return cls(near_share=16 / 17, ray_share=0.0, sigma_fine=0.05)


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
    """(num_points, 3) float64 training points (near, ray, uniform) for parts already in the view frame."""
    n_near = int(round(config.num_points * config.near_share))
    n_ray = int(round(config.num_points * config.ray_share))
    anchors, _ = surface_samples_parts(parts, n_near + n_ray, rng)
    near, ray = anchors[:n_near], anchors[n_near:].copy()
    sigmas = np.where(np.arange(n_near) % 2 == 0, config.sigma, config.sigma_fine)[:, None]
    near = near + rng.normal(0.0, 1.0, near.shape) * sigmas
    ray[:, 2] = np.clip(ray[:, 2] + rng.uniform(-config.ray_depth, config.ray_depth, n_ray), -1.0, 1.0)
    uniform = rng.uniform(-1.0, 1.0, (config.num_points - n_near - n_ray, 3))
    points = np.concatenate([near, ray, uniform])
    return points[rng.permutation(len(points))]


BODY_DISTANCE_SAMPLES = 60_000  # body surface samples: about 0.5 cm apart on an adult
BODY_DISTANCE_CLIP_CM = 20.0  # farther from the body than this, only the side matters


class BodyField:
    """Signed distance to a body mesh, clipped to +-`clip`, and the outward unit normal of the body
    surface nearest to each query (zero beyond `clip`): what a body-guided model reads per point.

    body: (vertices (V, 3), faces (F, 3)); queries and `clip` in the same frame and unit.
    The magnitude is the distance to the nearest of BODY_DISTANCE_SAMPLES area-uniform surface
    samples (on a body within 0.04 cm of the exact distance on average, 0.17 cm at the 99th
    percentile, and several times faster than exact point-triangle distances); the sign is the
    winding number's, so the body's separate closed parts are handled. Built once per body, then
    called per batch of queries (training labels, or every occupancy batch at inference).
    """

    def __init__(self, body, clip: float, rng: np.random.Generator | None = None):
        from scipy.ndimage import binary_dilation
        from scipy.spatial import cKDTree

        self.vertices = np.ascontiguousarray(body[0], dtype=np.float64)
        self.faces = np.ascontiguousarray(body[1], dtype=np.int64)
        self.clip = float(clip)
        samples, self.normals = surface_samples(self.vertices, self.faces, BODY_DISTANCE_SAMPLES, rng or np.random.default_rng(0))
        self.tree = cKDTree(samples)
        # A k-d tree over a surface is slow for queries far from it (a sparse grid's first level is
        # all such points): cells of side `clip` next to no sample are farther than `clip` from all.
        self.origin = samples.min(0) - self.clip
        cells = np.floor((samples - self.origin) / self.clip).astype(np.int64)
        self.near_cells = np.zeros(cells.max(0) + 2, dtype=bool)
        self.near_cells[tuple(cells.T)] = True
        self.near_cells = binary_dilation(self.near_cells, np.ones((3, 3, 3), bool))
        self.box = self.vertices.min(0), self.vertices.max(0)

    def __call__(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """queries (N, 3) -> signed distance (N,) float64, negative inside, and normals (N, 3)."""
        queries = np.asarray(queries, dtype=np.float64)
        distance, normals = np.full(len(queries), self.clip), np.zeros((len(queries), 3))
        cells = np.floor((queries - self.origin) / self.clip).astype(np.int64)
        in_grid = np.all((cells >= 0) & (cells < self.near_cells.shape), axis=1)
        candidate = np.flatnonzero(in_grid)
        candidate = candidate[self.near_cells[tuple(cells[candidate].T)]]
        found, nearest = self.tree.query(queries[candidate], distance_upper_bound=self.clip)
        near = np.isfinite(found)
        distance[candidate[near]] = found[near]
        normals[candidate[near]] = self.normals[nearest[near]]
        # Only points in the body's box can be inside it; the winding number tells which.
        boxed = np.flatnonzero(np.all((queries >= self.box[0]) & (queries <= self.box[1]), axis=1))
        inside = np.zeros(len(queries), dtype=bool)
        inside[boxed] = winding_inside([(self.vertices, self.faces)], queries[boxed])
        return np.where(inside, -distance, distance), normals

    def network_input(self, points):
        """(N, 3) torch points -> (1, 4, N) float32 torch on their device: distance, then normal
        (the body input of `model.network.pifuhd.PIFuHD.query_levels`)."""
        import torch

        distance, normals = self(points.detach().cpu().double().numpy())
        rows = np.concatenate((distance[:, None], normals), axis=1).T[None].astype(np.float32)
        return torch.from_numpy(rows).to(points.device)


@dataclass
class ViewPoints:
    """Points of one view in its frame: points (N, 3) float32, labels (N,) uint8 (1 inside),
    surface (M, 3) float32 with unit normals (M, 3) float32; when the subject has a known body
    under its clothes, body_sdf (N,) float32 (view units, negative inside the body) and
    body_normals (N, 3) float32 (the closest body face's outward normal, view frame)."""

    points: np.ndarray
    labels: np.ndarray
    surface: np.ndarray
    surface_normals: np.ndarray
    body_sdf: np.ndarray | None = None
    body_normals: np.ndarray | None = None


def label_views(
    canonical_parts, transforms: list[np.ndarray], config: SamplingConfig, rng: np.random.Generator, body=None
) -> list[ViewPoints]:
    """Labelled points for each view.

    canonical_parts: list of (vertices, faces) in the canonical frame (cm);
    transforms: per view, the (4, 4) view_from_canonical similarity (rotation x scale);
    body: optional (vertices, faces) of the body under the clothes, canonical frame.
    Labels are computed once for all views in the canonical frame (a similarity keeps the
    winding number), one winding-number call per part instead of one per view and part;
    body distances likewise, scaled into view units.
    """
    per_view, canonical_queries = [], []
    for m in transforms:
        lin, t = m[:3, :3], m[:3, 3]
        view_parts = [(v.astype(np.float64) @ lin.T + t, f) for v, f in canonical_parts]
        q = sample_query_points(view_parts, config, rng)
        surf, nrm = surface_samples_parts(view_parts, config.num_surface_points, rng)
        per_view.append((q, surf, nrm))
        canonical_queries.append(np.linalg.solve(lin, (q - t).T).T)
    all_queries = np.concatenate(canonical_queries)
    inside = winding_inside(canonical_parts, all_queries)
    distance, normals = BodyField(body, BODY_DISTANCE_CLIP_CM, rng)(all_queries) if body is not None else (None, None)
    out, start = [], 0
    for (q, surf, nrm), m in zip(per_view, transforms):
        part = slice(start, start + len(q))
        scale = np.cbrt(np.linalg.det(m[:3, :3]))
        out.append(
            ViewPoints(
                points=q.astype(np.float32),
                labels=inside[part].astype(np.uint8),
                surface=surf.astype(np.float32),
                surface_normals=nrm.astype(np.float32),
                body_sdf=None if distance is None else (distance[part] * scale).astype(np.float32),
                body_normals=None if normals is None else (normals[part] @ (m[:3, :3] / scale).T).astype(np.float32),
            )
        )
        start += len(q)
    return out
