"""Bulk reconstruction on Ray Data: image collections -> meshes, previews and a Parquet manifest.

    list inputs (driver)
      -> the three stages of `pipelines.jobs.bulk_stages` (prepare, model, finish), actor pools
      -> manifest rows streamed back to the driver, which appends them to Parquet and counts metrics

Any failure inside a stage is a failed row, so one bad image never stops the job. An input that
kills its worker process (a native crash, the OOM killer, a lost node) drops its Ray Data block
instead of being retried forever: the driver reconciles listed inputs (and, with `all_people`,
each input's people) with received rows and runs each missing input alone, in a fresh task, up
to `crash_attempts` times (`_retry_alone`); after that it is a failed row named after the Ray
error (`WorkerCrashedError`, `OutOfMemoryError`, ...). A pipeline in which nothing moves for
`stall_timeout_s` (a read that never returns, a worker stuck restarting) is stopped and its
missing inputs run alone the same way; one that runs alone for longer fails as `Stalled`. The
stage actors end with the pipeline (`pipelines.common.stage_actors`), so the retries never wait
for the CPUs or GPU they held.

Manifest (Parquet, `OUT/manifest/run-<run_id>-<part>.parquet`, append-only, one row per input
per run, or per person with `all_people`): see `pipelines.common.formats.MANIFEST_SCHEMA`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone


from pipelines.common import stage_rows
from pipelines.common.formats import ManifestWriter, recover_spool
from pipelines.common.inputs import InputItem, list_inputs
from pipelines.common.stage_actors import end_stage_actors, start_registry
from pipelines.jobs.bulk_stages import (
    STAGE_SCHEMA, InputPreparer, MeshFinisher, SurfaceSampler, finish_rows, output_uris,
)
from pipelines.common.telemetry import BulkMetrics
from pipelines.common.storage import join, remove_stale_temporaries, safe_stem
from pipelines.common.uris import redact
from pipelines.jobs.bulk_config import BulkConfig

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class NetworkInputs:
    """What the driver read from the job's checkpoints once: the image sizes the network takes,
    whether it reads a body fitted to each photo, and the fallback's id (the rows it makes carry it)."""

    sizes: tuple[int, ...]
    body_guided: bool
    fallback_id: str | None = None


def settings_key(config: BulkConfig, checkpoint_id: str, network: NetworkInputs) -> str:
    """16 hex digits over every setting that shapes a job's outputs: the part of the skip key that
    is not the input's content (a rerun with another resolution or format redoes its inputs)."""
    shaping = {"checkpoint": checkpoint_id, "fallback": network.fallback_id, "reconstruction": dataclasses.asdict(config.reconstruction),
               "format": config.mesh_format, "person": dataclasses.asdict(config.person), "body": config.body,
               "fit": dataclasses.asdict(config.fit) if config.body or network.body_guided else None}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


def initial_rows(items: list[InputItem], config: BulkConfig, run_id: str, checkpoint_id: str, settings: str = "") -> list[dict]:
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
                "settings_key": settings,
                "item": item.to_dict(),
            }
        )
    return records


# ---- driver --------------------------------------------------------------------------------


def _pipeline_results(records: list[dict], config: BulkConfig, network: NetworkInputs, use_gpu: bool):
    """Yield finished records as the Ray Data pipeline produces them; a block whose worker died is dropped."""
    # Each stage handles one image per call and Ray Data's streaming backpressure keeps the number
    # of images in flight bounded.
    dataset = stage_rows.stage_dataset(records, STAGE_SCHEMA)
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
        yield from stage_rows.stage_results(dataset)
    finally:  # finished, failed, stalled or abandoned: the stage actors free their CPUs and GPUs now
        end_stage_actors(registry)


def _stages(dataset, config: BulkConfig, network: NetworkInputs, use_gpu: bool, registry):
    """The three stages on a dataset of records: prepare (CPU actors), model (GPU or CPU actors), finish.

    Each pool starts one actor and grows to its size while the cluster has room (pools of a fixed
    size larger than a small cluster would wait forever); their actors register with `registry`, so
    that the driver can end them with the pipeline (`pipelines.common.stage_actors`)."""
    import ray

    mib = 1 << 20
    dataset = dataset.map_batches(
        InputPreparer, batch_size=None, batch_format="pyarrow", num_cpus=0.5, memory=config.prepare_memory_mb * mib,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.prepare_actors),
        max_task_retries=0,  # the actor restarts; its batch is dropped and retried alone
        fn_constructor_kwargs={**_preparer_kwargs(config, network), "registry": registry},
    )
    dataset = dataset.map_batches(
        SurfaceSampler,
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.model_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
        memory=config.model_memory_mb * mib,
        max_task_retries=0,  # the actor restarts; its batch is dropped and retried alone
        fn_constructor_kwargs={**_sampler_kwargs(config, use_gpu, network), "registry": registry},
    )
    # Actors, not tasks: a task per row costs ~15 ms of scheduling, which a job of many failing
    # inputs (nothing to mesh) pays thousands of times.
    dataset = dataset.map_batches(
        MeshFinisher, batch_size=None, batch_format="pyarrow", num_cpus=0.5, memory=config.finish_memory_mb * mib,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.finish_actors),
        max_task_retries=0,  # the actor restarts; its batch is dropped and retried alone
        fn_constructor_kwargs={"reconstruction": config.reconstruction, "mesh_format": config.mesh_format,
                               "registry": registry},
    )
    return dataset


def _sampler_kwargs(config: BulkConfig, use_gpu: bool, network: NetworkInputs) -> dict:
    return {"checkpoint": config.checkpoint, "reconstruction": config.reconstruction, "use_gpu": use_gpu,
            "fallback_checkpoint": config.fallback_checkpoint, "batch_size": config.batch_size,
            "fallback_id": network.fallback_id}


def _preparer_kwargs(config: BulkConfig, network: NetworkInputs) -> dict:
    # The body is fitted when asked for or when the network reads it; a photo it cannot be fitted to
    # fails only when the network needs it and there is no fallback network.
    return {"sizes": network.sizes, "overwrite": config.overwrite, "max_pixels": config.max_pixels,
            "person": config.person, "mesh_format": config.mesh_format, "body": config.body or network.body_guided,
            "fit": config.fit, "body_optional": not network.body_guided or config.fallback_checkpoint is not None,
            "quality_gate": network.body_guided and config.fallback_checkpoint is not None}


_PREPARERS: dict[tuple, InputPreparer] = {}  # per worker process: the person finder of `_reconstruct_alone`
_SAMPLERS: dict[tuple, SurfaceSampler] = {}  # per worker process: the network of `_reconstruct_alone`


def _preparer(kwargs: dict) -> InputPreparer:
    key = tuple(sorted(kwargs.items()))
    if key not in _PREPARERS:
        _PREPARERS[key] = InputPreparer(**kwargs)
    return _PREPARERS[key]


def _reconstruct_alone(record: dict, config: BulkConfig, network: NetworkInputs, use_gpu: bool) -> list[dict]:
    """All three stages for one input in this worker process (a retry after a worker died): its rows."""
    key = (config.checkpoint, config.fallback_checkpoint, config.reconstruction, use_gpu)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = SurfaceSampler(**_sampler_kwargs(config, use_gpu, network))
    return list(_run_stages(_preparer(_preparer_kwargs(config, network)), _SAMPLERS[key], record, config))


def _crashed_rows(record: dict, people: dict | None, error_class: str, message: str) -> list[dict]:
    """Failed rows for an input whose retries all died: one for the input, or, when some of its
    people already came back, one for each person still missing."""
    if not people:
        return [stage_rows.failed(dict(record), error_class, message)]
    rows = []
    for index in people["missing"]:
        row = dict(record, **output_uris(f"{record['output_stem']}_p{index}", people["mesh_format"]),
                   person_index=index, persons_found=people["persons_found"],
                   first_of_input=index == people["indices"][0])
        rows.append(stage_rows.failed(row, error_class, message))
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
        batch = finish_rows(sampler(stage_rows.to_table([row], STAGE_SCHEMA)), config.reconstruction, config.mesh_format)
        yield stage_rows.rows(batch)[0][0]


def _results_in_process(records: list[dict], config: BulkConfig, network: NetworkInputs):
    """The same stages, one image at a time, in this process (no Ray)."""
    import torch

    use_gpu = config.use_gpu if config.use_gpu is not None else torch.cuda.is_available()
    preparer = InputPreparer(**_preparer_kwargs(config, network))
    sampler = SurfaceSampler(**_sampler_kwargs(config, use_gpu, network))
    for record in records:
        yield from _run_stages(preparer, sampler, record, config)


# A job of at most this many inputs runs in the driver's process when the caller leaves the choice
# to `run_bulk`: starting and stopping a private Ray instance costs it more (15-25 s on 2 cores) than
# it gains.
SMALL_JOB_INPUTS = 4


def run_bulk(config: BulkConfig, in_process: bool | None = False, progress: bool = True, connect=None) -> stage_rows.Summary:
    """Run one bulk job to completion.

    in_process: True runs the stages in this process, False on Ray, None decides by the job's size
    (`SMALL_JOB_INPUTS`). connect: called once the inputs are listed and the output checked, when
    the job runs on Ray (`connect_ray`; None: Ray is initialised already), so that a bad input list,
    checkpoint or output fails at once, before any Ray process starts."""
    from model.network.checkpoint import check_finite_weights, read_checkpoint
    from pipelines.common.checkpoints import checkpoint_identity, fallback_identity, fetch_checkpoint

    start = time.perf_counter()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    local_checkpoint = fetch_checkpoint(config.checkpoint)
    _, net_config, metadata = read_checkpoint(local_checkpoint, tensors=False)  # fail fast on a bad header
    check_finite_weights(local_checkpoint)  # and on damaged weights, before any worker loads them
    checkpoint_id, checkpoint_version = checkpoint_identity(local_checkpoint, metadata)
    sizes = (net_config.coarse_size, net_config.fine_size)
    fallback_id = None if config.fallback_checkpoint is None else fallback_identity(config.fallback_checkpoint, sizes)
    network = NetworkInputs(sizes, net_config.body_guided, fallback_id if net_config.body_guided else None)

    items = list_inputs(list(config.inputs), exclude=config.output)  # before anything is written
    stage_rows.check_writable(config.output)
    recover_spool(config.output)
    if removed := remove_stale_temporaries(config.output):
        log.warning("removed %d temporary files an interrupted job left in %s", removed, redact(config.output))
    records = initial_rows(items, config, run_id, checkpoint_id, settings_key(config, checkpoint_id, network))
    if in_process is None:
        in_process = len(records) <= SMALL_JOB_INPUTS
    if not in_process and connect is not None:
        connect()
    metrics = BulkMetrics(pipeline="reconstruct")
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port)
    metrics.in_flight.labels(metrics.pipeline).set(len(records))
    manifest = ManifestWriter(config.output, run_id, config.manifest_flush_rows, {"checkpoint_version": checkpoint_version},
                              flush_seconds=config.manifest_flush_seconds, retry_delays_s=config.manifest_retry_delays_s)
    summary = stage_rows.Summary()

    def observe(row: dict, first_of_input: bool) -> None:
        metrics.observe(row)
        if first_of_input:
            metrics.in_flight.labels(metrics.pipeline).dec()

    results = (_results_in_process if in_process else _results_on_ray)(records, config, network)
    stage_rows.drain_results(results, manifest, summary, len(records), "reconstruct", progress, observe)
    summary.seconds = time.perf_counter() - start
    metrics.throughput.labels(metrics.pipeline).set(summary.total / summary.seconds if summary.seconds else 0)
    if config.pushgateway:
        metrics.push(config.pushgateway)
    return summary
