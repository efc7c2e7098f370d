"""PANNs CNN14, MobileNetV1 and MobileNetV2 (Kong et al. 2020) on log-mel features.

Layer names and shapes are the official ones (qiuqiangkong/audioset_tagging_cnn,
pytorch/models.py), so the official AudioSet checkpoints load through `pretrained_path`. The
official models compute the log-mel inside (`spectrogram_extractor`, `logmel_extractor`); ours
take it from the data pipeline (`features=panns`, `data.sample_rate=32000` for the official
weights), and loading leaves those entries out. `bn0` stays: PANNs normalises every mel bin
with it. SpecAugment and mixup live in the data pipeline, not here.

Outputs are logits, as every model in the zoo returns them: `torch.sigmoid(model(log_mel))`
is the official `clipwise_output` (the AudioSet models are multi-label). `panns_output()`
returns the official dictionary, `clipwise_output` and `embedding`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from audioclf.model.base import Model, check_parameter
from audioclf.model.registry import register_model


def _init_layer(layer: nn.Module) -> None:
    nn.init.xavier_uniform_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


def _init_bn(bn: nn.Module) -> None:
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


class PannsModel(Model):
    """What the three share: `bn0` over mel bins, time-frequency pooling, `fc1`, `fc_audioset`.

    Subclasses set `self.features_out` channels and implement `backbone`.
    """

    normalizes_input = True
    input_batch_norm = "bn0"

    classifier_name = "fc_audioset"
    min_input_size = (32, 32)  # five 2x2 average pools

    def __init__(
        self,
        num_classes: int,
        n_mels: int,
        backbone_channels: int,
        embedding_size: int,
        dropout: float,
        gradient_checkpointing: bool,
    ) -> None:
        super().__init__(num_classes, gradient_checkpointing)
        check_parameter("n_mels", n_mels, 1)
        check_parameter("dropout", dropout, 0.0, 1.0)
        self.n_mels = n_mels
        self.dropout = dropout
        self.embedding_size = embedding_size
        self.bn0 = nn.BatchNorm2d(n_mels)
        self.fc1 = nn.Linear(backbone_channels, embedding_size)
        self.fc_audioset = nn.Linear(embedding_size, num_classes)
        _init_bn(self.bn0)
        _init_layer(self.fc1)
        _init_layer(self.fc_audioset)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised features (B, 1, T, F) -> feature map (B, C, T', F')."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        x = self.backbone(x).mean(dim=3)
        x = x.amax(dim=2) + x.mean(dim=2)
        x = F.dropout(x, p=self.dropout, training=self.training)
        return F.relu(self.fc1(x))

    def classify(self, embedding: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.fc_audioset(embedding)

    def panns_output(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The official forward's result on log-mel features: `clipwise_output` (sigmoid
        scores) and `embedding` (dropout applied in training, as the official code does)."""
        if x.dim() == 3:
            x = x.unsqueeze(1)
        self.check_input(x)
        embedding = self.forward_features(x)
        return {
            "clipwise_output": torch.sigmoid(self.fc_audioset(embedding)),
            "embedding": F.dropout(embedding, p=0.5, training=self.training),
        }


class ConvBlock(nn.Module):
    """Two 3x3 Conv-BN-ReLU, then average pooling (CNN14's block; official names)."""

    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, in_channels: int, out_channels: int, pool_size: int) -> None:
        super().__init__()
        self.pool_size = pool_size
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        for layer in (self.conv1, self.conv2):
            _init_layer(layer)
        for bn in (self.bn1, self.bn2):
            _init_bn(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, self.pool_size) if self.pool_size > 1 else x


@register_model("panns_cnn14")
class Cnn14(PannsModel):
    """CNN14: six ConvBlocks (64 to 2048 channels), 2048-d embedding; about 80M parameters."""

    CHANNELS = (64, 128, 256, 512, 1024, 2048)

    def __init__(
        self,
        num_classes: int,
        n_mels: int = 64,
        dropout: float = 0.5,
        block_dropout: float = 0.2,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(num_classes, n_mels, 2048, 2048, dropout, gradient_checkpointing)
        check_parameter("block_dropout", block_dropout, 0.0, 1.0)
        self.block_dropout = block_dropout
        in_channels = 1
        for number, channels in enumerate(self.CHANNELS, start=1):
            pool_size = 2 if number < len(self.CHANNELS) else 1
            setattr(self, f"conv_block{number}", ConvBlock(in_channels, channels, pool_size))
            in_channels = channels

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        for number in range(1, len(self.CHANNELS) + 1):
            x = self.run_block(getattr(self, f"conv_block{number}"), x)
            x = F.dropout(x, p=self.block_dropout, training=self.training)
        return x


def _initialised(layers: list[nn.Module]) -> nn.Sequential:
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            _init_layer(layer)
        elif isinstance(layer, nn.BatchNorm2d):
            _init_bn(layer)
    return nn.Sequential(*layers)


def _conv_pool_bn(in_channels: int, out_channels: int, stride: int, groups: int = 1) -> list:
    # PANNs downsample with a stride-1 convolution and a following AvgPool2d(stride) (an
    # identity at stride 1), which is why the official `features.N.k` indices skip a number.
    return [
        nn.Conv2d(in_channels, out_channels, 3, 1, 1, groups=groups, bias=False),
        nn.AvgPool2d(stride),
        nn.BatchNorm2d(out_channels),
    ]


class PannsMobileNet(PannsModel):
    """A PANNs MobileNet: `features` is an nn.Sequential, checkpointed entry by entry."""

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.features:
            x = self.run_block(layer, x)
        return x


# (in channels, out channels, stride) of each depthwise-separable block after the stem.
MOBILENET_V1_BLOCKS = (
    (32, 64, 1),
    (64, 128, 2),
    (128, 128, 1),
    (128, 256, 2),
    (256, 256, 1),
    (256, 512, 2),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 512, 1),
    (512, 1024, 2),
    (1024, 1024, 1),
)


@register_model("panns_mobilenetv1")
class MobileNetV1(PannsMobileNet):
    """PANNs MobileNetV1: a 3x3 stem and 13 depthwise-separable blocks; about 4.8M parameters."""

    def __init__(
        self,
        num_classes: int,
        n_mels: int = 64,
        dropout: float = 0.5,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(num_classes, n_mels, 1024, 1024, dropout, gradient_checkpointing)
        layers = [_initialised([*_conv_pool_bn(1, 32, 2), nn.ReLU()])]
        for in_channels, out_channels, stride in MOBILENET_V1_BLOCKS:
            layers.append(
                _initialised(
                    [
                        *_conv_pool_bn(in_channels, in_channels, stride, groups=in_channels),
                        nn.ReLU(),
                        nn.Conv2d(in_channels, out_channels, 1, bias=False),
                        nn.BatchNorm2d(out_channels),
                        nn.ReLU(),
                    ]
                )
            )
        self.features = nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block with PANNs' layout (`conv` Sequential, pooling after depthwise)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.use_residual = stride == 1 and in_channels == out_channels
        expand = (
            [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
            if expand_ratio != 1
            else []
        )
        self.conv = _initialised(
            [
                *expand,
                *_conv_pool_bn(hidden, hidden, stride, groups=hidden),
                nn.ReLU6(),
                nn.Conv2d(hidden, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expand ratio, out channels, blocks, first stride), MobileNetV2's table.
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 2),
    (6, 160, 3, 1),
    (6, 320, 1, 1),
)


@register_model("panns_mobilenetv2")
class MobileNetV2(PannsMobileNet):
    """PANNs MobileNetV2: 17 inverted residuals and a 1280-channel 1x1 head; about 4.1M
    parameters."""

    def __init__(
        self,
        num_classes: int,
        n_mels: int = 64,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(num_classes, n_mels, 1280, 1024, dropout, gradient_checkpointing)
        layers: list[nn.Module] = [_initialised([*_conv_pool_bn(1, 32, 2), nn.ReLU6()])]
        channels = 32
        for expand_ratio, out_channels, blocks, stride in MOBILENET_V2_STAGES:
            for index in range(blocks):
                layers.append(
                    InvertedResidual(
                        channels, out_channels, stride if index == 0 else 1, expand_ratio
                    )
                )
                channels = out_channels
        layers.append(
            _initialised(
                [nn.Conv2d(channels, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
            )
        )
        self.features = nn.Sequential(*layers)
