"""A PNG strip per reconstruction: input | front normals | back normals | mesh front | mesh side.

The input panel carries the outline of the person mask that replaced the background (a mask or
alpha given with the photo, or the person finder's), so a bad cut-out shows at a glance.

The mesh panels are a CPU point-splat render of the vertices (z-buffer, Lambert
shading): dense marching-cubes meshes have a vertex every pixel or so at preview
size, so no rasteriser or GL context is needed on a batch node.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PANEL = 256  # pixels per panel side
OUTLINE = (0, 255, 0)  # colour of the mask outline on the input panel


def _to_panel(image: torch.Tensor | None) -> np.ndarray:
    """(3, S, S) tensor in [-1, 1] -> (PANEL, PANEL, 3) uint8; black if None."""
    if image is None:
        return np.zeros((PANEL, PANEL, 3), np.uint8)
    small = F.interpolate(image[None].float().cpu(), size=(PANEL, PANEL), mode="bilinear", antialias=True, align_corners=False)[0]
    return ((small.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def draw_outline(panel: np.ndarray, mask: torch.Tensor, colour: tuple[int, int, int] = OUTLINE) -> np.ndarray:
    """Draw the boundary of a (1, S, S) mask in [0, 1] (at 0.5) onto a (PANEL, PANEL, 3) uint8 panel (a copy)."""
    small = F.interpolate(mask[None].float().cpu(), size=(PANEL, PANEL), mode="bilinear", antialias=True, align_corners=False)
    inside = (small > 0.5).float()
    # Boundary: inside pixels with an outside pixel among their 3 x 3 neighbours.
    eroded = -F.max_pool2d(-inside, 3, stride=1, padding=1)
    edge = ((inside - eroded)[0, 0] > 0).numpy()
    out = panel.copy()
    out[edge] = colour
    return out


def shaded_splat(vertices: np.ndarray, normals: np.ndarray, yaw_degrees: float, size: int = PANEL) -> np.ndarray:
    """(size, size, 3) uint8 grey render of world-frame vertices seen after a yaw about world y.

    Orthographic over the [-1, 1] box; each vertex covers a 2x2 pixel footprint; the light
    comes from the camera. Background is white.
    """
    canvas = np.full((size, size, 3), 255, np.uint8)
    if len(vertices) == 0:
        return canvas
    angle = np.deg2rad(yaw_degrees)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    v, n = vertices @ rotation.T, normals @ rotation.T
    shade = (40 + 215 * np.clip(n[:, 2], 0, 1)).astype(np.uint8)
    col = np.clip(((v[:, 0] + 1) / 2 * (size - 2)).astype(np.int64), 0, size - 2)
    row = np.clip(((1 - v[:, 1]) / 2 * (size - 2)).astype(np.int64), 0, size - 2)
    depth = np.full(size * size, -np.inf)
    owner = np.full(size * size, -1, np.int64)
    for dr in (0, 1):
        for dc in (0, 1):
            cell = (row + dr) * size + (col + dc)
            np.maximum.at(depth, cell, v[:, 2])
    for dr in (0, 1):
        for dc in (0, 1):
            cell = (row + dr) * size + (col + dc)
            front = v[:, 2] >= depth[cell]
            owner[cell[front]] = np.flatnonzero(front)
    drawn = owner >= 0
    canvas.reshape(-1, 3)[drawn] = shade[owner[drawn], None]
    return canvas


def preview_image(prepared, result) -> Image.Image:
    """The 5-panel strip of one reconstruction (`PreparedImage`, `Reconstruction`)."""
    biggest = max(prepared.images)
    mesh = result.mesh_world
    vertices, normals = np.asarray(mesh.vertices), np.asarray(mesh.vertex_normals)
    source = _to_panel(prepared.images[biggest])
    panels = [
        draw_outline(source, prepared.mask) if prepared.has_segmentation else source,
        _to_panel(result.normal_front),
        _to_panel(result.normal_back),
        shaded_splat(vertices, normals, 0.0),
        shaded_splat(vertices, normals, 90.0),
    ]
    return Image.fromarray(np.concatenate(panels, axis=1))
