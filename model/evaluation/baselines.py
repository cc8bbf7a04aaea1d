"""The floor a reconstruction must beat: a slab inflated from the silhouette alone.

Every pixel inside the person's mask becomes a column of solid around the depth z = `centre`,
its half-thickness `thickness` x the pixel's distance to the mask's edge. No image content is
used, so a model that does not beat this has learned nothing about depth from the photo.
The result is an occupancy function for `model.reconstruction.surface`, so the baseline goes through exactly
the extraction, frames and metrics that the network's output goes through.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from model.geometry import sample_features

SLAB_THICKNESS = 0.8  # half-thickness per unit of distance to the mask's edge


def signed_edge_distance(mask: np.ndarray) -> np.ndarray:
    """(S, S) float32 signed distance to the mask's edge in pixels: > 0 inside, < 0 outside."""
    inside = np.asarray(mask, dtype=bool)
    return (distance_transform_edt(inside) - distance_transform_edt(~inside)).astype(np.float32)


def silhouette_slab(mask: np.ndarray, thickness: float = SLAB_THICKNESS, centre: float = 0.0):
    """Occupancy function of the slab inflated from a square (S, S) mask of the network's image.

    The mask covers the image square, so pixel i sits at x = -1 + 2 i / (S - 1) (model.geometry);
    distances are converted to box units by the same 2 / (S - 1). Returns a function
    (N, 3) float32 world points -> (N,) occupancy in [0, 1], 0.5 on the slab's surface, ramping
    over about one pixel so that marching cubes places the surface smoothly.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be a square (S, S) array, not {mask.shape}")
    units_per_pixel = 2.0 / (mask.shape[0] - 1)
    half = torch.from_numpy(signed_edge_distance(mask > 0.5) * (thickness * units_per_pixel))[None, None]

    def occupancy(points: torch.Tensor) -> torch.Tensor:
        xy = (points[:, :2] * torch.tensor([1.0, -1.0])).T[None]  # world y up -> image y down
        h = sample_features(half, xy.float())[0, :, 0]
        margin = h - (points[:, 2].float() - centre).abs()
        return (0.5 + margin / (2 * units_per_pixel)).clamp(0, 1)

    return occupancy
