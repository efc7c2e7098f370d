"""Training-time augmentation: audio transforms (audiomentations) and SpecAugment."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import audiomentations
import numpy as np
from audiomentations.core.transforms_interface import BaseWaveformTransform
from audiomentations.core.utils import find_audio_files_in_paths

from audioclf.typed_config import close_matches

# Short names for the transforms users reach for most; any audiomentations class name works too.
TRANSFORM_NAMES = {
    "gaussian_noise": "AddGaussianNoise",
    "gaussian_snr": "AddGaussianSNR",
    "gain": "Gain",
    "time_shift": "Shift",
    "time_stretch": "TimeStretch",
    "pitch_shift": "PitchShift",
}


class AudioAugment:
    """A list of waveform transforms, each applied with its own probability `p`."""

    def __init__(self, transforms: Sequence[Mapping[str, Any]]) -> None:
        """Args:
        transforms: `{name, p, **arguments}` items; `name` is a key of `TRANSFORM_NAMES` or
            an audiomentations transform class name.
        """
        built = [_build_transform(index, spec) for index, spec in enumerate(transforms)]
        self.transforms = [transform for transform in built if transform.p > 0]
        self._compose = audiomentations.Compose(self.transforms, p=1.0)

    @property
    def active(self) -> bool:
        """Whether any transform can fire."""
        return bool(self.transforms)

    def __call__(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        # audiomentations draws from the global `random` and `np.random` states, which the
        # data loader seeds per worker.
        augmented = self._compose(samples=waveform, sample_rate=sample_rate)
        return np.ascontiguousarray(augmented, dtype=np.float32)


def _build_transform(index: int, spec: Mapping[str, Any]) -> BaseWaveformTransform:
    item = f"augmentations.audio.transforms[{index}]"
    arguments = dict(spec)
    name = arguments.pop("name", None)
    if name is None:
        raise ValueError(f"{item} has no 'name'")
    if "p" not in arguments:
        raise ValueError(f"{item} ({name}) has no 'p'")
    probability = arguments["p"]
    is_number = isinstance(probability, int | float) and not isinstance(probability, bool)
    if not (is_number and 0 <= probability <= 1):
        raise ValueError(f"{item}.p ({name}) must be a probability in [0, 1], not {probability!r}")
    class_name = TRANSFORM_NAMES.get(name, name)
    transform_class = getattr(audiomentations, class_name, None)
    if not (
        isinstance(transform_class, type) and issubclass(transform_class, BaseWaveformTransform)
    ):
        raise ValueError(
            f"{item}: unknown transform {name!r}; use one of "
            f"{sorted(TRANSFORM_NAMES)} or an audiomentations class name"
        )
    accepted = inspect.signature(transform_class).parameters
    unknown = [key for key in arguments if key not in accepted]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        close = [f"{item}.{match}" for key in unknown for match in close_matches(key, accepted)]
        raise ValueError(
            f"{', '.join(f'{item}.{key}' for key in unknown)}: no such argument of {class_name}"
            + (f"; did you mean {' or '.join(close)}?" if close else "")
            + f" ({class_name} takes {', '.join(accepted)})"
        )
    for key, value in arguments.items():
        if key.endswith("_path"):  # sounds_path, ir_path: audio files or folders of them
            _check_sound_paths(f"{item}.{key}", value)
    try:
        return transform_class(**arguments)
    # audiomentations checks its arguments with assert statements (min <= max, ranges).
    except (TypeError, ValueError, AssertionError) as error:
        reason = str(error) or f"{class_name} refused them (its assert failed)"
        raise ValueError(f"{item} ({name}): bad arguments {arguments}: {reason}") from error


def _check_sound_paths(key: str, value: Any) -> None:
    """A transform's `*_path` argument (a path or a list of them) names audio files or folders
    that hold some: audiomentations finds none in a missing path and stops on a bare assert."""
    paths = [value] if isinstance(value, str | Path) else list(value)
    for path in paths:
        if not Path(path).exists():
            raise ValueError(f"{key}: no such file or folder {str(path)!r}")
    if not find_audio_files_in_paths(paths):
        raise ValueError(f"{key}: no audio files in {[str(path) for path in paths]}")


@dataclass(frozen=True)
class SpecAugment:
    """Time and frequency masks on a (frames, mel_bins) array (Park et al., 2019).

    Each mask has a width drawn uniformly from 0 to its maximum and a uniform start; masked
    cells take `mask_value` ("mean": the example's mean, or a number).
    """

    time_masks: int = 2
    time_mask_max_frames: int = 10
    freq_masks: int = 2
    freq_mask_max_bins: int = 8
    mask_value: float | str = "mean"

    @property
    def active(self) -> bool:
        """Whether any mask can be non-empty."""
        return (self.time_masks > 0 and self.time_mask_max_frames > 0) or (
            self.freq_masks > 0 and self.freq_mask_max_bins > 0
        )

    def __call__(self, features: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        masked = features.copy()
        fill = float(features.mean()) if self.mask_value == "mean" else float(self.mask_value)
        for axis, count, max_width in (
            (0, self.time_masks, self.time_mask_max_frames),
            (1, self.freq_masks, self.freq_mask_max_bins),
        ):
            size = masked.shape[axis]
            for _ in range(count):
                width = int(rng.integers(0, min(max_width, size) + 1))
                start = int(rng.integers(0, size - width + 1))
                index = [slice(None), slice(None)]
                index[axis] = slice(start, start + width)
                masked[tuple(index)] = fill
        return masked
