"""Per-point occupancy MLP with skip connections from its input.

Stored as 1x1 `Conv1d` layers named `filters.{i}` (the released key layout);
evaluated as dense layers on (B, N, C) rows, which keeps each point's channels
contiguous for the matrix multiplies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.network.config import MLPConfig

LEAKY_SLOPE = 0.01


class SurfaceMLP(nn.Module):
    """(B, N, widths[0]) point features -> (B, N) occupancy logits, and optionally a hidden activation.

    Every hidden layer is followed by LeakyReLU(0.01); skip layers take
    concat(previous activation, MLP input). That concatenation is never built: a skip layer's
    weight splits into the columns for the activation and those for the input, whose product
    (plus the bias) is the accumulator of one addmm, so no (N, C_prev + C_in) copy is made.
    """

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.skip_layers = frozenset(config.skip_layers)
        self.filters = nn.ModuleList(nn.Conv1d(c_in, c_out, kernel_size=1) for c_in, c_out in config.layer_shapes())
        self.input_width = config.widths[0]

    def forward(
        self, features: torch.Tensor, keep_layer: int | None = None, stop_after_keep: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Returns (logits (B, N) or None, activation after layer `keep_layer` (B, N, C) or None).

        With `stop_after_keep`, layers past `keep_layer` are skipped and the logits are None:
        the fine level needs only the coarse MLP's hidden feature.
        """
        rows = features.shape[:-1]
        inputs = features.reshape(-1, features.shape[-1])
        x = inputs
        kept = None
        last = len(self.filters) - 1
        for index, layer in enumerate(self.filters):
            weight = layer.weight.squeeze(-1)
            if index in self.skip_layers:
                split = weight.shape[1] - self.input_width
                x = torch.addmm(F.linear(inputs, weight[:, split:], layer.bias), x, weight[:, :split].t())
            else:
                x = F.linear(x, weight, layer.bias)
            if index < last:
                x = F.leaky_relu(x, LEAKY_SLOPE)
            if index == keep_layer:
                kept = x.reshape(*rows, -1)
                if stop_after_keep:
                    return None, kept
        return x.reshape(*rows, -1)[..., 0], kept
