"""Camera and pixel-alignment conventions of the network, all in one place.

World frame (the network's own): x right, y up, z toward the camera, the
visible box is [-1, 1]^3. Points travel as (B, 3, N) tensors, rows x, y, z.

Camera: orthographic, a (B, 4, 4) matrix `calib` maps world to image
coordinates, `p_img = calib[:3, :3] @ p + calib[:3, 3]`. The default
diag(1, -1, 1, 1) gives x_img = x, y_img = -y, z_img = z.

Image coordinates are normalised device coordinates with align_corners=True:
(x_img, y_img) = (-1, -1) is the centre of the top-left pixel, (+1, +1) the
centre of the bottom-right one; x_img runs along columns, y_img along rows,
so image row 0 is world y = +1. Features are sampled bilinearly at (x_img,
y_img) with zeros outside. The coarse MLP also sees the depth feature
z_img * (coarse_size // 2) / z_size (1.28 z for the released model).

In-box masks: the coarse occupancy is forced to 0 unless x_img, y_img and
z_img all lie in [-1, 1]; the fine occupancy tests x_img and y_img only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.image.boxes import Box


def default_calib(batch: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
    """(batch, 4, 4) orthographic camera diag(1, -1, 1, 1): flips world y (up) to image y (down)."""
    calib = torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=dtype, device=device))
    return calib.expand(batch, 4, 4)


def project(points: torch.Tensor, calib: torch.Tensor) -> torch.Tensor:
    """World points (B, 3, N) -> image coordinates (B, 3, N) through an orthographic calib (B, 4, 4)."""
    return torch.baddbmm(calib[:, :3, 3:4], calib[:, :3, :3], points)


def sample_features(feature_map: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a (B, C, H, W) map at image coordinates xy (B, 2, N) -> (B, N, C).

    Zero outside the map; align_corners=True as the released model was trained.
    """
    grid = xy.transpose(1, 2).unsqueeze(2)  # (B, N, 1, 2)
    samples = F.grid_sample(feature_map, grid.to(feature_map.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    return samples[..., 0].transpose(1, 2)


def in_box(xyz: torch.Tensor, num_axes: int) -> torch.Tensor:
    """(B, N) bool: the first `num_axes` image coordinates of (B, 3, N) all lie in [-1, 1] (inclusive)."""
    coords = xyz[:, :num_axes]
    return ((coords >= -1) & (coords <= 1)).all(dim=1)


# ---- crop frames: between the network's world frame and the photo's pixel frame -----------------
#
# A photo's person is cut out as a square (`square_crop`) and resized to the network's input size
# S; the network frame is that square's normalised device coordinates (align_corners=True, world
# y up). The *user frame* of the meshes (`world_to_pixel`): x right, y up, z toward the camera, one
# unit = one pixel of the original (EXIF-oriented) image, origin at the image's bottom-left corner:
# (x, y) = (u, H - v), so the centre of pixel (i, j) is (i + 0.5, H - j - 0.5) and an orthographic
# projection of a mesh's (x, y) lands on the person in the photo.


@dataclass(frozen=True)
class Crop:
    """The square cut from the original image, and the size it was resized to.

    x0, y0: top-left corner of the square in continuous pixel coordinates of the
    original image (integers; may be negative or run past the image, which is
    padded with background). side: the square's side in original pixels.
    size: the side S of the resized square that defines the network frame (the
    largest input size). image_width, image_height: the original image's size.
    """

    x0: int
    y0: int
    side: int
    size: int
    image_width: int
    image_height: int

    @classmethod
    def whole_square(cls, size: int) -> Crop:
        """The crop that is a whole size x size image, as renders and stored dataset views are:
        its network frame is the view frame, [-1, 1] across the image."""
        return cls(0, 0, size, size, size, size)

    @property
    def pixels_per_unit(self) -> float:
        """Original pixels per network world unit: side * (S - 1) / (2 S)."""
        return self.side * (self.size - 1) / (2 * self.size)

    @property
    def half_pixel(self) -> float:
        """Distance, in original pixels, from the square's edge to the first resized pixel centre."""
        return self.side / (2 * self.size)


def square_crop(box: Box, *, margin: float, image_width: int, image_height: int, size: int) -> Crop:
    """The square of side ceil(margin x the box's larger side), centred on the box.

    Corners are rounded to whole pixels; the square may run past the image.
    """
    side = max(1, math.ceil(margin * max(box.width, box.height) - 1e-9))
    cx, cy = box.centre
    x0 = math.floor(cx - side / 2 + 0.5)
    y0 = math.floor(cy - side / 2 + 0.5)
    return Crop(x0, y0, side, size, image_width, image_height)


def world_to_pixel(points: np.ndarray, crop: Crop) -> np.ndarray:
    """Network world points (..., 3) -> user-frame points (..., 3), float64.

    User frame: x right, y up, z toward the camera, one unit = one original
    pixel, origin at the original image's bottom-left corner; pixel (i, j)
    (column, row from the top) has its centre at (i + 0.5, H - j - 0.5).
    With s = crop.pixels_per_unit and h = crop.half_pixel:
        x = x0 + h + (x_w + 1) s,   y = H - (y0 + h + (1 - y_w) s),   z = z_w s.
    Accepts anything np.asarray takes (e.g. a CPU tensor).
    """
    points = np.asarray(points, dtype=np.float64)
    s, h = crop.pixels_per_unit, crop.half_pixel
    u = crop.x0 + h + (points[..., 0] + 1) * s
    v = crop.y0 + h + (1 - points[..., 1]) * s  # y_ndc = -y_w
    return np.stack([u, crop.image_height - v, points[..., 2] * s], axis=-1)


def pixel_to_world(points: np.ndarray, crop: Crop) -> np.ndarray:
    """Inverse of `world_to_pixel`: user-frame (..., 3) -> network world (..., 3), float64."""
    points = np.asarray(points, dtype=np.float64)
    s, h = crop.pixels_per_unit, crop.half_pixel
    u = points[..., 0]
    v = crop.image_height - points[..., 1]
    x_w = (u - crop.x0 - h) / s - 1
    y_w = 1 - (v - crop.y0 - h) / s
    return np.stack([x_w, y_w, points[..., 2] / s], axis=-1)
