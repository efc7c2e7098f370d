"""What audioclf-predict gives back: each file's prediction, and its reports (a table, JSON or
CSV, the embeddings files, the note on files below the model's sample rate)."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audioclf.audio import rates_text


@dataclass
class FilePrediction:
    """One file's result, or its error."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    #: The predicted labels: the top one, or a multi-label model's labels at the threshold.
    labels: list[str] = field(default_factory=list)
    windows: list[dict[str, Any]] = field(default_factory=list)
    embedding: np.ndarray | None = None
    error: str | None = None
    #: The file's own sample rate (None for a file that failed).
    sample_rate: int | None = None


def format_results(
    results: Sequence[FilePrediction], fmt: str, per_window: bool, multi_label: bool = False
) -> str:
    """Results as a table, JSON or CSV. A multi-label table row starts with the predicted
    labels ("-" for none); a multi-class one's prediction is its first label."""
    if fmt == "json":
        return json.dumps(
            [
                {
                    "path": r.path,
                    "error": r.error,
                    "labels": r.labels,
                    "top": [{"label": label, "probability": p} for label, p in r.top],
                    **({"windows": r.windows} if per_window else {}),
                }
                for r in results
            ],
            indent=1,
        )
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "rank", "label", "probability", "predicted", "error"])
        for r in results:
            if r.error:
                writer.writerow([r.path, "", "", "", "", r.error])
            for rank, (label, probability) in enumerate(r.top, start=1):
                predicted = int(label in r.labels)
                writer.writerow([r.path, rank, label, f"{probability:.6f}", predicted, ""])
        return buffer.getvalue().rstrip("\n")
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.path}  ERROR: {r.error}")
            continue
        lines.append(f"{r.path}  {_table_row(r.top, r.labels, multi_label)}")
        for window in r.windows:
            row = _table_row(window["top"], window["labels"], multi_label)
            lines.append(f"  @ {window['start_seconds']:.2f} s  {row}")
    return "\n".join(lines)


def _table_row(top: list[tuple[str, float]], labels: list[str], multi_label: bool) -> str:
    scores = ", ".join(f"{label} {probability:.3f}" for label, probability in top)
    return f"[{', '.join(labels) or '-'}]  {scores}" if multi_label else scores


def write_embeddings(results: Sequence[FilePrediction], out: Path) -> tuple[Path, Path]:
    """`OUT.npy` (files x dimensions) and `OUT.csv` (path, then the dimensions)."""
    kept = [r for r in results if r.embedding is not None]
    matrix = np.stack([r.embedding for r in kept]) if kept else np.zeros((0, 0), np.float32)
    npy, table = out.with_suffix(".npy"), out.with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, matrix.astype(np.float32))
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *(f"e{i}" for i in range(matrix.shape[1] if kept else 0))])
        for r, row in zip(kept, matrix, strict=True):
            writer.writerow([r.path, *(f"{value:.6g}" for value in row)])
    return npy, table


def upsampled_note(results: Sequence[FilePrediction], sample_rate: int) -> str | None:
    """A line on the files recorded below the model's sample rate (upsampled, so the model
    sees nothing in its upper mel bands, and may classify them worse), or None."""
    rates = Counter(r.sample_rate for r in results if r.sample_rate and r.sample_rate < sample_rate)
    if not rates:
        return None
    return (
        f"{rates.total()} of {len(results)} file(s) are recorded below the model's "
        f"{sample_rate} Hz ({rates_text(rates)}): they are upsampled, and the model, trained on "
        f"{sample_rate} Hz audio, sees nothing above {max(rates) // 2} Hz in them"
    )
