"""Test data made on the fly: small networks, images, checkpoints."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import model
from model.network.checkpoint import save_checkpoint


def tiny_network(seed: int = 0) -> model.PIFuHD:
    """The `tiny` preset with MLP weights spread wide enough that its occupancy crosses 0.5
    (default init keeps a random MLP's output near 0.5 everywhere, leaving no surface)."""
    torch.manual_seed(seed)
    net = model.PIFuHD.from_config(model.preset("tiny"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mlp, gain in ((net.netG.mlp, 2.25), (net.mlp, 1.75)):
            for layer in mlp.filters:
                fan_in = layer.weight.shape[1]
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * gain / fan_in**0.5)
    return net.eval()


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    return save_checkpoint(tiny_network(seed), path, metadata={"preset": "tiny", "note": "random test weights"})


def write_lying_checkpoint(path: Path, honest: Path) -> Path:
    """`honest`'s tensors under a header whose config claims 100,000 coarse stacks (a hostile file)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(honest, framework="pt") as handle:
        header, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    config = json.loads(header["config"])
    config["coarse_filter"]["num_stacks"] = 100_000
    save_file(tensors, path, metadata={**header, "config": json.dumps(config)})
    return path


def person_image(path: Path, size=(300, 450), mode: str = "RGBA") -> Path:
    """A drawn person-like figure; RGBA (alpha = mask) or RGB on a grey background."""
    width, height = size
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    cx = width // 2
    draw.ellipse((cx - 25, 20, cx + 25, 80), fill=(220, 180, 150, 255))
    draw.rounded_rectangle((cx - 45, 85, cx + 45, 240), radius=20, fill=(60, 110, 170, 255))
    draw.rounded_rectangle((cx - 75, 90, cx - 48, 220), radius=12, fill=(60, 110, 170, 255))
    draw.rounded_rectangle((cx + 48, 90, cx + 75, 220), radius=12, fill=(60, 110, 170, 255))
    draw.rounded_rectangle((cx - 40, 235, cx - 4, 420), radius=14, fill=(50, 50, 60, 255))
    draw.rounded_rectangle((cx + 4, 235, cx + 40, 420), radius=14, fill=(50, 50, 60, 255))
    if mode == "RGB":
        background = Image.new("RGBA", size, (128, 128, 128, 255))
        image = Image.alpha_composite(background, image).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def alpha_box(path: Path) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel box of an RGBA image's alpha."""
    alpha = np.asarray(Image.open(path))[..., 3]
    rows, cols = np.nonzero(alpha)
    return cols.min(), rows.min(), cols.max() + 1, rows.max() + 1


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (our temp dir): stragglers of our head only."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids
