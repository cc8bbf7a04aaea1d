"""Training points and their inside/outside labels, PIFu's scheme, labelled by winding number.

Points for one view live in that view's frame (the network's world frame, box units; see
model/render.py). Per view, `num_points` points in three groups:
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

from model.body.field import BODY_DISTANCE_CLIP_CM, BodyField
from model.meshes import surface_samples, winding_inside


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


def surface_samples_parts(parts, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(count, 3) surface points and face normals spread over (vertices, faces) parts by area."""
    areas = []
    for v, f in parts:
        t = v[f]
        areas.append(np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1).sum())
    counts = rng.multinomial(count, np.asarray(areas) / np.sum(areas))
    pts, nrm = zip(*(surface_samples(v, f, c, rng) for (v, f), c in zip(parts, counts)))
    return np.concatenate(pts), np.concatenate(nrm)


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
