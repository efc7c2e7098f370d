"""Datasets: check the listed files, load clips as log-mel tensors, cache them.

Indexing (listing files, splitting, leakage checks) is `audioclf.index`; loaders, workers and
the epoch sampler are `audioclf.loading`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from audioclf.audio import (
    RESAMPLER,
    AudioInfo,
    BadAudioError,
    check_audio,
    check_segment,
    decode_audio,
    file_digest,
    fix_length,
    load_crop,
    load_segment,
    pad_for_random_crop,
    read_bytes,
)
from audioclf.augment import AudioAugment, SpecAugment
from audioclf.cache import FeatureCache, FeatureStore, feature_key, parameters_digest, store_key
from audioclf.features import FEATURE_CODE_VERSION, LogMelParams, log_mel, num_frames
from audioclf.index import Clip, DatasetError
from audioclf.loading import worker_options
from audioclf.normalization import FeatureNormalization

log = logging.getLogger(__name__)

BAD_FILE_POLICIES = ("error", "skip")


# ---------------------------------------------------------------- clips to tensors


@functools.lru_cache(maxsize=64)
def _cached_features_digest(params: LogMelParams, clip_samples: int, crop: str) -> str:
    """The digest of everything besides the audio that shapes cached features."""
    return parameters_digest(
        {
            "features": params.as_dict(),
            "clip_samples": clip_samples,
            "crop": crop,
            "resampler": RESAMPLER,
            "version": FEATURE_CODE_VERSION,
        }
    )


def clip_digest(clip: Clip) -> tuple[str, bytes | None]:
    """The digest of a clip's audio (its file's, and for a part of the file, that part's
    place in it), and the file's bytes when they had to be read for it."""
    digest, data = file_digest(clip.path)
    if clip.segment is None:
        return digest, data
    part = f"{digest}:{clip.offset!r}:{clip.duration!r}".encode()
    return hashlib.blake2b(part, digest_size=16).hexdigest(), data


def clip_waveform(clip: Clip, sample_rate: int, data: bytes | None = None) -> np.ndarray:
    """A clip's mono waveform at `sample_rate`, not yet cropped or padded: its file decoded
    (from `data`, its bytes, when given), or the part of it the clip is."""
    if clip.segment is not None:
        return load_segment(clip.path, sample_rate, clip.offset, clip.duration)[0]
    audio = data if data is not None else read_bytes(clip.path)
    return decode_audio(audio, clip.path, sample_rate)


@dataclass
class SpectrogramDataset(Dataset):
    """Labelled clips as log-mel tensors of shape (1, frames, n_mels).

    Evaluation: the clip centred in `clip_seconds`, features cached. Training without audio
    augmentation: features of the whole clip (zero-padded so that every placement of a short
    clip is possible) are cached, and each access takes a random window of the clip's frame
    count from them. Training with audio augmentation: a random crop of the waveform is
    augmented and its features computed every time (not cached). SpecAugment, in training,
    comes last and is never cached.

    `prepare()` attaches a FeatureStore to a dataset that caches: its items are then slices of
    one memory-mapped array.
    """

    clips: list[Clip]
    classes: list[str]
    sample_rate: int
    clip_seconds: float
    feature_params: LogMelParams
    cache: FeatureCache
    training: bool = False
    audio_augment: AudioAugment | None = None
    spec_augment: SpecAugment | None = None
    store: FeatureStore | None = field(default=None, repr=False)
    normalization: FeatureNormalization | None = None
    multi_label: bool = False
    _label_index: dict[str, int] = field(init=False, repr=False)
    _rng_owner: tuple[int, int] | None = field(default=None, init=False, repr=False)
    _rng: np.random.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._label_index = {label: index for index, label in enumerate(self.classes)}
        unknown = sorted(
            {label for clip in self.clips for label in self._labels(clip)} - set(self._label_index)
        )
        if unknown:
            raise DatasetError(f"labels {unknown} are not among the classes {self.classes}")
        if self.feature_params.sample_rate != self.sample_rate:
            raise ValueError(
                f"feature parameters are for {self.feature_params.sample_rate} Hz, "
                f"the audio is loaded at {self.sample_rate} Hz"
            )

    @property
    def clip_samples(self) -> int:
        """Samples in one fixed-length clip."""
        return round(self.clip_seconds * self.sample_rate)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """The shape of every item's features: (1, frames, n_mels)."""
        return (1, num_frames(self.clip_samples, self.feature_params), self.feature_params.n_mels)

    @property
    def augments_audio(self) -> bool:
        """Whether items are augmented waveforms, computed afresh each time."""
        return self.training and self.audio_augment is not None and self.audio_augment.active

    @property
    def reads_from_store(self) -> bool:
        """Whether every item's cacheable features come from a FeatureStore."""
        return self.store is not None and not self.augments_audio

    def _labels(self, clip: Clip) -> tuple[str, ...]:
        return clip.labels if self.multi_label else (clip.label,)

    def label_index(self, clip: Clip) -> int | torch.Tensor:
        """The class index of a clip; for multi-label data its multi-hot float vector."""
        if not self.multi_label:
            return self._label_index[clip.label]
        target = torch.zeros(len(self.classes))
        target[[self._label_index[label] for label in clip.labels]] = 1.0
        return target

    def __len__(self) -> int:
        return len(self.clips)

    def _generator(self) -> np.random.Generator:
        # One generator per process, seeded from torch's seed: the data loader gives each
        # worker its own seed, and the main process has the run's seed.
        owner = (os.getpid(), torch.initial_seed())
        if self._rng is None or self._rng_owner != owner:
            self._rng = np.random.default_rng(torch.initial_seed())
            self._rng_owner = owner
        return self._rng

    def _parameters_digest(self) -> str:
        crop = "padded" if self.training else "centre"
        return _cached_features_digest(self.feature_params, self.clip_samples, crop)

    def store_key(self) -> str | None:
        """The key of this dataset's FeatureStore; None when it caches nothing or a file cannot
        be read (the per-item pass of `prepare` then names it)."""
        if self.augments_audio or not self.cache.enabled or not self.clips:
            return None
        try:
            digests = [clip_digest(clip)[0] for clip in self.clips]
        except BadAudioError:
            return None
        return store_key(digests, self._parameters_digest())

    def cached_features(self, index: int) -> tuple[np.ndarray, bool]:
        """The deterministic (cacheable) features of an item, and whether they were a hit.

        Raises BadAudioError for an unusable file. For an augmenting training set, which
        caches nothing, this decodes the audio to check it and returns empty features.
        """
        if self.reads_from_store:
            return self.store[index], True
        clip = self.clips[index]
        if self.augments_audio:
            clip_waveform(clip, self.sample_rate)
            return np.empty((0, self.feature_params.n_mels), np.float32), False
        digest, data = clip_digest(clip)

        def compute() -> np.ndarray:
            waveform = clip_waveform(clip, self.sample_rate, data)
            if self.training:
                waveform = pad_for_random_crop(waveform, self.clip_samples)
            else:
                waveform = fix_length(waveform, self.clip_samples)
            return log_mel(waveform, self.feature_params)

        return self.cache.get_or_compute(feature_key(digest, self._parameters_digest()), compute)

    def waveform(self, index: int) -> np.ndarray:
        """An item's waveform as evaluation sees it: decoded, resampled, centred and padded
        or cropped to `clip_samples` (the input of a waveform-in export)."""
        return fix_length(clip_waveform(self.clips[index], self.sample_rate), self.clip_samples)

    def features(self, index: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """The (frames, n_mels) features of an item as training or evaluation sees them:
        cached or augmented, then normalised, then SpecAugment (training).

        `rng` drives the random crop and SpecAugment (default: this process's generator).
        """
        rng = rng if rng is not None else self._generator()
        if self.augments_audio:
            clip = self.clips[index]
            if clip.segment is None:
                waveform = load_crop(clip.path, self.sample_rate, self.clip_samples, rng)
            else:
                waveform = fix_length(clip_waveform(clip, self.sample_rate), self.clip_samples, rng)
            waveform = self.audio_augment(waveform, self.sample_rate)
            features = log_mel(waveform, self.feature_params)
        else:
            features, _ = self.cached_features(index)
            if self.training:
                frames = self.feature_shape[1]
                start = int(rng.integers(0, len(features) - frames + 1))
                features = features[start : start + frames]
        if self.normalization is not None:
            features = self.normalization(features)
        if self.training and self.spec_augment is not None and self.spec_augment.active:
            features = self.spec_augment(features, rng)
        return features

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[tuple[torch.Tensor, int]]:
        """The items of one batch (the DataLoader asks for them together).

        Evaluation items of a store come from one indexed read of the mapped array, which
        saves most of the per-item cost of a warm epoch.
        """
        stacked = self.store.stacked if self.reads_from_store and not self.training else None
        if stacked is None or not all(isinstance(key, int | np.integer) for key in keys):
            return [self[key] for key in keys]
        batch = stacked[np.asarray(keys)]
        if self.normalization is not None:
            batch = self.normalization(batch)
        tensors = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)[:, np.newaxis])
        labels = [self.label_index(self.clips[index]) for index in keys]
        return list(zip(tensors, labels, strict=True))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """Item `key`: an index, or (index, seed) from an EpochSampler, which makes the item's
        randomness (crop, augmentation, SpecAugment) a function of that seed alone."""
        if isinstance(key, tuple):
            index, seed = key
            # audiomentations draws from the global generators: seed them for this item too.
            random.seed(seed)
            np.random.seed(seed % 2**32)
            features = self.features(index, np.random.default_rng(seed))
        else:
            index = key
            features = self.features(index)
        # np.array copies: cached and stored arrays are read-only views.
        tensor = torch.from_numpy(np.array(features, dtype=np.float32)[np.newaxis])
        return tensor, self.label_index(self.clips[index])


def feature_statistics(dataset: SpectrogramDataset) -> FeatureNormalization:
    """Per-mel-bin mean and standard deviation of a dataset's un-augmented features (call it
    on an evaluation view of the training split, after `prepare`)."""
    stacked = dataset.store.stacked if dataset.store is not None else None
    if stacked is not None:
        rows = stacked.reshape(-1, stacked.shape[-1])
        return FeatureNormalization.fit([rows])
    return FeatureNormalization.fit(
        dataset.cached_features(index)[0] for index in range(len(dataset))
    )


# ---------------------------------------------------------------- checking and caching


@dataclass
class PrepareReport:
    """What preparing a dataset found: cache use and the bad files.

    `checked_only` counts clips that were decoded but not cached (augmented training items).
    """

    cache_hits: int = 0
    computed: int = 0
    checked_only: int = 0
    bad_files: list[tuple[str, str]] = field(default_factory=list)


class _PrepareView(Dataset):
    """Each item: (index, cache hit, error message or None); runs in loader workers."""

    def __init__(self, dataset: SpectrogramDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, bool, str | None]:
        try:
            _, hit = self.dataset.cached_features(index)
        except BadAudioError as error:
            return index, False, error.reason
        return index, hit, None


class _CheckView(Dataset):
    """Each item: (index, the file's AudioInfo or None, error message or None) for one clip's
    file; runs in loader workers."""

    def __init__(self, clips: Sequence[Clip]) -> None:
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[int, AudioInfo | None, str | None]:
        clip = self.clips[index]
        try:
            if clip.segment is not None:
                return index, check_segment(clip.path, clip.offset, clip.duration), None
            return index, check_audio(read_bytes(clip.path), clip.path), None
        except BadAudioError as error:
            return index, None, error.reason


def _fit_part(clip: Clip, info: AudioInfo) -> Clip:
    """A checked clip (its part of the file exists) with its file's rate and its own length.
    A part from 0 s to the file's end (NeMo's whole-file rows give their duration) is the
    whole file."""
    available = info.seconds - clip.offset
    if clip.duration is not None and clip.duration < available - 0.5 / info.sample_rate:
        return replace(clip, sample_rate=info.sample_rate, seconds=clip.duration)
    if clip.offset == 0:
        clip = replace(clip, duration=None)
    return replace(clip, sample_rate=info.sample_rate, seconds=available)


def check_clips(
    clips: Sequence[Clip],
    on_bad_file: str = "error",
    num_workers: int = 0,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> tuple[list[Clip], list[tuple[Clip, str]]]:
    """Decode every clip's file once; return the usable clips, each with its file's own
    `sample_rate` and its `seconds` (a part of a file: the part's), and the bad ones with
    reasons (a part that starts past its file's end too).

    `on_bad_file="error"` raises BadAudioError naming the first bad file; "skip" logs each
    once. The main job runs this before splitting, so splits are made of usable files only.
    """
    _check_policy(on_bad_file)
    loader = DataLoader(_CheckView(clips), batch_size=None, **worker_options(num_workers))
    good: dict[int, Clip] = {}
    bad: dict[int, str] = {}
    for index, info, error in progress(loader) if progress is not None else loader:
        clip = clips[index]
        if error is None:
            good[int(index)] = _fit_part(clip, info)
            continue
        if on_bad_file == "error":
            raise BadAudioError(clip.path, error, clip.where)
        log.warning("skipping bad audio file %s: %s", clip.where, error)
        bad[int(index)] = error
    return (
        [good[index] for index in sorted(good)],
        [(clips[index], reason) for index, reason in sorted(bad.items())],
    )


def _check_policy(on_bad_file: str) -> None:
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(
            f"data.on_bad_file must be one of {BAD_FILE_POLICIES}, not {on_bad_file!r}"
        )


def prepare(
    dataset: SpectrogramDataset,
    on_bad_file: str = "error",
    num_workers: int = 0,
    progress: Callable[[Iterable], Iterable] | None = None,
    files_checked: bool = False,
) -> PrepareReport:
    """Decode every clip once, fill the feature cache, and deal with bad files; then attach
    the dataset's FeatureStore, built from the cache when it does not exist yet.

    `files_checked`: `check_clips` has just decoded these files, so a dataset that caches
    nothing (augmented training items) needs no pass at all.

    When a complete store already matches every file's content and the feature parameters,
    the files were checked when it was built: it is attached and nothing else runs.
    `on_bad_file="error"` raises BadAudioError naming the first bad file; "skip" logs each bad
    file once, drops it from `dataset.clips` and counts it in the report.
    """
    _check_policy(on_bad_file)
    report = PrepareReport()
    if files_checked and dataset.augments_audio:
        report.checked_only = len(dataset)
        return report
    dataset.store = None
    key = dataset.store_key()
    if key is not None:
        dataset.store = FeatureStore.open(dataset.cache.store_directory, key)
        if dataset.store is not None:
            report.cache_hits = len(dataset)
            return report
    loader = DataLoader(
        _PrepareView(dataset),
        batch_size=None,
        collate_fn=None,
        **worker_options(num_workers),
    )
    results = progress(loader) if progress is not None else loader
    bad_indices = set()
    for index, hit, error in results:
        if error is None:
            if dataset.augments_audio:
                report.checked_only += 1
            elif hit:
                report.cache_hits += 1
            else:
                report.computed += 1
            continue
        clip = dataset.clips[index]
        path = str(clip.path)
        if on_bad_file == "error":
            raise BadAudioError(path, error, clip.where)
        log.warning("skipping bad audio file %s: %s", clip.where, error)
        report.bad_files.append((path, error))
        bad_indices.add(int(index))
    if bad_indices:
        dataset.clips = [clip for i, clip in enumerate(dataset.clips) if i not in bad_indices]
        key = dataset.store_key()
    if key is not None:
        directory = dataset.cache.store_directory
        items = (dataset.cached_features(index)[0] for index in range(len(dataset)))
        dataset.store = FeatureStore.open(directory, key)
        if dataset.store is None:
            try:
                dataset.store = FeatureStore.build(
                    directory, key, items, dataset.feature_params.n_mels
                )
            except OSError as error:
                log.warning(
                    "feature store %s cannot be written (%s): items are read from the cache "
                    "one by one",
                    directory / key,
                    error.strerror or error,
                )
    return report


def class_counts(dataset: SpectrogramDataset) -> dict[str, int]:
    """Clips per class (multi-label: clips tagged with it), in class order."""
    counts = Counter(label for clip in dataset.clips for label in dataset._labels(clip))
    return {label: counts.get(label, 0) for label in dataset.classes}
