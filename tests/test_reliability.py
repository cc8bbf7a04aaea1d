"""Bulk jobs that nothing can stall, leak or corrupt (issue 15): one test per failure mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image


def test_large_image_is_cropped_before_float_conversion(tmp_path):
    """Decoding a big photo must not hold it as float32 in full (row 1: the 8000x8000 PNG peaked at 2.5 GB)."""
    side = 5000
    alpha = np.zeros((side, side), np.uint8)
    alpha[2000:2600, 2300:2500] = 255  # a small person: the crop is small, the image is not
    rgba = np.dstack([np.full((side, side, 3), 120, np.uint8), alpha])
    path = tmp_path / "big.png"
    Image.fromarray(rgba, "RGBA").save(path, compress_level=1)
    probe = (
        "import resource, sys\n"
        "from model.preprocess import prepare_input\n"
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


class OutOfMemoryKiller:
    """Kills, with SIGKILL as the kernel's OOM killer does, every process of this test that reads `fifo`.

    The poisoned input is a named pipe that nobody writes: a worker reading it blocks in
    open() (kernel wait channel `wait_for_partner`) until this thread finds and kills it,
    every time any worker tries it. Only descendants of this process are looked at. Counts the kills.
    """

    def __init__(self, fifo):
        import threading

        os.mkfifo(fifo)
        self.kills = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _descendants() -> set[int]:
        parents = {}
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        found, frontier = set(), {os.getpid()}
        while frontier:
            frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
            found |= frontier
        return found

    @staticmethod
    def _opening_a_fifo(pid: int) -> bool:
        try:
            return any(open(f"/proc/{pid}/task/{tid}/wchan").read() == "wait_for_partner"
                       for tid in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            return False

    def _run(self) -> None:
        while not self.stop.is_set():
            for pid in self._descendants():
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
    from model.reconstruct import ReconstructionConfig
    from pipelines.bulk import BulkConfig

    return BulkConfig(inputs=tuple(inputs), output=str(output), checkpoint=checkpoint,
                      reconstruction=ReconstructionConfig(resolution=64), **kwargs)


@pytest.fixture
def checkpoint(tmp_path):
    from tests.helpers import write_tiny_checkpoint

    return str(write_tiny_checkpoint(tmp_path / "tiny.safetensors"))


def test_input_that_kills_its_worker_becomes_a_failed_row(ray_local, tmp_path, checkpoint):
    from pipelines.bulk import read_manifest, run_bulk
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
