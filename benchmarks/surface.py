"""Surface extraction: query points, seconds and peak memory of the sparse and the dense method,
beside the official octree's figures.

The official octree's query rule also runs on each field (`octree_points`: only its point count),
so noisy fields (`fixture_network`: random weights) are compared on the very same values.

    .venv/bin/python benchmarks/surface.py [--quick] [--occupancy NAME ...] [--resolutions 256 512]
                                           [--dense-max 256] [--dilation K]

Every case runs in a fresh subprocess, so "peak MB" is that process's peak resident size
(VmHWM, reset after the imports and the occupancy's set-up; ru_maxrss where that is not
possible) minus its size then: all numpy and torch CPU memory of the extraction, nothing
left over from another case. Dense runs up to --dense-max; above it its
points are (res + 1)^3 analytically and its query seconds are projected from the sparse run's
seconds per point. "same mesh": Chamfer distance (mean of both directions, 200k samples per
surface) between the sparse and the dense mesh, in voxels, where both ran; and the largest
|sdf| at the sparse mesh's vertices, in voxels, where the occupancy has an exact sdf.

Occupancies are pluggable: OCCUPANCIES maps a name to a zero-argument factory returning
occupancy_fn ((N, 3) float32 points in [-1, 1]^3 -> (N,) occupancy, inside > 0.5). The
factory runs inside the measured subprocess, before the baseline, so loading a network is
not counted as extraction memory. EXACT_SDF optionally maps the same name to an sdf.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.common.checkpoints import SHIPPED_PLAIN_CHECKPOINT

# Official PIFuHD octree (NumPy, dense grid set-up) on a 2-core machine of this kind,
# analytic human-like shape (shared/notes/pifuhd.md).
OFFICIAL = {
    256: {"points": (0.38e6, 0.65e6)},
    512: {"points": (0.78e6, 2.8e6), "grid_setup_s": 24.0, "memory_gib": 13.0},
}


# -- analytic human: a union of capsules and ellipsoids, y up, 1.8 units tall -----------------


def _capsule(p, a, b, radius):
    a, b = torch.tensor(a), torch.tensor(b)
    pa, ba = p - a, b - a
    h = ((pa @ ba) / (ba @ ba)).clamp(0, 1)
    return (pa - h[:, None] * ba).norm(dim=1) - radius


def _ellipsoid(p, center, radii):
    """Approximate ellipsoid sdf (exact on the surface, its sign exact everywhere)."""
    radii = torch.tensor(radii)
    q = (p - torch.tensor(center)) / radii
    k0, k1 = q.norm(dim=1), (q / radii).norm(dim=1)
    return k0 * (k0 - 1) / k1.clamp_min(1e-9)


def human_sdf(p: torch.Tensor) -> torch.Tensor:
    """(N, 3) points -> (N,) signed distance (negative inside) to a T-ish posed human, y in [-0.9, 0.87]."""
    parts = [
        _ellipsoid(p, (0, 0.76, 0), (0.085, 0.11, 0.095)),  # head
        _capsule(p, (0, 0.58, 0), (0, 0.68, 0), 0.045),  # neck
        _ellipsoid(p, (0, 0.33, 0), (0.17, 0.27, 0.10)),  # chest
        _ellipsoid(p, (0, 0.02, 0), (0.16, 0.12, 0.10)),  # pelvis
    ]
    for s in (-1.0, 1.0):
        parts += [
            _capsule(p, (0.19 * s, 0.53, 0), (0.36 * s, 0.28, 0.02), 0.045),  # upper arm
            _capsule(p, (0.36 * s, 0.28, 0.02), (0.50 * s, 0.05, 0.06), 0.038),  # forearm
            _ellipsoid(p, (0.54 * s, -0.02, 0.07), (0.03, 0.07, 0.045)),  # hand
            _capsule(p, (0.09 * s, -0.02, 0), (0.11 * s, -0.44, 0.01), 0.075),  # thigh
            _capsule(p, (0.11 * s, -0.44, 0.01), (0.12 * s, -0.83, -0.01), 0.055),  # shin
            _ellipsoid(p, (0.12 * s, -0.87, 0.05), (0.045, 0.03, 0.11)),  # foot
        ]
    return torch.stack(parts, dim=1).min(dim=1).values


def human_occupancy(p: torch.Tensor) -> torch.Tensor:
    """Occupancy 0.5 - sdf clamped to [0, 1]: linear across the surface, like a smooth network output."""
    return (0.5 - human_sdf(p)).clamp(0.0, 1.0)


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "pifuhd"


def fixture_network_occupancy():
    """The golden fixture's network (random weights, official layout) on the fixture image."""
    from safetensors.torch import load_file

    import model
    from model.reconstruction.reconstruct import occupancy_function

    net = model.load_checkpoint(REFERENCE / "small_state_dict.safetensors")
    image = (load_file(REFERENCE / "inputs.safetensors")["image_512_u8"].float() - 128) / 128
    features = net.encode(image, image.repeat_interleave(2, -1).repeat_interleave(2, -2))
    return occupancy_function(net, features)


def shipped_network_occupancy():
    """The shipped plain model (no body input) on the example photo: a trained field of a real person."""
    import model
    from model.reconstruction.preprocess import prepare_image_file
    from model.reconstruction.reconstruct import occupancy_function

    net = model.load_checkpoint(SHIPPED_PLAIN_CHECKPOINT)
    prepared = prepare_image_file(Path(__file__).resolve().parents[1] / "examples" / "person.png",
                                  sizes=(net.config.coarse_size, net.config.fine_size))
    images = [prepared.images[s][None] for s in (net.config.coarse_size, net.config.fine_size)]
    return occupancy_function(net, net.encode(*images))


OCCUPANCIES = {"analytic_human": lambda: human_occupancy, "fixture_network": fixture_network_occupancy}
if SHIPPED_PLAIN_CHECKPOINT.exists():
    OCCUPANCIES["shipped_network"] = shipped_network_occupancy
EXACT_SDF = {"analytic_human": human_sdf}


# -- one case, in a fresh process ---------------------------------------------------------------


def _status_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process in MB (Linux), None where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the peak-RSS counter (Linux >= 4.0), so the peak is the extraction's, not the imports'."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def octree_points(occupancy_fn, resolution: int, init_resolution: int = 64, threshold: float = 0.05,
                  batch: int = 100_000) -> int:
    """How many points the official octree rule queries on this field (../shared/notes/pifuhd.md),
    on the same (resolution + 1)^3 samples as ours, written here from its description.

    Level by level from a stride of resolution / init_resolution: query every sample of the
    stride's lattice not yet known; then each cell of that lattice whose centre is not known and
    whose corners span less than `threshold` is filled with their mid-range (its closure becomes
    known: never queried); halve the stride, down to 1.
    """
    n = resolution + 1
    step = 2.0 / resolution
    values = np.zeros((n, n, n), np.float32)
    known = np.zeros((n, n, n), bool)
    stride, queried = max(resolution // init_resolution, 1), 0
    while True:
        lattice = np.zeros((n, n, n), bool)
        lattice[::stride, ::stride, ::stride] = True
        todo = np.argwhere(lattice & ~known)
        for lo in range(0, len(todo), batch):
            idx = todo[lo : lo + batch]
            values[tuple(idx.T)] = occupancy_fn(torch.from_numpy(idx * step - 1.0).float()).numpy()
        known[tuple(todo.T)] = True
        queried += len(todo)
        if stride == 1:
            return queried
        corners = values[::stride, ::stride, ::stride]
        cells = resolution // stride
        stack = np.stack([corners[a : a + cells, b : b + cells, c : c + cells] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
        half = stride // 2
        skip = (stack.max(0) - stack.min(0) < threshold) & ~known[half::stride, half::stride, half::stride][:cells, :cells, :cells]
        middle = 0.5 * (stack.max(0) + stack.min(0))
        for a in range(stride + 1):
            for b in range(stride + 1):
                for c in range(stride + 1):
                    view = (slice(a, a + cells * stride, stride), slice(b, b + cells * stride, stride), slice(c, c + cells * stride, stride))
                    values[view] = np.where(skip, middle, values[view])
                    known[view] |= skip
        stride = half


def run_case(case: dict) -> dict:
    """Child side: extract once, return the stats plus memory (and save the mesh if asked)."""
    from model.reconstruction.surface import evaluate_grid, mesh_from_grid

    torch.set_grad_enabled(False)
    fn = OCCUPANCIES[case["occupancy"]]()
    # Warm-up call (lazy initialisation of torch kernels / a network) outside the measurement.
    fn(torch.rand(4096, 3) * 2 - 1)
    if case["method"] == "octree":
        start = time.perf_counter()
        return {"points_evaluated": octree_points(fn, case["resolution"]), "seconds_total": time.perf_counter() - start}
    # Baseline: the current size, with the peak counter reset (else a transient peak of the
    # imports would hide the extraction's first megabytes).
    reset = _reset_peak()
    base = _status_mb("VmRSS") if reset else _peak_mb()
    start = time.perf_counter()
    grid = evaluate_grid(fn, case["resolution"], method=case["method"], dilation=case.get("dilation"))
    mesh, stats = mesh_from_grid(grid)
    stats["seconds_total"] = time.perf_counter() - start
    stats["peak_mb"] = _peak_mb() - base
    if case["method"] == "sparse":
        stats["surface_cell_corners"] = grid.surface_cell_corners()
    stats["base_mb"] = base
    stats["watertight"] = bool(mesh.is_watertight)
    stats["volume"] = float(mesh.volume) if len(mesh.faces) else 0.0
    sdf = EXACT_SDF.get(case["occupancy"])
    if sdf is not None and len(mesh.vertices):
        voxel = 2.0 / case["resolution"]
        stats["max_sdf_voxels"] = float(sdf(torch.from_numpy(mesh.vertices).float()).abs().max()) / voxel
    if case.get("save"):
        np.savez(case["save"], vertices=mesh.vertices, faces=mesh.faces)
    return stats


def spawn(case: dict) -> dict:
    """Parent side: run one case in a new interpreter and read its JSON line."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_voxels(path_a: Path, path_b: Path, resolution: int, count: int = 200_000) -> tuple[float, float]:
    """(Chamfer distance of `count` surface samples each, largest vertex-to-nearest-vertex
    distance both ways), in voxels. The sampled Chamfer has a floor from the sampling itself
    (~0.2-0.4 voxel at these counts); the vertex distance is 0 for identical meshes."""
    import trimesh
    from scipy.spatial import cKDTree

    meshes = []
    for path in (path_a, path_b):
        data = np.load(path)
        meshes.append(trimesh.Trimesh(data["vertices"], data["faces"], process=False))
    pa, _ = trimesh.sample.sample_surface(meshes[0], count, seed=1)
    pb, _ = trimesh.sample.sample_surface(meshes[1], count, seed=2)
    chamfer = 0.5 * (cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean())
    va, vb = meshes[0].vertices, meshes[1].vertices
    vertex = max(cKDTree(vb).query(va)[0].max(), cKDTree(va).query(vb)[0].max())
    voxel = 2.0 / resolution
    return chamfer / voxel, vertex / voxel


# -- report ---------------------------------------------------------------------------------------


def _m(points: float) -> str:
    return f"{points / 1e6:.3f} M"


def benchmark(args) -> None:
    print(f"surface extraction, {torch.get_num_threads()} torch threads; official octree figures beside ours\n")
    header = f"{'occupancy':<15} {'res':>4} {'method':<7} {'points':>10} {'eval s':>7} {'mesh s':>7} {'total s':>8} {'peak MB':>8} {'faces':>9}  notes"
    print(header)
    print("-" * len(header))
    summary = []
    per_point = {}  # occupancy -> seconds per query point, from its largest dense run (else sparse)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.occupancy:
            for res in args.resolutions:
                sparse_path, dense_path = Path(tmp) / f"{name}_{res}_s.npz", Path(tmp) / f"{name}_{res}_d.npz"
                s = spawn(dict(occupancy=name, resolution=res, method="sparse", dilation=args.dilation, save=str(sparse_path)))
                notes = [
                    f"levels {s['level_resolutions'][0]}->{res}: {'/'.join(str(p) for p in s['level_points'])} pts",
                    f"mesh needs >= {_m(s['surface_cell_corners'])}",
                ]
                notes.append("watertight" if s["watertight"] else "NOT watertight")
                if "max_sdf_voxels" in s:
                    notes.append(f"max|sdf| {s['max_sdf_voxels']:.2f} vox")
                _row(name, res, "sparse", s, "; ".join(notes))
                dense_points = (res + 1) ** 3
                if res <= args.dense_max:
                    d = spawn(dict(occupancy=name, resolution=res, method="dense", save=str(dense_path)))
                    per_point[name] = d["seconds_eval"] / d["points_evaluated"]
                    chamfer, vertex = compare_voxels(sparse_path, dense_path, res)
                    _row(
                        name, res, "dense", d,
                        f"sparse vs dense: Chamfer {chamfer:.3f} vox (sampled), vertices {vertex:.1e} vox apart at most,"
                        f" faces {s['faces']} vs {d['faces']}",
                    )
                else:
                    cost = per_point.get(name, s["seconds_eval"] / max(s["points_evaluated"], 1))
                    print(
                        f"{name:<15} {res:>4} {'dense':<7} {_m(dense_points):>10} {'~' + format(cost * dense_points, '.0f'):>7}"
                        f" {'-':>7} {'-':>8} {'-':>8} {'-':>9}  not run (> --dense-max): points = {res + 1}^3, eval s projected;"
                        f" values alone {dense_points * 4 / 2**20:.0f} MB float32"
                    )
                octree = spawn(dict(occupancy=name, resolution=res, method="octree"))["points_evaluated"]
                print(f"{'':<15} {res:>4} {'octree':<7} {_m(octree):>10}{'':>42}  the official octree's rule on this very field")
                official = OFFICIAL.get(res)
                if official:
                    lo, hi = official["points"]
                    extra = ""
                    if "grid_setup_s" in official:
                        extra = f"; grid set-up {official['grid_setup_s']:.0f} s, {official['memory_gib']:.0f} GiB"
                    print(f"{'':<15} {res:>4} {'official':<7} {lo / 1e6:.2f}-{hi / 1e6:.2f} M{'':>40}  octree from 64^3, measured"
                          f" (human-like shapes){extra}")
                summary.append((name, res, s, octree, dense_points))
                print()
    print("summary (sparse):")
    for name, res, s, octree, dense_points in summary:
        points, floor = s["points_evaluated"], s["surface_cell_corners"]
        capped = "; surface tracking capped (a noisy field)" if s["track_capped"] else ""
        print(
            f"  {name} @ {res}: {_m(points)} points = {points / octree:.2f}x the official octree rule's {_m(octree)} on this"
            f" field, {dense_points / points:.0f}x fewer than dense; {points / floor:.2f}x the {_m(floor)} corners of the"
            f" mesh's surface cells (no method can query fewer for this mesh); peak {s['peak_mb']:.0f} MB{capped}"
        )


def _row(name, res, method, st, notes):
    print(
        f"{name:<15} {res:>4} {method:<7} {_m(st['points_evaluated']):>10} {st['seconds_eval']:>7.2f} {st['seconds_mesh']:>7.2f}"
        f" {st['seconds_total']:>8.2f} {st['peak_mb']:>8.0f} {st['faces']:>9}  {notes}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resolutions 128 and 256 only")
    parser.add_argument("--occupancy", nargs="+", default=["analytic_human"], choices=list(OCCUPANCIES))
    parser.add_argument("--resolutions", nargs="+", type=int, default=None, help="default 256 512")
    parser.add_argument("--dense-max", type=int, default=256, help="run dense up to this resolution (0: never)")
    parser.add_argument("--dilation", type=int, default=None, help="sparse band ring (default: none, surface seeds)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return
    if args.resolutions is None:
        args.resolutions = [128, 256] if args.quick else [256, 512]
    start = time.perf_counter()
    benchmark(args)
    print(f"\nbenchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
