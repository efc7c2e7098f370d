"""Knowledge distillation: a frozen teacher's logits as soft targets for the student.

A teacher that takes the student's own features runs on every training batch as the student
sees it (`Trainer(teacher=...)`). A teacher with features of its own (a PANNs teacher at
32 kHz for a student at 8 kHz) cannot see the student's batch: its logits are computed once
per training clip, on the clean clip with its own features, and travel with the student's
items (`WithTeacherLogits`), the way EfficientAT distils from stored teacher predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from audioclf.dataset import SpectrogramDataset


@torch.no_grad()
def compute_teacher_logits(
    teacher: nn.Module, dataset: SpectrogramDataset, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The teacher's logits (N, C) for every item of an evaluation-mode dataset, in order."""
    if dataset.training:
        raise ValueError("teacher logits are computed on an evaluation view (training=False)")
    teacher = teacher.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return torch.cat([teacher(features.to(device)).float().cpu() for features, *_ in loader])


class WithTeacherLogits(Dataset):
    """A dataset's items `(features, label)` extended to `(features, label, teacher_logits)`.

    Keys are passed through unchanged (an index, or an EpochSampler's `(index, seed)`).
    """

    def __init__(self, dataset: SpectrogramDataset, logits: torch.Tensor) -> None:
        if len(logits) != len(dataset):
            raise ValueError(f"{len(logits)} teacher logits for {len(dataset)} items")
        self.dataset = dataset
        self.logits = logits

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def reads_from_store(self) -> bool:
        """As the wrapped dataset (loaders keep store-backed datasets in process)."""
        return self.dataset.reads_from_store

    def __getattr__(self, name: str) -> Any:
        # Everything else (clips, classes, feature_shape, ...) is the wrapped dataset's.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, torch.Tensor]:
        features, label = self.dataset[key]
        index = key[0] if isinstance(key, tuple) else key
        return features, label, self.logits[index]

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[tuple]:
        return [self[key] for key in keys]
