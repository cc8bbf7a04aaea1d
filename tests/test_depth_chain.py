"""From a training sample to the user's mesh: the geometry the network is trained in and the
geometry inference puts its output in must be one and the same.

The ground-truth occupancy of a rendered subject, pushed through the inference path of a photo
(crop from the alpha, network frame, sparse grid, marching cubes, pixel frame), must give the
ground-truth mesh back; the silhouette baseline must have the mask's outline and its thickness.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from model.evaluation.baselines import silhouette_slab
from model.data.humans import make_subject
from model.evaluation.metrics import surface_metrics
from model.reconstruction.preprocess import prepare_input
from model.geometry import world_to_pixel
from model.reconstruction.reconstruct import ReconstructionConfig, SurfaceSamples, finish
from model.render import View, get_renderer
from model.data.scenes import random_lighting
from model.meshes import winding_inside
from model.reconstruction.surface import evaluate_grid, extract_surface

RENDER = 512
CANVAS = (700, 620)  # width, height of the "photo" the render is pasted into
OFFSET = (90, 40)  # where the render's top-left pixel lands on the canvas


@pytest.fixture(scope="module")
def photo_of_subject(body_model):
    """A subject, its view, and a photo: the render pasted off-centre on a bigger RGBA canvas."""
    subject = make_subject("chain", 5, family="walk")
    view = View(yaw_deg=35.0)
    out = get_renderer(RENDER).render(subject.parts, view, random_lighting(np.random.default_rng(0)), None)
    canvas = np.zeros((CANVAS[1], CANVAS[0], 4), np.uint8)
    canvas[OFFSET[1] : OFFSET[1] + RENDER, OFFSET[0] : OFFSET[0] + RENDER, :3] = out.rgb
    canvas[OFFSET[1] : OFFSET[1] + RENDER, OFFSET[0] : OFFSET[0] + RENDER, 3] = out.mask
    buffer = io.BytesIO()
    Image.fromarray(canvas, "RGBA").save(buffer, format="PNG")
    return subject, view, buffer.getvalue(), out.mask


def view_to_photo_pixels(points: np.ndarray) -> np.ndarray:
    """View-frame points of the render (box units over its square) -> the photo's pixel frame.

    The render's pixel i has its centre at x = -1 + 2 i / (S - 1); on the canvas that pixel is
    column OFFSET[0] + i, whose centre is at user x = OFFSET[0] + i + 0.5 (rows likewise, y up).
    """
    per_unit = (RENDER - 1) / 2
    col = (points[:, 0] + 1) * per_unit
    row = (1 - points[:, 1]) * per_unit
    return np.stack([OFFSET[0] + col + 0.5, CANVAS[1] - (OFFSET[1] + row + 0.5), points[:, 2] * per_unit], 1)


def test_ground_truth_occupancy_through_the_inference_path_gives_the_mesh_back(photo_of_subject):
    subject, view, photo, _ = photo_of_subject
    prepared = prepare_input(photo, name="chain.png", sizes=(256, 512))
    parts_view = [(view.apply(p.vertices.astype(np.float64)), p.faces) for p in subject.parts]
    per_unit = (RENDER - 1) / 2

    def occupancy(points: torch.Tensor) -> torch.Tensor:
        # Network world (of the crop) -> photo pixels -> the render's view frame -> winding number.
        pixels = world_to_pixel(points.numpy(), prepared.crop)
        col = pixels[:, 0] - 0.5 - OFFSET[0]
        row = CANVAS[1] - pixels[:, 1] - 0.5 - OFFSET[1]
        in_view = np.stack([col / per_unit - 1, 1 - row / per_unit, pixels[:, 2] / per_unit], 1)
        return torch.from_numpy(winding_inside(parts_view, in_view).astype(np.float32))

    grid = evaluate_grid(occupancy, resolution=256, method="sparse")
    samples = SurfaceSamples(grid=grid, normal_front=None, normal_back=None, stats={})
    result = finish(samples, prepared, ReconstructionConfig(resolution=256, color="none"))

    truth = trimesh.util.concatenate([trimesh.Trimesh(view_to_photo_pixels(v), f, process=False) for v, f in parts_view])
    cm_per_pixel = 100 * 2 / (RENDER - 1)  # the render's box spans 200 cm over RENDER - 1 pixel steps
    metrics = surface_metrics(result.mesh, truth, num_samples=10_000, scale=cm_per_pixel)
    assert metrics["chamfer"] < 0.5, metrics
    depth = lambda m: np.ptp(np.asarray(m.vertices)[:, 2]) * cm_per_pixel  # noqa: E731
    assert abs(depth(result.mesh) - depth(truth)) < 1.0


def test_silhouette_slab_has_the_outline_and_a_thickness_from_the_edge_distance():
    size = 129
    mask = np.zeros((size, size), bool)
    mask[20:109, 44:85] = True  # 41 columns wide: the centre column is 20.5 px from the edge
    mesh, _ = extract_surface(silhouette_slab(mask, thickness=0.8), resolution=128)
    unit = 2 / (size - 1)
    extent = np.ptp(np.asarray(mesh.vertices), axis=0) / unit  # pixels
    assert abs(extent[0] - 41) < 2.5 and abs(extent[1] - 89) < 2.5
    assert abs(extent[2] - 2 * 0.8 * 20.5) < 3
    assert mesh.is_watertight


@pytest.mark.slow
def test_small_preset_overfits_one_view_with_the_right_depth(body_model):
    """Training sample -> loss -> network -> mesh: one view learnt by heart comes back in cm."""
    from pipelines.common import dataset as fmt, formats
    from pipelines.jobs.data import SampleSettings, subject_rows
    from pipelines.jobs.evaluate import depth_extent
    from model.training.stages import stage_inputs
    from pipelines.jobs.train import TrainConfig, build_stage, to_tensors
    from model.data.sampling import SamplingConfig
    import model

    subject = make_subject("overfit", 11, family="stand")
    settings = SampleSettings(views=1, resolution=512, sampling=SamplingConfig(num_points=8000, num_surface_points=100))
    rows = subject_rows(subject, "train", "synth", np.random.default_rng(3), settings)
    batch = to_tensors(fmt.decode_table(formats.dataset_table(rows)), torch.device("cpu"))
    torch.manual_seed(0)
    net = model.PIFuHD.from_config(model.preset("small"))
    stage = build_stage(net, TrainConfig(stage="coarse", data="unused", out="unused", points_per_sample=4096, grey_composite=0.0))
    optimizer = torch.optim.Adam([p for p in stage.parameters() if p.requires_grad], lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(200):
        if step == 140:  # the last third at a tenth of the rate: the result settles instead of wandering
            for group in optimizer.param_groups:
                group["lr"] = 2e-4
        loss, _ = stage(batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        inputs = stage_inputs(batch, net.config)
        features = net.encode(inputs["coarse"], None, normals=inputs["normals"])
        mesh, _ = extract_surface(lambda p: net.query(features, p.T[None], level="coarse")[0], resolution=128, largest_component=True)
    merged = subject.merged()
    truth = trimesh.Trimesh(merged.vertices, merged.faces, process=False)
    truth.apply_transform(batch["view_from_canonical"][0].numpy().astype(np.float64))
    metrics = surface_metrics(mesh, truth, num_samples=10_000, scale=100.0)
    # The target is 1.5 cm: these 200 steps gave 0.94 cm (seed 2: 1.13 cm; 300 steps at half
    # the rate 0.73 cm; 150 steps 1.17-1.64 cm over three seeds). Without the lower rate the result
    # wandered (up to 1.98 cm); a broken chain gives > 5 cm. The bound catches the latter with room.
    assert metrics["chamfer"] < 2.5, metrics
    # Depth extent of the surface (2nd-98th percentile, as `pifuhd evaluate` reports it): 0.74x the
    # truth's (seed 2: 0.72x; thinner, not yet converged). The bound rules out both failure modes
    # seen: the silhouette-only blob (1.25-1.5x) and the slab (0.4x).
    ratio = depth_extent(mesh) / depth_extent(truth)
    assert 0.65 < ratio < 1.2, ratio
