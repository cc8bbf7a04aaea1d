"""Training inputs that look like inference inputs.

At inference the person is cut out with a mask that is rarely perfect (a sidecar, an alpha
channel or the person finder's) and composited over grey. Renders come with a perfect mask and
a full background. `grey_composite` closes that gap: the stored image is composited over grey
through the mask, grown or shrunk by a few pixels and blurred, so the network sees the seams,
background slivers and cut-off limbs of real cut-outs. All in torch, on the training batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.training.config import BodyNoise


@dataclass(frozen=True)
class MaskNoise:
    """How the mask is disturbed before compositing (pixels at the stored image's size)."""

    probability: float = 0.5  # share of samples composited over grey; the rest keep their background
    max_grow_px: int = 3  # the mask is dilated or eroded by up to this many pixels
    max_blur_px: int = 2  # then box-blurred with a radius up to this

    def __post_init__(self) -> None:
        if not 0 <= self.probability <= 1:
            raise ValueError(f"probability must lie in [0, 1], not {self.probability}")
        if self.max_grow_px < 0 or self.max_blur_px < 0:
            raise ValueError("max_grow_px and max_blur_px must be >= 0")


def _grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (pixels > 0) or erode (< 0) a (1, 1, H, W) mask with a square window."""
    if pixels == 0:
        return mask
    k = 2 * abs(pixels) + 1
    if pixels > 0:
        return F.max_pool2d(mask, k, stride=1, padding=abs(pixels))
    return -F.max_pool2d(-mask, k, stride=1, padding=abs(pixels))


def grey_composite(image: torch.Tensor, mask: torch.Tensor, noise: MaskNoise, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] with (B, 1, H, W) masks in [0, 1] -> the batch with a share
    `noise.probability` of its samples composited over grey (0) through a disturbed mask.
    `generator` may be None when nothing is random (probability 1, no growing or blurring)."""
    out = image.clone()
    for index in range(image.shape[0]):
        if noise.probability < 1 and float(torch.rand((), generator=generator)) >= noise.probability:
            continue
        grow = int(torch.randint(-noise.max_grow_px, noise.max_grow_px + 1, (), generator=generator)) if noise.max_grow_px else 0
        blur = int(torch.randint(0, noise.max_blur_px + 1, (), generator=generator)) if noise.max_blur_px else 0
        m = _grow(mask[index : index + 1].float(), grow)
        if blur:
            m = F.avg_pool2d(m, 2 * blur + 1, stride=1, padding=blur, count_include_pad=False)
        out[index] = image[index] * m[0]
    return out


def body_input(sdf: torch.Tensor, normals: torch.Tensor, clip: float, units_per_cm: torch.Tensor,
               noise: BodyNoise | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """A body-guided model's per-point input (B, 4, N) from the true body's distance (B, N) and
    normals (B, 3, N), in view units (`units_per_cm` (B,) of them per cm), with `noise` (or none).
    The distance stays clipped to +-`clip` view units, as at inference."""
    sdf = sdf.clone()
    if noise is not None:
        batch, count = sdf.shape
        cm = units_per_cm.to(sdf.dtype).reshape(batch, 1)
        sigma = torch.tensor([noise.shift_xy_cm, noise.shift_xy_cm, noise.shift_z_cm], dtype=sdf.dtype, device=sdf.device)
        shift = torch.randn(batch, 3, generator=generator).to(sdf.device) * sigma
        offset = torch.randn(batch, 1, generator=generator).to(sdf.device) * noise.offset_cm
        jitter = torch.randn(batch, count, generator=generator).to(sdf.device) * noise.point_cm
        sdf = sdf - cm * (torch.einsum("bc,bcn->bn", shift, normals) + offset + jitter)
    return torch.cat((sdf.clamp(-clip, clip)[:, None], normals), dim=1)
