"""Classification heads: embedding (B, D) and optional labels in, logits (B, classes) out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """Dropout then a linear layer; labels are accepted and ignored."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.dropout(embedding))


class ArcFaceHead(nn.Module):
    """Additive angular margin (ArcFace, Deng et al. 2019).

    Logits are `scale * cos(theta)`, theta the angle between the normalised embedding and each
    class centre. In training, when labels are given, the true class's angle grows by `margin`
    (its logit becomes `scale * cos(theta + margin)`), which pulls classes apart. In evaluation,
    or without labels, the plain scaled cosines come back, so predictions need no labels.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        margin: float = 0.2,
        scale: float = 30.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"arcface_margin must be in [0, pi/2) radians, not {margin}")
        self.margin = margin
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        #: `weight` holds `scale` times the unit class centres (`fold()`, for inference).
        self.folded = False

    def fold(self) -> None:
        """Normalise and scale the class centres once, so the head is one bias-free linear
        layer on the unit embedding, for inference and export (`Model.fuse_model()`) and for
        quantization graphs: their int8 weights are then quantized as any linear layer's,
        instead of computing norms of int8 weights at run time, which TFLite gets wrong.
        The logits stay the same. Labels are ignored from then on (no margin); a QAT graph,
        captured without labels, had none anyway."""
        if not self.folded:
            with torch.no_grad():
                self.weight.copy_(self.scale * F.normalize(self.weight))
            self.folded = True

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.folded:
            return F.linear(_unit(self.dropout(embedding)), self.weight)
        cosine = F.linear(_unit(self.dropout(embedding)), F.normalize(self.weight))
        if labels is None or not self.training:
            return self.scale * cosine
        sine = torch.sqrt((1.0 - cosine * cosine).clamp_min(1e-7))
        with_margin = cosine * math.cos(self.margin) - sine * math.sin(self.margin)
        # Past theta = pi - margin, cos(theta + margin) would rise again; ArcFace continues with
        # a linear penalty there so the target logit keeps falling as the angle grows.
        with_margin = torch.where(
            cosine > math.cos(math.pi - self.margin),
            with_margin,
            cosine - math.sin(math.pi - self.margin) * self.margin,
        )
        is_target = F.one_hot(labels, cosine.shape[1]).bool()
        return self.scale * torch.where(is_target, with_margin, cosine)

    def extra_repr(self) -> str:
        classes, features = self.weight.shape
        return f"{features} -> {classes}, margin={self.margin}, scale={self.scale}"


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """Each row of a batch divided by its L2 norm (at least 1e-12), as `F.normalize(rows)`.

    Written for TFLite's dynamic batch: litert-torch cannot lower `F.normalize`'s `expand_as`
    over it, and a `keepdim` norm becomes a RESHAPE to the batch traced at conversion, which
    fails at any other batch. Dividing the transposed rows broadcasts without either. (The
    class centres keep `F.normalize`: their shape is fixed, and a QAT graph's per-channel
    int8 weights cannot be transposed in TFLite.)"""
    return (rows.t() / torch.linalg.vector_norm(rows, dim=1).clamp_min(1e-12)).t()


def fold_arcface(model: nn.Module) -> int:
    """`ArcFaceHead.fold()` every ArcFace head of `model`, in place; return how many."""
    heads = [module for module in model.modules() if isinstance(module, ArcFaceHead)]
    for head in heads:
        head.fold()
    return len(heads)
