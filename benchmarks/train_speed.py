"""Training speed per model: a plain fp32 eager loop, each speed switch, the trainer's default.

    python benchmarks/train_speed.py [--skip-accuracy] [--models NAME ...] [--output FILE]

Batches: 64 clips of real FSDD features (1 s at 8 kHz, the default preset: 101 frames x 64 mel
bins), held in memory, so the figures are the training step's and not the data pipeline's.
Per model, in one run and in five alternating rounds (the machine is shared and its speed
drifts): clips/s are the median over rounds, and each speed-up is the median of the rounds'
ratios to the plain figure of the same round.

- plain: fp32, eager, contiguous tensors: forward, cross-entropy, backward, gradient clipping,
  an AdamW step (PyTorch's default foreach kernels);
- one switch at a time: bf16 (CPU bf16 autocast as `training.amp=true` runs it, strided
  grouped convolutions in float32: audioclf.runtime), channels_last, compile (torch.compile,
  after a warm-up that pays the compilation, reported separately), fused (the fused AdamW
  kernel that the trainer's optimizers use);
- default: the trainer's default configuration (`TrainingConfig()`, `amp=auto` resolved on
  this machine), in a bare loop;
- trainer: `Trainer` itself with the default configuration, one epoch over the same batches
  per round, against the bare loop with identical settings (its overhead, the median of the
  rounds' ratios).

Then the default model is trained on FSDD by the main job with the default configuration and
with the plain settings (amp and channels_last off), three seeds each, and the mean test
accuracies are compared: one seed moves it by a clip or two (0.3-0.7 points) either way.
Writes benchmarks/results/train_speed.json (with the machine it ran on) and the table in
README.md; `--output` writes another results file and leaves README.md alone (a run on another
kind of CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from audioclf.cli import CONFIG_DIR, run
from audioclf.dataset import prepare
from audioclf.model import create_model
from audioclf.pipeline import build_datasets
from audioclf.runtime import autocast_dtype, cpu_has_native_bf16, keep_strided_grouped_convs_fp32
from audioclf.schedules import Schedule, ScheduleSpec, make_optimizer
from audioclf.settings import TrainingConfig, load_settings
from audioclf.train import Trainer
from machine import machine
from readme_table import write_table

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 64
STEPS = 8
ROUNDS = 5
SEEDS = (0, 1, 2)
MODELS = ["efficientnet_v2", "ghost_efficientnet_v2", "panns_mobilenetv1", "panns_mobilenetv2"]
PLAIN = {"amp": False, "channels_last": False, "compile": False, "fused": False}
SWITCHES = {
    "plain": PLAIN,
    "bf16": {**PLAIN, "amp": True},
    "channels_last": {**PLAIN, "channels_last": True},
    "compile": {**PLAIN, "compile": True},
    "fused": {**PLAIN, "fused": True},
}
CPU = torch.device("cpu")
WEIGHT_DECAY = TrainingConfig().weight_decay


def fsdd_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """The first STEPS batches of FSDD training features (normalised) and labels."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        config = compose("config", overrides=["system.output_dir=/tmp/audioclf-speed"])
    _, datasets, _ = build_datasets(load_settings(config))
    train = datasets["train"]
    train.training, train.audio_augment, train.spec_augment = False, None, None
    prepare(train)
    items = train.__getitems__(list(range(BATCH * STEPS)))
    return torch.stack([f for f, _ in items]), torch.tensor([label for _, label in items])


def fresh_model(name: str) -> torch.nn.Module:
    """The model `name` for 10 classes and 64 mel bins, with the same initial weights each time."""
    torch.manual_seed(0)
    return create_model(name, 10, **({"n_mels": 64} if name.startswith("panns") else {}))


def make_step(
    name: str, switches: dict[str, bool | str], features: torch.Tensor, labels: torch.Tensor
) -> tuple[Callable[[int], None], float]:
    """A training step over batch i with these switches, and the seconds compiling took."""
    model = fresh_model(name).train()
    memory_format = torch.channels_last if switches["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    dtype = autocast_dtype(switches["amp"], CPU)
    if dtype is not None:
        keep_strided_grouped_convs_fp32(model)  # as the Trainer does under CPU autocast
    forward = torch.compile(model) if switches["compile"] else model
    if switches["fused"]:
        optimizer = make_optimizer(model.parameters(), "adamw", 1e-3, WEIGHT_DECAY)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=WEIGHT_DECAY)

    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=dtype)

    def step(index: int) -> None:
        batch = slice((index % STEPS) * BATCH, (index % STEPS + 1) * BATCH)
        # Converted per batch, as batches from a loader arrive contiguous.
        inputs = features[batch].contiguous(memory_format=memory_format)
        with autocast():
            loss = F.cross_entropy(forward(inputs, labels[batch]).float(), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    started = time.perf_counter()
    step(0)  # compiles, when compiling
    return step, time.perf_counter() - started


def clips_per_second(step: Callable[[int], None]) -> float:
    for index in range(2):
        step(index)
    started = time.perf_counter()
    for index in range(STEPS):
        step(index)
    return BATCH * STEPS / (time.perf_counter() - started)


def make_trainer_epoch(
    name: str, features: torch.Tensor, labels: torch.Tensor, folder: str
) -> Callable[[], float]:
    """One `Trainer` epoch (default configuration) over the same in-memory batches, returning
    its clips/s, after a warm-up epoch."""
    model = fresh_model(name)
    options = TrainingConfig(epochs=1, warmup_epochs=0.0)
    loader = DataLoader(TensorDataset(features, labels), batch_size=BATCH)
    trainer = Trainer(model, options, [str(i) for i in range(10)], folder)
    trainer.optimizer = make_optimizer(model.parameters(), "adamw", 1e-3, WEIGHT_DECAY)
    trainer.schedule = Schedule(trainer.optimizer, ScheduleSpec("cosine", STEPS, STEPS))
    trainer._train_epoch(loader, 1)  # warm-up epoch
    return lambda: trainer._train_epoch(loader, 1).clips_per_second


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of each round's ratio: the machine's speed drifts over a run,
    and a ratio of two figures from the same round cancels most of it."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def default_switches() -> dict[str, bool | str]:
    """The trainer's default configuration as switches (its optimizers use the fused kernel)."""
    default = TrainingConfig()
    return {
        "amp": default.amp,
        "channels_last": default.channels_last,
        "compile": default.compile,
        "fused": True,
    }


def measure(features: torch.Tensor, labels: torch.Tensor, models: list[str]) -> list[dict]:
    configurations = {**SWITCHES, "default": default_switches()}
    rows = []
    for name in models:
        steps, compile_seconds = {}, 0.0
        for label, switches in configurations.items():
            steps[label], seconds = make_step(name, switches, features, labels)
            if switches["compile"]:
                compile_seconds = seconds
        rounds: dict[str, list[float]] = {label: [] for label in [*configurations, "trainer"]}
        with tempfile.TemporaryDirectory() as folder:
            trainer_epoch = make_trainer_epoch(name, features, labels, folder)
            for _ in range(ROUNDS):
                for label, step in steps.items():
                    rounds[label].append(clips_per_second(step))
                rounds["trainer"].append(trainer_epoch())
        row = {
            "model": name,
            **{
                f"{label}_clips_per_second": round(statistics.median(rounds[label]), 1)
                for label in configurations
            },
            "compile_seconds": round(compile_seconds, 1),
            "trainer_clips_per_second": round(statistics.median(rounds["trainer"]), 1),
            "trainer_overhead": round(median_ratio(rounds["default"], rounds["trainer"]), 3),
            **{
                f"{label}_speedup": round(median_ratio(rounds[label], rounds["plain"]), 2)
                for label in configurations
                if label != "plain"
            },
        }
        print(json.dumps(row))
        rows.append(row)
    return rows


def fsdd_accuracy(settings: list[str]) -> dict:
    """The default model trained and tested on FSDD by the main job, once per seed."""
    runs = []
    for seed in SEEDS:
        with tempfile.TemporaryDirectory() as folder:
            overrides = [f"system.output_dir={folder}", f"system.seed={seed}", "run.export=false"]
            with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
                config = compose("config", overrides=overrides + settings)
            summary = run(config)
        runs.append({"seed": seed, **{k: summary["test"][k] for k in ("accuracy", "f1")}})
        print(json.dumps({"settings": settings, **runs[-1]}))
    accuracies = [r["accuracy"] for r in runs]
    return {
        "settings": settings,
        "runs": runs,
        "mean_accuracy": statistics.mean(accuracies),
        "std_accuracy": statistics.stdev(accuracies),
    }


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | plain fp32 eager | bf16 | channels_last | compile (compile s) | fused AdamW "
        "| default | trainer overhead |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['plain_clips_per_second']:.0f} "
            f"| {row['bf16_clips_per_second']:.0f} ({row['bf16_speedup']:.2f}x) "
            f"| {row['channels_last_clips_per_second']:.0f} ({row['channels_last_speedup']:.2f}x) "
            f"| {row['compile_clips_per_second']:.0f} ({row['compile_speedup']:.2f}x, "
            f"{row['compile_seconds']:.0f} s) "
            f"| {row['fused_clips_per_second']:.0f} ({row['fused_speedup']:.2f}x) "
            f"| {row['default_clips_per_second']:.0f} ({row['default_speedup']:.2f}x) "
            f"| {row['trainer_overhead']:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-accuracy", action="store_true", help="speed only")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, metavar="NAME")
    parser.add_argument("--output", help="a results file other than train_speed.json")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    features, labels = fsdd_batches()
    rows = measure(features, labels, arguments.models)
    # The targets are the default model's (MODELS[0]); without it in --models, null.
    default_row = next((row for row in rows if row["model"] == MODELS[0]), {})
    result = {
        "default_speedup": default_row.get("default_speedup"),
        "trainer_overhead": default_row.get("trainer_overhead"),
        "batch": BATCH,
        "threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "machine": machine(),
        "default_amp": str(autocast_dtype(TrainingConfig().amp, CPU)),
        "rows": rows,
    }
    if not arguments.skip_accuracy:
        default = fsdd_accuracy([])
        plain = fsdd_accuracy(["training.amp=false", "training.channels_last=false"])
        result["accuracy"] = {
            "default": default,
            "plain": plain,
            "difference_points": round(
                100 * (default["mean_accuracy"] - plain["mean_accuracy"]), 2
            ),
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / (arguments.output or "train_speed.json")).write_text(
        json.dumps(result, indent=1) + "\n"
    )
    if arguments.output is None:
        write_table("train_speed", table(rows))
    print("\n".join(table(rows)))
    if default_row and not math.isfinite(result["default_speedup"]):
        raise SystemExit("no speed-up measured")


if __name__ == "__main__":
    main()
