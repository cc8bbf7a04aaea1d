"""anny as a differentiable function of a few joint angles, a phenotype and an orthographic camera.

Pose. The fitted joints are the ones the synthetic-data generator poses (`model.data.humans`):
hips, knees, ankles, shoulders, elbows, two spine joints and the neck, in anny's `local-ref`
parameterisation (a rotation vector in the rest frame's world axes about the joint: X = the
body's left, Y = backward, Z = up). Angles are stored in the left-side convention and mirrored
for the right side as (x, -y, -z), so one table of limits (`model.body.anny.JOINT_LIMITS`) serves
both sides; an elbow bends about a single axis (normal to its rest forearm and the body's
forward direction), as the generator does it.

Camera. Orthographic: a point p of anny's frame (metres, root at the origin) goes to the camera
frame c = R p (x right, y up, z toward the camera, metres) and then to the *pixel frame* of the
reconstructed mesh (model/geometry.py `world_to_pixel`: x right, y up, z toward the camera,
one unit = one pixel of the photo, origin at its bottom-left corner):
    x = u0 + s c_x,   y = (H - v0) + s c_y,   z = z0 + s c_z,
with s pixels per metre and (u0, v0) the image point (continuous pixels, top-left origin) of
anny's root. z0 puts the body's depth range around z = 0, as the network's meshes are.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from model.body.anny import JOINT_LIMITS

SIDES = ("L", "R")
FITTED_JOINTS = (
    "upperleg01.L", "upperleg01.R", "lowerleg01.L", "lowerleg01.R", "foot.L", "foot.R",
    "upperarm01.L", "upperarm01.R", "lowerarm01.L", "lowerarm01.R", "spine03", "spine01", "neck01",
)
HINGES = ("lowerarm01.L", "lowerarm01.R")  # one angle, component 0
MIRROR = np.array([1.0, -1.0, -1.0])

# The mean standing pose the prior pulls toward (left-side convention): arms hanging at the sides.
NEUTRAL = {"upperarm01": (0.0, 0.6, 0.0), "lowerarm01": (0.2, 0.0, 0.0)}

PHENOTYPE_LABELS = ("gender", "age", "muscle", "weight", "height", "proportions")


def joint_limits() -> tuple[np.ndarray, np.ndarray]:
    """(J, 3) lower and upper limits (radians, left-side convention) of FITTED_JOINTS."""
    limits = np.array([JOINT_LIMITS[j.split(".")[0]] for j in FITTED_JOINTS], dtype=np.float64)  # (J, 3, 2)
    return limits[..., 0], limits[..., 1]


def neutral_angles() -> np.ndarray:
    """(J, 3) the neutral standing pose (left-side convention)."""
    return np.array([NEUTRAL.get(j.split(".")[0], (0.0, 0.0, 0.0)) for j in FITTED_JOINTS], dtype=np.float64)


@dataclass(frozen=True)
class BodyParameters:
    """Everything that reproduces a fitted body (see the module docstring for frames and units).

    angles: joint -> rotation vector (3,) radians, left-side convention (hinges use component 0);
    phenotype: anny phenotype values in [0, 1]; rotation: (3, 3) anny frame -> camera frame;
    scale: pixels per metre; root_pixel: (u0, v0) continuous pixels; depth: z0 pixels;
    image_size: (width, height) pixels.
    """

    angles: dict[str, tuple[float, float, float]]
    phenotype: dict[str, float]
    rotation: tuple[tuple[float, float, float], ...]
    scale: float
    root_pixel: tuple[float, float]
    depth: float
    image_size: tuple[int, int]

    def to_json(self) -> str:
        return json.dumps({"format": "pifuhd-ray anny body 1", "topology": _topology(), **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> "BodyParameters":
        d = json.loads(text)
        return cls(
            angles={k: tuple(float(x) for x in v) for k, v in d["angles"].items()},
            phenotype={k: float(v) for k, v in d["phenotype"].items()},
            rotation=tuple(tuple(float(x) for x in row) for row in d["rotation"]),
            scale=float(d["scale"]),
            root_pixel=tuple(float(x) for x in d["root_pixel"]),
            depth=float(d["depth"]),
            image_size=tuple(int(x) for x in d["image_size"]),
        )

    def angle_array(self) -> np.ndarray:
        return np.array([self.angles[j] for j in FITTED_JOINTS], dtype=np.float64)


def _topology() -> str:
    from model.body.anny import TOPOLOGY

    return TOPOLOGY


def hinge_axes(rest_heads, bone_labels: list[str]):
    """(2, 3) torch unit axes of the elbows (left, right) from the rest bone heads (B, J, 3), batch 0."""
    import torch

    axes = []
    for side in SIDES:
        head = rest_heads[0, bone_labels.index(f"lowerarm01.{side}")]
        wrist = rest_heads[0, bone_labels.index(f"wrist.{side}")]
        forearm = (wrist - head) / (wrist - head).norm()
        axis = torch.linalg.cross(forearm, torch.tensor([0.0, -1.0, 0.0], dtype=forearm.dtype))
        axes.append(axis / axis.norm())
    return torch.stack(axes)


class PosedAnny:
    """anny (float32, one closed part) posed by FITTED_JOINTS angles; the rest model is cached per phenotype.

    `rest(phenotype (1, 6))` -> dict of anny's rest outputs; `pose(rest, angles (J, 3))` ->
    (vertices (1, V, 3), bone_heads (1, J_anny, 3)) in anny's frame, metres, root at the origin.
    Both are differentiable.
    """

    def __init__(self, body):
        import torch

        self.body = body
        self.model = body.anny
        labels = body.bone_labels
        self.indices = torch.tensor([labels.index(j) for j in FITTED_JOINTS])
        self.mirror = torch.tensor(np.array([MIRROR if j.endswith(".R") else np.ones(3) for j in FITTED_JOINTS]), dtype=torch.float32)
        self.hinges = torch.tensor([FITTED_JOINTS.index(j) for j in HINGES])
        self.no_changes = torch.zeros(1, len(self.model.local_change_labels))
        self.no_actions = torch.zeros(1, len(self.model.facial_action_labels))
        assert tuple(self.model.phenotype_labels) == PHENOTYPE_LABELS, self.model.phenotype_labels

    def rest(self, phenotype):
        # anny's forward in two halves, so a fixed phenotype's rest model is computed once.
        coeffs = self.model._get_phenotype_blendshape_coefficients(phenotype, self.no_changes, self.no_actions)
        return self.model.get_rest_model(coeffs)

    def rotations(self, rest, angles):
        """(J, 3) left-convention angles -> (J, 3, 3) rotation matrices in anny's frame."""
        import roma

        vectors = angles * self.mirror
        # Hinges: the angle (component 0) times the elbow's axis; the mirror already applied to it
        # is undone since the right axis is computed from the right arm itself.
        axes = hinge_axes(rest["rest_bone_heads"].detach(), self.body.bone_labels)
        vectors = vectors.index_copy(0, self.hinges, angles[self.hinges, :1] * axes)
        return roma.rotvec_to_rotmat(vectors)

    def transforms(self, rest, angles):
        """(skinning transforms (1, J_anny, 4, 4), bone heads (1, J_anny, 3)) of the pose."""
        import torch

        transforms = torch.eye(4).repeat(1, len(self.body.bone_labels), 1, 1)
        blocks = torch.eye(4).repeat(len(FITTED_JOINTS), 1, 1)
        blocks = torch.cat([torch.cat([self.rotations(rest, angles), blocks[:, :3, 3:]], 2), blocks[:, 3:]], 1)
        transforms = transforms.index_copy(1, self.indices, blocks[None])
        skinning, bone_poses = self.model.get_bone_transforms(transforms, rest["rest_bone_poses"])
        return skinning, bone_poses[:, :, :3, 3]

    def skin(self, rest, skinning, ids):
        """(1, N, 3) posed positions of vertices `ids` (N,): linear blend skinning in torch, so a
        fit pays for the vertices it looks at only (anny's own kernel skins all of them)."""
        weights = self.model.vertex_bone_weights[ids]  # (N, 9)
        transforms = skinning[0, :, :3][self.model.vertex_bone_indices[ids]]  # (N, 9, 3, 4)
        blended = (weights[:, :, None, None] * transforms).sum(1)  # (N, 3, 4)
        points = rest["rest_vertices"][0, ids]
        return ((blended[:, :, :3] * points[:, None, :]).sum(2) + blended[:, :, 3])[None]

    def pose(self, rest, angles):
        """(vertices (1, V, 3), bone heads (1, J_anny, 3)) of the whole posed mesh."""
        skinning, heads = self.transforms(rest, angles)
        return self.model.get_skinned_vertices(rest["rest_vertices"], skinning), heads


def to_pixel_frame(points, rotation, scale, root_pixel, depth, image_height: int):
    """anny-frame points (N, 3) -> pixel frame (N, 3); torch or numpy alike (see the module docstring)."""
    camera = points @ rotation.T
    u = root_pixel[0] + scale * camera[:, 0]
    y = (image_height - root_pixel[1]) + scale * camera[:, 1]
    z = depth + scale * camera[:, 2]
    if isinstance(points, np.ndarray):
        return np.stack([u, y, z], 1)
    import torch

    return torch.stack([u, y, z], 1)


def body_vertices(params: BodyParameters) -> np.ndarray:
    """The body of `params` in the pixel frame: (V, 3) float64, faces `load_body_model().faces`."""
    import torch

    from model.body.anny import load_body_model

    posed = PosedAnny(load_body_model())
    phenotype = torch.tensor([[params.phenotype[k] for k in PHENOTYPE_LABELS]], dtype=torch.float32)
    with torch.no_grad():
        rest = posed.rest(phenotype)
        vertices, _ = posed.pose(rest, torch.tensor(params.angle_array(), dtype=torch.float32))
    return to_pixel_frame(
        vertices[0].double().numpy(), np.asarray(params.rotation), params.scale, params.root_pixel, params.depth,
        params.image_size[1],
    )
