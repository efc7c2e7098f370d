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
from dataclasses import dataclass
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
from audioclf.dataset import (
    BAD_FILE_POLICIES,
    DatasetError,
    DatasetIndex,
    SpectrogramDataset,
    class_counts,
    index_folder,
    index_fsdd,
    index_manifest,
    prepare,
)
from audioclf.features import LogMelParams, resolve_params
from audioclf.model import Model, create_model

CONFIG_DIR = Path(__file__).resolve().parent / "config"
log = logging.getLogger("audioclf")


class ConfigError(ValueError):
    """A configuration value or key that cannot work; the message names the key."""


@dataclass(frozen=True)
class DataConfig:
    """The `data` section."""

    format: str
    name: str
    root: str | None
    manifest: str | None
    sample_rate: int
    clip_seconds: float
    val_fraction: float
    test_fraction: float
    split_seed: int
    val_fold: Any
    test_fold: Any
    on_bad_file: str


def _section(config: DictConfig, key: str, cls: type) -> Any:
    """Build a dataclass from a config section; an unknown or missing key names itself."""
    values = OmegaConf.to_container(OmegaConf.select(config, key), resolve=True)
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{key}.{name}' for name in unknown]}")
    missing = sorted(names - set(values))
    if missing:
        raise ConfigError(f"missing key(s) {[f'{key}.{name}' for name in missing]}")
    return cls(**values)


def feature_params(config: DictConfig) -> LogMelParams:
    """The resolved log-mel parameters of `features` at `data.sample_rate`."""
    section = OmegaConf.to_container(config.features, resolve=True)
    preset = section.pop("preset")
    # null in the config means "the preset's value"; the Python API takes None literally.
    overrides = {name: value for name, value in section.items() if value is not None}
    try:
        return resolve_params(preset, config.data.sample_rate, **overrides)
    except ValueError as error:
        raise ConfigError(f"features: {error}") from error


def build_index(data: DataConfig) -> DatasetIndex:
    """Index the configured dataset into splits."""
    if data.on_bad_file not in BAD_FILE_POLICIES:
        raise ConfigError(f"data.on_bad_file must be one of {BAD_FILE_POLICIES}")
    if data.format == "manifest":
        if not data.manifest or not Path(data.manifest).is_file():
            raise ConfigError(f"data.manifest: no such file {data.manifest!r}")
        return index_manifest(
            Path(data.manifest),
            Path(data.root) if data.root else None,
            data.val_fraction,
            data.test_fraction,
            data.split_seed,
            data.val_fold,
            data.test_fold,
        )
    if not data.root or not Path(data.root).is_dir():
        raise ConfigError(
            f"data.root: no such folder {data.root!r} (relative paths start at "
            f"{Path.cwd()}; set data.root=/path/to/clips)"
        )
    if data.format == "fsdd":
        return index_fsdd(Path(data.root))
    if data.format == "folder":
        return index_folder(Path(data.root), data.val_fraction, data.test_fraction, data.split_seed)
    raise ConfigError(f"data.format must be fsdd, folder or manifest, not {data.format!r}")


def build_datasets(config: DictConfig) -> tuple[DatasetIndex, dict[str, SpectrogramDataset]]:
    """The train / val / test datasets the config describes."""
    data = _section(config, "data", DataConfig)
    params = feature_params(config)
    spec_augment = _section(config, "augmentations.spec_augment", SpecAugment)
    audio_augment = AudioAugment(
        OmegaConf.to_container(config.augmentations.audio.transforms, resolve=True)
    )
    cache = FeatureCache(config.system.cache_dir, enabled=config.system.cache)
    index = build_index(data)
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
    return index, datasets


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch in this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(config: DictConfig, num_classes: int, n_mels: int) -> Model:
    """The `model` section's architecture; `params.n_mels: null` takes the features' mel bins."""
    params = OmegaConf.to_container(config.model.params, resolve=True)
    if "n_mels" in params and params["n_mels"] is None:
        params["n_mels"] = n_mels
    try:
        return create_model(config.model.name, num_classes, **params)
    except ValueError as error:
        raise ConfigError(f"model ({config.model.name}): {error}") from error


def prepare_data(
    config: DictConfig, index: DatasetIndex, datasets: dict[str, SpectrogramDataset]
) -> dict[str, Any]:
    """Check every file of the datasets, fill the feature cache; return a summary."""
    started = time.perf_counter()
    on_bad_file = config.data.on_bad_file
    bad_files: list[dict[str, str]] = []
    splits: dict[str, Any] = {}
    cache_use = {"hits": 0, "computed": 0, "not_cached": 0}
    for split, dataset in datasets.items():
        report = prepare(
            dataset,
            on_bad_file,
            num_workers=config.system.num_workers,
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
        "dataset": config.data.name,
        "root": config.data.root,
        "classes": index.classes,
        "splits": splits,
        "sample_rate": train.sample_rate,
        "clip_seconds": train.clip_seconds,
        "clip_samples": train.clip_samples,
        "features": {
            "preset": config.features.preset,
            "shape": list(train.feature_shape),
            "params": train.feature_params.as_dict(),
        },
        "training_augmentation": {
            "audio": [type(t).__name__ for t in train.audio_augment.transforms],
            "spec_augment": train.spec_augment.active,
        },
        "cache": {
            "enabled": bool(config.system.cache),
            "dir": str(config.system.cache_dir),
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
    """The main job: prepare the data, build the model (and, as the project grows, train,
    test, export)."""
    logging.getLogger().setLevel(config.system.log_level)
    seed_everything(config.system.seed)
    index, datasets = build_datasets(config)
    # Built before the slow data pass, so a bad model parameter or checkpoint fails at start.
    model = build_model(config, len(index.classes), datasets["train"].feature_shape[-1])
    summary = prepare_data(config, index, datasets)
    summary["model"] = {
        "name": config.model.name,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    output_dir = Path(config.system.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "dataset_summary.json").write_text(json.dumps(summary, indent=1))
    log.info(
        "dataset summary (%s):\n%s", output_dir / "dataset_summary.json", format_summary(summary)
    )
    stages = [name for name in ("train", "test", "quantise", "export") if config.run[name]]
    if stages:
        log.warning(
            "run.%s: this version has no trainer or exporters yet; "
            "the run prepared the data and built the model only",
            "/".join(stages),
        )
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(config: DictConfig) -> None:
    try:
        run(config)
    except (ConfigError, DatasetError, BadAudioError) as error:
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
