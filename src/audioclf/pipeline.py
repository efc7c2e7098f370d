"""From checked settings to the run's data and model: datasets, normalisation, loaders.

The main job (`audioclf.cli.run`) calls these in order; each takes the settings dataclasses
(never a DictConfig) and works from Python as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from audioclf.augment import AudioAugment, SpecAugment
from audioclf.cache import FeatureCache
from audioclf.dataset import (
    SpectrogramDataset,
    check_clips,
    class_counts,
    feature_statistics,
    prepare,
)
from audioclf.features import LogMelParams, num_frames, resolve_params
from audioclf.index import DatasetError, DatasetIndex, Listing, drop_duplicates, split_listing
from audioclf.layouts import index_folder, index_fsd50k, index_fsdd
from audioclf.loading import EpochSampler, balanced_weights, make_loader
from audioclf.manifest import index_manifest, index_split_manifests
from audioclf.model import CheckpointError, Model, ModelError, create_model
from audioclf.model.pretrained import load_file
from audioclf.normalization import FeatureNormalization
from audioclf.settings import ConfigError, DataConfig, ModelConfig, Settings, SplitManifests
from audioclf.speech_commands import index_speech_commands


def feature_params(settings: Settings) -> LogMelParams:
    """The resolved log-mel parameters of `features` at `data.sample_rate`, long enough for
    one frame of a `data.clip_seconds` clip."""
    data = settings.data
    try:
        params = resolve_params(
            settings.features.preset, data.sample_rate, **settings.features.overrides()
        )
    except ValueError as error:
        raise ConfigError(f"features: {error}") from error
    clip_samples = round(data.clip_seconds * data.sample_rate)
    try:
        num_frames(clip_samples, params)
    except ValueError as error:
        raise ConfigError(
            f"data.clip_seconds={data.clip_seconds} is too short for the features: {error}"
        ) from error
    return params


def list_dataset(data: DataConfig, generated_dir: Path | None = None) -> Listing:
    """List the configured dataset's clips, duplicates dropped (not yet split).

    `generated_dir`: where clips that a layout makes go (the keyword task's `_silence_`).
    """
    if data.format == "manifest" and isinstance(data.manifest, SplitManifests):
        manifests = {
            split: [Path(path) for path in paths] for split, paths in data.manifest.given().items()
        }
        for split, paths in manifests.items():
            for number, path in enumerate(paths):
                if not path.is_file():
                    key = f"data.manifest.{split}" + (f"[{number}]" if len(paths) > 1 else "")
                    raise ConfigError(f"{key}: no such file {str(path)!r}")
        listing = index_split_manifests(
            manifests,
            Path(data.root) if data.root else None,
            data.val_fraction,
            data.multi_label,
            data.column_map(),
        )
    elif data.format == "manifest":
        if not data.manifest or not Path(data.manifest).is_file():
            raise ConfigError(f"data.manifest: no such file {data.manifest!r}")
        listing = index_manifest(
            Path(data.manifest),
            Path(data.root) if data.root else None,
            data.val_fraction,
            data.test_fraction,
            data.val_fold,
            data.test_fold,
            data.multi_label,
            data.column_map(),
        )
    elif not data.root or not Path(data.root).is_dir():
        raise ConfigError(
            f"data.root: no such folder {data.root!r} (relative paths start at "
            f"{Path.cwd()}; set data.root=/path/to/clips)"
        )
    elif data.format == "fsdd":
        listing = index_fsdd(Path(data.root))
    elif data.format == "speech_commands":
        listing = index_speech_commands(
            Path(data.root),
            data.words,
            unknown_fraction=data.unknown_fraction,
            silence_fraction=data.silence_fraction,
            seed=data.split_seed,
            silence_dir=None
            if generated_dir is None
            else generated_dir / "speech_commands_silence",
            sample_rate=data.sample_rate,
            clip_seconds=data.clip_seconds,
        )
    elif data.format == "fsd50k":
        listing = index_fsd50k(Path(data.root))
    else:
        listing = index_folder(Path(data.root), data.val_fraction, data.test_fraction)
    return drop_duplicates(listing)


def build_datasets(
    settings: Settings,
    classes: Sequence[str] | None = None,
) -> tuple[DatasetIndex, dict[str, SpectrogramDataset], list[dict[str, str]]]:
    """Check the configured files, split the usable ones, and build train / val / test.

    `classes`: those of a trained model that the data is tested on (no training split needed;
    see `split_listing`). Returns the index, the datasets and the bad files dropped (with
    `on_bad_file=skip`).
    """
    data = settings.data
    params = feature_params(settings)
    augmentations = settings.augmentations
    spec_augment = SpecAugment(**dataclasses.asdict(augmentations.spec_augment))
    try:
        audio_augment = AudioAugment(augmentations.audio.transforms)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    cache = FeatureCache(settings.system.cache_dir, enabled=settings.system.cache)
    cache.check()
    listing = list_dataset(data, Path(settings.system.cache_dir))
    good, bad = check_clips(
        listing.clips,
        data.on_bad_file,
        num_workers=settings.system.num_workers,
        progress=lambda items: tqdm(items, desc="check files", leave=False, disable=None),
    )
    listing.clips = good
    index = split_listing(
        listing,
        data.split_seed,
        multi_label=data.multi_label,
        classes=classes,
        class_order=data.class_names,
    )
    if settings.run.train and not index.splits["val"]:
        if listing.fractions.get("val", 0) > 0:
            how = (
                f"data.val_fraction={data.val_fraction} took no clip, as no class has 2 clips "
                "(one to train on, one to validate on); add clips"
            )
        else:
            how = "set data.val_fraction above 0 (or add val clips or a data.val_fold)"
        raise DatasetError(
            f"{listing.source}: the validation split is empty, and training validates every "
            f"epoch; {how}"
        )
    datasets = {
        split: SpectrogramDataset(
            clips=clips,
            classes=index.classes,
            sample_rate=data.sample_rate,
            clip_seconds=data.clip_seconds,
            feature_params=params,
            cache=cache,
            training=split == "train",
            audio_augment=audio_augment if split == "train" else None,
            spec_augment=spec_augment if split == "train" else None,
            multi_label=data.multi_label,
        )
        for split, clips in index.splits.items()
    }
    bad_files = [{"split": clip.split, "path": str(clip.path), "reason": r} for clip, r in bad]
    return index, datasets, bad_files


def normalization_for(
    settings: Settings,
    datasets: dict[str, SpectrogramDataset],
    model: Model,
) -> FeatureNormalization | None:
    """Statistics from the training split's un-augmented features; None when
    `features.normalize` is off or the model normalises itself."""
    if not settings.features.normalize or model.normalizes_input:
        return None
    train = datasets["train"]
    view = dataclasses.replace(
        train, training=False, audio_augment=None, spec_augment=None, store=None
    )
    prepare(view, num_workers=settings.system.num_workers)
    return feature_statistics(view)


def build_loaders(
    settings: Settings,
    datasets: dict[str, SpectrogramDataset],
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, DataLoader]:
    """Training loader (seeded EpochSampler, balanced when asked) and evaluation loaders.

    With `world_size` processes (DDP), `training.batch_size` is the global batch: each
    process loads its 1/world_size share of every batch.
    """
    system = settings.system
    batch_size = settings.training.batch_size
    if batch_size % world_size:
        raise ConfigError(
            f"training.batch_size={batch_size} must be a multiple of the {world_size} processes"
        )
    pin_memory = device.type == "cuda" if system.pin_memory == "auto" else system.pin_memory
    train = datasets["train"]
    weights = (
        balanced_weights(train.clips, train.multi_label)
        if settings.training.class_balance == "sampler"
        else None
    )
    common = {
        "batch_size": batch_size // world_size,
        "num_workers": system.num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": system.persistent_workers,
    }
    loaders = {
        "train": make_loader(
            train,
            shuffle=False,
            sampler=EpochSampler(
                len(train), seed=system.seed, weights=weights, rank=rank, world_size=world_size
            ),
            **common,
        )
    }
    for split in ("val", "test"):
        loaders[split] = make_loader(datasets[split], shuffle=False, **common)
    return loaders


def loss_class_weights(settings: Settings, train: SpectrogramDataset) -> torch.Tensor | None:
    """The loss's class weights under `training.class_balance=weights`, else None."""
    return class_weights(train) if settings.training.class_balance == "weights" else None


def class_weights(dataset: SpectrogramDataset) -> torch.Tensor:
    """Loss weights: N / (C * n_c), so every class weighs the same in total; for multi-label
    data the positive weight (N - n_c) / n_c of each class's binary term."""
    counts = torch.tensor(list(class_counts(dataset).values()), dtype=torch.float32)
    if dataset.multi_label:
        return (len(dataset) - counts) / counts.clamp_min(1)
    return counts.sum() / (len(counts) * counts.clamp_min(1))


def build_model(model: ModelConfig, num_classes: int, n_mels: int) -> Model:
    """The `model` section's architecture; `params.n_mels: null` takes the features' mel bins."""
    params = dict(model.params)
    if "n_mels" in params and params["n_mels"] is None:
        params["n_mels"] = n_mels
    try:
        return create_model(model.name, num_classes, **params)
    except (ModelError, CheckpointError) as error:
        raise ConfigError(f"model.params: {error}") from error


def pretrained_checkpoint(model: ModelConfig) -> dict[str, Any] | None:
    """The file `model.params.pretrained_path` names, tensors mapped (create_model reads the
    weights; this is a look at the rest), or None without one or when it is no dict (official
    PANNs files are; bare state_dicts of other tools may not be)."""
    path = model.params.get("pretrained_path")
    if not path:
        return None
    content = load_file(path, mmap=True)
    return content if isinstance(content, dict) else None


def pretrained_feature_differences(
    pretrained: dict[str, Any] | None, params: LogMelParams
) -> list[str]:
    """How the features stored in a `pretrained_checkpoint` differ from `params`, one "name
    stored vs this run's" per parameter; empty when they agree or it holds none (official
    PANNs files and other bare state_dicts)."""
    stored = None if pretrained is None else pretrained.get("features")
    if not isinstance(stored, dict):
        return []
    current = params.as_dict()
    return [
        f"{name} {stored.get(name)!r} vs {current.get(name)!r}"
        for name in sorted(set(stored) | set(current))
        if stored.get(name) != current.get(name)
    ]
