"""The HTML report: built from a bulk output, an evaluation and a training run, opened in headless Chromium."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trimesh
from PIL import Image

from pipelines.jobs.report import ReportConfig, make_report, nice_ticks

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _png(path: Path, colour: tuple[int, int, int], size=(1280, 256)) -> str:
    Image.new("RGB", size, colour).save(path)
    return str(path)


@pytest.fixture
def report_inputs(tmp_path) -> dict:
    """A bulk output (2 runs, a failure), an evaluation (in process, real metrics) and a training run."""
    from pipelines.common.formats import ManifestWriter
    from pipelines.jobs.evaluate import EvalConfig, run_evaluation

    bulk = tmp_path / "bulk"
    (bulk / "meshes").mkdir(parents=True)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rng = np.random.default_rng(0)
    for run in ("run-a", "run-b"):
        writer = ManifestWriter(str(bulk), run, flush_rows=100, constants={"checkpoint_version": "test"})
        for i in range(12):
            times = {f"seconds_{s}": float(t) for s, t in zip(("read", "prepare", "encode", "surface", "mesh", "write"),
                                                              rng.uniform([0.01, 0.1, 1, 3, 0.5, 0.05], [0.05, 0.3, 2, 6, 1, 0.1]))}
            failed = i == 5
            row = writer.add({"run_id": run, "input_uri": f"/in/{run}-{i}.jpg", "status": "failed" if failed else "ok",
                              "error_class": "InputError" if failed else None,
                              "error_message": "no person box <b>" if failed else None,
                              "body_error": "LowQualityFit: mask IoU 0.41 < 0.6" if i == 7 else None,
                              "preview_uri": _png(bulk / "meshes" / f"{run}-{i}_preview.png", (200, 80, 40)), **times})
            row["finished_at"] = start + timedelta(seconds=7 * i)
        writer.flush()

    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    for name, radius in (("s1", 10.0), ("s2", 11.0), ("s3", 12.5)):
        trimesh.creation.icosphere(3, 10.0).export(gt / f"{name}.ply")
        trimesh.creation.icosphere(3, radius).export(pred / f"{name}.ply")
    trimesh.creation.icosphere(3, 10.0).export(gt / "missing.ply")
    evaluation = tmp_path / "eval"
    run_evaluation(EvalConfig(pred=str(pred), gt=str(gt), out=str(evaluation), num_samples=1000, normal_image_size=128),
                   in_process=True, progress=False)

    run = tmp_path / "runs" / "tiny-coarse"
    (run / "metrics").mkdir(parents=True)
    for step in range(10, 210, 10):
        row = {"step": step, "loss": float(0.7 * np.exp(-step / 80) + 0.05), "stage": "coarse"}
        if step % 50 == 0:
            row.update(val_point_iou=0.3 + step / 500, val_chamfer_cm=8 - step / 40)
        pq.write_table(pa.Table.from_pylist([row]), run / "metrics" / f"step-{step:09d}.parquet")
    return {"bulk": str(bulk), "eval": str(evaluation), "run_root": str(tmp_path / "runs")}


def test_nice_ticks_are_round_and_cover_the_range():
    ticks = nice_ticks(0.13, 9.7)
    assert ticks[0] <= 0.13 and ticks[-1] >= 9.7 and ticks == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert nice_ticks(5.0, 5.0)[0] < 5.0 < nice_ticks(5.0, 5.0)[-1]


def test_report_is_self_contained(report_inputs, tmp_path):
    out = tmp_path / "report.html"
    result = make_report(ReportConfig(inputs=(report_inputs["bulk"], report_inputs["eval"], report_inputs["run_root"]),
                                      output=str(out), worst=3))
    assert {kind for kind, _ in result["sources"]} == {"manifest", "evaluation", "training"}
    page = out.read_text()
    # Nothing to fetch: no script, no external reference; the only URL is the SVG namespace.
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    assert "no person box &lt;b&gt;" in page  # failure messages are escaped
    assert "Made without a fitted body (2 of 22 ok rows)" in page and "LowQualityFit" in page
    assert "MissingPrediction" in page


def test_report_renders_in_headless_chromium(report_inputs, tmp_path):
    out = tmp_path / "report.html"
    result = make_report(ReportConfig(inputs=(report_inputs["bulk"], report_inputs["eval"], report_inputs["run_root"]),
                                      output=str(out), worst=3))
    # 3 manifest plots + 8 metric histograms + loss + 2 validation curves; 3 worst cases x 1 comparison
    # image, and the previews of the 2 rows made without a fitted body.
    assert result["svg"] == 15 and result["img"] == 5

    def chromium(*extra: str) -> subprocess.CompletedProcess:
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                   "--enable-logging=stderr", "--v=0", *extra, out.as_uri()]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    dom = chromium("--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # Console messages (script errors, blocked requests) are logged as CONSOLE lines.
    assert not [line for line in dom.stderr.splitlines() if "CONSOLE" in line], dom.stderr
    assert dom.stdout.count("<svg") == 15
    assert dom.stdout.count("<img") == 5
    assert dom.stdout.count("<polyline") >= 4  # throughput (2 runs), loss, validation curves drawn
    assert dom.stdout.count("<rect") > 30  # histogram and stage bars drawn

    screenshot = tmp_path / "report.png"
    shot = chromium("--screenshot=" + str(screenshot), "--window-size=1280,2000", "--hide-scrollbars")
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    assert not [line for line in shot.stderr.splitlines() if "CONSOLE" in line], shot.stderr
    image = np.asarray(Image.open(io.BytesIO(screenshot.read_bytes())).convert("RGB"))
    assert image.shape[:2] == (2000, 1280)
    assert image.std() > 10  # not a blank page
