"""Evaluation metrics (torchmetrics) and the files an evaluation writes.

Multi-class: accuracy, macro precision / recall / F1, per-class figures and the confusion
matrix. Multi-label: mAP and macro ROC-AUC on the scores, and macro precision / recall / F1 and
per-label accuracy at a threshold.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.figure import Figure
from torchmetrics.functional import classification as tmf

log = logging.getLogger(__name__)


def multiclass_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Accuracy, macro precision / recall / F1, per-class figures and the confusion matrix
    (rows: true class, columns: predicted) of logits (N, C) against class indices (N,)."""
    num_classes = logits.shape[1]
    predictions = logits.float().argmax(dim=1)
    targets = targets.long()

    def score(function: Any, average: str | None) -> Any:
        value = function(predictions, targets, num_classes=num_classes, average=average)
        return value.tolist() if average is None else float(value)

    return {
        "accuracy": score(tmf.multiclass_accuracy, "micro"),
        "precision": score(tmf.multiclass_precision, "macro"),
        "recall": score(tmf.multiclass_recall, "macro"),
        "f1": score(tmf.multiclass_f1_score, "macro"),
        "per_class": {
            "precision": score(tmf.multiclass_precision, None),
            "recall": score(tmf.multiclass_recall, None),
            "f1": score(tmf.multiclass_f1_score, None),
            "support": torch.bincount(targets, minlength=num_classes).tolist(),
        },
        "confusion_matrix": tmf.multiclass_confusion_matrix(
            predictions, targets, num_classes=num_classes
        ).tolist(),
    }


#: Multi-label decisions: a label is predicted at or above this probability.
THRESHOLD = 0.5


def multilabel_metrics(
    logits: torch.Tensor, targets: torch.Tensor, threshold: float = THRESHOLD
) -> dict[str, Any]:
    """mAP and macro ROC-AUC of the sigmoid scores; per-label accuracy and macro precision /
    recall / F1 at `threshold`; per-label figures. Targets are multi-hot (N, C).

    A label's average precision needs a positive clip and its ROC-AUC a positive and a
    negative one. Labels without (a rare label absent from a small validation split) are left
    out of mAP and ROC-AUC (their per-label AP is None): counting them as 0, as torchmetrics
    does, would pull the mean down for a label that was never there to find.
    """
    num_labels = logits.shape[1]
    scores = torch.sigmoid(logits.float())
    targets = targets.long()

    def score(function: Any, average: str | None, **kwargs: Any) -> Any:
        with warnings.catch_warnings():  # undefined per-label values are handled below
            warnings.filterwarnings("ignore", module="torchmetrics")
            value = function(scores, targets, num_labels=num_labels, average=average, **kwargs)
        return value.tolist() if average is None else float(value)

    positives = targets.sum(dim=0)
    has_positive = (positives > 0).tolist()
    has_both = ((positives > 0) & (positives < len(targets))).tolist()
    precision_per_label = score(tmf.multilabel_average_precision, None)
    auroc_per_label = score(tmf.multilabel_auroc, None)
    at = {"threshold": threshold}
    return {
        "accuracy": score(tmf.multilabel_accuracy, "macro", **at),
        "precision": score(tmf.multilabel_precision, "macro", **at),
        "recall": score(tmf.multilabel_recall, "macro", **at),
        "f1": score(tmf.multilabel_f1_score, "macro", **at),
        "mAP": _mean_where(precision_per_label, has_positive),
        "roc_auc": _mean_where(auroc_per_label, has_both),
        "per_class": {
            "precision": score(tmf.multilabel_precision, None, **at),
            "recall": score(tmf.multilabel_recall, None, **at),
            "f1": score(tmf.multilabel_f1_score, None, **at),
            "average_precision": [
                value if defined else None
                for value, defined in zip(precision_per_label, has_positive, strict=True)
            ],
            "support": positives.tolist(),
        },
    }


def _mean_where(values: Sequence[float], defined: Sequence[bool]) -> float:
    """The mean of the defined values (NaN when none is)."""
    kept = [value for value, keep in zip(values, defined, strict=True) if keep]
    return float(np.mean(kept)) if kept else float("nan")


@functools.cache
def _font_for(text: str) -> str | None:
    """An installed font family with a glyph for every character of `text` (class names in
    Chinese, say), None for matplotlib's default. When none has them all, one warning says so
    and matplotlib's warning per missing glyph and drawing is silenced: the images show boxes
    where the CSV files have the names."""
    needed = {ord(character) for character in text}
    default = font_manager.findfont(font_manager.FontProperties())
    if needed <= set(font_manager.get_font(default).get_charmap()):
        return None
    for entry in font_manager.fontManager.ttflist:
        if entry.name.startswith("Last Resort"):  # a placeholder for every character
            continue
        try:
            if needed <= set(font_manager.get_font(entry.fname).get_charmap()):
                return entry.name
        except (OSError, RuntimeError):  # a font file matplotlib cannot open
            continue
    log.warning(
        "no installed font draws every character of the class names; confusion-matrix images "
        "show boxes for them (the CSV files and metrics.json have the names)"
    )
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
    return None


def confusion_matrix_figure(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    """The confusion matrix as a labelled heat map (rows: true class, columns: predicted)."""
    counts = np.asarray(matrix)
    size = max(4.0, 0.45 * len(classes) + 2)
    # A Figure of its own, not pyplot's: files only, and the caller's backend stays as it is.
    figure = Figure(figsize=(size, size), dpi=100)
    axes = figure.subplots()
    axes.imshow(counts, cmap="Blues")
    axes.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xlabel="predicted",
        ylabel="true",
        title="confusion matrix",
    )
    family = _font_for("".join(classes))
    axes.set_xticklabels(classes, rotation=90, fontfamily=family)
    axes.set_yticklabels(classes, fontfamily=family)
    if len(classes) <= 30:
        threshold = counts.max() / 2 if counts.size else 0
        for (row, column), count in np.ndenumerate(counts):
            color = "white" if count > threshold else "black"
            axes.text(column, row, str(count), ha="center", va="center", color=color, fontsize=7)
    figure.tight_layout()
    return figure


def write_evaluation(
    metrics: dict[str, Any], classes: Sequence[str], directory: Path, name: str = "test"
) -> dict[str, Path]:
    """Add `metrics` under `name` to `metrics.json` in `directory` and write a per-class CSV
    report and, for multi-class, the confusion matrix as CSV and PNG (`{name}_*`); return the
    paths. Several evaluations of one run (float and int8, say) share `metrics.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": directory / "metrics.json"}
    try:
        everything = json.loads(paths["metrics"].read_text())
    except (OSError, ValueError):
        everything = {}
    everything[name] = {"classes": list(classes), **metrics}
    paths["metrics"].write_text(json.dumps(everything, indent=1))
    per_class = metrics["per_class"]
    paths["per_class"] = directory / f"{name}_per_class.csv"
    with paths["per_class"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", *per_class])
        for index, label in enumerate(classes):
            writer.writerow([label, *(_cell(values[index]) for values in per_class.values())])
    if "confusion_matrix" in metrics:
        paths["confusion_csv"] = directory / f"{name}_confusion_matrix.csv"
        with paths["confusion_csv"].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["true \\ predicted", *classes])
            for label, row in zip(classes, metrics["confusion_matrix"], strict=True):
                writer.writerow([label, *row])
        paths["confusion_png"] = directory / f"{name}_confusion_matrix.png"
        figure = confusion_matrix_figure(metrics["confusion_matrix"], classes)
        figure.savefig(paths["confusion_png"])
    return paths


def _cell(value: float | int | None) -> str:
    if value is None:
        return ""  # undefined (a label without positives)
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_report(metrics: dict[str, Any], classes: Sequence[str]) -> str:
    """Per-class precision, recall, F1 and support as a text table, then the macro figures."""
    per_class = metrics["per_class"]
    width = max(8, *(len(name) for name in classes))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for index, name in enumerate(classes):
        lines.append(
            f"{name:<{width}}  {per_class['precision'][index]:9.4f}  "
            f"{per_class['recall'][index]:6.4f}  {per_class['f1'][index]:6.4f}  "
            f"{int(per_class['support'][index]):7d}"
        )
    summary = "  ".join(
        f"{name} {metrics[name]:.4f}"
        for name in ("accuracy", "precision", "recall", "f1", "mAP", "roc_auc")
        if name in metrics
    )
    lines.append(f"macro: {summary}")
    return "\n".join(lines)
