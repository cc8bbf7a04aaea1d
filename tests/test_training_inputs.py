"""What training feeds the network: cut-outs like inference's, the depth feature's scale, the body prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

import model
from model.network.pifuhd import PIFuHD
from model.training.augment import BodyNoise, MaskNoise, body_input, grey_composite
from model.body.field import BodyField


def test_grey_composite_cuts_out_through_a_disturbed_mask():
    image = torch.full((6, 3, 64, 64), 0.8)
    mask = torch.zeros(6, 1, 64, 64)
    mask[:, :, 16:48, 20:44] = 1
    out = grey_composite(image, mask, MaskNoise(probability=1.0, max_grow_px=3, max_blur_px=0), torch.Generator().manual_seed(0))
    for sample in out:
        person = sample[0] > 0.4
        rows, cols = np.nonzero(person.numpy())
        # Grey (0) outside a mask grown or shrunk by at most 3 pixels; the person kept inside.
        assert 13 <= rows.min() <= 19 and 40 <= cols.max() <= 46
        assert sample[:, 0, 0].abs().max() == 0
    exact = grey_composite(image, mask, MaskNoise(probability=1.0, max_grow_px=0, max_blur_px=0), None)
    torch.testing.assert_close(exact, image * mask)
    untouched = grey_composite(image, mask, MaskNoise(probability=0.0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(untouched, image)
    with pytest.raises(ValueError, match="probability"):
        MaskNoise(probability=1.5)


def test_with_z_size_keeps_the_function_and_changes_the_depth_scale():
    torch.manual_seed(0)
    net = model.PIFuHD.from_config(model.preset("tiny")).eval()
    image = torch.rand(1, 3, 128, 128) * 2 - 1
    features = net.encode(image, torch.nn.functional.interpolate(image, size=256))
    points = torch.rand(1, 3, 500) * 2 - 1
    rescaled = net.with_z_size(3.0)
    assert rescaled.config.z_size == 3.0 and rescaled.config.depth_scale == pytest.approx(64 / 3)
    with torch.no_grad():
        torch.testing.assert_close(rescaled.query(features, points), net.query(features, points), atol=1e-5, rtol=1e-4)
    assert not torch.equal(rescaled.netG.mlp.filters[0].weight, net.netG.mlp.filters[0].weight)


def test_body_distance_is_signed_and_clipped():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=10.0)
    queries = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0], [0.0, 12.0, 0.0], [50.0, 0.0, 0.0]])
    distance, normals = BodyField((sphere.vertices, sphere.faces), clip=20.0)(queries)
    np.testing.assert_allclose(distance, [-10.0, -5.0, 2.0, 20.0], atol=0.15)
    np.testing.assert_allclose(normals[1], [0, 0, 1], atol=0.1)
    np.testing.assert_allclose(normals[2], [0, 1, 0], atol=0.1)
    np.testing.assert_array_equal(normals[3], [0, 0, 0])  # beyond the clip only the side is known


def test_body_normals_turn_smoothly_along_the_surface():
    """Along a circle 1 cm outside a faceted sphere the normal a point reads turns a little at each step
    (the blend of nearby samples), not in the jumps of the nearest triangle's normal."""
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=10.0)  # 320 faces: big facets
    angles = np.linspace(0, 2 * np.pi, 2000, endpoint=False)
    circle = np.stack([11.0 * np.cos(angles), 11.0 * np.sin(angles), np.full_like(angles, 0.3)], 1)

    def largest_turn_deg(normals):
        return np.degrees(np.arccos(np.clip((normals * np.roll(normals, 1, axis=0)).sum(1), -1, 1))).max()

    blended = BodyField((sphere.vertices, sphere.faces), clip=20.0)(circle)[1]
    faceted = BodyField((sphere.vertices, sphere.faces), clip=20.0, neighbours=1)(circle)[1]
    assert largest_turn_deg(faceted) > 10 and largest_turn_deg(blended) < 0.2 * largest_turn_deg(faceted)


def test_body_guidance_keeps_the_function_and_requires_a_body():
    torch.manual_seed(0)
    net = PIFuHD(model.preset("tiny")).eval()
    guided = net.with_body_guidance().eval()
    assert guided.config.body_guided and guided.config.coarse_mlp.widths[0] == net.config.coarse_mlp.widths[0] + 4
    images = torch.rand(1, 3, 128, 128) * 2 - 1, torch.rand(1, 3, 256, 256) * 2 - 1
    points = torch.rand(1, 3, 300) * 2 - 1
    with torch.no_grad():
        plain = net.query(net.encode(*images), points)
        features = guided.encode(*images)
        torch.testing.assert_close(guided.query(features, points, body=torch.randn(1, 4, 300)), plain)
        # Once the body counts, a new depth scale rescales the body distance with the depth.
        body = torch.randn(1, 4, 300)
        for index, layer in enumerate(guided.netG.mlp.filters):
            if index == 0 or index in guided.netG.mlp.skip_layers:  # the layers reading the MLP input
                layer.weight[:, -5:-1] = torch.randn_like(layer.weight[:, -5:-1])
        rescaled = guided.with_z_size(3.0)
        torch.testing.assert_close(rescaled.query(rescaled.encode(*images), points, body=body),
                                   guided.query(features, points, body=body), atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="needs the body input"):
            guided.query(features, points)
        with pytest.raises(ValueError, match="not body-guided"):
            net.query(net.encode(*images), points, body=torch.zeros(1, 4, 300))


def test_body_input_moves_the_distance_like_a_moved_body():
    # A unit sphere's distance field (1 unit = 100 cm): moving the body by t changes the distance by
    # about -n.t, which is what the noise applies; the moved sphere's exact distance checks it.
    directions = torch.nn.functional.normalize(torch.randn(1, 3, 500, generator=torch.Generator().manual_seed(1)), dim=1)
    points = directions * torch.linspace(0.8, 1.2, 500)
    sdf = points.norm(dim=1) - 1
    noise = BodyNoise(shift_xy_cm=0, shift_z_cm=10, offset_cm=0, point_cm=0)
    disturbed = body_input(sdf, directions, 5.0, torch.tensor([0.01]), noise, torch.Generator().manual_seed(0))
    shift = float(torch.randn(1, 3, generator=torch.Generator().manual_seed(0))[0, 2]) * 0.1
    moved = (points - torch.tensor([0.0, 0.0, shift]).reshape(1, 3, 1)).norm(dim=1) - 1
    assert disturbed.shape == (1, 4, 500) and abs(shift) > 0.01
    torch.testing.assert_close(disturbed[0, 0], moved[0], atol=shift**2 + 1e-4, rtol=0)
    assert (disturbed[0, 0] - sdf[0]).abs().max() > 0.5 * abs(shift)
    torch.testing.assert_close(disturbed[:, 1:], directions)
