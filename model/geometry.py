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

import torch
import torch.nn.functional as F


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
