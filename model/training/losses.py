"""Training losses of the three PIFuHD stages.

Occupancy (coarse and fine levels): binary cross-entropy weighted by the share of
outside points (PIFuHD eq. 3), lambda * y log f + (1 - lambda) (1 - y) log(1 - f), so
the rarer inside points are not drowned out; computed on logits for stability.
Normal nets: L1 to the rendered normal maps plus, since pretrained VGG weights cannot
be downloaded, an image-gradient L1 term; a VGG19 perceptual term is added only when
the user supplies torchvision-layout VGG19 weights as a file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def weighted_occupancy_bce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean weighted BCE over (B, N) logits and {0, 1} labels; `valid` (B, N) masks points out.

    lambda (the inside points' weight) is the share of outside points in the batch.
    """
    valid = torch.ones_like(labels, dtype=torch.bool) if valid is None else valid.bool()
    count = valid.sum().clamp(min=1)
    outside_share = ((labels < 0.5) & valid).sum() / count
    weights = torch.where(labels > 0.5, outside_share, 1 - outside_share) * valid
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    # Scaled by 2 so that a balanced batch (lambda = 0.5) gives the plain BCE.
    return 2 * (weights * losses).sum() / count


def image_gradients(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along x and y of (B, C, H, W) -> (B, C, H, W-1), (B, C, H-1, W)."""
    return image[..., :, 1:] - image[..., :, :-1], image[..., 1:, :] - image[..., :-1, :]


# torchvision's vgg19.features conv layer indices; relu outputs after these feed the loss.
_VGG19_CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]
_VGG_TAPS = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
_VGG_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)


class VGG19Features(nn.Module):
    """VGG19's convolutional trunk in torchvision's key layout (`features.{i}.weight`)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG19_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @classmethod
    def from_file(cls, path: str) -> "VGG19Features":
        """Load `features.*` weights from a safetensors or torch state-dict file (no code execution)."""
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        net = cls()
        wanted = {k: v for k, v in state.items() if k.startswith("features.")}
        net.load_state_dict({**wanted, "mean": net.mean, "std": net.std}, strict=True)
        return net.eval().requires_grad_(False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Activations at the taps for an image in [-1, 1]."""
        x = ((image + 1) / 2 - self.mean) / self.std
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _VGG_TAPS:
                taps.append(x)
            if index >= _VGG_TAPS[-1]:
                break
        return taps


def normal_map_loss(
    predicted: torch.Tensor, target: torch.Tensor, vgg: VGG19Features | None = None, gradient_weight: float = 1.0
) -> torch.Tensor:
    """L1 + gradient L1 (+ VGG perceptual L1 when `vgg` is given) between (B, 3, H, W) normal maps."""
    loss = F.l1_loss(predicted, target)
    if vgg is None:
        (pdx, pdy), (tdx, tdy) = image_gradients(predicted), image_gradients(target)
        loss = loss + gradient_weight * (F.l1_loss(pdx, tdx) + F.l1_loss(pdy, tdy))
    else:
        for weight, p, t in zip(_VGG_WEIGHTS, vgg(predicted), vgg(target)):
            loss = loss + weight * F.l1_loss(p, t.detach())
    return loss
