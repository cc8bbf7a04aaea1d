"""What training feeds the network: cut-outs like inference's, the depth feature's scale, the body prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

import model
from model.augment import MaskNoise, grey_composite
from model.sampling import body_distance


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
    distance, normals = body_distance((sphere.vertices, sphere.faces), queries, clip=20.0)
    np.testing.assert_allclose(distance, [-10.0, -5.0, 2.0, 20.0], atol=0.15)
    np.testing.assert_allclose(normals[1], [0, 0, 1], atol=0.1)
    np.testing.assert_allclose(normals[2], [0, 1, 0], atol=0.1)
    np.testing.assert_array_equal(normals[3], [0, 0, 0])  # beyond the clip only the side is known
