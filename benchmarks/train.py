"""Training throughput: samples/s and points/s per worker, Ray Train (1 and 2 workers) against a
plain PyTorch loop on the same data and stage.

    .venv/bin/python benchmarks/train.py --data DATASET [--stage coarse] [--preset small] [--steps 40]

Per-step times leave out start-up on both sides and include data loading: the plain loop
times blocks of REPORT steps after a warm-up; Ray Train reports every REPORT steps and the
benchmark differences the worker's own clocks. Each figure is the median block, and the plain
loop and one-worker Ray Train alternate `--repeats` times: this 2-core machine drifts by
+-8 % between runs, more than the effect being measured. Target: Ray Train's per-step overhead
under 10 % with one worker.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from pipelines.common.dataset import iter_batches
from pipelines.common.formats import read_training_metrics
from pipelines.common.ray_runtime import connect_ray
from pipelines.jobs.train import TrainConfig, build_stage, make_optimizer, initial_network, run_training, to_tensors


REPORT = 5  # steps per timed block


def plain_loop(config: TrainConfig, warmup: int, steps: int) -> float:
    """Median seconds per step over blocks of REPORT steps, the stage module fed by the plain
    iterator (decode included)."""
    torch.set_num_threads(2)
    net = initial_network(config)
    stage = build_stage(net, config)
    optimizer = make_optimizer([p for p in stage.parameters() if p.requires_grad], config)
    generator = torch.Generator().manual_seed(0)
    batches = iter_batches(config.data, "train", config.batch_size)
    blocks, start = [], time.perf_counter()
    for step in range(warmup + steps):
        if step >= warmup and (step - warmup) % REPORT == 0:
            now = time.perf_counter()
            if step > warmup:
                blocks.append((now - start) / REPORT)
            start = now
        batch = to_tensors(next(batches), torch.device("cpu"))
        loss, _ = stage(batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    blocks.append((time.perf_counter() - start) / REPORT)
    return float(np.median(blocks))


def ray_train(config: TrainConfig, warmup: int) -> float:
    """Median seconds per step inside the Ray Train workers over the report intervals after warm-up."""
    run_training(config)
    metrics = read_training_metrics(f"{config.out}/{config.run_name}").sort_values("step")
    metrics = metrics[metrics["step"] >= warmup]
    return float(np.median(np.diff(metrics["seconds"]) / np.diff(metrics["step"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--stage", default="coarse")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.warmup % REPORT or args.steps % REPORT:
        parser.error(f"--warmup and --steps must be multiples of {REPORT}")

    with tempfile.TemporaryDirectory() as out:
        def config(workers: int, threads: int, repeat: int = 0) -> TrainConfig:
            return TrainConfig(stage=args.stage, data=args.data, out=out, name=f"bench-{workers}-{repeat}", preset=args.preset,
                               steps=args.warmup + args.steps, batch_size=args.batch_size,
                               points_per_sample=args.points, workers=workers, threads_per_worker=threads,
                               cpus_per_worker=0.5 if workers > 1 else 1.0, checkpoint_every=10_000,
                               validate_every=REPORT, val_samples=0, optimizer="adam")

        plains, ones = [], []
        for repeat in range(args.repeats):
            # Ray is shut down around each plain run, so its daemons do not tax the baseline.
            plains.append(plain_loop(config(1, 2), args.warmup, args.steps))
            ray = connect_ray(None)
            ones.append(ray_train(config(1, 2, repeat), args.warmup))
            if repeat == args.repeats - 1:
                two = ray_train(config(2, 1), args.warmup)
            ray.shutdown()
        plain, one = float(np.median(plains)), float(np.median(ones))

    per_sample_points = args.points
    print(f"stage {args.stage}, preset {args.preset}, batch {args.batch_size} per worker, {args.points} points per sample, "
          f"{args.steps} timed steps, median {REPORT}-step block of {args.repeats} alternating runs")
    print(f"  runs, s/step: plain {' '.join(f'{t:.3f}' for t in plains)}; Ray Train 1 worker {' '.join(f'{t:.3f}' for t in ones)}")
    for name, seconds, workers in (("plain loop", plain, 1), ("Ray Train, 1 worker", one, 1), ("Ray Train, 2 workers", two, 2)):
        samples = args.batch_size / seconds
        print(f"  {name:<22} {seconds:.2f} s/step; per worker {samples:.2f} samples/s, {samples * per_sample_points:,.0f} points/s;"
              f" all workers {samples * workers:.2f} samples/s")
    print(f"  Ray Train overhead, 1 worker: {100 * (one / plain - 1):+.1f} % per step (target < 10 %)")


if __name__ == "__main__":
    main()
