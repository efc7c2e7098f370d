"""The data summary: every split prepared, counted and described, as JSON and as text."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from audioclf.audio import rates_text
from audioclf.dataset import SpectrogramDataset, class_counts, prepare
from audioclf.index import Clip
from audioclf.settings import DataConfig, SplitManifests


def prepare_splits(
    datasets: dict[str, SpectrogramDataset],
    bad_files: list[dict[str, str]],
    on_bad_file: str = "error",
    num_workers: int = 0,
    description: dict[str, Any] | None = None,
    preset: str | None = None,
    files_checked: bool = False,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Fill the feature cache for every split (`prepare`); return a summary of the data.

    `bad_files` are those dropped before splitting; `description` (dataset name, root) heads
    the summary; `preset` names the features' preset; `files_checked` as for `prepare`;
    `checkpoint` is the model file whose sample rate and clip length the run has taken, if any
    (see `describe_audio`).
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
    clips = [clip for dataset in datasets.values() for clip in dataset.clips]
    return {
        **(description or {}),
        "classes": train.classes,
        "splits": splits,
        "sample_rate": train.sample_rate,
        "clip_seconds": train.clip_seconds,
        "clip_samples": train.clip_samples,
        "audio": describe_audio(clips, train.sample_rate, train.clip_seconds, checkpoint),
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


def data_source(data: DataConfig) -> dict[str, Any]:
    """The summary's name of the data: the dataset, its root, and its manifest(s)."""
    source: dict[str, Any] = {"dataset": data.name, "root": data.root}
    if isinstance(data.manifest, SplitManifests):
        given = data.manifest.given().items()
        source["manifest"] = ", ".join(f"{k}: {', '.join(paths)}" for k, paths in given)
    elif data.format == "manifest":
        source["manifest"] = data.manifest
    return source


def describe_audio(
    clips: Sequence[Clip], sample_rate: int, clip_seconds: float, checkpoint: str | None = None
) -> dict[str, Any] | None:
    """The files' own sample rates (files per rate), the clips' lengths (min, median, max
    seconds), how many clips are parts of a file (a manifest's offset and duration), and
    warnings for settings that do not fit them: most files below `sample_rate`
    (upsampled: the upper mel bands hold nothing), or a median file much longer than
    `clip_seconds` (each clip is seen in a window of that length). They advise other
    settings, or, when the run took both from a `checkpoint`, say that its model was trained
    so. None when the clips were not checked (`check_clips` gives each its file's rate and
    length)."""
    checked = [clip for clip in clips if clip.seconds is not None]
    if not checked:
        return None
    rates = Counter({clip.path: clip.sample_rate for clip in checked}.values())
    files = sum(rates.values())  # the parts of a file are one file
    parts = sum(1 for clip in checked if clip.segment is not None)
    seconds = [clip.seconds for clip in checked]
    median = statistics.median(seconds)
    warnings = []
    below = sorted(rate for rate in rates if rate < sample_rate)
    upsampled = sum(rates[rate] for rate in below)
    if upsampled * 2 > files:
        top = max(below, key=lambda rate: (rates[rate], rate))
        warnings.append(
            f"{upsampled} of {files} files are recorded below data.sample_rate="
            f"{sample_rate} Hz ({rates_text(rates, below)}): they are upsampled, and the features "
            f"above {max(below) // 2} Hz hold nothing; "
            + (
                f"data.sample_rate={top} fits {rates[top]} of them"
                if checkpoint is None
                else f"the model of {checkpoint} works at {sample_rate} Hz"
            )
        )
    if median > 2 * clip_seconds:
        warnings.append(
            f"the median {'clip' if parts else 'file'} is {median:.1f} s long, "
            f"data.clip_seconds={clip_seconds:g}: "
            f"training sees a random {clip_seconds:g} s window of each clip and evaluation "
            f"its centred {clip_seconds:g} s; "
            + (
                "set data.clip_seconds to the length the classes need to be heard"
                if checkpoint is None
                else f"the model of {checkpoint} was trained on {clip_seconds:g} s clips"
            )
        )
    return {
        "sample_rates": {str(rate): count for rate, count in sorted(rates.items())},
        "parts": parts,
        "seconds": {
            "min": round(min(seconds), 3),
            "median": round(median, 3),
            "max": round(max(seconds), 3),
        },
        "warnings": warnings,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The dataset summary as a few readable lines."""
    classes = summary["classes"]
    lines = [
        f"dataset      {summary['dataset']} ({summary.get('manifest') or summary['root']})",
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
    audio = summary.get("audio")
    if audio:
        rates = Counter({int(rate): count for rate, count in audio["sample_rates"].items()})
        seconds = audio["seconds"]
        parts = f"{audio['parts']} parts of them, " if audio.get("parts") else ""
        lines.append(
            f"files        {rates_text(rates)}; {parts}{seconds['min']:.2f}-"
            f"{seconds['max']:.2f} s, median {seconds['median']:.2f} s"
        )
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
