"""The three training stages of PIFuHD as loss modules, and the batch inputs they share.

    NormalStage  front/back normal nets against the rendered normal maps
    CoarseStage  coarse hourglass + MLP; every stack's prediction supervised (weighted BCE)
    FineStage    fine hourglass + MLP on a random half-size window, the coarse level frozen

Each stage's forward takes a decoded batch (`pipelines.common.dataset.decode_table` as tensors) and a
torch Generator and returns (loss, extras), so a data-parallel wrapper (DDP) wraps exactly the
trainable part. `freeze_for(net, stage)` leaves trainable only what the stage trains.
"""

from __future__ import annotations

import torch
from torch import nn

from model.network.config import PIFuHDConfig
from model.network.pifuhd import Features, PIFuHD
from model.training.augment import MaskNoise, body_input, grey_composite
from model.training.config import STAGES, BodyNoise
from model.training.losses import VGG19Features, normal_map_loss, weighted_occupancy_bce
from model.body.field import BODY_DISTANCE_CLIP_CM
from model.reconstruction.preprocess import resize_square

# The submodules of PIFuHD that each stage trains; everything else is frozen in that stage.
TRAINED_PARTS = {
    "normal": ("netG.netF", "netG.netB"),
    "coarse": ("netG.image_filter", "netG.mlp"),
    "fine": ("image_filter", "mlp"),
}


# ---- batches ------------------------------------------------------------------------------


def stage_inputs(batch: dict, config: PIFuHDConfig, noise: MaskNoise | None = None,
                 generator: torch.Generator | None = None) -> dict:
    """Images and normal maps of a decoded batch at the network's coarse and fine sizes; with
    `noise`, a share of the images composited over grey as inference does (model/training/augment.py)."""
    stored = max(int(k.split("_")[1]) for k in batch if k.startswith("image_"))
    image, front, back = batch[f"image_{stored}"], batch[f"normal_front_{stored}"], batch[f"normal_back_{stored}"]
    if noise is not None:
        image = grey_composite(image, batch[f"mask_{stored}"], noise, generator)
    return {
        "coarse": resize_square(image, config.coarse_size),
        "fine": resize_square(image, config.fine_size),
        "normals": (resize_square(front, config.coarse_size), resize_square(back, config.coarse_size)),
    }


def subsample_points(batch: dict, count: int, generator: torch.Generator) -> dict:
    """The same random `count` of the stored points per sample from every per-point field:
    points (B, 3, count), labels (B, count), and body_sdf / body_normals where stored."""
    fields = {k: batch[k] for k in ("points", "labels", "body_sdf", "body_normals") if k in batch}
    stored = fields["points"].shape[-1]
    if stored <= count:
        return fields
    index = torch.randperm(stored, generator=generator)[:count].to(fields["points"].device)
    return {k: v[..., index] for k, v in fields.items()}


def body_inputs(points: dict, batch: dict, net: PIFuHD, noise: BodyNoise | None, generator) -> torch.Tensor | None:
    """A body-guided model's (B, 4, N) body input at subsampled points, None for the other models."""
    if not net.config.body_guided:
        return None
    if "body_sdf" not in points:
        raise ValueError("a body-guided model trains on data with bodies (synthetic subjects, scans with a fitted body); this batch has none")
    clip = BODY_DISTANCE_CLIP_CM * float(batch["units_per_cm"][0])
    return body_input(points["body_sdf"], points["body_normals"], clip, batch["units_per_cm"], noise, generator)


def window_calib(calib: torch.Tensor, image_size: int, window: int, offset_x: int, offset_y: int) -> torch.Tensor:
    """Calib projecting into a `window`-pixel square cut at (offset_x, offset_y) of an image_size image.

    Image coordinates use align_corners=True: pixel p of the full image sits at
    -1 + 2p / (S - 1); in the window it is -1 + 2(p - offset) / (W - 1).
    """
    scale = (image_size - 1) / (window - 1)
    affine = torch.eye(4, dtype=calib.dtype, device=calib.device).repeat(calib.shape[0], 1, 1)
    affine[:, 0, 0] = affine[:, 1, 1] = scale
    affine[:, 0, 3] = scale - 1 - 2 * offset_x / (window - 1)
    affine[:, 1, 3] = scale - 1 - 2 * offset_y / (window - 1)
    return affine @ calib


# ---- the three stages as loss modules ------------------------------------------------------


class NormalStage(nn.Module):
    """Front and back normal nets against the rendered normal maps."""

    def __init__(self, net: PIFuHD, vgg: VGG19Features | None, noise: MaskNoise):
        super().__init__()
        self.netF, self.netB = net.netG.netF, net.netG.netB
        self.net_config = net.config
        self.vgg, self.noise = vgg, noise

    def forward(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        inputs = stage_inputs(batch, self.net_config, self.noise, generator)
        front, back = inputs["normals"]
        loss = normal_map_loss(self.netF(inputs["coarse"]), front, self.vgg) + normal_map_loss(self.netB(inputs["coarse"]), back, self.vgg)
        return loss, {}


class CoarseStage(nn.Module):
    """Coarse hourglass and MLP; every stack's prediction is supervised."""

    def __init__(self, net: PIFuHD, points: int, use_predicted_normals: bool, noise: MaskNoise, body_noise: BodyNoise):
        super().__init__()
        self.net = net
        self.image_filter, self.mlp = net.netG.image_filter, net.netG.mlp
        self.points, self.use_predicted_normals, self.noise, self.body_noise = points, use_predicted_normals, noise, body_noise

    def forward(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        inputs = stage_inputs(batch, self.net.config, self.noise, generator)
        normals = inputs["normals"]
        if self.use_predicted_normals:
            with torch.no_grad():
                normals = self.net.predict_normals(inputs["coarse"])
        stacks = self.image_filter(self.net.with_normals(inputs["coarse"], normals))
        points = subsample_points(batch, self.points, generator)
        body = body_inputs(points, batch, self.net, self.body_noise, generator)
        result = self.net.query_levels(Features(None, None, stacks), points["points"], batch["calib"], levels="coarse", body=body)
        loss = sum(weighted_occupancy_bce(logits, points["labels"], result.coarse_in_box) for logits in result.coarse_logits)
        return loss / len(stacks), {"probabilities": result.coarse[-1].detach(), "labels": points["labels"]}


class FineStage(nn.Module):
    """Fine hourglass and MLP on a random window of the fine image; the coarse level is frozen."""

    def __init__(self, net: PIFuHD, points: int, use_predicted_normals: bool, noise: MaskNoise, body_noise: BodyNoise):
        super().__init__()
        self.net = net
        self.image_filter, self.mlp = net.image_filter, net.mlp
        self.points, self.use_predicted_normals, self.noise, self.body_noise = points, use_predicted_normals, noise, body_noise

    def forward(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        config = self.net.config
        inputs = stage_inputs(batch, config, self.noise, generator)
        with torch.no_grad():
            if self.use_predicted_normals:
                inputs["normals"] = self.net.predict_normals(inputs["coarse"])
            coarse = self.net.netG.image_filter(self.net.with_normals(inputs["coarse"], inputs["normals"]), last_only=True)
        size, window = config.fine_size, config.fine_size // 2
        ox, oy = (int(v) for v in torch.randint(0, size - window + 1, (2,), generator=generator))
        fine_input = self.net.with_normals(inputs["fine"], inputs["normals"])[..., oy : oy + window, ox : ox + window]
        fine = self.image_filter(fine_input, last_only=True)[-1]
        points = subsample_points(batch, self.points, generator)
        calib = batch["calib"]
        result = self.net.query_levels(
            Features(None, None, coarse, fine), points["points"], calib, window_calib(calib, size, window, ox, oy),
            levels="fine", body=body_inputs(points, batch, self.net, self.body_noise, generator),
        )
        loss = weighted_occupancy_bce(result.fine_logits, points["labels"], result.fine_in_box)
        return loss, {"probabilities": result.fine.detach(), "labels": points["labels"], "valid": result.fine_in_box}


def freeze_for(net: PIFuHD, stage: str) -> None:
    """Freeze everything but `stage`'s trained parts (TRAINED_PARTS), which go to train mode."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
    net.requires_grad_(False)
    for name in TRAINED_PARTS[stage]:
        net.get_submodule(name).requires_grad_(True).train()
    # Unused conv-block norms stay frozen (see model.network.hourglass.ConvBlock).
    for module in net.modules():
        if getattr(module, "downsample", "absent") is None:
            module.bn4.requires_grad_(False)
