"""Fit anny's pose, phenotype and an orthographic camera to one photo's landmarks and person mask.

Inputs are plain arrays (what the person finder gives): landmarks (33, 3) in continuous image
pixels with visibilities, optional world landmarks (33, 3) metres (MediaPipe axes) and an optional
(H, W) bool person mask; see `model.body.landmarks` for the layout.

Method. Gradient descent (Adam, float32) through anny in three stages, every step of which is
deterministic given the input:
1. camera: rotation, scale and root position, the body in its neutral pose;
2. pose: + the joint angles (`model.body.posing.FITTED_JOINTS`), until 10 steps gain less than
   `pose_tolerance` of the loss;
3. shape: + the phenotype (adult ages by default); the rest model is recomputed every step only here.
Terms (each normalised so that a term of 1e-4 means an error of about 1 % of the person's size):
- landmarks: squared 2D distance of the body's landmarks to the visible ones, weighted by
  visibility and `landmarks.WEIGHTS`;
- world pose: 1 - cos between the body's bone directions and the world landmarks' (when given);
- silhouette (with a mask): squared distance outside the mask of every projected vertex, and of
  every sampled mask pixel to its nearest projected vertex (the mask is covered);
- priors: joint limits (`model.body.anny.JOINT_LIMITS`), a weak pull to a neutral standing pose, a
  weak pull of the phenotype to its mean, and a self-intersection term between limb and trunk
  capsules (spheres along the segments between landmarks; a cheap stand-in for a mesh test).

Initial camera: with world landmarks, the rotation that best maps the neutral body's shoulders and
hips onto them (Kabsch); without, the best of 24 turns about the vertical. Scale and root position
then come in closed form (least squares on the trunk).

Failures. Too few usable landmarks (fewer than `min_body_landmarks` of the 12 trunk and limb
points visible inside the image, or no visible shoulder or hip, e.g. a torso cropped at the waist,
or a back view with only the shoulders found) raise `UnusableLandmarks`, an InputError. A fit that
runs but matches poorly (mask IoU below `min_iou`, mean landmark error above `max_landmark_error`
of the image height) is returned with `low_quality` set and the reason in `quality_note`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

import model.body.landmarks as lm
from model.body.posing import (
    FITTED_JOINTS,
    HINGES,
    PHENOTYPE_LABELS,
    BodyParameters,
    PosedAnny,
    joint_limits,
    neutral_angles,
    to_pixel_frame,
)
from model.errors import InputError
from model.body.anny import ADULT_AGE, ANNY_TO_CANONICAL


WORLD_SOURCES = ("lifter", "given", "none")


class LowQualityFit(InputError):
    """A fit that ran but matches the photo poorly (`BodyFit.low_quality`): where a model without
    body input is at hand, the body is not used (the quality gate of reconstruction jobs)."""


class UnusableLandmarks(InputError):
    """The landmarks cannot support a body fit (too few visible, torso cropped, ...)."""


@dataclass(frozen=True)
class FitConfig:
    """Steps, term weights and quality thresholds of one fit."""

    camera_steps: int = 30
    pose_steps: int = 120
    shape_steps: int = 50
    learning_rate: float = 0.03
    min_visibility: float = 0.5  # landmarks below are ignored
    min_body_landmarks: int = 6  # of the 12 trunk and limb landmarks
    landmark_weight: float = 1.0
    world_weight: float = 0.05
    silhouette_weight: float = 0.5
    pose_prior_weight: float = 1e-5
    limit_weight: float = 0.1
    collision_weight: float = 1.0
    phenotype_prior_weight: float = 1e-4
    age_range: tuple[float, float] = ADULT_AGE  # anny's age phenotype; (0.12, 0.85) also allows children
    silhouette_size: int = 128  # the mask's box is resampled to this many pixels on its longer side
    coverage_points: int = 300  # mask boundary pixels checked for coverage per step
    # The silhouette terms look at every vertex_stride-th vertex. 10 instead of 5: 17 % less CPU per fit,
    # the same body error (benchmarks/prepare.py, docs/body-fitting.md).
    vertex_stride: int = 10
    min_iou: float = 0.6
    max_landmark_error: float = 0.03  # fraction of the image height
    # The 3D pose the world term follows: "lifter" (`model.body.lifter`, from the 2D landmarks; on
    # clothed renders it cuts the fitted body's error against the finder's own world landmarks,
    # see the README), "given" (the world landmarks passed in: the person finder's or a keypoints file's) or "none".
    world_source: str = "lifter"
    # The pose stage stops once 10 steps gain less than this share of its loss (0: all pose_steps run).
    pose_tolerance: float = 0.01

    def __post_init__(self) -> None:
        if min(self.camera_steps, self.pose_steps, self.shape_steps) < 0:
            raise ValueError("step counts must be >= 0")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.min_visibility <= 1:
            raise ValueError(f"min_visibility must lie in [0, 1], got {self.min_visibility}")
        if not 2 <= self.min_body_landmarks <= len(lm.BODY):
            raise ValueError(f"min_body_landmarks must lie in [2, {len(lm.BODY)}], got {self.min_body_landmarks}")
        lo, hi = self.age_range
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"age_range must satisfy 0 <= lo < hi <= 1, got {self.age_range}")
        if self.silhouette_size < 16 or self.coverage_points < 1 or self.vertex_stride < 1:
            raise ValueError("silhouette_size must be >= 16, coverage_points and vertex_stride >= 1")
        if self.pose_tolerance < 0:
            raise ValueError(f"pose_tolerance must be >= 0, got {self.pose_tolerance}")
        if self.world_source not in WORLD_SOURCES:
            raise ValueError(f"world_source must be one of {WORLD_SOURCES}, not {self.world_source!r}")


@dataclass
class BodyFit:
    """A fitted body in the pixel frame (`model.body.posing`), with its quality.

    vertices: (V, 3) float64 pixels; faces: (F, 3) int64; landmarks_2d: (33, 2) the body's
    landmarks in continuous image pixels (0 where anny has none); mask_iou: IoU of the projected
    body with the mask (None without a mask); landmark_error_px: mean distance over the landmarks
    used; landmark_error: the same / image height; world_source: what the world term followed.
    """

    params: BodyParameters
    vertices: np.ndarray
    faces: np.ndarray
    landmarks_2d: np.ndarray
    mask_iou: float | None
    landmark_error_px: float
    landmark_error: float
    low_quality: bool
    quality_note: str
    seconds: float
    steps: int
    losses: dict[str, float]
    world_source: str  # the 3D pose the world term followed: "lifter", "given" or "none"


# ---- input checks -----------------------------------------------------------------------------


def usable_landmarks(landmarks: np.ndarray, image_size: tuple[int, int], config: FitConfig, name: str) -> np.ndarray:
    """(33,) bool: visible, inside the image and defined on anny. Raises UnusableLandmarks."""
    width, height = image_size
    x, y, visibility = landmarks.T
    inside = (x >= 0) & (x <= width) & (y >= 0) & (y <= height)
    usable = (visibility >= config.min_visibility) & inside & anny_defined()
    missing = [lm.NAMES[i] for i in lm.BODY if not usable[i]]
    count = len(lm.BODY) - len(missing)
    if not usable[list(lm.SHOULDERS)].any() or not usable[list(lm.HIPS)].any() or count < config.min_body_landmarks:
        raise UnusableLandmarks(
            f"{name}: landmarks unusable for a body fit: {count} of {len(lm.BODY)} trunk and limb landmarks visible "
            f"(need {config.min_body_landmarks}, with a shoulder and a hip); missing or outside the image: "
            f"{', '.join(missing) or 'none'}"
        )
    return usable


def anny_defined() -> np.ndarray:
    return lm.anny_landmarks().defined


# ---- initial camera ---------------------------------------------------------------------------


def _scale_and_root(points: np.ndarray, rotation: np.ndarray, targets: np.ndarray, weights: np.ndarray):
    """Least-squares scale s and root pixel t with targets ~ s * image_xy(R p) + t. Returns (s, t, residual)."""
    camera = points @ rotation.T
    q = np.stack([camera[:, 0], -camera[:, 1]], 1)  # image axes: v grows downward
    w = weights / weights.sum()
    q_mean, l_mean = w @ q, w @ targets
    dq, dl = q - q_mean, targets - l_mean
    scale = float((w * (dq * dl).sum(1)).sum() / max((w * (dq * dq).sum(1)).sum(), 1e-12))
    root = l_mean - scale * q_mean
    residual = float((w * ((scale * q + root - targets) ** 2).sum(1)).sum())
    return scale, root, residual


def _kabsch(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation R minimising ||R source_i - target_i|| over centred point sets (N, 3)."""
    a, b = source - source.mean(0), target - target.mean(0)
    u, _, vt = np.linalg.svd(b.T @ a)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def initial_camera(neutral: np.ndarray, landmarks: np.ndarray, usable: np.ndarray, world: np.ndarray | None):
    """(R (3, 3), scale, root (2,)) for the neutral body's landmarks (33, 3) in anny's frame."""
    from scipy.spatial.transform import Rotation

    trunk = np.array([i for i in lm.SHOULDERS + lm.HIPS if usable[i]])
    face = [lm.INDEX[n] for n in ("nose", "left_ear", "right_ear") if usable[lm.INDEX[n]]]
    if world is not None and len(trunk) >= 3:
        # MediaPipe axes (y down, z away) -> camera axes (y up, z toward the camera).
        rotation = _kabsch(neutral[trunk], world[trunk] * np.array([1.0, -1.0, -1.0]))
    else:
        chosen = np.concatenate([trunk, face]).astype(int)
        weights = lm.WEIGHTS[chosen] * landmarks[chosen, 2]
        best = None
        for theta in np.radians(np.arange(0, 360, 15)):
            candidate = Rotation.from_euler("y", theta).as_matrix() @ ANNY_TO_CANONICAL
            scale, _, residual = _scale_and_root(neutral[chosen], candidate, landmarks[chosen, :2], weights)
            if scale > 0 and (best is None or residual < best[0]):
                best = (residual, candidate)
        rotation = best[1] if best is not None else ANNY_TO_CANONICAL
    scale, root, _ = _scale_and_root(neutral[trunk], rotation, landmarks[trunk, :2], np.ones(len(trunk)))
    if not scale > 0:
        scale = 1.0  # degenerate trunk (e.g. seen exactly edge-on): the descent fixes it
    return rotation, scale, root


# ---- terms ------------------------------------------------------------------------------------


class SilhouetteTerms:
    """The two mask terms on a resampled copy of the mask's box (pixel units of the photo)."""

    def __init__(self, mask: np.ndarray, size: int, points: int):
        import torch
        from PIL import Image
        from scipy.ndimage import binary_erosion, distance_transform_edt

        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) * 1.2
        cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
        self.origin = np.array([cx - side / 2, cy - side / 2])  # top-left of the box, continuous pixels
        self.pixel = side / size  # photo pixels per box pixel
        box = Image.fromarray(mask.astype(np.uint8) * 255).transform(
            (size, size), Image.EXTENT, (self.origin[0], self.origin[1], self.origin[0] + side, self.origin[1] + side),
            Image.BILINEAR,
        )
        small = np.asarray(box) > 127
        outside = distance_transform_edt(~small) * self.pixel  # photo pixels to the mask
        self.distance = torch.tensor(outside, dtype=torch.float32)[None, None]
        # Interior pixels are covered whenever the boundary is: check the mask's boundary pixels only.
        ys, xs = np.nonzero(small & ~binary_erosion(small))
        stride = max(1, len(xs) // points)
        centres = np.stack([xs[::stride], ys[::stride]], 1) + 0.5
        self.targets = torch.tensor(centres * self.pixel + self.origin, dtype=torch.float32)
        self.size = size

    def __call__(self, projected):
        """projected (V, 2) image pixels -> (outside term, coverage term), both in squared pixels."""
        import torch
        import torch.nn.functional as F

        box = (projected - torch.tensor(self.origin, dtype=torch.float32)) / self.pixel  # box pixels
        grid = (box / self.size * 2 - 1)[None, None]  # align_corners=False: pixel centres at (i + 0.5)
        outside = F.grid_sample(self.distance, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # Squared distances through one matrix product: cdist's backward costs ~10x more here.
        squared = (self.targets ** 2).sum(1)[:, None] - 2 * self.targets @ projected.T + (projected ** 2).sum(1)[None]
        nearest = squared.min(1).values.clamp_min(0)
        return (outside ** 2).mean(), nearest.mean()


# Capsules of the self-intersection term: (landmark a, landmark b, radius m); None: mid-hip -> mid-shoulder.
_SEGMENTS = (
    ("left_elbow", "left_wrist", 0.035), ("right_elbow", "right_wrist", 0.035),
    ("left_hip", "left_knee", 0.06), ("right_hip", "right_knee", 0.06),
    ("left_knee", "left_ankle", 0.045), ("right_knee", "right_ankle", 0.045),
    (None, None, 0.09),
)
# Pairs that must not overlap, by index into _SEGMENTS: forearms with the trunk, each other and
# the thighs; the legs with each other.
_PAIRS = ((0, 6), (1, 6), (0, 1), (0, 2), (1, 3), (2, 3), (4, 5), (2, 5), (3, 4))
_STEPS = (0.25, 0.5, 0.75, 1.0)  # sphere centres along each segment


class CollisionTerm:
    """Sum of squared sphere overlaps (m^2) between the capsule pairs, from anny-frame landmarks (33, 3)."""

    def __init__(self):
        import torch

        steps = len(_STEPS)
        self.starts = torch.tensor([lm.INDEX[a] if a else -1 for a, _, _ in _SEGMENTS])
        self.ends = torch.tensor([lm.INDEX[b] if b else -1 for _, b, _ in _SEGMENTS])
        self.t = torch.tensor(_STEPS)[None, :, None]
        radii = torch.tensor([r for _, _, r in _SEGMENTS]).repeat_interleave(steps)
        segment = torch.arange(len(_SEGMENTS)).repeat_interleave(steps)
        pairs = torch.zeros(len(_SEGMENTS), len(_SEGMENTS), dtype=torch.bool)
        pairs[tuple(torch.tensor(_PAIRS).T)] = True
        self.checked = pairs[segment[:, None], segment[None, :]]  # (S * steps, S * steps)
        self.reach = radii[:, None] + radii[None, :]

    def __call__(self, points):
        import torch

        trunk = torch.stack([points[list(lm.HIPS)].mean(0), points[list(lm.SHOULDERS)].mean(0)])
        extended = torch.cat([points, trunk])  # index -1 -> mid-shoulder, patched below for starts
        starts = torch.where(self.starts[:, None] >= 0, extended[self.starts], trunk[0])
        ends = extended[self.ends]
        centres = (starts[:, None] + self.t * (ends - starts)[:, None]).reshape(-1, 3)
        overlap = torch.relu(self.reach - torch.cdist(centres, centres))
        return (overlap[self.checked] ** 2).sum()


def _phenotype(logits, age_range):
    import torch

    values = torch.sigmoid(logits)
    lo, hi = age_range
    age = PHENOTYPE_LABELS.index("age")
    return values.index_copy(0, torch.tensor([age]), lo + (hi - lo) * values[age : age + 1])


# ---- quality ----------------------------------------------------------------------------------


def raster_mask(vertices_px: np.ndarray, faces: np.ndarray, image_size: tuple[int, int], max_side: int = 512):
    """(H', W') bool silhouette of pixel-frame vertices, drawn at most `max_side` pixels on a side; and the factor."""
    from PIL import Image, ImageDraw

    width, height = image_size
    factor = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    uv = np.stack([vertices_px[:, 0], height - vertices_px[:, 1]], 1) * factor
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for triangle in uv[faces]:
        draw.polygon([tuple(p) for p in triangle], fill=255)
    return np.asarray(canvas) > 0, size


def mask_iou(vertices_px: np.ndarray, faces: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the body's silhouette with an (H, W) bool mask (compared at most 512 pixels on a side)."""
    from PIL import Image

    drawn, size = raster_mask(vertices_px, faces, (mask.shape[1], mask.shape[0]))
    target = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    union = (drawn | target).sum()
    return float((drawn & target).sum() / union) if union else 0.0


# ---- the fit ----------------------------------------------------------------------------------


def fit_body(
    landmarks: np.ndarray,
    image_size: tuple[int, int],
    mask: np.ndarray | None = None,
    world_landmarks: np.ndarray | None = None,
    config: FitConfig = FitConfig(),
    name: str = "<image>",
) -> BodyFit:
    """Fit anny to one person. landmarks (33, 3), image_size (width, height), mask (H, W) bool or None,
    world_landmarks (33, 3) metres or None. Raises UnusableLandmarks (an InputError)."""
    import roma
    import torch

    from model.body.anny import load_body_model

    start = time.perf_counter()
    width, height = (int(v) for v in image_size)
    landmarks, world_landmarks = lm.check_landmarks(landmarks, world_landmarks, name)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (height, width):
            raise InputError(f"{name}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
        if not mask.any():
            raise InputError(f"{name}: the person mask is empty")
    usable = usable_landmarks(landmarks, (width, height), config, name)
    if config.world_source == "lifter":
        from model.body.lifter import lift_world_landmarks

        world_landmarks = lift_world_landmarks(landmarks, config.min_visibility)
    elif config.world_source == "none":
        world_landmarks = None

    body = load_body_model()
    posed = PosedAnny(body)
    regress = lm.anny_landmarks()
    lower, upper = (torch.tensor(a, dtype=torch.float32) for a in joint_limits())
    neutral = torch.tensor(neutral_angles(), dtype=torch.float32)
    hinge_rows = torch.tensor([FITTED_JOINTS.index(j) for j in HINGES])
    used_components = torch.ones(len(FITTED_JOINTS), 3).index_fill(0, hinge_rows, 0.0)
    used_components[hinge_rows, 0] = 1.0

    # A step skins only the vertices the landmarks read and, with a mask, every vertex_stride-th one.
    outline_ids = torch.arange(0, len(body.dominant_bone), config.vertex_stride) if mask is not None else torch.zeros(0, dtype=torch.long)
    skinned_ids = torch.cat([regress.vertices, outline_ids])
    landmark_count = len(regress.vertices)
    angles = neutral.clone()

    def body_points(rest):
        """(landmarks (33, 3), outline vertices (N, 3)), anny's frame, metres, for the current angles."""
        skinning, heads = posed.transforms(rest, angles)
        skinned = posed.skin(rest, skinning, skinned_ids)
        return regress(skinned[:, :landmark_count], heads)[0], skinned[0, landmark_count:]

    # Initial camera from the neutral body of the mean phenotype.
    logits = torch.zeros(len(PHENOTYPE_LABELS))
    with torch.no_grad():
        neutral_points, _ = body_points(posed.rest(_phenotype(logits, config.age_range)[None]))
    rotation0, scale0, root0 = initial_camera(neutral_points.double().numpy(), landmarks, usable, world_landmarks)

    # Normalisers: the person's size in pixels (mask box or landmark box).
    box_points = landmarks[usable, :2]
    size_px = float(np.ptp(box_points, axis=0).max()) * 1.15
    if mask is not None:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        size_px = float(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))
    size_px = max(size_px, 1.0)

    targets = torch.tensor(landmarks[:, :2])
    weights = torch.tensor(lm.WEIGHTS * landmarks[:, 2] * usable)
    bones = [(a, b) for a, b in lm.BONES if usable[a] and usable[b]] if world_landmarks is not None else []
    if bones:
        world_axes = torch.tensor(world_landmarks * np.array([1.0, -1.0, -1.0], np.float32))  # camera axes
        parents, children = torch.tensor([a for a, _ in bones]), torch.tensor([b for _, b in bones])
        world_dirs = torch.nn.functional.normalize(world_axes[children] - world_axes[parents], dim=1)
        bone_weights = torch.tensor(np.minimum(landmarks[[a for a, _ in bones], 2], landmarks[[b for _, b in bones], 2]))
    collide = CollisionTerm()
    silhouette = SilhouetteTerms(mask, config.silhouette_size, config.coverage_points) if mask is not None else None

    angles.requires_grad_(True)
    turn = torch.zeros(3, requires_grad=True)
    log_scale = torch.zeros((), requires_grad=True)
    shift = torch.zeros(2, requires_grad=True)
    logits.requires_grad_(True)
    rotation0_t = torch.tensor(rotation0, dtype=torch.float32)
    root0_t = torch.tensor(root0, dtype=torch.float32)

    def evaluate(points, outline):
        """The terms (a dict) and the landmarks' image points (33, 2) for body points in anny's frame
        (landmarks (33, 3); outline vertices (N, 3), or None: no silhouette and no priors)."""
        rotation = roma.rotvec_to_rotmat(turn) @ rotation0_t
        scale = scale0 * torch.exp(log_scale)
        root = root0_t + shift * size_px
        camera = points @ rotation.T
        image = torch.stack([root[0] + scale * camera[:, 0], root[1] - scale * camera[:, 1]], 1)
        norm = size_px ** 2
        terms = {"landmarks": (weights * ((image - targets) ** 2).sum(1)).sum() / weights.sum() / norm}
        if bones:
            dirs = torch.nn.functional.normalize(camera[children] - camera[parents], dim=1)
            terms["world"] = (bone_weights * (1 - (dirs * world_dirs).sum(1))).sum() / bone_weights.sum()
        if outline is None:
            return terms, image
        if silhouette is not None:
            verts = outline @ rotation.T
            projected = torch.stack([root[0] + scale * verts[:, 0], root[1] - scale * verts[:, 1]], 1)
            outside, coverage = silhouette(projected)
            terms["silhouette"] = (outside + coverage) / norm
        deviation = (angles - neutral) * used_components
        terms["pose_prior"] = (deviation ** 2).sum()
        terms["limits"] = ((torch.relu(lower - angles) ** 2 + torch.relu(angles - upper) ** 2) * used_components).sum()
        terms["collision"] = collide(points)
        return terms, image

    term_weights = {
        "landmarks": config.landmark_weight, "world": config.world_weight, "silhouette": config.silhouette_weight,
        "pose_prior": config.pose_prior_weight, "limits": config.limit_weight, "collision": config.collision_weight,
    }
    stages = (
        ("camera", config.camera_steps, [turn, log_scale, shift]),
        ("pose", config.pose_steps, [turn, log_scale, shift, angles]),
        ("shape", config.shape_steps, [turn, log_scale, shift, angles, logits]),
    )
    steps = 0
    terms: dict = {}
    for stage, count, variables in stages:
        if count == 0:
            continue
        optimiser = torch.optim.Adam(variables, lr=config.learning_rate)
        with torch.no_grad():
            fixed_rest = posed.rest(_phenotype(logits, config.age_range)[None])
            fixed_points = body_points(fixed_rest)[0] if stage == "camera" else None
        checkpoint_loss = None
        for step in range(count):
            optimiser.zero_grad()
            phenotype = _phenotype(logits, config.age_range)
            if stage == "camera":  # the body is fixed: only what the camera can match
                terms, _ = evaluate(fixed_points, None)
            else:
                terms, _ = evaluate(*body_points(posed.rest(phenotype[None]) if stage == "shape" else fixed_rest))
            loss = sum(term_weights[k] * v for k, v in terms.items())
            if stage == "shape":
                mean = torch.full_like(phenotype, 0.5)
                loss = loss + config.phenotype_prior_weight * ((phenotype - mean) ** 2).sum()
            loss.backward()
            optimiser.step()
            steps += 1
            # The pose stage stops where 10 steps gain less than pose_tolerance of the loss.
            if stage == "pose" and config.pose_tolerance and step % 10 == 9:
                value = loss.item()
                if checkpoint_loss is not None and checkpoint_loss - value < config.pose_tolerance * value:
                    break
                checkpoint_loss = value

    with torch.no_grad():
        phenotype = _phenotype(logits, config.age_range)
        rest = posed.rest(phenotype[None])
        final_terms, image = evaluate(*body_points(rest))
        vertices, _ = posed.pose(rest, angles)
        rotation = (roma.rotvec_to_rotmat(turn) @ rotation0_t).double().numpy()
        scale = float(scale0 * torch.exp(log_scale))
        root = (root0_t + shift * size_px).double().numpy()
    anny_vertices = vertices[0].double().numpy()
    depth_range = (anny_vertices @ rotation.T)[:, 2] * scale
    params = BodyParameters(
        angles={j: tuple(float(v) for v in row) for j, row in zip(FITTED_JOINTS, angles.detach().double().numpy())},
        phenotype={k: float(v) for k, v in zip(PHENOTYPE_LABELS, phenotype.double().numpy())},
        rotation=tuple(tuple(float(v) for v in row) for row in rotation),
        scale=scale,
        root_pixel=(float(root[0]), float(root[1])),
        depth=float(-(depth_range.min() + depth_range.max()) / 2),  # depth range centred on z = 0
        image_size=(width, height),
    )
    pixel_vertices = to_pixel_frame(anny_vertices, rotation, scale, params.root_pixel, params.depth, height)

    image = image.double().numpy()
    used = usable & (lm.WEIGHTS > 0)
    error_px = float(np.linalg.norm(image[used] - landmarks[used, :2], axis=1).mean())
    iou = mask_iou(pixel_vertices, body.faces, mask) if mask is not None else None
    notes = []
    if iou is not None and iou < config.min_iou:
        notes.append(f"mask IoU {iou:.2f} < {config.min_iou}")
    if error_px / height > config.max_landmark_error:
        notes.append(f"landmark error {error_px / height:.3f} of the image height > {config.max_landmark_error}")
    return BodyFit(
        params=params,
        vertices=pixel_vertices,
        faces=body.faces,
        landmarks_2d=np.where(anny_defined()[:, None], image, 0.0),
        mask_iou=iou,
        landmark_error_px=error_px,
        landmark_error=error_px / height,
        low_quality=bool(notes),
        quality_note="; ".join(notes),
        seconds=time.perf_counter() - start,
        steps=steps,
        losses={k: float(v) for k, v in final_terms.items()},
        world_source=config.world_source if bones else "none",
    )
