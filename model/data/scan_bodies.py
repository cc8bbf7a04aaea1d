"""The body under a scan's clothes: anny fitted to a front render of the scan.

A scan brings no body, but a body-guided model trains on one. The scan is rendered from the
front (yaw 0: scans face +z, `model.data.scans`), the person finder reads its landmarks, and the
fitter matches them and the render's exact mask (`model.body.fit`). The fitted body comes back
in the scan's canonical frame (cm, y up, facing +z, centred). An orthographic view fixes no
depth: the body's depth range is centred on the scan's, as `model.reconstruction.body_guidance` does at
inference, so a training row's body carries the same kind of depth error as a fitted photo's.
"""

from __future__ import annotations

import numpy as np
import trimesh

from model.body.fit import BodyFit, FitConfig, UnusableLandmarks, fit_body
from model.render import Part
from model.data.humans import Subject
from model.geometry import Crop, pixel_to_world
from model.render import View, get_renderer, studio_lighting

RENDER_SIZE = 512  # the person finder works at 256; the mask term at 128
BACKGROUND_GREY = 128
BODY_COLOR = (0.8, 0.65, 0.55)


def fit_scan_body(subject: Subject, finder, config: FitConfig = FitConfig(), view: View = View(0.0)) -> tuple[Part, BodyFit]:
    """(the body as a Part in the subject's canonical frame, cm; the `BodyFit` in the render's pixels).

    finder: a `model.person.PersonFinder`. Raises UnusableLandmarks (an InputError) when no person is
    found in the render or the landmarks cannot support a fit."""
    size = RENDER_SIZE
    background = np.full((size, size, 3), BACKGROUND_GREY, np.uint8)
    render = get_renderer(size).render(subject.parts, view, studio_lighting(), background)
    people = finder.find(render.rgb)
    if not people:
        raise UnusableLandmarks(f"{subject.subject_id}: no person found in the scan's front render")
    mask = render.mask > 127
    fit = fit_body(people[0].landmarks, (size, size), mask=mask, world_landmarks=people[0].world_landmarks,
                   config=config, name=subject.subject_id)
    # Render pixels -> view frame (box units): the render frames the view's [-1, 1] square.
    in_view = pixel_to_world(fit.vertices, Crop.whole_square(size))
    scan_depth = view.apply(np.concatenate([p.vertices for p in subject.parts]).astype(np.float64))[:, 2]
    in_view[:, 2] += (scan_depth.max() + scan_depth.min() - in_view[:, 2].max() - in_view[:, 2].min()) / 2
    canonical = trimesh.transform_points(in_view, np.linalg.inv(view.world_from_canonical()))
    colors = np.tile(np.asarray(BODY_COLOR, np.float32), (len(canonical), 1))
    return Part("anny", canonical.astype(np.float32), np.asarray(fit.faces, np.int32), colors), fit
