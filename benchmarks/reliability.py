"""Bulk job overheads that do not depend on the network: listing, failing inputs, a killed worker.

    .venv/bin/python benchmarks/reliability.py [--listed 100000] [--failing 5000] [--killed-images 2]

Each figure is printed beside a baseline measured in the same run:
1. Listing: `list_inputs` on a list file and on a glob of `--listed` local files in one folder
   (empty files: listing never reads them), beside `os.listdir` of that folder. Target: under 10 s.
2. Failing inputs: `run_bulk` on a list file of `--failing` files that are not images, on a
   private local Ray instance with 2 CPUs, end to end (checkpoint check, listing, the pipeline,
   the manifest), beside the same job in process (`in_process=True`, the stages in a plain loop).
   Ray's start-up is measured apart and not counted. Target: under 30 s, every input one failed row.
3. A killed worker: the same small job (`--killed-images` person images and one non-image) with
   and without an input whose worker is killed every time it reads it (SIGKILL, as the OOM killer
   does; see tests/faults.py). Target: the poisoned job under 3x the clean one.
4. A checkpoint header that lies (num_stacks 100000) is refused without building a layer, beside
   reading the honest header.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.faults, tests.helpers

from model.reconstruction.reconstruct import ReconstructionConfig  # noqa: E402
from pipelines.jobs.bulk import BulkConfig, run_bulk  # noqa: E402
from pipelines.common.checkpoints import default_checkpoint  # noqa: E402
from pipelines.common.formats import read_manifest  # noqa: E402
from pipelines.common.inputs import list_inputs  # noqa: E402


def _files(folder: Path, count: int, content: bytes) -> Path:
    """`count` files NAME.png in `folder` and a list file naming them; returns the list file."""
    folder.mkdir(parents=True)
    paths = [str(folder / f"img{index:07d}.png") for index in range(count)]
    for path in paths:
        with open(path, "wb") as handle:
            handle.write(content)
    listing = folder.parent / f"{folder.name}.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def listing(root: Path, count: int) -> None:
    list_file = _files(root / "listed", count, b"")
    (root / "listed" / "img0000007_rect.txt").write_text("1 1 2 2")
    _, floor = _timed(lambda: os.listdir(root / "listed"))
    for name, spec in (("list file", str(list_file)), ("glob", str(root / "listed" / "*.png"))):
        items, seconds = _timed(lambda: list_inputs([spec]))
        assert len(items) == count and items[7].rect_uri.endswith("_rect.txt")
        print(f"listing {count} local inputs from a {name}: {seconds:.2f} s (target < 10 s; os.listdir {floor:.3f} s)")


def failing_inputs(root: Path, count: int) -> None:
    import ray

    failing = _files(root / "failing", count, b"not an image")

    def config(out: str) -> BulkConfig:
        return BulkConfig(inputs=(str(failing),), output=str(root / out), checkpoint=default_checkpoint())

    loop, loop_seconds = _timed(lambda: run_bulk(config("loop"), in_process=True, progress=False))
    summary, seconds = _timed(lambda: run_bulk(config("ray"), progress=False))
    manifest = read_manifest(str(root / "ray"))
    assert summary.failed == loop.failed == count and len(manifest) == count and manifest["input_uri"].is_unique
    print(f"{count} failing inputs end to end on Ray: {seconds:.1f} s (target < 30 s; the same stages in process "
          f"{loop_seconds:.1f} s); {len(summary.manifest_files)} manifest parts")
    assert ray.is_initialized()


def killed_worker(root: Path, images: int) -> None:
    from tests.faults import OutOfMemoryKiller
    from tests.helpers import person_image, write_tiny_checkpoint

    checkpoint = str(write_tiny_checkpoint(root / "tiny.safetensors"))
    good = [str(person_image(root / "killed" / f"p{index}.png")) for index in range(images)]
    bad = root / "killed" / "not-an-image.png"
    bad.write_bytes(b"text")
    poison = root / "killed" / "poison.png"
    clean, poisoned = root / "clean.txt", root / "poisoned.txt"
    clean.write_text("\n".join([*good, str(bad)]) + "\n")
    poisoned.write_text("\n".join([good[0], str(poison), *good[1:], str(bad)]) + "\n")

    def job(listing: Path, out: str):
        return run_bulk(BulkConfig(inputs=(str(listing),), output=str(root / out), checkpoint=checkpoint,
                                   reconstruction=ReconstructionConfig(resolution=64)), progress=False)

    baseline, clean_seconds = _timed(lambda: job(clean, "clean"))
    with OutOfMemoryKiller(poison) as killer:
        summary, poisoned_seconds = _timed(lambda: job(poisoned, "poisoned"))
    assert (baseline.ok, summary.ok, summary.failed) == (images, images, 2)
    print(f"a worker killed by one input ({killer.kills} kills): {poisoned_seconds:.1f} s "
          f"(target < 3x; the same job without it {clean_seconds:.1f} s: {poisoned_seconds / clean_seconds:.1f}x)")


def lying_header(root: Path) -> None:
    from model.errors import CheckpointError
    from model.network.checkpoint import read_checkpoint
    from tests.helpers import write_lying_checkpoint, write_tiny_checkpoint

    honest = write_tiny_checkpoint(root / "honest.safetensors")
    lying = write_lying_checkpoint(root / "lying.safetensors", honest)
    _, honest_seconds = _timed(lambda: read_checkpoint(honest))
    start = time.perf_counter()
    try:
        read_checkpoint(lying)
    except CheckpointError:
        pass
    print(f"a header claiming 100000 stacks refused in {time.perf_counter() - start:.3f} s "
          f"(reading the honest one: {honest_seconds:.3f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listed", type=int, default=100_000)
    parser.add_argument("--failing", type=int, default=5_000)
    parser.add_argument("--killed-images", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        listing(root, args.listed)
        lying_header(root)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_worker_niceness", "0")
        import ray

        start = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"ray start-up: {time.perf_counter() - start:.1f} s (not counted)")
        try:
            failing_inputs(root, args.failing)
            killed_worker(root, args.killed_images)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
