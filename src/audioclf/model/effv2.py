"""EfficientNetV2 (Tan & Le, 2021) for 1-channel log-mel input, built from a stage table.

Fused-MBConv stages (one full kxk convolution) come first, where feature maps are large and
depthwise convolutions are slow; MBConv stages with squeeze-excitation follow. Every block takes
its 1x1 expansion/projection from a `pointwise` factory, which is how Ghost-EfficientNetV2
(ghost_effv2.py) reuses this builder unchanged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from audioclf.model.base import Model, check_parameter
from audioclf.model.heads import ArcFaceHead, LinearHead
from audioclf.model.layers import (
    ActLayer,
    ConvBnAct,
    DropPath,
    SqueezeExcite,
    make_divisible,
    pointwise_conv,
    spatial_mean,
)
from audioclf.model.registry import register_model

Pointwise = Callable[[int, int, ActLayer], nn.Module]


@dataclass(frozen=True)
class Stage:
    """One row of the stage table: `num_layers` blocks, the first with `stride`."""

    block: str  # "fused_mbconv" | "mbconv"
    expand_ratio: int
    kernel_size: int
    stride: int
    out_channels: int
    num_layers: int
    se_ratio: float = 0.0  # squeeze channels = block input channels * se_ratio


@dataclass(frozen=True)
class Size:
    """A whole architecture: stem, stages, and the 1x1 head before pooling."""

    stem_channels: int
    stages: tuple[Stage, ...]
    head_channels: int


SIZES: dict[str, Size] = {
    # EfficientNetV2-S, the paper's Table 4 (about 20M parameters with a 10-class head).
    "s": Size(
        stem_channels=24,
        stages=(
            Stage("fused_mbconv", 1, 3, 1, 24, 2),
            Stage("fused_mbconv", 4, 3, 2, 48, 4),
            Stage("fused_mbconv", 4, 3, 2, 64, 4),
            Stage("mbconv", 4, 3, 2, 128, 6, 0.25),
            Stage("mbconv", 6, 3, 1, 160, 9, 0.25),
            Stage("mbconv", 6, 3, 2, 256, 15, 0.25),
        ),
        head_channels=1280,
    ),
    # EfficientNetV2-B0, the base the paper scales from (about 6M parameters).
    "b0": Size(
        stem_channels=32,
        stages=(
            Stage("fused_mbconv", 1, 3, 1, 16, 1),
            Stage("fused_mbconv", 4, 3, 2, 32, 2),
            Stage("fused_mbconv", 4, 3, 2, 48, 2),
            Stage("mbconv", 4, 3, 2, 96, 3, 0.25),
            Stage("mbconv", 6, 3, 1, 112, 5, 0.25),
            Stage("mbconv", 6, 3, 2, 192, 8, 0.25),
        ),
        head_channels=1280,
    ),
    # Ours, for phones and microcontrollers: B0's layout, narrower and shallower, with a
    # 512-channel head (about 1.4M parameters).
    "mobile": Size(
        stem_channels=16,
        stages=(
            Stage("fused_mbconv", 1, 3, 1, 16, 1),
            Stage("fused_mbconv", 4, 3, 2, 24, 1),
            Stage("fused_mbconv", 4, 3, 2, 32, 2),
            Stage("mbconv", 4, 3, 2, 64, 2, 0.25),
            Stage("mbconv", 6, 3, 1, 80, 3, 0.25),
            Stage("mbconv", 6, 3, 2, 128, 4, 0.25),
        ),
        head_channels=512,
    ),
}


class InvertedResidual(nn.Module):
    """A block's body (`self.body`) with a stochastic-depth residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_prob: float):
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop_prob) if self.use_residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + self.drop_path(out) if self.use_residual else out


class FusedMBConv(InvertedResidual):
    """A full kxk convolution that expands (and strides), then a pointwise projection; with
    expand ratio 1, the kxk convolution maps straight to the output channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stage: Stage,
        stride: int,
        drop_prob: float,
        pointwise: Pointwise,
        act_layer: ActLayer,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, drop_prob)
        kernel = stage.kernel_size
        if stage.expand_ratio == 1:
            self.body = ConvBnAct(in_channels, out_channels, kernel, stride, act_layer=act_layer)
        else:
            hidden = in_channels * stage.expand_ratio
            self.body = nn.Sequential(
                OrderedDict(
                    expand=ConvBnAct(in_channels, hidden, kernel, stride, act_layer=act_layer),
                    project=pointwise(hidden, out_channels, None),
                )
            )


class MBConv(InvertedResidual):
    """Pointwise expansion, kxk depthwise convolution (strides), squeeze-excitation, pointwise
    projection without activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stage: Stage,
        stride: int,
        drop_prob: float,
        pointwise: Pointwise,
        act_layer: ActLayer,
    ) -> None:
        super().__init__(in_channels, out_channels, stride, drop_prob)
        hidden = in_channels * stage.expand_ratio
        layers = OrderedDict(
            expand=pointwise(in_channels, hidden, act_layer),
            depthwise=ConvBnAct(
                hidden, hidden, stage.kernel_size, stride, groups=hidden, act_layer=act_layer
            ),
        )
        if stage.se_ratio > 0:
            squeeze = max(1, int(in_channels * stage.se_ratio))
            layers["se"] = SqueezeExcite(hidden, squeeze, act_layer)
        layers["project"] = pointwise(hidden, out_channels, None)
        self.body = nn.Sequential(layers)


BLOCKS: dict[str, type[InvertedResidual]] = {"fused_mbconv": FusedMBConv, "mbconv": MBConv}


@register_model("efficientnet_v2")
class EfficientNetV2(Model):
    """EfficientNetV2 with a 1-channel stem, global average pooling and a linear or ArcFace head.

    `size` picks a stage table from SIZES; `width_mult` scales every channel count (rounded to
    multiples of 8) and `depth_mult` every stage's number of blocks (rounded up).
    `drop_path_rate` is the stochastic-depth probability of the last block, rising linearly
    from 0 at the first. `dropout` applies before the classifier.
    """

    def __init__(
        self,
        num_classes: int,
        size: str = "mobile",
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        dropout: float = 0.2,
        drop_path_rate: float = 0.0,
        arcface: bool = False,
        arcface_margin: float = 0.2,
        arcface_scale: float = 30.0,
        gradient_checkpointing: bool = False,
        pointwise: Pointwise = pointwise_conv,
    ) -> None:
        super().__init__(num_classes, gradient_checkpointing)
        if size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, not {size!r}")
        for name, value in (("width_mult", width_mult), ("depth_mult", depth_mult)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value}")
        check_parameter("dropout", dropout, 0.0, 1.0)
        check_parameter("drop_path_rate", drop_path_rate, 0.0, 1.0)
        if not arcface_scale > 0:
            raise ValueError(f"arcface_scale must be > 0, not {arcface_scale}")
        spec = SIZES[size]
        act_layer = nn.SiLU
        channels = make_divisible(spec.stem_channels * width_mult)
        self.stem = ConvBnAct(1, channels, 3, stride=2, act_layer=act_layer)
        repeats = [math.ceil(stage.num_layers * depth_mult) for stage in spec.stages]
        total_blocks = sum(repeats)
        blocks: list[nn.Module] = []
        for stage, count in zip(spec.stages, repeats, strict=True):
            out_channels = make_divisible(stage.out_channels * width_mult)
            for index in range(count):
                blocks.append(
                    BLOCKS[stage.block](
                        channels,
                        out_channels,
                        stage,
                        stride=stage.stride if index == 0 else 1,
                        drop_prob=drop_path_rate * len(blocks) / total_blocks,
                        pointwise=pointwise,
                        act_layer=act_layer,
                    )
                )
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        head_channels = make_divisible(spec.head_channels * width_mult)
        self.head = ConvBnAct(channels, head_channels, 1, act_layer=act_layer)
        self.embedding_size = head_channels
        self.classifier = (
            ArcFaceHead(head_channels, num_classes, arcface_margin, arcface_scale, dropout)
            if arcface
            else LinearHead(head_channels, num_classes, dropout)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = self.run_block(block, x)
        return spatial_mean(self.head(x), keepdim=False)


register_model("efficientnet_v2_s")(partial(EfficientNetV2, size="s"))
register_model("efficientnet_v2_mobile")(partial(EfficientNetV2, size="mobile"))
