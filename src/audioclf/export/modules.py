"""What is exported: the fused float model or the int8 graph, with the input it takes.

- `InferenceModel`: the run's per-mel-bin normalisation, then the fused eval-mode model.
- `Int8Model`: the converted PT2E graph, on normalised features.
- `WaveformModel`: the log-mel front end (`audioclf.frontend`) and the normalisation in front
  of either, so the file takes raw audio.
- `ChannelLast`: any of them fed channel-last log-mel, as TensorFlow code feeds it.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from audioclf.frontend import LogMelFrontEnd
from audioclf.model import Model
from audioclf.normalization import FeatureNormalization
from audioclf.quant import QuantizedModel


class InferenceModel(nn.Module):
    """Normalisation, then the (fused, eval-mode) model; logits out."""

    def __init__(self, model: Model, normalization: FeatureNormalization | None) -> None:
        super().__init__()
        self.model = model
        n_mels = None if normalization is None else len(normalization.mean)
        mean = np.zeros(1, np.float32) if normalization is None else normalization.mean
        std = np.ones(1, np.float32) if normalization is None else normalization.std
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.n_mels = n_mels

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        if self.n_mels is None:
            return self.model(log_mel)
        return self.model((log_mel - self.mean) / self.std)


def inference_model(model: Model, normalization: FeatureNormalization | None) -> InferenceModel:
    """A fused eval-mode copy of `model` behind its normalisation (the original is untouched)."""
    fused = copy.deepcopy(model).eval().to("cpu", memory_format=torch.contiguous_format)
    fused.fuse_model()
    return InferenceModel(fused, normalization).eval()


class Int8Model(nn.Module):
    """What an int8 export holds: the converted PT2E graph on normalised features (for
    log-mel input the normalisation stays outside, before the input is quantised; the
    sidecar has it)."""

    def __init__(self, quantized: QuantizedModel) -> None:
        super().__init__()
        self.network = quantized.eval().network
        self.backend = quantized.spec.backend

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        return self.network(log_mel)


class WaveformModel(nn.Module):
    """Waveforms `(batch, samples)` -> front end -> normalisation -> `model` -> logits, or
    with `activation` (`softmax`, or `sigmoid` for multi-label) probabilities, for runtimes
    that read scores (MediaPipe's AudioClassifier).

    `model` is an `InferenceModel` without normalisation or an `Int8Model`: the statistics
    are applied here, between the front end and the network.
    """

    def __init__(
        self,
        frontend: LogMelFrontEnd,
        normalization: FeatureNormalization | None,
        model: nn.Module,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        if activation not in (None, "softmax", "sigmoid"):
            raise ValueError(f"activation {activation!r}: softmax, sigmoid or None")
        self.frontend = frontend
        self.normalize = InferenceModel(nn.Identity(), normalization)  # type: ignore[arg-type]
        self.model = model
        self.activation = activation

    @property
    def int8(self) -> bool:
        return isinstance(self.model, Int8Model)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        logits = self.model(self.normalize(self.frontend(waveform)))
        if self.activation == "softmax":
            return torch.softmax(logits, dim=1)
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits


class ChannelLast(nn.Module):
    """`module` fed channel-last input, (batch, frames, mels, 1), as TensorFlow code feeds it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        return self.module(log_mel.permute(0, 3, 1, 2))


def unwrap(module: nn.Module) -> nn.Module:
    """The exported model inside a channel-last or waveform wrapper."""
    if isinstance(module, ChannelLast):
        module = module.module
    if isinstance(module, WaveformModel):
        module = module.model
    return module


def input_name(module: nn.Module) -> str:
    """The name of an exported file's input: `waveform` or `log_mel`."""
    return "waveform" if isinstance(module, WaveformModel) else "log_mel"
