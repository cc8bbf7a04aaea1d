"""Bulk jobs that nothing can stall, leak or corrupt (issue 15): one test per failure mode."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from pathlib import Path


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


def _descendants_of(root: int) -> set[int]:
    """Every process below `root` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


# ---- row 1: an input that kills its worker every time ------------------------------------


class OutOfMemoryKiller:
    """Kills, with SIGKILL as the kernel's OOM killer does, every process of this test that reads `fifo`.

    The poisoned input is a named pipe that nobody writes: a worker reading it blocks in
    open() (kernel wait channel `wait_for_partner`) until this thread finds and kills it,
    every time any worker tries it. Only descendants of this process are looked at. Counts the kills.
    """

    def __init__(self, fifo):
        os.mkfifo(fifo)
        self.kills = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _opening_a_fifo(pid: int) -> bool:
        try:
            return any(open(f"/proc/{pid}/task/{tid}/wchan").read() == "wait_for_partner"
                       for tid in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            return False

    def _run(self) -> None:
        while not self.stop.is_set():
            for pid in _descendants_of(os.getpid()):
                if self._opening_a_fifo(pid):
                    os.kill(pid, signal.SIGKILL)
                    self.kills += 1
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _bulk_config(inputs, output, checkpoint, **kwargs):
    from model.reconstruction.reconstruct import ReconstructionConfig
    from pipelines.bulk import BulkConfig

    return BulkConfig(inputs=tuple(inputs), output=str(output), checkpoint=checkpoint,
                      reconstruction=ReconstructionConfig(resolution=64), **kwargs)


@pytest.fixture
def checkpoint(tmp_path):
    from tests.helpers import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path / "tiny.safetensors"))


def test_input_that_kills_its_worker_becomes_a_failed_row(ray_local, tmp_path, checkpoint):
    from pipelines.bulk import run_bulk
    from pipelines.formats import read_manifest
    from tests.helpers import person_image

    good = [person_image(tmp_path / "in" / f"p{i}.png") for i in range(2)]
    bad = tmp_path / "in" / "not-an-image.png"
    bad.write_bytes(b"text")
    clean = tmp_path / "clean.txt"
    clean.write_text("\n".join(str(p) for p in [*good, bad]) + "\n")
    start = time.perf_counter()
    baseline = run_bulk(_bulk_config([str(clean)], tmp_path / "out-clean", checkpoint), progress=False)
    clean_seconds = time.perf_counter() - start
    assert (baseline.ok, baseline.failed) == (2, 1)

    poison = tmp_path / "in" / "poison.png"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in [good[0], poison, *good[1:], bad]) + "\n")
    with OutOfMemoryKiller(poison) as killer:
        start = time.perf_counter()
        summary = run_bulk(_bulk_config([str(listing)], tmp_path / "out", checkpoint), progress=False)
        poisoned_seconds = time.perf_counter() - start
    assert (summary.ok, summary.failed, summary.skipped) == (2, 2, 0)
    manifest = read_manifest(str(tmp_path / "out"))
    assert len(manifest) == 4 and manifest["input_uri"].is_unique  # every input exactly once
    row = manifest.set_index("input_uri").loc[str(poison)]
    assert row["status"] == "failed" and row["error_class"] == "WorkerCrashedError", row.to_dict()
    assert "worker" in row["error_message"] and row[["mesh_uri", "preview_uri"]].isna().all()
    assert killer.kills >= 2  # retried alone before giving up, and no more than the budget allows
    assert killer.kills <= 1 + 2
    print(f"clean job {clean_seconds:.1f} s, with the poisoned input {poisoned_seconds:.1f} s, {killer.kills} kills")
    assert poisoned_seconds < 3 * clean_seconds, (poisoned_seconds, clean_seconds)


def test_input_that_hangs_its_worker_becomes_a_failed_row_and_the_job_ends(ray_local, tmp_path, checkpoint):
    """A read that never returns (a named pipe nobody writes) stalls the pipeline: after
    `stall_timeout_s` without progress the job runs what is missing alone, and fails what hangs again."""
    from pipelines.bulk import run_bulk
    from pipelines.formats import read_manifest
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
    from pipelines.bulk import run_bulk

    return run_bulk(_bulk_config(inputs, output, checkpoint, **kwargs), in_process=True, progress=False)


def _tree_text(root) -> str:
    """Every file under root, as text (binary files decoded loosely): for secret greps."""
    return "\n".join(p.read_bytes().decode("latin-1") for p in Path(root).rglob("*") if p.is_file())


# ---- rows 2, 3: one scheme allow-list, one redaction ---------------------------------------


def test_only_local_file_and_s3_uris_are_read_and_no_secret_is_shown(tmp_path, checkpoint, capfd, caplog):
    from pipelines.formats import read_manifest
    from pipelines.uris import redact

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
    from pipelines.formats import read_manifest
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

    from pipelines.formats import read_manifest
    from pipelines.formats import read_training_metrics

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
    start = time.perf_counter()
    with pytest.raises(InputError, match="not writable"):
        _run([str(tmp_path / "in")], tmp_path / "file" / "out", checkpoint)
    assert time.perf_counter() - start < 5


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

    from pipelines.bulk import _finished

    marker = tmp_path / "a.json"
    marker.write_text(json.dumps({"run_id": "run-1", "content_hash": "h", "checkpoint_id": "c", "vertices": 10, "faces": 16,
                                  "bbox_min": [0, 0, 0], "bbox_max": [1, 1, 1]}))
    statuses = []
    for run_id in ("run-1", "run-2"):
        record = {"run_id": run_id, "marker_uri": str(marker), "content_hash": "h", "checkpoint_id": "c", "faces": None}
        assert _finished(record)
        statuses.append((record["status"], record["faces"]))
    assert statuses == [("ok", 16), ("skipped", 16)]


# ---- row 12: sidecars ----------------------------------------------------------------------


def test_sidecars_are_size_limited_and_deep_json_is_an_input_error(tmp_path, checkpoint):
    from pipelines.bulk import MAX_TEXT_SIDECAR_BYTES
    from pipelines.formats import read_manifest
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
    from pipelines.storage import safe_stem

    tail = "a/b/c/d/photo.png"
    one, two = safe_stem(tail, f"s3://bucket/x/{tail}"), safe_stem(tail, f"s3://bucket/y/{tail}")
    assert one != two  # same last four levels, different roots
    assert len(one.rsplit("-", 1)[1]) >= 32  # hex digits: 128 bits


# ---- row 15: finished_at --------------------------------------------------------------------


def test_finished_at_is_when_the_row_finished_not_when_the_driver_saw_it(tmp_path):
    from datetime import datetime, timezone

    from pipelines.bulk import _batch, _rows, prepare_rows
    from pipelines.formats import ManifestWriter

    pending = {"run_id": "r", "input_uri": str(tmp_path / "missing.png"), "status": "pending", "marker_uri": str(tmp_path / "m.json"),
               "item": {"uri": str(tmp_path / "missing.png"), "name": "missing.png"}}
    failed_at = time.time()
    [(record, _)] = _rows(prepare_rows(_batch([(pending, b"")]), (64, 128), False, 10**6))
    time.sleep(0.5)  # the row waits in Ray's queues before the driver gets it
    writer = ManifestWriter(str(tmp_path / "out"), "r", 10_000, "v")
    row = writer.add(record)
    assert row["status"] == "failed"
    assert abs(row["finished_at"] - datetime.fromtimestamp(failed_at, timezone.utc)).total_seconds() < 0.4


# ---- row 14: manifest parts by rows and time -------------------------------------------------


def test_manifest_parts_are_sized_by_rows_and_time(tmp_path):
    from pipelines.bulk import BulkConfig
    from pipelines.formats import ManifestWriter

    assert BulkConfig.manifest_flush_rows >= 10_000 and BulkConfig.manifest_flush_seconds <= 60
    writer = ManifestWriter(str(tmp_path / "out"), "r", 10_000, "v", flush_seconds=0.3)
    for index in range(500):
        writer.add({"run_id": "r", "input_uri": f"/x/{index}.png", "status": "failed"})
    assert writer.files == []  # 500 rows within the time: one part to come, not ten
    time.sleep(0.35)
    writer.add({"run_id": "r", "input_uri": "/x/last.png", "status": "failed"})
    assert len(writer.files) == 1


# ---- row 7: listing ----------------------------------------------------------------------------


def test_listing_many_inputs_from_a_list_file_or_glob_is_linear(tmp_path):
    from pipelines.inputs import list_inputs

    folder = tmp_path / "many"
    folder.mkdir()
    names = [folder / f"img{index:05d}.png" for index in range(4000)]
    for path in names:
        path.touch()
    (folder / "img00007_rect.txt").write_text("1 1 2 2")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(map(str, names)) + "\n")
    for spec in (str(listing), str(folder / "*.png")):
        start = time.perf_counter()
        items = list_inputs([spec])
        seconds = time.perf_counter() - start
        assert len(items) == 4000 and items[7].rect_uri.endswith("img00007_rect.txt")
        assert seconds < 3, f"{spec}: {seconds:.1f} s"  # was 40 s: the folder was listed once per input


# ---- rows 8, 9: checkpoints that lie or attack ---------------------------------------------


def test_a_header_config_that_lies_about_its_tensors_is_refused_at_once(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from model.network.checkpoint import read_checkpoint
    from model.errors import CheckpointError
    from tests.helpers import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    with safe_open(path, framework="pt") as handle:
        header, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    config = json.loads(header["config"])
    config["coarse_filter"]["num_stacks"] = 100_000
    save_file(tensors, tmp_path / "lying.safetensors", metadata={**header, "config": json.dumps(config)})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="num_stacks 100000"):
        read_checkpoint(tmp_path / "lying.safetensors")
    assert time.perf_counter() - start < 5


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


def test_a_terminated_driver_keeps_its_rows_and_leaves_no_process_or_temporary(tmp_path, checkpoint):
    from pipelines.formats import read_manifest
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
    started = _descendants_of(driver.pid)  # the private Ray instance: GCS, raylet, agents, workers
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
