"""One prepared photo -> a coloured mesh in the photo's pixel frame.

    prepared image --encode--> features --extract_surface(query)--> mesh (network frame)
        --colour from the photo (visible vertices), nearest visible for hidden ones
        --world_to_pixel--> mesh in the user's frame (x right, y up, z to camera, 1 unit = 1 pixel)

The work splits in two: `sample_surfaces` (everything that needs the network: batched
encoding and occupancy queries) and `finish` (marching cubes, colours, frames: CPU only),
so the bulk pipeline can run them in different stages; `reconstruct` runs both.
"""

from __future__ import annotations

import functools
import io
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from trimesh.smoothing import filter_taubin
from scipy import ndimage

from model.meshes import vertex_normals
from model.geometry import sample_features
from model.network.pifuhd import PIFuHD
from model.reconstruction.preprocess import PreparedImage
from model.geometry import world_to_pixel
from model.reconstruction.preview import preview_image
from model.reconstruction.config import MESH_FORMATS, ReconstructionConfig
from model.reconstruction.surface import evaluate_grid, mesh_from_grid

CARVE_MARGIN = 0.004  # of the crop's side (4 pixels at 1024): the mask's edge is soft and may be a little tight


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (avx512_bf16 or AMX; read from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolved_precision(precision: str, device: torch.device) -> str:
    """ "fp32" or "bf16" for a ReconstructionConfig.precision on `device` ("auto" decided here)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


@dataclass
class Reconstruction:
    """mesh: in the user's pixel frame. mesh_world: the same in the network frame.
    normal_front / normal_back: (3, S, S) predicted normal maps in [-1, 1] (None if unused).
    stats: seconds per phase, points evaluated, vertex and face counts."""

    mesh: trimesh.Trimesh
    mesh_world: trimesh.Trimesh
    normal_front: torch.Tensor | None
    normal_back: torch.Tensor | None
    stats: dict = field(default_factory=dict)


@dataclass
class SurfaceSamples:
    """What the model stage hands to the meshing stage for one image (picklable, no network).

    grid: the evaluated occupancy grid (`model.reconstruction.surface`). normal_front / normal_back:
    (3, S, S) predicted normal maps, or None. stats: seconds_encode, seconds_surface,
    points_evaluated.
    """

    grid: object
    normal_front: torch.Tensor | None
    normal_back: torch.Tensor | None
    stats: dict
    smooth_iterations: int = 0  # Taubin steps the mesh gets (`ReconstructionConfig.smooth_iterations`, resolved)


def _device_of(net: PIFuHD) -> torch.device:
    return next(net.parameters()).device


def occupancy_function(net: PIFuHD, features, body=None, silhouette: torch.Tensor | None = None):
    """(N, 3) world points -> (N,) fine occupancy of one image's features, for `model.reconstruction.surface`.
    body: a body-guided model's `model.body.field.BodyField` of the image's fitted body.
    silhouette: (1, S, S) person mask in [0, 1] over the crop, or None. Points seen outside it (it
    dilated by CARVE_MARGIN of the crop) are outside the person, whatever the network says: the
    camera is orthographic, so the mask is the person's exact shadow. They are not queried."""
    device = _device_of(net)
    if silhouette is not None:
        margin = max(1, round(CARVE_MARGIN * silhouette.shape[-1]))
        silhouette = F.max_pool2d(silhouette[None].float().cpu(), 2 * margin + 1, stride=1, padding=margin)

    def occupancy(points: torch.Tensor) -> torch.Tensor:
        if silhouette is not None:
            xy = (points[:, :2] * torch.tensor([1.0, -1.0])).T[None]  # world y up -> image rows down
            inside = sample_features(silhouette, xy.float())[0, :, 0] > 0.5
            values = torch.zeros(len(points))
            if inside.any():
                values[inside] = occupancy_of(points[inside])
            return values
        return occupancy_of(points)

    def occupancy_of(points: torch.Tensor) -> torch.Tensor:
        points = points.to(device)
        body_input = None if body is None else body.network_input(points)
        return net.query(features, points.T[None], body=body_input)[0].float().cpu()

    return occupancy


def surface_level(net: PIFuHD) -> float:
    """The occupancy level `net`'s surface is extracted at: its checkpoint's `surface_level`
    (calibrated on held-out views, `pipelines.jobs.calibrate`), else 0.5."""
    return float(getattr(net, "checkpoint_metadata", {}).get("surface_level", 0.5))


def mesh_smoothing(net: PIFuHD) -> int:
    """The Taubin smoothing steps `net`'s meshes get: its checkpoint's `smooth_iterations` (chosen on
    the real and synthetic validation rows, docs/model-card.md), else 0."""
    return int(getattr(net, "checkpoint_metadata", {}).get("smooth_iterations", 0))


def memory_layout(bf16: bool) -> torch.memory_format:
    """The layout of the network's convolutions: bf16 ones run ~25 % faster channels-last
    (benchmarks/network.py)."""
    return torch.channels_last if bf16 else torch.contiguous_format


def use_layout(net: PIFuHD, layout: torch.memory_format) -> None:
    """Lay the network's 4-D weights out in `layout` unless they are already (same values)."""
    weight = next(p for p in net.parameters() if p.dim() == 4)
    if not weight.is_contiguous(memory_format=layout):
        net.to(memory_format=layout)


def sample_surfaces(net: PIFuHD, prepared: list[PreparedImage], config: ReconstructionConfig) -> list[SurfaceSamples]:
    """Encode a batch of prepared images in one pass, then evaluate each one's occupancy grid.

    This is all the work that needs the network (the GPU, when there is one). A body-guided model
    reads each image's fitted body (`PreparedImage.body`, required).
    """
    device = _device_of(net)
    bodies = [None] * len(prepared)
    if net.config.body_guided:
        from model.reconstruction.body_guidance import body_field

        bodies = [body_field(p) for p in prepared]
    silhouettes = [p.mask if config.carve and p.has_segmentation else None for p in prepared]
    bf16 = resolved_precision(config.precision, device) == "bf16"
    layout = memory_layout(bf16)
    use_layout(net, layout)  # once per network; the images per call
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        coarse = torch.stack([p.images[net.config.coarse_size] for p in prepared]).to(device, memory_format=layout)
        fine = torch.stack([p.images[net.config.fine_size] for p in prepared]).to(device, memory_format=layout)
        features = net.encode(coarse, fine)
        encode_seconds = (time.perf_counter() - start) / len(prepared)
        samples = []
        for index in range(len(prepared)):
            one = features.select(index)
            start = time.perf_counter()
            grid = evaluate_grid(
                occupancy_function(net, one, bodies[index], silhouettes[index]),
                resolution=config.resolution,
                method=config.method,
                threshold=config.threshold if config.threshold is not None else surface_level(net),
                batch_points=config.batch_points,
                dilation=config.dilation,
            )
            grid.detach()
            samples.append(
                SurfaceSamples(
                    grid=grid,
                    normal_front=None if one.normal_front is None else one.normal_front[0].cpu(),
                    normal_back=None if one.normal_back is None else one.normal_back[0].cpu(),
                    stats={
                        "seconds_encode": encode_seconds,
                        "seconds_surface": time.perf_counter() - start,
                        "points_evaluated": int(grid.stats["points_evaluated"]),
                    },
                    smooth_iterations=config.smooth_iterations if config.smooth_iterations is not None else mesh_smoothing(net),
                )
            )
    return samples


def image_vertex_colors(vertices: np.ndarray, image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """(V, 4) uint8 RGBA colours of world-frame vertices (V, 3) from the (3, S, S) crop image in [-1, 1].

    Only the person's pixels give colour: outside the (1, M, M) person mask's fully opaque part each
    pixel takes the colour of the nearest pixel inside it, so the background never bleeds in at the outline. Every
    vertex samples the image where it projects, the back included: the unseen side is the seen one
    mirrored through depth (shirt behind shirt, trousers behind trousers). Against the albedo, the
    back's error fell from 45.0 to 42.8 (12 synthetic views) and from 31.1 to 27.5 (12 statue views)
    when this replaced copying the nearest visible vertex's colour (benchmarks/colour.py).
    """
    if len(vertices) == 0:
        return np.zeros((0, 4), np.uint8)
    # Fully inside only: the crop image is the photo blended over grey by the mask, so edge pixels are part grey.
    inside = F.interpolate(mask[None].float().cpu(), size=image.shape[-2:], mode="bilinear", align_corners=True)[0, 0].numpy() > 0.98
    if inside.any() and not inside.all():
        rows, cols = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
        image = image.float().cpu()[:, torch.from_numpy(rows), torch.from_numpy(cols)]
    xy = torch.from_numpy(vertices[:, :2] * [1, -1]).float().T[None]  # image coordinates
    sampled = sample_features(image[None].float().cpu(), xy)[0].numpy()  # (V, 3) in [-1, 1]
    rgb = np.clip((sampled + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return np.concatenate((rgb, np.full((len(rgb), 1), 255, np.uint8)), axis=1)


def normal_vertex_colors(normals: np.ndarray) -> np.ndarray:
    """(V, 4) uint8 RGBA: unit normals mapped from [-1, 1] to [0, 255], as the official output."""
    rgb = np.clip((normals * 0.5 + 0.5) * 255, 0, 255).round().astype(np.uint8)
    return np.concatenate((rgb, np.full((len(rgb), 1), 255, np.uint8)), axis=1)


def finish(samples: SurfaceSamples, prepared: PreparedImage, config: ReconstructionConfig) -> Reconstruction:
    """Marching cubes, vertex colours and the user's frame: the CPU-only part of `reconstruct`."""
    start = time.perf_counter()
    mesh_world, mesh_stats = mesh_from_grid(samples.grid, largest_component=config.largest_component)
    if samples.smooth_iterations and len(mesh_world.faces):
        filter_taubin(mesh_world, iterations=samples.smooth_iterations)
    vertices = np.asarray(mesh_world.vertices)
    # Area-weighted normals, cached on the mesh for the colours and the preview (trimesh's own
    # took 0.23 s at 512 against 0.06 s).
    normals = vertex_normals(vertices, np.asarray(mesh_world.faces))
    if len(vertices):  # trimesh refuses to cache an empty array
        mesh_world.vertex_normals = normals
    if config.color == "image":
        fine_image = prepared.images[max(prepared.images)]
        colors = image_vertex_colors(vertices, fine_image, prepared.mask)
    elif config.color == "normal":
        colors = normal_vertex_colors(normals)
    else:
        colors = None
    if colors is not None:
        mesh_world.visual.vertex_colors = colors
    mesh = trimesh.Trimesh(world_to_pixel(vertices, prepared.crop), np.asarray(mesh_world.faces), process=False)
    if colors is not None:
        mesh.visual.vertex_colors = colors
    stats = dict(samples.stats, seconds_mesh=time.perf_counter() - start, vertices=len(mesh.vertices), faces=len(mesh.faces))
    return Reconstruction(mesh, mesh_world, samples.normal_front, samples.normal_back, stats)


def reconstruct(net: PIFuHD, prepared: PreparedImage, config: ReconstructionConfig = ReconstructionConfig()) -> Reconstruction:
    """Mesh one prepared photo with `net` (eval mode): `sample_surfaces` then `finish`."""
    return finish(sample_surfaces(net, [prepared], config)[0], prepared, config)


def encode_outputs(result: Reconstruction, prepared: PreparedImage, mesh_format: str = "obj") -> dict[str, bytes]:
    """The files of one reconstruction as bytes: {"mesh": <mesh in mesh_format>, "preview": <PNG>}.

    Bytes, not paths, so the local command and the bulk job write them to any filesystem.
    """
    if mesh_format not in MESH_FORMATS:
        raise ValueError(f"mesh format must be one of {MESH_FORMATS}, not {mesh_format!r}")
    mesh = obj_bytes(result.mesh) if mesh_format == "obj" else result.mesh.export(file_type=mesh_format)
    buffer = io.BytesIO()
    preview_image(prepared, result).save(buffer, format="PNG")
    return {"mesh": mesh, "preview": buffer.getvalue()}


def obj_bytes(mesh: trimesh.Trimesh) -> bytes:
    """Wavefront OBJ of a triangle mesh: `v x y z [r g b]` (colours in [0, 1], as trimesh and MeshLab
    read them) and `f a b c` (1-based). trimesh writes the same lines with str.format per value,
    which at 512 (270k vertices) took 1.2 s; one %-format over all values takes about half that."""
    vertices = np.asarray(mesh.vertices, np.float64)
    line = "v %.6f %.6f %.6f"
    if mesh.visual.kind == "vertex":
        vertices = np.hstack([vertices, np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0])
        line += " %.4f %.4f %.4f"
    faces = (np.asarray(mesh.faces, np.int64) + 1).ravel().tolist()  # Python ints format ~1.5x faster than numpy's
    text = (line + "\n") * len(vertices) % tuple(vertices.ravel()) + "f %d %d %d\n" * (len(faces) // 3) % tuple(faces)
    return text.encode()
