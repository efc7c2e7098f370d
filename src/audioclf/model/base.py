"""`Model`: the interface every architecture shares.

Input: a batch of log-mel features from the data pipeline, `(B, 1, T, F)` (what the dataset
yields, batched) or `(B, T, F)`; T frames and F mel bins, any sizes the architecture's
downsampling allows (`min_input_size`). Output: logits `(B, num_classes)`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from audioclf.model.heads import fold_arcface
from audioclf.model.layers import fuse_conv_bn
from audioclf.normalization import FeatureNormalization


class Model(nn.Module):
    """Base of every registered architecture.

    Subclasses build `forward_features` (features -> embedding) and a classifier stored under
    `classifier_name`; this class adds the shared input handling, `fuse_model()`, backbone
    freezing and gradient checkpointing.
    """

    #: Attribute holding the class layer: trained when the backbone is frozen, and replaced
    #: when a pretrained checkpoint has another number of classes.
    classifier_name = "classifier"
    #: Smallest (frames, mel bins) the architecture's downsampling accepts.
    min_input_size = (1, 1)
    #: Whether the model normalises its input itself (PANNs' bn0): the data pipeline's
    #: per-mel-bin normalisation (`features.normalize`) is then left off.
    normalizes_input = False
    #: The BatchNorm over the input's mel bins of a model that normalises its input itself
    #: (PANNs' `bn0`): int8 models take it out of their graph (`take_input_normalization`).
    input_batch_norm: str | None = None

    def __init__(self, num_classes: int, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a whole number >= 1, not {num_classes!r}")
        self.num_classes = num_classes
        self.gradient_checkpointing = gradient_checkpointing
        self.backbone_frozen = False
        #: Mel bins the model is built for, when it has per-bin layers (PANNs' bn0); else None.
        self.n_mels: int | None = None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, 1, T, F) -> embedding (B, D)."""
        raise NotImplementedError

    def classify(self, embedding: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Embedding (B, D) -> logits; labels matter only to margin heads in training."""
        return self.get_submodule(self.classifier_name)(embedding, labels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        # A trace records tensor ops only; the checks would just warn there.
        if not torch.jit.is_tracing():
            self.check_input(x)
        return self.classify(self.forward_features(x), labels)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError naming the shape when `x` is not features this model takes."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(
                f"{type(self).__name__} takes log-mel features (B, 1, frames, mels) or "
                f"(B, frames, mels), not shape {tuple(x.shape)}"
            )
        frames, mels = x.shape[-2:]
        if frames < self.min_input_size[0] or mels < self.min_input_size[1]:
            raise ValueError(
                f"{type(self).__name__} needs at least {self.min_input_size[0]} frames and "
                f"{self.min_input_size[1]} mel bins, got {frames} x {mels}"
            )
        if self.n_mels is not None and mels != self.n_mels:
            raise ValueError(
                f"{type(self).__name__} is built for {self.n_mels} mel bins (params.n_mels), "
                f"got features with {mels}"
            )

    def take_input_normalization(self) -> FeatureNormalization | None:
        """Replace the input BatchNorm (`input_batch_norm`) by an identity and return what it
        computed in eval mode as a per-mel-bin normalisation, `(x - mean) / std`. None, the
        model unchanged, when it has none, keeps no running statistics or scales a bin by
        zero or less (a normalisation's std is positive).

        Int8 models take it so: PANNs' `bn0` normalises before the first convolution's zero
        padding, so it cannot fold into that convolution, and kept in the graph it stays in
        float, before the input is quantised."""
        name = self.input_batch_norm
        layer = None if name is None else self.get_submodule(name)
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm) or layer.running_var is None:
            return None
        with torch.no_grad():
            variance = layer.running_var.double() + layer.eps
            scale = torch.rsqrt(variance)
            if layer.weight is not None:
                scale = scale * layer.weight.double()
            shift = -layer.running_mean.double() * scale
            if layer.bias is not None:
                shift = shift + layer.bias.double()
        if not (torch.isfinite(scale).all() and (scale > 0).all() and torch.isfinite(shift).all()):
            return None
        # x * scale + shift = (x - mean) / std
        mean, std = (-shift / scale).numpy(), (1.0 / scale).numpy()
        parent, _, child = name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, child, nn.Identity())
        return FeatureNormalization(mean.astype(np.float32), std.astype(np.float32))

    def run_block(
        self, block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """`block(x)`, recomputed in backward instead of stored when checkpointing is on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def fuse_model(self) -> Model:
        """Fold BatchNorm into the preceding convolutions, and an ArcFace head's class-centre
        normalisation into its weights, in place, for inference and export.

        The model must be in eval mode; its outputs stay the same (within float rounding).
        Activations stay separate modules. Returns the model.
        """
        fuse_conv_bn(self)
        fold_arcface(self)
        return self

    def freeze_backbone(self) -> None:
        """Train only the classifier: every other parameter stops needing gradients, and the
        backbone's BatchNorm layers keep their statistics (they stay in eval mode)."""
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        for parameter in self.get_submodule(self.classifier_name).parameters():
            parameter.requires_grad_(True)
        self.backbone_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> Model:
        super().train(mode)
        if self.backbone_frozen:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    parameter.requires_grad for parameter in module.parameters()
                ):
                    module.eval()
        return self


def check_parameter(name: str, value: float, low: float, high: float | None = None) -> None:
    """Raise ValueError naming `name` unless low <= value (< high, when given)."""
    if value < low or (high is not None and value >= high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be {allowed}, not {value}")
