"""The network API on a small preset: shapes, modes, gradients, conventions."""

from __future__ import annotations

import pytest
import torch

import model
from model.geometry import default_calib, project, sample_features


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return model.PIFuHD.from_config(model.preset("tiny"))


def _images(config, batch=2):
    coarse = torch.rand(batch, 3, config.coarse_size, config.coarse_size) * 2 - 1
    fine = torch.rand(batch, 3, config.fine_size, config.fine_size) * 2 - 1
    return coarse, fine


def test_shapes_in_eval_mode(tiny):
    tiny.eval()
    config = tiny.config
    coarse, fine = _images(config)
    with torch.inference_mode():
        front, back = tiny.predict_normals(coarse)
        features = tiny.encode(coarse, fine)
        points = torch.rand(2, 3, 300) * 2 - 1
        fine_occ = tiny.query(features, points)
        coarse_occ = tiny.query(features, points, level="coarse")
    assert front.shape == back.shape == (2, 3, config.coarse_size, config.coarse_size)
    assert len(features.coarse) == 1  # eval keeps only the last stack
    assert features.coarse[0].shape == (2, config.coarse_filter.out_channels, config.coarse_size // 4, config.coarse_size // 4)
    assert features.fine.shape == (2, config.fine_filter.out_channels, config.fine_size // 2, config.fine_size // 2)
    assert fine_occ.shape == coarse_occ.shape == (2, 300)
    assert fine_occ.min() >= 0 and fine_occ.max() <= 1


def test_training_mode_supervises_every_stack_and_backpropagates(tiny):
    tiny.train()
    coarse, fine = _images(tiny.config, batch=1)
    normals = (torch.rand_like(coarse), torch.rand_like(coarse))  # e.g. ground-truth normal maps
    features = tiny.encode(coarse, fine, normals=normals)
    assert len(features.coarse) == tiny.config.coarse_filter.num_stacks
    result = tiny.query_levels(features, torch.rand(1, 3, 64) * 2 - 1)
    assert len(result.coarse_logits) == tiny.config.coarse_filter.num_stacks
    loss = sum(l.mean() for l in result.coarse_logits) + result.fine_logits.mean()
    loss.backward()
    assert tiny.netG.mlp.filters[0].weight.grad is not None and tiny.image_filter.conv1.weight.grad is not None
    assert tiny.netG.netF.model[1].weight.grad is None  # normals were given: the normal nets did not run
    tiny.zero_grad()
    tiny.eval()


def test_fine_query_skips_coarse_head_but_matches(tiny):
    coarse, fine = _images(tiny.config, batch=1)
    points = torch.rand(1, 3, 100) * 2 - 1
    with torch.inference_mode():
        features = tiny.encode(coarse, fine)
        both = tiny.query_levels(features, points, levels="both")
        fine_only = tiny.query_levels(features, points, levels="fine")
    assert fine_only.coarse == [] and torch.equal(both.fine, fine_only.fine)


def test_query_needs_fine_features(tiny):
    coarse, _ = _images(tiny.config, batch=1)
    with torch.inference_mode():
        features = tiny.encode(coarse)
        tiny.query(features, torch.zeros(1, 3, 4), level="coarse")
        with pytest.raises(ValueError, match="fine features"):
            tiny.query(features, torch.zeros(1, 3, 4))
        with pytest.raises(ValueError, match="level"):
            tiny.query(features, torch.zeros(1, 3, 4), level="medium")


def test_projection_and_sampling_conventions():
    # World y up maps to image rows running down; (-1, -1) is the top-left pixel centre.
    points = torch.tensor([[[0.5], [0.25], [-0.3]]])
    assert torch.allclose(project(points, default_calib()), torch.tensor([[[0.5], [-0.25], [-0.3]]]))
    feature_map = torch.arange(12.0).reshape(1, 1, 3, 4)  # rows 0..2, columns 0..3
    corners = torch.tensor([[[-1.0, 1.0, -1.0, 1.0], [-1.0, -1.0, 1.0, 1.0]]])
    samples = sample_features(feature_map, corners)[0, :, 0]
    assert samples.tolist() == [0.0, 3.0, 8.0, 11.0]


def test_invalid_configs_are_rejected():
    config = model.preset("tiny")
    import dataclasses

    with pytest.raises(ValueError, match="fine MLP input"):
        dataclasses.replace(config, fine_mlp=model.MLPConfig(widths=(7, 4, 1), skip_layers=()))
    with pytest.raises(ValueError, match="norm groups"):
        dataclasses.replace(config, coarse_filter=dataclasses.replace(config.coarse_filter, norm_groups=3))
    with pytest.raises(ValueError, match="unknown preset"):
        model.preset("huge")


def test_presets_round_trip_through_dict():
    for name in ("full", "small", "tiny"):
        config = model.preset(name)
        assert model.PIFuHDConfig.from_dict(config.to_dict()) == config
