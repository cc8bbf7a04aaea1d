"""Person boxes in continuous pixel coordinates (top-left origin, u right, v down; pixel (i, j)
covers [i, i+1] x [j, j+1]), and where one comes from: a mask, an alpha channel or keypoints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.image.decode import DecodedImage, unit_scale


DEFAULT_KEYPOINT_THRESHOLD = 0.2  # keypoints at or below this confidence are ignored


KEYPOINT_BODY_PAD = 0.05  # joints -> body: grow their box by this x its larger side, each side


ALPHA_BOX_THRESHOLD = 0.5  # alpha above this counts as person for the box


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in continuous pixel coordinates (top-left origin, pixels)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> Box:
        """Pixel (x, y) is the box's top-left pixel; it spans w x h pixels."""
        return cls(x, y, x + w, y + h)

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def intersects(self, width: int, height: int) -> bool:
        """Whether the box overlaps the image [0, width] x [0, height] with positive area."""
        return self.x0 < width and self.x1 > 0 and self.y0 < height and self.y1 > 0


def box_from_mask(mask: np.ndarray) -> Box | None:
    """(H, W) bool -> the box around its True pixels, or None if there are none."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return Box(float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def box_from_keypoints(points: np.ndarray, pad: float = KEYPOINT_BODY_PAD) -> Box:
    """(K, 2) keypoints (pixel indices) -> an estimate of the whole body's box.

    Joints lie inside the body (eyes below the top of the head, ankles above
    the soles, wrists short of the fingertips), so their box is grown by
    pad x its larger side on every side.
    """
    centres = np.asarray(points, dtype=np.float64)[:, :2] + 0.5
    low, high = centres.min(axis=0), centres.max(axis=0)
    grow = pad * float((high - low).max())
    return Box(low[0] - grow, low[1] - grow, high[0] + grow, high[1] + grow)


# An alpha channel outlines a person only when this share of the image, at least, is transparent:
# a photo saved with a few stray transparent pixels (PIFu's own sample has 45) is an opaque photo.
MIN_TRANSPARENT_SHARE = 0.02


def alpha_is_mask(image: DecodedImage) -> bool:
    """Whether the image's alpha channel outlines a person: it exists, at least `MIN_TRANSPARENT_SHARE`
    of the image is transparent (alpha at or below `ALPHA_BOX_THRESHOLD`), and something is not.
    An all-transparent alpha counts as a mask (of nobody: the caller says so)."""
    if image.alpha is None:
        return False
    transparent = float((image.alpha <= ALPHA_BOX_THRESHOLD * unit_scale(image.alpha)).mean())
    return transparent >= MIN_TRANSPARENT_SHARE
