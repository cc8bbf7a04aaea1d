"""Training: each stage learns, checkpoints on S3 resume from the last step (a lost node's recovery: test_multinode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import model
from pathlib import Path
from pipelines.common.storage import filesystem
from model.training.stages import TRAINED_PARTS, window_calib
from pipelines.common.formats import read_training_metrics
from pipelines.jobs.train import TrainConfig, build_stage, initial_network, package_model, run_training, to_tensors


def _fixed_batch(uri: str, size: int = 2) -> dict:
    from pipelines.common.dataset import iter_batches

    return to_tensors(next(iter_batches(uri, "train", size)), torch.device("cpu"))


@pytest.mark.parametrize("stage, body_guided", [("normal", False), ("coarse", False), ("fine", False), ("coarse", True), ("fine", True)])
def test_loss_falls_on_a_fixed_batch(tiny_dataset, stage, body_guided):
    config = TrainConfig(stage=stage, data=tiny_dataset, out="unused", preset="tiny", optimizer="adam", lr=3e-3,
                         points_per_sample=4096, body_guided=body_guided)
    net = initial_network(config)
    stage_module = build_stage(net, config)
    trainable = [p for p in stage_module.parameters() if p.requires_grad]
    frozen_before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.Adam(trainable, lr=config.lr)
    batch, losses = _fixed_batch(tiny_dataset), []
    for _ in range(40):
        # The same points and window every step: the loss must fall on this exact batch.
        loss, _ = stage_module(batch, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Deterministic batch, points and window: any steady fall is learning, not noise.
    assert np.mean(losses[-3:]) < 0.97 * np.mean(losses[:3]), losses
    prefixes = tuple(f"{name}." for name in TRAINED_PARTS[stage])
    for key, value in net.state_dict().items():
        changed = not torch.equal(value, frozen_before[key])
        if not key.startswith(prefixes):
            assert not changed, f"{stage} stage changed frozen {key}"
    if body_guided and stage == "coarse":  # the body inputs' weights (before the depth column) learned
        features = net.config.coarse_filter.out_channels
        assert net.netG.mlp.filters[0].weight[:, features : features + 4].abs().sum() > 0


def test_body_frame_centres_each_body_in_depth_and_moves_only_depth(tiny_dataset):
    """Training rows move to the frame inference reads a fitted body in (its own depth box centred)."""
    import trimesh

    from pipelines.common.dataset import iter_batches, to_body_frame

    decoded = next(iter_batches(tiny_dataset, "train", 4))
    moved = to_body_frame(decoded, tiny_dataset)
    assert np.abs(moved["body_depth_centre"]).max() > 1e-3  # stored rows centre the clothed subject instead
    for i, subject in enumerate(decoded["subject_id"]):
        body = trimesh.load(f"{tiny_dataset}/meshes/{subject}_body.ply", process=False)
        depth = body.apply_transform(moved["view_from_canonical"][i].astype(np.float64)).vertices[:, 2]
        assert abs(depth.max() + depth.min()) / 2 < 1e-4
        shift = decoded["points"][i, 2] - moved["points"][i, 2]
        assert np.allclose(shift, moved["body_depth_centre"][i], atol=1e-6)
    for key in ("labels", "body_sdf", "body_normals", "calib"):
        assert np.array_equal(moved[key], decoded[key])
    assert np.array_equal(moved["points"][:, :2], decoded["points"][:, :2])
    assert moved["points"] is not decoded["points"] and not np.array_equal(moved["points"], decoded["points"])


def test_window_calib_maps_window_pixels_to_its_corners():
    calib = torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0]))[None]
    size, window, ox, oy = 512, 256, 100, 40
    # World points at the centres of the window's first and last pixels.
    pixels = torch.tensor([[ox, oy], [ox + window - 1, oy + window - 1]], dtype=torch.float32)
    x = -1 + 2 * pixels[:, 0] / (size - 1)
    y = -(-1 + 2 * pixels[:, 1] / (size - 1))
    points = torch.stack((x, y, torch.zeros(2)))[None]
    projected = model.geometry.project(points, window_calib(calib, size, window, ox, oy))[0, :2]
    assert torch.allclose(projected, torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]), atol=1e-5)


def test_checkpoints_on_s3_resume_from_the_last_step(ray_local, s3_bucket, tiny_dataset):
    base = dict(stage="coarse", data=tiny_dataset, out=f"s3://{s3_bucket}/runs", name="resume", preset="tiny",
                batch_size=1, points_per_sample=1024, checkpoint_every=2, validate_every=4, val_resolution=32,
                cpus_per_worker=0.5)
    first = run_training(TrainConfig(steps=4, **base))
    assert first.steps == 4 and first.model_uri == f"s3://{s3_bucket}/runs/resume/model.safetensors"

    # A longer target continues from the last checkpoint that loads, not from scratch: here the one
    # of step 4 is damaged (NaN weights), so step 2. The samples are decoded by Ray Data tasks
    # (--parallel-decode, the GPU path) and reach the resumed worker all the same.
    fs, _ = filesystem(first.model_uri)
    checkpoints = sorted(fs.glob(f"{s3_bucket}/runs/resume/checkpoint_2*"))
    assert len(checkpoints) == 2
    fs.pipe_file(f"{checkpoints[-1]}/model.safetensors", b"torn upload")
    longer = run_training(TrainConfig(steps=6, parallel_decode=True, **base))
    assert longer.steps == 6
    metrics = read_training_metrics(f"s3://{s3_bucket}/runs/resume")
    assert sorted(metrics["step"]) == [2, 4, 6]
    assert metrics.set_index("step").loc[6, "resumed_from"] == 2
    assert "val_point_iou" in metrics.columns and metrics["val_point_iou"].notna().any()
    meta = model.load_checkpoint(_local(longer.model_uri)).checkpoint_metadata
    assert meta["steps"] == 6 and meta["stage"] == "coarse" and meta["training_data"] == tiny_dataset

    # Shipping the run keeps its history; float16 storage, float32 weights on load.
    shipped = package_model([f"s3://{s3_bucket}/runs/resume"], f"s3://{s3_bucket}/shipped.safetensors", recipe="test")
    net = model.load_checkpoint(_local(shipped))
    stage = net.checkpoint_metadata["stages"][0]
    assert stage["steps"] == 6 and "val_point_iou" in stage["validation"] and len(stage["history"]) == 3
    assert net.checkpoint_metadata["recipe"] == "test"


def test_package_takes_each_stage_from_its_own_run(tmp_path):
    from model.network.checkpoint import save_checkpoint

    runs = []
    for seed, stage in ((1, "normal"), (2, "coarse")):
        torch.manual_seed(seed)
        net = model.PIFuHD.from_config(model.preset("tiny"))
        save_checkpoint(net, tmp_path / stage / "model.safetensors", metadata={"stage": stage})
        runs.append(net.state_dict())
    shipped = model.load_checkpoint(package_model([str(tmp_path / "normal"), str(tmp_path / "coarse")],
                                                  str(tmp_path / "shipped.safetensors"), half=False)).state_dict()
    normal, coarse = runs
    for key, value in shipped.items():
        source = normal if key.startswith(tuple(f"{n}." for n in TRAINED_PARTS["normal"])) else coarse
        assert torch.equal(value, source[key]), key
    assert not torch.equal(normal["netG.netF.model.1.weight"], coarse["netG.netF.model.1.weight"])


def test_corrupt_init_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(model.CheckpointError, match="bad.safetensors"):
        initial_network(TrainConfig(stage="coarse", data="unused", out="unused", preset="tiny", init=str(bad)))


def _local(uri: str) -> str:
    from pipelines.common.checkpoints import fetch_checkpoint

    return fetch_checkpoint(uri)


def _copy_dataset(source: str, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_torn_shards_and_non_finite_losses_stop_training_with_a_clear_error(ray_local, tiny_dataset, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from model.errors import InputError
    from pipelines.jobs.train import NonFiniteLoss

    base = dict(stage="coarse", out=str(tmp_path / "runs"), preset="tiny", batch_size=1, points_per_sample=256,
                steps=2, checkpoint_every=1, validate_every=100, cpus_per_worker=0.5, max_failures=0)
    torn = _copy_dataset(tiny_dataset, tmp_path / "torn")
    shard = sorted((torn / "shards" / "train").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(InputError, match=shard.name):
        run_training(TrainConfig(data=str(torn), name="torn", **base))

    poisoned = _copy_dataset(tiny_dataset, tmp_path / "nan")
    for shard in (poisoned / "shards" / "train").glob("*.parquet"):
        table = pq.read_table(shard)
        points = table.column("points").combine_chunks()  # list<float32>, xyz interleaved
        nan_points = type(points).from_arrays(points.offsets, pa.array(np.full(len(points.values), np.nan, np.float32)))
        table = table.set_column(table.schema.get_field_index("points"), "points", nan_points.cast(points.type))
        pq.write_table(table, shard)
    with pytest.raises(NonFiniteLoss, match=r"at step 1 on the samples \['[\w-]+-view\d"):
        run_training(TrainConfig(data=str(poisoned), name="nan", **base))
    assert not list((tmp_path / "runs" / "nan").rglob("model.safetensors"))  # no NaN checkpoint was written
