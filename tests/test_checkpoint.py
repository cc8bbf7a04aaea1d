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


def test_project_format_round_trip(tmp_path):
    torch.manual_seed(1)
    net = model.PIFuHD.from_config(model.preset("tiny")).eval()
    path = save_checkpoint(net, tmp_path / "tiny.safetensors", metadata={"preset": "tiny", "steps": 7})
    loaded = model.load_checkpoint(path)
    assert loaded.config == net.config
    assert loaded.checkpoint_metadata["steps"] == 7 and loaded.checkpoint_metadata["format"] == "pifuhd-ray"
    for (key, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), key
    assert torch.equal(_outputs(net), _outputs(loaded))
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
