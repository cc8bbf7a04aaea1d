"""Command-line options derived from the typed configs, so each default and type lives once: in the config.

`config_option(parser, "--steps", TrainConfig, "steps", help=...)` adds an option whose default is the
config field's default, whose type is the field's (int, float, str; a tuple field takes several values),
and whose destination is the field's name (with `prefix` for a nested config). A bool field becomes a
switch that flips its default: `--no-carve` for `carve: bool = True`. `config_values(args, Config)` reads
those options back as the config's keyword arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

_SCALARS = (int, float, str)


def _field(config: type, name: str) -> dataclasses.Field:
    for candidate in dataclasses.fields(config):
        if candidate.name == name:
            return candidate
    raise KeyError(f"{config.__name__} has no field {name!r}")


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None  # a required field: the option says `required=True`


def _scalar_type(annotation) -> type:
    """int, float or str from `int`, `float | None`, `tuple[int, ...]`, ..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple):
        for arg in typing.get_args(annotation):
            if arg in _SCALARS:
                return arg
    if annotation in _SCALARS:
        return annotation
    raise TypeError(f"no command-line type for {annotation!r}")


def config_option(parser, flag: str, config: type, name: str, *, prefix: str = "", help: str,
                  **kwargs) -> argparse.Action:
    """Add `flag` for `config`'s field `name` (see the module docstring); `kwargs` go to argparse
    (choices, metavar, required, extra flag spellings through `aliases`)."""
    field = _field(config, name)
    annotation = typing.get_type_hints(config)[name]
    default = _default(field)
    flags = (flag, *kwargs.pop("aliases", ()))
    if "choices" not in kwargs:
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    if annotation is bool:
        kwargs.pop("metavar", None)
        return parser.add_argument(*flags, dest=prefix + name, action="store_false" if default else "store_true",
                                   help=help, **kwargs)
    if typing.get_origin(annotation) is tuple:
        kwargs.setdefault("nargs", "*")
    return parser.add_argument(*flags, dest=prefix + name, type=kwargs.pop("type", _scalar_type(annotation)),
                               default=default, help=help, **kwargs)


def config_values(args: argparse.Namespace, config: type, prefix: str = "") -> dict:
    """The parsed options of `config_option` for `config` (those present), as its keyword arguments."""
    values = {}
    for field in dataclasses.fields(config):
        if hasattr(args, prefix + field.name):
            value = getattr(args, prefix + field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return values
