"""Bulk job overheads that do not depend on the network: listing and failing inputs (issue 15).

    .venv/bin/python benchmarks/reliability.py [--listed 100000] [--failing 5000]

1. Listing: `list_inputs` on a list file of `--listed` local files in one folder (empty files:
   listing never reads them). Target: under 10 s.
2. Failing inputs: `pifuhd reconstruct`'s `run_bulk` on a list file of `--failing` files that are
   not images, on a private local Ray instance with 2 CPUs, end to end (checkpoint check, listing,
   the pipeline, the manifest); Ray's start-up is measured apart and not counted. Target: under
   30 s, every input one failed row, manifest parts sized by rows and time (not 50 rows each).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pipelines.bulk import BulkConfig, run_bulk
from pipelines.formats import read_manifest
from pipelines.checkpoints import default_checkpoint
from pipelines.inputs import list_inputs


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listed", type=int, default=100_000)
    parser.add_argument("--failing", type=int, default=5_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        listing = _files(root / "listed", args.listed, b"")
        start = time.perf_counter()
        items = list_inputs([str(listing)])
        seconds = time.perf_counter() - start
        assert len(items) == args.listed
        print(f"listing {args.listed} local inputs from a list file: {seconds:.2f} s (target < 10 s)")

        failing = _files(root / "failing", args.failing, b"not an image")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        start = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        print(f"ray start-up: {time.perf_counter() - start:.1f} s (not counted)")
        try:
            output = str(root / "out")
            config = BulkConfig(inputs=(str(failing),), output=output, checkpoint=default_checkpoint())
            start = time.perf_counter()
            summary = run_bulk(config, progress=False)
            seconds = time.perf_counter() - start
        finally:
            ray.shutdown()
        manifest = read_manifest(output)
        assert summary.failed == args.failing and len(manifest) == args.failing and manifest["input_uri"].is_unique
        print(f"{args.failing} failing inputs end to end: {seconds:.1f} s (target < 30 s); "
              f"{len(summary.manifest_files)} manifest parts")


if __name__ == "__main__":
    main()
