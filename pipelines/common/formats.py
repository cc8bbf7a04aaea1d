"""Every table the product writes: its Parquet schema, its writer and its reader.

Importable without torch or Ray (pyarrow, and pandas where a reader returns a DataFrame), so
that `pifuhd report` and any notebook read a job's outputs without loading a model.

    OUT/manifest/run-<run_id>-<part>.parquet   `pifuhd reconstruct` (MANIFEST_SCHEMA) and `pifuhd fit`
                                               (FIT_MANIFEST_SCHEMA): one row per input per run
    OUT/results.parquet                        `pifuhd evaluate` (RESULT_SCHEMA): one row per pair
    RUN/metrics/step-<step>.parquet            `pifuhd train`: one row per report (columns vary)
    DATASET/shards/<split>/part-*.parquet      `pifuhd data` (DATASET_SCHEMA; layout and decoding
                                               in `pipelines.common.dataset`)
    DATASET/failures.parquet                   subjects that could not be made (DATASET_FAILURE_SCHEMA)
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from model.errors import StoreError
from pipelines.common import storage
from pipelines.common.storage import join
from pipelines.common.uris import redact

log = logging.getLogger(__name__)

# ---- manifests ------------------------------------------------------------------------------

# The columns every job's manifest starts with.
INPUT_RESULT_FIELDS = [
    ("run_id", pa.string()),
    ("input_uri", pa.string()),
    ("content_hash", pa.string()),  # sha256 of the image and its sidecars
    ("status", pa.string()),  # ok | failed | skipped
    ("error_class", pa.string()),
    ("error_message", pa.string()),
    ("mesh_uri", pa.string()),
]
MANIFEST_SCHEMA = pa.schema(
    [
        *INPUT_RESULT_FIELDS,
        ("person_index", pa.int64()),  # rank of the person among those found (0 = most prominent)
        ("persons_found", pa.int64()),  # people the finder found (null when it did not run)
        ("person_score", pa.float64()),  # the reconstructed person's detection score
        ("person_mask_area", pa.float64()),  # fraction of the image's pixels in its mask
        # What cut the person out: "person" (the finder), "mask" (a NAME_mask sidecar), "alpha", or
        # null (no background removed: --person off, or a rect/keypoints box nobody was found in).
        ("mask_source", pa.string()),
        ("body_uri", pa.string()),  # the fitted anny body (--body, body-guided models), else null
        ("body_mask_iou", pa.float64()),  # its projection's IoU with the person mask
        # Why no body could be fitted; with a body-guided checkpoint the fallback checkpoint made the mesh.
        ("body_error", pa.string()),
        ("preview_uri", pa.string()),
        ("vertices", pa.int64()),
        ("faces", pa.int64()),
        ("bbox_min", pa.list_(pa.float64(), 3)),  # user (pixel) frame
        ("bbox_max", pa.list_(pa.float64(), 3)),
        ("points_evaluated", pa.int64()),
        ("seconds_read", pa.float64()),
        ("seconds_prepare", pa.float64()),
        ("seconds_encode", pa.float64()),
        ("seconds_surface", pa.float64()),
        ("seconds_mesh", pa.float64()),
        ("seconds_write", pa.float64()),
        ("node", pa.string()),
        ("worker", pa.string()),
        ("checkpoint_id", pa.string()),  # the model that made this mesh (the fallback's on rows with a body_error)
        ("checkpoint_version", pa.string()),
        # Hash of everything that shapes the outputs (checkpoints, reconstruction, format, person
        # and fit settings): an input is skipped only when its content and this key are unchanged.
        ("settings_key", pa.string()),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
    ]
)
FIT_MANIFEST_SCHEMA = pa.schema(
    [
        *INPUT_RESULT_FIELDS,
        ("params_uri", pa.string()),  # STEM_body.json
        ("rigged_uri", pa.string()),
        ("vertices", pa.int64()),
        ("faces", pa.int64()),
        ("bbox_min", pa.list_(pa.float64(), 3)),  # pixel frame
        ("bbox_max", pa.list_(pa.float64(), 3)),
        ("mask_iou", pa.float64()),
        ("landmark_error_px", pa.float64()),
        ("low_quality", pa.bool_()),
        ("quality_note", pa.string()),
        ("landmark_source", pa.string()),
        ("seconds_read", pa.float64()),
        ("seconds_fit", pa.float64()),
        ("seconds_write", pa.float64()),
        ("node", pa.string()),
        ("worker", pa.string()),
        ("fitter_id", pa.string()),  # hash of the fit settings and the anny version
        ("finished_at", pa.timestamp("ms", tz="UTC")),
    ]
)


class ManifestWriter:
    """Appends manifest rows to Parquet parts, one every `flush_rows` rows or `flush_seconds`.

    `constants` are set on every row (e.g. {"checkpoint_version": ...}; a plain string is the
    checkpoint version); `schema` is MANIFEST_SCHEMA or FIT_MANIFEST_SCHEMA.

    A part the store refuses (a full disk, an S3 endpoint gone) is tried again after each of
    `retry_delays_s`; then `StoreError` is raised and the rows stay pending. `close` writes what
    is pending and, when the store still refuses it, spools it to this machine's disk
    (`spool_folder`), from where the next job into the same output moves it into the manifest
    (`recover_spool`): no row that was computed is lost.
    """

    def __init__(self, output: str, run_id: str, flush_rows: int, constants: dict | str,
                 schema: pa.Schema = MANIFEST_SCHEMA, flush_seconds: float = 60.0,
                 retry_delays_s: tuple[float, ...] = (1.0, 4.0, 16.0)):
        self.output = output
        self.folder = join(output, "manifest")
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.retry_delays_s = retry_delays_s
        self.constants = {"checkpoint_version": constants} if isinstance(constants, str) else dict(constants)
        self.schema = schema
        self.pending: list[dict] = []
        self.files: list[str] = []
        self.last_flush = time.monotonic()

    def add(self, record: dict) -> dict:
        row = {name: record.get(name) for name in self.schema.names}
        row.update(self.constants)
        finished_at = record.get("finished_at")  # the row's own finishing time
        if isinstance(finished_at, datetime):
            row["finished_at"] = finished_at
        else:
            row["finished_at"] = datetime.fromtimestamp(finished_at or time.time(), timezone.utc)
        for column in self.schema:
            value = row[column.name]
            if value is None:
                continue
            if pa.types.is_integer(column.type):
                row[column.name] = int(value)
            elif pa.types.is_list(column.type) and any(v is None or v != v for v in value):
                row[column.name] = None  # a NaN bounding box (empty mesh) is stored as missing
        self.pending.append(row)
        if len(self.pending) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()
        return row

    def _part_name(self) -> str:
        return f"run-{self.run_id}-{len(self.files):05d}.parquet"

    def _pending_part(self) -> bytes:
        """The pending rows as one Parquet part's bytes."""
        return storage.parquet_bytes(pa.Table.from_pylist(self.pending, schema=self.schema))

    def flush(self) -> None:
        """Write the pending rows as one part; StoreError (rows kept pending) when the store keeps refusing."""
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        uri = join(self.folder, self._part_name())
        data = self._pending_part()
        for delay in (*self.retry_delays_s, None):
            try:
                storage.write_bytes_atomic(uri, data)
                break
            except Exception as exc:  # noqa: BLE001 - OSError, botocore's errors, ...: a store that failed
                if delay is None:
                    raise StoreError(f"the output store {redact(self.output)} refused the manifest "
                                     f"{1 + len(self.retry_delays_s)} times ({type(exc).__name__}: {redact(str(exc))[:300]})") from None
                log.warning("writing %s failed (%s); trying again in %g s", redact(uri), type(exc).__name__, delay)
                time.sleep(delay)
        self.files.append(uri)
        self.pending = []
        self.last_flush = time.monotonic()

    def close(self) -> None:
        """Write every pending row: to the store, else to the local spool (then StoreError saying where)."""
        try:
            self.flush()
        except StoreError as exc:
            count = len(self.pending)
            try:
                spooled = join(spool_folder(self.output), self._part_name())
                storage.write_bytes_atomic(spooled, self._pending_part())
            except OSError as spool_exc:
                raise StoreError(f"{exc}; {count} rows could not be kept: spooling them to this machine failed too "
                                 f"({spool_exc})") from None
            self.pending = []
            raise StoreError(f"{exc}; its {count} unwritten rows are kept in {spooled}, and the next job into "
                             "this output moves them into its manifest") from None


def spool_folder(output: str) -> str:
    """Where a job keeps manifest rows its output store refused: on this machine, one folder per output."""
    from model.cache import CACHE_ROOT

    key = hashlib.sha256(output.rstrip("/").encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return str(CACHE_ROOT / "manifest-spool" / key)


def recover_spool(output: str) -> int:
    """Move the parts an earlier job spooled for `output` into its manifest; the number of rows moved."""
    folder = spool_folder(output)
    if not os.path.isdir(folder):
        return 0
    moved = 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".parquet"):
            continue
        local = os.path.join(folder, name)
        storage.write_bytes_atomic(join(output, "manifest", name), storage.read_bytes(local))
        moved += storage.read_parquet_metadata(local).num_rows  # the footer only
        os.remove(local)
    if moved:
        log.warning("moved %d manifest rows an earlier job could not write into %s", moved, redact(join(output, "manifest")))
    return moved


def read_manifest(output: str, schema: pa.Schema = MANIFEST_SCHEMA):
    """All manifest rows of an output folder as a pandas DataFrame (every run; unreadable parts skipped).
    Integer columns stay integers where rows have no value (pandas' nullable Int64, not float)."""
    import pandas as pd

    tables = storage.read_parquet_parts(join(output, "manifest"), schema=schema)
    if not tables:
        return pd.DataFrame(columns=schema.names)
    return pa.concat_tables(tables).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


# ---- evaluation results ---------------------------------------------------------------------

# The per-pair metrics, in the order tables show them; lower is better except HIGHER_IS_BETTER.
# depth_ratio: the prediction's extent along z (toward the camera) over the truth's, 2nd to 98th
# percentile of surface samples; 1 is right, a blob from the silhouette alone is well above 1.
# roughness_ratio: how crumpled the prediction is against the truth (model.evaluation.metrics.roughness_deg).
METRICS = ("chamfer_cm", "p2s_cm", "s2p_cm", "normal_consistency", "roughness_ratio", "normal_image_error", "fscore_1cm",
           "fscore_2cm", "depth_ratio")
HIGHER_IS_BETTER = ("normal_consistency", "fscore_1cm", "fscore_2cm")
RESULT_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("mode", pa.string()),  # checkpoint | folder | manifest
        ("key", pa.string()),  # unique per row: the stem, or SUBJECT-viewN (+ "-BASELINE" for baseline rows)
        ("method", pa.string()),  # "model", or the baseline's name
        ("subject_id", pa.string()),
        ("view", pa.int32()),  # dataset view index (checkpoint mode), else null
        ("status", pa.string()),  # ok | failed
        ("error_class", pa.string()),
        ("error_message", pa.string()),
        ("pred_uri", pa.string()),  # the compared prediction (checkpoint mode: the mesh written)
        ("gt_uri", pa.string()),
        ("preview_uri", pa.string()),  # input | normals | mesh strip (bulk's or ours), if any
        ("comparison_uri", pa.string()),  # normal renders: truth (top) over prediction (bottom)
        *[(name, pa.float64()) for name in METRICS],
        ("normal_image_error_views", pa.list_(pa.float64())),  # per yaw 0/90/180/270
        ("icp", pa.bool_()),
        ("icp_rotation_deg", pa.float64()),  # angle of the rotation ICP applied
        ("icp_translation_cm", pa.float64()),
        ("icp_rms_cm", pa.float64()),
        ("pred_vertices", pa.int64()),
        ("pred_faces", pa.int64()),
        ("gt_faces", pa.int64()),
        ("num_samples", pa.int64()),
        ("checkpoint_id", pa.string()),
        ("body_source", pa.string()),  # body-guided checkpoints: "fitted" or "true", else null
        ("body_mask_iou", pa.float64()),  # a fitted body's IoU with the view's mask
        ("seconds", pa.float64()),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
    ]
)


def write_results(rows: list[dict], out: str) -> tuple[str, object]:
    """Write OUT/results.parquet (replacing an earlier one); returns (its URI, the pandas table)."""
    floats = {f.name for f in RESULT_SCHEMA if pa.types.is_floating(f.type)}
    clean = [{name: (None if row.get(name) is None else float(row[name])) if name in floats else row.get(name)
              for name in RESULT_SCHEMA.names} for row in rows]
    table = pa.Table.from_pylist(clean, schema=RESULT_SCHEMA)
    uri = join(out, "results.parquet")
    storage.write_parquet_atomic(uri, table)
    return uri, table.to_pandas()


def read_results(out: str):
    """OUT/results.parquet (or the file itself) as a pandas DataFrame."""
    uri = out if out.endswith(".parquet") else join(out, "results.parquet")
    return storage.read_parquet(uri).to_pandas()


def summarize_rows(table) -> dict:
    """ok / failed counts, failure classes, and mean / median / n of each metric over ok rows."""
    ok = table[table["status"] == "ok"] if len(table) else table
    failed = table[table["status"] != "ok"] if len(table) else table
    metrics = {}
    for name in METRICS:
        values = ok[name].to_numpy(dtype=float) if len(ok) else np.zeros(0)
        values = values[np.isfinite(values)]
        metrics[name] = {
            "mean": float(values.mean()) if len(values) else None,
            "median": float(np.median(values)) if len(values) else None,
            "count": int(len(values)),
        }
    reasons = failed["error_class"].fillna("unknown").value_counts().to_dict() if len(failed) else {}
    return {"pairs": int(len(table)), "ok": int(len(ok)), "failed": int(len(failed)), "metrics": metrics,
            "failures": {str(k): int(v) for k, v in reasons.items()}}


def summarize(table) -> dict:
    """The model's rows summarised (`summarize_rows`), and each baseline's under "baselines"."""
    methods = table["method"].fillna("model") if len(table) and "method" in table else None
    if methods is None:
        return summarize_rows(table)
    summary = summarize_rows(table[methods == "model"])
    summary["baselines"] = {str(m): summarize_rows(table[methods == m]) for m in sorted(set(methods) - {"model"})}
    return summary


def beats_baseline(summary: dict, name: str) -> dict:
    """Model / baseline ratios of the mean Chamfer and P2S, and whether both are below 1."""
    base = summary["baselines"][name]["metrics"]
    ratios = {}
    for metric in ("chamfer_cm", "p2s_cm"):
        a, b = summary["metrics"][metric]["mean"], base[metric]["mean"]
        ratios[metric] = a / b if a is not None and b else None
    return {"ratios": ratios, "beats": all(r is not None and r < 1 for r in ratios.values())}


# ---- training metrics -----------------------------------------------------------------------


def write_training_metrics(run_uri: str, row: dict) -> None:
    """One report of a training run (step, loss, stage, and validation figures where measured)."""
    storage.write_parquet_atomic(join(run_uri, "metrics", f"step-{row['step']:09d}.parquet"), pa.Table.from_pylist([row]))


def read_training_metrics(run_uri: str):
    """The metrics table of a run folder (OUT/NAME) as a pandas DataFrame, one row per report.

    Parts differ in columns (validation rows carry more), so they are read one by one;
    an unreadable part is skipped with a warning.
    """
    import pandas as pd

    parts = [table.to_pandas() for table in storage.read_parquet_parts(join(run_uri, "metrics"))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["step", "loss", "stage"])


# ---- training data --------------------------------------------------------------------------

DATASET_SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGE_KINDS = ("image", "mask", "normal_front", "normal_back")
_f32_list = pa.list_(pa.float32())
# One row per (subject, view), in the network's frame (see `pipelines.common.dataset`).
DATASET_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int16()),
        ("subject_id", pa.string()),
        ("view", pa.int16()),
        ("split", pa.string()),
        ("source", pa.string()),  # "synth" or the scan's URI
        ("yaw_deg", pa.float32()),
        ("pitch_deg", pa.float32()),
        ("units_per_cm", pa.float32()),
        ("calib", _f32_list),  # 16, row-major (4, 4)
        ("view_from_canonical", _f32_list),  # 16, row-major (4, 4): GT mesh (cm) -> this view
        ("lighting_sh", _f32_list),  # 27, (9, 3) SH radiance coefficients
        ("background", pa.string()),
        *[(f"{k}_512", pa.binary()) for k in IMAGE_KINDS],
        *[(f"{k}_1024", pa.binary()) for k in IMAGE_KINDS],  # null when rendered at 512 only
        ("num_points", pa.int32()),
        ("points", _f32_list),  # num_points * 3, xyz interleaved: (N, 3) row-major, view frame
        ("labels", pa.list_(pa.uint8())),  # num_points, 1 inside
        ("surface_points", _f32_list),  # M * 3, points on the surface (view frame)
        ("surface_normals", _f32_list),  # M * 3, their unit outward normals
        ("mesh_path", pa.string()),  # relative to the dataset root
        # Synthetic subjects: the body under the clothes at every labelled point (null for scans):
        ("body_sdf", _f32_list),  # num_points, signed distance in box units, negative inside the body
        ("body_normals", _f32_list),  # num_points * 3, outward normal of the closest body face
    ]
)
DATASET_FAILURE_SCHEMA = pa.schema(
    [("subject_id", pa.string()), ("source", pa.string()), ("reason", pa.string()), ("time", pa.string())]
)


def dataset_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with numpy arrays for list columns) -> a table of DATASET_SCHEMA."""
    columns = {}
    for field in DATASET_SCHEMA:
        values = [r.get(field.name) for r in rows]
        if pa.types.is_list(field.type):
            values = [None if v is None else np.asarray(v).reshape(-1) for v in values]
            dtype = field.type.value_type.to_pandas_dtype()
            offsets = np.cumsum([0] + [0 if v is None else len(v) for v in values]).astype(np.int32)
            present = [v.astype(dtype) for v in values if v is not None]
            flat = np.concatenate(present) if present else np.zeros(0, dtype)
            mask = pa.array([v is None for v in values])
            columns[field.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=field.type.value_type), mask=mask)
        else:
            columns[field.name] = pa.array(values, type=field.type)
    return pa.Table.from_pydict(columns, schema=DATASET_SCHEMA)


def dataset_shard_bytes(rows: list[dict]) -> bytes:
    """A shard's Parquet bytes: one row group, so that a shard is one unit of work for readers."""
    # Images are PNG already and points are noise: compression buys little, zstd stays cheap.
    return storage.parquet_bytes(dataset_table(rows), compression="zstd", row_group_size=max(len(rows), 1))
