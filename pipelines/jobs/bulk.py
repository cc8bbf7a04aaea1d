"""Bulk reconstruction on Ray Data: image collections -> meshes, previews and a Parquet manifest.

    list inputs (driver)
      -> read + hash + find the person + preprocess   CPU actors   (`InputPreparer`: one person finder each)
      -> encode + occupancy queries         model actors     (`SurfaceSampler`, GPU when the cluster has one)
      -> marching cubes, colour, export     CPU actors       (`MeshFinisher`; a GPU never waits for meshing)
      -> manifest rows streamed back to the driver, which appends them to Parquet and counts metrics

Stages pass Arrow tables of `STAGE_SCHEMA`: a row's record in typed columns (the manifest's, then
where its other outputs go and what the driver checks) and a binary `payload` (the arrays the next
stage needs, pickled). With `PersonOptions.all_people` the prepare stage turns one input into one row per
person found (outputs `NAME_p<k>.*`, k = 0 the most prominent). Any failure inside a stage
becomes status "failed" with the error class and message on that row; later stages pass failed
and skipped rows through untouched, so one bad image never stops the job. An input that kills
its worker process (a native crash, the OOM killer, a lost node) drops its Ray Data block
instead of being retried forever: the driver reconciles listed inputs (and, with `all_people`,
each input's people) with received rows and runs each missing input alone, in a fresh task, up
to `crash_attempts` times (`_retry_alone`); after that it is a failed row named after the Ray
error (`WorkerCrashedError`, `OutOfMemoryError`, ...). A pipeline in which nothing moves for
`stall_timeout_s` (a read that never returns, a worker stuck restarting) is stopped and its missing
inputs run alone the same way; one that runs alone for longer fails as `Stalled`. A `.json` marker is written beside each
finished mesh; a re-run skips inputs whose marker has the same content hash and checkpoint id
(resume after a killed driver or worker).

Manifest (Parquet, `OUT/manifest/run-<run_id>-<part>.parquet`, append-only, one row per input
per run, or per person with `all_people`): see `pipelines.common.formats.MANIFEST_SCHEMA`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from model.body.fit import FitConfig
from model.errors import InputError, SurfaceError
from model.person import PersonInput, PersonOptions
from model.reconstruction.reconstruct import MESH_FORMATS, ReconstructionConfig
from pipelines.common.formats import MANIFEST_SCHEMA, ManifestWriter, recover_spool
from pipelines.common.inputs import InputItem, list_inputs
from pipelines.common.stage_actors import end_stage_actors, register_this_actor, start_registry
from pipelines.common.telemetry import BulkMetrics, check_port, check_pushgateway
from pipelines.common.storage import filesystem, join, remove_quietly, remove_stale_temporaries, safe_stem, write_bytes_atomic
from pipelines.common.uris import check_uri, redact

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class NetworkInputs:
    """What the job's checkpoint needs from the prepare stage (read once, by the driver): the image
    sizes it takes, and whether it reads a body fitted to each photo."""

    sizes: tuple[int, ...]
    body_guided: bool


@dataclass(frozen=True)
class BulkConfig:
    """One bulk reconstruction job."""

    inputs: tuple[str, ...]
    output: str
    checkpoint: str
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    person: PersonOptions = field(default_factory=PersonOptions)
    mesh_format: str = "obj"
    # Fit the anny body to each person (model.body) and write it as BASE_body.FORMAT beside the
    # mesh; a body-guided checkpoint reads it, so for one this is always on. Where no body can be
    # fitted, the mesh is still made (`body_error` says why) unless the network needs the body.
    body: bool = False
    fit: FitConfig = field(default_factory=FitConfig)  # the body fitter's settings
    # A body-guided checkpoint cannot mesh a photo without a fitted body (no landmarks: a cropped
    # torso, a drawing): such inputs go to this checkpoint (one without body inputs) instead of failing.
    fallback_checkpoint: str | None = None
    overwrite: bool = False
    batch_size: int = 1  # images per model call (normal nets and filters run batched)
    model_actors: int = 1  # size of the model actor pool
    finish_actors: int = 1  # size of the CPU meshing actor pool (marching cubes, colours, writing)
    prepare_actors: int = 1  # size of the CPU prepare actor pool (each holds a person finder)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    max_pixels: int = 100_000_000  # decompression-bomb guard
    # A manifest part is written every `manifest_flush_rows` rows or `manifest_flush_seconds`,
    # whichever comes first: few parts for a big job, little lost if the driver dies.
    manifest_flush_rows: int = 10_000
    manifest_flush_seconds: float = 60.0
    # A manifest part the store refuses is tried again after each of these waits; then the job stops
    # taking inputs and keeps its rows (`ManifestWriter`).
    manifest_retry_delays_s: tuple[float, ...] = (1.0, 4.0, 16.0)
    metrics_port: int | None = None
    pushgateway: str | None = None
    crash_attempts: int = 2  # runs alone an input gets after its worker died with it in flight
    # The pipeline is stopped when no row has moved through any stage for this long (a worker stuck
    # restarting, a node that never comes back); what did not come back is then run alone.
    stall_timeout_s: float = 900.0
    # Ray memory reservations in MiB (scheduling: Ray never packs more onto a node than it has).
    # prepare: a photo at max_pixels decodes to 4 bytes a pixel, plus float32 crops.
    prepare_memory_mb: int = 1536
    model_memory_mb: int = 2048
    finish_memory_mb: int = 1024

    def __post_init__(self) -> None:
        if self.mesh_format not in MESH_FORMATS:
            raise ValueError(f"mesh format must be one of {MESH_FORMATS}, not {self.mesh_format!r}")
        if min(self.prepare_actors, self.model_actors, self.finish_actors) < 1:
            raise ValueError(f"actor pools need at least one actor, got prepare {self.prepare_actors}, "
                             f"model {self.model_actors}, finish {self.finish_actors}")
        check_uri(self.output)
        check_uri(self.checkpoint)
        if self.fallback_checkpoint is not None:
            check_uri(self.fallback_checkpoint)
        if self.manifest_flush_rows < 1 or not self.manifest_flush_seconds > 0:
            raise ValueError("manifest_flush_rows must be at least 1 and manifest_flush_seconds positive")
        if self.crash_attempts < 1:
            raise ValueError(f"crash_attempts must be at least 1, not {self.crash_attempts}")
        if not self.stall_timeout_s > 0:
            raise ValueError(f"stall_timeout_s must be positive, not {self.stall_timeout_s}")
        if self.metrics_port is not None:
            check_port(self.metrics_port)
        if self.pushgateway is not None:
            check_pushgateway(self.pushgateway)
        for name in ("prepare_memory_mb", "model_memory_mb", "finish_memory_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")


@dataclass
class Summary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    manifest_files: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, reason), first few

    @property
    def total(self) -> int:
        return self.ok + self.failed + self.skipped

    def line(self) -> str:
        rate = self.total / self.seconds if self.seconds else 0.0
        return (f"{self.total} inputs: {self.ok} ok, {self.failed} failed, {self.skipped} skipped "
                f"in {self.seconds:.1f} s ({rate:.2f} images/s)")

    def print_report(self, fail_on_error: bool) -> int:
        """The summary, the first failures and the manifest on stdout; the command's exit code."""
        print(self.line())
        for uri, reason in self.failures:
            print(f"  failed: {uri}: {reason}")
        if self.manifest_files:
            print(f"manifest: {self.manifest_files[0].rsplit('/', 1)[0]}/ ({len(self.manifest_files)} parts)")
        from pipelines.common import exit_codes

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


# ---- rows --------------------------------------------------------------------------------


def stage_schema(manifest: pa.Schema, *extra: tuple[str, pa.DataType]) -> pa.Schema:
    """The columns a job's rows travel in between stages: its manifest's, `extra`, the input item and the payload.

    The item's URIs are bytes: a file name need not be UTF-8 (`os.fsdecode` keeps such bytes as
    surrogates, which an Arrow string cannot hold)."""
    item = pa.struct([(f.name, pa.binary()) for f in dataclasses.fields(InputItem)])
    return pa.schema([*manifest, *extra, ("item", item), ("payload", pa.binary())])


STAGE_SCHEMA = stage_schema(
    MANIFEST_SCHEMA,
    *[(name, pa.string()) for name in ("output_stem", "person_mask_uri", "person_json_uri", "body_mesh_uri",
                                       "body_params_uri", "marker_uri")],
    ("person_indices", pa.list_(pa.int64())),  # the people the prepare stage produced (the driver checks each came back)
    ("first_of_input", pa.bool_()),
)


def _rows(batch: pa.Table) -> list[tuple[dict, bytes]]:
    """A stage table -> (record, payload) per row; every column of the schema is a key (None where unset)."""
    rows = batch.to_pylist()
    for row in rows:
        row["item"] = {k: v.decode("utf-8", "surrogateescape") for k, v in row["item"].items()}
    return [(row, row.pop("payload", None) or b"") for row in rows]


def _batch(rows: list[tuple[dict, bytes]], schema: pa.Schema = STAGE_SCHEMA) -> pa.Table:
    """(record, payload) rows -> a stage table; a record key the schema lacks is a bug, not data to drop."""
    for record, _ in rows:
        unknown = set(record) - set(schema.names)
        if unknown:
            raise KeyError(f"record fields without a column: {sorted(unknown)}")
        if record["status"] != "pending" and record.get("finished_at") is None:
            record["finished_at"] = datetime.now(timezone.utc)  # the row's own finishing time, not its arrival
    return pa.Table.from_pylist([{**record, "payload": payload, "item": _item_bytes(record["item"])}
                                 for record, payload in rows], schema=schema)


def _has_pending(batch: pa.Table) -> bool:
    return "pending" in batch.column("status").to_pylist()


def _item_bytes(item: dict) -> dict:
    return {k: v.encode("utf-8", "surrogateescape") for k, v in InputItem(**item).to_dict().items()}


def _stage_dataset(records: list[dict], schema: pa.Schema):
    """A Ray Dataset of pending records, in small blocks so that the stages overlap early."""
    import ray

    blocks = max(1, min(len(records), 256))
    return ray.data.from_arrow([_batch([(r, b"") for r in records[i::blocks]], schema) for i in range(blocks)])


def _stage_results(dataset):
    """The records a stage dataset yields, as they come (a last stage leaves every payload empty).

    No `drop_columns` here: it would be one more operator asking for a whole CPU, which the
    stages' actors can hold until the end (a node of 2 CPUs then streams no row until the actors
    are gone, and never, if one is stuck restarting)."""
    for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from (record for record, _ in _rows(table))


def _failed(record: dict, error_class: str, message: str) -> dict:
    """Mark a record failed. It names no outputs: none of this run's are complete, and
    files there may be stale ones of an earlier run."""
    record.update(status="failed", error_class=error_class, error_message=redact(message)[:2000], mesh_uri=None)
    if "preview_uri" in record:
        record["preview_uri"] = None
    return record


def _fail(record: dict, exc: BaseException) -> tuple[dict, bytes]:
    return _failed(record, type(exc).__name__, str(exc)), b""


def _where() -> tuple[str, str]:
    """(node, worker) running this code: Ray ids inside Ray, host and pid outside."""
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            return context.get_node_id(), context.get_worker_id()
    except ImportError:
        pass
    return socket.gethostname(), str(os.getpid())


def output_uris(base: str, mesh_format: str) -> dict[str, str]:
    """Every output of one reconstruction, beside each other: BASE.FORMAT, BASE_preview.png, the
    finder's BASE_person.png (mask) and BASE_person.json, with a body fit BASE_body.FORMAT and its
    anny parameters BASE_body.json, and the BASE.json marker (written last)."""
    return {
        "mesh_uri": f"{base}.{mesh_format}",
        "preview_uri": f"{base}_preview.png",
        "person_mask_uri": f"{base}_person.png",
        "person_json_uri": f"{base}_person.json",
        "body_mesh_uri": f"{base}_body.{mesh_format}",
        "body_params_uri": f"{base}_body.json",
        "marker_uri": f"{base}.json",
    }


def initial_rows(items: list[InputItem], config: BulkConfig, run_id: str, checkpoint_id: str) -> list[dict]:
    """One pending record per input, with its output locations fixed up front (with
    `all_people`, each person's are fixed when the people are found)."""
    records = []
    for item in items:
        stem = join(config.output, "meshes", safe_stem(item.name, item.uri))
        records.append(
            {
                "run_id": run_id,
                "input_uri": redact(item.uri),
                "status": "pending",
                "output_stem": stem,
                **output_uris(stem, config.mesh_format),
                "checkpoint_id": checkpoint_id,
                "item": item.to_dict(),
            }
        )
    return records


# ---- stage 1: read, hash, skip check, preprocess (CPU) -----------------------------------


MAX_IMAGE_BYTES = 1 << 30  # an image or mask file; its pixels are limited by max_pixels too
MAX_TEXT_SIDECAR_BYTES = 1 << 20  # a rect or keypoints file


def _read(uri: str, limit: int) -> bytes:
    """The whole file; InputError above `limit` bytes (checked before reading)."""
    fs, path = filesystem(uri)
    size = fs.size(path)
    if size is not None and size > limit:
        raise InputError(f"{redact(uri)}: {size} bytes exceeds the limit of {limit}")
    return fs.cat_file(path)


_MARKER_TYPES = {"content_hash": str, "checkpoint_id": str, "vertices": int, "faces": int}


def _finished_marker(marker_uri: str, required: dict = _MARKER_TYPES) -> dict | None:
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


MARKER_FIELDS = ("run_id", "input_uri", "content_hash", "checkpoint_id", "mesh_uri", "preview_uri", "vertices", "faces",
                 "bbox_min", "bbox_max", "person_index", "persons_found", "person_score", "person_mask_area")


def _finished(record: dict) -> bool:
    """Whether this record's outputs exist for the same content and checkpoint (then it is
    marked skipped, with its numbers from the marker; or ok, when this very run wrote them and
    only the row was lost, with the node that held it)."""
    marker = _finished_marker(record["marker_uri"])
    if not (marker and marker.get("content_hash") == record["content_hash"] and marker.get("checkpoint_id") == record["checkpoint_id"]):
        return False
    status = "ok" if marker.get("run_id") == record["run_id"] else "skipped"
    record.update(status=status, **{k: marker.get(k) for k in MARKER_FIELDS if k not in record or record[k] is None})
    return True


def _person_files(record: dict, person_input: PersonInput) -> dict[str, bytes]:
    """The finder's mask (8-bit PNG, the image's size) and JSON record for one output; {} when it did not run."""
    from model.data.render import png_bytes

    person = person_input.person
    if person is None:
        return {}
    height, width = person.mask_soft.shape
    document = {"input_uri": record["input_uri"], "image_size": {"width": width, "height": height},
                "person_index": person_input.index, "persons_found": person_input.persons_found, **person.to_dict()}
    return {
        record["person_mask_uri"]: png_bytes((person.mask_soft * 255 + 0.5).astype(np.uint8)),
        record["person_json_uri"]: json.dumps(document).encode(),
    }


class InputPreparer:
    """CPU stage: read, hash, skip check, find the person, preprocess.

    A callable class, so Ray Data builds it once per actor: the person finder (mode "auto")
    loads once per actor, not per image.
    """

    def __init__(self, sizes: tuple[int, ...], overwrite: bool, max_pixels: int, person: PersonOptions, mesh_format: str,
                 body: bool = False, fit: FitConfig = FitConfig(), body_optional: bool = False, registry=None):
        from model.person import PersonFinder

        register_this_actor(registry)
        self.sizes, self.overwrite, self.max_pixels = sizes, overwrite, max_pixels
        self.person, self.mesh_format, self.body, self.fit = person, mesh_format, body, fit
        self.body_optional = body_optional  # a failed fit is noted in the row, not a failed row
        self.finder = PersonFinder() if person.mode == "auto" else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for record, _ in _rows(batch):
            out.extend(self.prepare(record))
        return _batch(out)

    def prepare(self, record: dict) -> list[tuple[dict, bytes]]:
        """One input's record -> its rows (one, or one per person with `all_people`)."""
        from model.person import prepare_people
        from model.reconstruction.preprocess import DecodedImage, _as_float, _decode, _open_image

        item = InputItem(**record["item"])
        try:
            start = time.perf_counter()
            image = _read(item.uri, MAX_IMAGE_BYTES)
            limits = {"mask": MAX_IMAGE_BYTES, "rect": MAX_TEXT_SIDECAR_BYTES, "keypoints": MAX_TEXT_SIDECAR_BYTES}
            sidecars = {k: _read(getattr(item, f"{k}_uri"), limit) if getattr(item, f"{k}_uri") else None
                        for k, limit in limits.items()}
            digest = hashlib.sha256(image)
            for key in ("mask", "rect", "keypoints"):
                digest.update(key.encode() + (sidecars[key] or b""))
            record["content_hash"] = digest.hexdigest()
            record["seconds_read"] = time.perf_counter() - start
            # One output per input: its marker is known before any work. With all_people the
            # outputs are known once the people are found, and each is checked then.
            if not self.person.all_people and not self.overwrite and _finished(record):
                return [(record, b"")]
            start = time.perf_counter()
            name = redact(item.uri)
            # 8-bit photos stay uint8 (a big photo is never held as float32 in full); other depths
            # become float32 in [0, 1], which the person finder reads as it reads 8 bits.
            decoded = _decode(_open_image(image, name, self.max_pixels))
            if decoded.rgb.dtype != np.uint8:
                decoded = DecodedImage(_as_float(decoded.rgb), None if decoded.alpha is None else _as_float(decoded.alpha))
            inputs = prepare_people(decoded, self.finder, self.person, name=name, sizes=self.sizes,
                                    max_pixels=self.max_pixels, **sidecars)
            seconds = (time.perf_counter() - start) / len(inputs)
            rows = []
            indices = [person_input.index for person_input in inputs]  # the driver checks each came back
            for person_input in inputs:
                row = dict(record, person_indices=indices, first_of_input=person_input.index == indices[0])
                if self.person.all_people:
                    row.update(output_uris(f"{record['output_stem']}_p{person_input.index}", self.mesh_format))
                person = person_input.person
                row.update(person_index=person_input.index, persons_found=person_input.persons_found,
                           person_score=None if person is None else person.score,
                           person_mask_area=None if person is None else person.mask_area, seconds_prepare=seconds)
                if self.person.all_people and not self.overwrite and _finished(row):
                    rows.append((row, b""))
                    continue
                files = _person_files(row, person_input)
                prepared = person_input.prepared
                if self.body:
                    try:
                        prepared = self._fit_body(row, prepared, person_input, image, sidecars, files)
                    except InputError as exc:
                        if not self.body_optional:
                            raise
                        row["body_error"] = f"{type(exc).__name__}: {redact(str(exc))}"
                # The original photo is not needed downstream (colours come from the crop): don't ship it.
                prepared = dataclasses.replace(prepared, rgb=np.zeros((0, 0, 3), np.float32))
                rows.append((row, pickle.dumps((prepared, files), protocol=5)))
            return rows
        except Exception as exc:  # noqa: BLE001 - any failure becomes this input's failed row
            return [_fail(record, exc)]


    def _fit_body(self, row: dict, prepared, person_input: PersonInput, image: bytes, sidecars: dict, files: dict):
        """Fit anny to the person (the finder's landmarks, else a keypoints sidecar or a finder run
        as `pifuhd fit` does); its mesh joins the files to write, and the prepared input carries it
        in the network frame for a body-guided model."""
        from model.body.export import body_json, mesh_bytes
        from model.body.guidance import with_fitted_body
        from pipelines.jobs.fit import find_person

        start = time.perf_counter()
        name = redact(row["input_uri"])
        found = person_input.person
        if found is None:  # a mask or box sidecar, or --person off: the landmarks as `pifuhd fit` finds them
            found, _ = find_person(image, sidecars, name, self.max_pixels)
        prepared, fit = with_fitted_body(prepared, found.landmarks, found.world_landmarks, found.mask, self.fit, name)
        files[row["body_mesh_uri"]] = mesh_bytes(fit.vertices, fit.faces, self.mesh_format)
        files[row["body_params_uri"]] = body_json(fit, {"input_uri": row["input_uri"], "content_hash": row["content_hash"]}).encode()
        row.update(body_uri=row["body_mesh_uri"], body_mask_iou=fit.mask_iou,
                   seconds_prepare=row["seconds_prepare"] + time.perf_counter() - start)
        return prepared


# ---- stage 2: model (GPU when available) ---------------------------------------------------


class SurfaceSampler:
    """Model actor: one network per actor (and its fallback, loaded when first needed); encodes a
    batch of images and queries their surfaces."""

    def __init__(self, checkpoint: str, reconstruction: ReconstructionConfig, use_gpu: bool,
                 fallback_checkpoint: str | None = None, batch_size: int = 1, registry=None):
        import torch

        register_this_actor(registry)
        self.batch_size = batch_size  # images per network call
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.net = self._load(checkpoint)
        self.fallback_checkpoint, self.fallback = fallback_checkpoint, None
        self.config = reconstruction

    def _load(self, checkpoint: str):
        from pipelines.common.checkpoints import fetch_checkpoint
        from model.network.checkpoint import load_checkpoint

        return load_checkpoint(fetch_checkpoint(checkpoint)).to(self.device)

    def _network_for(self, prepared):
        """The job's network, or the fallback for a photo a body-guided network cannot read."""
        if not self.net.config.body_guided or prepared.body is not None or self.fallback_checkpoint is None:
            return self.net
        if self.fallback is None:
            self.fallback = self._load(self.fallback_checkpoint)
        return self.fallback

    def __call__(self, batch: pa.Table) -> pa.Table:
        from model.reconstruction.reconstruct import sample_surfaces

        if not _has_pending(batch):  # failed and skipped rows pass through as they are
            return batch
        rows = _rows(batch)
        pending = [i for i, (record, _) in enumerate(rows) if record["status"] == "pending"]
        if pending:
            node, worker = _where()
            unpacked = {i: pickle.loads(rows[i][1]) for i in pending}  # (prepared, person files)
            groups: dict[int, tuple] = {}
            for i in pending:
                net = self._network_for(unpacked[i][0])
                groups.setdefault(id(net), (net, []))[1].append(i)
            samples = {}
            for net, members in groups.values():
                for first in range(0, len(members), self.batch_size):
                    chunk = members[first:first + self.batch_size]
                    try:
                        samples.update(zip(chunk, sample_surfaces(net, [unpacked[i][0] for i in chunk], self.config)))
                    except Exception as exc:  # noqa: BLE001
                        samples.update((i, exc) for i in chunk)
            for i in pending:
                (p, files), sample, record = unpacked[i], samples[i], rows[i][0]
                record.update(node=node, worker=worker)
                if isinstance(sample, Exception):
                    rows[i] = _fail(record, sample)
                    continue
                record.update(seconds_encode=sample.stats["seconds_encode"], seconds_surface=sample.stats["seconds_surface"],
                              points_evaluated=sample.stats["points_evaluated"])
                rows[i] = (record, pickle.dumps((p, files, sample), protocol=5))
        return _batch(rows)


# ---- stage 3: mesh, colour, export, write (CPU) ------------------------------------------


def finish_rows(batch: pa.Table, reconstruction: ReconstructionConfig, mesh_format: str) -> pa.Table:
    from model.reconstruction.reconstruct import encode_outputs, finish

    if not _has_pending(batch):  # failed and skipped rows pass through as they are
        return batch
    out = []
    for record, payload in _rows(batch):
        if record["status"] != "pending":
            out.append((record, b""))
            continue
        written: list[str] = []
        try:
            prepared, person_files, sample = pickle.loads(payload)
            start = time.perf_counter()
            result = finish(sample, prepared, reconstruction)
            record["seconds_mesh"] = time.perf_counter() - start
            check_surface(result.mesh.vertices, result.mesh.faces)
            start = time.perf_counter()
            files = encode_outputs(result, prepared, mesh_format)
            for uri, data in [(record["mesh_uri"], files["mesh"]), (record["preview_uri"], files["preview"]),
                              *person_files.items()]:
                written.append(uri)
                write_bytes_atomic(uri, data)
            bounds = result.mesh.bounds
            record.update(
                status="ok",
                vertices=len(result.mesh.vertices),
                faces=len(result.mesh.faces),
                bbox_min=[float(v) for v in bounds[0]],
                bbox_max=[float(v) for v in bounds[1]],
            )
            marker = {k: record.get(k) for k in MARKER_FIELDS}
            # The marker goes last: its presence means every output of this input is complete.
            write_bytes_atomic(record["marker_uri"], json.dumps(marker).encode())
            record["seconds_write"] = time.perf_counter() - start
            out.append((record, b""))
        except Exception as exc:  # noqa: BLE001
            remove_quietly(written)  # a full disk half-way: no output without its row and marker
            out.append(_fail(record, exc))
    return _batch(out)


class MeshFinisher:
    """CPU stage actor: `finish_rows` on each batch."""

    def __init__(self, reconstruction: ReconstructionConfig, mesh_format: str, registry=None):
        register_this_actor(registry)
        self.reconstruction, self.mesh_format = reconstruction, mesh_format

    def __call__(self, batch: pa.Table) -> pa.Table:
        return finish_rows(batch, self.reconstruction, self.mesh_format)


def check_surface(vertices: np.ndarray, faces: np.ndarray) -> None:
    """SurfaceError unless a mesh has faces and finite vertices (an ok row always names a usable mesh)."""
    if len(faces) == 0:
        raise SurfaceError("the network's occupancy field has no surface at the surface level inside the person's box")
    if not np.isfinite(vertices).all():
        raise SurfaceError(f"{int((~np.isfinite(vertices)).any(axis=1).sum())} mesh vertices are NaN or Inf")


# ---- driver --------------------------------------------------------------------------------


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


def _pipeline_results(records: list[dict], config: BulkConfig, network: NetworkInputs, use_gpu: bool):
    """Yield finished records as the Ray Data pipeline produces them; a block whose worker died is dropped."""
    # Each stage handles one image per call and Ray Data's streaming backpressure keeps the number
    # of images in flight bounded.
    dataset = _stage_dataset(records, STAGE_SCHEMA)
    # No retries here (Ray Data's default is forever): a dead worker drops its block and
    # `_retry_alone` finds out which of the block's inputs is to blame. Ray 2.60 takes retry counts
    # only as extra remote args, which it warns are deprecated, with no named parameter yet: that
    # one warning is silenced, nothing else.
    registry = start_registry()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            dataset = _stages(dataset, config, network, use_gpu, registry)
        dataset.context.max_errored_blocks = -1  # only dead workers raise here: every UDF catches its own errors
        dataset.context.execution_no_progress_timeout_s = config.stall_timeout_s
        yield from _stage_results(dataset)
    finally:  # finished, failed, stalled or abandoned: the stage actors free their CPUs and GPUs now
        end_stage_actors(registry)


def _stages(dataset, config: BulkConfig, network: NetworkInputs, use_gpu: bool, registry):
    """The three stages on a dataset of records: prepare (CPU actors), model (GPU or CPU actors), finish.

    The actor pools have a fixed size and their actors register with `registry`, so that the driver
    can end them with the pipeline (`pipelines.common.stage_actors`)."""
    import ray

    mib = 1 << 20
    dataset = dataset.map_batches(
        InputPreparer, batch_size=None, batch_format="pyarrow", num_cpus=0.5, memory=config.prepare_memory_mb * mib,
        compute=ray.data.ActorPoolStrategy(size=config.prepare_actors),
        max_task_retries=0,  # the actor restarts; its batch is dropped and retried alone
        fn_constructor_kwargs={**_preparer_kwargs(config, network), "registry": registry},
    )
    dataset = dataset.map_batches(
        SurfaceSampler,
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.model_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
        memory=config.model_memory_mb * mib,
        max_task_retries=0,  # the actor restarts; its batch is dropped and retried alone
        fn_constructor_kwargs={**_sampler_kwargs(config, use_gpu), "registry": registry},
    )
    # Actors, not tasks: a task per row costs ~15 ms of scheduling, which a job of many failing
    # inputs (nothing to mesh) pays thousands of times.
    dataset = dataset.map_batches(
        MeshFinisher, batch_size=None, batch_format="pyarrow", num_cpus=0.5, memory=config.finish_memory_mb * mib,
        compute=ray.data.ActorPoolStrategy(size=config.finish_actors),
        max_task_retries=0,  # the actor restarts; its batch is dropped and retried alone
        fn_constructor_kwargs={"reconstruction": config.reconstruction, "mesh_format": config.mesh_format,
                               "registry": registry},
    )
    return dataset


def _sampler_kwargs(config: BulkConfig, use_gpu: bool) -> dict:
    return {"checkpoint": config.checkpoint, "reconstruction": config.reconstruction, "use_gpu": use_gpu,
            "fallback_checkpoint": config.fallback_checkpoint, "batch_size": config.batch_size}


def _preparer_kwargs(config: BulkConfig, network: NetworkInputs) -> dict:
    # The body is fitted when asked for or when the network reads it; a photo it cannot be fitted to
    # fails only when the network needs it and there is no fallback network.
    return {"sizes": network.sizes, "overwrite": config.overwrite, "max_pixels": config.max_pixels,
            "person": config.person, "mesh_format": config.mesh_format, "body": config.body or network.body_guided,
            "fit": config.fit, "body_optional": not network.body_guided or config.fallback_checkpoint is not None}


_PREPARERS: dict[tuple, InputPreparer] = {}  # per worker process: the person finder of `prepare_rows` / `_reconstruct_alone`
_SAMPLERS: dict[tuple, SurfaceSampler] = {}  # per worker process: the network of `_reconstruct_alone`


def _preparer(kwargs: dict) -> InputPreparer:
    key = tuple(sorted(kwargs.items()))
    if key not in _PREPARERS:
        _PREPARERS[key] = InputPreparer(**kwargs)
    return _PREPARERS[key]


def prepare_rows(batch: pa.Table, sizes: tuple[int, ...], overwrite: bool, max_pixels: int,
                 person: PersonOptions | None = None, mesh_format: str = "obj") -> pa.Table:
    """The prepare stage as a plain function (one `InputPreparer` per process, reused)."""
    preparer = _preparer({"sizes": tuple(sizes), "overwrite": overwrite, "max_pixels": max_pixels,
                          "person": person or PersonOptions(), "mesh_format": mesh_format})
    return preparer(batch)


def _reconstruct_alone(record: dict, config: BulkConfig, network: NetworkInputs, use_gpu: bool) -> list[dict]:
    """All three stages for one input in this worker process (a retry after a worker died): its rows."""
    key = (config.checkpoint, config.fallback_checkpoint, config.reconstruction, use_gpu)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = SurfaceSampler(**_sampler_kwargs(config, use_gpu))
    return list(_run_stages(_preparer(_preparer_kwargs(config, network)), _SAMPLERS[key], record, config))


def _crashed_rows(record: dict, people: dict | None, error_class: str, message: str) -> list[dict]:
    """Failed rows for an input whose retries all died: one for the input, or, when some of its
    people already came back, one for each person still missing."""
    if not people:
        return [_failed(dict(record), error_class, message)]
    rows = []
    for index in people["missing"]:
        row = dict(record, **output_uris(f"{record['output_stem']}_p{index}", people["mesh_format"]),
                   person_index=index, persons_found=people["persons_found"],
                   first_of_input=index == people["indices"][0])
        rows.append(_failed(row, error_class, message))
    return rows


def _retry_alone(records: list[dict], config: BulkConfig, network: NetworkInputs, use_gpu: bool,
                 partial: dict[str, dict] | None = None):
    """Run each record as its own task, `crash_attempts` times at most and for `stall_timeout_s` at
    most; yield every row, failed or not.

    `partial` maps an input uri to what came back of its people (`all_people`): only the rows of
    the people still missing are yielded."""
    import ray

    partial = partial or {}
    log.warning("%d inputs did not come back (a worker died or the pipeline stalled); running each alone", len(records))
    task = ray.remote(_reconstruct_alone).options(
        num_cpus=1, num_gpus=1 if use_gpu else 0, memory=(config.prepare_memory_mb + config.model_memory_mb) << 20,
        max_retries=config.crash_attempts - 1, retry_exceptions=False,
    )
    # As many in flight as the cluster runs at once, so that each one's deadline counts its own run
    # (and start-up), not a wait behind a hung one.
    slots = max(1, int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1)))
    waiting, pending = list(records), {}  # pending: task -> (record, deadline)
    while waiting or pending:
        while waiting and len(pending) < slots:
            record = waiting.pop(0)
            pending[task.remote(record, config, network, use_gpu)] = (record, time.monotonic() + config.stall_timeout_s)
        first_deadline = min(deadline for _, deadline in pending.values())
        done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, first_deadline - time.monotonic()))
        if not done:  # a read that never returns, a hung worker: that input fails, the others go on
            for ref, (record, deadline) in list(pending.items()):
                if deadline <= time.monotonic():
                    ray.cancel(ref, force=True)
                    del pending[ref]
                    yield from _crashed_rows(
                        record, partial.get(record["item"]["uri"]), "Stalled",
                        f"running alone, this input did not finish within {config.stall_timeout_s:g} s "
                        "(stall_timeout_s): a read that never returns or a hung worker")
            continue
        [ready] = done
        record, _ = pending.pop(ready)
        people = partial.get(record["item"]["uri"])
        try:
            rows = ray.get(ready)
        except ray.exceptions.RayError as exc:
            cause = (str(exc).strip().splitlines() or [""])[0]
            yield from _crashed_rows(
                record, people, type(exc).__name__,
                f"the worker process died on each of {config.crash_attempts} attempts with this input alone "
                f"(a native crash, the out-of-memory killer or a lost node): {cause}")
            continue
        if not people:
            yield from rows
            continue
        wanted = [r for r in rows if r.get("person_index") in people["missing"]]
        if wanted:
            yield from wanted
        else:  # the input failed as a whole this time: its missing people fail with it
            reason = next((r for r in rows if r["status"] == "failed"), None)
            yield from _crashed_rows(record, people, reason["error_class"] if reason else "WorkerCrashedError",
                                     reason["error_message"] if reason else "the person's row did not come back")


def _results_on_ray(records: list[dict], config: BulkConfig, network: NetworkInputs):
    """Yield every finished row: the pipeline's, then the retries of the inputs (or people) that never came back."""
    import ray
    from ray.data.exceptions import ExecutionTimeoutError

    if not records:
        return
    use_gpu = config.use_gpu if config.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    received: dict[str, set] = {}  # input uri -> person indices received (None: the input's single row)
    expected: dict[str, list] = {}  # input uri -> the person indices its prepare stage produced
    found: dict[str, int | None] = {}
    try:
        for record in _pipeline_results(records, config, network, use_gpu):
            uri = record["item"]["uri"]
            received.setdefault(uri, set()).add(record.get("person_index"))
            if record.get("person_indices") is not None:
                expected[uri] = record["person_indices"]
                found[uri] = record.get("persons_found")
            yield record
    except (ray.exceptions.RayError, ExecutionTimeoutError) as exc:  # the pipeline failed or stalled: what is missing is retried
        log.warning("the Ray Data pipeline stopped (%s); retrying the inputs not yet back", redact(str(exc))[:500])
    missing, partial = [], {}
    for record in records:
        uri = record["item"]["uri"]
        if uri not in received:
            missing.append(record)
            continue
        lost = [k for k in expected.get(uri, []) if k not in received[uri]]
        if lost:
            missing.append(record)
            partial[uri] = {"missing": lost, "indices": expected[uri], "persons_found": found.get(uri),
                            "mesh_format": config.mesh_format}
    if missing:
        yield from _retry_alone(missing, config, network, use_gpu, partial)


def _run_stages(preparer: InputPreparer, sampler: SurfaceSampler, record: dict, config: BulkConfig):
    """The three stages for one input in this process: yield its rows (one, or one per person)."""
    for row in preparer.prepare(record):
        batch = finish_rows(sampler(_batch([row])), config.reconstruction, config.mesh_format)
        yield _rows(batch)[0][0]


def _results_in_process(records: list[dict], config: BulkConfig, network: NetworkInputs):
    """The same stages, one image at a time, in this process (no Ray)."""
    preparer = InputPreparer(**_preparer_kwargs(config, network))
    sampler = SurfaceSampler(**_sampler_kwargs(config, bool(config.use_gpu)))
    for record in records:
        yield from _run_stages(preparer, sampler, record, config)


def run_bulk(config: BulkConfig, in_process: bool = False, progress: bool = True) -> Summary:
    """Run one bulk job to completion; Ray must already be initialised unless `in_process`."""
    from model.network.checkpoint import check_finite_weights, read_checkpoint
    from model.errors import CheckpointError
    from pipelines.common.checkpoints import checkpoint_identity, fetch_checkpoint

    start = time.perf_counter()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    local_checkpoint = fetch_checkpoint(config.checkpoint)
    _, net_config, metadata = read_checkpoint(local_checkpoint, tensors=False)  # fail fast on a bad header
    check_finite_weights(local_checkpoint)  # and on damaged weights, before any worker loads them
    checkpoint_id, checkpoint_version = checkpoint_identity(local_checkpoint, metadata)
    network = NetworkInputs((net_config.coarse_size, net_config.fine_size), net_config.body_guided)
    if config.fallback_checkpoint is not None:
        _, fallback, _ = read_checkpoint(fetch_checkpoint(config.fallback_checkpoint), tensors=False)
        if fallback.body_guided or (fallback.coarse_size, fallback.fine_size) != network.sizes:
            raise CheckpointError(f"fallback checkpoint {redact(config.fallback_checkpoint)}: it must take no body input and "
                                  f"the same input sizes {network.sizes} as the job's checkpoint")

    items = list_inputs(list(config.inputs), exclude=config.output)  # before anything is written
    check_writable(config.output)
    recover_spool(config.output)
    if removed := remove_stale_temporaries(config.output):
        log.warning("removed %d temporary files an interrupted job left in %s", removed, redact(config.output))
    records = initial_rows(items, config, run_id, checkpoint_id)
    metrics = BulkMetrics(pipeline="reconstruct")
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port)
    metrics.in_flight.labels(metrics.pipeline).set(len(records))
    manifest = ManifestWriter(config.output, run_id, config.manifest_flush_rows, {"checkpoint_version": checkpoint_version},
                              flush_seconds=config.manifest_flush_seconds, retry_delays_s=config.manifest_retry_delays_s)
    summary = Summary()

    def observe(row: dict, first_of_input: bool) -> None:
        metrics.observe(row)
        if first_of_input:
            metrics.in_flight.labels(metrics.pipeline).dec()

    results = (_results_in_process if in_process else _results_on_ray)(records, config, network)
    drain_results(results, manifest, summary, len(records), "reconstruct", progress, observe)
    summary.seconds = time.perf_counter() - start
    metrics.throughput.labels(metrics.pipeline).set(summary.total / summary.seconds if summary.seconds else 0)
    if config.pushgateway:
        metrics.push(config.pushgateway)
    return summary
