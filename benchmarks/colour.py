"""Colour of the reconstructed surface against the truth's albedo, front and back, beside the old colouring.

    .venv/bin/python benchmarks/colour.py --data DATASET [--data DATASET ...] [--views 12] [--resolution 128]

Each test view of each dataset is meshed once by the shipped plain model (colour is post-hoc: both
colourings see the same mesh). The product's colouring (`image_vertex_colors`: person pixels only,
the back mirrored from the front) is compared with the baseline it replaced: each vertex that faces
the camera and is front-most in its z-buffer cell samples the raw crop image, every other vertex takes
the colour of the nearest such vertex. Error: mean absolute difference (0-255) between a vertex's
colour and the albedo of the nearest ground-truth vertex, after a per-channel gain fitted on the front
vertices (the renders are lit, the albedo is not); front = vertex normal toward the camera.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def nearest_visible_colours(vertices: np.ndarray, normals: np.ndarray, image, depth_grid: int = 512) -> np.ndarray:
    """The baseline: (V, 3) in [0, 255] from the raw image; hidden vertices copy the nearest visible one."""
    import torch
    from scipy.spatial import cKDTree

    from model.geometry import sample_features

    xy_pixel = np.clip(((vertices[:, :2] * [1, -1] + 1) / 2 * (depth_grid - 1)).round().astype(np.int64), 0, depth_grid - 1)
    cell = xy_pixel[:, 1] * depth_grid + xy_pixel[:, 0]
    front_z = np.full(depth_grid * depth_grid, -np.inf)
    np.maximum.at(front_z, cell, vertices[:, 2])
    visible = (vertices[:, 2] >= front_z[cell] - 4.0 / depth_grid) & (normals[:, 2] > 0)
    xy = torch.from_numpy(vertices[:, :2] * [1, -1]).float().T[None]
    sampled = sample_features(image[None].float(), xy)[0].numpy()
    colours = sampled.copy()
    hidden = np.flatnonzero(~visible)
    if len(hidden) and visible.any():
        colours[hidden] = sampled[visible][cKDTree(vertices[visible]).query(vertices[hidden])[1]]
    return np.clip((colours + 1) * 127.5, 0, 255)


def main() -> None:
    import trimesh
    from scipy.spatial import cKDTree

    from model.network.checkpoint import load_checkpoint
    from model.reconstruction.reconstruct import ReconstructionConfig, image_vertex_colors, reconstruct
    from pipelines.common import storage
    from pipelines.common.checkpoints import SHIPPED_PLAIN_CHECKPOINT
    from pipelines.jobs.evaluate import stored_view
    from pipelines.jobs.evaluation_pairs import checkpoint_items

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--views", type=int, default=12, help="test views per dataset")
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args()
    net = load_checkpoint(str(SHIPPED_PLAIN_CHECKPOINT)).eval()
    for data in args.data:
        errors: dict[str, list[tuple[float, float]]] = {"nearest visible vertex (before)": [], "person pixels, mirrored back": []}
        items = checkpoint_items(data, "test")[: args.views]
        for item in items:
            view, _, prepared = stored_view(item, net.config.coarse_size, net.config.fine_size)
            result = reconstruct(net, prepared, ReconstructionConfig(resolution=args.resolution, color="none"))
            vertices, normals = np.asarray(result.mesh_world.vertices), np.asarray(result.mesh_world.vertex_normals)
            truth = trimesh.load(io.BytesIO(storage.read_bytes(item["gt_uri"])), file_type="ply", process=False)
            truth_vertices = trimesh.transform_points(np.asarray(truth.vertices), view["view_from_canonical"])
            albedo = np.asarray(truth.visual.vertex_colors)[:, :3].astype(float)[cKDTree(truth_vertices).query(vertices)[1]]
            image = prepared.images[max(prepared.images)]
            front = normals[:, 2] > 0
            for name, colours in zip(errors, (nearest_visible_colours(vertices, normals, image),
                                              image_vertex_colors(vertices, image, prepared.mask)[:, :3].astype(float))):
                gain = (colours[front] * albedo[front]).sum(0) / np.maximum((colours[front] ** 2).sum(0), 1.0)
                error = np.abs(colours * gain - albedo).mean(1)
                errors[name].append((error[front].mean(), error[~front].mean()))
        print(f"{data}: {len(items)} test views, colour error against the albedo (0-255), front / back")
        for name, values in errors.items():
            front_error, back_error = np.mean(values, axis=0)
            print(f"  {name:34s} {front_error:6.1f} {back_error:6.1f}")


if __name__ == "__main__":
    main()
