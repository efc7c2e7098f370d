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
        """For inference and export (`Model.fuse_model()`), in eval mode: normalise and scale
        the class centres once, so the head is one bias-free linear layer on the unit
        embedding. The logits stay the same; an int8 graph quantizes that layer's weights as
        any other's instead of computing their norms at run time."""
        if self.training:
            raise RuntimeError("fuse_model() folds the ArcFace head: call model.eval() first")
        if not self.folded:
            with torch.no_grad():
                self.weight.copy_(self.scale * _unit(self.weight))
            self.folded = True

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.folded:
            return F.linear(_unit(self.dropout(embedding)), self.weight)
        cosine = F.linear(_unit(self.dropout(embedding)), _unit(self.weight))
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
    """Each row divided by its L2 norm (at least 1e-12), as `F.normalize(rows)`.

    Written for TFLite's dynamic batch: litert-torch cannot lower `F.normalize`'s `expand_as`
    over it, and a `keepdim` norm becomes a RESHAPE to the batch traced at conversion, which
    fails at any other batch. Dividing the transposed rows broadcasts without either."""
    return (rows.t() / (rows * rows).sum(dim=1).sqrt().clamp_min(1e-12)).t()
