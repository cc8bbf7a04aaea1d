"""Synthetic clothed people from the `anny` body model, fully determined by a seed.

One subject = a body shape (anny phenotypes, adults unless children are asked
for), a pose from one of a few families (stand, walk, gesture, reach, crouch;
lunge only when asked for: it is held out of the shipped models' training data)
checked by anny's self-interpenetration module, procedural garments (vertices
pushed along their normals per body region with wrinkle noise: shirt, sleeves,
trousers or shorts, shoes, hair cap; sometimes a skirt as its own closed mesh)
and per-vertex albedo.

Frames and units. anny works in metres with Z up and the body facing -Y. The
subject returned here is in the *canonical frame*: centimetres, y up, the
subject facing +z (toward a camera at yaw 0), x to the camera's right (the
subject's left), the bounding-box centre at the origin, scaled so that the
dressed rest pose (anny's A-pose) is exactly `height_cm` (180) tall. Posed
bodies are therefore 180 cm people, a crouching one is shorter than 180.

Every part is closed (watertight): garments only move vertices, the
connectivity of the body mesh is kept, and the skirt is a capped tube.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from model.body.anny import ADULT_AGE, ANNY_TO_CANONICAL, CHILD_AGE, JOINT_LIMITS, BodyModel, load_body_model
from model.meshes import vertex_normals
from model.render import Part

POSE_FAMILIES = ("stand", "walk", "gesture", "reach", "crouch")  # what the training data draws
# Families no shipped model, lifter or dataset recipe ever drew: test subjects of a pose never seen in
# training (`pifuhd data synth --families lunge`, README "Generalisation").
HELD_OUT_FAMILIES = ("lunge",)
UNIFORM_POSES = "uniform"  # sample_pose's family of no family


@dataclass(frozen=True)
class HumanConfig:
    """What a synthetic subject may look like; every draw comes from the seed."""

    height_cm: float = 180.0  # dressed rest-pose height after normalisation
    children: bool = False  # also draw children (ages 7-17) for a quarter of the subjects
    families: tuple[str, ...] = POSE_FAMILIES
    skirt_probability: float = 0.2
    max_pose_tries: int = 12  # re-draws when anny's self-interpenetration module finds a collision
    max_colliding_faces: int = 0
    # A folder of MakeHuman assets (clothes/*/*.mhclo, hair/*/*.mhclo; model/data/garments.py): real
    # suits, shoes, hair and hats fitted to the body instead of the procedural garments; None: procedural.
    garments: str | None = None
    max_garment_inside: float = 0.15  # a pose whose suit lies more than this share inside the body is re-drawn

    def __post_init__(self) -> None:
        known = POSE_FAMILIES + HELD_OUT_FAMILIES
        if not self.families or set(self.families) - set(known):
            raise ValueError(f"families must be some of {known}, got {self.families}")


class GarmentFitError(ValueError):
    """Real garments that do not fit a subject's body in any pose: the subject is not made."""


@dataclass
class Subject:
    """A person in the canonical frame (cm, y up, facing +z, centred) as a list of closed parts."""

    subject_id: str
    parts: list[Part]
    info: dict = field(default_factory=dict)  # what was drawn: phenotype, pose family, garments
    # The body under the clothes (synthetic subjects: the posed anny body, same frame and
    # centring as the parts); a prior the network may read, never a label. None for scans.
    body: Part | None = None

    def merged(self) -> Part:
        """All parts as one mesh (faces re-indexed), e.g. to write one PLY per subject."""
        offsets = np.cumsum([0] + [len(p.vertices) for p in self.parts])[:-1]
        return Part(
            name="+".join(p.name for p in self.parts),
            vertices=np.concatenate([p.vertices for p in self.parts]).astype(np.float32),
            faces=np.concatenate([p.faces + o for p, o in zip(self.parts, offsets)]).astype(np.int32),
            colors=np.concatenate([p.colors for p in self.parts]).astype(np.float32),
        )


# ---- the body model, built once per process ---------------------------------------------------


# ---- shape and pose ---------------------------------------------------------------------------


def sample_phenotype(rng: np.random.Generator, config: HumanConfig) -> dict[str, float]:
    """anny phenotype values in [0, 1]: age from the adult range (or a child's, when allowed)."""
    child = config.children and rng.random() < 0.25
    age = rng.uniform(*(CHILD_AGE if child else ADULT_AGE))
    return {
        "gender": float(rng.random()),
        "age": float(age),
        "muscle": float(rng.beta(2, 2)),
        "weight": float(rng.beta(2, 2.5)),
        "height": float(rng.beta(2, 2)),
        "proportions": float(rng.beta(2, 2)),
    }


def _family_angles(rng: np.random.Generator, family: str) -> dict[str, np.ndarray]:
    """Rotation vectors (3,) per joint for one pose family, left and right named with .L/.R."""
    u = rng.uniform
    a: dict[str, np.ndarray] = {}

    def put(joint: str, side: str, x=0.0, y=0.0, z=0.0):
        a[f"{joint}.{side}" if side else joint] = np.array([x, y, z], dtype=np.float64)

    # Arms hang from anny's A-pose (about 45 deg) to the sides by default: +y lowers the left arm.
    for side in "LR":
        put("upperarm01", side, u(-0.2, 0.2), u(0.45, 0.8), u(-0.2, 0.2))
        put("lowerarm01", side, u(0.05, 0.4))
        put("upperleg01", side, u(-0.1, 0.1), u(-0.12, 0.05), u(-0.15, 0.15))
        put("lowerleg01", side, u(0.0, 0.1))
    put("spine03", "", u(-0.05, 0.1), u(-0.08, 0.08), u(-0.1, 0.1))
    put("neck01", "", u(-0.15, 0.2), u(-0.15, 0.15), u(-0.3, 0.3))

    lead, back = ("L", "R") if rng.random() < 0.5 else ("R", "L")
    if family == "walk":
        stride = u(0.25, 0.6)
        put("upperleg01", lead, -stride, u(-0.05, 0.05), u(-0.1, 0.1))
        put("lowerleg01", lead, u(0.05, 0.4))
        put("upperleg01", back, stride * u(0.4, 0.8), u(-0.05, 0.05), u(-0.1, 0.1))
        put("lowerleg01", back, u(0.2, 0.9))
        put("upperarm01", lead, stride * u(0.5, 1.0), u(0.5, 0.8), 0.0)  # arms swing against the legs
        put("upperarm01", back, -stride * u(0.5, 1.0), u(0.5, 0.8), 0.0)
        put("lowerarm01", back, u(0.2, 0.9))
    elif family == "gesture":
        for side in (lead,) if rng.random() < 0.6 else ("L", "R"):
            put("upperarm01", side, u(-1.3, 0.2), u(-0.9, 0.6), u(-0.6, 0.6))
            put("lowerarm01", side, u(0.5, 2.0))
    elif family == "reach":
        put("upperarm01", lead, u(-2.6, -1.0), u(-0.6, 0.3), u(-0.4, 0.4))
        put("lowerarm01", lead, u(0.0, 0.5))
        put("spine03", "", u(0.0, 0.4), u(-0.15, 0.15), u(-0.3, 0.3))
        if rng.random() < 0.4:  # both hands up or forward
            put("upperarm01", back, u(-2.4, -0.8), u(-0.6, 0.3), u(-0.4, 0.4))
            put("lowerarm01", back, u(0.0, 0.6))
    elif family == "crouch":
        depth = u(0.6, 1.0)
        for side in "LR":
            put("upperleg01", side, -depth * u(1.2, 1.8), u(-0.35, 0.0), u(-0.25, 0.1))
            put("lowerleg01", side, depth * u(1.6, 2.3))
            put("foot", side, -depth * u(0.1, 0.5))
            put("upperarm01", side, u(-1.3, -0.3), u(0.0, 0.6), u(-0.3, 0.3))
            put("lowerarm01", side, u(0.3, 1.5))
        put("spine03", "", depth * u(0.2, 0.6), u(-0.1, 0.1), u(-0.2, 0.2))
    elif family == "lunge":  # one thigh forward and the knee bent, the other leg stretched back
        put("upperleg01", lead, -u(0.9, 1.5), u(-0.15, 0.05), u(-0.15, 0.15))
        put("lowerleg01", lead, u(0.9, 1.7))
        put("upperleg01", back, u(0.3, 0.5), u(-0.1, 0.05), u(-0.1, 0.1))
        put("lowerleg01", back, u(0.1, 0.8))
        put("spine03", "", u(-0.15, 0.25), u(-0.15, 0.15), u(-0.2, 0.2))
        for side in "LR":  # each arm hangs, points forward or goes up
            choice = rng.integers(3)
            if choice:
                put("upperarm01", side, -u(0.8, 1.6) if choice == 1 else -u(2.0, 2.6), u(-0.4, 0.4), u(-0.3, 0.3))
                put("lowerarm01", side, u(0.0, 0.8))
    elif family != "stand":
        raise ValueError(f"unknown pose family {family!r}; choose from {POSE_FAMILIES + HELD_OUT_FAMILIES}")
    return a


def _clip_and_mirror(angles: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Clip each joint to its anatomical limits (stated for the left side) and mirror right-side values."""
    out = {}
    for name, value in angles.items():
        joint, _, side = name.partition(".")
        lo, hi = np.array(JOINT_LIMITS[joint]).T
        left = np.clip(value, lo, hi)
        out[name] = left * np.array([1.0, -1.0, -1.0]) if side == "R" else left
    return out


def _pose_transforms(angles: dict[str, np.ndarray], rest_heads: np.ndarray, body: BodyModel):
    """anny pose dict {bone: (1, 4, 4) torch} from joint rotation vectors.

    The elbow bends about the axis normal to the forearm and the body's forward direction in
    the rest pose (anny's A-pose holds the forearm at an angle, so a world axis would twist it).
    """
    import torch

    names = list(angles)
    vecs = np.stack([angles[n] for n in names])
    for i, name in enumerate(names):
        if name.startswith("lowerarm01"):
            side = name[-1]
            head = rest_heads[body.bone_labels.index(f"lowerarm01.{side}")]
            wrist = rest_heads[body.bone_labels.index(f"wrist.{side}")]
            forearm = (wrist - head) / np.linalg.norm(wrist - head)
            axis = np.cross(forearm, [0.0, -1.0, 0.0])  # sign: positive angles fold the hand forward
            axis /= np.linalg.norm(axis)
            vecs[i] = axis * angles[name][0]
    mats = Rotation.from_rotvec(vecs).as_matrix()
    pose = {}
    for name, mat in zip(names, mats):
        t = torch.eye(4, dtype=torch.float32)[None].clone()
        t[0, :3, :3] = torch.from_numpy(mat.astype(np.float32))
        pose[name] = t
    return pose


def sample_pose(rng: np.random.Generator, family: str, rest_heads: np.ndarray, body: BodyModel, scale: float = 1.0):
    """One anny pose dict of the family, or of UNIFORM_POSES (every joint of JOINT_LIMITS, both sides,
    uniform within its limits: poses of no family, for a prior that must not learn the families,
    `model.body.lifter`); `scale` < 1 shrinks the angles (used when retrying after a collision)."""
    drawn = _uniform_angles(rng) if family == UNIFORM_POSES else _family_angles(rng, family)
    angles = {k: v * scale for k, v in drawn.items()}
    return _pose_transforms(_clip_and_mirror(angles), rest_heads, body)


def _uniform_angles(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rotation vectors (3,) per joint, each uniform within JOINT_LIMITS (stated for the left side)."""
    angles = {}
    for joint, limits in JOINT_LIMITS.items():
        lo, hi = np.array(limits).T
        for side in (("L", "R") if joint not in ("spine03", "spine01", "neck01") else ("",)):
            angles[f"{joint}.{side}" if side else joint] = rng.uniform(lo, hi)
    return angles


# ---- garments ---------------------------------------------------------------------------------


def _smooth(values: np.ndarray, adjacency, iterations: int) -> np.ndarray:
    """Laplacian smoothing of a per-vertex field: softens region borders into seams."""
    for _ in range(iterations):
        values = 0.5 * values + 0.5 * (adjacency @ values)
    return values


def _segment_param(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(N,) position of each point along the segment start -> end, 0 at start, 1 at end."""
    d = end - start
    return (points - start) @ d / (d @ d)


def _random_colour(rng: np.random.Generator, saturation=(0.15, 0.8), value=(0.15, 0.9)) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value)))


def _skin_colour(rng: np.random.Generator) -> np.ndarray:
    """A skin albedo between very light and very dark tones, slightly jittered."""
    tones = np.array([[0.96, 0.80, 0.69], [0.90, 0.67, 0.52], [0.78, 0.55, 0.40], [0.55, 0.37, 0.25], [0.33, 0.22, 0.15]])
    t = rng.uniform(0, len(tones) - 1)
    i = int(t)
    c = tones[i] * (1 - (t - i)) + tones[min(i + 1, len(tones) - 1)] * (t - i)
    return np.clip(c * rng.uniform(0.92, 1.05, 3), 0, 1)


def _wrinkles(rng: np.random.Generator, points: np.ndarray, amplitude_cm: float) -> np.ndarray:
    """(N,) smooth noise of about `amplitude_cm`: a few random plane waves in rest coordinates (cm).

    Defined on the rest pose, so the folds travel with the body when it is posed.
    """
    out = np.zeros(len(points))
    for _ in range(6):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        wavelength = rng.uniform(3.0, 12.0)
        out += np.sin(points @ direction * (2 * np.pi / wavelength) + rng.uniform(0, 2 * np.pi))
    return out * amplitude_cm / np.sqrt(6)


@dataclass
class Outfit:
    """Per-vertex garment offsets (cm, along normals) and albedo, plus what was drawn."""

    offsets: np.ndarray  # (V,) cm
    colors: np.ndarray  # (V, 3)
    skirt: dict | None  # {"hem": fraction along the thigh, "color": rgb} or None
    info: dict


def dress(rng: np.random.Generator, rest_cm: np.ndarray, rest_heads_cm: np.ndarray, body: BodyModel, allow_skirt: bool, config: HumanConfig) -> Outfit:
    """Draw an outfit for a body in its rest pose (anny frame, cm): offsets, colours, maybe a skirt."""
    labels = body.bone_labels
    head_of = lambda name: rest_heads_cm[labels.index(name)]  # noqa: E731
    bone = np.array(labels, dtype=object)[body.dominant_bone]
    prefix = np.array([b.split(".")[0].rstrip("0123456789-") for b in bone])  # "upperarm", "toe", ...
    side = np.array([b[-1] if b[-2:] in (".L", ".R") else "" for b in bone])
    n = len(rest_cm)
    z = rest_cm[:, 2]

    skin = _skin_colour(rng)
    colors = np.tile(skin, (n, 1))
    offsets = np.zeros(n)

    # Arm and leg coordinates along the limb: 0 at the shoulder/hip, 1 at the wrist/ankle.
    arm_t = np.full(n, np.nan)  # NaN compares False: outside the limb
    leg_t = np.full(n, np.nan)
    for s in "LR":
        arm = np.isin(prefix, ["upperarm", "lowerarm", "shoulder"]) & (side == s)
        arm_t[arm] = _segment_param(rest_cm[arm], head_of(f"upperarm01.{s}"), head_of(f"wrist.{s}"))
        leg = np.isin(prefix, ["upperleg", "lowerleg", "pelvis"]) & (side == s)
        leg_t[leg] = _segment_param(rest_cm[leg], head_of(f"upperleg01.{s}"), head_of(f"foot.{s}"))
    torso = np.isin(prefix, ["spine", "clavicle", "shoulder", "pelvis", "root"])
    waist_z = head_of("spine03")[2] * 0.5 + head_of("spine04")[2] * 0.5
    neck_z = head_of("neck01")[2]

    # Top: shirt on the torso above the waist, sleeves down to a random length.
    sleeve = rng.choice([0.0, 0.3, 0.55, 1.05], p=[0.15, 0.35, 0.15, 0.35])
    top_colour = _random_colour(rng)
    top = (torso & (z > waist_z - rng.uniform(0, 12)) & (z < neck_z - rng.uniform(0, 4))) | (arm_t <= sleeve)
    top_offset = rng.uniform(0.5, 1.5)

    # Bottom: trousers or shorts over pelvis and legs, or a skirt (a separate mesh) over bare legs.
    skirt = None
    leg_length = rng.choice([0.35, 0.7, 1.02], p=[0.25, 0.15, 0.6])
    bottom_colour = _random_colour(rng, value=(0.1, 0.7))
    if allow_skirt and rng.random() < config.skirt_probability:
        skirt = {"hem": float(rng.uniform(0.3, 0.8)), "color": _random_colour(rng).tolist(), "flare": float(rng.uniform(0.05, 0.25))}
        leg_length = 0.0
    bottom = (np.isin(prefix, ["pelvis", "root"]) | (torso & (z <= waist_z)) | (leg_t <= leg_length)) & ~top
    bottom_offset = rng.uniform(0.8, 2.0)

    # Shoes on the feet, thicker under the sole; a hair cap over the skull.
    feet = np.isin(prefix, ["foot", "toe"]) | (leg_t > 0.97)
    shoe_colour = _random_colour(rng, value=(0.05, 0.6))
    head = np.isin(prefix, ["head", "neck"]) & (z > neck_z + 4)
    head_centre = head_of("head")
    rel = rest_cm - head_centre
    hairline = rng.uniform(8, 12)  # cm above the head bone's head: roughly the forehead
    hair = head & ((rel[:, 2] > hairline) | ((rel[:, 1] > rng.uniform(-1, 3)) & (rel[:, 2] > rng.uniform(-2, 6))))
    hair_colour = np.array([[0.05, 0.04, 0.03], [0.25, 0.15, 0.08], [0.55, 0.4, 0.2], [0.75, 0.6, 0.4], [0.4, 0.4, 0.4]])[rng.integers(5)]
    hair_colour = np.clip(hair_colour * rng.uniform(0.8, 1.2, 3), 0, 1)
    hair_offset = rng.uniform(0.5, 2.5)

    wrinkle = _wrinkles(rng, rest_cm, rng.uniform(0.1, 0.5))
    offsets[top] = top_offset + wrinkle[top]
    offsets[bottom] = bottom_offset + wrinkle[bottom]
    offsets[feet] = rng.uniform(0.8, 1.5)
    normals = vertex_normals(rest_cm, body.faces)
    offsets[feet] += np.clip(-normals[feet, 2], 0, 1) * rng.uniform(0.5, 2.0)  # soles
    offsets[hair] = hair_offset * (0.6 + 0.4 * np.clip(rel[hair, 2] / 15, 0, 1)) + 0.3 * wrinkle[hair]
    # Smoothing turns the hard region borders into seams and hems instead of steps.
    offsets = np.maximum(_smooth(offsets, body.adjacency, 6), 0.0)

    colors[top] = top_colour
    colors[bottom] = bottom_colour
    colors[feet] = shoe_colour
    colors[hair] = hair_colour
    if rng.random() < 0.35:  # stripes on the top
        stripes = np.sin(z * 2 * np.pi / rng.uniform(2, 8)) > 0
        colors[top & stripes] = _random_colour(rng)
    colors = np.clip(colors * (1 + 0.04 * _wrinkles(rng, rest_cm, 1.0))[:, None], 0, 1)  # fabric shading noise
    info = {
        "sleeve": float(sleeve),
        "leg_length": float(leg_length),
        "skirt": skirt is not None,
        "hair_cm": float(hair_offset),
        "skin": skin.tolist(),
    }
    return Outfit(offsets=offsets, colors=colors.astype(np.float32), skirt=skirt, info=info)


def skirt_mesh(vertices: np.ndarray, region: np.ndarray, top_y: float, hem_y: float, flare: float, rings: int = 16, segments: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A closed, capped tube hugging `vertices[region]` between heights top_y > hem_y (canonical frame, cm).

    Each ring's radius per angle is the largest radius of the region's vertices in that slice
    and angular bin plus a margin, made non-decreasing downwards (an A-line) and smoothed.
    Returns vertices (rings * segments + 2, 3) and outward faces (2 * segments * rings, 3).
    """
    pts = vertices[region]
    heights = np.linspace(top_y, hem_y, rings)
    centre = pts[:, [0, 2]].mean(0)
    phi = np.arctan2(pts[:, 2] - centre[1], pts[:, 0] - centre[0])
    radius = np.linalg.norm(pts[:, [0, 2]] - centre, axis=1)
    bins = ((phi + np.pi) / (2 * np.pi) * segments).astype(int) % segments
    band = (top_y - hem_y) / (rings - 1) * 1.5
    r = np.zeros((rings, segments))
    for i, h in enumerate(heights):
        near = np.abs(pts[:, 1] - h) < band
        if near.any():
            np.maximum.at(r[i], bins[near], radius[near])
    r = np.maximum.accumulate(r, axis=0)  # never narrower than the ring above: A-line
    for _ in range(4):  # fill empty bins and round the shape
        r = np.maximum(r, 0.5 * (np.roll(r, 1, 1) + np.roll(r, -1, 1)))
        r = 0.25 * np.roll(r, 1, 1) + 0.5 * r + 0.25 * np.roll(r, -1, 1)
    r = r + 1.5 + flare * np.linspace(0, 1, rings)[:, None] ** 2 * (top_y - hem_y)
    angles = np.linspace(-np.pi, np.pi, segments, endpoint=False) + np.pi / segments
    ring_xyz = np.stack(
        [centre[0] + r * np.cos(angles), np.broadcast_to(heights[:, None], r.shape), centre[1] + r * np.sin(angles)], -1
    ).reshape(-1, 3)
    verts = np.concatenate([ring_xyz, [[centre[0], top_y, centre[1]], [centre[0], hem_y, centre[1]]]])
    faces = []
    top_c, bot_c = rings * segments, rings * segments + 1
    for i in range(rings - 1):
        for j in range(segments):
            a, b = i * segments + j, i * segments + (j + 1) % segments
            c, d = a + segments, b + segments
            faces += [(a, c, b), (b, c, d)]
    for j in range(segments):
        a, b = j, (j + 1) % segments
        faces.append((top_c, a, b))
        faces.append((bot_c, (rings - 1) * segments + b, (rings - 1) * segments + a))
    faces = np.array(faces, dtype=np.int64)
    # Orientation: make the tube's signed volume positive (outward normals).
    tri = verts[faces]
    if np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() < 0:
        faces = faces[:, ::-1]
    return verts.astype(np.float32), faces.astype(np.int32)


# ---- a whole subject --------------------------------------------------------------------------


def _posed_body(rng: np.random.Generator, family: str, phenotype: dict, rest_heads_m: np.ndarray, body: BodyModel,
                config: HumanConfig, accept=None):
    """Pose the body, re-drawing (and softening) until anny's self-interpenetration module and
    `accept(pose, anny_output)` (when given) are satisfied; the rest pose when no draw is.

    Returns (pose dict or None, family, anny output, tries, colliding faces).
    """
    import torch

    pose_rng = np.random.default_rng(rng.integers(2**63))
    for tries in range(1, config.max_pose_tries + 1):
        amount = 1.0 if tries <= config.max_pose_tries // 2 else 0.6
        pose = sample_pose(pose_rng, family, rest_heads_m, body, scale=amount)
        with torch.no_grad():
            out = body.anny(pose_parameters=pose, phenotype_kwargs=phenotype)
            colliding = int((body.collisions.detect_self_intersections(out["vertices"][0]) >= 0).sum())
        if colliding <= config.max_colliding_faces and (accept is None or accept(pose, out)):
            return pose, family, out, tries, colliding
    with torch.no_grad():  # the rest pose never collides
        out = body.anny(phenotype_kwargs=phenotype)
    return None, "stand-rest", out, config.max_pose_tries, 0


def make_subject(subject_id: str, seed: int | np.random.SeedSequence, config: HumanConfig = HumanConfig(), family: str | None = None) -> Subject:
    """The synthetic person for `seed`: the same seed gives the same vertices, faces and colours.

    Returns parts in the canonical frame (cm, y up, facing +z, centred, rest height `height_cm`):
    the body (with garments), plus a separate closed skirt part when one was drawn.
    """
    import torch

    body = load_body_model()
    rng = np.random.default_rng(seed)
    phenotype = sample_phenotype(rng, config)
    family = family or str(rng.choice(config.families))

    with torch.no_grad():
        rest = body.anny(phenotype_kwargs=phenotype)
    rest_m = rest["rest_vertices"][0].numpy().astype(np.float64)  # "vertices" is re-rooted at the origin
    rest_heads_m = rest["rest_bone_heads"][0].numpy().astype(np.float64)

    if config.garments:
        return _subject_in_assets(subject_id, rng, phenotype, family, rest_m, rest_heads_m, config)
    outfit = dress(rng, rest_m * 100, rest_heads_m * 100, body, allow_skirt=family not in ("crouch", "lunge"), config=config)
    # Normalise on the dressed rest pose so every subject is the same 180 cm person standing.
    dressed_rest = rest_m * 100 + outfit.offsets[:, None] * vertex_normals(rest_m, body.faces)
    scale = config.height_cm / np.ptp(dressed_rest[:, 2])  # cm per anny cm

    pose, family, out, tries, colliding = _posed_body(rng, family, phenotype, rest_heads_m, body, config)
    posed_m = out["vertices"][0].numpy().astype(np.float64)

    # Garments follow the pose: the rest-pose offsets are applied along the posed normals.
    dressed = posed_m * 100 + outfit.offsets[:, None] * vertex_normals(posed_m, body.faces)
    verts = (dressed * scale) @ ANNY_TO_CANONICAL.T
    parts = [Part("body", verts.astype(np.float32), body.faces.astype(np.int32), outfit.colors)]

    if outfit.skirt is not None:
        heads = out["bone_poses"][0, :, :3, 3].numpy() * 100 * scale @ ANNY_TO_CANONICAL.T  # posed joints
        lab = body.bone_labels
        hip_y = heads[lab.index("upperleg01.L"), 1]
        knee_y = heads[lab.index("lowerleg01.L"), 1]
        top_y = heads[lab.index("spine03"), 1] * 0.5 + heads[lab.index("spine04"), 1] * 0.5
        hem_y = hip_y + (knee_y - hip_y) * outfit.skirt["hem"] * 1.6
        bone = np.array(lab, dtype=object)[body.dominant_bone]
        region = np.array([b.startswith(("pelvis", "upperleg", "spine0", "root", "lowerleg")) for b in bone])
        region &= (verts[:, 1] < top_y + 2) & (verts[:, 1] > hem_y - 2)
        sv, sf = skirt_mesh(verts, region, top_y, hem_y, outfit.skirt["flare"])
        colour = np.asarray(outfit.skirt["color"], dtype=np.float32)
        parts.append(Part("skirt", sv, sf, np.tile(colour, (len(sv), 1))))

    return _centred_subject(subject_id, parts, posed_m, scale, body, pose, {
        "phenotype": phenotype, "family": family, "pose_tries": tries, "colliding_faces": colliding, **outfit.info})


def _centred_subject(subject_id: str, parts: list[Part], posed_m: np.ndarray, scale: float, body: BodyModel, pose: dict | None,
                     drawn: dict) -> Subject:
    """The Subject of `parts` (canonical frame, cm) and the posed body (anny frame, m), all centred on the
    parts' bounding box; `pose` is the anny pose dict (None: rest pose), `drawn` what else was drawn."""
    body_part = Part("anny", ((posed_m * 100 * scale) @ ANNY_TO_CANONICAL.T).astype(np.float32), body.faces.astype(np.int32),
                     np.full((len(posed_m), 3), 0.8, np.float32))
    allv = np.concatenate([p.vertices for p in parts])
    centre = (allv.min(0) + allv.max(0)) / 2
    for p in (*parts, body_part):
        p.vertices = (p.vertices - centre).astype(np.float32)
    info = {
        **drawn,
        "scale_cm_per_anny_cm": float(scale),
        # anny's inputs that give the body back: body.anny(pose_parameters={bone: (1, 4, 4) local transform},
        # in metres (anny frame), then x 100 x scale, rotated into the canonical frame, minus this centre.
        "anny_pose_parameters": None if pose is None else {k: v[0].numpy().tolist() for k, v in pose.items()},
        "centre_cm": centre.tolist(),
    }
    return Subject(subject_id=subject_id, parts=parts, info=info, body=body_part)


def _subject_in_assets(subject_id: str, rng: np.random.Generator, phenotype: dict, family: str, rest_m: np.ndarray,
                       rest_heads_m: np.ndarray, config: HumanConfig) -> Subject:
    """make_subject with real MakeHuman garments (model/data/garments.py) over the bare body.

    A pose whose suit lies more than `max_garment_inside` inside the body is re-drawn like a
    colliding one (counted in info["garment_rejections"]); when the rest pose's does too, the subject
    raises GarmentFitError (a failed subject of the data job, with the reason). Parts: the body (skin),
    then each asset as an open surface: the subject is labelled by the winding number of all parts together.
    """
    from model.data import garments
    from model.meshes import winding_inside

    body = load_body_model()
    assets = garments.choose_outfit(rng, garments.read_assets(config.garments), phenotype["gender"])
    rest_assets, _ = garments.fitted_assets(assets, phenotype, None)
    scale = config.height_cm / np.ptp(np.concatenate([rest_m, *rest_assets])[:, 2] * 100)
    posed_assets: list[np.ndarray] = []
    shares: list[float] = []  # the suit's share inside the body, per pose tried

    def garments_fit(pose, out) -> bool:
        posed_assets[:] = garments.fitted_assets(assets, phenotype, pose)[1]
        bare_body = [(out["vertices"][0].numpy(), body.faces)]
        share = max((float(winding_inside(bare_body, v).mean()) for a, v in zip(assets, posed_assets) if a.kind == "suit"),
                    default=0.0)
        shares.append(share)
        return share <= config.max_garment_inside

    pose, family, out, tries, colliding = _posed_body(rng, family, phenotype, rest_heads_m, body, config, garments_fit)
    posed_m = out["vertices"][0].numpy().astype(np.float64)
    if pose is None and not garments_fit(None, out):  # every draw failed, and the rest pose's garments do too
        raise GarmentFitError(f"{subject_id}: its garments ({', '.join(a.name for a in assets)}) lie inside the body in every "
                              f"pose tried ({shares[-1]:.0%} of the suit in the rest pose)")
    tried = shares[:-1] if pose is None else shares
    skin = _skin_colour(rng)
    parts = [Part("body", ((posed_m * 100 * scale) @ ANNY_TO_CANONICAL.T).astype(np.float32), body.faces.astype(np.int32),
                  np.tile(skin, (len(posed_m), 1)).astype(np.float32))]
    waist_z = rest_heads_m[body.bone_labels.index("spine03"), 2] * 0.5 + rest_heads_m[body.bone_labels.index("spine04"), 2] * 0.5
    hair_colour = np.clip(garments.HAIR_COLOURS[rng.integers(len(garments.HAIR_COLOURS))] * rng.uniform(0.8, 1.2, 3), 0, 1)
    top, bottom = _random_colour(rng), _random_colour(rng, value=(0.1, 0.7))
    for asset, rest_v, posed_v in zip(assets, rest_assets, posed_assets):
        if asset.kind == "suit":  # one fabric above the waist, another below
            colors = np.where((rest_v[:, 2] > waist_z)[:, None], garments.fabric(rng, asset.uv, top), garments.fabric(rng, asset.uv, bottom))
        elif asset.kind == "hair":
            colors = np.tile(hair_colour, (len(posed_v), 1))
        else:
            colors = garments.fabric(rng, asset.uv, _random_colour(rng, value=(0.05, 0.6)))
        parts.append(Part(asset.name, ((posed_v * 100 * scale) @ ANNY_TO_CANONICAL.T).astype(np.float32), asset.faces,
                          colors.astype(np.float32), uv=asset.uv))
    return _centred_subject(subject_id, parts, posed_m, scale, body, pose, {
        "phenotype": phenotype, "family": family, "pose_tries": tries, "colliding_faces": colliding, "label_union": True, "garments": [a.name for a in assets],
        "garment_rejections": sum(share > config.max_garment_inside for share in tried),
        "garment_inside_share": shares[-1] if shares else 0.0, "skin": skin.tolist()})
