"""`pifuhd evaluate`: reconstruction quality against ground-truth meshes, as a Ray Data job.

    pairs (driver: checkpoint views, file-name stems or manifest rows)
      -> evaluation actors, one pair per call:
           [checkpoint mode] read the stored view, reconstruct it with the checkpoint
           load both meshes -> cm -> optional rigid ICP -> surface metrics -> normal images
      -> one result row per pair streamed back -> OUT/results.parquet, OUT/summary.json

Modes (picked from what --pred is):
  (a) checkpoint (`.safetensors`, `.pt`, `.pth`; omitted = the shipped model) with --gt a
      dataset (`pifuhd data synth|scans`): every view of the --split subjects (default test)
      is reconstructed from its stored image. The dataset images are square crops in the
      network frame already, so the crop is the identity and the prediction's network-frame
      mesh *is* in the view frame; the ground truth `meshes/{id}.ply` (canonical cm) is mapped
      there by the row's `view_from_canonical`, and both are divided by `units_per_cm`. One
      result row per (subject, view); the predicted mesh (view frame, cm) and its preview are
      written to OUT/predictions/KEY.ply and KEY_preview.png.
  (b) a folder of meshes with --gt a folder of meshes (or a dataset: its `meshes/` of the
      split): pairs by file-name stem (a trailing `-<10 hex>`, the bulk job's naming, is
      ignored when the exact stem is absent).
  (c) a bulk output folder (it has `manifest/`) with --gt as in (b): the latest manifest row
      of each input is paired by the input's file-name stem; a failed row stays failed.
In (b) and (c) both meshes must already share one frame and unit; `--scale` converts that
unit to cm (bulk meshes are in the photo's pixel frame: their ground truth must be too), and
`--icp` removes a residual rigid misalignment.

Every ground-truth mesh of the evaluation set gets exactly one row. A missing prediction, an
unreadable or empty mesh, a failed manifest row or a failed reconstruction is a row with
status "failed" and its error class, never a crash; failures are left out of the means and
counted beside them. Predictions without a ground truth are only counted.

Protocol (PIFuHD's evaluator, see model/evaluation/metrics.py), all distances in cm:
  * `num_samples` (10k) points uniformly on each surface; P2S = mean distance from the
    prediction's samples to the ground-truth surface (exact point-to-triangle distances);
    S2P the opposite direction; Chamfer = (P2S + S2P) / 2.
  * normal consistency: mean |cos| between a sample's face normal and the closest face's
    normal on the other surface, both directions.
  * F-score at 1 and 2 cm: harmonic mean of the shares of prediction samples within the
    threshold of the truth (precision) and of truth samples within it of the prediction.
  * normal-image error: both meshes' camera-space normals rendered at 512 x 512 from yaws
    0/90/180/270 (yaw 0 = the input view in mode (a)), framed on the truth (180 cm spans
    90 % of the image), colours (n + 1) / 2 and black background; per view the mean over
    pixels of the squared colour distance (channel mean x 3), summed over the 4 views.
  * `--icp`: the prediction is first moved by a rigid ICP onto the truth (no scale); the
    rotation and translation it applied are reported. The published PIFuHD numbers use none.
How this differs from ICON/ECON's tables: they measure P2S from the ground truth to the
prediction (our `s2p_cm`) with 1k points, so their P2S is not comparable with ours, nor
are their Chamfer or normal numbers with another sampling or rendering; compare numbers
only within one protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np

from model.errors import InputError
from model.reconstruction.config import ReconstructionConfig
from pipelines.common import exit_codes, storage
from pipelines.common.checkpoints import default_fallback
from pipelines.common.exit_codes import build_config
from pipelines.common.options import config_option, config_values
from pipelines.common.formats import beats_baseline, summarize, write_results
from pipelines.common.uris import uri_argument
from pipelines.jobs.evaluation_pairs import (
    MESH_SUFFIXES, EmptyPrediction, MissingGroundTruth, MissingPrediction, checkpoint_items, detect_mode, folder_items,
    ground_truth_meshes, is_dataset, manifest_items,
)

log = logging.getLogger(__name__)

MODES = ("checkpoint", "folder", "manifest")
BASELINES = ("silhouette",)
# Where a body-guided checkpoint's per-view body comes from: "fitted" to the view's image (person
# finder landmarks, stored mask: what the product does), or the subject's "true" body (the bound).
BODY_SOURCES = ("fitted", "true")


class BrokenMesh(Exception):
    """A mesh file that cannot be read as triangles."""


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation job.

    pred: a checkpoint (local or URI; None = the shipped model), a folder of meshes, or a bulk
    output folder. gt: a dataset URI, or a folder of meshes. scale: mesh units -> cm for both
    meshes in folder and manifest modes (checkpoint mode takes the dataset's units_per_cm).
    reconstruction: how checkpoint mode makes each mesh (its resolution, surface level, carving);
    colours are never made.
    normal_image_size: 0 skips the normal-image error (no renderer needed).
    """

    gt: str
    out: str
    pred: str | None = None
    split: str = "test"
    icp: bool = False
    num_samples: int = 10_000
    scale: float = 1.0
    normal_image_size: int = 512
    seed: int = 0
    limit: int | None = None  # evaluate only the first `limit` pairs (sorted by key)
    workers: int | None = None  # evaluation actors (default: one per cluster CPU)
    address: str | None = None
    # Also score a baseline on the same views (checkpoint mode): "silhouette", the slab inflated
    # from the mask (model/evaluation/baselines.py), the floor a model must beat.
    baseline: str | None = None
    bodies: str = "fitted"  # body-guided checkpoints: BODY_SOURCES
    # A checkpoint without body input for the views no body can be fitted to, as `pifuhd reconstruct`
    # does (the product's path); None: such views are failed rows.
    fallback: str | None = None
    reconstruction: ReconstructionConfig = field(default_factory=lambda: ReconstructionConfig(color="none"))

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        if self.baseline not in (None, *BASELINES):
            raise ValueError(f"baseline must be one of {BASELINES}, not {self.baseline!r}")
        if self.bodies not in BODY_SOURCES:
            raise ValueError(f"bodies must be one of {BODY_SOURCES}, not {self.bodies!r}")


@dataclass
class EvalResult:
    """What `run_evaluation` returns: the results table (pandas), its summary and locations."""

    mode: str
    results_uri: str
    summary: dict
    table: object  # pandas.DataFrame of RESULT_SCHEMA

    def line(self) -> str:
        return format_summary(self.summary)


# ---- what to compare -----------------------------------------------------------------------


# ---- one pair ------------------------------------------------------------------------------


def load_mesh(uri: str):
    """A mesh file (any trimesh format, local or URI) as one trimesh.Trimesh, unprocessed."""
    import trimesh

    fs, path = storage.filesystem(uri)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as exc:
        raise MissingPrediction(f"{uri}: no such file") from exc
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    # Materials may reference files beside the mesh that we do not read: geometry only.
    options = {"skip_materials": True} if suffix == "obj" else {}
    try:
        mesh = trimesh.load(io.BytesIO(data), file_type=suffix, force="mesh", process=False, **options)
    except Exception as exc:  # trimesh's loaders raise many types on a corrupt file
        raise BrokenMesh(f"{uri}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(mesh, trimesh.Trimesh):
        raise BrokenMesh(f"{uri}: no triangle mesh inside")
    return mesh


def _rotation_angle_deg(transform: np.ndarray) -> float:
    cosine = (np.trace(transform[:3, :3]) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def comparison_png(pred_images: np.ndarray, true_images: np.ndarray, panel: int = 128) -> bytes:
    """PNG of the normal renders: truth views in the top row, prediction views below.

    pred_images, true_images: (V, S, S, 3) float in [0, 1]; each view shrunk to `panel` px.
    """
    from PIL import Image

    def row(images: np.ndarray) -> np.ndarray:
        tiles = [np.asarray(Image.fromarray((im * 255).round().astype(np.uint8)).resize((panel, panel), Image.BILINEAR)) for im in images]
        return np.concatenate(tiles, axis=1)

    buffer = io.BytesIO()
    Image.fromarray(np.concatenate([row(true_images), row(pred_images)], axis=0)).save(buffer, format="PNG")
    return buffer.getvalue()


def pair_metrics(predicted, truth, num_samples: int = 10_000, icp: bool = False, normal_image_size: int = 512,
                 seed: int = 0) -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
    """All metrics of one prediction against its truth, both trimesh meshes in cm.

    Returns (metrics, normal renders): metrics has METRICS plus normal_image_error_views and
    icp_* fields; the renders are (predicted, truth) (V, S, S, 3) images, or None when
    normal_image_size is 0. The prediction is moved by ICP first when `icp`.
    """
    from model.evaluation.metrics import normal_image_error, rigid_icp, surface_metrics

    if len(predicted.faces) == 0:
        raise EmptyPrediction("the prediction has no triangles")
    result: dict = {"icp": icp, "icp_rotation_deg": None, "icp_translation_cm": None, "icp_rms_cm": None}
    if icp:
        transform, rms = rigid_icp(predicted, truth, seed=seed)
        predicted = predicted.copy()
        predicted.apply_transform(transform)
        result.update(icp_rotation_deg=_rotation_angle_deg(transform),
                      icp_translation_cm=float(np.linalg.norm(transform[:3, 3])), icp_rms_cm=rms)
    surface = surface_metrics(predicted, truth, num_samples=num_samples, scale=1.0, fscore_thresholds=(1.0, 2.0), seed=seed)
    result.update(
        chamfer_cm=surface["chamfer"], p2s_cm=surface["p2s"], s2p_cm=surface["s2p"],
        normal_consistency=surface["normal_consistency"], roughness_ratio=surface["roughness_ratio"], fscore_1cm=surface["fscore_1"], fscore_2cm=surface["fscore_2"],
        normal_image_error=None, normal_image_error_views=None,
        depth_ratio=depth_extent(predicted, seed) / depth_extent(truth, seed),
    )
    renders = None
    if normal_image_size:
        try:
            total, per_view, pred_images, true_images = normal_image_error(predicted, truth, size=normal_image_size)
        except Exception as exc:  # noqa: BLE001 - no GL on this node: keep the geometric metrics
            log.warning("normal-image error skipped: %s: %s", type(exc).__name__, exc)
            result["note"] = f"normal-image error skipped: {type(exc).__name__}: {exc}"
        else:
            result.update(normal_image_error=total, normal_image_error_views=per_view)
            renders = (pred_images, true_images)
    return result, renders


def depth_extent(mesh, seed: int = 0, samples: int = 10_000) -> float:
    """Extent of a mesh along z, 2nd to 98th percentile of area-uniform surface samples (its unit)."""
    z = mesh.sample(samples, seed=seed)[:, 2] if len(mesh.faces) else np.zeros(1)
    low, high = np.percentile(z, [2, 98])
    return float(high - low)


def scaled_mesh(mesh, factor: float):
    """`mesh` with its coordinates times `factor` (a copy; the mesh itself when the factor is 1)."""
    if factor != 1.0:
        mesh = mesh.copy()
        mesh.apply_scale(factor)
    return mesh


class PairWorker:
    """Ray Data actor (or a plain object in process): evaluates one item at a time.

    Holds the network in checkpoint mode, and the renderer (one EGL context per process).
    """

    def __init__(self, config: EvalConfig, checkpoint: str | None = None, checkpoint_id: str = "", threads: int = 1,
                 use_gpu: bool = False, fallback_id: str = ""):
        from model.render import configure_llvmpipe_threads

        # One CPU per actor: keep Mesa's rasteriser and torch to the CPUs Ray reserved.
        configure_llvmpipe_threads(threads)
        import torch

        torch.set_num_threads(threads)
        self.config = config
        self.checkpoint_id, self.fallback_id = checkpoint_id, fallback_id
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.net = None if checkpoint is None else self._load(checkpoint)
        self.fallback = None  # loaded when a view first needs it

    def _load(self, checkpoint: str):
        from model.network.checkpoint import load_checkpoint
        from pipelines.common.checkpoints import fetch_checkpoint

        return load_checkpoint(fetch_checkpoint(checkpoint)).eval().to(self.device)

    def __call__(self, batch: dict) -> dict:
        results = [json.dumps(self.evaluate(json.loads(item)), default=_json_default) for item in batch["item"]]
        return {"result": np.array(results, dtype=object)}

    def evaluate(self, item: dict) -> dict:
        """One item -> one result row (a dict of RESULT_SCHEMA fields); never raises."""
        start = time.perf_counter()
        row = _row_skeleton(item, self.config, self.checkpoint_id)
        try:
            if item["kind"] == "view":
                predicted, truth = self._reconstruct_view(item, row)
            else:
                predicted = scaled_mesh(load_mesh(item["pred_uri"]), self.config.scale)
                try:
                    truth = scaled_mesh(load_mesh(item["gt_uri"]), self.config.scale)
                except MissingPrediction as exc:
                    raise MissingGroundTruth(str(exc)) from exc
            row.update(pred_vertices=len(predicted.vertices), pred_faces=len(predicted.faces), gt_faces=len(truth.faces))
            metrics, renders = pair_metrics(predicted, truth, self.config.num_samples, self.config.icp,
                                            self.config.normal_image_size, self.config.seed)
            note = metrics.pop("note", None)
            row.update(metrics)
            if renders is not None:
                uri = storage.join(self.config.out, "comparisons", f"{_safe(item['key'])}.png")
                storage.write_bytes_atomic(uri, comparison_png(*renders))
                row["comparison_uri"] = uri
            row.update(status="ok", error_class=None, error_message=note)
        except Exception as exc:  # noqa: BLE001 - a bad pair is a failed row, never a dead job
            _fail(row, exc)
        row["seconds"] = time.perf_counter() - start
        return row

    def _reconstruct_view(self, item: dict, row: dict):
        """Reconstruct a stored dataset view; (prediction, truth) in the view frame, cm."""
        from model.reconstruction.reconstruct import reconstruct
        from model.reconstruction.preview import preview_image

        view, truth, prepared = stored_view(item, self.net.config.coarse_size, self.net.config.fine_size)
        reconstruction = dataclasses.replace(self.config.reconstruction, color="none")
        if item.get("method", "model") == "model":
            net = self.net
            if net.config.body_guided:
                try:
                    prepared = dataclasses.replace(prepared, body=self._view_body(view, item, row, prepared))
                except InputError:
                    if self.config.fallback is None:
                        raise
                    # As `pifuhd reconstruct`: no body, so the plain model makes this mesh.
                    if self.fallback is None:
                        self.fallback = self._load(self.config.fallback)
                    net = self.fallback
                    row.update(checkpoint_id=self.fallback_id, body_source="none")
            result = reconstruct(net, prepared, reconstruction)
        else:
            result = baseline_reconstruction(prepared, reconstruction)
        predicted = scaled_mesh(result.mesh_world, 1.0 / view["units_per_cm"])
        stem = storage.join(self.config.out, "predictions", _safe(item["key"]))
        buffer = io.BytesIO()
        preview_image(prepared, result).save(buffer, format="PNG")
        storage.write_bytes_atomic(f"{stem}_preview.png", buffer.getvalue())
        storage.write_bytes_atomic(f"{stem}.ply", predicted.export(file_type="ply"))
        row.update(pred_uri=f"{stem}.ply", preview_uri=f"{stem}_preview.png")
        return predicted, truth


    def _view_body(self, view: dict, item: dict, row: dict, prepared):
        row["body_source"] = self.config.bodies
        body, row["body_mask_iou"] = view_body(view, item, prepared, self.config.bodies, gate=self.config.fallback is not None)
        return body


def stored_view(item: dict, coarse_size: int, fine_size: int):
    """(the stored view of a checkpoint-mode item (`read_view`), its subject's GT mesh in the view
    frame in cm, the view prepared as `pifuhd reconstruct` prepares a photo)."""
    view = read_view(item["shard"], item["row"])
    try:
        truth = load_mesh(item["gt_uri"])
    except MissingPrediction as exc:
        raise MissingGroundTruth(str(exc)) from exc
    truth.apply_transform(view["view_from_canonical"])
    truth = scaled_mesh(truth, 1.0 / view["units_per_cm"])
    return view, truth, prepared_view(view["image"], view["mask"], coarse_size, fine_size, item["key"])


def view_body(view: dict, item: dict, prepared, bodies: str = "fitted", gate: bool = False):
    """(the body a body-guided model reads for a stored view, (vertices, faces) in its frame, and the
    fit's mask IoU or None): fitted to the view's image as `pifuhd reconstruct` does, or the true one.
    gate: a low-quality fit raises LowQualityFit (an InputError), as reconstruct's quality gate drops it."""
    if bodies == "true":
        body = load_mesh(item["gt_uri"].removesuffix(".ply") + "_body.ply")
        body.apply_transform(view["view_from_canonical"])
        return (np.asarray(body.vertices), np.asarray(body.faces)), None
    from model.body.fit import LowQualityFit
    from model.reconstruction.body_guidance import with_fitted_body
    from model.geometry import Crop
    from pipelines.common.person import person_finder

    size = view["image"].shape[-1]
    people = person_finder().find(view["rgb"])
    if not people:
        raise InputError(f"{item['key']}: no person found to fit a body to")
    # The stored view is the network's square: the crop of the whole S x S image.
    whole = dataclasses.replace(prepared, crop=Crop.whole_square(size))
    fitted, fit = with_fitted_body(whole, people[0].landmarks, people[0].world_landmarks, view["mask"][0] > 0.5, name=item["key"])
    if fit.low_quality and gate:  # as reconstruct's quality gate: the fallback meshes this view
        raise LowQualityFit(f"{item['key']}: {fit.quality_note}")
    return fitted.body, fit.mask_iou


def baseline_reconstruction(prepared, reconstruction):
    """The silhouette slab of a prepared view through the same extraction and frames as the network's."""
    from model.evaluation.baselines import silhouette_slab
    from model.reconstruction.reconstruct import SurfaceSamples, finish
    from model.reconstruction.surface import evaluate_grid

    occupancy = silhouette_slab(prepared.mask[0].numpy())
    grid = evaluate_grid(occupancy, resolution=reconstruction.resolution, method=reconstruction.method,
                         batch_points=reconstruction.batch_points)
    return finish(SurfaceSamples(grid=grid, normal_front=None, normal_back=None, stats={}), prepared, reconstruction)


def read_view(shard: str, row: int) -> dict:
    """One stored view of a dataset shard, only what evaluation needs (not the labelled points).

    Returns image (3, S, S) float32 in [-1, 1] and mask (1, S, S) float32 in [0, 1] at the
    largest stored size S, rgb (S, S, 3) uint8 (the stored pixels, for the person finder),
    view_from_canonical (4, 4) float64, units_per_cm (float).
    """
    from pipelines.common import dataset as fmt

    columns = ["image_512", "image_1024", "mask_512", "mask_1024", "view_from_canonical", "units_per_cm"]
    record = storage.read_parquet(shard, columns=columns).slice(row, 1).to_pylist()[0]
    size = 1024 if record["image_1024"] is not None else 512
    # The same decoding as pipelines.common.dataset.decode_table (what training and validation see).
    rgb = np.ascontiguousarray(fmt.decode_png(record[f"image_{size}"])[..., :3])
    image = rgb.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    mask = fmt.decode_png(record[f"mask_{size}"]).astype(np.float32)[None] / 255
    return {"image": image, "mask": mask, "rgb": rgb, "units_per_cm": float(record["units_per_cm"]),
            "view_from_canonical": np.asarray(record["view_from_canonical"], dtype=np.float64).reshape(4, 4)}


def prepared_view(image: np.ndarray, mask: np.ndarray, coarse_size: int, fine_size: int, name: str):
    """A `PreparedImage` of a stored view: image (3, S, S) in [-1, 1], mask (1, S, S) in [0, 1].

    The stored image is already the square crop that defines the network frame, so the crop
    is the identity on an S x S image (S = fine_size): mesh_world is in the view frame. The
    person is cut out over grey through the mask, as every inference input is (model/reconstruction/preprocess.py).
    """
    import torch

    from model.image.boxes import Box
    from model.geometry import Crop
    from model.reconstruction.preprocess import PreparedImage, resize_square

    mask = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
    image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None] * mask
    return PreparedImage(
        name=name,
        images={size: resize_square(image, size)[0] for size in (coarse_size, fine_size)},
        mask=resize_square(mask, fine_size)[0].clamp(0, 1),
        crop=Crop.whole_square(fine_size),
        rgb=np.zeros((0, 0, 3), np.float32),
        person_box=Box(0, 0, fine_size, fine_size),
        box_source="mask",
        mask_source="mask",
    )


def _row_skeleton(item: dict, config: EvalConfig, checkpoint_id: str) -> dict:
    row = {k: item.get(k) for k in ("key", "subject_id", "view", "pred_uri", "gt_uri", "preview_uri")}
    method = item.get("method", "model")
    row.update(method=method, icp=config.icp, num_samples=config.num_samples,
               checkpoint_id=checkpoint_id if method == "model" else None)
    return row


def _fail(row: dict, exc: BaseException) -> dict:
    row.update(status="failed", error_class=type(exc).__name__, error_message=str(exc)[:2000])
    return row


def driver_failure_row(item: dict, config: EvalConfig) -> dict:
    """The result row of an item that failed before any work (missing prediction, failed manifest row)."""
    return _fail(_row_skeleton(item, config, ""), _named_error(item["error_class"], item["error_message"])) | {"seconds": 0.0}


def _named_error(name: str, message: str) -> Exception:
    """An exception whose type name is `name` (a failure found on the driver, kept by class)."""
    known = {c.__name__: c for c in (MissingPrediction, EmptyPrediction, MissingGroundTruth, BrokenMesh)}
    return known.get(name, type(name, (Exception,), {}))(message)


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "item"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---- summary -------------------------------------------------------------------------------


def format_summary(summary: dict) -> str:
    """The summary as a plain-text table; each baseline's mean and median beside the model's."""
    baselines = summary.get("baselines") or {}
    lines = [f"{summary['pairs']} pairs: {summary['ok']} ok, {summary['failed']} failed"]
    if "protocol" in summary:
        lines[0] += f"  ({summary['protocol']})"
    header = f"{'metric':<22}{'mean':>10}{'median':>10}{'n':>6}"
    for name in baselines:
        header += f"{name + ' mean':>18}{'median':>10}"
    lines.append(header)
    fmt = (lambda v: f"{v:10.4f}" if v is not None else f"{'-':>10}")  # noqa: E731
    for metric, m in summary["metrics"].items():
        line = f"{metric:<22}{fmt(m['mean'])}{fmt(m['median'])}{m['count']:>6}"
        for base in baselines.values():
            b = base["metrics"][metric]
            line += f"{'':>8}{fmt(b['mean'])}{fmt(b['median'])}"
        lines.append(line)
    for name in baselines:
        verdict = beats_baseline(summary, name)
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in verdict["ratios"].items() if v is not None)
        lines.append(f"model / {name} baseline: {ratios}: "
                     + ("beats the baseline" if verdict["beats"] else f"does NOT beat the {name} baseline"))
    if summary["failures"]:
        lines.append("failures: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["failures"].items())))
    return "\n".join(lines)


def protocol_line(config: EvalConfig) -> str:
    nie = f"normal image {config.normal_image_size}px x4 yaws" if config.normal_image_size else "no normal image"
    return (f"PIFuHD protocol: {config.num_samples} samples, P2S prediction->GT, cm, {nie}, "
            f"ICP {'on' if config.icp else 'off'}")


# ---- driver --------------------------------------------------------------------------------


def _results_on_ray(items: list[dict], config: EvalConfig, checkpoint: str | None, checkpoint_id: str, fallback_id: str):
    import ray

    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    # Reconstruction wants the GPUs when the cluster has them; metrics and rendering run anywhere.
    use_gpu = checkpoint is not None and resources.get("GPU", 0) > 0
    slots = int(resources["GPU"]) if use_gpu else cpus
    workers = max(1, min(config.workers or slots, slots, len(items)))
    dataset = ray.data.from_items([{"item": json.dumps(i)} for i in items], override_num_blocks=max(1, min(len(items), 256)))
    dataset = dataset.map_batches(
        PairWorker,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
        num_cpus=1,
        num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs={"config": config, "checkpoint": checkpoint, "checkpoint_id": checkpoint_id, "use_gpu": use_gpu,
                               "fallback_id": fallback_id},
    )
    for row in dataset.iter_rows():
        yield json.loads(row["result"])


def _results_in_process(items: list[dict], config: EvalConfig, checkpoint: str | None, checkpoint_id: str, fallback_id: str):
    import torch

    worker = PairWorker(config, checkpoint, checkpoint_id, threads=torch.get_num_threads(), fallback_id=fallback_id)
    for item in items:
        yield worker.evaluate(item)


def run_evaluation(config: EvalConfig, in_process: bool = False, progress: bool = True) -> EvalResult:
    """Run one evaluation to completion; Ray must be initialised unless `in_process`."""
    from tqdm import tqdm

    mode = detect_mode(config.pred)
    checkpoint, checkpoint_id, fallback_id = None, "", ""
    if mode == "checkpoint":
        from model.network.checkpoint import read_checkpoint
        from pipelines.common.checkpoints import checkpoint_identity, default_checkpoint, fallback_identity, fetch_checkpoint

        try:
            checkpoint = default_checkpoint() if config.pred in (None, "shipped") else config.pred
        except Exception as exc:
            raise FileNotFoundError(f"no --pred given and this installation ships no checkpoint ({exc})") from exc
        local = fetch_checkpoint(checkpoint)
        _, network, metadata = read_checkpoint(local, tensors=False)  # a bad checkpoint stops the job before any work
        checkpoint_id, _ = checkpoint_identity(local, metadata)
        if config.fallback is not None and network.body_guided:
            fallback_id = fallback_identity(config.fallback, (network.coarse_size, network.fine_size))
        if not is_dataset(config.gt):
            raise FileNotFoundError(f"--gt {config.gt}: checkpoint mode needs a dataset (pifuhd data synth|scans output)")
        items, unmatched = checkpoint_items(config.gt, config.split), 0
    else:
        truth = ground_truth_meshes(config.gt, config.split)
        if not truth:
            raise FileNotFoundError(f"--gt {config.gt}: no ground-truth meshes ({', '.join(MESH_SUFFIXES)})")
        items, unmatched = (manifest_items if mode == "manifest" else folder_items)(config.pred, truth)
    if config.limit is not None:
        items = items[: config.limit]
    if config.baseline:
        if mode != "checkpoint":
            raise ValueError(f"--baseline needs a dataset to reconstruct (checkpoint mode), not {mode} mode")
        items = items + [{**i, "key": f"{i['key']}-{config.baseline}", "method": config.baseline} for i in items if i["kind"] == "view"]
    if unmatched:
        log.warning("%d predictions have no ground truth and are not evaluated", unmatched)

    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    # Failures known on the driver need no worker (and no network loaded for them).
    rows = [driver_failure_row(i, config) for i in items if i["kind"] == "failed"]
    todo = [i for i in items if i["kind"] != "failed"]
    if todo:
        results = (_results_in_process if in_process else _results_on_ray)(todo, config, checkpoint, checkpoint_id, fallback_id)
        with tqdm(total=len(todo), desc="evaluate", unit="pair", disable=not progress) as bar:
            for row in results:
                rows.append(row)
                bar.update(1)
    now = datetime.now(timezone.utc)
    for row in rows:
        row.update(run_id=run_id, mode=mode, finished_at=now)
    rows.sort(key=lambda r: r["key"])
    results_uri, table = write_results(rows, config.out)
    summary = summarize(table) | {"mode": mode, "protocol": protocol_line(config), "unmatched_predictions": unmatched,
                                  "run_id": run_id, "config": asdict(config), "checkpoint_id": checkpoint_id,
                                  "fallback_id": fallback_id or None}
    storage.write_bytes_atomic(storage.join(config.out, "summary.json"),
                                  json.dumps(summary, indent=2, default=_json_default).encode())
    return EvalResult(mode=mode, results_uri=results_uri, summary=summary, table=table)


# ---- command line --------------------------------------------------------------------------


RECONSTRUCTION = "reconstruction."  # where the nested ReconstructionConfig's options land in the parsed arguments


def _config(args: argparse.Namespace) -> EvalConfig:
    fields = config_values(args, EvalConfig)
    fields["fallback"] = default_fallback(args.pred, args.fallback)  # as reconstruct
    reconstruction = build_config(ReconstructionConfig, color="none", **config_values(args, ReconstructionConfig, RECONSTRUCTION))
    return build_config(EvalConfig, **fields, reconstruction=reconstruction)


def _run(args: argparse.Namespace) -> int:
    from model.errors import PifuhdError
    from pipelines.common.ray_runtime import connect_ray

    config = _config(args)
    try:
        if not args.in_process:
            connect_ray(args.address)
        result = run_evaluation(config, in_process=args.in_process, progress=not args.quiet)
    except (FileNotFoundError, ValueError, PifuhdError) as exc:
        print(f"pifuhd evaluate: error: {exc}", file=sys.stderr)
        return exit_codes.USAGE if isinstance(exc, ValueError) else exit_codes.UNUSABLE
    print(f"mode: {result.mode}; results: {result.results_uri}")
    print(result.line())
    if result.summary["unmatched_predictions"]:
        print(f"{result.summary['unmatched_predictions']} predictions without a ground truth were not evaluated")
    return exit_codes.INPUTS_FAILED if args.fail_on_error and result.summary["failed"] else exit_codes.OK


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add `evaluate` to an argparse subparsers object (pipelines/cli.py)."""
    parser = subparsers.add_parser(
        "evaluate",
        help="Chamfer, P2S, normal and F-score metrics against ground-truth meshes (Ray Data)",
        description="Evaluate reconstructions against ground truth with the PIFuHD protocol (cm; see "
        "pipelines/jobs/evaluate.py). --pred CHECKPOINT with --gt DATASET reconstructs every view of the --split "
        "subjects (default: the test split); --pred MESH_DIR or a bulk output folder with --gt MESH_DIR (or a "
        "dataset) pairs meshes by file-name stem. Writes OUT/results.parquet and OUT/summary.json.",
    )
    config_option(parser, "--pred", EvalConfig, "pred", type=uri_argument, help="checkpoint (.safetensors/.pt, local or "
                  "s3://; default: the shipped model), a folder of meshes, or a `pifuhd reconstruct` output folder")
    config_option(parser, "--gt", EvalConfig, "gt", required=True, type=uri_argument,
                  help="dataset URI (pifuhd data output) or a folder of meshes")
    config_option(parser, "--output", EvalConfig, "out", aliases=("-o",), required=True, type=uri_argument,
                  help="output folder or s3:// prefix")
    config_option(parser, "--split", EvalConfig, "split", help="dataset split to evaluate: test, val, train or all")
    config_option(parser, "--icp", EvalConfig, "icp", help="align each prediction to its truth by rigid ICP first")
    config_option(parser, "--num-samples", EvalConfig, "num_samples", help="surface samples per mesh")
    config_option(parser, "--resolution", ReconstructionConfig, "resolution", prefix=RECONSTRUCTION,
                  help="checkpoint mode: grid cells per axis (32 x 2^k)")
    config_option(parser, "--scale", EvalConfig, "scale", help="mesh folders: multiply coordinates by this to get cm")
    config_option(parser, "--normal-image-size", EvalConfig, "normal_image_size", help="normal-image render size; 0 skips it")
    config_option(parser, "--seed", EvalConfig, "seed", help="surface sampling seed")
    config_option(parser, "--limit", EvalConfig, "limit", metavar="N", help="evaluate only the first N pairs")
    config_option(parser, "--baseline", EvalConfig, "baseline", choices=BASELINES, help="checkpoint mode: also score "
                  "this baseline on the same views and print it beside the model (silhouette: a slab inflated from the mask)")
    config_option(parser, "--bodies", EvalConfig, "bodies", choices=BODY_SOURCES,
                  help="body-guided checkpoints: fit a body to each view's image, or read the subject's true body (an upper bound)")
    config_option(parser, "--no-carve", ReconstructionConfig, "carve", prefix=RECONSTRUCTION,
                  help="checkpoint mode: let the model's surface leave the view's mask (by default points outside it "
                  "are outside the mesh, as in reconstruct)")
    config_option(parser, "--surface-level", ReconstructionConfig, "threshold", prefix=RECONSTRUCTION,
                  help="checkpoint mode: occupancy level of the surface (default: the checkpoint's calibrated level, "
                  "0.5 when it names none)")
    config_option(parser, "--smooth", ReconstructionConfig, "smooth_iterations", prefix=RECONSTRUCTION,
                  help="checkpoint mode: Taubin smoothing steps on each mesh, as reconstruct --smooth")
    config_option(parser, "--fallback-checkpoint", EvalConfig, "fallback", type=uri_argument, help="checkpoint mode: a "
                  "model without body input for views no body can be fitted to, as reconstruct (default: the shipped "
                  "plain twin without --pred, else none)")
    config_option(parser, "--workers", EvalConfig, "workers", help="evaluation actors (default: one per CPU)")
    config_option(parser, "--address", EvalConfig, "address", help="Ray cluster address (default: a private local instance)")
    parser.add_argument("--in-process", action="store_true", help="evaluate in this process, without Ray")
    parser.add_argument("--fail-on-error", action="store_true", help="exit 3 if any pair failed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_run, config=_config)
    return parser
