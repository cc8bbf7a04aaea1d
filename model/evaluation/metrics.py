"""Reconstruction quality metrics, shared by training validation and the evaluation job.

Protocol (PIFuHD's evaluator): `num_samples` points sampled uniformly on each surface;
P2S is the mean distance from the prediction's samples to the ground-truth surface;
Chamfer is the mean of P2S and the opposite direction. Distances are exact point-to-
triangle distances (libigl AABB tree), in the meshes' units: pass `scale` to convert
(e.g. 100 for box units of 0.01 per cm -> cm). ICON/ECON measure P2S from the ground
truth to the prediction with 1k points, so their numbers are not comparable.

Also here: `rigid_icp` (optional rigid alignment of a prediction onto its truth before
measuring) and `normal_image_error` (PIFuHD's normal reprojection error: both meshes'
normals rendered from 4 yaws with model/render.py's EGL renderer).
"""

from __future__ import annotations

import igl
import numpy as np
import torch
import trimesh


def point_iou(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> float:
    """IoU of the predicted inside set (probability > threshold) with the labelled one, any shape."""
    predicted = probabilities > threshold
    inside = labels > 0.5
    union = (predicted | inside).sum().item()
    return (predicted & inside).sum().item() / union if union else 1.0


def sample_surface(mesh: trimesh.Trimesh, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(count, 3) points uniformly on the surface and the (count, 3) unit normals of their faces."""
    points, faces = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return np.asarray(points), np.asarray(mesh.face_normals)[faces]


def roughness_deg(points: np.ndarray, normals: np.ndarray, neighbours: int = 8) -> float:
    """Mean angle (degrees) between each surface sample's normal (N, 3) and the mean normal of its
    `neighbours` nearest samples (N, 3 points): near 0 on a smooth surface, large on a crumpled one.
    Orientation-free (each neighbour's normal is flipped to agree with the sample's first)."""
    from scipy.spatial import cKDTree

    index = cKDTree(points).query(points, k=neighbours + 1)[1][:, 1:]
    around = normals[index]  # (N, k, 3)
    around = around * np.sign((around * normals[:, None]).sum(-1, keepdims=True) + 1e-12)
    mean = around.sum(1)
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return float(np.degrees(np.arccos(np.clip(np.abs((mean * normals).sum(1)), 0.0, 1.0))).mean())


def _closest(points: np.ndarray, mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    """(distance (N,), closest face index (N,)) from points to the mesh surface."""
    squared, faces, _ = igl.point_mesh_squared_distance(
        np.ascontiguousarray(points, dtype=np.float64),
        np.ascontiguousarray(mesh.vertices, dtype=np.float64),
        np.ascontiguousarray(mesh.faces, dtype=np.int64),
    )
    return np.sqrt(np.maximum(squared, 0)), faces


def surface_metrics(
    predicted: trimesh.Trimesh,
    truth: trimesh.Trimesh,
    num_samples: int = 10_000,
    scale: float = 1.0,
    fscore_thresholds: tuple[float, ...] = (1.0, 2.0),
    seed: int = 0,
) -> dict[str, float]:
    """Chamfer, P2S (prediction -> truth), truth -> prediction, normal consistency, F-scores.

    Distances are multiplied by `scale`; F-score thresholds are in the scaled unit.
    normal_consistency: mean |cos| between each sample's face normal and the normal of the
    closest face on the other surface, both directions (1 = perfect). roughness_ratio: the
    prediction's `roughness_deg` over the truth's, on equal sample counts (1 = as rough as the
    truth; ridges, terraces and spikes raise it). An empty prediction gives inf distances and zero scores.
    """
    if len(predicted.faces) == 0:
        return {"chamfer": float("inf"), "p2s": float("inf"), "s2p": float("inf"), "normal_consistency": 0.0,
                "roughness_ratio": float("inf"),
                **{f"fscore_{t:g}": 0.0 for t in fscore_thresholds}}
    pred_points, pred_normals = sample_surface(predicted, num_samples, seed)
    true_points, true_normals = sample_surface(truth, num_samples, seed + 1)
    p2s, pred_faces_on_truth = _closest(pred_points, truth)
    s2p, true_faces_on_pred = _closest(true_points, predicted)
    p2s, s2p = p2s * scale, s2p * scale
    cos_pred = np.abs((pred_normals * truth.face_normals[pred_faces_on_truth]).sum(1))
    cos_true = np.abs((true_normals * predicted.face_normals[true_faces_on_pred]).sum(1))
    metrics = {
        "chamfer": float((p2s.mean() + s2p.mean()) / 2),
        "p2s": float(p2s.mean()),
        "s2p": float(s2p.mean()),
        "normal_consistency": float((cos_pred.mean() + cos_true.mean()) / 2),
        "roughness_ratio": roughness_deg(pred_points, pred_normals) / max(roughness_deg(true_points, true_normals), 1e-6),
    }
    for t in fscore_thresholds:
        precision, recall = (p2s < t).mean(), (s2p < t).mean()
        metrics[f"fscore_{t:g}"] = float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0
    return metrics


# ---- rigid alignment -----------------------------------------------------------------------


def rigid_fit(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(4, 4) rotation + translation (no scale, no reflection) minimising sum |R s + t - q|^2
    over corresponding (N, 3) point pairs (Kabsch)."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    covariance = (source - source_mean).T @ (target - target_mean)
    u, _, vt = np.linalg.svd(covariance)
    # The sign fix keeps a proper rotation when the best orthogonal map would be a mirror.
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rotation = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = target_mean - rotation @ source_mean
    return transform


def rigid_icp(
    source: trimesh.Trimesh,
    target: trimesh.Trimesh,
    iterations: int = 100,
    num_samples: int = 5_000,
    trim: float = 0.9,
    tolerance: float = 1e-6,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
    """Point-to-surface ICP: the (4, 4) rigid transform moving `source` onto `target`, and the
    final RMS distance (mesh units) of the kept pairs.

    `num_samples` points are sampled on `source`; each iteration pairs them with their exact
    closest points on `target`'s triangles (not on target samples: no sampling noise in the
    fixed point) and keeps the `trim` closest share, so parts the other surface lacks (a hand
    the prediction missed) do not pull the fit. Starts from the identity: the meshes must
    already overlap roughly (same frame, same units). Stops when the RMS improves by less
    than `tolerance` x its value.
    """
    if len(source.faces) == 0 or len(target.faces) == 0:
        return np.eye(4), float("inf")
    points, _ = sample_surface(source, num_samples, seed)
    vertices = np.ascontiguousarray(target.vertices, dtype=np.float64)
    faces = np.ascontiguousarray(target.faces, dtype=np.int64)
    transform, previous, rms = np.eye(4), np.inf, np.inf
    for _ in range(iterations):
        moved = points @ transform[:3, :3].T + transform[:3, 3]
        squared, _, closest = igl.point_mesh_squared_distance(moved, vertices, faces)
        keep = squared <= np.quantile(squared, trim) if trim < 1 else np.ones(len(squared), bool)
        rms = float(np.sqrt(squared[keep].mean()))
        if previous - rms <= tolerance * max(rms, 1e-12):
            break
        previous = rms
        transform = rigid_fit(moved[keep], closest[keep]) @ transform
    return transform, rms


# ---- normal-image error (PIFuHD) -----------------------------------------------------------

NORMAL_IMAGE_YAWS: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)


def render_normal_images(
    mesh: trimesh.Trimesh,
    centre: np.ndarray,
    units_per_cm: float,
    size: int = 512,
    yaws: tuple[float, ...] = NORMAL_IMAGE_YAWS,
) -> np.ndarray:
    """(len(yaws), size, size, 3) float32 in [0, 1]: the nearest surface's camera-space normal n
    as (n + 1) / 2, 0 (black) where the mesh does not cover the pixel.

    The mesh is in cm; it is moved by -centre, turned by each yaw about +y and scaled by
    units_per_cm into the renderer's [-1, 1] box (orthographic, model/render.py's EGL renderer).
    """
    from model.render import Part
    from model.meshes import vertex_normals
    from model.render import View, get_renderer

    images = np.zeros((len(yaws), size, size, 3), np.float32)
    if len(mesh.faces) == 0:
        return images
    vertices = np.asarray(mesh.vertices, dtype=np.float64) - centre
    faces = np.asarray(mesh.faces, dtype=np.int64)
    part = Part(
        name="mesh",
        vertices=vertices.astype(np.float32),
        faces=faces.astype(np.int32),
        colors=np.zeros((len(vertices), 3), np.float32),
        normals=vertex_normals(vertices, faces),  # once for every yaw: the renderer's own normals, turned
    )
    renderer = get_renderer(size)
    for index, yaw in enumerate(yaws):
        out = renderer.render([part], View(yaw_deg=yaw, units_per_cm=units_per_cm), np.zeros((9, 3), np.float32))
        covered = out.mask > 127
        images[index][covered] = out.normal_front[covered].astype(np.float32) / 255.0
    return images


def normal_image_error(
    predicted: trimesh.Trimesh,
    truth: trimesh.Trimesh,
    size: int = 512,
    yaws: tuple[float, ...] = NORMAL_IMAGE_YAWS,
) -> tuple[float, list[float], np.ndarray, np.ndarray]:
    """PIFuHD's normal reprojection error of two meshes in cm.

    Both are rendered (see `render_normal_images`) from each yaw, framed on the truth: its
    bounding-box centre at the image centre and min(0.01, 1.8 / its largest extent) units per
    cm, i.e. a 180 cm person spans 90 % of the image, as in the training renders. Per view
    the error is the mean over pixels of the squared colour difference summed over the three
    channels (mean x 3); the total is the sum over views.

    Returns (total, per-view errors, predicted images, truth images), images as
    (len(yaws), size, size, 3) float32.
    """
    centre = truth.bounds.mean(0) if len(truth.vertices) else np.zeros(3)
    extent = float(np.ptp(truth.vertices, axis=0).max()) if len(truth.vertices) else 0.0
    units_per_cm = min(0.01, 1.8 / extent) if extent > 0 else 0.01
    pred_images = render_normal_images(predicted, centre, units_per_cm, size, yaws)
    true_images = render_normal_images(truth, centre, units_per_cm, size, yaws)
    per_view = [float(((p - t) ** 2).mean() * 3) for p, t in zip(pred_images, true_images)]
    return float(sum(per_view)), per_view, pred_images, true_images
