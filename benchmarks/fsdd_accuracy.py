"""FSDD test accuracy of the zoo's models trained by the main job, and one distillation.

    python benchmarks/fsdd_accuracy.py [--cnn14]

Each model trains with the main job's defaults (`python main.py model=NAME`: 30 epochs at
most, early stopping, the default augmentation) on the official FSDD split and is tested on
its 300 test clips. Then a small student (EfficientNetV2-mobile at half width and depth) trains
alone and distilled from the best of the larger models, with everything else equal. Writes
benchmarks/results/fsdd_accuracy.json and the table in README.md. CNN14 (80M parameters)
takes hours on two cores: `--cnn14` adds it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from audioclf.cli import CONFIG_DIR, run
from readme_table import write_table

RESULTS = Path(__file__).resolve().parent / "results" / "fsdd_accuracy.json"
RUNS = Path(__file__).resolve().parents[1] / "outputs" / "benchmarks" / "fsdd_accuracy"
MODELS = [
    ("efficientnet_v2", []),
    ("ghost_efficientnet_v2", []),
    ("panns_mobilenetv1", []),
    ("panns_mobilenetv2", []),
]
STUDENT = (
    "efficientnet_v2 (0.5x width, 0.5x depth)",
    ["model.params.width_mult=0.5", "model.params.depth_mult=0.5"],
)


def train_and_test(label: str, overrides: list[str]) -> dict:
    """One main-job run; its figures as a results row."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        config = compose(
            "config", overrides=[f"system.output_dir={RUNS / _slug(label)}", *overrides]
        )
    started = time.perf_counter()
    summary = run(config)
    return {
        "model": label,
        "params": summary["model"]["parameters"],
        "test_accuracy": summary["test"]["accuracy"],
        "macro_f1": summary["test"]["f1"],
        "best_val_accuracy": summary["training"]["best"],
        "epochs": len(summary["training"]["history"]),
        "train_seconds": round(summary["training"]["seconds"], 1),
        "job_seconds": round(time.perf_counter() - started, 1),
        "distilled_from": None,
        "checkpoint": str(RUNS / _slug(label) / "checkpoints" / "best.pth"),
    }


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | params | test accuracy | macro F1 | epochs | training s | distilled from |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.2f}M | {row['test_accuracy'] * 100:.2f}% "
            f"| {row['macro_f1']:.4f} | {row['epochs']} | {row['train_seconds']:.0f} "
            f"| {row['distilled_from'] or ''} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cnn14", action="store_true", help="also train PANNs CNN14 (hours)")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    models = MODELS + ([("panns_cnn14", [])] if arguments.cnn14 else [])
    rows = [train_and_test(name, [f"model={name}", *extra]) for name, extra in models]
    teacher = max((r for r in rows if r["params"] > 2e6), key=lambda r: r["best_val_accuracy"])
    label, extra = STUDENT
    alone = train_and_test(label, extra)
    distilled = train_and_test(
        f"{label}, distilled",
        [
            *extra,
            f"teacher_model={teacher['model']}",
            f"teacher_model.checkpoint_path={teacher['checkpoint']}",
        ],
    )
    distilled["distilled_from"] = teacher["model"]
    distilled["gain_over_alone"] = round(distilled["test_accuracy"] - alone["test_accuracy"], 4)
    rows += [alone, distilled]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    write_table("fsdd_accuracy", table(rows))
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
