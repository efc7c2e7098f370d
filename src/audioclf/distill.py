"""Knowledge distillation: a frozen teacher's logits as soft targets for the student.

A teacher that takes the student's own features runs on every training batch as the student
sees it (`Trainer(teacher=...)`). A teacher with features of its own (a PANNs teacher at
32 kHz for a student at 8 kHz) cannot see the student's batch: its logits are computed once
per training clip, on the clean clip with its own features, and travel with the student's
items (`WithTeacherLogits`), the way EfficientAT distils from stored teacher predictions.
`build_teacher` chooses between the two for a `teacher_model` section.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from audioclf.checkpoint import load_checkpoint, stored_config, stored_normalization
from audioclf.dataset import SpectrogramDataset, prepare
from audioclf.model import CheckpointError, Model, load_state, read_state_dict
from audioclf.normalization import FeatureNormalization
from audioclf.pipeline import build_model, feature_params
from audioclf.settings import Settings


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


def build_teacher(
    settings: Settings,
    train: SpectrogramDataset,
    normalization: FeatureNormalization | None,
    device: torch.device,
) -> tuple[Model | None, torch.Tensor | None, str]:
    """The `teacher_model`: (teacher for every batch, None, how) when it takes the student's
    features, else (None, its logits for each training clip, how).

    A trainer checkpoint brings its own features, clip length and normalisation and must know
    the student's classes; any other state_dict (official PANNs weights fine-tuned elsewhere,
    say) shares the student's features and must have the student's class count.
    """
    teacher_config = settings.teacher_model
    path = teacher_config.checkpoint_path
    try:
        content = load_checkpoint(path)
    except CheckpointError:
        content = None  # not one of ours: read below as a bare state_dict, or named there
    if content is None:
        model = build_model(teacher_config, len(train.classes), train.feature_params.n_mels)
        load_state(model, read_state_dict(path), path, strict=True)
        return model, None, "online, on the student's features"
    if "quantized" in content:
        raise CheckpointError(
            f"teacher_model.checkpoint_path {path} is an int8 checkpoint; teach with its float one"
        )
    if content["classes"] != train.classes:
        raise CheckpointError(
            f"teacher_model.checkpoint_path {path}: trained for classes {content['classes']}, "
            f"the student learns {train.classes}"
        )
    _, taught = stored_config(content, path)
    params = feature_params(taught)
    # Its own mel bins: a PANNs teacher's bn0 has one channel per bin of its features.
    model = build_model(taught.model, len(train.classes), params.n_mels)
    load_state(model, content["model"], path, strict=True)
    own_normalization = stored_normalization(content, path)
    if (
        params == train.feature_params
        and taught.data.clip_seconds == train.clip_seconds
        and _same_normalization(own_normalization, normalization)
    ):
        return model, None, "online, on the student's features"
    view = SpectrogramDataset(
        clips=train.clips,
        classes=train.classes,
        sample_rate=taught.data.sample_rate,
        clip_seconds=taught.data.clip_seconds,
        feature_params=params,
        cache=train.cache,
        normalization=own_normalization,
    )
    prepare(view, num_workers=settings.system.num_workers)
    logits = compute_teacher_logits(model, view, settings.training.batch_size, device)
    return None, logits, f"logits of {len(logits)} clean clips at {params.sample_rate} Hz, cached"


def _same_normalization(
    first: FeatureNormalization | None, second: FeatureNormalization | None
) -> bool:
    if first is None or second is None:
        return first is second
    return np.array_equal(first.mean, second.mean) and np.array_equal(first.std, second.std)
