"""A 2D -> depth lifter: the depth of each body landmark from the 2D landmarks alone.

The person finder's world landmarks get the depth of limbs wrong on many clothed views (an
elbow in front of the body instead of behind it), and the fit follows them. The lifter is a small
residual MLP trained on synthetic poses and on the person finder's own landmarks
(`model.training.lifter`, `pifuhd train-lifter`); the fit reads its output as world landmarks
(`lift_world_landmarks`, `model.body.fit.FitConfig.world_source`).

Inputs: the LIFTED landmarks (19 of MediaPipe's 33: trunk, limbs, nose, ears, heels, toes), x, y
centred on the hips and divided by their spread, with a visible flag (hidden ones are 0).
Output: each one's depth toward the camera, relative to the hips' centre, in the same units.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

import model.body.landmarks as lm

LIFTED = tuple(lm.INDEX[n] for n in (
    "nose", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle", "left_heel", "right_heel", "left_foot_index", "right_foot_index",
))
HIPS_IN_LIFTED = tuple(LIFTED.index(i) for i in lm.HIPS)
# Each LIFTED landmark's place in the mirror image (left and right swapped; the nose stays).
MIRRORED = tuple(LIFTED.index(lm.INDEX[lm.NAMES[i].replace("left_", "<").replace("right_", "left_").replace("<", "right_")])
                 for i in LIFTED)
LIFTER_FILE = Path(__file__).resolve().parents[1] / "weights" / "depth-lifter.safetensors"


class DepthLifter(torch.nn.Module):
    """(B, 3 * len(LIFTED)) features -> (B, len(LIFTED)) depths (see the module docstring)."""

    def __init__(self, hidden: int = 256, blocks: int = 2):
        super().__init__()
        self.hidden, self.blocks = hidden, blocks
        self.inp = torch.nn.Linear(3 * len(LIFTED), hidden)
        self.res = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                torch.nn.Linear(hidden, hidden))
            for _ in range(blocks))
        self.out = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, len(LIFTED)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.inp(features)
        for block in self.res:
            x = x + block(x)
        return self.out(x)


def lifter_features(xy: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, K, 2) image points (y down) and (B, K) bool, K = len(LIFTED) -> (features (B, 3K) float32,
    centre (B, 2), spread (B,)). Centre: the visible hips' mean; spread: the visible points' RMS
    distance from it."""
    visible = visible.astype(bool)
    hips = visible[:, HIPS_IN_LIFTED]
    hip_xy = xy[:, HIPS_IN_LIFTED]
    centre = (hip_xy * hips[..., None]).sum(1) / np.maximum(hips.sum(1), 1)[:, None]
    offsets = (xy - centre[:, None]) * visible[..., None]
    spread = np.sqrt((offsets ** 2).sum((1, 2)) / np.maximum(visible.sum(1), 1))
    spread = np.maximum(spread, 1e-6)
    features = np.concatenate([offsets / spread[:, None, None], visible[..., None]], axis=2)
    return features.reshape(len(xy), -1).astype(np.float32), centre, spread


def mirrored(features: np.ndarray) -> np.ndarray:
    """(B, 3K) lifter features -> those of the mirror image (x negated, left and right swapped),
    whose depths are the same, in MIRRORED order."""
    out = features.reshape(len(features), len(LIFTED), 3)[:, list(MIRRORED)].copy()
    out[..., 0] *= -1
    return out.reshape(len(features), -1)


@functools.lru_cache(maxsize=1)
def load_lifter(path: str = str(LIFTER_FILE)) -> DepthLifter:
    """A lifter file (default: the shipped one) in eval mode, read once per process."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as handle:
        shape = json.loads(handle.metadata()["architecture"])
    net = DepthLifter(**shape)
    net.load_state_dict(load_file(path))
    return net.eval()


def lift_world_landmarks(landmarks: np.ndarray, min_visibility: float = 0.5) -> np.ndarray:
    """(33, 3) image landmarks (pixels + visibility) -> (33, 3) world landmarks in MediaPipe's axes
    (x right, y down, z away from the camera), hips-centred, in image pixels (the fit reads bone
    directions only). Rows not lifted, or not visible, are 0. Needs a visible hip."""
    points = np.asarray(landmarks, np.float64)[list(LIFTED)]
    visible = points[:, 2] >= min_visibility
    features, centre, spread = lifter_features(points[None, :, :2], visible[None])
    # The mean of the depths of the landmarks and of their mirror image: 7 % less error on the finder's landmarks.
    with torch.no_grad():
        direct, mirror = load_lifter()(torch.from_numpy(np.concatenate([features, mirrored(features)]))).double().numpy()
    depth = (direct + mirror[list(MIRRORED)]) / 2 * spread[0]
    world = np.zeros((lm.COUNT, 3))
    rows = np.array(LIFTED)[visible]
    world[rows, :2] = points[visible, :2] - centre[0]
    world[rows, 2] = -depth[visible]  # toward the camera -> MediaPipe's z, away from it
    return world.astype(np.float32)
