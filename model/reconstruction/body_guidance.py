"""A fitted body as the input of a body-guided model (`model.network.config.PIFuHDConfig.body_channels`).

The fitter gives the body in the photo's pixel frame (`model.body.posing`); the network reads it
in its own frame, the crop's [-1, 1] box (`model.geometry.pixel_to_world`). An orthographic
photo fixes no depth, so the body is centred in depth by its own box, as training subjects are by
theirs (the clothed subject's box there: the difference is part of the training noise,
`model.training.augment.BodyNoise`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from model.geometry import Crop, pixel_to_world
from model.reconstruction.preprocess import PreparedImage
from model.render import UNITS_PER_CM
from model.body.field import BODY_DISTANCE_CLIP_CM, BodyField


def body_in_network_frame(vertices_px: np.ndarray, crop: Crop) -> np.ndarray:
    """(V, 3) body vertices in the photo's pixel frame -> (V, 3) float64 in the network frame of
    `crop`, centred in depth by their own box."""
    world = pixel_to_world(vertices_px, crop)
    world[:, 2] -= (world[:, 2].max() + world[:, 2].min()) / 2
    return world


def with_fitted_body(prepared: PreparedImage, landmarks: np.ndarray, world_landmarks: np.ndarray | None,
                     mask: np.ndarray | None, config=None, name: str = "<image>"):
    """(the prepared photo carrying its fitted body, the `BodyFit`). landmarks (33, 3), world_landmarks
    and mask (H, W) as `model.body.fit.fit_body` takes them, in the original photo's pixels.
    Raises UnusableLandmarks (an InputError) when they cannot support a fit."""
    from model.body.fit import FitConfig, fit_body

    size = (prepared.crop.image_width, prepared.crop.image_height)
    fit = fit_body(landmarks, size, mask=mask, world_landmarks=world_landmarks, config=config or FitConfig(), name=name)
    body = body_in_network_frame(fit.vertices, prepared.crop), np.asarray(fit.faces)
    return dataclasses.replace(prepared, body=body), fit


def body_field(prepared: PreparedImage) -> BodyField:
    """The body-guided model's per-point body input for one prepared photo with a fitted body.

    The distance is clipped at BODY_DISTANCE_CLIP_CM of the training data's scale (network units
    of UNITS_PER_CM per cm: the crop frames a person as training views do)."""
    if prepared.body is None:
        raise ValueError(f"{prepared.name}: a body-guided model needs a body fitted to the photo")
    return BodyField(prepared.body, BODY_DISTANCE_CLIP_CM * UNITS_PER_CM)
