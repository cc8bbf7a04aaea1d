"""`pifuhd checkpoint calibrate`: the occupancy level a trained model's surface is extracted at.

A model trained with PIFuHD's weighted BCE (`model.training.losses`, inside points weighted by the
share lambda of outside points) does not put the surface at occupancy 0.5: where the truth is
even odds the optimum output is lambda, so with more outside than inside points its 0.5 level lies
outside the person and every mesh is too fat. The right level belongs to the weights, so it ships
in the checkpoint (metadata `surface_level`) and every reconstruction reads it
(`model.reconstruction.reconstruct.surface_level`; the released pifuhd.pt names none: 0.5).

Each of the first `limit` views of a dataset split (validation by default: the test split reports
quality and never chooses it) is prepared and, for a body-guided model, its body fitted once, as
`pifuhd evaluate` does, then meshed at every candidate level; the level with the lowest mean
Chamfer distance wins. In this process, no Ray: about 6 s per view for the fit and 1-2 s per level
at resolution 128 on one core.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from model.reconstruction.config import check_sparse_resolution
from pipelines.common.exit_codes import build_config
from pipelines.common.options import config_option, config_values
from pipelines.common.uris import check_uri, uri_argument

DEFAULT_LEVELS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)


@dataclass(frozen=True)
class CalibrationConfig:
    """One calibration: which checkpoint, on which views, which levels; where the result goes."""

    checkpoint: str
    data: str  # a dataset URI (`pifuhd data synth|scans` output)
    output: str  # the calibrated checkpoint (.safetensors, local or s3://)
    split: str = "val"
    limit: int = 24  # views, the first by key
    levels: tuple[float, ...] = DEFAULT_LEVELS
    resolution: int = 128
    num_samples: int = 10_000

    def __post_init__(self) -> None:
        for uri in (self.checkpoint, self.data, self.output):
            check_uri(uri)
        if self.split in ("test", "all"):
            raise ValueError(f"split {self.split!r}: calibrating on test views would tune on the views that report "
                             "quality; use val (or train)")
        if self.limit < 1:
            raise ValueError(f"limit must be at least 1 view, got {self.limit}")
        if not self.levels or not all(0 < level < 1 for level in self.levels):
            raise ValueError(f"levels must be one or more values strictly between 0 and 1, got {self.levels}")
        check_sparse_resolution(self.resolution)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")


def calibrate(config: CalibrationConfig, log=print) -> dict:
    """Score every level on the views; write the checkpoint with the best one. Returns the record
    stored in its metadata under `surface_level_calibration` (per level: mean Chamfer, P2S, S2P in cm)."""
    import torch

    from model.network.checkpoint import load_checkpoint, with_metadata
    from model.reconstruction.reconstruct import ReconstructionConfig, reconstruct
    from pipelines.common import storage
    from pipelines.common.checkpoints import fetch_checkpoint
    from pipelines.jobs.evaluate import pair_metrics, scaled_mesh, stored_view, view_body
    from pipelines.jobs.evaluation_pairs import checkpoint_items

    local = fetch_checkpoint(config.checkpoint)
    net = load_checkpoint(local).eval().to("cuda" if torch.cuda.is_available() else "cpu")
    items = checkpoint_items(config.data, config.split)[: config.limit]
    scores: dict[float, list[tuple[float, float, float]]] = {level: [] for level in config.levels}
    skipped, start = [], time.perf_counter()
    for item in items:
        view, truth, prepared = stored_view(item, net.config.coarse_size, net.config.fine_size)
        if net.config.body_guided:
            try:
                prepared = dataclasses.replace(prepared, body=view_body(view, item, prepared)[0])
            except Exception as exc:  # noqa: BLE001 - a view no body fits is left out, and said so
                skipped.append(f"{item['key']}: {exc}")
                continue
        for level in config.levels:
            result = reconstruct(net, prepared, ReconstructionConfig(resolution=config.resolution, color="none", threshold=level))
            if not len(result.mesh_world.faces):
                scores[level].append((np.inf, np.inf, np.inf))
                continue
            metrics, _ = pair_metrics(scaled_mesh(result.mesh_world, 1.0 / view["units_per_cm"]), truth,
                                      config.num_samples, normal_image_size=0)
            scores[level].append((metrics["chamfer_cm"], metrics["p2s_cm"], metrics["s2p_cm"]))
        log(f"{item['key']}: " + " ".join(f"{level:g}:{scores[level][-1][0]:.2f}" for level in config.levels))
    if not any(scores.values()):
        raise ValueError(f"{config.data}: none of the {len(items)} {config.split} views could be scored ({'; '.join(skipped[:3])})")
    table = {f"{level:g}": dict(zip(("chamfer_cm", "p2s_cm", "s2p_cm"), np.mean(values, axis=0).round(4).tolist()))
             for level, values in scores.items()}
    best = min(config.levels, key=lambda level: table[f"{level:g}"]["chamfer_cm"])
    record = {"surface_level": best, "split": config.split, "views": len(next(iter(scores.values()))),
              "skipped": skipped, "resolution": config.resolution, "criterion": "lowest mean Chamfer", "levels": table,
              "seconds": round(time.perf_counter() - start, 1)}
    storage.write_bytes_atomic(config.output, with_metadata(local, {"surface_level": best, "surface_level_calibration": record}))
    return record


def _config(args) -> CalibrationConfig:
    return build_config(CalibrationConfig, **config_values(args, CalibrationConfig))


def _run(args) -> int:
    config = _config(args)
    record = calibrate(config)
    for level, row in record["levels"].items():
        mark = "  <- chosen" if float(level) == record["surface_level"] else ""
        print(f"level {level:>5}: Chamfer {row['chamfer_cm']:.3f}  P2S {row['p2s_cm']:.3f}  S2P {row['s2p_cm']:.3f} cm{mark}")
    print(f"surface level {record['surface_level']:g} on {record['views']} {config.split} views -> wrote {config.output}")
    return 0


def register_cli(checkpoint_commands) -> None:
    """Add `pifuhd checkpoint calibrate`."""
    parser = checkpoint_commands.add_parser(
        "calibrate", help="choose the occupancy level of the surface on validation views and store it in the checkpoint",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    parser.add_argument("checkpoint", type=uri_argument, help="a project .safetensors checkpoint, local or s3://")
    config_option(parser, "--data", CalibrationConfig, "data", required=True, type=uri_argument,
                  help="dataset URI (pifuhd data output)")
    config_option(parser, "--output", CalibrationConfig, "output", aliases=("-o",), required=True, type=uri_argument,
                  help="the calibrated checkpoint to write")
    config_option(parser, "--split", CalibrationConfig, "split", help="the views to calibrate on (never test)")
    config_option(parser, "--limit", CalibrationConfig, "limit", help="views, the first by key")
    config_option(parser, "--levels", CalibrationConfig, "levels", nargs="+", help="candidate levels")
    config_option(parser, "--resolution", CalibrationConfig, "resolution", help="grid cells per axis (32 x 2^k)")
    config_option(parser, "--num-samples", CalibrationConfig, "num_samples", help="surface samples per mesh")
    parser.set_defaults(handler=_run, config=_config)
