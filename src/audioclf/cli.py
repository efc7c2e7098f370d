"""The Hydra entry point (`python main.py ...`, `audioclf ...`): reads the config, runs the job.

The configuration is read here and only here; the library below takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from audioclf.audio import BadAudioError
from audioclf.augment import AudioAugment, SpecAugment
from audioclf.cache import FeatureCache
from audioclf.dataset import SpectrogramDataset, check_clips, class_counts, prepare
from audioclf.features import LogMelParams, num_frames, resolve_params
from audioclf.index import (
    DatasetError,
    DatasetIndex,
    Listing,
    drop_duplicates,
    index_folder,
    index_fsdd,
    index_manifest,
    split_listing,
)
from audioclf.model import CheckpointError, Model, ModelError, create_model
from audioclf.settings import ConfigError, DataConfig, ModelConfig, Settings, load_settings

CONFIG_DIR = Path(__file__).resolve().parent / "config"
log = logging.getLogger("audioclf")

#: Errors that are the user's input, reported in one line (traceback at DEBUG) with exit 2.
USER_ERRORS = (ConfigError, DatasetError, BadAudioError, CheckpointError, ModelError)


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


def list_dataset(data: DataConfig) -> Listing:
    """List the configured dataset's clips, duplicates dropped (not yet split)."""
    if data.format == "manifest":
        if not data.manifest or not Path(data.manifest).is_file():
            raise ConfigError(f"data.manifest: no such file {data.manifest!r}")
        listing = index_manifest(
            Path(data.manifest),
            Path(data.root) if data.root else None,
            data.val_fraction,
            data.test_fraction,
            data.val_fold,
            data.test_fold,
        )
    elif not data.root or not Path(data.root).is_dir():
        raise ConfigError(
            f"data.root: no such folder {data.root!r} (relative paths start at "
            f"{Path.cwd()}; set data.root=/path/to/clips)"
        )
    elif data.format == "fsdd":
        listing = index_fsdd(Path(data.root))
    else:
        listing = index_folder(Path(data.root), data.val_fraction, data.test_fraction)
    return drop_duplicates(listing)


def build_datasets(
    settings: Settings,
) -> tuple[DatasetIndex, dict[str, SpectrogramDataset], list[dict[str, str]]]:
    """Check the configured files, split the usable ones, and build train / val / test.

    Returns the index, the datasets and the bad files dropped (with `on_bad_file=skip`).
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
    listing = list_dataset(data)
    good, bad = check_clips(
        listing.clips,
        data.on_bad_file,
        num_workers=settings.system.num_workers,
        progress=lambda items: tqdm(items, desc="check files", leave=False, disable=None),
    )
    listing.clips = good
    index = split_listing(listing, data.split_seed)
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
        )
        for split, clips in index.splits.items()
    }
    bad_files = [{"split": clip.split, "path": str(clip.path), "reason": r} for clip, r in bad]
    return index, datasets, bad_files


def make_output_dir(path: str) -> Path:
    """Create the run's output folder, or stop at start naming `system.output_dir`."""
    output_dir = Path(path)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-check"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"system.output_dir: cannot write to {output_dir} ({error.strerror or error})"
        ) from error
    return output_dir


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch in this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(model: ModelConfig, num_classes: int, n_mels: int) -> Model:
    """The `model` section's architecture; `params.n_mels: null` takes the features' mel bins."""
    params = dict(model.params)
    if "n_mels" in params and params["n_mels"] is None:
        params["n_mels"] = n_mels
    try:
        return create_model(model.name, num_classes, **params)
    except (ModelError, CheckpointError) as error:
        raise ConfigError(f"model.params: {error}") from error


def prepare_data(
    settings: Settings,
    index: DatasetIndex,
    datasets: dict[str, SpectrogramDataset],
    bad_files: list[dict[str, str]],
) -> dict[str, Any]:
    """Fill the feature cache for every split; return a summary of the data."""
    started = time.perf_counter()
    bad_files = list(bad_files)
    splits: dict[str, Any] = {}
    cache_use = {"hits": 0, "computed": 0, "not_cached": 0}
    for split, dataset in datasets.items():
        report = prepare(
            dataset,
            settings.data.on_bad_file,
            num_workers=settings.system.num_workers,
            progress=lambda items, split=split: tqdm(
                items, desc=f"prepare {split}", leave=False, disable=None
            ),
        )
        cache_use["hits"] += report.cache_hits
        cache_use["computed"] += report.computed
        cache_use["not_cached"] += report.checked_only
        bad_files += [{"split": split, "path": p, "reason": r} for p, r in report.bad_files]
        splits[split] = {"clips": len(dataset), "per_class": class_counts(dataset)}
    train = datasets["train"]
    return {
        "dataset": settings.data.name,
        "root": settings.data.root,
        "classes": index.classes,
        "splits": splits,
        "sample_rate": train.sample_rate,
        "clip_seconds": train.clip_seconds,
        "clip_samples": train.clip_samples,
        "features": {
            "preset": settings.features.preset,
            "shape": list(train.feature_shape),
            "params": train.feature_params.as_dict(),
        },
        "training_augmentation": {
            "audio": [type(t).__name__ for t in train.audio_augment.transforms],
            "spec_augment": train.spec_augment.active,
        },
        "cache": {
            "enabled": train.cache.enabled,
            "dir": settings.system.cache_dir,
            **cache_use,
        },
        "bad_files": bad_files,
        "seconds": round(time.perf_counter() - started, 2),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The dataset summary as a few readable lines."""
    classes = summary["classes"]
    lines = [
        f"dataset      {summary['dataset']} ({summary['root']})",
        f"classes      {len(classes)}: {', '.join(classes)}",
    ]
    for split, info in summary["splits"].items():
        per_class = info["per_class"].values()
        spread = f"{min(per_class)}-{max(per_class)} per class" if per_class else "empty"
        lines.append(f"{split:<12} {info['clips']} clips ({spread})")
    features = summary["features"]
    cache = summary["cache"]
    lines += [
        f"clip         {summary['clip_seconds']} s = {summary['clip_samples']} samples "
        f"at {summary['sample_rate']} Hz",
        f"features     {features['preset']}: {tuple(features['shape'])} (channel, frames, mels)",
        f"cache        {'on' if cache['enabled'] else 'off'} ({cache['dir']}): "
        f"{cache['hits']} hits, {cache['computed']} computed, "
        f"{cache['not_cached']} checked only (augmented in training, never cached)",
        f"bad files    {len(summary['bad_files'])}",
    ]
    lines += [f"  {bad['path']}: {bad['reason']}" for bad in summary["bad_files"]]
    if "model" in summary:
        model = summary["model"]
        lines.append(
            f"model        {model['name']}: {model['parameters']:,} parameters "
            f"({model['trainable']:,} trainable)"
        )
    lines.append(f"time         {summary['seconds']} s")
    return "\n".join(lines)


def run(config: DictConfig) -> dict[str, Any]:
    """The main job: check the config, prepare the data, build the model (and, as the project
    grows, train, test, export)."""
    settings = load_settings(config)
    logging.getLogger().setLevel(settings.system.log_level)
    seed_everything(settings.system.seed)
    output_dir = make_output_dir(settings.system.output_dir)
    index, datasets, bad_files = build_datasets(settings)
    # Built before the slow data pass, so a bad model parameter or checkpoint fails at start.
    model = build_model(settings.model, len(index.classes), datasets["train"].feature_shape[-1])
    summary = prepare_data(settings, index, datasets, bad_files)
    summary["model"] = {
        "name": settings.model.name,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    (output_dir / "dataset_summary.json").write_text(json.dumps(summary, indent=1))
    log.info(
        "dataset summary (%s):\n%s", output_dir / "dataset_summary.json", format_summary(summary)
    )
    stages = [
        name for name in ("train", "test", "quantise", "export") if getattr(settings.run, name)
    ]
    if stages:
        log.warning(
            "run.%s: this version has no trainer or exporters yet; "
            "the run prepared the data and built the model only",
            "/".join(stages),
        )
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(config: DictConfig) -> None:
    # Set before the settings are checked, so that DEBUG shows a bad setting's traceback too.
    level = OmegaConf.select(config, "system.log_level", default="INFO")
    if level in logging.getLevelNamesMapping():
        logging.getLogger().setLevel(level)
    try:
        run(config)
    except USER_ERRORS as error:
        # One line for the user; the traceback only where it was asked for.
        log.debug("traceback", exc_info=True)
        log.error("%s", error)
        raise SystemExit(2) from error


_LIST_INDEX = re.compile(r"\[(\d+)\]")


def normalise_override(argument: str) -> str:
    """Rewrite list indices in an override key, `a.b[0].c=1` -> `a.b.0.c=1`.

    Hydra's override grammar reaches list items only as `.0`; users write `[0]`.
    """
    if argument.startswith("-") or "=" not in argument:
        return argument
    key, value = argument.split("=", 1)
    return _LIST_INDEX.sub(r".\1", key) + "=" + value


def main() -> None:
    """Console entry point."""
    sys.argv[1:] = [normalise_override(argument) for argument in sys.argv[1:]]
    _hydra_main()
