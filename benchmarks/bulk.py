"""Bulk reconstruction throughput: the Ray Data pipeline against the same stages in a plain loop.

    .venv/bin/python benchmarks/bulk.py [--images 6] [--resolution 256] [--checkpoint PATH]

Both runs reconstruct the same images (copies of examples/person.png) with the same checkpoint
(default: the shipped small model) into fresh output folders; the loop is `run_bulk(...,
in_process=True)`, which calls exactly the pipeline's stage functions one image at a time.
Ray's start-up is measured apart and not counted. Target: the pipeline reaches at least 90 %
of the loop's images/s on 2 CPUs.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from model.reconstruction.reconstruct import ReconstructionConfig
from pipelines.jobs.bulk import BulkConfig, run_bulk
from pipelines.common.formats import read_manifest
from pipelines.common.checkpoints import default_checkpoint, default_fallback
from pipelines.common.ray_runtime import connect_ray

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "person.png"
STAGES = ("read", "prepare", "encode", "surface", "mesh", "write")


def stage_means(output: str) -> str:
    manifest = read_manifest(output)
    return ", ".join(f"{s} {manifest[f'seconds_{s}'].mean():.2f}" for s in STAGES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()
    checkpoint = args.checkpoint or default_checkpoint()

    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "in"
        inputs.mkdir()
        for index in range(args.images):
            shutil.copy(EXAMPLE, inputs / f"person{index}.png")

        def config(out: str) -> BulkConfig:
            # As `pifuhd reconstruct` runs the shipped model: its plain twin meshes what no body fits.
            fallback = default_fallback(args.checkpoint, None)
            return BulkConfig(inputs=(str(inputs),), output=out, checkpoint=checkpoint, fallback_checkpoint=fallback,
                              reconstruction=ReconstructionConfig(resolution=args.resolution))

        loop = run_bulk(config(f"{tmp}/loop"), in_process=True, progress=False)
        assert loop.ok == args.images, loop.failures
        start = time.perf_counter()
        connect_ray(None)
        ray_start = time.perf_counter() - start
        pipeline = run_bulk(config(f"{tmp}/ray"), progress=False)

        print(f"{args.images} images at resolution {args.resolution}, checkpoint {checkpoint}")
        for name, summary, out in (("plain loop", loop, f"{tmp}/loop"), ("Ray Data", pipeline, f"{tmp}/ray")):
            print(f"  {name:<10} {summary.total / summary.seconds:.3f} images/s ({summary.seconds:.1f} s, "
                  f"{summary.ok} ok); mean seconds per stage: {stage_means(out)}")
        ratio = (pipeline.total / pipeline.seconds) / (loop.total / loop.seconds)
        print(f"  Ray Data reaches {100 * ratio:.0f} % of the loop's throughput (target >= 90 %); "
              f"Ray start-up {ray_start:.1f} s, not counted")


if __name__ == "__main__":
    main()
