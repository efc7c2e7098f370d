"""Blocks shared by the architectures, and the Conv-BN folding behind `fuse_model()`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

ActLayer = Callable[[], nn.Module] | None


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, losing at most 10% (MobileNet's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBnAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation, with 'same' padding for odd kernels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act_layer: ActLayer = nn.SiLU,
    ) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(
                    in_channels,
                    out_channels,
                    kernel_size,
                    stride,
                    padding=(kernel_size - 1) // 2,
                    groups=groups,
                    bias=False,
                ),
                bn=nn.BatchNorm2d(out_channels),
                act=act_layer() if act_layer is not None else nn.Identity(),
            )
        )


def pointwise_conv(in_channels: int, out_channels: int, act_layer: ActLayer) -> nn.Module:
    """The 1x1 expansion / projection of an inverted-residual block."""
    return ConvBnAct(in_channels, out_channels, kernel_size=1, act_layer=act_layer)


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled features (Hu et al., 2018)."""

    def __init__(self, channels: int, squeeze_channels: int, act_layer: ActLayer = nn.SiLU) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = act_layer() if act_layer is not None else nn.Identity()
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.expand(self.act(self.reduce(spatial_mean(x))))
        return x * torch.sigmoid(scale)


def spatial_mean(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    """The mean over height and width, kept as 1x1 unless `keepdim` is false.

    In eager mode and under torch.compile a sum times 1/(H*W): the backward of `x.mean` writes
    a full-size quotient that autograd then adds to x's other gradient, which doubled
    squeeze-excitation's training time (bf16, channels_last). Graphs captured by torch.export
    (quantization, TFLite) keep `mean`, which quantizers and XNNPACK take as an int8 pool.
    """
    if torch.compiler.is_exporting():
        return x.mean((2, 3), keepdim=keepdim)
    return x.sum((2, 3), keepdim=keepdim) * (1.0 / (x.shape[2] * x.shape[3]))


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch per example with probability p."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _fold(conv: nn.Module, bn: nn.Module) -> nn.Conv2d | None:
    """`conv` with `bn` folded in; None unless the pair is a Conv2d and a BatchNorm2d."""
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
        return None
    if bn.training:
        raise RuntimeError("fuse_model() folds BatchNorm statistics: call model.eval() first")
    return fuse_conv_bn_eval(conv, bn)


def _is_channelwise_linear(module: nn.Module) -> bool:
    """Pools that commute with a per-channel affine map, so a BatchNorm after them can move."""
    return isinstance(module, nn.AvgPool2d) and module.padding in (0, (0, 0))


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold every BatchNorm2d that follows a Conv2d into it, in place; return how many.

    Pairs are found inside nn.Sequential containers (a conv, optionally an unpadded AvgPool2d,
    then the BatchNorm: PANNs' MobileNets pool between the two) and in modules that name their
    pairs in a `conv_bn_pairs` attribute. The BatchNorm is replaced by nn.Identity, so the
    state_dict names of everything else stay as they were.
    """
    fused = 0
    for module in list(model.modules()):
        pairs = list(getattr(module, "conv_bn_pairs", ()))
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for index, name in enumerate(names):
                after = index + 1
                while after < len(names) and _is_channelwise_linear(module._modules[names[after]]):
                    after += 1
                if after < len(names):
                    pairs.append((name, names[after]))
        for conv_name, bn_name in pairs:
            folded = _fold(module._modules[conv_name], module._modules[bn_name])
            if folded is not None:
                module._modules[conv_name] = folded
                module._modules[bn_name] = nn.Identity()
                fused += 1
    return fused
