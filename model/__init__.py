"""PIFuHD networks and geometry, and everything else that needs no Ray (person finding, body fitting,
synthetic data, metrics).

Public API:
    load_checkpoint(path) -> PIFuHD          released pifuhd.pt or project safetensors
    save_checkpoint(net, path, metadata)      project format
    PIFuHD.from_config(config)                a fresh network
    preset(name) -> PIFuHDConfig             "full", "small", "tiny"
    extract_surface(occupancy_fn, resolution, bbox=..., method="sparse") -> (mesh, stats)
Coordinate conventions: model.geometry.

The configs and errors import at once; the names that need torch load on first use, so that
`import model.errors` (every job module's first import) stays light.
"""

import importlib

from model.config import HourglassConfig, MLPConfig, NormalNetConfig, PIFuHDConfig, preset
from model.errors import CheckpointError, InputError, PifuhdError

_LAZY = {
    "load_checkpoint": "model.checkpoint",
    "read_checkpoint": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "Features": "model.pifuhd",
    "Occupancy": "model.pifuhd",
    "PIFuHD": "model.pifuhd",
    "extract_surface": "model.surface",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:  # a submodule, as `import model; model.geometry` found it when everything loaded eagerly
        return importlib.import_module(f"model.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"model.{name}":
            raise
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "Features",
    "HourglassConfig",
    "InputError",
    "MLPConfig",
    "NormalNetConfig",
    "Occupancy",
    "PIFuHD",
    "PIFuHDConfig",
    "PifuhdError",
    "extract_surface",
    "load_checkpoint",
    "preset",
    "read_checkpoint",
    "save_checkpoint",
]
