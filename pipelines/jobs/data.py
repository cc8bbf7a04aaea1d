"""`pifuhd data synth` and `pifuhd data scans`: training data as Ray Data pipelines.

Both jobs are the same pipeline over a list of subjects:

    subject ids --(Ray Data, an actor pool, one CPU per actor)--> per batch of subjects:
        make or load the subject -> render K views (EGL) -> label points (winding numbers)
        -> write meshes/{id}.ply, then one Parquet shard per split
    --> per-subject status rows back to the driver (progress, failures, summary)

Subjects already in a shard are skipped, so a re-run resumes. A subject that fails (a corrupt
scan, say) becomes a row of failures.parquet with its reason; the job goes on and exits 0.
The driver finally rewrites dataset.json from the shards. Layout: pipelines/common/dataset.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.data.humans import HELD_OUT_FAMILIES, POSE_FAMILIES, HumanConfig
from model.data.sampling import SamplingConfig
from model.data.scans import UP_AXES, ScanConfig
from pipelines.common.exit_codes import build_config
from pipelines.common.options import config_option, config_values
from pipelines.common.ray_runtime import connect_ray
from pipelines.common.uris import uri_argument

# Nothing that imports torch or pyarrow at import time: pipelines/cli.py builds its parser from
# register_cli below, and `pifuhd --help` must stay instant (the data configs are plain dataclasses).

RENDER_SIZE = 1024  # always rendered at 1024; 512 is its 2x2 downsampling


@dataclass(frozen=True)
class SampleSettings:
    """How each subject becomes rows: views, image sizes, lighting/backgrounds, points, splits."""

    views: int = 4
    resolution: int = 1024  # 1024 stores 1024 and 512 images; 512 stores 512 only
    pitch_jitter_deg: float = 5.0
    fixed_yaws: bool = False  # yaws 0, 360/views, ... (evaluation sets) instead of from a random start
    backgrounds: str | None = None  # a folder of images; procedural backgrounds when None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    val_fraction: float = 0.05
    test_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.resolution not in (512, 1024):
            raise ValueError(f"resolution must be 512 or 1024, got {self.resolution}")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction <= 1):
            raise ValueError(f"val and test fractions must be >= 0 and sum to at most 1, got "
                             f"{self.val_fraction} and {self.test_fraction}")


@dataclass(frozen=True)
class JobConfig:
    """One data job: where to write, what to make, and how to spread it over Ray."""

    out: str
    kind: str  # "synth" or "scans"
    seed: int = 0
    settings: SampleSettings = field(default_factory=SampleSettings)
    count: int = 0  # synth: number of subjects
    inputs: tuple[str, ...] = ()  # scans: files or folders (local or URIs)
    human: HumanConfig = field(default_factory=HumanConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    subjects_per_shard: int = 4
    workers: int | None = None  # actors; default: one per CPU of the cluster
    address: str | None = None  # Ray address; None starts a private local instance
    quiet: bool = False

    def __post_init__(self) -> None:
        from pipelines.common.uris import check_uri

        if self.kind not in ("synth", "scans"):
            raise ValueError(f"kind must be 'synth' or 'scans', not {self.kind!r}")
        if self.kind == "synth" and self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        if self.kind == "scans" and not self.inputs:
            raise ValueError("a scans job needs at least one input")
        if self.subjects_per_shard < 1 or (self.workers is not None and self.workers < 1):
            raise ValueError("subjects_per_shard and workers must be >= 1")
        for uri in (self.out, *self.inputs):
            check_uri(uri)
        if self.kind == "synth" and self.human.garments:
            from model.data.garments import read_assets

            try:  # a folder without assets fails here, before Ray starts
                read_assets(self.human.garments)
            except FileNotFoundError as exc:
                raise ValueError(str(exc)) from None

    def settings_dict(self) -> dict:
        keep = {"kind", "seed", "count", "inputs", "subjects_per_shard"}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k in keep}
        d["settings"] = dataclasses.asdict(self.settings)
        d["human" if self.kind == "synth" else "scan"] = dataclasses.asdict(self.human if self.kind == "synth" else self.scan)
        d["units_per_cm"] = 0.01
        d["render_size"] = RENDER_SIZE
        return d


# ---- one subject -> rows (pure Python, runs inside the actors) --------------------------------


def synth_subject_id(seed: int, index: int) -> str:
    return f"synth-{seed}-{index:06d}"


def subject_seeds(seed: int, key: int) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """Independent seeds for the body and for its views, from the job seed and the subject's key."""
    body, views = np.random.SeedSequence([seed, key]).spawn(2)
    return body, views


def _id_key(subject_id: str) -> int:
    return int(hashlib.sha256(subject_id.encode()).hexdigest()[:15], 16)


def subject_rows(subject, split: str, source: str, rng: np.random.Generator, settings: SampleSettings) -> list[dict]:
    """Render and label every view of one subject: a list of rows of `pipelines.common.formats.DATASET_SCHEMA`."""
    from pipelines.common.formats import DATASET_SCHEMA_VERSION
    from model.render import get_renderer, network_calib, png_bytes
    from model.data.scenes import image_background, procedural_background, random_lighting, sample_views
    from model.data.sampling import label_views

    renderer = get_renderer(RENDER_SIZE)
    views = sample_views(rng, settings.views, settings.pitch_jitter_deg, settings.fixed_yaws)
    if subject.info.get("label_union"):
        merged = subject.merged()
        label_parts = [(merged.vertices, merged.faces)]
    else:
        label_parts = [(p.vertices, p.faces) for p in subject.parts]
    transforms = [v.world_from_canonical() for v in views]
    body = None if subject.body is None else (subject.body.vertices, subject.body.faces)
    points = label_views(label_parts, transforms, settings.sampling, rng, body=body)
    calib = network_calib().reshape(-1)
    rows = []
    for index, (view, transform, pts) in enumerate(zip(views, transforms, points)):
        lighting = random_lighting(rng)
        if settings.backgrounds:
            background, bg_name = image_background(rng, RENDER_SIZE, settings.backgrounds), "folder"
        else:
            background, bg_name = procedural_background(rng, RENDER_SIZE), "procedural"
        full = renderer.render(subject.parts, view, lighting, background)
        half = full.downsample()
        row = {
            "schema_version": DATASET_SCHEMA_VERSION,
            "subject_id": subject.subject_id,
            "view": index,
            "split": split,
            "source": source,
            "yaw_deg": view.yaw_deg,
            "pitch_deg": view.pitch_deg,
            "units_per_cm": view.units_per_cm,
            "calib": calib,
            "view_from_canonical": transform.astype(np.float32).reshape(-1),
            "lighting_sh": lighting.reshape(-1),
            "background": bg_name,
            "num_points": len(pts.labels),
            "points": pts.points,
            "labels": pts.labels,
            "surface_points": pts.surface,
            "surface_normals": pts.surface_normals,
            "mesh_path": f"meshes/{subject.subject_id}.ply",
            "body_sdf": pts.body_sdf,
            "body_normals": pts.body_normals,
        }
        sizes = {512: half} if settings.resolution == 512 else {512: half, 1024: full}
        for s, out in sizes.items():
            row[f"image_{s}"] = png_bytes(out.rgb)
            row[f"mask_{s}"] = png_bytes(out.mask)
            row[f"normal_front_{s}"] = png_bytes(out.normal_front)
            row[f"normal_back_{s}"] = png_bytes(out.normal_back)
        rows.append(row)
    return rows


def body_record(subject) -> dict:
    """meshes/{id}_body.json: the anny parameters that rebuild a synthetic subject's body, or a scan's
    fit (its `BodyParameters`, in the pixels of the front render, and the fit's quality)."""
    record = {"subject_id": subject.subject_id, "frame": "canonical (cm, y up, facing +z, centred)"}
    if "body_fit" in subject.info:
        return {**record, "source": "fitted to the scan's front render (model.data.scan_bodies)", **subject.info["body_fit"]}
    keys = ("phenotype", "family", "scale_cm_per_anny_cm", "anny_pose_parameters", "centre_cm", "garments",
            "garment_rejections", "garment_inside_share")
    return {**record, "source": "synthetic", **{k: subject.info.get(k) for k in keys}}


def make_job_subject(job: JobConfig, item: dict, workdir: str):
    """(subject, source, view rng) for one work item of either job."""
    from model.data.humans import make_subject
    from model.data.scans import ScanRef, load_scan

    if job.kind == "synth":
        body_seed, view_seed = subject_seeds(job.seed, int(item["index"]))
        return make_subject(item["subject_id"], body_seed, job.human), "synth", np.random.default_rng(view_seed)
    _, view_seed = subject_seeds(job.seed, _id_key(item["subject_id"]))
    subject = load_scan(ScanRef(item["subject_id"], item["uri"]), workdir, job.scan)
    if job.scan.fit_body:
        subject = with_scan_body(subject)
    return subject, item["uri"], np.random.default_rng(view_seed)


def with_scan_body(subject):
    """The scan with anny fitted under its clothes (`model.data.scan_bodies`), or, where no body can be
    fitted (no person in the front render, too few landmarks), as it was with the reason in
    `info["body_error"]`: its rows then carry no body, and the subject is still training data."""
    from model.data.scan_bodies import fit_scan_body
    from model.errors import InputError
    from pipelines.common.person import person_finder

    try:
        body, fit = fit_scan_body(subject, person_finder())
    except InputError as exc:
        return dataclasses.replace(subject, info={**subject.info, "body_error": str(exc)})
    quality = {"mask_iou": fit.mask_iou, "landmark_error": fit.landmark_error, "low_quality": fit.low_quality,
               "note": fit.quality_note, "parameters": json.loads(fit.params.to_json())}
    return dataclasses.replace(subject, body=body, info={**subject.info, "body_fit": quality})


class SubjectWorker:
    """Ray Data actor: turns batches of work items into shards, returns one status row per subject."""

    def __init__(self, job: JobConfig):
        # One CPU per actor: keep Mesa's rasteriser and torch to one thread each.
        from model.render import configure_llvmpipe_threads

        configure_llvmpipe_threads(1)
        import torch

        torch.set_num_threads(1)
        self.job = job
        if job.kind == "synth" or job.scan.fit_body:
            from model.body.anny import load_body_model

            load_body_model()

    def __call__(self, batch: dict) -> dict:
        from pipelines.common import dataset as fmt, formats, storage

        job, s = self.job, self.job.settings
        ids = list(batch["subject_id"])
        status = {"subject_id": [], "split": [], "ok": [], "reason": [], "source": [], "rows": [], "seconds": [], "no_body": []}
        by_split: dict[str, list[dict]] = {}
        for i, sid in enumerate(ids):
            item = {k: batch[k][i] for k in batch}
            start = time.perf_counter()
            split = fmt.subject_split(sid, job.seed, s.val_fraction, s.test_fraction)
            source = str(item.get("uri") or "synth")
            try:
                with tempfile.TemporaryDirectory(prefix="pifuhd-scan-") as workdir:
                    subject, source, rng = make_job_subject(job, item, workdir)
                rows = subject_rows(subject, split, source, rng, s)
                merged = subject.merged()
                storage.write_bytes_atomic(storage.join(job.out, "meshes", f"{sid}.ply"), fmt.ply_bytes(merged.vertices, merged.faces, merged.colors))
                if subject.body is not None:
                    b = subject.body
                    storage.write_bytes_atomic(storage.join(job.out, "meshes", f"{sid}_body.ply"), fmt.ply_bytes(b.vertices, b.faces, b.colors))
                    storage.write_bytes_atomic(storage.join(job.out, "meshes", f"{sid}_body.json"), json.dumps(body_record(subject)).encode())
                by_split.setdefault(split, []).extend(rows)
                ok, reason = True, ""
            except Exception as exc:  # noqa: BLE001 - a bad subject must not stop the job
                # A ScanError's message is the reason already; anything else is named by its type.
                ok, rows, subject = False, [], None
                reason = str(exc) if _is_scan_error(exc) else f"{type(exc).__name__}: {exc}"
            status["subject_id"].append(sid)
            status["split"].append(split)
            status["ok"].append(ok)
            status["reason"].append(reason)
            status["source"].append(source)
            status["rows"].append(len(rows))
            status["seconds"].append(time.perf_counter() - start)
            # Why a made subject's rows carry no body ("" when they do, or when it failed).
            status["no_body"].append("" if subject is None or subject.body is not None
                                     else subject.info.get("body_error", "not fitted (--no-body)"))
        # Shards last: a subject counts as finished only once its rows are written.
        for split, rows in by_split.items():
            name = hashlib.sha1(",".join(sorted({r["subject_id"] for r in rows})).encode()).hexdigest()[:16]
            shard = storage.join(job.out, "shards", split, f"part-{name}.parquet")
            storage.write_bytes_atomic(shard, formats.dataset_shard_bytes(rows))
        return {k: np.array(v, dtype=object if k in ("subject_id", "split", "reason", "source", "no_body") else None) for k, v in status.items()}


def _is_scan_error(exc: BaseException) -> bool:
    from model.data.scans import ScanError

    return isinstance(exc, ScanError)


# ---- the Ray side -----------------------------------------------------------------------------


def _warm_body_model_cache() -> float:
    """Build anny's cache once, in a throwaway worker, before the actors start (each would build it)."""
    from model.body.anny import load_body_model

    start = time.perf_counter()
    load_body_model()
    return time.perf_counter() - start


def work_items(job: JobConfig) -> list[dict]:
    """Every subject of the job: synth indices, or scans found under the inputs."""
    if job.kind == "synth":
        return [{"subject_id": synth_subject_id(job.seed, i), "index": i, "uri": ""} for i in range(job.count)]
    from model.data.scans import find_scans

    return [{"subject_id": r.subject_id, "index": i, "uri": r.uri} for i, r in enumerate(find_scans(list(job.inputs)))]


def run_job(job: JobConfig) -> dict:
    """Run a data job to completion and return its summary (also printed unless quiet)."""
    from pipelines.common import dataset as fmt

    job = dataclasses.replace(job, out=fmt.normalise_uri(job.out))
    log = (lambda *a: None) if job.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    started = time.perf_counter()
    items = work_items(job)
    done = fmt.finished_subjects(job.out)
    todo = [it for it in items if it["subject_id"] not in done]
    log(f"data {job.kind}: {len(items)} subjects, {len(items) - len(todo)} already written, {len(todo)} to make -> {job.out}")

    statuses: list[dict] = []
    if todo:
        ray = connect_ray(job.address)
        import ray.data

        from model.body.anny import body_model_cached

        if (job.kind == "synth" or job.scan.fit_body) and not body_model_cached():
            log("building the anny body model cache once (first use on this machine: about 100 s)")
            ray.get(ray.remote(num_cpus=1, max_calls=1)(_warm_body_model_cache).remote())
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = max(1, min(job.workers or cpus, cpus, len(todo)))
        ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), workers * 4)))
        ds = ds.map_batches(
            SubjectWorker,
            fn_constructor_kwargs={"job": job},
            batch_size=job.subjects_per_shard,
            batch_format="numpy",
            num_cpus=1,
            compute=ray.data.ActorPoolStrategy(min_size=workers, max_size=workers),
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["subject_id"])):
                statuses.append({k: batch[k][i] for k in batch})
            ok = sum(bool(s["ok"]) for s in statuses)
            log(f"  {len(statuses)}/{len(todo)} subjects ({ok} ok, {len(statuses) - ok} failed), {time.perf_counter() - started:.0f} s")

    failed = [{"subject_id": s["subject_id"], "source": s["source"], "reason": s["reason"]} for s in statuses if not s["ok"]]
    made = [s for s in statuses if s["ok"]]
    n_failed = fmt.update_failures(job.out, failed, {s["subject_id"] for s in made} | done)
    fractions = {"train": 1 - job.settings.val_fraction - job.settings.test_fraction, "val": job.settings.val_fraction, "test": job.settings.test_fraction}
    card = fmt.write_card(job.out, job.kind, job.settings_dict(), job.seed, fractions, n_failed)
    if job.kind == "synth" and job.human.garments:
        from model.data.garments import asset_notice, read_assets
        from pipelines.common import storage

        storage.write_bytes_atomic(storage.join(job.out, "NOTICE.md"), asset_notice(read_assets(job.human.garments)).encode())
    seconds = [float(s["seconds"]) for s in made]
    summary = {
        "out": job.out,
        "subjects": len(items),
        "skipped": len(items) - len(todo),
        "written": len(made),
        "failed": len(failed),
        "failures": failed,
        "rows_written": int(sum(int(s["rows"]) for s in made)),
        "with_body": sum(not s["no_body"] for s in made),
        "seconds": round(time.perf_counter() - started, 2),
        "seconds_per_subject": round(float(np.mean(seconds)), 3) if seconds else None,
        "dataset": card["counts"],
    }
    log(
        f"data {job.kind} done in {summary['seconds']} s: {summary['written']} written, {summary['skipped']} skipped, "
        f"{summary['failed']} failed; dataset has {card['counts']['subjects']} subjects / {card['counts']['rows']} rows"
        + (f"; {summary['seconds_per_subject']} s per subject per worker" if seconds else "")
    )
    for f in failed:
        log(f"  failed {f['subject_id']} ({f['source']}): {f['reason']}")
    for s in made:
        if s["no_body"]:
            log(f"  {s['subject_id']}: rows without a body ({s['no_body']})")
    return summary


# ---- command line -----------------------------------------------------------------------------


# Where the nested configs' options land in the parsed arguments.
SETTINGS, SAMPLING, HUMAN, SCAN = "settings.", "sampling.", "human.", "scan."


def _common_arguments(p: argparse.ArgumentParser) -> None:
    config_option(p, "--out", JobConfig, "out", aliases=("-o", "--output"), required=True, type=uri_argument,
                  help="dataset folder or URI (s3://bucket/prefix)")
    config_option(p, "--views", SampleSettings, "views", prefix=SETTINGS, help="views per subject, yaws evenly spread")
    config_option(p, "--seed", JobConfig, "seed", help="fixes every random draw and the train/val/test split")
    config_option(p, "--resolution", SampleSettings, "resolution", prefix=SETTINGS, choices=(512, 1024),
                  help="1024 stores 1024 and 512 images; 512 only 512")
    config_option(p, "--points", SamplingConfig, "num_points", prefix=SAMPLING, help="labelled points per view")
    config_option(p, "--surface-points", SamplingConfig, "num_surface_points", prefix=SAMPLING,
                  help="surface points with normals per view")
    config_option(p, "--near-share", SamplingConfig, "near_share", prefix=SAMPLING, help="share of points near the surface")
    config_option(p, "--ray-share", SamplingConfig, "ray_share", prefix=SAMPLING,
                  help="share of points on camera rays through the surface")
    config_option(p, "--pitch-jitter", SampleSettings, "pitch_jitter_deg", prefix=SETTINGS, help="max |pitch| in degrees")
    config_option(p, "--fixed-yaws", SampleSettings, "fixed_yaws", prefix=SETTINGS,
                  help="yaws 0, 360/views, ... instead of from a random start (evaluation sets)")
    config_option(p, "--backgrounds", SampleSettings, "backgrounds", prefix=SETTINGS,
                  help="folder of background images (default: procedural)")
    config_option(p, "--val-fraction", SampleSettings, "val_fraction", prefix=SETTINGS,
                  help="share of subjects in the validation split")
    config_option(p, "--test-fraction", SampleSettings, "test_fraction", prefix=SETTINGS,
                  help="share of subjects in the test split")
    config_option(p, "--subjects-per-shard", JobConfig, "subjects_per_shard",
                  help="subjects per Parquet shard (one unit of work)")
    config_option(p, "--workers", JobConfig, "workers", help="actors (default: one per CPU)")
    config_option(p, "--address", JobConfig, "address", help="Ray cluster address (default: a private local instance)")


def _settings(args) -> SampleSettings:
    sampling = build_config(SamplingConfig, **config_values(args, SamplingConfig, SAMPLING))
    return build_config(SampleSettings, **config_values(args, SampleSettings, SETTINGS), sampling=sampling)


def _synth_job(args) -> JobConfig:
    human = config_values(args, HumanConfig, HUMAN)
    if human["garments"]:
        human["garments"] = str(Path(human["garments"]).resolve())
    return build_config(JobConfig, kind="synth", **config_values(args, JobConfig), settings=_settings(args),
                        human=build_config(HumanConfig, **human))


def _scans_job(args) -> JobConfig:
    return build_config(JobConfig, kind="scans", **config_values(args, JobConfig), settings=_settings(args),
                        scan=build_config(ScanConfig, **config_values(args, ScanConfig, SCAN)))


def _run(args) -> int:
    run_job(args.config(args))
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add `data synth` and `data scans` to an argparse subparsers object (pipelines/cli.py)."""
    data = subparsers.add_parser("data", help="make training data (synthetic people, real scans) as Parquet shards")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = actions.add_parser("synth", help="synthetic clothed people from the anny body model")
    config_option(synth, "--count", JobConfig, "count", required=True, help="number of subjects")
    config_option(synth, "--children", HumanConfig, "children", prefix=HUMAN, help="also draw children (a quarter of subjects)")
    config_option(synth, "--families", HumanConfig, "families", prefix=HUMAN, nargs="+", choices=POSE_FAMILIES + HELD_OUT_FAMILIES,
                  help="pose families drawn (default: the training families; lunge is held out of them, "
                       "for test subjects of a pose no shipped model saw)")
    config_option(synth, "--garments", HumanConfig, "garments", prefix=HUMAN, metavar="DIR", help="a folder of MakeHuman assets (clothes/*/*.mhclo, hair/*/*.mhclo, "
                       "as makehuman-assets' base/): real suits, shoes, hair and hats instead of procedural garments")
    _common_arguments(synth)
    synth.set_defaults(handler=_run, config=_synth_job)
    scans = actions.add_parser("scans", help="real scans: OBJ(+MTL+texture), PLY (vertex colours), GLB")
    scans.add_argument("inputs", nargs="+", metavar="PATH_OR_URI", type=uri_argument, help="mesh files or folders holding them")
    config_option(scans, "--up-axis", ScanConfig, "up_axis", prefix=SCAN, choices=UP_AXES, help="the scans' up axis")
    config_option(scans, "--no-body", ScanConfig, "fit_body", prefix=SCAN,
                  help="do not fit the anny body to each scan's front render (rows then carry no body)")
    _common_arguments(scans)
    scans.set_defaults(handler=_run, config=_scans_job)
    merge = actions.add_parser("merge", help="copy several datasets' shards and meshes into one (a training mix)")
    merge.add_argument("sources", nargs="+", metavar="DATASET", type=uri_argument, help="datasets (pifuhd data output)")
    merge.add_argument("-o", "--out", "--output", dest="out", required=True, type=uri_argument, help="the merged dataset")
    merge.set_defaults(handler=_merge)
    return data


def _merge(args) -> int:
    from pipelines.common import dataset as fmt
    from pipelines.common.exit_codes import UsageError

    try:
        card = fmt.merge_datasets(list(args.sources), args.out)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    splits = ", ".join(f"{split} {counts['rows']}" for split, counts in card["counts"]["by_split"].items())
    print(f"data merge: {len(args.sources)} datasets -> {fmt.normalise_uri(args.out)}: {card['counts']['subjects']} subjects, "
          f"{card['counts']['rows']} rows ({splits})")
    return 0
