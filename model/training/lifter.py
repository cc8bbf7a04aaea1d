"""Training the body fit's depth lifter (`model.body.lifter`).

The lifter learns from the synthetic generator's poses (`model.data.humans`: its five families, and as
many poses with every joint uniform within its limits, which keep it right on poses of no family), seen
from random yaws and small pitches and rolls under orthographic projection with noisy 2D points, and from
the person finder's own landmarks on clothed renders (`finder_pairs`: its errors are not the random noise,
and a lifter that never saw them shrinks limb depths toward the body when it is unsure). `LifterRecipe` is
how the shipped file was trained (`pifuhd train-lifter`).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

import model.body.landmarks as lm
from model.body.lifter import HIPS_IN_LIFTED, LIFTED, MIRRORED, DepthLifter, lifter_features, mirrored
from model.data.humans import POSE_FAMILIES, UNIFORM_POSES
from model.training.config import LifterRecipe

FINDER_BLOCK = 3000  # finder views per block: block b renders seeds finder_seed + 10000 b + i


def generator_landmarks(count: int, seed: int, families: tuple[str, ...] = POSE_FAMILIES) -> np.ndarray:
    """(count, 33, 3) float32 landmarks (cm, canonical frame: y up, facing +z) of the synthetic
    generator's people (`model.data.known_bodies.true_body`); pose i from seed + i, of family
    families[i % len(families)], which may be `model.data.humans.UNIFORM_POSES`."""
    from model.data.known_bodies import true_body
    from model.body.anny import ANNY_TO_CANONICAL

    points = np.zeros((count, lm.COUNT, 3), np.float32)
    for i in range(count):
        points[i] = true_body(seed + i, families[i % len(families)])[1] * 100 @ ANNY_TO_CANONICAL.T
    return points


def _rotation(yaw: np.ndarray, pitch: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """(B, 3, 3) rotations: yaw about y, then pitch about x, then roll about z (radians)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("yxz", np.stack([yaw, pitch, roll], 1)).as_matrix()


def training_views(points: np.ndarray, rng: np.random.Generator, noise: float = 0.02, hide: float = 0.05,
                   pitch_deg: float = 6.0, roll_deg: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Orthographic views of (B, 33, 3) canonical landmarks -> (features (B, 3K), target depths (B, K)).

    A random yaw, a small pitch and roll; 2D noise of up to `noise` x the 2D height (std, uniform per
    sample); each point hidden with probability `hide` (one hip always kept), and the face points
    half the time when the person faces away (a finder rarely sees them then)."""
    batch = len(points)
    yaw = rng.uniform(0, 2 * np.pi, batch)
    pitch = np.radians(np.clip(rng.normal(0, pitch_deg, batch), -2.5 * pitch_deg, 2.5 * pitch_deg))
    roll = np.radians(np.clip(rng.normal(0, roll_deg, batch), -2.5 * roll_deg, 2.5 * roll_deg))
    camera = points[:, list(LIFTED)] @ _rotation(yaw, pitch, roll).transpose(0, 2, 1)
    xy = camera[..., :2] * [1.0, -1.0]  # image y runs down
    height = xy[..., 1].max(1) - xy[..., 1].min(1)
    xy = xy + rng.normal(size=xy.shape) * (rng.uniform(0, noise, batch) * height)[:, None, None]
    visible = rng.random(xy.shape[:2]) >= hide
    away = np.cos(yaw) < -0.5
    face = [LIFTED.index(lm.INDEX[n]) for n in ("nose", "left_ear", "right_ear")]
    visible[np.ix_(away & (rng.random(batch) < 0.5), face)] = False
    no_hip = ~visible[:, HIPS_IN_LIFTED].any(1)
    visible[no_hip, HIPS_IN_LIFTED[0]] = True
    features, _, spread = lifter_features(xy, visible)
    hips = camera[:, list(HIPS_IN_LIFTED), 2].mean(1)
    return features, ((camera[..., 2] - hips[:, None]) / spread[:, None]).astype(np.float32)


def training_poses(recipe: LifterRecipe) -> np.ndarray:
    """(N, 33, 3) canonical landmarks of the recipe's poses (13-25 ms of CPU per pose)."""
    parts = []
    if recipe.family_poses:
        parts.append(generator_landmarks(recipe.family_poses, recipe.family_seed, recipe.families))
    if recipe.uniform_poses:
        parts.append(generator_landmarks(recipe.uniform_poses, recipe.uniform_seed, (UNIFORM_POSES,)))
    return np.concatenate(parts)


def finder_pairs(recipe: LifterRecipe, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The person finder's landmarks on clothed synthetic subjects (`model.data.known_bodies.rendered_subject`,
    size x size, the recipe's families in turn, a random yaw from the block's generator) with the true depths:
    (features (2N, 3K) as `lifter_features`, targets (2N, K) as `training_views`): each view and its mirror
    image; N <= recipe.finder_views (renders where the finder sees no one, or no hip, are left out).
    0.3-0.4 s of CPU per view."""
    from model.data.known_bodies import rendered_subject
    from model.person import PersonFinder
    from model.geometry import Crop

    finder, found, truth = PersonFinder(), [], []
    pixels_per_unit = Crop.whole_square(size).pixels_per_unit
    for block in range(0, recipe.finder_views, FINDER_BLOCK):
        start = recipe.finder_seed + 10_000 * (block // FINDER_BLOCK)
        rng = np.random.default_rng(start)
        for i in range(min(FINDER_BLOCK, recipe.finder_views - block)):
            render = rendered_subject(start + i, float(rng.uniform(0, 360)), size, family=recipe.families[i % len(recipe.families)])
            people = finder.find(render.image)
            if people:
                found.append(people[0].landmarks[list(LIFTED)])
                truth.append(render.world_landmarks[list(LIFTED), 2])
    return finder_training_pairs(np.asarray(found).reshape(-1, len(LIFTED), 3), np.asarray(truth).reshape(-1, len(LIFTED)),
                                 pixels_per_unit)


def finder_training_pairs(points: np.ndarray, depth: np.ndarray, pixels_per_unit: float) -> tuple[np.ndarray, np.ndarray]:
    """The finder's (N, K, 3) LIFTED landmarks (pixels + visibility) and the true world depths (N, K)
    (hips-centred, away from the camera, view units of `pixels_per_unit` pixels) -> `finder_pairs`'s
    (features, targets), mirror images included."""
    points, depth = np.asarray(points, np.float64), np.asarray(depth, np.float64)
    visible = points[..., 2] >= 0.5
    keep = visible[:, list(HIPS_IN_LIFTED)].any(1)
    features, _, spread = lifter_features(points[keep, :, :2], visible[keep])
    # World landmarks: hips-centred, z away from the camera, view units; the lifter's depth is toward it.
    targets = (-depth[keep] * pixels_per_unit / spread[:, None]).astype(np.float32)
    return np.concatenate([features, mirrored(features)]), np.concatenate([targets, targets[:, list(MIRRORED)]])


def train_lifter(points: np.ndarray, recipe: LifterRecipe = LifterRecipe(), finder=None, log=None) -> DepthLifter:
    """Train a DepthLifter on (N, 33, 3) canonical landmarks (`training_poses`) and, with
    recipe.finder_share of each batch, the (features, targets) of `finder_pairs`: Adam, cosine
    decay, L1 on the depths; fresh random views every step. log(step, loss) every 1000 steps."""
    if (finder is None) != (recipe.finder_share == 0):
        raise ValueError("give finder pairs exactly when the recipe has a finder share")
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    net = DepthLifter()
    optimiser = torch.optim.Adam(net.parameters(), lr=recipe.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, recipe.steps)
    from_finder = int(recipe.batch * recipe.finder_share)
    for step in range(recipe.steps):
        features, target = training_views(points[rng.integers(0, len(points), recipe.batch - from_finder)], rng)
        if from_finder:
            index = rng.integers(0, len(finder[0]), from_finder)
            features, target = np.concatenate([features, finder[0][index]]), np.concatenate([target, finder[1][index]])
        loss = (net(torch.from_numpy(features)) - torch.from_numpy(target)).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if log is not None and (step % 1000 == 0 or step == recipe.steps - 1):
            log(step, loss.item())
    return net.eval()


def lifter_bytes(net: DepthLifter, recipe: LifterRecipe) -> bytes:
    """The lifter as safetensors, its architecture and training recipe in the header."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in net.state_dict().items()},
                metadata={"architecture": json.dumps({"hidden": net.hidden, "blocks": net.blocks}),
                          "recipe": json.dumps(dataclasses.asdict(recipe))})
