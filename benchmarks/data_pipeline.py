"""Data pipeline throughput on the bundled FSDD: cold cache, warm cache, audio augmentation.

    python benchmarks/data_pipeline.py

Every pass reads all clips through the project's own DataLoader (batches of
`training.batch_size`, `system.num_workers` workers, as training uses it). Library imports and
numba compilation are warmed up first, so "cold" measures an empty feature cache, not start-up.

- cold: nothing cached; loader workers decode and compute every clip.
- warm: after `prepare()` has built the feature store, as every run's start does; epochs of a
  new loader (stored datasets load in the main process).
- warm, new run: what a later run pays: a fresh dataset, `prepare()` (hashes every file,
  opens the store and checks its CRC), then one epoch, timed together.
- warm, per-entry cache: the store detached, every item one cache read in loader workers (the
  path a dataset takes when it has no store), for comparison.
- augmented: the training set with the default audio augmentation (never cached).

Writes benchmarks/results/data_pipeline.json and the table in README.md.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from audioclf import audio
from audioclf.cli import CONFIG_DIR
from audioclf.dataset import SpectrogramDataset, prepare
from audioclf.features import log_mel
from audioclf.job import seed_everything
from audioclf.loading import make_loader
from audioclf.pipeline import build_datasets
from audioclf.settings import load_settings
from machine import machine
from readme_table import write_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "data_pipeline.json"


def clips_per_second(loader, epochs: int = 1) -> list[float]:
    """Clips per second of each epoch over the loader."""
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        clips = sum(len(labels) for _, labels in loader)
        rates.append(clips / (time.perf_counter() - started))
    return rates


# The default configuration, and a heavier front end: resampling to 32 kHz and PANNs' log-mel.
VARIANTS = {
    "default": [],
    "panns_32k": ["features=panns", "data.sample_rate=32000"],
}


def measure(overrides: list[str]) -> dict:
    """Cold, warm and augmented throughput under one set of config overrides."""
    with tempfile.TemporaryDirectory() as cache_dir:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            config = compose(
                "config",
                overrides=[f"system.cache_dir={cache_dir}", "system.output_dir=.", *overrides],
            )
        seed_everything(config.system.seed)
        index, datasets, _ = build_datasets(load_settings(config))
        train = datasets["train"]

        def every_clip() -> SpectrogramDataset:
            """Every clip as evaluation sees it (centre crop, cached)."""
            return SpectrogramDataset(
                clips=[clip for split in index.splits.values() for clip in split],
                classes=index.classes,
                sample_rate=train.sample_rate,
                clip_seconds=train.clip_seconds,
                feature_params=train.feature_params,
                cache=train.cache,
            )

        evaluation = every_clip()
        log_mel(np.zeros(train.clip_samples, np.float32), train.feature_params)
        train.audio_augment(np.zeros(train.clip_samples, np.float32), train.sample_rate)

        workers = config.system.num_workers
        batch_size = config.training.batch_size

        def loader(dataset, shuffle=False):
            return make_loader(dataset, batch_size, shuffle, workers, config.system.seed)

        cold = clips_per_second(loader(evaluation))[0]
        started = time.perf_counter()
        prepare(evaluation, num_workers=workers)
        store_build_seconds = time.perf_counter() - started
        warm = float(np.mean(clips_per_second(loader(evaluation), epochs=3)))

        new_run = every_clip()
        audio._digests.clear()  # a new process knows no file digests: prepare hashes every file
        started = time.perf_counter()
        prepare(new_run, num_workers=workers)
        clips = sum(len(labels) for _, labels in loader(new_run))
        warm_new_run = clips / (time.perf_counter() - started)

        evaluation.store = None
        warm_per_entry = float(np.mean(clips_per_second(loader(evaluation), epochs=3)[1:]))
        augmented = clips_per_second(loader(train, shuffle=True))[0]

    return {
        "dataset": config.data.name,
        "overrides": overrides,
        "clips": len(evaluation),
        "augmented_clips": len(train),
        "sample_rate": train.sample_rate,
        "clip_seconds": train.clip_seconds,
        "features": config.features.preset,
        "feature_shape": list(train.feature_shape),
        "num_workers": workers,
        "batch_size": batch_size,
        "audio_transforms": [type(t).__name__ for t in train.audio_augment.transforms],
        "cold_clips_per_s": round(cold, 1),
        "warm_clips_per_s": round(warm, 1),
        "warm_new_run_clips_per_s": round(warm_new_run, 1),
        "warm_per_entry_cache_clips_per_s": round(warm_per_entry, 1),
        "augmented_clips_per_s": round(augmented, 1),
        "store_build_seconds": round(store_build_seconds, 2),
        "warm_over_cold": round(warm / cold, 1),
        "warm_new_run_over_cold": round(warm_new_run / cold, 1),
        "warm_per_entry_cache_over_cold": round(warm_per_entry / cold, 1),
    }


def main() -> None:
    results = {name: measure(overrides) for name, overrides in VARIANTS.items()}
    result = {
        **results["default"],
        "target_warm_over_cold": 50,
        "variants": results,
        "machine": machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    update_readme(results)


def update_readme(results: dict[str, dict]) -> None:
    """Replace the table between the markers in README.md with these figures."""
    rows = [
        ("cold (empty cache)", "cold_clips_per_s", None),
        ("warm (feature store)", "warm_clips_per_s", "warm_over_cold"),
        (
            "warm, new run: prepare + first epoch",
            "warm_new_run_clips_per_s",
            "warm_new_run_over_cold",
        ),
        (
            "warm, per-entry cache reads (no store)",
            "warm_per_entry_cache_clips_per_s",
            "warm_per_entry_cache_over_cold",
        ),
        ("training with audio augmentation (not cached)", "augmented_clips_per_s", None),
    ]
    header = " | ".join(
        f"{name}: {r['features']}, {r['sample_rate'] // 1000} kHz" for name, r in results.items()
    )
    lines = [f"| clips/s | {header} |", "| --- |" + " ---: |" * len(results)]
    for label, key, ratio in rows:
        cells = []
        for r in results.values():
            cell = f"{r[key]:,.0f}"
            cells.append(f"{cell} ({r[ratio]}x cold)" if ratio else cell)
        lines.append(f"| {label} | {' | '.join(cells)} |")
    write_table("data_pipeline", lines)


if __name__ == "__main__":
    main()
