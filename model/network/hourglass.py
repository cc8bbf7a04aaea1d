"""Stacked-hourglass image filter (Newell et al. 2016) as PIFuHD uses it.

Attribute names (`conv2`, `m0.b1_2`, `top_m_0`, `bl0`, ...) are the released
checkpoint's key names; the structure around them is ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.network.config import HourglassConfig


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)


class ConvBlock(nn.Module):
    """Pre-activation residual block with three 3x3 convs of widths out/2, out/4, out/4.

    The three conv outputs are concatenated (out channels) and added to the input,
    projected by norm -> relu -> 1x1 conv when the widths differ.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        half, quarter = out_channels // 2, out_channels // 4
        self.conv1 = _conv3x3(in_channels, half)
        self.conv2 = _conv3x3(half, quarter)
        self.conv3 = _conv3x3(quarter, quarter)
        self.bn1 = nn.GroupNorm(groups, in_channels)
        self.bn2 = nn.GroupNorm(groups, half)
        self.bn3 = nn.GroupNorm(groups, quarter)
        # The released layout registers `bn4` in every block. Where the widths differ it is
        # the projection's norm (so `bn4.*` and `downsample.0.*` are one tensor); where they
        # match it is unused, kept only so checkpoints load with strict key matching.
        self.bn4 = nn.GroupNorm(groups, in_channels)
        self.downsample = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(
                self.bn4, nn.ReLU(True), nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
            )
        else:
            self.bn4.requires_grad_(False)  # unused: no gradient (DDP rejects trainable unused parameters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU and add: at the fine level each activation is 256 MiB, and fresh
        # allocations (page faults) cost as much as the arithmetic.
        out1 = self.conv1(F.relu(self.bn1(x), inplace=True))
        out2 = self.conv2(F.relu(self.bn2(out1), inplace=True))
        out3 = self.conv3(F.relu(self.bn3(out2), inplace=True))
        residual = x if self.downsample is None else self.downsample(x)
        return torch.cat((out1, out2, out3), 1).add_(residual)


class Hourglass(nn.Module):
    """One hourglass of `depth` levels at constant width; output has the input's shape.

    Level L: skip branch b1_L at full resolution; the other branch average-pools by 2,
    runs b2_L, recurses (or b2_plus_1 at the bottom), runs b3_L and is upsampled
    bicubically (align_corners=True) before the two branches are summed.
    Input sides must be divisible by 2 ** depth.
    """

    def __init__(self, depth: int, channels: int, groups: int):
        super().__init__()
        self.depth = depth
        self._add_level(depth, channels, groups)

    def _add_level(self, level: int, channels: int, groups: int) -> None:
        # Registration order follows the checkpoint: b1, b2, the inner levels, then b3.
        self.add_module(f"b1_{level}", ConvBlock(channels, channels, groups))
        self.add_module(f"b2_{level}", ConvBlock(channels, channels, groups))
        if level > 1:
            self._add_level(level - 1, channels, groups)
        else:
            self.add_module(f"b2_plus_{level}", ConvBlock(channels, channels, groups))
        self.add_module(f"b3_{level}", ConvBlock(channels, channels, groups))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        skip = self._modules[f"b1_{level}"](x)
        low = self._modules[f"b2_{level}"](F.avg_pool2d(x, 2, stride=2))
        if level > 1:
            low = self._level(level - 1, low)
        else:
            low = self._modules[f"b2_plus_{level}"](low)
        low = self._modules[f"b3_{level}"](low)
        return skip.add_(F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class HourglassFilter(nn.Module):
    """(B, C_in, H, W) image -> list of `num_stacks` feature maps (B, out_channels, H/s, W/s).

    s = 4 with `stem_pool` (coarse level) and 2 without (fine level). Every stack's
    output is returned: training supervises all of them, inference uses the last.
    """

    def __init__(self, config: HourglassConfig, in_channels: int):
        super().__init__()
        w, groups = config.width, config.norm_groups
        self.config = config
        self.conv1 = nn.Conv2d(in_channels, w // 4, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.GroupNorm(groups, w // 4)
        self.conv2 = ConvBlock(w // 4, w // 2, groups)
        self.conv3 = ConvBlock(w // 2, w // 2, groups)
        self.conv4 = ConvBlock(w // 2, w, groups)
        last = config.num_stacks - 1
        for i in range(config.num_stacks):
            self.add_module(f"m{i}", Hourglass(config.depth, w, groups))
            self.add_module(f"top_m_{i}", ConvBlock(w, w, groups))
            self.add_module(f"conv_last{i}", nn.Conv2d(w, w, kernel_size=1))
            self.add_module(f"bn_end{i}", nn.GroupNorm(groups, w))
            self.add_module(f"l{i}", nn.Conv2d(w, config.out_channels, kernel_size=1))
            if i < last:
                # Feed stack i's features and prediction into stack i + 1.
                self.add_module(f"bl{i}", nn.Conv2d(w, w, kernel_size=1))
                self.add_module(f"al{i}", nn.Conv2d(config.out_channels, w, kernel_size=1))

    def forward(self, image: torch.Tensor, last_only: bool = False) -> list[torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(image)), inplace=True)
        x = self.conv2(x)
        if self.config.stem_pool:
            x = F.avg_pool2d(x, 2, stride=2)
        x = self.conv4(self.conv3(x))
        outputs = []
        for i in range(self.config.num_stacks):
            y = self._modules[f"top_m_{i}"](self._modules[f"m{i}"](x))
            y = F.relu(self._modules[f"bn_end{i}"](self._modules[f"conv_last{i}"](y)), inplace=True)
            out = self._modules[f"l{i}"](y)
            if not last_only or i == self.config.num_stacks - 1:
                outputs.append(out)
            if i < self.config.num_stacks - 1:
                x = x + self._modules[f"bl{i}"](y) + self._modules[f"al{i}"](out)
        return outputs
