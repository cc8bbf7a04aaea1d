"""PIFuHD networks and geometry: pure PyTorch, no Ray.

Public API:
    load_checkpoint(path) -> PIFuHD          released pifuhd.pt or project safetensors
    save_checkpoint(net, path, metadata)      project format
    PIFuHD.from_config(config)                a fresh network
    preset(name) -> PIFuHDConfig             "full", "small", "tiny"
Coordinate conventions: model.geometry.
"""

from model.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from model.config import HourglassConfig, MLPConfig, NormalNetConfig, PIFuHDConfig, preset
from model.errors import CheckpointError, InputError, PifuhdError
from model.pifuhd import Features, Occupancy, PIFuHD

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
    "load_checkpoint",
    "preset",
    "read_checkpoint",
    "save_checkpoint",
]
