"""`pifuhd data synth|scans` end to end on the session's Ray and local S3 server, and the reader."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import trimesh
from PIL import Image

from model.data.scans import ScanError, ScanRef, find_scans, load_scan
from pipelines.common import dataset as fmt, formats
from pipelines.jobs.data import JobConfig, SampleSettings, make_job_subject, register_cli, subject_rows
from model.data.sampling import SamplingConfig


def pifuhd_data(*argv: str) -> int:
    """Parse and run `pifuhd data ...` exactly as pipelines/cli.py will, via register_cli."""
    parser = argparse.ArgumentParser(prog="pifuhd")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return args.handler(args)


SMALL = ("--views", "2", "--resolution", "512", "--points", "3400", "--surface-points", "500", "--subjects-per-shard", "1")


# ---- synthetic people to S3 -------------------------------------------------------------------


def test_synth_to_s3_split_resume_and_read(ray_local, s3_bucket, body_model):
    uri = f"s3://{s3_bucket}/synth"
    split_args = ("--val-fraction", "0.34", "--test-fraction", "0.33")
    assert pifuhd_data("synth", "--count", "3", "--out", uri, "--seed", "5", *SMALL, *split_args) == 0

    import s3fs

    fs = s3fs.S3FileSystem()
    card = json.loads(fs.cat(f"{s3_bucket}/synth/dataset.json"))
    assert card["schema_version"] == formats.DATASET_SCHEMA_VERSION and card["kind"] == "synth"
    assert card["counts"]["subjects"] == 3 and card["counts"]["rows"] == 6 and card["counts"]["failed"] == 0
    assert card["generator"]["settings"]["views"] == 2 and card["frame"]["units_per_cm"] == 0.01

    frames = [pd.read_parquet(f"s3://{p}") for p in fs.glob(f"{s3_bucket}/synth/shards/*/*.parquet")]
    df = pd.concat(frames, ignore_index=True)
    assert len(df) == 6 and sorted(df["view"]) == [0, 0, 0, 1, 1, 1]
    # Split by subject: every view of a subject in one split, the split the hash says, the folder it sits in.
    for sid, rows in df.groupby("subject_id"):
        assert rows["split"].nunique() == 1
        split = rows["split"].iloc[0]
        assert split == fmt.subject_split(sid, 5, 0.34, 0.33)
        assert sid in card["splits"]["subjects"][split]
        assert fs.exists(f"{s3_bucket}/synth/meshes/{sid}.ply")
    row = df.iloc[0]
    assert row["schema_version"] == formats.DATASET_SCHEMA_VERSION and row["num_points"] == 3400
    assert row["points"].dtype == np.float32 and len(row["points"]) == 3 * 3400 and len(row["labels"]) == 3400
    assert row["image_512"][:8] == b"\x89PNG\r\n\x1a\n" and row["image_1024"] is None
    np.testing.assert_array_equal(np.asarray(row["calib"]).reshape(4, 4), np.diag([1, -1, 1, 1]))
    ply = trimesh.load(fs.open(f"{s3_bucket}/synth/meshes/{row['subject_id']}.ply"), file_type="ply", process=False)
    assert ply.is_watertight and 170 < np.ptp(ply.vertices[:, 1]) < 190

    # Resume: a second run with one more subject makes only that one.
    before = {p: fs.info(p)["LastModified"] for p in fs.glob(f"{s3_bucket}/synth/shards/*/*.parquet")}
    assert pifuhd_data("synth", "--count", "4", "--out", uri, "--seed", "5", *SMALL, *split_args) == 0
    fs.invalidate_cache()  # s3fs caches listings
    after = {p: fs.info(p)["LastModified"] for p in fs.glob(f"{s3_bucket}/synth/shards/*/*.parquet")}
    assert len(after) == len(before) + 1 and all(after[p] == t for p, t in before.items())
    card = json.loads(fs.cat(f"{s3_bucket}/synth/dataset.json"))
    assert card["counts"]["subjects"] == 4 and card["counts"]["rows"] == 8 and len(card["runs"]) == 2

    # The reader decodes samples with the training shapes and dtypes.
    split = max(formats.SPLITS, key=lambda s: card["counts"]["by_split"][s]["rows"])
    samples = list(fmt.iter_samples(uri, split))
    assert len(samples) == card["counts"]["by_split"][split]["rows"]
    s = samples[0]
    assert s["image_512"].shape == (3, 512, 512) and s["image_512"].dtype == np.float32
    assert -1.0 <= s["image_512"].min() and s["image_512"].max() <= 1.0
    assert s["mask_512"].shape == (1, 512, 512) and 0 <= s["mask_512"].min() and s["mask_512"].max() == 1.0
    assert s["normal_front_512"].shape == (3, 512, 512) and s["normal_back_512"].shape == (3, 512, 512)
    assert s["points"].shape == (3, 3400) and s["labels"].shape == (3400,) and s["labels"].dtype == np.float32
    assert s["calib"].shape == (4, 4) and s["surface_points"].shape == (3, 500)
    assert "image_1024" not in s
    # Front normals on the mask point to the camera.
    m = s["mask_512"][0] > 0.99
    assert (s["normal_front_512"][2][m] > 0).mean() > 0.95

    ds = fmt.open_dataset(uri, split, batch_size=2)
    batch = next(iter(ds.iter_batches(batch_size=2, batch_format="numpy")))
    assert batch["image_512"].shape[1:] == (3, 512, 512) and batch["points"].shape[1:] == (3, 3400)


def test_same_seed_same_bytes(body_model):
    """Two makings of one synthetic subject give byte-identical rows (PNGs, points, labels)."""
    job = JobConfig(out="unused", kind="synth", seed=3, count=8, settings=SampleSettings(views=2, resolution=512, sampling=SamplingConfig(num_points=2000, num_surface_points=100)))
    made = []
    for _ in range(2):
        subject, source, rng = make_job_subject(job, {"subject_id": "synth-3-000007", "index": 7}, "/tmp")
        made.append(formats.dataset_shard_bytes(subject_rows(subject, "train", source, rng, job.settings)))
    assert made[0] == made[1]


# ---- real scans to a local folder -------------------------------------------------------------


def _person_like() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A closed, person-sized ellipsoid (y up, metres, 1.8 tall) with spherical UVs: vertices, faces, uv."""
    sphere = trimesh.creation.icosphere(subdivisions=3)
    v = np.asarray(sphere.vertices) * [0.25, 0.9, 0.15]
    uv = np.stack([np.arctan2(v[:, 2], v[:, 0]) / (2 * np.pi) + 0.5, v[:, 1] / 1.8 + 0.5], 1)
    return v, np.asarray(sphere.faces), uv


def write_scan_folder(root):
    """RenderPeople-style OBJ+MTL+texture, THuman-style PLY with colours, a GLB, and two broken files."""
    v, f, uv = _person_like()
    obj_dir = root / "rp_test_OBJ"
    (obj_dir / "tex").mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).uniform(0, 255, (64, 64, 3))).astype(np.uint8)).save(obj_dir / "tex" / "rp_test_dif.png")
    (obj_dir / "rp_test.mtl").write_text("newmtl skin\nKd 1 1 1\nmap_Kd tex/rp_test_dif.png\n")
    lines = ["mtllib rp_test.mtl", "usemtl skin"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in v * 100]  # RenderPeople: cm
    lines += [f"vt {a:.6f} {b:.6f}" for a, b in uv]
    lines += [f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}" for a, b, c in f]
    (obj_dir / "rp_test.obj").write_text("\n".join(lines) + "\n")

    (root / "0001").mkdir()
    ply = trimesh.Trimesh(v * 1.7, f, vertex_colors=np.tile([200, 120, 90, 255], (len(v), 1)), process=False)
    ply.export(root / "0001" / "0001.ply")

    (root / "glb").mkdir()
    glb = trimesh.Scene([trimesh.Trimesh(v, f, process=False), trimesh.creation.box(extents=(0.3, 0.2, 0.2), transform=trimesh.transformations.translation_matrix([0, -0.6, 0.2]))])
    glb.export(root / "glb" / "person.glb")

    (root / "broken").mkdir()
    (root / "broken" / "truncated.glb").write_bytes(b"glTF\x02\x00\x00\x00" + bytes(np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8)))
    cloud = trimesh.PointCloud(v)
    cloud.export(root / "broken" / "points_only.ply")
    return root


def test_scan_loading_normalises_and_reports_reasons(tmp_path):
    root = write_scan_folder(tmp_path / "scans")
    refs = {r.uri.split("/")[-1]: r for r in find_scans([str(root)])}
    assert set(refs) == {"rp_test.obj", "0001.ply", "person.glb", "truncated.glb", "points_only.ply"}
    obj = load_scan(refs["rp_test.obj"], str(tmp_path / "work"))
    allv = np.concatenate([p.vertices for p in obj.parts])
    assert np.ptp(allv[:, 1]) == pytest.approx(180.0, rel=1e-5)
    np.testing.assert_allclose((allv.min(0) + allv.max(0)) / 2, 0, atol=1e-3)
    assert obj.parts[0].texture is not None and obj.parts[0].uv is not None and obj.info["textured"]
    ply = load_scan(refs["0001.ply"], str(tmp_path / "work"))
    np.testing.assert_allclose(ply.parts[0].colors[0], np.array([200, 120, 90]) / 255, atol=1e-6)
    glb = load_scan(refs["person.glb"], str(tmp_path / "work"))
    assert len(glb.parts) == 2
    with pytest.raises(ScanError, match="^unreadable"):
        load_scan(refs["truncated.glb"], str(tmp_path / "work"))
    with pytest.raises(ScanError, match="^no faces"):
        load_scan(refs["points_only.ply"], str(tmp_path / "work"))
    empty = tmp_path / "empty.obj"
    empty.write_text("")
    with pytest.raises(ScanError, match="^empty"):
        load_scan(ScanRef("empty", str(empty)), str(tmp_path / "work"))
    flat = tmp_path / "flat.obj"
    flat.write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n")
    with pytest.raises(ScanError, match="^degenerate"):
        load_scan(ScanRef("flat", str(flat)), str(tmp_path / "work"))


def _clothed_scan(folder, seed: int = 301):
    """A clothed synthetic person saved as a scan would come (one PLY, metres): (the subject, its file)."""
    from model.data.humans import make_subject

    subject = make_subject("scan-person", seed, family="stand")
    merged = subject.merged()
    folder.mkdir(parents=True)
    colours = (merged.colors * 255).astype(np.uint8)
    trimesh.Trimesh(merged.vertices / 100, merged.faces, vertex_colors=colours, process=False).export(folder / "person.ply")
    return subject, folder / "person.ply"


def test_scans_job_writes_good_scans_and_records_failures(ray_local, tmp_path, body_model):
    root = write_scan_folder(tmp_path / "scans")
    person, _ = _clothed_scan(root / "clothed")
    out = tmp_path / "dataset"
    assert pifuhd_data("scans", str(root), "--out", str(out), *SMALL) == 0

    card = fmt.read_card(str(out))
    assert card["kind"] == "scans" and card["counts"]["subjects"] == 4 and card["counts"]["rows"] == 8
    assert card["counts"]["failed"] == 2
    failures = {r["source"].split("/")[-1]: r["reason"] for r in fmt.read_failures(str(out))}
    assert failures["truncated.glb"].startswith("unreadable") and failures["points_only.ply"].startswith("no faces")
    df = pd.read_parquet(out / "shards")
    assert sorted(s.split("/")[-1] for s in df["source"].unique()) == ["0001.ply", "person.glb", "person.ply", "rp_test.obj"]
    for sid in df["subject_id"].unique():
        assert (out / "meshes" / f"{sid}.ply").exists()
    # Labels agree with the (convex) scan: inside points are within the normalised ellipsoid.
    sample = next(fmt.iter_samples(str(out), df[df["source"].str.endswith("0001.ply")]["split"].iloc[0]))
    assert 0.1 < sample["labels"].mean() < 0.7

    # The body under the clothes: fitted to the person's front render, none for the ellipsoids.
    clothed = df[df["source"].str.endswith("person.ply")]
    others = df[~df["source"].str.endswith("person.ply")]
    assert others["body_sdf"].isna().all() and clothed["body_sdf"].notna().all()
    sid = clothed["subject_id"].iloc[0]
    record = json.loads((out / "meshes" / f"{sid}_body.json").read_text())
    assert record["source"].startswith("fitted") and record["mask_iou"] > 0.7 and not record["low_quality"]
    fitted = np.asarray(trimesh.load(out / "meshes" / f"{sid}_body.ply", process=False).vertices)
    # The true body, normalised as the scan was (box centred, 180 cm tall).
    clothes = np.concatenate([p.vertices for p in person.parts]).astype(np.float64)
    lo, hi = clothes.min(0), clothes.max(0)
    truth = (person.body.vertices - (lo + hi) / 2) * (180.0 / (hi - lo)[1])
    offset = fitted - truth
    offset[:, 2] -= offset[:, 2].mean()  # a front view fixes no depth
    assert np.linalg.norm(offset, axis=1).mean() < 6.0  # cm; 4.9 measured
    # Each row's body distances are the fitted body's, in that row's view frame.
    import igl

    row = clothed.iloc[0]
    m = np.asarray(row["view_from_canonical"], np.float64).reshape(4, 4)
    faces = np.asarray(trimesh.load(out / "meshes" / f"{sid}_body.ply", process=False).faces, np.int64)
    points = np.asarray(row["points"], np.float64).reshape(-1, 3)
    inside = igl.fast_winding_number(fitted @ m[:3, :3].T + m[:3, 3], faces, points) > 0.5
    assert np.mean(inside == (np.asarray(row["body_sdf"]) < 0)) > 0.99

    # Re-run: nothing new to make, the failures are tried again and kept, exit 0.
    assert pifuhd_data("scans", str(root), "--out", str(out), *SMALL) == 0
    card2 = fmt.read_card(str(out))
    assert card2["counts"]["rows"] == 8 and card2["counts"]["failed"] == 2


def test_scans_found_and_fetched_from_s3(s3_bucket, tmp_path):
    """Scan folders on object storage: listed, copied with their MTL and texture, loaded."""
    import s3fs

    root = write_scan_folder(tmp_path / "scans")
    fs = s3fs.S3FileSystem()
    fs.put(str(root), f"{s3_bucket}/incoming", recursive=True)
    refs = {r.uri.split("/")[-1]: r for r in find_scans([f"s3://{s3_bucket}/incoming"])}
    assert set(refs) == {"rp_test.obj", "0001.ply", "person.glb", "truncated.glb", "points_only.ply"}
    assert all(r.uri.startswith(f"s3://{s3_bucket}/incoming/") for r in refs.values())
    obj = load_scan(refs["rp_test.obj"], str(tmp_path / "work"))
    assert obj.parts[0].texture is not None and np.ptp(obj.parts[0].vertices[:, 1]) == pytest.approx(180.0, rel=1e-5)
    # The id depends on the path below the given root, so local and remote copies line up.
    assert refs["rp_test.obj"].subject_id.startswith("rp_test_OBJ-rp_test-")


def test_rows_at_1024_decode_both_sizes(body_model):
    job = JobConfig(out="unused", kind="synth", seed=1, count=1, settings=SampleSettings(views=1, resolution=1024, sampling=SamplingConfig(num_points=1700, num_surface_points=50)))
    subject, source, rng = make_job_subject(job, {"subject_id": "synth-1-000000", "index": 0}, "/tmp")
    table = formats.dataset_table(subject_rows(subject, "train", source, rng, job.settings))
    batch = fmt.decode_table(table)
    assert batch["image_1024"].shape == (1, 3, 1024, 1024) and batch["image_512"].shape == (1, 3, 512, 512)
    assert batch["mask_1024"].shape == (1, 1, 1024, 1024) and batch["normal_back_1024"].shape == (1, 3, 1024, 1024)
    # The 512 mask is the 2x2 mean of the 1024 one.
    m1024, m512 = batch["mask_1024"][0, 0], batch["mask_512"][0, 0]
    np.testing.assert_allclose(m1024.reshape(512, 2, 512, 2).mean((1, 3)), m512, atol=1 / 255 + 1e-6)
    assert batch["points"].shape == (1, 3, 1700) and batch["units_per_cm"][0] == pytest.approx(0.01)


def test_merge_makes_one_training_mix(tiny_dataset, tmp_path):
    """Two datasets (the tiny one and a ball scan) into one: every row and mesh once, splits kept;
    a dataset given twice, or a subject in two of them, is refused before anything is written."""
    from pipelines.cli import main
    from pipelines.common import dataset as fmt
    from pipelines.jobs.data import JobConfig, SampleSettings, run_job
    from model.data.scans import ScanConfig
    from model.data.sampling import SamplingConfig

    ball = tmp_path / "ball.ply"
    trimesh.creation.icosphere(subdivisions=3, radius=40.0).export(ball)
    scans = str(tmp_path / "scans")
    run_job(JobConfig(out=scans, kind="scans", inputs=(str(ball),), quiet=True, scan=ScanConfig(fit_body=False),
                      settings=SampleSettings(views=1, resolution=512, val_fraction=0, test_fraction=0,
                                              sampling=SamplingConfig(num_points=1024, num_surface_points=200))))
    mix = tmp_path / "mix"
    assert main(["data", "merge", tiny_dataset, scans, "-o", str(mix)]) == 0
    card, tiny = fmt.read_card(str(mix)), fmt.read_card(tiny_dataset)
    assert card["kind"] == "merged" and len(card["generator"]["sources"]) == 2
    assert card["counts"]["rows"] == tiny["counts"]["rows"] + 1
    assert card["splits"]["subjects"]["val"] == tiny["splits"]["subjects"]["val"]
    assert len(list((mix / "meshes").iterdir())) == len(list((tmp_path / "scans" / "meshes").iterdir())) + len(
        list(Path(tiny_dataset, "meshes").iterdir()))
    for refused in ([tiny_dataset, tiny_dataset], [tiny_dataset, str(mix)]):
        assert main(["data", "merge", *refused, "-o", str(tmp_path / "refused")]) == 2
        assert not (tmp_path / "refused").exists()
