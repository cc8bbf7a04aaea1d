"""Evaluation: known geometry scores known numbers, failures are rows, checkpoint mode runs on a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from model.evaluation.metrics import rigid_icp
from model.reconstruction.config import ReconstructionConfig
from pipelines.cli import main
from pipelines.jobs.evaluate import EvalConfig, pair_metrics, run_evaluation


def sphere(radius: float = 10.0, centre=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    mesh.apply_translation(centre)
    return mesh


def figure() -> trimesh.Trimesh:
    """An asymmetric closed shape (torso, one arm, head), about 60 cm tall: ICP has one answer."""
    body = trimesh.creation.box((30, 60, 20))
    arm = trimesh.creation.box((40, 8, 8))
    arm.apply_translation((25, 20, 0))
    head = trimesh.creation.icosphere(2, 8)
    head.apply_translation((0, 40, 5))
    return trimesh.util.concatenate([body, arm, head])


def test_identical_meshes_score_zero():
    metrics, renders = pair_metrics(figure(), figure(), num_samples=5000, normal_image_size=128)
    assert metrics["chamfer_cm"] < 1e-6 and metrics["p2s_cm"] < 1e-6 and metrics["s2p_cm"] < 1e-6
    assert metrics["normal_consistency"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["fscore_1cm"] == metrics["fscore_2cm"] == 1.0
    assert metrics["normal_image_error"] == 0.0
    predicted, truth = renders
    assert predicted.shape == (4, 128, 128, 3) and predicted.max() > 0.5  # the figure is in every view


def test_known_offset_scores_the_known_distance():
    # Concentric spheres 1 cm apart: every point of one is 1 cm from the other.
    metrics, _ = pair_metrics(sphere(11.0), sphere(10.0), num_samples=5000, normal_image_size=128)
    for name in ("chamfer_cm", "p2s_cm", "s2p_cm"):
        assert metrics[name] == pytest.approx(1.0, abs=0.02), name
    assert metrics["fscore_2cm"] == 1.0
    assert metrics["normal_consistency"] > 0.99
    assert metrics["normal_image_error"] > 0  # the larger sphere covers a ring more pixels


def test_roughness_ratio_sees_a_crumpled_surface():
    smooth, _ = pair_metrics(sphere(10.0), sphere(10.0), num_samples=5000, normal_image_size=0, seed=1)
    crumpled = sphere(10.0)
    rng = np.random.default_rng(0)
    crumpled.vertices += crumpled.vertex_normals * rng.normal(0, 0.3, (len(crumpled.vertices), 1))  # 3 mm bumps
    rough, _ = pair_metrics(crumpled, sphere(10.0), num_samples=5000, normal_image_size=0, seed=1)
    assert smooth["roughness_ratio"] == pytest.approx(1.0, abs=0.1)
    assert rough["roughness_ratio"] > 2.0, rough["roughness_ratio"]
    assert rough["chamfer_cm"] < 0.5  # a small distance hides what the ratio shows


def test_icp_recovers_a_known_rigid_motion():
    truth = figure()
    motion = np.eye(4)
    motion[:3, :3] = Rotation.from_euler("xyz", [5, 12, -4], degrees=True).as_matrix()
    motion[:3, 3] = [2.0, -1.5, 3.0]
    moved = truth.copy()
    moved.apply_transform(motion)
    transform, rms = rigid_icp(moved, truth)
    assert np.allclose(transform @ motion, np.eye(4), atol=1e-3)
    assert rms < 1e-3
    # Through the evaluation: a sphere 1 cm off scores ~0 with ICP and reports the 1 cm it removed.
    metrics, _ = pair_metrics(sphere(centre=(1.0, 0, 0)), sphere(), num_samples=3000, icp=True, normal_image_size=0)
    assert metrics["icp_translation_cm"] == pytest.approx(1.0, abs=0.01)
    assert metrics["chamfer_cm"] < 0.01


@pytest.fixture
def mesh_folders(tmp_path) -> tuple[Path, Path]:
    """GT a..e; predictions: a identical, b 1 cm larger (bulk-style name), c missing, d broken, e empty."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    for name in "abcde":
        sphere().export(gt / f"{name}.ply")
    sphere().export(pred / "a.obj")
    sphere(11.0).export(pred / "b-0123456789.obj")
    (pred / "d.ply").write_bytes(b"not a mesh")
    (pred / "e.ply").write_bytes(trimesh.Trimesh().export(file_type="ply"))
    sphere().export(pred / "unrelated.ply")  # no ground truth: counted, not evaluated
    return pred, gt


def test_folder_mode_counts_missing_and_broken_predictions(mesh_folders, tmp_path, capsys):
    pred, gt = mesh_folders
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(pred), "--gt", str(gt), "-o", str(out), "--in-process", "--quiet",
                 "--num-samples", "2000", "--normal-image-size", "128"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "5 pairs: 2 ok, 3 failed" in printed and "chamfer_cm" in printed
    table = pd.read_parquet(out / "results.parquet").set_index("key")
    assert list(table.index) == list("abcde")
    assert table.loc["a", "chamfer_cm"] < 1e-6
    assert table.loc["b", "chamfer_cm"] == pytest.approx(1.0, abs=0.03)
    assert dict(table["error_class"].dropna()) == {"c": "MissingPrediction", "d": "BrokenMesh", "e": "EmptyPrediction"}
    assert (table["status"] == "failed").sum() == 3
    assert Path(table.loc["b", "comparison_uri"]).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] == 2 and summary["failed"] == 3 and summary["unmatched_predictions"] == 1
    assert summary["metrics"]["p2s_cm"]["count"] == 2


def test_folder_mode_reads_and_writes_object_storage(s3_bucket, tmp_path):
    import boto3
    import os

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for key, mesh in (("gt/a.ply", sphere()), ("gt/b.ply", sphere()), ("pred/a.ply", sphere(10.5))):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=mesh.export(file_type="ply"))
    out = f"s3://{s3_bucket}/eval"
    result = run_evaluation(EvalConfig(pred=f"s3://{s3_bucket}/pred", gt=f"s3://{s3_bucket}/gt", out=out, num_samples=1000,
                                       normal_image_size=64), in_process=True, progress=False)
    table = result.table.set_index("key")
    assert table.loc["a", "p2s_cm"] == pytest.approx(0.5, abs=0.03)
    assert table.loc["b", "error_class"] == "MissingPrediction"
    assert result.results_uri == f"{out}/results.parquet"
    stored = pd.read_parquet(result.results_uri)
    assert len(stored) == 2 and stored.set_index("key").loc["a", "comparison_uri"].startswith(f"{out}/comparisons/")


def test_manifest_mode_pairs_by_input_stem(tmp_path):
    from pipelines.common.formats import ManifestWriter

    gt = tmp_path / "gt"
    gt.mkdir()
    for name in ("alice", "bob", "carol"):
        sphere().export(gt / f"{name}.ply")
    bulk = tmp_path / "bulk"
    (bulk / "meshes").mkdir(parents=True)
    sphere(10.5).export(bulk / "meshes" / "alice-0011223344.obj")
    writer = ManifestWriter(str(bulk), "run1", flush_rows=10, constants={"checkpoint_version": "test"})
    writer.add({"input_uri": "/photos/alice.jpg", "status": "ok", "mesh_uri": str(bulk / "meshes" / "alice-0011223344.obj")})
    writer.add({"input_uri": "/photos/bob.png", "status": "failed", "error_class": "InputError", "error_message": "no person"})
    writer.flush()
    result = run_evaluation(EvalConfig(pred=str(bulk), gt=str(gt), out=str(tmp_path / "eval"), num_samples=2000,
                                       normal_image_size=0), in_process=True, progress=False)
    assert result.mode == "manifest"
    table = result.table.set_index("key")
    assert table.loc["alice", "status"] == "ok"
    assert table.loc["alice", "p2s_cm"] == pytest.approx(0.5, abs=0.02)
    assert table.loc["bob", "error_class"] == "InputError"
    assert table.loc["carol", "error_class"] == "MissingPrediction"


# ---- checkpoint mode on a generated test split (real Ray) -----------------------------------


@pytest.fixture(scope="module")
def test_split_dataset(ray_local, tmp_path_factory) -> str:
    """2 synthetic subjects x 1 view at 512, all in the test split, made by the data job itself."""
    from model.data.sampling import SamplingConfig
    from pipelines.jobs.data import JobConfig, SampleSettings, run_job

    out = str(tmp_path_factory.mktemp("eval-dataset"))
    settings = SampleSettings(views=1, resolution=512, val_fraction=0, test_fraction=1.0,
                              sampling=SamplingConfig(num_points=2048, num_surface_points=500))
    run_job(JobConfig(out=out, kind="synth", count=2, settings=settings, quiet=True))
    return out


def test_checkpoint_mode_reconstructs_the_test_split(test_split_dataset, tmp_path):
    from pipelines.common.dataset import list_shards
    from pipelines.jobs.evaluate import load_mesh, prepared_view, read_view
    from tests.helpers import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    config = EvalConfig(pred=str(checkpoint), gt=test_split_dataset, out=str(tmp_path / "eval"),
                        reconstruction=ReconstructionConfig(resolution=64, color="none"),
                        num_samples=2000, normal_image_size=256)
    assert config.split == "test"  # test splits are the default evaluation set
    result = run_evaluation(config, progress=False)
    assert result.mode == "checkpoint"
    table = result.table
    assert sorted(table["key"]) == ["synth-0-000000-view0", "synth-0-000001-view0"]
    # Random weights reconstruct some blob: it must be compared (finite numbers), not crash.
    assert (table["status"] == "ok").all(), table[["key", "error_class", "error_message"]]
    assert np.isfinite(table[["chamfer_cm", "p2s_cm", "normal_image_error"]].to_numpy()).all()
    for column in ("pred_uri", "preview_uri", "comparison_uri"):
        assert all(Path(uri).is_file() for uri in table[column]), column

    # The frame the comparison happens in: the GT mesh, mapped by view_from_canonical, lands on
    # the person's mask in the stored image that the network sees (identity crop).
    subject = pd.read_parquet(list_shards(test_split_dataset, "test")[0], columns=["subject_id"])["subject_id"][0]
    view = read_view(list_shards(test_split_dataset, "test")[0], 0)
    assert view["image"].shape == (3, 512, 512) and view["units_per_cm"] == pytest.approx(0.01)
    truth = load_mesh(f"{test_split_dataset}/meshes/{subject}.ply")
    truth.apply_transform(view["view_from_canonical"])
    prepared = prepared_view(view["image"], view["mask"], 128, 256, "check")
    mask = prepared.mask[0].numpy()
    v = np.asarray(truth.vertices)
    column = np.round((v[:, 0] + 1) / 2 * 255).astype(int)
    row = np.round((1 - v[:, 1]) / 2 * 255).astype(int)
    assert (mask[row, column] > 0.5).mean() > 0.85


def test_silhouette_baseline_is_scored_beside_the_model(test_split_dataset, tmp_path, capsys):
    from tests.helpers import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(checkpoint), "--gt", test_split_dataset, "-o", str(out), "--resolution", "64",
                 "--num-samples", "2000", "--normal-image-size", "0", "--baseline", "silhouette", "--quiet"])
    assert code == 0
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["method"]) == ["model", "model", "silhouette", "silhouette"]
    baseline = table[table["method"] == "silhouette"]
    assert (baseline["status"] == "ok").all() and baseline["checkpoint_id"].isna().all()
    # The slab has the person's outline: its Chamfer to the truth stays near 10 cm (8-11 here), not a blob's tens.
    assert (baseline["chamfer_cm"] < 15).all(), baseline["chamfer_cm"]
    printed = capsys.readouterr().out
    assert "silhouette mean" in printed and "model / silhouette baseline: chamfer_cm" in printed
    # Random weights do not beat the floor, and the summary says so.
    assert "does NOT beat the silhouette baseline" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["chamfer_cm"]["count"] == 2
    assert summary["baselines"]["silhouette"]["metrics"]["chamfer_cm"]["count"] == 2
    with pytest.raises(ValueError, match="baseline"):
        EvalConfig(gt="x", out="y", baseline="sphere")


@pytest.mark.parametrize("bodies", ["true", "fitted"])
def test_a_body_guided_checkpoint_reads_the_true_or_a_fitted_body(test_split_dataset, tmp_path, bodies):
    from model.network.checkpoint import save_checkpoint
    from tests.helpers import tiny_network

    checkpoint = save_checkpoint(tiny_network().with_body_guidance(), tmp_path / "guided.safetensors", metadata={"preset": "tiny"})
    out = tmp_path / "eval"
    code = main(["evaluate", "--pred", str(checkpoint), "--gt", test_split_dataset, "-o", str(out), "--resolution", "32",
                 "--num-samples", "1000", "--normal-image-size", "0", "--bodies", bodies, "--limit", "1", "--quiet"])
    assert code == 0
    (row,) = pd.read_parquet(out / "results.parquet").to_dict("records")
    assert row["status"] == "ok" and row["body_source"] == bodies, row["error_message"]
    if bodies == "fitted":  # the person finder's landmarks and the view's mask: the body lies on the person
        assert row["body_mask_iou"] > 0.5
    else:
        assert pd.isna(row["body_mask_iou"])


def test_calibration_stores_the_best_level_and_reconstruction_reads_it(tiny_dataset, tmp_path):
    import torch

    from model.network.checkpoint import load_checkpoint, read_checkpoint
    from model.reconstruction.reconstruct import ReconstructionConfig, reconstruct, surface_level
    from pipelines.jobs.calibrate import CalibrationConfig
    from pipelines.common.dataset import list_shards
    from pipelines.jobs.evaluate import prepared_view, read_view
    from tests.helpers import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    out = tmp_path / "calibrated.safetensors"
    code = main(["checkpoint", "calibrate", str(checkpoint), "--data", tiny_dataset, "-o", str(out), "--limit", "2",
                 "--levels", "0.3", "0.5", "0.7", "--resolution", "32", "--num-samples", "1000"])
    assert code == 0
    calibrated = load_checkpoint(out)
    record = calibrated.checkpoint_metadata["surface_level_calibration"]
    assert record["split"] == "val" and record["views"] == 2 and set(record["levels"]) == {"0.3", "0.5", "0.7"}
    best = min(record["levels"], key=lambda level: record["levels"][level]["chamfer_cm"])
    assert surface_level(calibrated) == record["surface_level"] == float(best)
    assert surface_level(load_checkpoint(checkpoint)) == 0.5  # a checkpoint that names no level: PIFuHD's 0.5
    original, _, _ = read_checkpoint(checkpoint)
    stored, _, _ = read_checkpoint(out)
    assert original.keys() == stored.keys() and all(torch.equal(original[k], stored[k]) for k in original)

    # Reconstruction reads the stored level unless told another.
    view = read_view(list_shards(tiny_dataset, "val")[0], 0)
    prepared = prepared_view(view["image"], view["mask"], 128, 256, "level")
    at = {level: len(reconstruct(calibrated, prepared, ReconstructionConfig(resolution=32, color="none", threshold=level)).mesh.vertices)
          for level in (None, float(best))}
    assert at[None] == at[float(best)]
    with pytest.raises(ValueError, match="test views"):
        CalibrationConfig(checkpoint=str(checkpoint), data=tiny_dataset, output=str(out), split="test")


def test_a_view_without_a_person_is_meshed_by_the_fallback(ray_local, tmp_path):
    """As reconstruct does: a body-guided model's view that no body can be fitted to (here a ball
    scan: no person) is meshed by the plain fallback, whose id the row carries; without one it fails."""
    from model.network.checkpoint import save_checkpoint
    from pipelines.jobs.data import JobConfig, SampleSettings, run_job
    from model.data.scans import ScanConfig
    from model.data.sampling import SamplingConfig
    from tests.helpers import tiny_network, write_tiny_checkpoint

    ball = tmp_path / "ball.ply"
    trimesh.creation.icosphere(subdivisions=3, radius=40.0).export(ball)
    data = str(tmp_path / "balls")
    settings = SampleSettings(views=1, resolution=512, val_fraction=0, test_fraction=1.0,
                              sampling=SamplingConfig(num_points=2048, num_surface_points=500))
    run_job(JobConfig(out=data, kind="scans", inputs=(str(ball),), settings=settings, scan=ScanConfig(fit_body=False), quiet=True))
    guided = save_checkpoint(tiny_network().with_body_guidance(), tmp_path / "guided.safetensors", metadata={"preset": "tiny"})
    plain = write_tiny_checkpoint(tmp_path / "plain.safetensors", seed=1)
    rows = {}
    for name, fallback in (("none", []), ("plain", ["--fallback-checkpoint", str(plain)])):
        out = tmp_path / f"eval-{name}"
        assert main(["evaluate", "--pred", str(guided), "--gt", data, "-o", str(out), "--resolution", "32", "--num-samples",
                     "1000", "--normal-image-size", "0", "--in-process", "--quiet", *fallback]) == 0
        (rows[name],) = pd.read_parquet(out / "results.parquet").to_dict("records")
    assert rows["none"]["status"] == "failed" and "no person found" in rows["none"]["error_message"]
    assert rows["plain"]["status"] == "ok" and rows["plain"]["body_source"] == "none"
    summary = json.loads((tmp_path / "eval-plain" / "summary.json").read_text())
    assert rows["plain"]["checkpoint_id"] == summary["fallback_id"] != summary["checkpoint_id"]
