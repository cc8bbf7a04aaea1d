"""Checkpoint formats, conversion, and clear errors for bad files."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import model
from model.network.checkpoint import save_checkpoint


def _outputs(net, seed=0):
    torch.manual_seed(seed)
    size = net.config.coarse_size
    image = torch.rand(1, 3, size, size) * 2 - 1
    fine = torch.nn.functional.interpolate(image, size=net.config.fine_size)
    points = torch.rand(1, 3, 500) * 2 - 1
    with torch.inference_mode():
        return net.query(net.encode(image, fine), points)


def _same_outputs(net, loaded):
    # The weights are checked bit for bit elsewhere; the same weights at other addresses may take
    # another oneDNN kernel, so outputs are compared to float32 rounding (failed once with torch.equal).
    torch.testing.assert_close(_outputs(loaded), _outputs(net), rtol=0, atol=1e-6)


def test_project_format_round_trip(tmp_path):
    torch.manual_seed(1)
    net = model.PIFuHD.from_config(model.preset("tiny")).eval()
    path = save_checkpoint(net, tmp_path / "tiny.safetensors", metadata={"preset": "tiny", "steps": 7})
    loaded = model.load_checkpoint(path)
    assert loaded.config == net.config
    assert loaded.checkpoint_metadata["steps"] == 7 and loaded.checkpoint_metadata["format"] == "pifuhd-ray"
    for (key, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), key
    _same_outputs(net, loaded)
    # The tie survives: one tensor under both names, so training updates both.
    assert loaded.image_filter.conv2.bn4.weight is loaded.image_filter.conv2.downsample[0].weight


def test_float16_storage_halves_the_file_and_loads_as_float32(tmp_path):
    net = model.PIFuHD.from_config(model.preset("tiny")).eval()
    full = save_checkpoint(net, tmp_path / "full.safetensors")
    half = save_checkpoint(net, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    loaded = model.load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.allclose(_outputs(net), _outputs(loaded), atol=2e-3)
    assert next(net.parameters()).dtype == torch.float32  # the caller's network is left as it was


def test_convert_official_keeps_outputs(official_checkpoint, tmp_path):
    out = tmp_path / "converted.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "checkpoint", "convert", str(official_checkpoint), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    official, converted = model.load_checkpoint(official_checkpoint), model.load_checkpoint(out)
    assert converted.checkpoint_metadata["converted_from"]["format"] == "released-torch"
    assert converted.checkpoint_metadata["source_options"]["opt_netG"]["loadSize"] == 512
    for (key, a), (_, b) in zip(official.state_dict().items(), converted.state_dict().items()):
        assert torch.equal(a, b), key


def test_inspect_prints_config_and_counts(official_checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "checkpoint", "inspect", str(official_checkpoint)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert '"parameters": 8709089' in result.stdout and '"format": "released-torch"' in result.stdout


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


def _truncate(source, target, keep):
    return _write(target, source.read_bytes()[:keep])


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _torch_save(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d, o: d / "missing.pt", "no such checkpoint"),
        (lambda d, o: _write(d / "empty.pt", b""), "empty or truncated"),
        (lambda d, o: _write(d / "notes.pt", b"hello, this is not a model"), "not a checkpoint"),
        (lambda d, o: _truncate(o, d / "cut.pt", o.stat().st_size // 2), "truncated or corrupt"),
        (lambda d, o: _torch_save(d / "list.pt", [1, 2, 3]), "not a PIFuHD checkpoint"),
        (lambda d, o: _torch_save(d / "evil.pt", {"model_state_dict": _Exploit()}), "refused to unpickle"),
        (lambda d, o: _write(d / "raw.pkl", pickle.dumps({"a": _Exploit()})), "refused to unpickle"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, official_checkpoint, monkeypatch, make, message):
    monkeypatch.chdir(tmp_path)
    path = make(tmp_path, official_checkpoint)
    with pytest.raises(model.CheckpointError, match=message) as info:
        model.load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not (tmp_path / "EXPLOITED").exists()


def test_truncated_safetensors(tmp_path):
    net = model.PIFuHD.from_config(model.preset("tiny"))
    path = save_checkpoint(net, tmp_path / "tiny.safetensors")
    cut = _truncate(path, tmp_path / "cut.safetensors", path.stat().st_size - 1000)
    with pytest.raises(model.CheckpointError, match="truncated or corrupt safetensors"):
        model.load_checkpoint(cut)


def test_wrong_layout_names_the_keys(tmp_path, official_checkpoint):
    state = torch.load(official_checkpoint, weights_only=False)["model_state_dict"]
    broken = dict(state)
    del broken["netG.mlp.filters.4.bias"]
    broken["netG.image_filter.conv1.weight"] = torch.zeros(64, 9, 5, 5)
    torch.save({"model_state_dict": broken}, tmp_path / "broken.pt")
    with pytest.raises(model.CheckpointError, match=r"missing keys: netG\.mlp\.filters\.4\.bias.*wrong shapes"):
        model.load_checkpoint(tmp_path / "broken.pt")
    unrelated = {"encoder.weight": torch.zeros(3, 3)}
    save_file(unrelated, tmp_path / "other.safetensors")
    with pytest.raises(model.CheckpointError, match="no hourglass filter"):
        model.load_checkpoint(tmp_path / "other.safetensors")


def test_untied_values_are_rejected(tmp_path, official_checkpoint):
    state = {k: v.clone() for k, v in torch.load(official_checkpoint, weights_only=False)["model_state_dict"].items()}
    state["image_filter.conv2.downsample.0.weight"] += 1
    save_file(state, tmp_path / "untied.safetensors")
    with pytest.raises(model.CheckpointError, match="tied keys"):
        model.load_checkpoint(tmp_path / "untied.safetensors")


def test_fixture_safetensors_loads_in_float32():
    from tests.conftest import reference_file

    net = model.load_checkpoint(reference_file("small_state_dict.safetensors"))
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert not net.training
    stored = load_file(reference_file("small_state_dict.safetensors"))
    assert torch.equal(net.state_dict()["netG.mlp.filters.0.weight"], stored["netG.mlp.filters.0.weight"].float())


def test_a_safetensors_header_length_starting_like_a_pickle_is_still_safetensors(tmp_path):
    """A header length whose low byte is 0x80 (a pickle's first byte) must not be read as torch."""
    import model
    from model.network.checkpoint import read_checkpoint, save_checkpoint

    net = model.PIFuHD.from_config(model.preset("tiny"))
    for pad in range(256):
        path = save_checkpoint(net, tmp_path / "net.safetensors", metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    _, config, metadata = read_checkpoint(path)
    assert metadata["format"] == "pifuhd-ray" and config == net.config


def test_sharded_checkpoint_loads_as_the_single_file_does(tmp_path):
    from model.network.checkpoint import INDEX_NAME
    from pipelines.common.checkpoints import checkpoint_identity

    torch.manual_seed(2)
    net = model.PIFuHD.from_config(model.preset("tiny")).eval()
    limit = 256 * 1024
    folder = save_checkpoint(net, tmp_path / "sharded", metadata={"surface_level": 0.6}, max_shard_bytes=limit)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 3 and (folder / INDEX_NAME).is_file()
    for shard in shards:  # every shard within the limit, unless one tensor alone is larger
        tensors = load_file(shard)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= limit or len(tensors) == 1
    for path in (folder, folder / INDEX_NAME):
        loaded = model.load_checkpoint(path)
        assert loaded.checkpoint_metadata["surface_level"] == 0.6 and loaded.config == net.config
        assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in net.state_dict().items())
        _same_outputs(net, loaded)
        assert loaded.image_filter.conv2.bn4.weight is loaded.image_filter.conv2.downsample[0].weight
    identity = checkpoint_identity(str(folder), {})
    # Written again with bigger shards: fewer files, the old ones gone, the same weights, the same network.
    save_checkpoint(net, folder, metadata={"surface_level": 0.6}, max_shard_bytes=64 * 2**20)
    [single] = folder.glob("*.safetensors")
    _same_outputs(net, model.load_checkpoint(folder))
    assert checkpoint_identity(str(folder), {}) != identity
    # Other weights, same metadata: new shard names (a reader of the old index never mixes the two).
    with torch.no_grad():
        net.netG.mlp.filters[0].bias.add_(1.0)
    save_checkpoint(net, folder, metadata={"surface_level": 0.6}, max_shard_bytes=64 * 2**20)
    assert [p.name for p in folder.glob("*.safetensors")] != [single.name] and not single.exists()
    _same_outputs(net, model.load_checkpoint(folder))


@pytest.mark.parametrize("damage, message", [
    (lambda folder, index: index.update(weight_map={k: "../outside.safetensors" for k in index["weight_map"]}), "not a .safetensors file beside the index"),
    (lambda folder, index: (folder / sorted(set(index["weight_map"].values()))[0]).unlink(), "is missing"),
    (lambda folder, index: index["weight_map"].pop(next(iter(index["weight_map"]))), "not the"),
    (lambda folder, index: index.update(weight_map=[1, 2]), "must be JSON objects"),
])
def test_a_damaged_shard_index_is_one_clear_error(tmp_path, damage, message):
    import json

    from model.network.checkpoint import INDEX_NAME

    folder = save_checkpoint(model.PIFuHD.from_config(model.preset("tiny")), tmp_path / "sharded", max_shard_bytes=256 * 1024)
    index = json.loads((folder / INDEX_NAME).read_text())
    damage(folder, index)
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(model.CheckpointError, match=message):
        model.load_checkpoint(folder)
    with pytest.raises(model.CheckpointError, match="without model.safetensors.index.json"):
        model.load_checkpoint(tmp_path)


def test_convert_shards_the_shipped_model_under_16_mib_and_keeps_its_record(tmp_path):
    from pipelines.common.checkpoints import SHIPPED_CHECKPOINT

    out = tmp_path / "shards"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "checkpoint", "convert", str(SHIPPED_CHECKPOINT), str(out), "--half",
         "--max-shard-mib", "16"], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("*.safetensors"))) >= 2
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    shipped, sharded = model.load_checkpoint(SHIPPED_CHECKPOINT), model.load_checkpoint(out)
    assert sharded.checkpoint_metadata["surface_level"] == shipped.checkpoint_metadata["surface_level"]
    assert sharded.checkpoint_metadata["recipe"] == shipped.checkpoint_metadata["recipe"]
    for (key, a), (_, b) in zip(shipped.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), key


def test_a_sharded_checkpoint_is_fetched_from_s3(s3_bucket, tmp_path):
    import s3fs

    from pipelines.common.checkpoints import fetch_checkpoint

    net = model.PIFuHD.from_config(model.preset("tiny")).eval()
    folder = save_checkpoint(net, tmp_path / "sharded", max_shard_bytes=256 * 1024)
    s3fs.S3FileSystem().put(str(folder) + "/", f"{s3_bucket}/models/tiny/", recursive=True)
    local = fetch_checkpoint(f"s3://{s3_bucket}/models/tiny")
    assert fetch_checkpoint(f"s3://{s3_bucket}/models/tiny") == local  # cached once
    _same_outputs(net, model.load_checkpoint(local))
    # A shard rewritten in place under its name (by some other tool), the index unchanged: fetched again.
    with torch.no_grad():
        net.netG.mlp.filters[0].bias.add_(1.0)
    other = save_checkpoint(net, tmp_path / "other", max_shard_bytes=256 * 1024)
    fs = s3fs.S3FileSystem()
    for old, new in zip(sorted(folder.glob("*.safetensors")), sorted(other.glob("*.safetensors"))):
        fs.put(str(new), f"{s3_bucket}/models/tiny/{old.name}")
    refreshed = fetch_checkpoint(f"s3://{s3_bucket}/models/tiny")
    assert refreshed != local
    _same_outputs(net, model.load_checkpoint(refreshed))
