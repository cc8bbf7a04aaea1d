"""What a synthetic training view is drawn with: camera yaw and pitch, lighting, backgrounds.

Each function takes the generator's `numpy.random.Generator`, so a dataset is fixed by its seed.
Views and lighting are the renderer's (`model.render`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from model.render import View, sh_basis


def sample_views(rng: np.random.Generator, count: int, pitch_jitter_deg: float = 5.0, fixed_yaws: bool = False) -> list[View]:
    """`count` yaws evenly spread around the subject from a random start, each with a small random pitch.

    With `fixed_yaws` the yaws start at 0 (0, 90, 180, 270 for four views): evaluation sets whose
    views are comparable across subjects and runs; the pitch is still drawn (0 when the jitter is 0).
    """
    start = 0.0 if fixed_yaws else rng.uniform(0, 360)
    return [
        View(yaw_deg=float((start + k * 360.0 / count) % 360), pitch_deg=float(rng.uniform(-pitch_jitter_deg, pitch_jitter_deg)))
        for k in range(count)
    ]


def random_lighting(rng: np.random.Generator) -> np.ndarray:
    """(9, 3) SH radiance coefficients (per RGB channel) of a random ambient plus 1-3 directional lights.

    Lights are in the view frame, mostly from the camera's side and above. Scaled so that a
    white surface facing a light reflects about its intensity (albedo x irradiance / pi).
    """
    ambient = rng.uniform(0.25, 0.6) * rng.uniform(0.9, 1.1, 3)
    coeffs = np.zeros((9, 3))
    coeffs[0] = ambient * np.sqrt(4 * np.pi)  # constant radiance a: irradiance pi * a
    for _ in range(rng.integers(1, 4)):
        d = np.array([rng.normal(), abs(rng.normal()) * 0.8 + 0.2, rng.normal() + 1.0])
        d /= np.linalg.norm(d)
        intensity = np.pi * rng.uniform(0.2, 0.7) * rng.uniform(0.85, 1.15, 3)
        coeffs += sh_basis(d[None])[0][:, None] * intensity[None]
    return coeffs.astype(np.float32)


def procedural_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8: a random gradient, smooth colour noise and a few soft shapes.

    Drawn at a quarter of the size and upscaled: backgrounds are smooth, and this keeps them
    at a few ms (and the PNGs small; per-pixel grain would double the image bytes).
    """
    from PIL import Image, ImageDraw, ImageFilter

    small = max(size // 4, 16)
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.linspace(-1, 1, small)
    g = (np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]) * 0.5 + 0.5
    img = c0 * (1 - g[..., None]) + c1 * g[..., None]
    cells = int(rng.integers(3, 12))
    noise = Image.fromarray((rng.uniform(0, 1, (cells, cells, 3)) * 255).astype(np.uint8)).resize((small, small), Image.BICUBIC)
    mix = rng.uniform(0.1, 0.5)
    img = img * (1 - mix) + np.asarray(noise, dtype=np.float64) / 255 * mix
    base = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).convert("RGBA")
    shapes = Image.new("RGBA", (small, small), (0, 0, 0, 0))
    draw = ImageDraw.Draw(shapes)
    for _ in range(int(rng.integers(0, 7))):
        xs, ys = sorted(rng.uniform(-0.2, 1.2, 2) * small), sorted(rng.uniform(-0.2, 1.2, 2) * small)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3)) + (int(rng.integers(60, 200)),)
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([xs[0], ys[0], xs[1], ys[1]], fill=colour)
    shapes = shapes.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2)))
    out = Image.alpha_composite(base, shapes).convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


@functools.lru_cache(maxsize=4)
def _list_images(folder: str) -> tuple[str, ...]:
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    return tuple(sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in exts))


def image_background(rng: np.random.Generator, size: int, folder: str) -> np.ndarray:
    """(size, size, 3) uint8: a random square crop of a random image of `folder`, resized."""
    from PIL import Image

    files = _list_images(folder)
    if not files:
        raise FileNotFoundError(f"no images under background folder {folder}")
    im = Image.open(files[rng.integers(len(files))]).convert("RGB")
    side = int(min(im.size) * rng.uniform(0.5, 1.0))
    x0, y0 = rng.integers(0, im.size[0] - side + 1), rng.integers(0, im.size[1] - side + 1)
    im = im.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im, dtype=np.uint8)
