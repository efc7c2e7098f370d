"""Training losses: classification (multi-class or multi-label), mixup, distillation."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from audioclf.settings import DistillationConfig


def classification_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    multi_label: bool = False,
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy on class indices or class probabilities (B, C), or for multi-label
    targets (multi-hot, B x C) binary cross-entropy on the logits.

    `label_smoothing` moves that much of each target's mass to a uniform spread (multi-label:
    towards 0.5); `class_weights` (C,) weighs each class's term (multi-label: its positive
    term, as BCE's `pos_weight`, the usual weighting for rare positive labels).
    """
    logits = logits.float()
    if multi_label:
        targets = targets.float()
        if label_smoothing > 0:
            targets = targets * (1 - label_smoothing) + 0.5 * label_smoothing
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=class_weights)
    return F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing)


def mixup(
    features: torch.Tensor, targets: torch.Tensor, alpha: float, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Mixup (Zhang et al., 2018): each example blended with another of the batch.

    Returns the mixed features, the mixed targets as class probabilities (B, C), the hard
    label of the larger share of each example (for margin heads such as ArcFace), and the
    blend itself, to mix anything else per example the same way (precomputed teacher
    logits). Draws from torch's global generator, which the trainer seeds per epoch.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = torch.randperm(features.shape[0], device=features.device)

    def blend(values: torch.Tensor) -> torch.Tensor:
        return lam * values + (1 - lam) * values[partner]

    soft = targets.float() if targets.dim() == 2 else F.one_hot(targets, num_classes).float()
    dominant = targets if lam >= 0.5 else targets[partner]
    return blend(features), blend(soft), dominant, blend


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
    multi_label: bool = False,
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    Multi-label: the same with BCE on the targets and BCE between the teacher's and the
    student's sigmoid outputs at temperature T. `label_smoothing` and `class_weights` apply
    to the term on the targets, as in `classification_loss`.
    """
    student_logits = student_logits.float()
    teacher_logits = teacher_logits.float().detach()
    hard = classification_loss(student_logits, targets, multi_label, label_smoothing, class_weights)
    scaled_student = student_logits / temperature
    scaled_teacher = teacher_logits / temperature
    if multi_label:
        soft = F.binary_cross_entropy_with_logits(scaled_student, torch.sigmoid(scaled_teacher))
    else:
        soft = F.kl_div(
            F.log_softmax(scaled_student, dim=1),
            F.log_softmax(scaled_teacher, dim=1),
            reduction="batchmean",
            log_target=True,
        )
    return alpha * hard + (1 - alpha) * temperature**2 * soft


def training_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    multi_label: bool,
    label_smoothing: float,
    class_weights: torch.Tensor | None,
    distillation: DistillationConfig,
) -> torch.Tensor:
    """A training batch's loss: `classification_loss`, or with a teacher's logits
    `distillation_loss` at `distillation`'s alpha and temperature."""
    if teacher_logits is None:
        return classification_loss(logits, targets, multi_label, label_smoothing, class_weights)
    return distillation_loss(
        logits,
        teacher_logits,
        targets,
        distillation.alpha,
        distillation.temperature,
        multi_label,
        label_smoothing,
        class_weights,
    )
