"""Per-mel-bin feature normalisation: statistics computed once on the training split,
applied to every split, stored in checkpoints and export sidecars."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class FeatureNormalization:
    """Per-mel-bin mean and standard deviation: `(features - mean) / std`.

    Computed once on the training split, applied to every split, and stored in checkpoints
    and export sidecars, so inference normalises exactly as training did.
    """

    mean: np.ndarray
    std: np.ndarray

    #: The smallest std divided by: a constant mel bin (silence, a band-limited set) stays finite.
    MIN_STD: ClassVar[float] = 1e-5

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.std).astype(np.float32, copy=False)

    @classmethod
    def fit(cls, arrays: Iterable[np.ndarray]) -> FeatureNormalization:
        """Statistics over the rows of (frames, n_mels) arrays, accumulated in float64."""
        total, total_squares, rows = 0.0, 0.0, 0
        for array in arrays:
            data = np.asarray(array, dtype=np.float64)
            total = total + data.sum(axis=0)
            total_squares = total_squares + (data * data).sum(axis=0)
            rows += len(data)
        if rows == 0:
            raise ValueError("no features to compute normalisation statistics from")
        mean = total / rows
        variance = np.maximum(total_squares / rows - mean * mean, 0.0)
        std = np.maximum(np.sqrt(variance), cls.MIN_STD)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def after(self, first: FeatureNormalization | None) -> FeatureNormalization:
        """`first`, then this one, as one normalisation (this one alone when `first` is None):
        `((x - m1) / s1 - m2) / s2 = (x - (m1 + m2 * s1)) / (s1 * s2)`."""
        if first is None:
            return self
        return FeatureNormalization(
            (first.mean + self.mean * first.std).astype(np.float32),
            (first.std * self.std).astype(np.float32),
        )

    def as_lists(self) -> dict[str, list[float]]:
        """Plain lists, for JSON sidecars and checkpoints."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_lists(cls, values: Mapping[str, Any]) -> FeatureNormalization:
        """The inverse of `as_lists`; ValueError when the values are not two equal-length
        lists of finite numbers with positive std."""
        mean = np.asarray(values["mean"], dtype=np.float32)
        std = np.asarray(values["std"], dtype=np.float32)
        if mean.ndim != 1 or mean.shape != std.shape or not np.isfinite([mean, std]).all():
            raise ValueError("normalisation statistics must be equal-length lists of numbers")
        if (std <= 0).any():
            raise ValueError("normalisation std must be positive")
        return cls(mean, std)
