"""PIFuHD networks and geometry, and everything else that needs no Ray.

Sub-packages, one concept each:
    network         the PIFuHD networks, their config and checkpoints
    image           photos before the network: decoding, person boxes, the files given beside a photo
    reconstruction  image to mesh: the person policy, input preparation, the fitted body as input,
                    surface extraction, reconstruction, preview
    person          finding the person in a photo (landmarks, mask)
    body            the anny body fitted to a photo or a scan, and its files
    data            training data: synthetic people, scans, rendering, labelled points
    training        the training stages as loss modules, losses, augmentations
    evaluation      geometry metrics and the silhouette baseline
Shared modules: `errors` and `geometry` (coordinate conventions, crop frames).

Public API:
    load_checkpoint(path) -> PIFuHD          released pifuhd.pt or project safetensors
    save_checkpoint(net, path, metadata)      project format
    PIFuHD.from_config(config)                a fresh network; net.predict_normals, net.encode, net.query
    preset(name) -> PIFuHDConfig             "full", "small", "tiny"
    extract_surface(occupancy_fn, resolution, bbox=..., method="sparse") -> (mesh, stats)

The configs and errors import at once; the names that need torch load on first use, so that
`import model.errors` (every job module's first import) stays light.
"""

import importlib

from model.network.config import HourglassConfig, MLPConfig, NormalNetConfig, PIFuHDConfig, preset
from model.errors import CheckpointError, InputError, PifuhdError

_LAZY = {
    "load_checkpoint": "model.network.checkpoint",
    "read_checkpoint": "model.network.checkpoint",
    "save_checkpoint": "model.network.checkpoint",
    "Features": "model.network.pifuhd",
    "Occupancy": "model.network.pifuhd",
    "PIFuHD": "model.network.pifuhd",
    "extract_surface": "model.reconstruction.surface",
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
