"""Bulk jobs that nothing can stall, leak or corrupt: one test per failure mode. Their timings
(listing, a killed worker's cost, failing inputs) are in benchmarks/reliability.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pathlib import Path

from tests.faults import OutOfMemoryKiller, descendants_of


def test_large_image_is_cropped_before_float_conversion(tmp_path):
    """Decoding a big photo must not hold it as float32 in full (row 1: the 8000x8000 PNG peaked at 2.5 GB)."""
    side = 4000
    alpha = np.zeros((side, side), np.uint8)
    alpha[1500:2100, 1800:2000] = 255  # a small person: the crop is small, the image is not
    rgba = np.dstack([np.full((side, side, 3), 120, np.uint8), alpha])
    path = tmp_path / "big.png"
    Image.fromarray(rgba, "RGBA").save(path, compress_level=1)
    probe = (
        "import resource, sys\n"
        "from model.reconstruction.preprocess import prepare_input\n"
        f"data = open({str(path)!r}, 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "prepared = prepare_input(data, name='big.png', sizes=(64, 128))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert prepared.box_source == 'alpha'\n"
        "print((after - before) * 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    bytes_per_pixel = int(result.stdout.strip()) / side**2
    # The file decodes to 4 bytes a pixel (RGBA uint8), held twice at most (PIL's copy and numpy's).
    assert bytes_per_pixel < 10, f"decoding peaked at {bytes_per_pixel:.1f} bytes per pixel"


# ---- row 1: an input that kills its worker every time ------------------------------------


def _bulk_config(inputs, output, checkpoint, **kwargs):
    from model.reconstruction.reconstruct import ReconstructionConfig
    from pipelines.jobs.bulk import BulkConfig

    return BulkConfig(inputs=tuple(inputs), output=str(output), checkpoint=checkpoint,
                      reconstruction=ReconstructionConfig(resolution=64), **kwargs)


@pytest.fixture
def checkpoint(tmp_path):
    from tests.helpers import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path / "tiny.safetensors"))


@pytest.fixture
def busy_cores():
    """Two busy loops beside the test, as on a loaded machine (stopped by their PIDs afterwards)."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for loop in loops:
        loop.kill()
        loop.wait()


def _cpus_freed(ray, seconds: float = 30.0) -> bool:
    """Whether every CPU of the Ray instance is free within `seconds` (the job's actors are gone)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.2)
    return False


def test_input_that_kills_its_worker_becomes_a_failed_row(ray_local, busy_cores, tmp_path, checkpoint):
    """With both cores busy: the retries of the killed input run at once (the finished pipeline's
    stage actors do not hold the CPUs they need), and the good inputs never fail."""
    from pipelines.jobs.bulk import run_bulk
    from pipelines.common.formats import read_manifest
    from tests.helpers import person_image

    good = [person_image(tmp_path / "in" / f"p{i}.png") for i in range(2)]
    bad = tmp_path / "in" / "not-an-image.png"
    bad.write_bytes(b"text")
    poison = tmp_path / "in" / "poison.png"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in [good[0], poison, *good[1:], bad]) + "\n")
    with OutOfMemoryKiller(poison) as killer:
        summary = run_bulk(_bulk_config([str(listing)], tmp_path / "out", checkpoint), progress=False)
    assert _cpus_freed(ray_local), ray_local.available_resources()
    assert (summary.ok, summary.failed, summary.skipped) == (2, 2, 0)
    manifest = read_manifest(str(tmp_path / "out"))
    assert len(manifest) == 4 and manifest["input_uri"].is_unique  # every input exactly once
    row = manifest.set_index("input_uri").loc[str(poison)]
    assert row["status"] == "failed" and row["error_class"] == "WorkerCrashedError", row.to_dict()
    assert "worker" in row["error_message"] and row[["mesh_uri", "preview_uri"]].isna().all()
    assert killer.kills >= 2  # retried alone before giving up, and no more than the budget allows
    assert killer.kills <= 1 + 2


def test_input_that_hangs_its_worker_becomes_a_failed_row_and_the_job_ends(ray_local, tmp_path, checkpoint):
    """A read that never returns (a named pipe nobody writes) stalls the pipeline: after
    `stall_timeout_s` without progress the job runs what is missing alone, and fails what hangs again."""
    from pipelines.jobs.bulk import run_bulk
    from pipelines.common.formats import read_manifest
    from tests.helpers import person_image

    good = [person_image(tmp_path / "in" / f"p{i}.png") for i in range(2)]
    hang = tmp_path / "in" / "hang.png"
    os.mkfifo(hang)
    listing = tmp_path / "list.txt"
    # Last in the list: run alone, the good inputs (if they did not pass before the stall) go first,
    # each with its own deadline, which also covers a fresh worker's start on a loaded machine.
    listing.write_text("\n".join(str(p) for p in [*good, hang]) + "\n")
    try:
        summary = run_bulk(_bulk_config([str(listing)], tmp_path / "out", checkpoint, stall_timeout_s=25.0),
                           progress=False)
    finally:
        _release_fifo_readers(hang)
    assert (summary.ok, summary.failed) == (2, 1)
    manifest = read_manifest(str(tmp_path / "out")).set_index("input_uri")
    assert len(manifest) == 3
    row = manifest.loc[str(hang)]
    assert row["status"] == "failed" and row["error_class"] == "Stalled", row.to_dict()
    assert "stall_timeout_s" in row["error_message"]


def _release_fifo_readers(fifo) -> None:
    """Open `fifo` for writing until no reader waits on it, so no worker stays blocked after the test."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a blocked reader wakes and reads EOF
        except OSError:  # ENXIO: no reader left
            return
        time.sleep(0.1)


def _run(inputs, output, checkpoint, **kwargs):
    from pipelines.jobs.bulk import run_bulk

    return run_bulk(_bulk_config(inputs, output, checkpoint, **kwargs), in_process=True, progress=False)


def _tree_text(root) -> str:
    """Every file under root, as text (binary files decoded loosely): for secret greps."""
    return "\n".join(p.read_bytes().decode("latin-1") for p in Path(root).rglob("*") if p.is_file())


# ---- rows 2, 3: one scheme allow-list, one redaction ---------------------------------------


def test_only_local_file_and_s3_uris_are_read_and_no_secret_is_shown(tmp_path, checkpoint, capfd, caplog):
    from pipelines.common.formats import read_manifest
    from pipelines.common.uris import redact

    chained = tmp_path / "in" / "odd::name.png"  # '::' in a file name is part of the name, not a URL chain
    chained.parent.mkdir()
    chained.write_bytes(b"not an image")
    hostile = [
        "http://user:hunter2pass@127.0.0.1:9/x.png",  # nothing listens on port 9: a fetch would show as another error
        "memory://x.png",
        "data:image/png;base64,iVBORw0KGgo=",
        f"zip://x.png::file://{tmp_path}/in.zip",
        "s3://AKIAEXAMPLE:wJalrXUtn/FEMI+hunter2pass@bucket/x.png",
    ]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(chained), *hostile]) + "\n")
    caplog.set_level("DEBUG")
    summary = _run([str(listing)], tmp_path / "out", checkpoint)
    assert (summary.ok, summary.failed) == (0, 6)
    manifest = read_manifest(str(tmp_path / "out")).set_index("input_uri")
    assert manifest.loc[str(chained), "error_class"] == "InputError"  # read as the local file it is
    refused = manifest.drop(index=str(chained))
    assert set(refused["error_class"]) == {"UnsupportedURIError"} and len(refused) == 5
    assert refused["error_message"].str.contains("not supported|credentials in a URI").all()
    captured = capfd.readouterr()
    for secret in ("hunter2pass", "wJalrXUtn"):
        assert secret not in _tree_text(tmp_path / "out")
        assert secret not in captured.out + captured.err + caplog.text
    assert redact("pushing to http://u:hunter2pass@127.0.0.1:9091 failed") == "pushing to http://127.0.0.1:9091 failed"
    assert redact("s3://bucket/a@b.png") == "s3://bucket/a@b.png"  # an '@' in a key is not user-info


def test_output_and_checkpoint_uris_outside_the_allow_list_are_usage_errors(tmp_path, capsys):
    from pipelines.cli import main

    for argv in (["reconstruct", "in/", "-o", "memory://out"],
                 ["reconstruct", "in/", "-o", "out", "--checkpoint", "http://127.0.0.1:9/m.safetensors"],
                 ["train", "--stage", "normal", "--data", "zip://d::file:///x.zip", "--out", "out"],
                 ["train", "--stage", "normal", "--data", "data", "--out", "memory://runs"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "is not supported" in capsys.readouterr().err


# ---- row 4: file names that are not UTF-8 ------------------------------------------------


def test_file_names_that_are_not_utf8(tmp_path, checkpoint):
    from pipelines.common.formats import read_manifest
    from tests.helpers import person_image

    folder = tmp_path / "in"
    image = person_image(tmp_path / "plain.png").read_bytes()
    folder.mkdir()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9-\xff.png"), "wb") as handle:  # Latin-1: not UTF-8
        handle.write(image)
    summary = _run([str(folder)], tmp_path / "out", checkpoint)
    assert (summary.ok, summary.failed) == (1, 0)
    manifest = read_manifest(str(tmp_path / "out"))
    assert any(uri.endswith("caf\\xe9-\\xff.png") for uri in manifest["input_uri"])
    assert all(Path(uri).exists() for uri in manifest["mesh_uri"])


# ---- row 5: torn manifest and metrics parts ---------------------------------------------


def test_a_torn_parquet_part_is_skipped_with_a_warning_naming_it(tmp_path, checkpoint, caplog):
    import pandas as pd

    from pipelines.common.formats import read_manifest
    from pipelines.common.formats import read_training_metrics

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "text.png").write_bytes(b"not an image")
    _run([str(tmp_path / "in")], tmp_path / "out", checkpoint)
    [part] = (tmp_path / "out" / "manifest").glob("*.parquet")
    torn = part.with_name("run-torn-00000.parquet")
    torn.write_bytes(part.read_bytes()[: len(part.read_bytes()) // 2])  # a crash mid-write
    assert not list((tmp_path / "out").rglob("*.tmp-*"))  # atomic writes leave no temporaries
    with caplog.at_level("WARNING"):
        manifest = read_manifest(str(tmp_path / "out"))
    assert len(manifest) == 1 and str(torn) in caplog.text

    metrics = tmp_path / "run" / "metrics"
    metrics.mkdir(parents=True)
    pd.DataFrame([{"step": 10, "loss": 0.5, "stage": "normal"}]).to_parquet(metrics / "step-000000010.parquet")
    (metrics / "step-000000020.parquet").write_bytes(b"PAR1 torn")
    with caplog.at_level("WARNING"):
        assert read_training_metrics(str(tmp_path / "run"))["step"].tolist() == [10]
    assert "step-000000020.parquet" in caplog.text


# ---- row 6: checks before any compute ----------------------------------------------------


def test_unwritable_output_fails_before_any_compute(tmp_path, checkpoint):
    from model.errors import InputError
    from tests.helpers import person_image

    person_image(tmp_path / "in" / "a.png")
    (tmp_path / "file").write_text("a file where the output folder should go")
    with pytest.raises(InputError, match="not writable"):
        _run([str(tmp_path / "in")], tmp_path / "file" / "out", checkpoint)


def test_a_marker_with_wrong_field_types_means_redo_not_crash(tmp_path, checkpoint):
    import json

    from tests.helpers import person_image

    person_image(tmp_path / "in" / "a.png")
    assert _run([str(tmp_path / "in")], tmp_path / "out", checkpoint).ok == 1
    [marker] = (tmp_path / "out" / "meshes").glob("*.json")
    fields = json.loads(marker.read_text())
    marker.write_text(json.dumps({**fields, "vertices": "many", "bbox_min": "low"}))
    again = _run([str(tmp_path / "in")], tmp_path / "out", checkpoint)
    assert (again.ok, again.skipped, again.failed) == (1, 0, 0)


# ---- row 11: an output inside the input folder -------------------------------------------


def test_output_inside_the_input_folder_is_not_read_back(tmp_path, checkpoint):
    from tests.helpers import person_image

    person_image(tmp_path / "in" / "a.png")
    first = _run([str(tmp_path / "in")], tmp_path / "in" / "out", checkpoint)
    second = _run([str(tmp_path / "in")], tmp_path / "in" / "out", checkpoint)
    assert (first.total, first.ok) == (1, 1) and (second.total, second.skipped) == (1, 1)


def test_an_input_whose_row_was_lost_after_its_files_were_written_is_ok_not_skipped(tmp_path):
    """A node that dies after an input's files (marker last) are written loses only its row: the
    retry finds this run's marker and reports the input ok; another run's marker means skipped."""
    import json

    from pipelines.jobs.bulk_stages import already_finished

    marker = tmp_path / "a.json"
    marker.write_text(json.dumps({"run_id": "run-1", "content_hash": "h", "settings_key": "k", "vertices": 10, "faces": 16,
                                  "bbox_min": [0, 0, 0], "bbox_max": [1, 1, 1]}))
    statuses = []
    for run_id in ("run-1", "run-2"):
        record = {"run_id": run_id, "marker_uri": str(marker), "content_hash": "h", "settings_key": "k", "faces": None}
        assert already_finished(record)
        statuses.append((record["status"], record["faces"]))
    assert statuses == [("ok", 16), ("skipped", 16)]


# ---- row 12: sidecars ----------------------------------------------------------------------


def test_sidecars_are_size_limited_and_deep_json_is_an_input_error(tmp_path, checkpoint):
    from pipelines.common.stage_rows import MAX_TEXT_SIDECAR_BYTES
    from pipelines.common.formats import read_manifest
    from tests.helpers import person_image

    for name in ("deep", "huge"):
        person_image(tmp_path / "in" / f"{name}.png", mode="RGB")
    (tmp_path / "in" / "deep_keypoints.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "in" / "huge_rect.txt").write_text("60 10 180 430\n" + "#" * MAX_TEXT_SIDECAR_BYTES)
    summary = _run([str(tmp_path / "in")], tmp_path / "out", checkpoint)
    assert summary.failed == 2
    rows = read_manifest(str(tmp_path / "out")).set_index("error_message", drop=False)
    assert set(rows["error_class"]) == {"InputError"}
    messages = " | ".join(rows["error_message"])
    assert "nested too deeply" in messages and "exceeds the limit" in messages


# ---- row 13: output names ------------------------------------------------------------------


def test_output_names_hash_the_whole_uri_with_128_bits():
    from pipelines.common.storage import safe_stem

    tail = "a/b/c/d/photo.png"
    one, two = safe_stem(tail, f"s3://bucket/x/{tail}"), safe_stem(tail, f"s3://bucket/y/{tail}")
    assert one != two  # same last four levels, different roots
    assert len(one.rsplit("-", 1)[1]) >= 32  # hex digits: 128 bits


# ---- row 15: finished_at --------------------------------------------------------------------


def test_finished_at_is_when_the_row_finished_not_when_the_driver_saw_it(tmp_path):
    from datetime import datetime, timezone

    from model.reconstruction.people import PersonOptions
    from pipelines.common.stage_rows import rows, to_table
    from pipelines.jobs.bulk_stages import STAGE_SCHEMA, InputPreparer
    from pipelines.common.formats import ManifestWriter

    pending = {"run_id": "r", "input_uri": str(tmp_path / "missing.png"), "status": "pending", "marker_uri": str(tmp_path / "m.json"),
               "item": {"uri": str(tmp_path / "missing.png"), "name": "missing.png"}}
    before = datetime.now(timezone.utc)
    preparer = InputPreparer(sizes=(64, 128), overwrite=False, max_pixels=10**6, person=PersonOptions(), mesh_format="obj")
    [(record, _)] = rows(preparer(to_table([(pending, b"")], STAGE_SCHEMA)))
    failed_by = datetime.now(timezone.utc)
    time.sleep(0.1)  # the row waits in Ray's queues before the driver gets it
    writer = ManifestWriter(str(tmp_path / "out"), "r", 10_000, "v")
    row = writer.add(record)
    assert row["status"] == "failed"
    assert before <= row["finished_at"] <= failed_by


# ---- row 14: manifest parts by rows and time -------------------------------------------------


def test_manifest_parts_are_sized_by_rows_and_time(tmp_path):
    from pipelines.jobs.bulk import BulkConfig
    from pipelines.common.formats import ManifestWriter

    assert BulkConfig.manifest_flush_rows >= 10_000 and BulkConfig.manifest_flush_seconds <= 60
    writer = ManifestWriter(str(tmp_path / "out"), "r", 10_000, "v", flush_seconds=60)
    for index in range(500):
        writer.add({"run_id": "r", "input_uri": f"/x/{index}.png", "status": "failed"})
    assert writer.files == []  # 500 rows within the time: one part to come, not ten
    writer.last_flush -= 60  # a minute later
    writer.add({"run_id": "r", "input_uri": "/x/last.png", "status": "failed"})
    assert len(writer.files) == 1


# ---- row 7: listing ----------------------------------------------------------------------------


def test_listing_many_inputs_from_a_list_file_or_glob_is_linear(tmp_path):
    from pipelines.common.inputs import list_inputs

    folder = tmp_path / "many"
    folder.mkdir()
    names = [folder / f"img{index:05d}.png" for index in range(4000)]
    for path in names:
        path.touch()
    (folder / "img00007_rect.txt").write_text("1 1 2 2")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(map(str, names)) + "\n")
    for spec in (str(listing), str(folder / "*.png")):  # its speed: benchmarks/reliability.py
        items = list_inputs([spec])
        assert len(items) == 4000 and items[7].rect_uri.endswith("img00007_rect.txt")


# ---- rows 8, 9: checkpoints that lie or attack ---------------------------------------------


def test_a_header_config_that_lies_about_its_tensors_is_refused_at_once(tmp_path):
    from model.network.checkpoint import read_checkpoint
    from model.errors import CheckpointError
    from tests.helpers import write_lying_checkpoint, write_tiny_checkpoint

    lying = write_lying_checkpoint(tmp_path / "lying.safetensors", write_tiny_checkpoint(tmp_path / "tiny.safetensors"))
    with pytest.raises(CheckpointError, match="num_stacks 100000"):  # refused before a layer is built
        read_checkpoint(lying)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class _NamespaceWithPositionalArguments:
    def __reduce__(self):
        import argparse

        return (argparse.Namespace, ("positional",))


def test_malicious_pickles_are_refused_naming_what_was_refused(tmp_path):
    import torch

    from model.network.checkpoint import read_checkpoint
    from model.errors import CheckpointError

    torch.save({"model_state_dict": {}, "opt": _RunsCode()}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(tmp_path / "code.pt")
    assert "system" in str(refused.value) and "weights_only" not in str(refused.value)
    torch.save({"model_state_dict": {}, "opt": _NamespaceWithPositionalArguments()}, tmp_path / "namespace.pt")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_checkpoint(tmp_path / "namespace.pt")


# ---- row 16: a stopped driver -------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_terminated_driver_keeps_its_rows_and_leaves_no_process_or_temporary(tmp_path, checkpoint):
    from pipelines.common.formats import read_manifest
    from tests.helpers import person_image

    count = 40  # enough that the job is still running when the signal comes, on a quiet machine too
    for index in range(count):
        person_image(tmp_path / "in" / f"p{index}.png")
    out = tmp_path / "out"
    (out / "meshes").mkdir(parents=True)
    stale, fresh = out / "meshes" / "old.obj.tmp-0123abcd", out / "meshes" / "new.obj.tmp-89abcdef"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"in flight")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    command = [sys.executable, "-m", "pipelines.cli", "reconstruct", str(tmp_path / "in"), "-o", str(out),
               "--checkpoint", checkpoint, "--resolution", "64"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr = bytearray()  # the progress bar says how many rows the driver has received
    reader = threading.Thread(target=lambda: [stderr.extend(chunk) for chunk in iter(lambda: driver.stderr.read1(4096), b"")])
    reader.start()
    deadline = time.monotonic() + 240
    while max(map(int, re.findall(rb"ok=(\d+)", bytes(stderr))), default=0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    started = descendants_of(driver.pid)  # the private Ray instance: GCS, raylet, agents, workers
    assert started, "the job started no Ray processes"
    driver.send_signal(signal.SIGTERM)
    driver.wait(timeout=120)
    reader.join()
    assert driver.returncode == 128 + 15, stderr.decode(errors="replace")[-3000:]
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in started if _alive(pid)], "Ray processes outlived the stopped driver"
    rows = read_manifest(str(out))  # what came back before the signal is kept
    assert 2 <= len(rows) < count and (rows["status"] == "ok").all()
    assert not stale.exists() and fresh.exists()  # a young temporary may be another job's


# ---- failing stores, damaged weights, inputs in the output, secrets in any shape, exit codes ----


def test_rows_survive_an_output_store_that_fails_and_come_back_with_it(tmp_path, checkpoint):
    """The store refuses the manifest (here a file where its folder goes): the job stops taking
    inputs, keeps every computed row in the local spool and says so; once the store is back the
    next job moves them in, and each input is in the manifest exactly once."""
    import pandas as pd

    from model.errors import StoreError
    from pipelines.common.formats import read_manifest, spool_folder
    from tests.helpers import person_image

    for index in range(3):
        person_image(tmp_path / "in" / f"p{index}.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest").write_text("a file where the manifest folder goes: every part write fails")
    with pytest.raises(StoreError) as failed:
        _run([str(tmp_path / "in")], out, checkpoint, manifest_flush_rows=1, manifest_retry_delays_s=(0.01, 0.01))
    message = str(failed.value)
    assert str(out) in message and "refused the manifest 3 times" in message and spool_folder(str(out)) in message
    spooled = list(Path(spool_folder(str(out))).glob("*.parquet"))
    assert len(spooled) == 1  # the one row computed before the store failed; no new input was taken after it
    [first_run_id] = pd.read_parquet(spooled[0])["run_id"].unique()
    (out / "manifest").unlink()  # the store is back
    again = _run([str(tmp_path / "in")], out, checkpoint)
    manifest = read_manifest(str(out))
    first_run = manifest[manifest["run_id"] == first_run_id]
    assert len(first_run) == 1 and first_run["status"].tolist() == ["ok"]  # the spooled row, moved in
    assert (again.ok, again.skipped) == (2, 1)  # the spooled input's outputs were complete: not redone
    assert len(manifest) == 4 and set(manifest.groupby("run_id")["input_uri"].nunique()) == {1, 3}
    assert not list(Path(spool_folder(str(out))).glob("*.parquet"))


def test_the_writability_check_writes_real_bytes(tmp_path):
    """A disk with no room (here: a 64 KiB file-size limit) fails the check, which a 0-byte probe passed."""
    import resource

    probe = ("import resource, signal\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))\n"
             "from pipelines.common.stage_rows import check_writable\n"
             f"check_writable({str(tmp_path / 'out')!r})\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "InputError" in result.stderr and "not writable" in result.stderr, result.stderr
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # the limit stayed in the child


def test_inputs_inside_the_output_folder_are_a_usage_error_and_outputs_are_skipped(tmp_path, checkpoint, capsys, caplog):
    from pipelines.cli import main
    from tests.helpers import person_image

    out = tmp_path / "out"
    photo = person_image(out / "photo.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photo}\n")
    for spec in (str(out), str(photo), str(listing)):
        code = main(["reconstruct", spec, "-o", str(out), "--in-process", "--checkpoint", checkpoint, "--resolution", "64"])
        assert code == 2 and "inside the output folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["photo.png"]  # nothing was written

    person_image(tmp_path / "in" / "a.png")
    assert _run([str(tmp_path / "in")], tmp_path / "in" / "out", checkpoint).ok == 1
    with caplog.at_level("WARNING"):
        second = _run([str(tmp_path / "in")], tmp_path / "in" / "out", checkpoint)
    assert (second.total, second.skipped) == (1, 1)
    assert re.search(r"skipped \d+ files that are this project's outputs", caplog.text)


def _damage_tensor(path, name: str, value: float) -> None:
    """Overwrite one tensor's bytes in a safetensors file in place (header intact)."""
    import json
    import struct

    data = bytearray(path.read_bytes())
    header_length = struct.unpack("<Q", data[:8])[0]
    start, end = json.loads(data[8:8 + header_length])[name]["data_offsets"]
    offset = 8 + header_length
    data[offset + start:offset + end] = np.full((end - start) // 4, value, np.float32).tobytes()
    path.write_bytes(bytes(data))


def test_nan_weights_are_refused_and_an_empty_mesh_is_a_failed_row(tmp_path, checkpoint, capsys):
    from safetensors import safe_open

    from pipelines.cli import main
    from pipelines.common.formats import read_manifest
    from tests.helpers import person_image

    person_image(tmp_path / "in" / "a.png")
    with safe_open(checkpoint, framework="pt") as handle:
        keys = list(handle.keys())
    damaged = tmp_path / "nan.safetensors"
    damaged.write_bytes(Path(checkpoint).read_bytes())
    _damage_tensor(damaged, keys[len(keys) // 2], float("nan"))
    code = main(["reconstruct", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--in-process", "--checkpoint",
                 str(damaged), "--resolution", "64"])
    assert code == 4 and "hold NaN or Inf" in capsys.readouterr().err

    # Every point outside: the last layer's bias far below zero leaves no surface to extract.
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(Path(checkpoint).read_bytes())
    last_bias = sorted(k for k in keys if k.startswith("mlp.") and k.endswith(".bias"))[-1]
    _damage_tensor(empty, last_bias, -1e4)
    summary = _run([str(tmp_path / "in")], tmp_path / "out-empty", str(empty))
    row = read_manifest(str(tmp_path / "out-empty")).iloc[0]
    assert summary.failed == 1 and row["error_class"] == "SurfaceError" and row["vertices"] is pd.NA


def test_a_credentialed_and_a_plain_uri_of_one_object_are_one_input(tmp_path, s3_server):
    from pipelines.common.inputs import list_inputs

    plain = "s3://bucket/photos/a.png"
    items = list_inputs([str(_list_file(tmp_path, ["s3://KEY:SECRET@bucket/photos/a.png", plain]))])
    assert [item.uri for item in items] == [plain]


def _list_file(tmp_path, lines):
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_input_that_fails_while_writing_leaves_no_outputs(tmp_path, checkpoint):
    """A write that fails half-way (a full disk; here a folder where the preview goes) leaves no mesh without a row."""
    from pipelines.common.formats import read_manifest
    from tests.helpers import person_image

    person_image(tmp_path / "in" / "a.png")
    first = _run([str(tmp_path / "in")], tmp_path / "probe", checkpoint)
    [preview] = [Path(p) for p in read_manifest(str(tmp_path / "probe"))["preview_uri"]]
    blocked = tmp_path / "out" / preview.relative_to(tmp_path / "probe")
    blocked.mkdir(parents=True)
    summary = _run([str(tmp_path / "in")], tmp_path / "out", checkpoint)
    assert first.ok == 1 and summary.failed == 1
    assert [p for p in (tmp_path / "out" / "meshes").iterdir()] == [blocked]  # the mesh written before it is gone


def test_every_shape_of_secret_is_redacted():
    from pipelines.common.uris import redact

    cases = {
        "pushing to user:hunter2pass@127.0.0.1:9091 failed": "pushing to 127.0.0.1:9091 failed",
        "127.0.0.1:9091?token=hunter2pass": "127.0.0.1:9091?<redacted>",
        "http://u:hunter2pass@127.0.0.1:9091/x?token=hunter2pass": "http://127.0.0.1:9091/x?<redacted>",
        "s3://bucket/a@b.png": "s3://bucket/a@b.png",
        "at 12:30 5@x": "at 12:30 5@x",
    }
    assert {text: redact(text) for text in cases} == cases


@pytest.mark.parametrize("option, value, code", [
    ("--pushgateway", "user:hunter2pass@127.0.0.1:9091", 2),
    ("--pushgateway", "127.0.0.1:9091?token=hunter2pass", 2),
    ("--pushgateway", "127.0.0.1:notaport", 2),
    ("--metrics-port", "70000", 2),
])
def test_metrics_options_are_checked_before_any_work_and_show_no_secret(tmp_path, checkpoint, capfd, option, value, code):
    from pipelines.cli import main

    assert main(["reconstruct", str(tmp_path), "-o", str(tmp_path / "out"), "--in-process", "--checkpoint", checkpoint,
                 option, value]) == code
    err = capfd.readouterr().err
    assert option in err and "hunter2pass" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_metrics_port_in_use_is_exit_4_in_one_line(tmp_path, checkpoint, capfd):
    import socket

    from pipelines.cli import main
    from tests.helpers import person_image

    person_image(tmp_path / "in" / "a.png")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        code = main(["reconstruct", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--in-process", "--checkpoint",
                     checkpoint, "--resolution", "64", "--metrics-port", str(held.getsockname()[1])])
    err = capfd.readouterr().err
    assert code == 4 and "cannot serve metrics" in err and "Traceback" not in err


def test_listing_errors_and_deep_checkpoint_headers_are_one_line_errors(tmp_path, s3_server, capfd):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from model.errors import CheckpointError, InputError
    from model.network.checkpoint import read_checkpoint
    from pipelines.common.inputs import list_inputs
    from tests.helpers import write_tiny_checkpoint

    with pytest.raises(InputError, match="cannot be listed"):
        list_inputs(["s3://Not_A_Valid_Bucket!/photos/"])
    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    with safe_open(path, framework="pt") as handle:
        header, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, tmp_path / "deep.safetensors", metadata={**header, "config": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match="RecursionError"):
        read_checkpoint(tmp_path / "deep.safetensors")
    assert json.loads(header["config"])  # the original header was fine


def test_sigint_writes_what_it_has_and_exits_130(tmp_path, checkpoint):
    from pipelines.common.formats import read_manifest
    from tests.helpers import person_image

    count = 30
    for index in range(count):
        person_image(tmp_path / "in" / f"p{index}.png")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipelines.cli", "reconstruct", str(tmp_path / "in"), "-o", str(out),
               "--checkpoint", checkpoint, "--resolution", "64", "--in-process"]
    # As from a terminal: Ctrl-C's default action, whatever this process inherited (a child of a process
    # that ignores SIGINT, e.g. after Ray's in-process start, would ignore it too).
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr = bytearray()
    reader = threading.Thread(target=lambda: [stderr.extend(chunk) for chunk in iter(lambda: driver.stderr.read1(4096), b"")])
    reader.start()
    deadline = time.monotonic() + 240
    while max(map(int, re.findall(rb"ok=(\d+)", bytes(stderr))), default=0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)
    driver.wait(timeout=120)
    reader.join()
    text = stderr.decode(errors="replace")
    assert driver.returncode == 130 and "Traceback" not in text, text[-3000:]
    rows = read_manifest(str(out))
    assert 2 <= len(rows) < count and (rows["status"] == "ok").all()
