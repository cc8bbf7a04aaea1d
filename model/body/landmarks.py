"""Body landmarks: MediaPipe's 33-point layout, where each point sits on an anny body, and sidecar files.

Layout. Landmarks travel as (33, 3) float32 arrays in MediaPipe pose order (0 nose, 2/5 eyes,
7/8 ears, 11/12 shoulders, 13/14 elbows, 15/16 wrists, 23/24 hips, 25/26 knees, 27/28 ankles,
29/30 heels, 31/32 foot index; odd = the subject's left): x, y in continuous image pixels (top-left
origin, pixel (i, j) covers [i, i+1] x [j, j+1]) and a visibility in [0, 1]. World landmarks are
(33, 3) metres, centred between the hips, MediaPipe axes: x right in the image, y down, z away from
the camera.

On anny. `AnnyLandmarks` places 21 of the 33 on a posed anny body: the face, limb and foot points by
anny's own COCO keypoint regressor (vertex blends shipped in the anny wheel, CC0 data), the eyes at
anny's eye bones. The other 12 (eye corners, mouth, hands) are not fitted: their weight is 0.

Sidecars. `parse_body_keypoints` reads `NAME_keypoints.json` in either of two layouts:
MediaPipe-33 (`{"landmarks": [[x, y, visibility] x 33], "world_landmarks": [[x, y, z] x 33]}`, the
second key optional) or OpenPose BODY_25 (`{"people": [{"pose_keypoints_2d": [...75 values]}]}`,
pixel indices, the largest person), which is converted to the 33-point layout.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from model.errors import InputError
from model.image.decode import source_name
from model.image.sidecars import parse_json, parse_openpose_people

COUNT = 33
NAMES = (
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye", "right_eye_outer",
    "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_pinky", "right_pinky", "left_index", "right_index",
    "left_thumb", "right_thumb", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
    "left_heel", "right_heel", "left_foot_index", "right_foot_index",
)
INDEX = {name: i for i, name in enumerate(NAMES)}

# The 12 landmarks of the trunk and limbs: the fitter needs enough of them to see a body.
BODY = tuple(INDEX[n] for n in (
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
))
SHOULDERS = (INDEX["left_shoulder"], INDEX["right_shoulder"])
HIPS = (INDEX["left_hip"], INDEX["right_hip"])

# MediaPipe landmark -> anny COCO regressor label (the same names but big toe for foot index).
_COCO = {name: name for name in (
    "nose", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle", "left_heel", "right_heel",
)} | {"left_foot_index": "left_big_toe", "right_foot_index": "right_big_toe"}
_BONES = {"left_eye": "eye.L", "right_eye": "eye.R"}  # anny's topology without eyeballs keeps the eye bones

# Per-landmark weight of the 2D term: the face and feet are small and less reliable than joints.
WEIGHTS = np.zeros(COUNT, np.float32)
WEIGHTS[list(BODY)] = 1.0
WEIGHTS[[INDEX[n] for n in ("nose", "left_eye", "right_eye", "left_ear", "right_ear")]] = 0.3
WEIGHTS[[INDEX[n] for n in ("left_heel", "right_heel", "left_foot_index", "right_foot_index")]] = 0.5

# Bones compared in 3D with the world landmarks (parent, child), by direction only.
BONES = tuple((INDEX[a], INDEX[b]) for a, b in (
    ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"), ("right_shoulder", "right_elbow"),
    ("right_elbow", "right_wrist"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
    ("right_hip", "right_knee"), ("right_knee", "right_ankle"), ("right_shoulder", "left_shoulder"),
    ("right_hip", "left_hip"), ("left_hip", "left_shoulder"), ("right_hip", "right_shoulder"),
    ("left_ankle", "left_foot_index"), ("right_ankle", "right_foot_index"),
))

# OpenPose BODY_25 index -> MediaPipe index (BODY_25's neck and mid-hip have no MediaPipe twin).
BODY25_TO_MEDIAPIPE = {
    0: 0, 16: 2, 15: 5, 18: 7, 17: 8, 5: 11, 2: 12, 6: 13, 3: 14, 7: 15, 4: 16,
    12: 23, 9: 24, 13: 25, 10: 26, 14: 27, 11: 28, 21: 29, 24: 30, 19: 31, 22: 32,
}


REGRESSOR_VERTICES = 64  # per landmark: anny's regressor truncated to its heaviest vertices (>= 98.6 % of the weight)


class AnnyLandmarks:
    """The 33 landmark positions of posed anny bodies (torch).

    `vertices` (N,) are the mesh vertices the landmarks read; `__call__(points (B, N, 3), bone_heads
    (B, J, 3))` -> (B, 33, 3) in the same frame and units, from those vertices' positions (so a
    fitter need only skin these); `on_mesh(vertices (B, V, 3), bone_heads)` the same from a whole
    mesh. Rows without an anny definition are 0 (`defined` is False there).
    """

    def __init__(self, body):
        import torch
        from anny.keypoints import KeypointsRegressor

        coco_rows = [i for i, n in enumerate(NAMES) if n in _COCO]
        bone_rows = [i for i, n in enumerate(NAMES) if n in _BONES]
        regressor = KeypointsRegressor.coco(body.anny, labels=[_COCO[NAMES[i]] for i in coco_rows])
        dense = regressor.regression_weights.detach().to(torch.float32)  # (K, V)
        # Truncated so that a fit skins about 1k vertices per step instead of 13k.
        weights, ids = dense.topk(REGRESSOR_VERTICES, dim=1)
        self.vertices, local = torch.unique(ids, return_inverse=True)
        self.local = local  # (K, REGRESSOR_VERTICES) into self.vertices
        self.weights = weights / weights.sum(1, keepdim=True)
        self.coco_rows = torch.tensor(coco_rows)
        self.bone_rows = torch.tensor(bone_rows)
        self.bones = torch.tensor([body.bone_labels.index(_BONES[NAMES[i]]) for i in bone_rows])
        self.defined = np.zeros(COUNT, bool)
        self.defined[coco_rows + bone_rows] = True

    def __call__(self, points, bone_heads):
        import torch

        out = torch.zeros(points.shape[0], COUNT, 3, dtype=points.dtype)
        regressed = torch.einsum("ks,bksd->bkd", self.weights, points[:, self.local])
        out = out.index_copy(1, self.coco_rows, regressed)
        return out.index_copy(1, self.bone_rows, bone_heads[:, self.bones])

    def on_mesh(self, vertices, bone_heads):
        return self(vertices[:, self.vertices], bone_heads)


@functools.lru_cache(maxsize=1)
def anny_landmarks() -> AnnyLandmarks:
    """The landmark regressor of the project's anny model, built once per process."""
    from model.body.anny import load_body_model

    return AnnyLandmarks(load_body_model())


@dataclass(frozen=True)
class BodyKeypoints:
    """What a keypoint source gives the fitter: landmarks (33, 3) and world landmarks (33, 3) or None."""

    landmarks: np.ndarray
    world_landmarks: np.ndarray | None
    layout: str  # "mediapipe-33" or "openpose-body25"


def check_landmarks(landmarks: np.ndarray, world_landmarks: np.ndarray | None, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate shapes and values; return float32 copies. InputError names the problem."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (COUNT, 3):
        raise InputError(f"{name}: landmarks must be (33, 3) x, y, visibility in MediaPipe order, got shape {points.shape}")
    if not np.isfinite(points).all():
        raise InputError(f"{name}: landmarks contain non-finite values")
    if world_landmarks is not None:
        world = np.asarray(world_landmarks, dtype=np.float64)
        if world.shape != (COUNT, 3) or not np.isfinite(world).all():
            raise InputError(f"{name}: world landmarks must be finite (33, 3) metres, got shape {world.shape}")
        world_landmarks = world.astype(np.float32)
    points[:, 2] = np.clip(points[:, 2], 0.0, 1.0)
    return points.astype(np.float32), world_landmarks


def from_body25(points: np.ndarray) -> np.ndarray:
    """OpenPose BODY_25 (25, 3) pixel indices and confidences -> (33, 3) MediaPipe layout (continuous pixels)."""
    out = np.zeros((COUNT, 3), np.float32)
    for source, target in BODY25_TO_MEDIAPIPE.items():
        x, y, confidence = points[source]
        out[target] = (x + 0.5, y + 0.5, confidence)  # pixel index -> pixel centre
    return out


def parse_body_keypoints(source: str | os.PathLike | bytes, name: str | None = None) -> BodyKeypoints:
    """A keypoints sidecar (path or bytes) in MediaPipe-33 or OpenPose BODY_25 layout -> BodyKeypoints."""
    name = source_name(source, name, default="<keypoints bytes>")
    document = parse_json(source, name)
    if isinstance(document, dict) and "landmarks" in document:
        try:
            landmarks = np.asarray(document["landmarks"], dtype=np.float64)
            world = document.get("world_landmarks")
            world = None if world is None else np.asarray(world, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise InputError(f"{name}: landmark values are not numbers ({e})") from e
        landmarks, world = check_landmarks(landmarks, world, name)
        return BodyKeypoints(landmarks, world, "mediapipe-33")
    people = [p for p in parse_openpose_people(source, name) if len(p) == 25]
    if not people:
        raise InputError(f"{name}: the body fitter needs BODY_25 (75 values per person) or a MediaPipe \"landmarks\" list")
    # The largest person: the larger side of the box of their confident keypoints.
    def size(p):
        confident = p[p[:, 2] > 0.1, :2]
        return float(np.ptp(confident, axis=0).max()) if len(confident) >= 2 else 0.0

    return BodyKeypoints(from_body25(max(people, key=size)), None, "openpose-body25")
