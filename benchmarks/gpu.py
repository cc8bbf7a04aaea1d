"""GPU throughput: images/s at 256 and 512, bare loop and bulk pipeline, and the Ray Train step.

    .venv/bin/python benchmarks/gpu.py [--images 64] [--batch-size 8] [--resolutions 256 512] [--smoke]

One script for a lent GPU machine (a few minutes on an H200); every figure comes from this run:
1. the shipped model end to end (its plain twin: the default body-guided model adds one CPU body
   fit per photo in the prepare stage, which a GPU does not speed up) on --images copies of
   examples/person.png: a bare loop in this process (`sample_surfaces` on batches of --batch-size,
   then `finish` and the file encoding of each image) and the Ray Data pipeline (`run_bulk`, one
   GPU model actor, CPU prepare actors), images/s;
2. the full preset on the GPU (random weights: speed does not depend on the values): filters per
   image when encoding --batch-size images at once and seconds per query point; composed with the
   shipped model's field of the example photo (its points, the extraction's bookkeeping and the
   finishing steps, measured on this machine's CPU by `image_to_mesh.trained_field`) into
   full-preset images/s, as `benchmarks/image_to_mesh.py` composes the CPU figure;
3. Ray Train on one GPU worker (NCCL, bf16 autocast): the full preset's coarse stage, batch 4, on a
   small synthetic dataset made here with `pifuhd data synth`: median seconds per step after warm-up.
Precision: bf16 where the GPU has it. `--smoke` runs every step tiny on the CPU (tiny preset, 64^3,
two images) to check the script on a machine without a GPU. Goal: >= 10 images/s end to end at 256
on an H200-class GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from image_to_mesh import ROOT, _best, full_network_costs, trained_field

EXAMPLE = ROOT / "examples" / "person.png"
REPORT = 5  # training steps per timed block


def bare_loop(checkpoint: str, resolution: int, images: int, batch: int, device: torch.device) -> float:
    """images/s of the stage functions in this process: batched encode and queries, then finish and encode each."""
    from model.network.checkpoint import load_checkpoint
    from model.reconstruction.preprocess import prepare_image_file
    from model.reconstruction.reconstruct import ReconstructionConfig, encode_outputs, finish, sample_surfaces

    net = load_checkpoint(checkpoint).eval().to(device)
    prepared = prepare_image_file(EXAMPLE, sizes=(net.config.coarse_size, net.config.fine_size))
    config = ReconstructionConfig(resolution=resolution)

    def run(count: int) -> None:
        for start in range(0, count, batch):
            for samples in sample_surfaces(net, [prepared] * min(batch, count - start), config):
                encode_outputs(finish(samples, prepared, config), prepared, "obj")

    run(batch)  # warm-up: kernels, caches, the preview's EGL context
    return images / _best(lambda: run(images), repeat=1, device=device)


def pipeline(checkpoint: str, resolution: int, images: int, batch: int, use_gpu: bool, workdir: Path) -> float:
    """images/s of the Ray Data job on `images` copies of the example (Ray already connected)."""
    from model.reconstruction.reconstruct import ReconstructionConfig
    from pipelines.jobs.bulk import BulkConfig, run_bulk

    inputs = workdir / f"in-{resolution}"
    inputs.mkdir(exist_ok=True)
    for index in range(images):
        shutil.copy(EXAMPLE, inputs / f"person{index:04d}.png")
    prepare_actors = max(1, min(8, (os.cpu_count() or 2) // 2))
    summary = run_bulk(BulkConfig(inputs=(str(inputs),), output=str(workdir / f"out-{resolution}"), checkpoint=checkpoint,
                                  reconstruction=ReconstructionConfig(resolution=resolution), batch_size=batch,
                                  prepare_actors=prepare_actors, use_gpu=use_gpu), progress=False)
    if summary.failed:
        raise RuntimeError(f"{summary.failed} of {summary.total} images failed: {summary.failures[:3]}")
    return summary.total / summary.seconds


def train_step(workdir: Path, preset: str, use_gpu: bool, steps: int, warmup: int) -> float:
    """Median seconds per step of one Ray Train worker on the coarse stage (Ray already connected)."""
    from pipelines.jobs.data import JobConfig, SampleSettings, run_job
    from pipelines.common.formats import read_training_metrics
    from pipelines.jobs.train import TrainConfig, run_training

    data = str(workdir / "data")
    run_job(JobConfig(out=data, kind="synth", count=8, settings=SampleSettings(views=2, resolution=512, val_fraction=0,
                                                                                test_fraction=0), quiet=True))
    config = TrainConfig(stage="coarse", data=data, out=str(workdir / "runs"), name="gpu-bench", preset=preset,
                         use_gpu=use_gpu, steps=warmup + steps, batch_size=4, validate_every=REPORT, val_samples=0,
                         checkpoint_every=10_000, optimizer="adam")
    run_training(config)
    metrics = read_training_metrics(str(workdir / "runs" / "gpu-bench")).sort_values("step")
    metrics = metrics[metrics["step"] >= warmup]
    return float(np.median(np.diff(metrics["seconds"]) / np.diff(metrics["step"])))


def main() -> None:
    from model.reconstruction.reconstruct import cpu_has_bf16, resolved_precision
    from pipelines.common.checkpoints import SHIPPED_PLAIN_CHECKPOINT
    from pipelines.common.ray_runtime import connect_ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--points", type=int, default=1_000_000, help="query points timed for the cost per point")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="every step tiny, on the CPU")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.batch_size, args.resolutions, args.points, args.train_steps = 2, 2, [64], 20_000, 10
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU here (use --smoke to check the script on a CPU)")
    device = torch.device("cpu" if args.smoke else "cuda")
    preset = "tiny" if args.smoke else "full"
    precision = resolved_precision("auto", device)
    checkpoint = str(SHIPPED_PLAIN_CHECKPOINT)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"{name}; precision {precision}; {args.images} images, batch {args.batch_size}")

    costs = full_network_costs(precision, args.points, device, batch=args.batch_size, preset=preset)
    print(f"{preset} preset on {device.type}: filters {costs['filters'] * 1e3:.1f} ms per image (batch {args.batch_size}), "
          f"{costs['per_point'] * 1e9:.1f} ns per query point")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        connect_ray(None)
        print(f"{'res':>4} {'bare loop':>12} {'pipeline':>12} {'points':>8} {'full preset composed':>22}")
        for resolution in args.resolutions:
            loop = bare_loop(checkpoint, resolution, args.images, args.batch_size, device)
            ray_rate = pipeline(checkpoint, resolution, args.images, args.batch_size, device.type == "cuda", work)
            field = trained_field(resolution, "bf16" if cpu_has_bf16() else "fp32")
            seconds = costs["filters"] + field["points"] * costs["per_point"] + field["bookkeeping"] + field["finishing"]
            print(f"{resolution:>4} {loop:>8.2f} im/s {ray_rate:>8.2f} im/s {field['points'] / 1e6:>7.2f}M "
                  f"{1 / seconds:>12.2f} im/s ({seconds:.2f} s: filters {costs['filters']:.2f}, queries "
                  f"{field['points'] * costs['per_point']:.2f}, extraction {field['bookkeeping']:.2f}, finishing {field['finishing']:.2f})")
        step = train_step(work, preset, device.type == "cuda", args.train_steps, warmup=REPORT)
        print(f"Ray Train, 1 worker on {device.type}, {preset} preset coarse stage, batch 4: {step:.3f} s/step")
    print("goal: >= 10 images/s end to end at 256 on an H200-class GPU")


if __name__ == "__main__":
    main()
