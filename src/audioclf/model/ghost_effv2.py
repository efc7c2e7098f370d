"""Ghost-EfficientNetV2: EfficientNetV2's stage table and builder with Ghost modules.

A Ghost module (GhostNet, Han et al. 2020) replaces a 1x1 convolution to C channels: a 1x1
convolution makes only ceil(C / ratio) "primary" channels, and a cheap 3x3 depthwise
convolution derives the other (ratio - 1) / ratio of them from the primary ones; the two are
concatenated. Feature maps of trained CNNs are largely redundant, so the cheap channels cost
little accuracy while the 1x1 weights and MACs drop by about `ratio`. Here Ghost modules take
the place of every 1x1 expansion and projection; the kxk Fused-MBConv convolutions, depthwise
convolutions, squeeze-excitation, stem and head stay as in EfficientNetV2 (README, "Model
zoo", compares parameters and MACs).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn

from audioclf.model.effv2 import EfficientNetV2
from audioclf.model.layers import ActLayer, ConvBnAct
from audioclf.model.registry import register_model


class GhostModule(nn.Module):
    """A 1x1 convolution to `out_channels`, made from primary and cheap depthwise channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        act_layer: ActLayer,
        ratio: int = 2,
        cheap_kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if ratio < 2:
            raise ValueError(f"ghost_ratio must be at least 2, not {ratio}")
        self.out_channels = out_channels
        primary = math.ceil(out_channels / ratio)
        self.primary = ConvBnAct(in_channels, primary, 1, act_layer=act_layer)
        self.cheap = ConvBnAct(
            primary, primary * (ratio - 1), cheap_kernel_size, groups=primary, act_layer=act_layer
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primary = self.primary(x)
        return torch.cat([primary, self.cheap(primary)], dim=1)[:, : self.out_channels]


@register_model("ghost_efficientnet_v2")
class GhostEfficientNetV2(EfficientNetV2):
    """EfficientNetV2 (same sizes and parameters) with Ghost modules of `ghost_ratio`."""

    def __init__(self, num_classes: int, ghost_ratio: int = 2, **params: Any) -> None:
        super().__init__(num_classes, pointwise=partial(GhostModule, ratio=ghost_ratio), **params)
