"""`pifuhd fit`: the anny body fitted to every input photo, on Ray Data.

    list inputs (driver, `pipelines.common.inputs`)
      -> read, hash, find the person, fit, write     CPU tasks, one image each (`fit_rows`)
      -> manifest rows streamed back to the driver, appended to Parquet

Outputs per input, beside each other under OUT/bodies/ (pixel frame of the photo, as
`pifuhd reconstruct` meshes): `STEM_body.EXT` (the body mesh), `STEM_body_rigged.glb` (with
`rigged`), and `STEM_body.json` (anny parameters that reproduce the body, the fit's quality, the
input's content hash), written last, so its presence marks a finished input: a re-run skips
inputs whose json has the same content hash and fitter id.

The person's landmarks come from one function, `find_person`: a `NAME_keypoints.json` sidecar
(MediaPipe-33 or OpenPose BODY_25 layout, see `model.body.landmarks`) when there is one, else the
person finder (`model.person`); the mask from `NAME_mask.png`, the image's alpha, or the finder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from model.body.export import MESH_FORMATS
from model.body.fit import WORLD_SOURCES, FitConfig
from pipelines.common import stage_rows
from pipelines.common.person import find_person
from pipelines.common.formats import FIT_MANIFEST_SCHEMA, ManifestWriter, recover_spool
from pipelines.common.inputs import InputItem, list_inputs
from pipelines.common.exit_codes import build_config
from pipelines.common.options import config_option, config_values
from pipelines.common.uris import uri_argument
from pipelines.common.storage import join, redact, safe_stem, write_bytes_atomic

@dataclass(frozen=True)
class FitJobConfig:
    """One `pifuhd fit` job."""

    inputs: tuple[str, ...]
    output: str
    fit: FitConfig = field(default_factory=FitConfig)
    mesh_format: str = "obj"
    rigged: bool = False  # also write STEM_body_rigged.glb
    overwrite: bool = False
    max_pixels: int = 100_000_000  # decompression-bomb guard
    manifest_flush_rows: int = 50

    def __post_init__(self) -> None:
        if self.mesh_format not in MESH_FORMATS:
            raise ValueError(f"mesh format must be one of {MESH_FORMATS}, not {self.mesh_format!r}")
        if not self.inputs:
            raise ValueError("no inputs given")


def fitter_id(config: FitConfig) -> str:
    """Identity of the fit's settings and body model: a re-run with another redoes every input."""
    import anny

    text = json.dumps({"fit": dataclasses.asdict(config), "anny": getattr(anny, "__version__", "?"), "format": 1}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def initial_rows(items: list[InputItem], config: FitJobConfig, run_id: str, fitter: str) -> list[dict]:
    """One pending record per input, with its output locations fixed up front."""
    records = []
    for item in items:
        stem = join(config.output, "bodies", safe_stem(item.name, item.uri))
        records.append({
            "run_id": run_id,
            "input_uri": redact(item.uri),
            "status": "pending",
            "mesh_uri": f"{stem}_body.{config.mesh_format}",
            "params_uri": f"{stem}_body.json",
            "rigged_uri": f"{stem}_body_rigged.glb" if config.rigged else None,
            "fitter_id": fitter,
            "item": item.to_dict(),
        })
    return records


FIT_STAGE_SCHEMA = stage_rows.stage_schema(FIT_MANIFEST_SCHEMA)
FIT_MARKER_TYPES = {"content_hash": str, "fitter_id": str, "vertices": int, "faces": int}


def _fit_one(record: dict, config: FitJobConfig) -> dict:
    from model.body.export import body_json, mesh_bytes, rigged_glb
    from model.body.fit import fit_body

    item = InputItem(**record["item"])
    start = time.perf_counter()
    image = stage_rows.read_limited(item.uri, stage_rows.MAX_IMAGE_BYTES)
    limits = {"mask": stage_rows.MAX_IMAGE_BYTES, "rect": stage_rows.MAX_TEXT_SIDECAR_BYTES, "keypoints": stage_rows.MAX_TEXT_SIDECAR_BYTES}
    sidecars = {k: stage_rows.read_limited(getattr(item, f"{k}_uri"), limit) if getattr(item, f"{k}_uri") else None for k, limit in limits.items()}
    digest = hashlib.sha256(image)
    for key in ("mask", "rect", "keypoints"):
        digest.update(key.encode() + (sidecars[key] or b""))
    record["content_hash"] = digest.hexdigest()
    record["seconds_read"] = time.perf_counter() - start
    marker = None if config.overwrite else stage_rows.finished_marker(record["params_uri"], FIT_MARKER_TYPES)
    if marker and marker.get("content_hash") == record["content_hash"] and marker.get("fitter_id") == record["fitter_id"]:
        record.update(status="skipped", **{k: marker.get(k) for k in ("vertices", "faces", "bbox_min", "bbox_max")})
        return record

    start = time.perf_counter()
    name = redact(item.uri)
    person, size = find_person(image, sidecars, name, config.max_pixels)
    fit = fit_body(person.landmarks, size, mask=person.mask, world_landmarks=person.world_landmarks, config=config.fit, name=name)
    record["seconds_fit"] = time.perf_counter() - start

    start = time.perf_counter()
    write_bytes_atomic(record["mesh_uri"], mesh_bytes(fit.vertices, fit.faces, config.mesh_format))
    if config.rigged:
        write_bytes_atomic(record["rigged_uri"], rigged_glb(fit))
    record.update(
        status="ok",
        vertices=len(fit.vertices),
        faces=len(fit.faces),
        bbox_min=[float(v) for v in fit.vertices.min(0)],
        bbox_max=[float(v) for v in fit.vertices.max(0)],
        mask_iou=fit.mask_iou,
        landmark_error_px=fit.landmark_error_px,
        low_quality=fit.low_quality,
        quality_note=fit.quality_note,
        landmark_source=person.source,
    )
    extra = {k: record[k] for k in ("input_uri", "content_hash", "fitter_id", "mesh_uri", "vertices", "faces", "bbox_min", "bbox_max")}
    # Written last: its presence means every output of this input is complete.
    write_bytes_atomic(record["params_uri"], body_json(fit, extra).encode())
    record["seconds_write"] = time.perf_counter() - start
    return record


def fit_rows(batch: pa.Table, config: FitJobConfig) -> pa.Table:
    """Ray Data stage: fit every pending row of the batch; any failure is that row's failed status."""
    out = []
    node, worker = stage_rows.where()
    for record, _ in stage_rows.rows(batch):
        record.update(node=node, worker=worker)
        try:
            out.append((_fit_one(record, config), b""))
        except Exception as exc:  # noqa: BLE001 - one bad image is one failed row
            out.append(stage_rows.fail(record, exc))
    return stage_rows.to_table(out, FIT_STAGE_SCHEMA)


def _results_on_ray(records: list[dict], config: FitJobConfig):
    dataset = stage_rows.stage_dataset(records, FIT_STAGE_SCHEMA)
    # One CPU per fit: the descent is sequential and single-threaded is its fastest setting.
    dataset = dataset.map_batches(fit_rows, batch_size=1, batch_format="pyarrow", num_cpus=1, fn_kwargs={"config": config})
    yield from stage_rows.stage_results(dataset)


def _results_in_process(records: list[dict], config: FitJobConfig):
    for record in records:
        yield stage_rows.rows(fit_rows(stage_rows.to_table([(record, b"")], FIT_STAGE_SCHEMA), config))[0][0]


def run_fit(config: FitJobConfig, in_process: bool = False, progress: bool = True) -> stage_rows.Summary:
    """Run one fit job to completion; Ray must already be initialised unless `in_process`."""
    start = time.perf_counter()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    items = list_inputs(list(config.inputs), exclude=config.output)  # before anything is written
    stage_rows.check_writable(config.output)
    recover_spool(config.output)
    records = initial_rows(items, config, run_id, fitter_id(config.fit))
    manifest = ManifestWriter(config.output, run_id, config.manifest_flush_rows, {}, schema=FIT_MANIFEST_SCHEMA)
    summary = stage_rows.Summary()
    results = (_results_in_process if in_process else _results_on_ray)(records, config)
    stage_rows.drain_results(results, manifest, summary, len(records), "fit", progress)
    summary.seconds = time.perf_counter() - start
    return summary


def register_cli(commands) -> None:
    """Add `pifuhd fit` to the command line."""
    fit = commands.add_parser(
        "fit",
        help="fit the anny body to every photo: body meshes, parameters and a Parquet manifest (Ray Data)",
        description="Fit the free anny body model (pose, shape, orthographic camera) to every input image. INPUT as for "
        "`reconstruct`. Landmarks and mask come from the shipped person finder, or from NAME_keypoints.json beside "
        "the image when there is one (MediaPipe-33: {\"landmarks\": [[x, y, visibility] x 33], \"world_landmarks\": "
        "optional}, or OpenPose BODY_25); NAME_mask.png or an alpha channel gives the silhouette. Outputs, in the photo's pixel frame: OUT/bodies/STEM_body.EXT and STEM_body.json.",
    )
    fit.add_argument("inputs", nargs="+", metavar="INPUT")
    config_option(fit, "--output", FitJobConfig, "output", aliases=("-o",), required=True, type=uri_argument,
                  help="output folder or s3:// prefix")
    config_option(fit, "--format", FitJobConfig, "mesh_format", choices=MESH_FORMATS, help="body mesh format")
    config_option(fit, "--rigged", FitJobConfig, "rigged", help="also write STEM_body_rigged.glb (anny skeleton and skin weights)")
    fit.add_argument("--children", action="store_true", help="allow children's ages (default: adults)")
    config_option(fit, "--world-source", FitConfig, "world_source", prefix=FIT, choices=WORLD_SOURCES,
                  help="the 3D pose the fit follows: the lifter's depths from the 2D landmarks, the given world "
                  "landmarks (the person finder's or the keypoints file's), or none")
    config_option(fit, "--overwrite", FitJobConfig, "overwrite", help="redo inputs already fitted with these settings")
    fit.add_argument("--fail-on-error", action="store_true", help="exit 3 if any input failed")
    fit.add_argument("--address", help="Ray cluster address (default: a private local instance)")
    fit.add_argument("--in-process", action="store_true", help="run the same stage in this process, without Ray")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(handler=_fit_command, config=_fit_config)


FIT = "fit."  # where the nested FitConfig's options land in the parsed arguments


def _fit_config(args) -> FitJobConfig:
    from model.body.anny import ADULT_AGE, CHILD_AGE

    age_range = (CHILD_AGE[0], ADULT_AGE[1]) if args.children else ADULT_AGE
    return build_config(FitJobConfig, **config_values(args, FitJobConfig),
                        fit=build_config(FitConfig, age_range=age_range, **config_values(args, FitConfig, FIT)))


def _fit_command(args) -> int:
    from pipelines.common.ray_runtime import connect_ray

    config = _fit_config(args)
    if not args.in_process:
        connect_ray(args.address)
    summary = run_fit(config, in_process=args.in_process, progress=not args.quiet)
    return summary.print_report(args.fail_on_error)
