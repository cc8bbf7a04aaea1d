"""Image -> mesh per phase for the full preset on a trained field, beside the official figures.

    .venv/bin/python benchmarks/image_to_mesh.py [--resolutions 256 512] [--points 50000] [--threads 2]

No full-size trained weights ship here, so the figure is composed as in the issue, from parts
each measured in this run:
- the full preset's filters (normal nets, coarse and fine hourglass; one 512 / 1024 image, in the
  memory layout `sample_surfaces` uses) and its cost per query point (random weights: speed does
  not depend on the values);
- the trained field's surface: the shipped model on `examples/person.png`, whose sparse
  extraction gives the points to query, the extraction's own seconds (its bookkeeping apart from
  the network) and peak memory (numpy, tracemalloc), and marching cubes;
- the finishing steps on that mesh: vertex colours, the user's frame, preview, OBJ export.
Total = filters + points x seconds per point + bookkeeping + marching cubes + finishing.
fp32 and bf16 (where the CPU has avx512_bf16 or AMX) side by side; for bf16 also how far the
trained field's mesh moves against its fp32 mesh (vertices to the other surface, mean, voxels).
"""

from __future__ import annotations

import argparse
import contextlib
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

import model
from model.reconstruction.reconstruct import cpu_has_bf16, memory_layout, use_layout

ROOT = Path(__file__).resolve().parents[1]
# The official code on this kind of 2-core machine, a trained full model (../shared/notes/pifuhd.md).
OFFICIAL_SECONDS = {256: 45.0, 512: 168.0}
TARGET_SPEEDUP = {256: 4.0, 512: 10.0}


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _best(fn, repeat: int = 2, device: torch.device = torch.device("cpu")) -> float:
    """The fastest of `repeat` calls, in seconds (a GPU's queue drained before each clock read)."""
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def full_network_costs(precision: str, points: int, device: torch.device = torch.device("cpu"), batch: int = 1,
                       preset: str = "full") -> dict:
    """Seconds of the preset's filters per image (encoding `batch` images at once) and seconds per query point."""
    torch.manual_seed(0)
    net = model.PIFuHD.from_config(model.preset(preset)).eval().to(device)
    layout = memory_layout(precision == "bf16")  # as sample_surfaces lays it out
    use_layout(net, layout)
    size = net.config.coarse_size
    image = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=layout)
    fine = torch.nn.functional.interpolate(image, size=net.config.fine_size).contiguous(memory_format=layout)
    queries = torch.rand(1, 3, points, device=device) * 2 - 1
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        filters = _best(lambda: net.encode(image, fine), device=device) / batch
        features = net.encode(image[:1], fine[:1])
        per_point = _best(lambda: net.query(features, queries), device=device) / points
    return {"filters": filters, "per_point": per_point}


def trained_field(resolution: int, precision: str) -> dict:
    """The shipped model's surface of the example photo: points, extraction seconds and memory, mesh."""
    from model.reconstruction.preprocess import prepare_image_file
    from model.reconstruction.reconstruct import ReconstructionConfig, SurfaceSamples, encode_outputs, finish, occupancy_function
    from model.reconstruction.surface import evaluate_grid
    from pipelines.common.checkpoints import SHIPPED_PLAIN_CHECKPOINT

    net = model.load_checkpoint(str(SHIPPED_PLAIN_CHECKPOINT)).eval()
    prepared = prepare_image_file(ROOT / "examples" / "person.png", sizes=(net.config.coarse_size, net.config.fine_size))
    config = ReconstructionConfig(resolution=resolution, precision=precision)
    with torch.inference_mode(), _autocast(precision):
        features = net.encode(prepared.images[net.config.coarse_size][None], prepared.images[net.config.fine_size][None]).select(0)
        tracemalloc.start()
        grid = evaluate_grid(occupancy_function(net, features), resolution=resolution)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    grid.detach()
    samples = SurfaceSamples(grid, features.normal_front[0].float(), features.normal_back[0].float(), {})
    # Twice, the faster counted: a job's workers render many previews on one EGL context, made once.
    finishing = _best(lambda: encode_outputs(finish(samples, prepared, config), prepared, "obj"))
    result = finish(samples, prepared, config)
    return {
        "points": grid.stats["points_evaluated"],
        "corners": grid.surface_cell_corners(),
        "bookkeeping": grid.stats["seconds_grid"] - grid.stats["seconds_eval"],
        "finishing": finishing,
        "peak_mib": peak / 2**20,
        "mesh": result.mesh_world,
    }


def mesh_distance_voxels(a, b, resolution: int, samples: int = 50_000) -> float:
    """Mean distance of each mesh's vertices (a random `samples` of them) to the other's surface, both
    ways averaged, in voxels of the [-1, 1] box (libigl's exact point-to-triangle distances)."""
    import igl

    rng = np.random.default_rng(0)

    def one_way(source, target):
        vertices = np.asarray(source.vertices)
        chosen = vertices[rng.choice(len(vertices), min(samples, len(vertices)), replace=False)]
        squared = igl.point_mesh_squared_distance(chosen, np.asarray(target.vertices, np.float64),
                                                  np.asarray(target.faces, np.int64))[0]
        return np.sqrt(squared).mean()

    return float((one_way(a, b) + one_way(b, a)) / 2 / (2.0 / resolution))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--points", type=int, default=50_000, help="query points timed for the cost per point")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    precisions = ["fp32"] + (["bf16"] if cpu_has_bf16() else [])
    print(f"{args.threads} threads; precisions {precisions}; full preset costs on random weights, "
          f"points and extraction on the shipped model's field of examples/person.png")
    costs = {p: full_network_costs(p, args.points) for p in precisions}
    for p, c in costs.items():
        print(f"  {p}: filters {c['filters']:.2f} s per image, {c['per_point'] * 1e6:.2f} us per query point")
    header = (f"{'res':>4} {'prec':>5} {'points':>8} {'floor':>8} {'filters':>8} {'queries':>8} {'extract':>8} "
              f"{'finish':>7} {'total':>7} {'official':>9} {'speedup':>8} {'target':>7} {'peak MiB':>9} {'vs fp32':>8}")
    print(header)
    for resolution in args.resolutions:
        reference = None
        for precision in precisions:
            field = trained_field(resolution, precision)
            cost = costs[precision]
            queries = field["points"] * cost["per_point"]
            total = cost["filters"] + queries + field["bookkeeping"] + field["finishing"]
            speedup = OFFICIAL_SECONDS[resolution] / total
            moved = "" if reference is None else f"{mesh_distance_voxels(reference, field['mesh'], resolution):.3f} vx"
            if reference is None:
                reference = field["mesh"]
            print(f"{resolution:>4} {precision:>5} {field['points'] / 1e6:>7.2f}M {field['corners'] / 1e6:>7.2f}M "
                  f"{cost['filters']:>7.2f}s {queries:>7.2f}s {field['bookkeeping']:>7.2f}s {field['finishing']:>6.2f}s "
                  f"{total:>6.1f}s {OFFICIAL_SECONDS[resolution]:>8.0f}s {speedup:>7.1f}x {TARGET_SPEEDUP[resolution]:>6.0f}x "
                  f"{field['peak_mib']:>9.0f} {moved:>8}")
    print("floor: distinct corners of the final surface cells (what any method must query); "
          "extract: the sparse extraction's own work beside the network; finish: marching cubes, colours, preview, OBJ")


if __name__ == "__main__":
    main()
