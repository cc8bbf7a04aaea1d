"""Shared test fixtures: the official-code reference fixture and small networks."""

from __future__ import annotations

import argparse
import os
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "pifuhd"
# A test that needs one of these is slow (a Ray instance or cluster, a generated dataset, rendered
# bodies): `pytest -m "not slow"` leaves it out of the quick loop.
SLOW_FIXTURES = {"ray_local", "ray_head", "cluster", "tiny_dataset", "test_split_dataset", "bodies"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def reference_file(name: str) -> Path:
    path = REFERENCE / name
    if not path.exists():
        pytest.fail(f"reference fixture missing: {path} (shared/ must sit beside the repository)")
    return path


def write_official_checkpoint(path: Path) -> Path:
    """A file in the released pifuhd.pt form built from the fixture's weights and options.

    float32 weights, tied bn4/downsample.0 keys sharing one tensor, options as argparse
    Namespaces, exactly as the official training code pickles them.
    """
    config = json.loads(reference_file("small_config.json").read_text())
    stored = {k: v.float() for k, v in load_file(reference_file("small_state_dict.safetensors")).items()}
    state = {}
    for key, _shape, _dtype in config["state_dict"]["ordered_keys"]:
        state[key] = stored[key]
    for first, alias in config["state_dict"]["tied_key_groups"]:
        state[alias] = state[first]
    torch.save(
        {
            "model_state_dict": state,
            "opt": argparse.Namespace(**config["fine_net"]["opt"]),
            "opt_netG": argparse.Namespace(**config["coarse_net"]["opt_netG"]),
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory) -> Path:
    return write_official_checkpoint(tmp_path_factory.mktemp("official") / "pifuhd.pt")


@pytest.fixture(scope="session")
def reference_inputs() -> dict:
    inputs = load_file(reference_file("inputs.safetensors"))
    image_512 = (inputs["image_512_u8"].float() - 128) / 128
    # The fixture defines the fine image as the exact nearest-neighbour x2 of the coarse one.
    image_1024 = image_512.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    return {**inputs, "image_512": image_512, "image_1024": image_1024}


@pytest.fixture(scope="session")
def reference_outputs() -> dict:
    return load_file(reference_file("outputs.safetensors"))


@pytest.fixture(scope="session")
def reference_net(official_checkpoint):
    """The fixture's small network, loaded from the official-form file."""
    import model

    return model.load_checkpoint(official_checkpoint)


@pytest.fixture(scope="session")
def reference_features(reference_net, reference_inputs):
    """Features of the fixture image (computed once: the full-width hourglasses take ~15 s)."""
    with torch.inference_mode():
        return reference_net.encode(reference_inputs["image_512"], reference_inputs["image_1024"])


# ---- real services on loopback, one per test session ------------------------------------


@pytest.fixture(scope="session")
def body_model():
    """anny built once per session (first build on a machine: ~70-100 s, cached under ~/.cache/pifuhd-ray)."""
    from model.body.anny import load_body_model

    return load_body_model()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto) on 127.0.0.1; the environment points every client at it.

    Yields the endpoint URL. Set before Ray starts so Ray workers inherit it.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the local S3 server; yields its name."""
    import boto3

    name = "test-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server, tmp_path_factory):
    """A private local Ray instance on loopback (2 CPUs, no dashboard), shared by all tests."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_worker_niceness"] = "0"  # as `pipelines.common.ray_runtime.connect_ray` runs the product
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(ray_local, tmp_path_factory):
    """5 synthetic subjects x 2 views at 512, made by the data job itself."""
    from pipelines.jobs.data import JobConfig, SampleSettings, run_job
    from model.data.sampling import SamplingConfig

    out = str(tmp_path_factory.mktemp("dataset"))
    settings = SampleSettings(views=2, resolution=512, val_fraction=0.4, test_fraction=0.0,
                              sampling=SamplingConfig(num_points=4096, num_surface_points=2000))
    run_job(JobConfig(out=out, kind="synth", seed=3, settings=settings, count=5, quiet=True))
    return out
