"""Seconds per stage of making training data on one core, synthetic people and a real-scan-like mesh.

    .venv/bin/python benchmarks/data.py [--subjects 5] [--views 4] [--points 25000]

Stages per subject: the anny body (shape, pose with collision checks, garments), labelled
points for all views (PIFu sampling + winding numbers), and per view: background, the EGL
render at 1024 (two passes + read-back), 2x2 downsampling to 512, PNG encoding of the four
images at 512 and at 1024; then the Parquet bytes of the subject's rows. The "scan" line
loads a textured OBJ of about 110 k faces (a subdivided synthetic person) the way
`pifuhd data scans` does. Compare with shared/notes/synthetic-data.md: ~0.55 s per core for a
subject with 4 views at 512 and 100 k labels, without PNG encoding.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LP_NUM_THREADS", "1")  # one core, as one Ray actor

import numpy as np  # noqa: E402


def timed(stats: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    stats[name].append(time.perf_counter() - start)
    return out


def bench_subject(subject, rng, views: int, points: int, stats: dict) -> None:
    from model.render import get_renderer, png_bytes
    from model.data.scenes import procedural_background, random_lighting, sample_views
    from model.data.sampling import SamplingConfig
    from model.data.sampling import label_views
    from pipelines.common.formats import dataset_shard_bytes

    renderer = get_renderer(1024)
    vs = sample_views(rng, views)
    parts = [(p.vertices, p.faces) for p in subject.parts]
    if subject.info.get("label_union"):
        m = subject.merged()
        parts = [(m.vertices, m.faces)]
    pts = timed(stats, "points+labels (all views)", label_views, parts, [v.world_from_canonical() for v in vs], SamplingConfig(num_points=points), rng)
    rows = []
    for view, p in zip(vs, pts):
        bg = timed(stats, "background (per view)", procedural_background, rng, 1024)
        full = timed(stats, "render 1024 (per view)", renderer.render, subject.parts, view, random_lighting(rng), bg)
        half = timed(stats, "downsample to 512 (per view)", full.downsample)
        enc512 = timed(stats, "png x4 at 512 (per view)", lambda: [png_bytes(x) for x in (half.rgb, half.mask, half.normal_front, half.normal_back)])
        timed(stats, "png x4 at 1024 (per view)", lambda: [png_bytes(x) for x in (full.rgb, full.mask, full.normal_front, full.normal_back)])
        rows.append({"subject_id": subject.subject_id, "view": 0, "image_512": enc512[0], "mask_512": enc512[1], "normal_front_512": enc512[2],
                     "normal_back_512": enc512[3], "points": p.points, "labels": p.labels, "surface_points": p.surface, "surface_normals": p.surface_normals,
                     "calib": np.eye(4, dtype=np.float32).reshape(-1), "num_points": len(p.labels)})
    timed(stats, "parquet bytes (per subject, 512)", lambda: dataset_shard_bytes(rows))


def write_scan_like_obj(folder: Path) -> Path:
    """A subdivided synthetic person as a RenderPeople-style OBJ + MTL + 1024^2 texture."""
    import trimesh
    from PIL import Image

    from model.data.humans import make_subject

    s = make_subject("scan", 123, family="stand").merged()
    v, f = trimesh.remesh.subdivide(s.vertices.astype(np.float64), s.faces)[:2]
    uv = np.stack([np.arctan2(v[:, 2], v[:, 0]) / (2 * np.pi) + 0.5, (v[:, 1] - v[:, 1].min()) / np.ptp(v[:, 1])], 1)
    (folder / "tex").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(folder / "tex" / "scan_dif.jpg")
    (folder / "scan.mtl").write_text("newmtl m\nmap_Kd tex/scan_dif.jpg\n")
    lines = ["mtllib scan.mtl", "usemtl m"] + [f"v {a:.4f} {b:.4f} {c:.4f}" for a, b, c in v] + [f"vt {a:.5f} {b:.5f}" for a, b in uv]
    lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in f + 1]
    path = folder / "scan.obj"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=5)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--points", type=int, default=25000, help="labelled points per view")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from model.body.anny import load_body_model
    from model.data.humans import make_subject
    from model.render import get_renderer
    from model.data.scans import ScanRef, load_scan

    start = time.perf_counter()
    load_body_model()
    print(f"anny model load (cache warm): {time.perf_counter() - start:.2f} s; renderer: {get_renderer(1024).device}")
    bench_subject(make_subject("warm", 0), np.random.default_rng(0), 1, 1000, defaultdict(list))  # EGL/JIT warm-up

    stats: dict = defaultdict(list)
    for i in range(args.subjects):
        subject = timed(stats, "anny body+pose+garments (per subject)", make_subject, f"b{i}", 1000 + i)
        bench_subject(subject, np.random.default_rng(i), args.views, args.points, stats)

    with tempfile.TemporaryDirectory() as tmp:
        obj = write_scan_like_obj(Path(tmp) / "rp_scan_OBJ")
        scan_stats: dict = defaultdict(list)
        for i in range(2):
            scan = timed(scan_stats, "scan load+normalise+check (per scan)", load_scan, ScanRef("scan", str(obj)), tmp)
            bench_subject(scan, np.random.default_rng(i), args.views, args.points, scan_stats)

    def report(title, st, n_views):
        print(f"\n{title}")
        for name, values in st.items():
            print(f"  {name:40s} {np.mean(values):7.3f} s")
        per = lambda key: np.mean(st[key]) if key in st else 0.0  # noqa: E731
        first = next(iter(st))
        base = per(first) + per("points+labels (all views)") + n_views * (per("background (per view)") + per("render 1024 (per view)") + per("downsample to 512 (per view)"))
        at512 = base + n_views * per("png x4 at 512 (per view)") + per("parquet bytes (per subject, 512)")
        at1024 = at512 + n_views * per("png x4 at 1024 (per view)")
        print(f"  => one subject, {n_views} views, {n_views * args.points // 1000}k labels: {base:.2f} s before encoding, "
              f"{at512:.2f} s stored at 512, {at1024:.2f} s stored at 1024+512 (one core)")

    report("synthetic people", stats, args.views)
    print(f"  faces per subject: {len(load_body_model().faces)} (+ skirt sometimes)")
    report(f"real-scan-like OBJ ({len(scan.merged().faces)} faces, 1024^2 texture)", scan_stats, args.views)


if __name__ == "__main__":
    main()
