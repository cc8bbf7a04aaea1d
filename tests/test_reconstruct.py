"""Image -> mesh: the fixture volume, frames, colours, exports and the local command."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from model.reconstruction.preprocess import prepare_image_file
from model.reconstruction.reconstruct import (ReconstructionConfig, SurfaceSamples, encode_outputs, finish, obj_bytes,
                                              reconstruct)
from model.reconstruction.surface import evaluate_grid
from tests.helpers import alpha_box, person_image, tiny_network, write_tiny_checkpoint


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_fixture_network_matches_volume64_signs(reference_net, reference_features, reference_outputs, method):
    def occupancy(points):
        return reference_net.query(reference_features, points.T[None])[0]

    # The fixture's random network is spatial noise: islands smaller than a coarse cell are found
    # by the ring of the MonoPort scheme (dilation 1), not by following the surface alone.
    with torch.inference_mode():
        grid = evaluate_grid(occupancy, resolution=64, method=method, dilation=1)
    ours = grid.dense()  # (65, 65, 65), sample (i, j, k) at -1 + (i, j, k) / 32
    # The fixture's j runs down the image (world y = 1 - j / 32): our y index is 64 - j.
    ours = ours[:64, 64:0:-1, :64]
    expected = reference_outputs["volume64"].float().numpy()
    agreement = ((ours > 0.5) == (expected > 0.5)).mean()
    assert agreement >= 0.995, agreement
    if method == "dense":
        assert np.abs(ours - expected).max() <= 1e-3


def _sphere_samples(radius=0.5, resolution=64):
    def occupancy(points):
        return (points.norm(dim=1) < radius).float()

    grid = evaluate_grid(occupancy, resolution=resolution, method="sparse")
    grid.detach()
    return SurfaceSamples(grid=grid, normal_front=None, normal_back=None,
                          stats={"seconds_encode": 0.0, "seconds_surface": 0.0, "points_evaluated": 0})


def test_mesh_lands_on_the_person_in_pixel_frame(tmp_path):
    path = person_image(tmp_path / "p.png", size=(300, 450))
    prepared = prepare_image_file(path, sizes=(128, 256))
    result = finish(_sphere_samples(), prepared, ReconstructionConfig(resolution=64, color="none"))
    x0, y0, x1, y1 = alpha_box(path)
    centre = result.mesh.bounds.mean(axis=0)
    # The world origin is the centre of the person box; user y runs up from the bottom edge.
    assert abs(centre[0] - (x0 + x1) / 2) < 2.0
    assert abs(centre[1] - (450 - (y0 + y1) / 2)) < 2.0
    # A world radius of 0.5 spans half the crop's half-side, in pixels.
    radius = (result.mesh.bounds[1] - result.mesh.bounds[0]) / 2
    expected = 0.5 * prepared.crop.pixels_per_unit
    assert np.allclose(radius, expected, rtol=0.05)
    assert result.mesh.is_watertight and result.mesh.volume > 0


def test_smoothing_evens_the_voxel_steps_and_keeps_the_size(tmp_path):
    """Taubin steps (the checkpoint's `smooth_iterations`, or --smooth) lower the angle between
    neighbouring faces of a voxelised sphere without shrinking it; none for a checkpoint that names none."""
    import dataclasses

    from model.evaluation.metrics import roughness_deg
    from model.reconstruction.reconstruct import mesh_smoothing

    prepared = prepare_image_file(person_image(tmp_path / "p.png"), sizes=(128, 256))
    config = ReconstructionConfig(resolution=64, color="none")
    plain = finish(_sphere_samples(), prepared, config).mesh_world
    smoothed = finish(dataclasses.replace(_sphere_samples(), smooth_iterations=10), prepared, config).mesh_world
    def roughness(mesh):
        return roughness_deg(np.asarray(mesh.vertices), np.asarray(mesh.vertex_normals))

    assert roughness(smoothed) < 0.7 * roughness(plain)
    assert abs(smoothed.volume / plain.volume - 1) < 0.03 and smoothed.is_watertight

    class Network:  # what mesh_smoothing reads of a loaded checkpoint
        checkpoint_metadata = {"smooth_iterations": 10}

    assert mesh_smoothing(Network()) == 10 and mesh_smoothing(object()) == 0


def test_vertex_colours_come_from_the_visible_image(tmp_path):
    # Left half red, right half blue: the sphere's front takes those colours, its back the same, mirrored.
    image = np.zeros((256, 256, 3), np.uint8)
    image[:, :128] = (255, 0, 0)
    image[:, 128:] = (0, 0, 255)
    path = tmp_path / "halves.png"
    Image.fromarray(image).save(path)
    (tmp_path / "halves_rect.txt").write_text("0 0 256 256")
    prepared = prepare_image_file(path, sizes=(128, 256))
    result = finish(_sphere_samples(), prepared, ReconstructionConfig(resolution=64, color="image"))
    colors = result.mesh.visual.vertex_colors[:, :3].astype(int)
    x = result.mesh_world.vertices[:, 0]
    left, right = x < -0.1, x > 0.1
    assert (colors[left, 0] > 200).mean() > 0.95 and (colors[right, 2] > 200).mean() > 0.95


def test_the_background_never_colours_the_person(tmp_path):
    # A red disc (the person, given by its mask) on green: no vertex is green or grey, at the outline
    # either, though the mask is smaller than the sphere's silhouette.
    image = np.zeros((256, 256, 3), np.uint8)
    image[:] = (0, 255, 0)
    yy, xx = np.mgrid[:256, :256]
    disc = (xx - 127.5) ** 2 + (yy - 127.5) ** 2 < 58 ** 2
    image[disc] = (255, 0, 0)
    Image.fromarray(image).save(tmp_path / "disc.png")
    Image.fromarray((disc * 255).astype(np.uint8)).save(tmp_path / "disc_mask.png")
    prepared = prepare_image_file(tmp_path / "disc.png", sizes=(128, 256))
    # The crop frames the disc (radius 0.83 of its half-side): a sphere of 0.9 overhangs it.
    result = finish(_sphere_samples(radius=0.9), prepared, ReconstructionConfig(resolution=64, color="image", carve=False))
    colors = result.mesh.visual.vertex_colors[:, :3].astype(int)
    assert (colors[:, 1] < 60).all() and (colors[:, 0] > 200).all()


@pytest.mark.parametrize("fmt", ["obj", "ply", "glb"])
def test_outputs_are_readable(tmp_path, fmt):
    path = person_image(tmp_path / "p.png")
    prepared = prepare_image_file(path, sizes=(128, 256))
    result = reconstruct(tiny_network(), prepared, ReconstructionConfig(resolution=64))
    assert len(result.mesh.faces) > 0
    files = encode_outputs(result, prepared, fmt)
    (tmp_path / f"mesh.{fmt}").write_bytes(files["mesh"])
    loaded = trimesh.load(tmp_path / f"mesh.{fmt}", force="mesh")
    assert len(loaded.vertices) > 0 and len(loaded.faces) == len(result.mesh.faces)
    (tmp_path / "preview.png").write_bytes(files["preview"])
    assert Image.open(tmp_path / "preview.png").size == (5 * 256, 256)
    assert result.stats["points_evaluated"] > 0 and result.stats["vertices"] == len(result.mesh.vertices)


def test_obj_keeps_vertices_colours_and_faces():
    mesh = trimesh.creation.icosphere(subdivisions=2)
    mesh.vertices *= 321.5
    rng = np.random.default_rng(0)
    mesh.visual.vertex_colors = np.concatenate([rng.integers(0, 256, (len(mesh.vertices), 3)), np.full((len(mesh.vertices), 1), 255)], 1)
    loaded = trimesh.load(io.BytesIO(obj_bytes(mesh)), file_type="obj", process=False)
    assert np.abs(loaded.vertices - mesh.vertices).max() < 1e-5
    assert (loaded.faces == mesh.faces).all()
    assert np.abs(loaded.visual.vertex_colors.astype(int) - mesh.visual.vertex_colors.astype(int)).max() <= 1
    bare = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    assert obj_bytes(bare).split(b"\n")[0].count(b" ") == 3  # no colour columns without colours


def test_preview_rasterises_the_mesh_front_and_side():
    from model.reconstruction.preview import PANEL, shaded_mesh

    mesh = trimesh.creation.icosphere(subdivisions=4)
    mesh.vertices *= [0.4, 0.8, 0.2]  # half-extents in the [-1, 1] box: wide, tall, shallow
    front, side = shaded_mesh(mesh, 0.0), shaded_mesh(mesh, 90.0)
    for panel, half_width in ((front, 0.4), (side, 0.2)):
        covered = (panel < 250).any(axis=2)
        columns = np.flatnonzero(covered.any(axis=0))
        assert (columns[-1] - columns[0] + 1) / PANEL == pytest.approx(half_width, abs=0.02)  # width / 2 = half-extent
        assert covered.sum() / PANEL ** 2 == pytest.approx(np.pi * half_width * 0.8 / 4, rel=0.05)  # an ellipse's area
        shades = panel[covered][:, 0]
        assert shades.max() - shades.min() > 80  # lit faces and faces turned away: shaded, not flat


def test_local_command_in_process(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    person_image(tmp_path / "in" / "a.png")
    person_image(tmp_path / "in" / "b.png", mode="RGB")
    (tmp_path / "in" / "b_rect.txt").write_text("60 10 180 430")
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image at all")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "reconstruct", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
         "--checkpoint", str(checkpoint), "--resolution", "64", "--in-process", "--quiet", "--format", "ply"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "3 inputs: 2 ok, 1 failed, 0 skipped" in result.stdout
    assert "broken.png" in result.stdout and "InputError" in result.stdout
    meshes = sorted((tmp_path / "out" / "meshes").glob("*.ply"))
    assert len(meshes) == 2 and all(len(trimesh.load(m).vertices) > 0 for m in meshes)


def test_bf16_precision_gives_nearly_the_same_mesh(tmp_path):
    path = person_image(tmp_path / "p.png")
    prepared = prepare_image_file(path, sizes=(128, 256))
    net = tiny_network()
    full = reconstruct(net, prepared, ReconstructionConfig(resolution=64))
    half = reconstruct(net, prepared, ReconstructionConfig(resolution=64, precision="bf16"))
    assert abs(len(half.mesh.faces) - len(full.mesh.faces)) < 0.1 * len(full.mesh.faces)
    assert np.allclose(half.mesh.bounds, full.mesh.bounds, atol=0.05 * np.ptp(full.mesh.bounds))
    with pytest.raises(ValueError, match="precision"):
        ReconstructionConfig(precision="fp8")


def test_points_outside_the_person_mask_are_outside_and_never_queried(tmp_path):
    from scipy.ndimage import distance_transform_edt

    from model.reconstruction.reconstruct import CARVE_MARGIN, occupancy_function

    path = person_image(tmp_path / "p.png")
    prepared = prepare_image_file(path, sizes=(128, 256))
    net = tiny_network()
    queried = []
    query = net.query
    net.query = lambda features, points, **kw: queried.append(points.shape[-1]) or query(features, points, **kw)
    points = torch.rand(20_000, 3) * 2 - 1
    with torch.inference_mode():
        features = net.encode(prepared.images[128][None], prepared.images[256][None]).select(0)
        carved = occupancy_function(net, features, silhouette=prepared.mask)(points)
        net.query = query
        plain = occupancy_function(net, features)(points)
    # Each point's nearest pixel of the (S, S) crop mask (world y up, image rows down).
    mask = prepared.mask[0].numpy() > 0.5
    size = len(mask)
    columns = ((points[:, 0] + 1) / 2 * (size - 1)).round().long().numpy()
    rows = ((1 - points[:, 1]) / 2 * (size - 1)).round().long().numpy()
    inside = torch.from_numpy(mask[rows, columns])
    far = torch.from_numpy(distance_transform_edt(~mask)[rows, columns] > CARVE_MARGIN * size + 2)
    assert far.sum() > 5000 and inside.sum() > 1000
    assert (carved[far] == 0).all()  # outside the person's shadow: outside the person
    assert torch.allclose(carved[inside], plain[inside], atol=1e-5)  # inside it: the network's own values
    assert sum(queried) <= len(points) - int(far.sum())  # the carved points never reached the network
    assert (plain[far] > 0.5).any()  # the raw network does put occupancy there
