"""The `pifuhd` command.

Each subcommand parses its arguments here and calls one function of `model`
or `pipelines`; heavy imports (torch, Ray) happen inside the handlers so that
`pifuhd --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys


def _checkpoint_inspect(args: argparse.Namespace) -> int:
    from model.checkpoint import preset_name, read_checkpoint

    import torch

    from model.pifuhd import PIFuHD

    state, config, metadata = read_checkpoint(args.path)
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
    from model.checkpoint import load_checkpoint, preset_name, save_checkpoint

    net = load_checkpoint(args.input)
    source = net.checkpoint_metadata
    metadata = {
        "preset": preset_name(net.config),
        "converted_from": {"file": str(args.input), "format": source.get("format")},
        "source_options": source.get("options", {}),
    }
    out = save_checkpoint(net, args.output, metadata=metadata)
    print(f"wrote {out} ({sum(p.numel() for p in net.parameters()):,} parameters)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pifuhd", description="PIFuHD: single-image 3D human reconstruction and training on Ray."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    checkpoint = commands.add_parser("checkpoint", help="inspect or convert model checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    inspect = checkpoint_commands.add_parser("inspect", help="print the inferred config and parameter counts")
    inspect.add_argument("path", help="pifuhd.pt (released) or a project .safetensors checkpoint")
    inspect.set_defaults(handler=_checkpoint_inspect)
    convert = checkpoint_commands.add_parser("convert", help="write a checkpoint in the project format")
    convert.add_argument("input", help="pifuhd.pt (released) or any readable checkpoint")
    convert.add_argument("output", help="output .safetensors path")
    convert.set_defaults(handler=_checkpoint_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    from model.errors import PifuhdError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PifuhdError as exc:
        print(f"pifuhd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
