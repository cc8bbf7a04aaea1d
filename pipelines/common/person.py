"""Where a job's body fit gets the person from: a keypoints sidecar, or the person finder.

One function, `find_person`, for every job that fits a body (`pifuhd fit`, the body-guided bulk
reconstruction): landmarks from a `NAME_keypoints.json` sidecar (MediaPipe-33 or OpenPose BODY_25,
see `model.body.landmarks`) when there is one, else the person finder (`model.person`); the mask
from `NAME_mask.png`, the image's alpha, or the finder. `person_finder` loads the finder once per
worker process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from model.errors import InputError


@dataclass(frozen=True)
class BodyLandmarks:
    """What the fitter needs from the person finder: landmarks (33, 3), world landmarks (33, 3) or
    None, the person mask (H, W) bool or None, and where the landmarks came from."""

    landmarks: np.ndarray
    world_landmarks: np.ndarray | None
    mask: np.ndarray | None
    source: str


@functools.lru_cache(maxsize=1)
def person_finder():
    """The person finder, loaded once per worker process."""
    from model.person import PersonFinder

    return PersonFinder()


def find_person(image_bytes: bytes, sidecars: dict[str, bytes | None], name: str, max_pixels: int,
                finder=None) -> tuple[BodyLandmarks, tuple[int, int]]:
    """The landmark source of the job: one photo (and its sidecars) -> (BodyLandmarks, (width, height)).

    Landmarks from a `NAME_keypoints.json` sidecar when there is one (MediaPipe-33 or OpenPose
    BODY_25), else from the person finder (`finder`, default the worker's `person_finder()`: the most
    prominent person's 33 landmarks, world landmarks and mask). The mask: `NAME_mask.*`, else the alpha
    channel, else the finder's.
    """
    from model.body.landmarks import parse_body_keypoints
    from model.image.boxes import ALPHA_BOX_THRESHOLD, alpha_is_mask
    from model.image.decode import load_image, load_mask

    image = load_image(image_bytes, name, max_pixels=max_pixels)
    height, width = image.rgb.shape[:2]
    mask = None
    if sidecars.get("mask") is not None:
        mask = load_mask(sidecars["mask"], f"mask for {name}", max_pixels=max_pixels)
    elif alpha_is_mask(image):
        mask = image.alpha > ALPHA_BOX_THRESHOLD
    if mask is not None and mask.shape != (height, width):
        raise InputError(f"mask for {name}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
    if sidecars.get("keypoints") is not None:
        keypoints = parse_body_keypoints(sidecars["keypoints"], f"keypoints for {name}")
        return BodyLandmarks(keypoints.landmarks, keypoints.world_landmarks, mask, f"sidecar {keypoints.layout}"), (width, height)
    people = (finder or person_finder()).find(image.rgb)
    if not people:
        raise InputError(f"{name}: no person found (and no NAME_keypoints.json beside it)")
    found = people[0]  # the most prominent
    person = BodyLandmarks(found.landmarks, found.world_landmarks, found.mask if mask is None else mask, "person finder")
    return person, (width, height)
