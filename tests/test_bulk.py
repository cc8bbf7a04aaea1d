"""Bulk reconstruction on Ray Data, end to end against a real local S3 server."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import s3fs
import trimesh
from PIL import Image

from pipelines.jobs.bulk import BulkConfig, run_bulk
from pipelines.common.formats import read_manifest
from model.reconstruction.reconstruct import ReconstructionConfig
from pipelines.common.storage import safe_stem
from tests.helpers import person_image, write_tiny_checkpoint

RESOLUTION = 64


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _inputs(tmp_path) -> dict[str, bytes]:
    """Good and bad inputs, by name. The good ones use the three ways of giving a person box."""
    rgba = person_image(tmp_path / "src" / "rgba.png").read_bytes()
    rgb = person_image(tmp_path / "src" / "rgb.png", mode="RGB").read_bytes()
    mask = Image.fromarray((np.asarray(Image.open(io.BytesIO(rgba)))[..., 3] > 0).astype(np.uint8) * 255)
    return {
        "good/alpha.png": rgba,
        "good/with_rect.png": rgb,
        "good/with_rect_rect.txt": b"60 10 180 430\n",
        "good/with mask.png": rgb,
        "good/with mask_mask.png": _png_bytes(mask),
        "bad/truncated.png": rgba[: len(rgba) // 3],
        "bad/text.png": b"this is a text file, not an image",
        "bad/empty.jpg": b"",
        "bad/bomb.png": _png_bytes(Image.new("1", (12000, 12000))),
        "bad/no_person_box.png": rgb,
    }


@pytest.fixture
def checkpoint(tmp_path):
    return str(write_tiny_checkpoint(tmp_path / "tiny.safetensors"))


def _config(inputs, output, checkpoint, **kwargs) -> BulkConfig:
    return BulkConfig(inputs=tuple(inputs), output=output, checkpoint=checkpoint,
                      reconstruction=ReconstructionConfig(resolution=RESOLUTION), manifest_flush_rows=3, **kwargs)


def test_s3_end_to_end_every_input_accounted_once(ray_local, s3_bucket, tmp_path, checkpoint):
    fs = s3fs.S3FileSystem()
    for name, data in _inputs(tmp_path).items():
        fs.pipe_file(f"{s3_bucket}/in/{name}", data)
    out = f"s3://{s3_bucket}/out"
    summary = run_bulk(_config([f"s3://{s3_bucket}/in"], out, checkpoint), progress=False)
    assert (summary.ok, summary.failed, summary.skipped) == (3, 5, 0)

    manifest = read_manifest(out)
    assert len(manifest) == 8 and manifest["input_uri"].is_unique
    assert not manifest["input_uri"].str.contains("_rect.txt|_mask.png").any()  # sidecars are not inputs
    by_name = {uri.rsplit("/", 1)[1]: row for uri, row in zip(manifest["input_uri"], manifest.to_dict("records"))}
    for name in ("alpha.png", "with_rect.png", "with mask.png"):
        row = by_name[name]
        assert row["status"] == "ok" and row["vertices"] > 0 and row["faces"] > 0
        assert row["content_hash"] and row["checkpoint_id"] and row["points_evaluated"] > 0
        mesh = trimesh.load(io.BytesIO(fs.cat_file(row["mesh_uri"])), file_type="obj", force="mesh")
        assert len(mesh.faces) == row["faces"]
        assert fs.exists(row["preview_uri"])
    for name in ("truncated.png", "text.png", "empty.jpg", "bomb.png", "no_person_box.png"):
        row = by_name[name]
        assert row["status"] == "failed" and row["error_class"] == "InputError", row
        assert name in row["error_message"]
    assert "pixels" in by_name["bomb.png"]["error_message"]

    # Same job again: nothing redone, nothing lost, one new row per input. The skip check is the
    # preparing stage's own code, so these runs use the in-process path (a Ray job costs ~20 s here).
    again = run_bulk(_config([f"s3://{s3_bucket}/in"], out, checkpoint), in_process=True, progress=False)
    assert (again.ok, again.failed, again.skipped) == (0, 5, 3)
    manifest = read_manifest(out)
    assert len(manifest) == 16 and manifest.groupby("run_id").size().tolist() == [8, 8]
    # Integer columns stay integers though failed rows have none (not pandas' float NaN).
    assert {str(manifest[c].dtype) for c in ("vertices", "faces", "persons_found", "points_evaluated")} == {"Int64"}
    # Settings that change the outputs are part of the skip key: another resolution redoes them.
    finer = _config([f"s3://{s3_bucket}/in/good"], out, checkpoint)
    finer = dataclasses.replace(finer, reconstruction=dataclasses.replace(finer.reconstruction, resolution=2 * RESOLUTION))
    assert (lambda s: (s.ok, s.skipped))(run_bulk(finer, in_process=True, progress=False)) == (3, 0)
    assert set(read_manifest(out)["mask_source"].dropna()) <= {"alpha", "mask", "person"}
    # And --overwrite redoes them.
    forced = run_bulk(_config([f"s3://{s3_bucket}/in/good"], out, checkpoint, overwrite=True), in_process=True, progress=False)
    assert (forced.ok, forced.skipped) == (3, 0)


def test_killed_driver_resumes_without_loss_or_duplicates(tmp_path, checkpoint):
    folder = tmp_path / "in"
    for index in range(6):
        person_image(folder / f"p{index}.png")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipelines.cli", "reconstruct", str(folder), "-o", str(out), "--checkpoint",
               checkpoint, "--resolution", str(RESOLUTION), "--in-process", "--quiet"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list((out / "meshes").glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    finished_before = len(list((out / "meshes").glob("*.json")))
    assert 2 <= finished_before < 6

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"6 inputs: {6 - finished_before} ok, 0 failed, {finished_before} skipped" in result.stdout
    manifest = read_manifest(str(out))
    last_run = manifest[manifest["run_id"] == manifest["run_id"].max()]
    assert len(last_run) == 6 and last_run["input_uri"].is_unique
    assert len(list((out / "meshes").glob("*.obj"))) == 6


def test_output_names_stay_under_the_root_and_never_collide():
    hostile = ["../../etc/passwd.png", "/abs/path.png", "a/../../b.png", "..\\..\\win.png", "", "...png"]
    for name in hostile:
        stem = safe_stem(name, "s3://bucket/" + name)
        assert not stem.startswith("/") and ".." not in stem.split("/") and stem
    assert safe_stem("a b.png", "uri-1") != safe_stem("a_b.png", "uri-2")
    assert safe_stem("x/a.png", "s3://b/x/a.png") == safe_stem("x/a.png", "s3://b/x/a.png")


def test_credentials_never_reach_the_manifest(tmp_path, checkpoint):
    from pipelines.common.uris import redact

    assert redact("s3://AKIAXXXX:secret@bucket/key.png") == "s3://bucket/key.png"
    person_image(tmp_path / "in" / "a.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'in' / 'a.png'}\n{tmp_path / 'in' / 'missing.png'}\n")
    summary = run_bulk(_config([str(listing)], str(tmp_path / "out"), checkpoint), in_process=True, progress=False)
    assert (summary.ok, summary.failed) == (1, 1)
    manifest = read_manifest(str(tmp_path / "out"))
    assert set(manifest["status"]) == {"ok", "failed"}
    assert manifest.loc[manifest["status"] == "failed", "error_class"].item() == "FileNotFoundError"
    text = json.dumps(manifest.astype(str).to_dict("records"))
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "testing-secret-key") not in text


@pytest.mark.slow
def test_metrics_reach_a_real_prometheus(tmp_path, checkpoint):
    import shutil

    from cluster import metrics_stack
    from tests.test_metrics_stack import free_port, wait_for

    if shutil.which("prometheus") is None or shutil.which("prometheus-pushgateway") is None:
        pytest.fail("prometheus and prometheus-pushgateway must be installed (setup.sh does it)")
    person_image(tmp_path / "in" / "a.png")
    person_image(tmp_path / "in" / "b.png")
    (tmp_path / "in" / "c.png").write_bytes(b"garbage")
    app_port = free_port()
    stack = metrics_stack.StackConfig(directory=tmp_path / "metrics", prometheus_port=free_port(),
                                      pushgateway_port=free_port(), scrape_interval="1s",
                                      targets=(f"127.0.0.1:{app_port}",))
    metrics_stack.up(stack)
    try:
        summary = run_bulk(_config([str(tmp_path / "in")], str(tmp_path / "out"), checkpoint, metrics_port=app_port,
                                   pushgateway=stack.pushgateway_address), in_process=True, progress=False)
        assert (summary.ok, summary.failed) == (2, 1)
        prometheus = f"http://{stack.prometheus_address}"
        # Scraped from the job's own endpoint ...
        # A scrape may have caught the job between its two images: wait for one after the second.
        scraped = wait_for(prometheus, f'pifuhd_images_total{{instance="127.0.0.1:{app_port}",status="ok"}}',
                           until=lambda result: float(result[0]["value"][1]) >= 2)
        assert float(scraped[0]["value"][1]) == 2
        # ... and pushed to the Pushgateway at the end, as batch jobs do.
        pushed = wait_for(prometheus, 'pifuhd_images_total{exported_job="pifuhd_reconstruct",status="failed"}'
                          ' or pifuhd_images_total{job="pifuhd_reconstruct",status="failed"}')
        assert float(pushed[0]["value"][1]) == 1 and pushed[0]["metric"]["error_class"] == "InputError"
        stages = wait_for(prometheus, 'sum by (stage) (pifuhd_stage_seconds_count)')
        assert {s["metric"]["stage"] for s in stages} >= {"encode", "surface", "mesh", "write"}
    finally:
        metrics_stack.down(stack.directory)


def test_single_files_and_lists_find_their_sidecars(tmp_path, monkeypatch):
    from pipelines.common.inputs import list_inputs

    person_image(tmp_path / "a.png", mode="RGB")
    (tmp_path / "a_rect.txt").write_text("60 10 180 430")
    (tmp_path / "list.txt").write_text("a.png\n")
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    for spec in ("a.png", str(tmp_path / "a.png")):
        [item] = list_inputs([spec])
        assert item.rect_uri == str(tmp_path / "a_rect.txt") and item.uri == str(tmp_path / "a.png")
    [listed] = list_inputs(["list.txt"])
    assert listed.rect_uri == str(tmp_path / "a_rect.txt")
