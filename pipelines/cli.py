"""The `pifuhd` command.

Each subcommand parses its arguments here and calls one function of `model`
or `pipelines`; heavy imports (torch, Ray) happen inside the handlers so that
`pifuhd --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from importlib.metadata import entry_points

from model.network.config import PRESETS  # plain dataclasses: `pifuhd --help` loads no torch
from pipelines.common import exit_codes
from pipelines.common.exit_codes import UsageError, build_config
from pipelines.common.options import config_option, config_values
from pipelines.common.uris import uri_argument


PRESET_NAMES = tuple(PRESETS)
RECONSTRUCTION, PERSON = "reconstruction.", "person."  # where nested configs' options land in the parsed arguments
COMMAND_ENTRY_POINTS = "pifuhd.commands"  # each: a function that adds its sub-commands to the parser's


def _checkpoint_inspect(args: argparse.Namespace) -> int:
    from model.network.checkpoint import preset_name, read_checkpoint

    import torch

    from model.network.pifuhd import PIFuHD

    state, config, metadata = read_checkpoint(args.path, tensors=False)
    with torch.device("meta"):
        counts = PIFuHD(config).parameter_counts()
    report = {
        "path": str(args.path),
        "format": metadata.get("format"),
        "preset": preset_name(config),
        "parameters": sum(counts.values()),
        "parameters_per_part": counts,
        "state_dict_keys": len(state),
        "config": config.to_dict(),
        "metadata": {k: v for k, v in metadata.items() if k != "format"},
    }
    print(json.dumps(report, indent=2, default=str))
    return 0


def _checkpoint_convert(args: argparse.Namespace) -> int:
    import torch

    from model.network.checkpoint import FORMAT, load_checkpoint, preset_name, save_checkpoint
    from pipelines.common.checkpoints import fetch_checkpoint
    from pipelines.common.uris import redact

    if args.max_shard_mib is not None and not args.max_shard_mib > 0:
        raise UsageError(f"--max-shard-mib must be positive, not {args.max_shard_mib}")
    net = load_checkpoint(fetch_checkpoint(args.input))
    source = net.checkpoint_metadata
    if source.get("format") == FORMAT:  # another dtype or shards of the same model: its record stays
        metadata = {k: v for k, v in source.items() if k not in ("format", "format_version")}
    else:
        metadata = {
            "preset": preset_name(net.config),
            "converted_from": {"file": redact(str(args.input)), "format": source.get("format")},
            "source_options": source.get("options", {}),
        }
    shard_bytes = None if args.max_shard_mib is None else int(args.max_shard_mib * 2**20)
    out = save_checkpoint(net, args.output, metadata=metadata, dtype=torch.float16 if args.half else torch.float32,
                          max_shard_bytes=shard_bytes)
    print(f"wrote {out} ({sum(p.numel() for p in net.parameters()):,} parameters)")
    return 0


def _reconstruct_config(args: argparse.Namespace):
    from model.reconstruction.config import PersonOptions, ReconstructionConfig
    from pipelines.common.checkpoints import default_checkpoint, default_fallback
    from pipelines.jobs.bulk_config import BulkConfig

    fields = config_values(args, BulkConfig)
    fields["checkpoint"] = args.checkpoint or default_checkpoint()
    fields["fallback_checkpoint"] = default_fallback(args.checkpoint, args.fallback_checkpoint)
    return build_config(
        BulkConfig,
        **fields,
        reconstruction=build_config(ReconstructionConfig, **config_values(args, ReconstructionConfig, RECONSTRUCTION)),
        person=build_config(PersonOptions, **config_values(args, PersonOptions, PERSON)),
    )


def _reconstruct(args: argparse.Namespace) -> int:
    from pipelines.jobs.bulk import run_bulk
    from pipelines.common.ray_runtime import connect_ray

    config = _reconstruct_config(args)
    # --in-process, --on-ray, or (neither, and no --address) by the job's size.
    in_process = True if args.in_process else False if args.on_ray or args.address else None
    summary = run_bulk(config, in_process=in_process, progress=not args.quiet, connect=lambda: connect_ray(args.address))
    return summary.print_report(args.fail_on_error)


def _train_config(args: argparse.Namespace):
    from pipelines.jobs.train_config import TrainConfig

    return build_config(TrainConfig, **config_values(args, TrainConfig))


def _train(args: argparse.Namespace) -> int:
    from pipelines.common.ray_runtime import connect_ray
    from pipelines.jobs.train import describe, run_training

    config = _train_config(args)
    connect_ray(args.address, log_to_driver=True)
    print(describe(run_training(config)))
    return 0


def _checkpoint_package(args: argparse.Namespace) -> int:
    from pipelines.jobs.train import package_model

    print(f"wrote {package_model(args.runs, args.output, recipe=args.recipe, half=not args.float32, continued_from=args.continued_from)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pifuhd", description="PIFuHD: single-image 3D human reconstruction and training on Ray."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show INFO logs, Ray's logs and Ray Data's own progress bars (default: warnings only)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    checkpoint = commands.add_parser("checkpoint", help="inspect, convert, package or calibrate model checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    inspect = checkpoint_commands.add_parser("inspect", help="print the inferred config and parameter counts")
    inspect.add_argument("path", help="pifuhd.pt (released), a project .safetensors checkpoint or a sharded checkpoint folder")
    inspect.set_defaults(handler=_checkpoint_inspect)
    convert = checkpoint_commands.add_parser("convert", help="write a checkpoint in the project format")
    convert.add_argument("input", type=uri_argument, help="pifuhd.pt (released) or any readable checkpoint")
    convert.add_argument("output", help="output .safetensors path (with --max-shard-mib: a folder)")
    convert.add_argument("--half", action="store_true", help="store float16 weights (half the size; loads as float32)")
    convert.add_argument("--max-shard-mib", type=float, metavar="MIB",
                         help="write a folder of shards of at most MIB MiB of weights each and their index "
                              "(model.safetensors.index.json); every command reads the folder as a checkpoint")
    convert.set_defaults(handler=_checkpoint_convert)
    package = checkpoint_commands.add_parser("package", help="ship a trained model with every stage's history")
    package.add_argument("runs", nargs="+", metavar="RUN", help="training run folders (OUT/NAME) in stage order")
    package.add_argument("-o", "--output", required=True, type=uri_argument, help="output .safetensors path or URI")
    package.add_argument("--recipe", default="", help="how the model was made (recorded in its metadata)")
    package.add_argument("--float32", action="store_true", help="keep float32 weights (default float16)")
    package.add_argument("--continued-from", help="the packaged model the runs continued: keeps its untrained stages' records")
    package.set_defaults(handler=_checkpoint_package)
    from pipelines.jobs.calibrate import register_cli as register_calibrate

    register_calibrate(checkpoint_commands)

    _add_reconstruct(commands)
    _add_train(commands)

    from pipelines.jobs.data import register_cli as register_data
    from pipelines.jobs.evaluate import register_cli as register_evaluate
    from pipelines.jobs.fit import register_cli as register_fit
    from pipelines.jobs.lifter import register_cli as register_lifter
    from pipelines.jobs.report import register_cli as register_report

    register_data(commands)
    register_evaluate(commands)
    register_fit(commands)
    register_lifter(commands)
    register_report(commands)
    # Commands other packages add (this project's cluster/: submit, jobs, metrics), found through
    # the "pifuhd.commands" entry points of pyproject.toml, so that pipelines/ never imports them.
    for entry in sorted(entry_points(group=COMMAND_ENTRY_POINTS), key=lambda e: e.name):
        entry.load()(commands)
    _show_defaults(parser)
    return parser


def _add_reconstruct(commands) -> None:
    from model.reconstruction.config import (COLOR_MODES, MESH_FORMATS, METHODS, PERSON_MODES, PRECISIONS, PersonOptions,
                                             ReconstructionConfig)
    from pipelines.jobs.bulk_config import BulkConfig

    recon = commands.add_parser(
        "reconstruct",
        help="images -> meshes, previews and a Parquet manifest (Ray Data)",
        description="Reconstruct every input image. INPUT: an image, a folder or s3:// prefix (recursive), a glob, "
        "a .txt list of URIs or a .parquet table with a 'uri' column. Beside an image NAME.EXT, optional "
        "NAME_mask.png, NAME_rect.txt ('x y w h') or NAME_keypoints.json (OpenPose) give the person box; "
        "RGBA images use their alpha. Without a mask or alpha the shipped person finder cuts the person out "
        "(--person auto); its mask and landmarks are written beside each mesh (NAME_person.png, NAME_person.json).",
    )
    job, mesh, person = BulkConfig, ReconstructionConfig, PersonOptions
    recon.add_argument("inputs", nargs="+", metavar="INPUT")
    config_option(recon, "--output", job, "output", aliases=("-o",), required=True, type=uri_argument,
                  help="output folder or s3:// prefix")
    config_option(recon, "--checkpoint", job, "checkpoint", type=uri_argument,
                  help="pifuhd.pt or project checkpoint, local or s3:// (default: the shipped model)")
    config_option(recon, "--resolution", mesh, "resolution", prefix=RECONSTRUCTION, help="grid cells per axis (32 x 2^k)")
    config_option(recon, "--method", mesh, "method", prefix=RECONSTRUCTION, choices=METHODS,
                  help="sparse: query only near the surface, coarse to fine; dense: every grid point (a reference)")
    config_option(recon, "--dilation", mesh, "dilation", prefix=RECONSTRUCTION,
                  help="sparse: also query a ring of K cells around the surface band")
    config_option(recon, "--surface-level", mesh, "threshold", prefix=RECONSTRUCTION,
                  help="occupancy level of the surface (default: the checkpoint's calibrated level, 0.5 when it names none)")
    config_option(recon, "--person", person, "mode", prefix=PERSON, choices=PERSON_MODES,
                  help="auto: a mask or alpha when given, else the person finder (a rect or keypoints still fix the "
                  "crop); sidecar: only the given mask, alpha, rect or keypoints; off: the whole image, as it is")
    config_option(recon, "--all-people", person, "all_people", prefix=PERSON,
                  help="reconstruct every person found (NAME_p0, NAME_p1, ...)")
    config_option(recon, "--min-person-score", person, "min_score", prefix=PERSON,
                  help="people found with a lower detection score do not count")
    config_option(recon, "--fallback-checkpoint", job, "fallback_checkpoint", type=uri_argument,
                  help="for a body-guided --checkpoint: the model (without body inputs) for photos no body can be "
                  "fitted to (default with the shipped model: its plain twin; otherwise such photos fail)")
    config_option(recon, "--body", job, "body", help="also fit the anny body to each person and write NAME_body.FORMAT "
                  "(always on for a body-guided model, which reads it)")
    config_option(recon, "--format", job, "mesh_format", choices=MESH_FORMATS, help="mesh file format")
    config_option(recon, "--precision", mesh, "precision", prefix=RECONSTRUCTION, choices=PRECISIONS,
                  help="network arithmetic; auto: bf16 where the CPU (avx512_bf16, AMX) or GPU has it natively "
                  "(~2x faster, the mesh moves < 0.1 voxel), else fp32")
    config_option(recon, "--color", mesh, "color", prefix=RECONSTRUCTION, choices=COLOR_MODES, help="vertex colours")
    config_option(recon, "--keep-all-components", mesh, "largest_component", prefix=RECONSTRUCTION,
                  help="keep every connected component")
    config_option(recon, "--no-carve", mesh, "carve", prefix=RECONSTRUCTION, help="let the surface leave the person "
                  "mask (by default, with a mask, points outside it are outside the mesh and never queried)")
    config_option(recon, "--smooth", mesh, "smooth_iterations", prefix=RECONSTRUCTION,
                  help="Taubin smoothing steps on the mesh (no shrinkage; default: the checkpoint's, 0 when it names none); "
                  "0 keeps the surface as the network gives it")
    config_option(recon, "--overwrite", job, "overwrite", help="redo inputs already reconstructed with this checkpoint")
    recon.add_argument("--fail-on-error", action="store_true", help="exit 3 if any input failed")
    config_option(recon, "--batch-size", job, "batch_size", help="images per model call")
    config_option(recon, "--model-actors", job, "model_actors", help="model actors (one network each)")
    config_option(recon, "--prepare-actors", job, "prepare_actors", help="CPU prepare actors (one person finder each)")
    config_option(recon, "--finish-actors", job, "finish_actors", help="CPU actors that mesh, colour and write")
    # use_gpu: None (GPUs where the cluster has them) unless asked for.
    recon.add_argument("--gpus", dest="use_gpu", action="store_const", const=True, help="require GPU model actors")
    recon.add_argument("--address", help="Ray cluster address (default: a private local instance)")
    where = recon.add_mutually_exclusive_group()
    where.add_argument("--in-process", action="store_true", help="run the same stages in this process, without Ray "
                       "(default for a job of at most 4 inputs without --address: Ray's start-up costs it more)")
    where.add_argument("--on-ray", action="store_true", help="run on Ray whatever the job's size (a private local "
                       "instance without --address)")
    config_option(recon, "--metrics-port", job, "metrics_port", help="serve Prometheus metrics on 127.0.0.1:PORT during the run")
    config_option(recon, "--pushgateway", job, "pushgateway", help="push metrics to this Pushgateway (host:port) at the end")
    recon.add_argument("--quiet", action="store_true", help="no progress bar")
    recon.set_defaults(handler=_reconstruct, config=_reconstruct_config)


def _add_train(commands) -> None:
    from model.training.config import STAGES
    from pipelines.jobs.train_config import OPTIMIZERS, TrainConfig

    train = commands.add_parser("train", help="train one stage (normal, coarse, fine) with Ray Train")
    run = TrainConfig
    config_option(train, "--stage", run, "stage", required=True, choices=STAGES,
                  help="what to train: the normal nets, the coarse level, or the fine level on a trained coarse one")
    config_option(train, "--data", run, "data", required=True, type=uri_argument,
                  help="dataset URI (pifuhd data synth/scans output)")
    config_option(train, "--out", run, "out", aliases=("-o", "--output"), required=True, type=uri_argument,
                  help="storage root, local or s3://; the run lives in OUT/NAME")
    config_option(train, "--name", run, "name", help="run name (default PRESET-STAGE); the same name again resumes")
    config_option(train, "--preset", run, "preset", choices=PRESET_NAMES, help="model size")
    config_option(train, "--init", run, "init", type=uri_argument,
                  help="checkpoint to start from (the previous stage's model.safetensors)")
    config_option(train, "--workers", run, "workers", help="DDP workers")
    config_option(train, "--cpus-per-worker", run, "cpus_per_worker",
                  help="CPUs Ray reserves per worker; below 1 leaves some for the tasks reading the data")
    config_option(train, "--threads", run, "threads_per_worker",
                  help="torch threads per worker (default: one per CPU Ray reserves)")
    config_option(train, "--gpus", run, "use_gpu", help="one GPU per worker (NCCL, bf16 autocast)")
    config_option(train, "--parallel-decode", run, "parallel_decode",
                  help="decode samples in Ray Data tasks on the other CPUs, not in the worker (for GPU workers)")
    config_option(train, "--steps", run, "steps", help="optimiser steps")
    config_option(train, "--batch-size", run, "batch_size", help="samples per worker per step")
    config_option(train, "--points", run, "points_per_sample", help="query points per sample per step")
    config_option(train, "--optimizer", run, "optimizer", choices=OPTIMIZERS, help="optimiser (PIFuHD used RMSprop)")
    config_option(train, "--lr", run, "lr", help="learning rate")
    config_option(train, "--lr-decay-steps", run, "lr_decay_steps", help="multiply the learning rate by 0.1 at these steps")
    config_option(train, "--checkpoint-every", run, "checkpoint_every",
                  help="steps between checkpoints (a resume starts from the last)")
    config_option(train, "--validate-every", run, "validate_every", help="steps between validation meshes and metrics")
    config_option(train, "--val-resolution", run, "val_resolution", help="grid resolution of validation meshes")
    config_option(train, "--predicted-normals", run, "use_predicted_normals",
                  help="coarse and fine stages: train on predicted normal maps")
    config_option(train, "--grey-composite", run, "grey_composite",
                  help="share of samples cut out over grey through a disturbed mask, as at inference")
    config_option(train, "--z-size", run, "z_size", help="depth-feature scale z_size of the model (default: the "
                  "preset's or --init's; on --init the network's function is kept)")
    config_option(train, "--body-guided", run, "body_guided",
                  help="coarse and fine stages: the body-guided variant (the MLP also reads the distance to "
                  "and normal of a body fitted to the photo; trained on the data's true bodies, disturbed)")
    config_option(train, "--vgg-weights", run, "vgg_weights", help="normal stage: VGG19 weights file enabling the perceptual loss")
    config_option(train, "--seed", run, "seed", help="fixes initial weights, data order and point draws")
    config_option(train, "--max-failures", run, "max_failures", help="worker-group restarts from the last checkpoint")
    config_option(train, "--pushgateway", run, "pushgateway", help="push training metrics to this Pushgateway (host:port)")
    train.add_argument("--address", help="Ray cluster address (default: a private local instance)")
    train.set_defaults(handler=_train, config=_train_config)

class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, where there is one to show and the text does not
    already say it (the default itself lives once: in the option, which tests hold to the config)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default not in (None, False, "", (), argparse.SUPPRESS) and "default" not in text
                and "%(default)" not in text):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
            text += f" (default: {shown})"
        return text


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pifuhd-ray")
    except PackageNotFoundError:
        return "unknown (not installed)"


def configure_console(verbose: bool) -> None:
    """Logging once for the whole command: diagnostics on stderr (results go to stdout)."""
    import logging
    import os

    from pipelines.common.ray_runtime import VERBOSE_ENV

    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _terminate(signum, frame) -> None:
    # One stop is enough: a second SIGTERM (a supervisor repeating itself, or Ray tearing down its
    # processes) must not cut the unwinding short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(exit_codes.TERMINATED)


def main(argv: list[str] | None = None) -> int:
    from model.errors import PifuhdError
    from pipelines.common.uris import redact

    args = build_parser().parse_args(argv)
    configure_console(args.verbose)
    # A scheduler stops a job with SIGTERM: unwind as Ctrl-C does, so the rows received so far are
    # written (the jobs' `finally`) and the private Ray instance and its agents are shut down (atexit).
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.handler(args)
    except UsageError as exc:
        print(f"pifuhd {args.command}: error: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    except PifuhdError as exc:
        print(f"pifuhd: error: {redact(str(exc))}", file=sys.stderr)
        return exit_codes.UNUSABLE
    except KeyboardInterrupt:  # Ctrl-C: the jobs' `finally` blocks have written what they had
        print("pifuhd: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED
    except ConnectionError as exc:  # ray.init could not reach --address
        print(f"pifuhd: cluster unreachable: {redact(str(exc))}", file=sys.stderr)
        return exit_codes.CLUSTER
    except Exception:  # noqa: BLE001 - an unexpected failure still shows no secret
        print(redact(traceback.format_exc()), end="", file=sys.stderr)
        return exit_codes.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
