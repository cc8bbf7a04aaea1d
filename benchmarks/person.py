"""Person finder speed, alone and in the bulk pipeline.

    .venv/bin/python benchmarks/person.py [--runs 10] [--images 8] [--resolution 256] [--repeats 2]

1. Seconds per image of `PersonFinder.find` (one interpreter thread, torch on one thread) on
   examples/synthetic_person.png composited onto a procedural background, at 512 x 512 and
   1024 x 1024 (median of --runs calls after a warm-up). Target: < 0.3 s at 1024.
2. Bulk throughput (Ray Data, shipped model) over the same JPEG photos twice: with a
   NAME_mask.png beside each (the finder never runs) and without (the finder cuts each person
   out). The two alternate --repeats times in one run, each into a fresh output folder; Ray's
   start-up is not counted. Target: finder-on reaches >= 95 % of the sidecar-mask throughput.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from model.person import PersonFinder, PersonFinderConfig
from model.reconstruction.reconstruct import ReconstructionConfig
from model.data.scenes import procedural_background
from pipelines.jobs.bulk import BulkConfig, run_bulk
from pipelines.common.formats import read_manifest
from pipelines.common.checkpoints import default_checkpoint
from pipelines.common.ray_runtime import connect_ray

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "synthetic_person.png"
STAGES = ("read", "prepare", "encode", "surface", "mesh", "write")


def photo(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 photo of the example person on a procedural background, and its (size, size) bool mask."""
    rgba = np.asarray(Image.open(EXAMPLE).convert("RGBA").resize((size, size), Image.BILINEAR), np.float32) / 255
    alpha = rgba[..., 3:]
    background = procedural_background(np.random.default_rng(seed), size).astype(np.float32) / 255
    rgb = rgba[..., :3] * alpha + background * (1 - alpha)
    return (rgb * 255 + 0.5).astype(np.uint8), alpha[..., 0] > 0.5


def finder_seconds(runs: int) -> None:
    torch.set_num_threads(1)
    finder = PersonFinder(PersonFinderConfig(threads=1))
    for size in (512, 1024):
        image, mask = photo(size, seed=size)
        people = finder.find(image)  # warm-up
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            finder.find(image)
            times.append(time.perf_counter() - start)
        iou = (people[0].mask & mask).sum() / (people[0].mask | mask).sum() if people else 0.0
        print(f"  finder at {size} x {size}: {statistics.median(times):.3f} s per image (median of {runs}; "
              f"min {min(times):.3f}), {len(people)} person, mask IoU {iou:.3f}"
              + ("  (target < 0.3 s)" if size == 1024 else ""))


def bulk_throughput(images: int, resolution: int, repeats: int) -> None:
    checkpoint = default_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        plain, masked = Path(tmp) / "plain", Path(tmp) / "masked"
        plain.mkdir()
        masked.mkdir()
        for index in range(images):
            image, mask = photo(512, seed=index)
            for folder in (plain, masked):
                Image.fromarray(image).save(folder / f"photo{index}.jpg", quality=92)
            Image.fromarray(mask.astype(np.uint8) * 255).save(masked / f"photo{index}_mask.png")
        start = time.perf_counter()
        connect_ray(None)
        ray_start = time.perf_counter() - start
        rates: dict[str, list[float]] = {"sidecar masks": [], "finder": []}
        stages: dict[str, list] = {"sidecar masks": [], "finder": []}
        for repeat in range(repeats):
            for name, folder in (("sidecar masks", masked), ("finder", plain)):
                config = BulkConfig(inputs=(str(folder),), output=f"{tmp}/out-{name.replace(' ', '-')}-{repeat}",
                                    checkpoint=checkpoint, reconstruction=ReconstructionConfig(resolution=resolution))
                summary = run_bulk(config, progress=False)
                if summary.ok != images:
                    raise RuntimeError(f"{name}: {summary.line()}: {summary.failures}")
                rates[name].append(summary.total / summary.seconds)
                stages[name].append(read_manifest(config.output))
        print(f"  bulk, {images} JPEGs at 512 x 512, resolution {resolution}, {repeats} alternating repeats; "
              f"Ray start-up {ray_start:.1f} s, not counted")
        for name, values in rates.items():
            manifest = pd.concat(stages[name])
            seconds = ", ".join(f"{s} {manifest[f'seconds_{s}'].mean():.2f}" for s in STAGES)
            print(f"    {name:<14} {statistics.mean(values):.3f} images/s ({', '.join(f'{v:.3f}' for v in values)}); "
                  f"mean seconds per stage: {seconds}; points {manifest['points_evaluated'].mean():.0f}")
        ratio = statistics.mean(rates["finder"]) / statistics.mean(rates["sidecar masks"])
        print(f"  finder-on reaches {100 * ratio:.0f} % of the sidecar-mask throughput (target >= 95 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--finder-only", action="store_true", help="skip the bulk comparison")
    args = parser.parse_args()
    finder_seconds(args.runs)
    if not args.finder_only:
        bulk_throughput(args.images, args.resolution, args.repeats)


if __name__ == "__main__":
    main()
