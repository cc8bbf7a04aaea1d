"""Known bodies: a naked anny body drawn from a seed and rendered, with its true landmarks.

`rendered_body(seed, family, yaw)` draws a phenotype and a pose with the synthetic-data generator's
own samplers (`model.data.humans`), renders the bare body with the project's renderer and returns what a
person finder would give for that image (mask, landmarks = the true landmarks projected,
world landmarks) together with the true body in the pixel frame, so a fit can be scored in cm.

Frames. The body goes anny (metres) -> canonical (cm, y up, facing +z, bounding box centred)
-> view frame (`model.render.View`, 0.01 units per cm) -> pixel frame of the S x S image (the view
frame's [-1, 1] box maps onto the image with align_corners pixel centres, as the renderer draws it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import model.body.landmarks as lm
from model.geometry import Crop, world_to_pixel


@dataclass
class RenderedBody:
    """One rendered true body. Arrays: image (S, S, 3) uint8, mask (S, S) bool, landmarks (33, 3)
    continuous pixels + visibility, world_landmarks (33, 3) m (MediaPipe axes, hips-centred),
    vertices (V, 3) pixel frame, faces (F, 3); pixels_per_cm converts pixel-frame distances to cm."""

    image: np.ndarray
    mask: np.ndarray
    landmarks: np.ndarray
    world_landmarks: np.ndarray
    vertices: np.ndarray
    faces: np.ndarray
    pixels_per_cm: float
    phenotype: dict
    family: str


def true_body(seed: int, family: str):
    """(vertices (V, 3) m, landmarks (33, 3) m, phenotype) of seed's body in anny's frame."""
    import torch

    from model.data.humans import HumanConfig, sample_phenotype, sample_pose
    from model.body.anny import load_body_model

    body = load_body_model()
    rng = np.random.default_rng(seed)
    phenotype = sample_phenotype(rng, HumanConfig())
    with torch.no_grad():
        rest = body.anny(phenotype_kwargs=phenotype)
        pose = sample_pose(rng, family, rest["rest_bone_heads"][0].numpy().astype(np.float64), body)
        out = body.anny(pose_parameters=pose, phenotype_kwargs=phenotype)
        points = lm.anny_landmarks().on_mesh(out["vertices"], out["bone_poses"][:, :, :3, 3])
    return out["vertices"][0].double().numpy(), points[0].double().numpy(), phenotype


def _view_landmarks(points_view: np.ndarray, crop: Crop, hidden: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Anny's 33 landmark points in the view frame -> ((33, 3) image pixels + visibility, (33, 3) world pose).

    Image y runs down (pixel frame y up); `hidden` landmarks get visibility 0. World pose: metres
    (view units are 0.01 per cm), MediaPipe's axes (y down, z away), centred between the hips.
    """
    points_px = world_to_pixel(points_view, crop)
    landmarks = np.zeros((lm.COUNT, 3), np.float32)
    landmarks[:, 0], landmarks[:, 1] = points_px[:, 0], crop.image_height - points_px[:, 1]
    landmarks[:, 2] = lm.anny_landmarks().defined
    landmarks[[lm.INDEX[n] for n in hidden], 2] = 0.0
    world = points_view * np.array([1.0, -1.0, -1.0])
    world -= world[list(lm.HIPS)].mean(0)
    return landmarks, world.astype(np.float32)


def rendered_body(seed: int, family: str = "stand", yaw_deg: float = 0.0, size: int = 512) -> RenderedBody:
    """Render seed's bare body seen from `yaw_deg` at size x size pixels (see the module docstring)."""
    from model.body.anny import ANNY_TO_CANONICAL, load_body_model
    from model.render import Part
    from model.render import View, get_renderer, studio_lighting

    body = load_body_model()
    vertices_m, points_m, phenotype = true_body(seed, family)
    canonical = vertices_m * 100 @ ANNY_TO_CANONICAL.T
    centre = (canonical.min(0) + canonical.max(0)) / 2
    view = View(yaw_deg=yaw_deg)
    to_view = lambda m: view.apply(m * 100 @ ANNY_TO_CANONICAL.T - centre)  # noqa: E731
    skin = np.full((len(canonical), 3), 0.8, np.float32)
    part = Part("body", (canonical - centre).astype(np.float32), body.faces.astype(np.int32), skin)
    lighting = studio_lighting()
    render = get_renderer(size).render([part], view, lighting)

    crop = Crop.whole_square(size)
    vertices_px = world_to_pixel(to_view(vertices_m), crop)
    hidden = ("nose", "left_eye", "right_eye") if abs(((yaw_deg + 180) % 360) - 180) > 120 else ()  # seen from behind
    landmarks, world = _view_landmarks(to_view(points_m), crop, hidden)
    return RenderedBody(
        image=render.rgb,
        mask=render.mask > 127,
        landmarks=landmarks,
        world_landmarks=world,
        vertices=vertices_px,
        faces=body.faces,
        pixels_per_cm=crop.pixels_per_unit * view.units_per_cm,
        phenotype=phenotype,
        family=family,
    )


def rendered_subject(seed: int, yaw_deg: float = 0.0, size: int = 512, family: str | None = None) -> RenderedBody:
    """A clothed synthetic subject (`model.data.humans.make_subject`, of `family` if given, else the
    seed's draw) rendered like `rendered_body`.

    `vertices`/`faces` are the clothed surface (all parts merged) in the pixel frame; landmarks are
    anny's regressor applied to the dressed body (same topology as the bare one; the eyes, which
    need bones, are marked invisible). phenotype and family come from the subject's record.
    """
    import torch

    from model.data.humans import make_subject
    from model.render import View, get_renderer, studio_lighting

    subject = make_subject(f"subject-{seed}", seed, family=family)
    view = View(yaw_deg=yaw_deg)
    lighting = studio_lighting()
    render = get_renderer(size).render(subject.parts, view, lighting)
    crop = Crop.whole_square(size)
    merged = subject.merged()
    regress = lm.anny_landmarks()
    dressed = torch.tensor(subject.parts[0].vertices, dtype=torch.float32)[None]
    with torch.no_grad():
        points_cm = regress.on_mesh(dressed, torch.zeros(1, int(regress.bones.max()) + 1, 3))[0].double().numpy()
    landmarks, world = _view_landmarks(view.apply(points_cm), crop, ("left_eye", "right_eye"))
    return RenderedBody(
        image=render.rgb,
        mask=render.mask > 127,
        landmarks=landmarks,
        world_landmarks=world,
        vertices=world_to_pixel(view.apply(merged.vertices.astype(np.float64)), crop),
        faces=merged.faces.astype(np.int64),
        pixels_per_cm=crop.pixels_per_unit * view.units_per_cm,
        phenotype=subject.info["phenotype"],
        family=subject.info["family"],
    )


def vertex_error_cm(fitted: np.ndarray, truth: np.ndarray, pixels_per_cm: float) -> float:
    """Mean distance (cm) between corresponding pixel-frame vertices (V, 3) after depth alignment
    (an orthographic photo fixes no depth: the fitted body is shifted along z to the truth's mean)."""
    shifted = fitted.copy()
    shifted[:, 2] += truth[:, 2].mean() - fitted[:, 2].mean()
    return float(np.linalg.norm(shifted - truth, axis=1).mean() / pixels_per_cm)
