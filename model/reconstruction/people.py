"""A photo's people -> the network inputs to reconstruct: the person policy of every reconstruction.

`prepare_people` decides whose crop is made: a given mask or alpha (one person), else the person
finder's people (`model.person`), the most prominent one or, with `PersonOptions.all_people`, each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.errors import InputError
from model.image.boxes import DEFAULT_KEYPOINT_THRESHOLD, Box, alpha_is_mask
from model.image.decode import DecodedImage
from model.image.sidecars import sidecar_box
from model.person import Person, PersonFinder
from model.reconstruction.config import PersonOptions
from model.reconstruction.preprocess import PreparedImage, prepare_input



@dataclass(frozen=True)
class PersonInput:
    """One network input made from a photo. person: the found person it shows (None when the
    finder did not run); index: its rank among the people found (0 = most prominent);
    persons_found: how many people the finder found at or above the minimum score (None when
    it did not run)."""

    prepared: PreparedImage
    person: Person | None
    index: int
    persons_found: int | None


def _mask_inside(mask: np.ndarray, box: Box) -> int:
    """Pixels of an (H, W) bool mask inside a box."""
    height, width = mask.shape
    x0, x1 = (int(np.clip(round(v), 0, width)) for v in (box.x0, box.x1))
    y0, y1 = (int(np.clip(round(v), 0, height)) for v in (box.y0, box.y1))
    return int(mask[y0:y1, x0:x1].sum())


def prepare_people(image: DecodedImage, finder: PersonFinder | None, options: PersonOptions, *, name: str, mask=None, rect=None,
                   keypoints=None, **prepare_kwargs) -> list[PersonInput]:
    """A decoded photo (`model.reconstruction.preprocess.DecodedImage`) and its sidecars -> the inputs to reconstruct.

    The finder (needed in mode "auto" only) runs when no mask or alpha is given. With a rect or
    keypoints box, the found person with the most mask pixels inside that box is used (and when
    none is found, the box's crop keeps the photo's background); else the most prominent one, or
    every one with `all_people`. prepare_kwargs go to `prepare_input` (sizes, margin,
    keypoint_threshold, max_pixels).
    Raises InputError when the finder ran, no box was given and no person at or above
    `min_score` was found.
    """
    if options.mode == "off":
        height, width = image.rgb.shape[:2]
        whole = prepare_input(DecodedImage(image.rgb, None), name=name, rect=Box(0, 0, width, height), **prepare_kwargs)
        return [PersonInput(whole, None, 0, None)]
    if options.mode == "sidecar" or mask is not None or alpha_is_mask(image):
        given = prepare_input(image, name=name, mask=mask, rect=rect, keypoints=keypoints, **prepare_kwargs)
        return [PersonInput(given, None, 0, None)]
    if finder is None:
        raise ValueError("person mode 'auto' needs a PersonFinder")

    candidates = finder.find_all(image.rgb)
    found = [p for p in candidates if p.problem is None]
    people = [p for p in found if p.score >= options.min_score]
    box = sidecar_box(rect, keypoints, name, prepare_kwargs.get("keypoint_threshold", DEFAULT_KEYPOINT_THRESHOLD))
    if not people and box is not None:  # the given box still says where the person is: keep its crop as it is
        given = prepare_input(image, name=name, rect=rect, keypoints=keypoints, **prepare_kwargs)
        return [PersonInput(given, None, 0, 0)]
    if not people:
        best = f"; the best score was {max(p.score for p in found):.2f}" if found else ""
        rejected = "".join(f"; a candidate (score {p.score:.2f}) has {p.problem}" for p in candidates if p.problem)
        raise InputError(f"{name}: no person found (none with a score >= {options.min_score}{best}{rejected})")
    if box is not None:
        chosen = [max(range(len(people)), key=lambda k: _mask_inside(people[k].mask, box))]
    else:
        chosen = list(range(len(people))) if options.all_people else [0]
    return [
        PersonInput(
            prepare_input(image, name=name, rect=rect, keypoints=keypoints, person_mask=people[k].mask_soft, **prepare_kwargs),
            people[k], k, len(people),
        )
        for k in chosen
    ]
