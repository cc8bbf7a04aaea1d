"""Test data made on the fly: small networks, images, checkpoints."""

from __future__ import annotations

import functools
import io
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


@functools.lru_cache(maxsize=2)
def busy_photograph(size: int) -> np.ndarray:
    """(size, size, 3) float32 in 0-255: scikit-image's "coffee", a busy background."""
    from skimage import data

    return np.asarray(Image.fromarray(data.coffee()).resize((size, size)), np.float32)


def backdrop_photos(subject, yaw: float, size: int) -> dict[str, bytes]:
    """A synthetic subject (`model.data.humans.make_subject`) rendered at `yaw` degrees, size pixels,
    over grey (PNG), over a photograph (JPEG) and as RGBA whose alpha is the person (PNG)."""
    from model.render import View, get_renderer, studio_lighting

    render = get_renderer(size).render(subject.parts, View(yaw_deg=yaw), studio_lighting())
    alpha = render.mask.astype(np.float32)[..., None] / 255
    person = render.rgb.astype(np.float32)
    photos = {}
    for name, background, fmt in (("grey", np.full_like(person, 128), "PNG"), ("photo", busy_photograph(size), "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray((person * alpha + background * (1 - alpha)).round().astype(np.uint8)).save(buffer, fmt, quality=92)
        photos[name] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([render.rgb, render.mask]).astype(np.uint8), "RGBA").save(buffer, "PNG")
    photos["rgba"] = buffer.getvalue()
    return photos


def prepare_and_fit(photo: bytes, finder, fit, name: str = "photo", max_pixels: int = 100_000_000):
    """The prepare stage of `pifuhd reconstruct --body` on one encoded photo (decode, person finder,
    crop, body fit; `pipelines.jobs.bulk_stages.InputPreparer`'s steps) with this `finder`: its
    `model.body.fit.BodyFit`."""
    from model.image.decode import decode_image, open_image
    from model.reconstruction.body_guidance import with_fitted_body
    from model.reconstruction.config import PersonOptions
    from model.reconstruction.people import prepare_people
    from pipelines.common.person import find_person

    decoded = decode_image(open_image(photo, name, max_pixels))
    found = prepare_people(decoded, finder, PersonOptions(), name=name, sizes=(512, 1024))[0]
    person = found.person
    if person is None:  # an alpha channel: the landmarks as `pifuhd fit` finds them
        person, _ = find_person(photo, {}, name, max_pixels, finder)
    return with_fitted_body(found.prepared, person.landmarks, person.world_landmarks, person.mask, fit, name)[1]


def body_distance_cm(a: np.ndarray, b: np.ndarray, faces: np.ndarray, pixels_per_cm: float) -> float:
    """Symmetric mean surface distance (cm) between two bodies (pixel frame, same faces), depth-aligned
    (an orthographic photo fixes no depth): the Chamfer distance of `model.evaluation.metrics.surface_metrics`."""
    import trimesh

    from model.evaluation.metrics import surface_metrics

    b = b + [0.0, 0.0, a[:, 2].mean() - b[:, 2].mean()]
    one, two = (trimesh.Trimesh(v, faces, process=False) for v in (a, b))
    return surface_metrics(one, two, num_samples=5000, scale=1 / pixels_per_cm)["chamfer"]
