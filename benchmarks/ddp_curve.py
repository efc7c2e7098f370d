"""One process against two under torchrun: the same loss curve, within the noise of a seed.

    python benchmarks/ddp_curve.py [--epochs 10] [--seeds 42 43]

For each seed the main job trains the default model on FSDD (global batch 64) twice: in one
process, and with `torchrun --nproc_per_node=2` (32 clips per process and step). Per-epoch
train loss and validation accuracy come from each run's `last.pth`, test accuracy from its
`metrics.json`. The noise is what changing the seed does in one process: the mean absolute
train-loss gap between the first two seeds' single-process curves. Two processes pass when
each seed's gap to its single-process curve is no larger. Writes
benchmarks/results/ddp_curve.json and the table in README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from readme_table import write_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ddp_curve.json"
RUNS = REPO / "outputs" / "benchmarks" / "ddp_curve"
BATCH = 64  # global: each of two processes loads 32 clips of every batch


def train(seed: int, processes: int, epochs: int) -> dict:
    """One main-job run (train and test, no export); its curves as a results row."""
    folder = RUNS / f"seed{seed}_p{processes}"
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [
        *launcher,
        str(REPO / "main.py"),
        f"training.epochs={epochs}",
        f"training.batch_size={BATCH}",
        f"system.seed={seed}",
        "run.export=false",
        f"hydra.run.dir={folder}",
    ]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    history = torch.load(folder / "checkpoints" / "last.pth", weights_only=True)["history"]
    test = json.loads((folder / "metrics.json").read_text())["test"]
    return {
        "seed": seed,
        "processes": processes,
        "train_loss": [round(record["train_loss"], 4) for record in history],
        "val_accuracy": [round(record["val_accuracy"], 4) for record in history],
        "test_accuracy": round(test["accuracy"], 4),
        "clips_per_second": round(
            sum(record["clips_per_second"] for record in history) / len(history)
        ),
        "job_seconds": round(time.perf_counter() - started, 1),
    }


def mean_gap(first: list[float], second: list[float]) -> float:
    """Mean absolute difference of two curves, epoch by epoch."""
    return round(sum(abs(a - b) for a, b in zip(first, second, strict=True)) / len(first), 4)


def summarise(runs: list[dict]) -> dict:
    """Each seed's two-process gap and the seed-to-seed noise of one process."""
    single = {run["seed"]: run for run in runs if run["processes"] == 1}
    seeds = list(single)
    gaps = {
        str(run["seed"]): mean_gap(run["train_loss"], single[run["seed"]]["train_loss"])
        for run in runs
        if run["processes"] > 1
    }
    noise = mean_gap(single[seeds[0]]["train_loss"], single[seeds[1]]["train_loss"])
    return {
        "two_process_gap": gaps,
        "seed_to_seed_gap": noise,
        "within_noise": all(gap <= noise for gap in gaps.values()),
    }


def table(results: dict) -> list[str]:
    lines = [
        "| seed | processes | train loss, epoch 1 to last | last val accuracy "
        "| test accuracy | clips/s |",
        "| ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for run in results["runs"]:
        curve = " ".join(f"{loss:.2f}" for loss in run["train_loss"])
        lines.append(
            f"| {run['seed']} | {run['processes']} | {curve} | {run['val_accuracy'][-1]:.2%} "
            f"| {run['test_accuracy']:.2%} | {run['clips_per_second']} |"
        )
    summary = results["summary"]
    gaps = ", ".join(f"{gap:.3f} (seed {seed})" for seed, gap in summary["two_process_gap"].items())
    lines += [
        "",
        f"Mean absolute train-loss gap, two processes against one: {gaps}; between two seeds "
        f"in one process: {summary['seed_to_seed_gap']:.3f}. Within noise: "
        f"{'yes' if summary['within_noise'] else 'no'}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds needs two seeds at least: their gap is the noise")
    runs = [train(seed, processes, args.epochs) for seed in args.seeds for processes in (1, 2)]
    results = {"epochs": args.epochs, "batch_size": BATCH, "runs": runs, "summary": summarise(runs)}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    lines = table(results)
    write_table("ddp_curve", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
