"""What every Ray Data job of the project shares: its rows between stages, its checks, its driver loop.

A job's stages pass Arrow tables of a stage schema (`stage_schema`): a row's record in typed
columns (its manifest's, then what the stages and the driver need) and a binary `payload` (the
arrays the next stage needs, pickled). `rows` and `to_table` convert between tables and
(record, payload) pairs; any failure in a stage becomes status "failed" on that row (`fail`), and
later stages pass failed and skipped rows on untouched. The driver streams the rows back
(`stage_results`) into the job's manifest (`drain_results`, counted in a `Summary`). A `.json`
marker written last beside an input's outputs marks it finished (`finished_marker`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from model.errors import InputError
from pipelines.common import exit_codes
from pipelines.common.formats import ManifestWriter
from pipelines.common.inputs import InputItem
from pipelines.common.storage import filesystem, join, write_bytes_atomic
from pipelines.common.uris import redact


def stage_schema(manifest: pa.Schema, *extra: tuple[str, pa.DataType]) -> pa.Schema:
    """The columns a job's rows travel in between stages: its manifest's, `extra`, the input item and the payload.

    The item's URIs are bytes: a file name need not be UTF-8 (`os.fsdecode` keeps such bytes as
    surrogates, which an Arrow string cannot hold)."""
    item = pa.struct([(f.name, pa.binary()) for f in dataclasses.fields(InputItem)])
    return pa.schema([*manifest, *extra, ("item", item), ("payload", pa.binary())])


def rows(batch: pa.Table) -> list[tuple[dict, bytes]]:
    """A stage table -> (record, payload) per row; every column of the schema is a key (None where unset)."""
    rows = batch.to_pylist()
    for row in rows:
        row["item"] = {k: v.decode("utf-8", "surrogateescape") for k, v in row["item"].items()}
    return [(row, row.pop("payload", None) or b"") for row in rows]


def to_table(rows: list[tuple[dict, bytes]], schema: pa.Schema) -> pa.Table:
    """(record, payload) rows -> a stage table; a record key the schema lacks is a bug, not data to drop."""
    for record, _ in rows:
        unknown = set(record) - set(schema.names)
        if unknown:
            raise KeyError(f"record fields without a column: {sorted(unknown)}")
        if record["status"] != "pending" and record.get("finished_at") is None:
            record["finished_at"] = datetime.now(timezone.utc)  # the row's own finishing time, not its arrival
    return pa.Table.from_pylist([{**record, "payload": payload, "item": _item_bytes(record["item"])}
                                 for record, payload in rows], schema=schema)


def has_pending(batch: pa.Table) -> bool:
    return "pending" in batch.column("status").to_pylist()


def _item_bytes(item: dict) -> dict:
    return {k: v.encode("utf-8", "surrogateescape") for k, v in InputItem(**item).to_dict().items()}


def stage_dataset(records: list[dict], schema: pa.Schema):
    """A Ray Dataset of pending records, in small blocks so that the stages overlap early."""
    import ray

    blocks = max(1, min(len(records), 256))
    return ray.data.from_arrow([to_table([(r, b"") for r in records[i::blocks]], schema) for i in range(blocks)])


def stage_results(dataset):
    """The records a stage dataset yields, as they come (a last stage leaves every payload empty).

    No `drop_columns` here: it would be one more operator asking for a whole CPU, which the
    stages' actors can hold until the end (a node of 2 CPUs then streams no row until the actors
    are gone, and never, if one is stuck restarting)."""
    for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from (record for record, _ in rows(table))


def failed(record: dict, error_class: str, message: str) -> dict:
    """Mark a record failed. It names no outputs: none of this run's are complete, and
    files there may be stale ones of an earlier run."""
    record.update(status="failed", error_class=error_class, error_message=redact(message)[:2000], mesh_uri=None)
    if "preview_uri" in record:
        record["preview_uri"] = None
    return record


def fail(record: dict, exc: BaseException) -> tuple[dict, bytes]:
    return failed(record, type(exc).__name__, str(exc)), b""


def where() -> tuple[str, str]:
    """(node, worker) running this code: Ray ids inside Ray, host and pid outside."""
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            return context.get_node_id(), context.get_worker_id()
    except ImportError:
        pass
    return socket.gethostname(), str(os.getpid())



MAX_IMAGE_BYTES = 1 << 30  # an image or mask file; its pixels are limited by max_pixels too
MAX_TEXT_SIDECAR_BYTES = 1 << 20  # a rect or keypoints file


def read_limited(uri: str, limit: int) -> bytes:
    """The whole file; InputError above `limit` bytes (checked before reading)."""
    fs, path = filesystem(uri)
    size = fs.size(path)
    if size is not None and size > limit:
        raise InputError(f"{redact(uri)}: {size} bytes exceeds the limit of {limit}")
    return fs.cat_file(path)


MARKER_TYPES = {"content_hash": str, "settings_key": str, "vertices": int, "faces": int}


def finished_marker(marker_uri: str, required: dict = MARKER_TYPES) -> dict | None:
    """The marker of an earlier run, or None when absent or not one this code wrote (the input is
    redone). required: {field: type} the marker must have (the jobs' identities differ)."""
    fs, path = filesystem(marker_uri)
    try:
        marker = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(marker, dict) or not all(isinstance(marker.get(k), t) for k, t in required.items()):
        return None
    for key in ("bbox_min", "bbox_max"):
        box = marker.get(key)
        if not (isinstance(box, list) and len(box) == 3 and all(isinstance(v, (int, float)) for v in box)):
            return None
    return marker



WRITE_CHECK_BYTES = 256 << 10  # about a preview's size: a full disk or a store over quota fails it


def check_writable(output: str) -> None:
    """InputError unless a real file can be written, read back and removed under `output` (before any compute)."""
    probe = join(output, f".write-check-{uuid.uuid4().hex[:8]}")
    data = os.urandom(WRITE_CHECK_BYTES)
    fs, path = filesystem(probe)
    try:
        write_bytes_atomic(probe, data)
        try:
            if fs.cat_file(path) != data:
                raise OSError("the file read back differs from the file written")
        finally:
            fs.rm_file(path)
    except (OSError, ValueError) as exc:  # permissions, a file in the way, a full disk, a missing bucket, ...
        raise InputError(f"{redact(output)}: the output folder is not writable ({redact(str(exc))})") from exc



@dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    # ok rows made the second-best way: no body could be fitted, so the fallback model made the mesh
    degraded: int = 0
    seconds: float = 0.0
    manifest_files: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, reason), first few

    @property
    def total(self) -> int:
        return self.ok + self.failed + self.skipped

    def line(self) -> str:
        rate = self.total / self.seconds if self.seconds else 0.0
        degraded = f" ({self.degraded} without a fitted body: see body_error)" if self.degraded else ""
        return (f"{self.total} inputs: {self.ok} ok{degraded}, {self.failed} failed, {self.skipped} skipped "
                f"in {self.seconds:.1f} s ({rate:.2f} images/s)")

    def print_report(self, fail_on_error: bool) -> int:
        """The summary, the first failures and the manifest on stdout; the command's exit code."""
        print(self.line())
        for uri, reason in self.failures:
            print(f"  failed: {uri}: {reason}")
        if self.manifest_files:
            print(f"manifest: {self.manifest_files[0].rsplit('/', 1)[0]}/ ({len(self.manifest_files)} parts)")
        return exit_codes.INPUTS_FAILED if fail_on_error and self.failed else exit_codes.OK


def drain_results(results, manifest: ManifestWriter, summary: Summary, total: int, desc: str, progress: bool,
                  observe=None) -> None:
    """Append every row `results` yields to `manifest` and count it in `summary`, behind a progress bar.

    Whatever stops the loop (a store that keeps refusing the manifest, a signal, a bug), the
    pipeline is closed, so it takes no more inputs, and every row received is written or spooled
    (`ManifestWriter.close`). observe(row, first_of_input): called for each row (metrics)."""
    from tqdm import tqdm

    try:
        with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for record in results:
                row = manifest.add(record)
                # With all_people, the other people are extra rows of one input (None: a row from before the people were found).
                first_of_input = record.get("first_of_input") is not False
                if observe is not None:
                    observe(row, first_of_input)
                setattr(summary, row["status"], getattr(summary, row["status"]) + 1)
                summary.degraded += row["status"] == "ok" and bool(row.get("body_error"))
                if row["status"] == "failed" and len(summary.failures) < 20:
                    summary.failures.append((row["input_uri"], f"{row['error_class']}: {row['error_message']}"))
                bar.update(int(first_of_input))
                bar.set_postfix(ok=summary.ok, failed=summary.failed, skipped=summary.skipped)
    finally:
        results.close()  # a Ray pipeline stops here (its stage actors end with it)
        try:
            manifest.close()
        finally:
            summary.manifest_files = manifest.files
