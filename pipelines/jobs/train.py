"""Distributed training of the three PIFuHD stages with Ray Train.

    normal  front/back normal nets: L1 + gradient (or VGG) loss against rendered normal maps
    coarse  coarse hourglass + MLP on [image, ground-truth (or predicted) normals]; every stack
            supervised with the weighted BCE of the paper
    fine    fine hourglass + MLP on random windows of the fine image, coarse level frozen and
            feeding its phi at the same points

Each stage is a small `nn.Module` whose forward returns the loss, so DDP (gloo on CPU, NCCL
on GPU) wraps exactly the trainable part. Data streams to every worker from the dataset's
Parquet shards through Ray Data. Checkpoints (weights in the project format, optimiser state,
step) go to the run folder `OUT/NAME/` on a local path or s3://; re-submitting the same name
resumes from the latest one, and `FailureConfig` restarts failed workers from it. Validation
on held-out subjects (point IoU, Chamfer / P2S in cm, normal consistency) is reported to Ray,
appended to `OUT/NAME/metrics/*.parquet` and pushed to Prometheus.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import re
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import model
from model.errors import PifuhdError
from model.network.checkpoint import load_checkpoint, save_checkpoint
from model.body.field import BODY_DISTANCE_CLIP_CM, BodyField
from model.network.pifuhd import PIFuHD
from model.training.augment import MaskNoise
from model.training.losses import VGG19Features
from model.training.stages import (STAGES, TRAINED_PARTS, CoarseStage, FineStage, NormalStage, body_inputs,
                                   freeze_for, stage_inputs)
from pipelines.common.formats import read_training_metrics, write_training_metrics
from pipelines.common.storage import filesystem, is_remote, join, pyarrow_filesystem, write_bytes_atomic
from pipelines.common.uris import redact
from pipelines.jobs.train_config import TrainConfig

log = logging.getLogger(__name__)

EXACT_CUTOUT = MaskNoise(probability=1.0, max_grow_px=0, max_blur_px=0)


def build_stage(net: PIFuHD, config: TrainConfig) -> nn.Module:
    """The stage's loss module (model.training.stages); everything outside it is frozen."""
    noise = MaskNoise(probability=config.grey_composite)
    if config.stage == "normal":
        vgg = VGG19Features.from_file(config.vgg_weights) if config.vgg_weights else None
        stage = NormalStage(net, vgg, noise)
    elif config.stage == "coarse":
        stage = CoarseStage(net, config.points_per_sample, config.use_predicted_normals, noise, config.body_noise)
    else:
        stage = FineStage(net, config.points_per_sample, config.use_predicted_normals, noise, config.body_noise)
    freeze_for(net, config.stage)
    return stage


def initial_network(config: TrainConfig) -> PIFuHD:
    if config.init:
        from pipelines.common.checkpoints import fetch_checkpoint

        net = load_checkpoint(fetch_checkpoint(config.init))
        if net.config != model.preset(config.preset):
            log.info("init checkpoint config differs from preset %s: using the checkpoint's", config.preset)
        net = net if config.z_size is None else net.with_z_size(config.z_size)
        return net.with_body_guidance() if config.body_guided else net
    torch.manual_seed(config.seed)
    net_config = model.preset(config.preset)
    if config.z_size is not None:
        net_config = dataclasses.replace(net_config, z_size=config.z_size)
    if config.body_guided:
        net_config = net_config.with_body_channels()
    return PIFuHD.from_config(net_config)


# ---- validation ----------------------------------------------------------------------------


def validate(net: PIFuHD, config: TrainConfig, samples: list[dict], meshes: dict, bodies: dict) -> dict:
    """Validation metrics on held-out samples: point IoU, and mesh metrics in cm for occupancy stages.
    A body-guided model reads the subjects' true bodies (`bodies`: canonical meshes), undisturbed."""
    from model.evaluation.metrics import point_iou, surface_metrics
    from model.reconstruction.surface import extract_surface

    net.eval()
    results: dict[str, list[float]] = {}
    device = next(net.parameters()).device
    with torch.inference_mode():
        for sample in samples:
            batch = {k: v[None].to(device) for k, v in sample.items() if isinstance(v, torch.Tensor)}
            # Cut out over grey through the true mask, as inference does.
            inputs = stage_inputs(batch, net.config, EXACT_CUTOUT, None)
            if config.stage == "normal":
                front, back = net.predict_normals(inputs["coarse"])
                error = (F.l1_loss(front, inputs["normals"][0]) + F.l1_loss(back, inputs["normals"][1])).item() / 2
                results.setdefault("normal_l1", []).append(error)
                continue
            normals = net.predict_normals(inputs["coarse"]) if config.use_predicted_normals else inputs["normals"]
            features = net.encode(inputs["coarse"], inputs["fine"], normals=normals)
            level = "coarse" if config.stage == "coarse" else "fine"
            units_per_cm = float(sample["units_per_cm"])
            view_from_canonical = sample["view_from_canonical"].numpy().astype(np.float64)
            body = body_inputs(batch, batch, net, None, None)
            probabilities = net.query(features, batch["points"], batch["calib"], level=level, body=body)
            results.setdefault("point_iou", []).append(point_iou(probabilities, batch["labels"]))
            mesh_gt, field = meshes.get(sample["subject_id"]), None
            if net.config.body_guided:
                canonical_body = bodies.get(sample["subject_id"])
                if canonical_body is None:
                    continue
                view_body = canonical_body.copy().apply_transform(view_from_canonical)
                field = BodyField((view_body.vertices, view_body.faces), BODY_DISTANCE_CLIP_CM * units_per_cm)
            if mesh_gt is None:
                continue
            predicted, _ = extract_surface(
                lambda p: net.query(features, p.to(device).T[None], batch["calib"], level=level,
                                    body=None if field is None else field.network_input(p.to(device)))[0].float().cpu(),
                resolution=config.val_resolution,
                largest_component=True,
            )
            truth = mesh_gt.copy()
            truth.apply_transform(view_from_canonical)
            for key, value in surface_metrics(predicted, truth, num_samples=10_000, scale=1 / units_per_cm).items():
                results.setdefault(f"{key}_cm" if key in ("chamfer", "p2s", "s2p") else key, []).append(value)
    net.train()
    return {f"val_{k}": float(np.mean(v)) for k, v in results.items()}


def _load_validation(config: TrainConfig) -> tuple[list[dict], dict, dict]:
    """A few decoded val samples (as tensors), their subjects' ground-truth meshes and, where
    stored, their bodies (canonical frame)."""
    import trimesh

    from pipelines.common.dataset import iter_batches, to_body_frame

    if config.val_samples <= 0:
        return [], {}, {}
    decoded = next(iter_batches(config.data, "val", config.val_samples), None)
    if decoded is None:
        return [], {}, {}
    if config.body_guided:
        decoded = to_body_frame(decoded, config.data)
    batch = to_tensors(decoded, torch.device("cpu"))
    samples = [{k: v[i] for k, v in batch.items()} | {"subject_id": str(subject)}
               for i, subject in enumerate(decoded["subject_id"])]
    meshes, bodies = {}, {}
    for subject in {s["subject_id"] for s in samples}:
        for found, name in ((meshes, subject), (bodies, f"{subject}_body")):
            fs, path = filesystem(join(config.data, "meshes", f"{name}.ply"))
            try:
                with fs.open(path, "rb") as handle:
                    found[subject] = trimesh.load(handle, file_type="ply", force="mesh", process=False)
            except FileNotFoundError:
                pass
    return samples, meshes, bodies


# ---- the worker loop -------------------------------------------------------------------------


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.RMSprop(params, lr=config.lr, momentum=0, weight_decay=0)


def _learning_rate(config: TrainConfig, step: int) -> float:
    return config.lr * 0.1 ** sum(step >= s for s in config.lr_decay_steps)


def _save(directory: str, net: PIFuHD, optimizer: torch.optim.Optimizer, step: int, config: TrainConfig, metrics: dict) -> None:
    metadata = {
        "preset": config.preset,
        "stage": config.stage,
        "steps": step,
        "training_data": redact(config.data),
        "train_config": {k: redact(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(config).items() if k != "pushgateway"},
        "metrics": metrics,
    }
    save_checkpoint(net, os.path.join(directory, "model.safetensors"), metadata=metadata)
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, os.path.join(directory, "training_state.pt"))


class NonFiniteLoss(PifuhdError):
    """Training met a NaN or Inf loss (bad data, or a learning rate that diverges); it stops before the weights do."""


def _sample_names(decoded: dict) -> list[str]:
    """SUBJECT-viewN of each sample in a decoded batch (the view where the data has it)."""
    views = decoded.get("view", [None] * len(decoded["subject_id"]))
    return [f"{subject}-view{view}" if view is not None else str(subject) for subject, view in zip(decoded["subject_id"], views)]


def decode_rows(table, data: str, body_frame: bool) -> dict:
    """Raw shard rows -> a decoded batch (pipelines.common.dataset.decode_table), in each body's depth
    frame for a body-guided model."""
    from pipelines.common.dataset import decode_table, to_body_frame

    decoded = decode_table(table)
    return to_body_frame(decoded, data) if body_frame else decoded


def to_tensors(decoded: dict, device: torch.device) -> dict:
    """The numeric fields of a decoded batch as tensors on `device` (ids and split names dropped)."""
    # Arrow's zero-copy arrays are read-only; np.require copies only those (and non-contiguous ones).
    return {k: torch.from_numpy(np.require(v, requirements=("C", "W"))).to(device) for k, v in decoded.items() if v.dtype != object}


def _load_training_state(directory: str, net: PIFuHD, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Weights and optimiser state from a checkpoint folder (both read before either is applied); its step."""
    state = load_checkpoint(os.path.join(directory, "model.safetensors")).state_dict()
    training_state = torch.load(os.path.join(directory, "training_state.pt"), map_location=device, weights_only=True)
    step = int(training_state["step"])
    net.load_state_dict(state)
    optimizer.load_state_dict(training_state["optimizer"])
    return step


def _resume(net: PIFuHD, optimizer: torch.optim.Optimizer, device: torch.device, config: TrainConfig, latest) -> int:
    """The step this run continues from: Ray Train's latest checkpoint, or, when that one does not
    load (a torn upload, damaged weights), the newest older one of the run folder that does; 0 with none."""
    if latest is None:
        return 0
    with latest.as_directory() as directory:
        try:
            return _load_training_state(directory, net, optimizer, device)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, an older one may do
            failed = os.path.basename(latest.path.rstrip("/"))
            log.warning("checkpoint %s does not load (%s: %s); trying older ones", failed, type(exc).__name__, redact(str(exc))[:300])
    fs, run = filesystem(join(config.out, config.run_name))
    # Ray Train names them checkpoint_<timestamp>: name order is age order.
    older = sorted((p for p in fs.ls(run, detail=False) if re.fullmatch(r"checkpoint_\d.*", posixpath.basename(p.rstrip("/")))
                    and posixpath.basename(p.rstrip("/")) < failed), reverse=True)
    for path in older:
        with tempfile.TemporaryDirectory() as directory:
            try:
                for name in ("model.safetensors", "training_state.pt"):
                    fs.get_file(posixpath.join(path, name), os.path.join(directory, name))
                step = _load_training_state(directory, net, optimizer, device)
            except Exception as exc:  # noqa: BLE001
                log.warning("checkpoint %s does not load either (%s)", posixpath.basename(path), type(exc).__name__)
                continue
        log.warning("resuming from %s (step %d)", posixpath.basename(path), step)
        return step
    log.warning("no checkpoint of run %s loads: training starts again from step 0", config.run_name)
    return 0


def train_loop_per_worker(config_dict: dict) -> None:
    """Ray Train worker: one process per `workers`, DDP across them."""
    import ray.train
    import ray.train.torch

    from pipelines.common.telemetry import TrainMetrics

    config = TrainConfig.from_dict(config_dict)
    if config.threads_per_worker:
        torch.set_num_threads(config.threads_per_worker)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)

    net = initial_network(config)
    stage_module = build_stage(net, config)
    net.to(device)
    trainable = [p for p in stage_module.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, config)
    step = resumed_from = _resume(net, optimizer, device, config, ray.train.get_checkpoint())
    stage_ddp = ray.train.torch.prepare_model(stage_module, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": False})

    validation = _load_validation(config) if rank == 0 else ([], {}, {})
    metrics = TrainMetrics(config.run_name) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    shard = ray.train.get_dataset_shard("train")
    started, losses, validation_seconds = time.perf_counter(), [], 0.0
    while step < config.steps:
        batch_format = "numpy" if config.parallel_decode else "pyarrow"
        # Rows mix across shards in a buffer of raw rows (~1 MB each; 16 when decoded, ~12 MB each),
        # so a shard of one kind (a statue's 24 views) is not a run of batches of its own.
        buffer = 16 if config.parallel_decode else 128
        for rows in shard.iter_batches(batch_size=config.batch_size, batch_format=batch_format, local_shuffle_buffer_size=buffer,
                                       drop_last=True):
            if step >= config.steps:
                break
            decoded = rows if config.parallel_decode else decode_rows(rows, config.data, config.body_guided)
            batch = to_tensors(decoded, device)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            with autocast:
                loss, _ = stage_ddp(batch, generator)
            if not torch.isfinite(loss.detach()):  # before the step: no weight, and so no checkpoint, turns NaN
                raise NonFiniteLoss(f"the loss is {loss.item()} at step {step + 1} on the samples "
                                    f"{_sample_names(decoded)} of {redact(config.data)}: check them for NaN or Inf values")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if rank == 0 and step % config.log_every == 0:
                print(f"[{config.run_name}] step {step}/{config.steps} loss {np.mean(losses[-config.log_every:]):.4f} "
                      f"({(time.perf_counter() - started) / len(losses):.2f} s/step)", flush=True)
            due_validation = step % config.validate_every == 0 or step == config.steps
            due_checkpoint = step % config.checkpoint_every == 0 or step == config.steps
            if not (due_validation or due_checkpoint):
                continue
            # seconds: training time since the loop started, data loading included, validation not.
            report = {"step": step, "loss": float(np.mean(losses[-config.log_every:])), "stage": config.stage,
                      "seconds": time.perf_counter() - started - validation_seconds, "resumed_from": resumed_from}
            if rank == 0 and due_validation and validation[0]:
                validation_start = time.perf_counter()
                report.update(validate(net, config, *validation))
                validation_seconds += time.perf_counter() - validation_start
            if rank == 0:
                write_training_metrics(join(config.out, config.run_name), report)
                metrics.observe(report, config.pushgateway)
            with tempfile.TemporaryDirectory() as directory:
                if rank == 0 and due_checkpoint:
                    _save(directory, net, optimizer, step, config, report)
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))
                else:
                    ray.train.report(report)


# ---- the driver --------------------------------------------------------------------------------


def _storage(config: TrainConfig):
    """(storage_path, storage_filesystem) for RunConfig: the project's filesystem, for pyarrow."""

    if not is_remote(config.out):
        return os.path.abspath(config.out), None
    filesystem, path = pyarrow_filesystem(config.out)
    return path, filesystem


@dataclass
class TrainResult:
    model_uri: str
    steps: int
    metrics: dict = field(default_factory=dict)


def _rows_with_body(table):
    import pyarrow.compute as pc

    return table.filter(pc.is_valid(table["body_sdf"])) if "body_sdf" in table.column_names else table.slice(0, 0)


def _worker_error(exc: BaseException) -> PifuhdError | None:
    """The project error a training worker raised, if that is what failed the run (Ray wraps it)."""
    for error in [exc, *getattr(exc, "worker_failures", {}).values()]:
        while error is not None:
            original = getattr(error, "cause", error)  # a RayTaskError carries the worker's exception
            if isinstance(original, PifuhdError):
                return original
            error = error.__cause__
    return None


def run_training(config: TrainConfig) -> TrainResult:
    """Fit one stage on the connected Ray cluster; writes OUT/NAME/model.safetensors at the end."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.common.dataset import open_shards

    # Raw rows (PNG bytes) travel to the workers, which decode them: a decoded sample is ~12 MB
    # of float32, and moving that through the object store cost more than the training step.
    train_data = open_shards(config.data, "train", seed=config.seed)
    if config.body_guided:  # scans no body could be fitted to have no body input: not for this model
        train_data = train_data.map_batches(_rows_with_body, batch_format="pyarrow")
    if config.parallel_decode:
        train_data = train_data.map_batches(decode_rows, batch_format="pyarrow", batch_size=config.batch_size,
                                            fn_kwargs={"data": config.data, "body_frame": config.body_guided})
    storage_path, storage_filesystem = _storage(config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(config),
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": config.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
        datasets={"train": train_data},
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - a worker's PifuhdError (bad data, a NaN loss) is the user's one line
        cause = _worker_error(exc)
        if cause is None:
            raise
        raise cause from None
    if result.checkpoint is None:
        raise RuntimeError(f"training run {config.run_name} produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        data = open(os.path.join(directory, "model.safetensors"), "rb").read()
        steps = int(torch.load(os.path.join(directory, "training_state.pt"), weights_only=True)["step"])
    model_uri = join(config.out, config.run_name, "model.safetensors")
    write_bytes_atomic(model_uri, data)
    return TrainResult(model_uri=model_uri, steps=steps, metrics=dict(result.metrics or {}))


def describe(result: TrainResult) -> str:
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items() if k.startswith(("val_", "loss"))}
    return f"model: {redact(result.model_uri)} after {result.steps} steps; {json.dumps(shown)}"


def package_model(run_uris: list[str], output: str, recipe: str = "", half: bool = True, continued_from: str | None = None) -> str:
    """One model from the runs of the stages, with every stage's history in its metadata.

    run_uris: run folders (OUT/NAME) in stage order. The last run's model is the base, and each
    run contributes the parts its stage trained (TRAINED_PARTS), so a normal stage trained
    further after the coarse one started still ships its latest weights.
    The metadata lists, per stage, its steps, data, training config and last validation metrics.
    continued_from: the packaged model these runs continued (their first --init); stages none of
    the runs trained keep that model's weights, and its stage records and recipe are kept too.
    """
    from pipelines.common.checkpoints import fetch_checkpoint

    net = load_checkpoint(fetch_checkpoint(join(run_uris[-1], "model.safetensors")))
    stages = []
    for run in run_uris:
        trained = load_checkpoint(fetch_checkpoint(join(run, "model.safetensors")))
        meta = trained.checkpoint_metadata
        for name in TRAINED_PARTS.get(meta.get("stage"), ()):
            net.get_submodule(name).load_state_dict(trained.get_submodule(name).state_dict())
        metrics = read_training_metrics(run)
        validated = metrics.dropna(axis=1, how="all")
        last_val = {k: float(v) for k, v in validated.iloc[-1].items() if str(k).startswith("val_")} if len(validated) else {}
        stages.append({"stage": meta.get("stage"), "steps": meta.get("steps"), "training_data": meta.get("training_data"),
                       "train_config": meta.get("train_config"), "validation": last_val,
                       "history": metrics.to_dict("records")})
    metadata = {"preset": stages[-1]["train_config"]["preset"] if stages[-1]["train_config"] else None,
                "version": time.strftime("%Y.%m.%d"), "recipe": recipe, "stages": stages}
    if continued_from:
        previous = load_checkpoint(fetch_checkpoint(continued_from)).checkpoint_metadata
        trained = {s["stage"] for s in stages}
        kept = [dict(s, from_previous_model=True) for s in previous.get("stages", []) if s.get("stage") not in trained]
        metadata["stages"] = sorted(kept + stages, key=lambda s: STAGES.index(s["stage"]) if s.get("stage") in STAGES else len(STAGES))
        metadata["continued_from"] = {k: previous.get(k) for k in ("version", "recipe", "stages")}
    with tempfile.TemporaryDirectory() as directory:
        path = save_checkpoint(net, os.path.join(directory, "model.safetensors"), metadata=json.loads(json.dumps(metadata, default=str)),
                               dtype=torch.float16 if half else torch.float32)
        write_bytes_atomic(output, path.read_bytes())
    return output
