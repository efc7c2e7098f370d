"""The data summary: every split prepared, counted and described, as JSON and as text."""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from audioclf.dataset import SpectrogramDataset, class_counts, prepare


def prepare_splits(
    datasets: dict[str, SpectrogramDataset],
    bad_files: list[dict[str, str]],
    on_bad_file: str = "error",
    num_workers: int = 0,
    description: dict[str, Any] | None = None,
    preset: str | None = None,
    files_checked: bool = False,
) -> dict[str, Any]:
    """Fill the feature cache for every split (`prepare`); return a summary of the data.

    `bad_files` are those dropped before splitting; `description` (dataset name, root) heads
    the summary; `preset` names the features' preset; `files_checked` as for `prepare`.
    """
    started = time.perf_counter()
    bad_files = list(bad_files)
    splits: dict[str, Any] = {}
    cache_use = {"hits": 0, "computed": 0, "not_cached": 0}
    for split, dataset in datasets.items():
        report = prepare(
            dataset,
            on_bad_file,
            num_workers=num_workers,
            files_checked=files_checked,
            progress=lambda items, split=split: tqdm(
                items, desc=f"prepare {split}", leave=False, disable=None
            ),
        )
        cache_use["hits"] += report.cache_hits
        cache_use["computed"] += report.computed
        cache_use["not_cached"] += report.checked_only
        bad_files += [{"split": split, "path": p, "reason": r} for p, r in report.bad_files]
        splits[split] = {"clips": len(dataset), "per_class": class_counts(dataset)}
        if dataset.multi_label:
            splits[split]["no_label"] = sum(1 for clip in dataset.clips if not clip.labels)
    train = datasets["train"]
    return {
        **(description or {}),
        "classes": train.classes,
        "splits": splits,
        "sample_rate": train.sample_rate,
        "clip_seconds": train.clip_seconds,
        "clip_samples": train.clip_samples,
        "features": {
            "preset": preset,
            "shape": list(train.feature_shape),
            "params": train.feature_params.as_dict(),
        },
        "training_augmentation": {
            "audio": [type(t).__name__ for t in train.audio_augment.transforms],
            "spec_augment": train.spec_augment.active,
        },
        "cache": {
            "enabled": train.cache.enabled,
            "dir": str(train.cache.directory),
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
        if info.get("no_label"):
            spread += f", {info['no_label']} with no label"
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
