"""Seconds per phase of the `full` PIFuHD network on this machine, beside the official code's figures.

    .venv/bin/python benchmarks/network.py [--points 100000] [--repeat 2] [--preset full]

Phases: the two normal nets, the coarse filter, the fine filter (one 512 / 1024 image),
and microseconds per query point (coarse MLP to phi + fine MLP). Variants, each measured
in this run: fp32 contiguous (baseline), fp32 channels-last, bf16 autocast (where the CPU
has avx512_bf16 or AMX) with its error against fp32 printed.
Random weights: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

import model
from model.reconstruction.reconstruct import cpu_has_bf16

# Official code on a 2-core machine of this kind, quiet, full-size weights (shared/notes/pifuhd.md).
OFFICIAL = {"normal nets": 2.75, "coarse filter": 0.72, "fine filter": 5.34, "us per point": 28.3}


def _timed(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_variant(net, image_512, image_1024, points, repeat, channels_last, dtype):
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    image_512 = image_512.contiguous(memory_format=fmt)
    image_1024 = image_1024.contiguous(memory_format=fmt)
    times = {}
    with torch.inference_mode(), autocast:
        times["normal nets"], normals = _timed(lambda: net.predict_normals(image_512), repeat)
        times["coarse filter"], coarse = _timed(lambda: net.encode_coarse(image_512, normals), repeat)
        times["fine filter"], fine = _timed(lambda: net.encode_fine(image_1024, normals), repeat)
        features = model.Features(normals[0], normals[1], coarse, fine)
        seconds, occupancy = _timed(lambda: net.query(features, points), repeat)
        times["us per point"] = seconds / points.shape[-1] * 1e6
    outputs = {"normals": normals[0].float(), "coarse": coarse[-1].float(), "fine": fine.float(), "occupancy": occupancy.float()}
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = model.preset(args.preset)
    net = model.PIFuHD.from_config(config).eval()
    image_512 = torch.rand(1, 3, config.coarse_size, config.coarse_size) * 2 - 1
    image_1024 = torch.nn.functional.interpolate(image_512, size=config.fine_size, mode="nearest")
    points = torch.rand(1, 3, args.points) * 2 - 1
    print(f"preset {args.preset}: {sum(p.numel() for p in net.parameters()):,} parameters, "
          f"{torch.get_num_threads()} threads, {args.points:,} query points, best of {args.repeat}")

    variants = {"fp32": (False, torch.float32), "fp32 channels-last": (True, torch.float32)}
    if cpu_has_bf16():
        variants["bf16 channels-last"] = (True, torch.bfloat16)
    results, reference = {}, None
    for name, (channels_last, dtype) in variants.items():
        times, outputs = run_variant(net, image_512, image_1024, points, args.repeat, channels_last, dtype)
        results[name] = times
        if reference is None:
            reference = outputs
        else:
            errors = ", ".join(f"{k} {(v - reference[k]).abs().max().item():.2e}" for k, v in outputs.items())
            print(f"  {name}: max abs error vs fp32: {errors}")

    phases = list(OFFICIAL)
    header = f"{'phase':<16}{'official':>10}" + "".join(f"{name:>22}" for name in results)
    print(header)
    for phase in phases:
        unit = "us" if phase == "us per point" else "s"
        row = f"{phase:<16}{OFFICIAL[phase]:>8.1f}{unit:>2}"
        for times in results.values():
            row += f"{times[phase]:>12.2f}{unit:>2} ({OFFICIAL[phase] / times[phase]:4.1f}x)"
        print(row)
    baseline = results["fp32"]
    for name, times in results.items():
        filters = times["normal nets"] + times["coarse filter"] + times["fine filter"]
        print(f"{name}: filters {filters:.1f} s per image ({sum(OFFICIAL[p] for p in phases[:3]) / filters:.1f}x official, "
              f"{(baseline['normal nets'] + baseline['coarse filter'] + baseline['fine filter']) / filters:.2f}x fp32 baseline), "
              f"{times['us per point']:.1f} us per point ({OFFICIAL['us per point'] / times['us per point']:.1f}x official)")


if __name__ == "__main__":
    main()
