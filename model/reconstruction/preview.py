"""A PNG strip per reconstruction: input | front normals | back normals | mesh front | mesh side.

The input panel carries the outline of the person mask that replaced the background (a mask or
alpha given with the photo, or the person finder's), so a bad cut-out shows at a glance.

The mesh panels rasterise the mesh with the project's renderer (`model.render`: EGL,
Mesa's software rasteriser where there is no GPU), grey under the fixed studio light.
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


def shaded_mesh(mesh, yaw_degrees: float, size: int = PANEL) -> np.ndarray:
    """(size, size, 3) uint8 grey render of a world-frame mesh (the [-1, 1] box, orthographic)
    seen after a yaw about world y, on white."""
    from model.render import Part
    from model.render import View, get_renderer, studio_lighting

    background = np.full((size, size, 3), 255, np.uint8)
    if len(mesh.faces) == 0:
        return background
    vertices = np.asarray(mesh.vertices, np.float32)
    # The mesh's own (cached) normals: both panels and the vertex colours share one computation.
    part = Part("mesh", vertices, np.asarray(mesh.faces, np.int32), np.full((len(vertices), 3), 0.8, np.float32),
                normals=np.asarray(mesh.vertex_normals, np.float32))
    return get_renderer(size).render([part], View(yaw_degrees, units_per_cm=1.0), studio_lighting(), background).rgb


def preview_image(prepared, result) -> Image.Image:
    """The 5-panel strip of one reconstruction (`PreparedImage`, `Reconstruction`)."""
    biggest = max(prepared.images)
    mesh = result.mesh_world
    source = _to_panel(prepared.images[biggest])
    panels = [
        draw_outline(source, prepared.mask) if prepared.has_segmentation else source,
        _to_panel(result.normal_front),
        _to_panel(result.normal_back),
        shaded_mesh(mesh, 0.0),
        shaded_mesh(mesh, 90.0),
    ]
    return Image.fromarray(np.concatenate(panels, axis=1))
