"""Losses against hand computations: distillation, mixup, label smoothing, class weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audioclf.dataset import SpectrogramDataset
from audioclf.features import resolve_params
from audioclf.index import Clip
from audioclf.losses import classification_loss, distillation_loss, mixup
from audioclf.pipeline import class_weights
from conftest import (
    fsdd_clip,
)


def test_distillation_loss_against_a_hand_computation():
    student = torch.tensor([[2.0, 0.5, -1.0]])
    teacher = torch.tensor([[1.0, 3.0, 0.0]])
    target = torch.tensor([1])
    alpha, temperature = 0.3, 2.0

    def softmax(values):
        exp = np.exp(values - values.max())
        return exp / exp.sum()

    s, t = student.numpy()[0], teacher.numpy()[0]
    hard = -np.log(softmax(s)[1])
    p_t, p_s = softmax(t / temperature), softmax(s / temperature)
    soft = float(np.sum(p_t * np.log(p_t / p_s)))
    expected = alpha * hard + (1 - alpha) * temperature**2 * soft
    loss = distillation_loss(student, teacher, target, alpha, temperature)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Class weights weigh the term on the labels (a weighted mean over the batch).
    weights = torch.tensor([1.0, 4.0, 1.0])
    pair = (torch.cat([student, teacher]), torch.cat([teacher, student]), torch.tensor([1, 0]))
    weighted = distillation_loss(*pair, alpha, temperature, class_weights=weights)
    hard = F.cross_entropy(pair[0], pair[2], weight=weights)
    soft = distillation_loss(*pair, 0.0, temperature)
    assert float(weighted) == pytest.approx(float(alpha * hard + (1 - alpha) * soft), rel=1e-5)


def test_mixup_blends_features_and_targets_with_one_weight():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3])
    # Each example's feature is its label, so a mixed feature is the soft target's mean label.
    mixed, soft, dominant, _ = mixup(labels.float().view(4, 1, 1, 1), labels, 0.4, 4)
    assert torch.allclose(soft.sum(dim=1), torch.ones(4))
    assert torch.allclose(mixed.flatten(), soft @ torch.arange(4.0), atol=1e-6)
    assert torch.equal(dominant, soft.argmax(dim=1))


def test_label_smoothing_against_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    smoothing = 0.1
    log_p = torch.log_softmax(logits, 1)[0].numpy()
    # The true class keeps 1 - smoothing + smoothing / C, the others get smoothing / C each.
    expected = -((1 - smoothing + smoothing / 3) * log_p[0] + smoothing / 3 * log_p[1:].sum())
    loss = classification_loss(logits, torch.tensor([0]), label_smoothing=smoothing)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_multi_label_smoothing_moves_targets_towards_one_half():
    logits = torch.tensor([[1.0, -2.0]])
    p = 1 / (1 + np.exp(-logits[0].numpy()))
    # Targets (1, 0) with smoothing 0.2 become (0.9, 0.1); BCE is the mean over the classes.
    expected = -np.mean(
        [0.9 * np.log(p[0]) + 0.1 * np.log(1 - p[0]), 0.1 * np.log(p[1]) + 0.9 * np.log(1 - p[1])]
    )
    loss = classification_loss(
        logits, torch.tensor([[1, 0]]), multi_label=True, label_smoothing=0.2
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_class_weights_weigh_each_class_term():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    targets = torch.tensor([0, 1])
    weighted = classification_loss(logits, targets, class_weights=torch.tensor([1.0, 0.0]))
    assert float(weighted) == pytest.approx(float(F.cross_entropy(logits[:1], targets[:1])))


def _labelled(labels: list[str], classes: list[str], multi_label: bool) -> SpectrogramDataset:
    clips = [Clip(fsdd_clip(1), label) for label in labels]  # no file is read
    params = resolve_params("librosa", 8000)
    return SpectrogramDataset(clips, classes, 8000, 0.5, params, None, multi_label=multi_label)


def test_class_weights_make_every_class_weigh_the_same_in_total():
    dataset = _labelled(["a"] * 6 + ["b"] * 3 + ["c"], ["a", "b", "c"], multi_label=False)
    weights = class_weights(dataset)
    # N / (C * n_c): 10 / 18, 10 / 9, 10 / 3; each class's clips then sum to N / C.
    assert weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert (weights * torch.tensor([6.0, 3.0, 1.0])).tolist() == pytest.approx([10 / 3] * 3)


def test_multi_label_class_weights_are_negatives_over_positives():
    dataset = _labelled(["a;b", "a", "a", "b"], ["a", "b", "c"], multi_label=True)
    # (N - n_c) / n_c with N = 4 clips: a is on 3, b on 2, c on none (counted as 1).
    assert class_weights(dataset).tolist() == pytest.approx([1 / 3, 1.0, 4.0])
