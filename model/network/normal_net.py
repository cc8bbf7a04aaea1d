"""pix2pixHD global generator: RGB image -> camera-space normal map in [-1, 1].

Layout: reflect-pad + 7x7 conv, stride-2 3x3 convs (width doubles each time),
residual blocks at the bottleneck, transposed convs back up, reflect-pad +
7x7 conv to 3 channels, tanh. Every conv but the last is followed by
InstanceNorm (no affine parameters, no running statistics) and ReLU.

Submodules sit in one `nn.Sequential` named `model` because the released
checkpoint addresses them by position (`model.16.conv_block.1.weight`).
"""

from __future__ import annotations

import torch
from torch import nn

from model.network.config import NormalNetConfig


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResidualBlock(nn.Module):
    """x + (pad, conv3x3, norm, relu, pad, conv3x3, norm)(x), constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            _norm(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class NormalNet(nn.Module):
    """(B, 3, H, W) image in [-1, 1] -> (B, 3, H, W) normal map in [-1, 1].

    H and W must be divisible by 2 ** num_downsamplings.
    """

    def __init__(self, config: NormalNetConfig):
        super().__init__()
        width = config.base_width
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, width, kernel_size=7), _norm(width), nn.ReLU(True)]
        for _ in range(config.num_downsamplings):
            layers += [nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1), _norm(2 * width), nn.ReLU(True)]
            width *= 2
        layers += [ResidualBlock(width) for _ in range(config.num_res_blocks)]
        for _ in range(config.num_downsamplings):
            layers += [
                nn.ConvTranspose2d(width, width // 2, kernel_size=3, stride=2, padding=1, output_padding=1),
                _norm(width // 2),
                nn.ReLU(True),
            ]
            width //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, 3, kernel_size=7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.size_multiple = 2**config.num_downsamplings

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] % self.size_multiple or image.shape[-2] % self.size_multiple:
            raise ValueError(f"normal net input {tuple(image.shape)}: sides must be multiples of {self.size_multiple}")
        return self.model(image)
