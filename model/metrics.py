"""Reconstruction quality metrics, shared by training validation and the evaluation job.

Protocol (PIFuHD's evaluator): `num_samples` points sampled uniformly on each surface;
P2S is the mean distance from the prediction's samples to the ground-truth surface;
Chamfer is the mean of P2S and the opposite direction. Distances are exact point-to-
triangle distances (libigl AABB tree), in the meshes' units: pass `scale` to convert
(e.g. 100 for box units of 0.01 per cm -> cm). ICON/ECON measure P2S from the ground
truth to the prediction with 1k points, so their numbers are not comparable.
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
    closest face on the other surface, both directions (1 = perfect). An empty prediction
    gives inf distances and zero scores.
    """
    if len(predicted.faces) == 0:
        return {"chamfer": float("inf"), "p2s": float("inf"), "s2p": float("inf"), "normal_consistency": 0.0,
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
    }
    for t in fscore_thresholds:
        precision, recall = (p2s < t).mean(), (s2p < t).mean()
        metrics[f"fscore_{t:g}"] = float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0
    return metrics
