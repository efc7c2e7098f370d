"""Classify audio files with a trainer checkpoint or an exported model.

    audioclf-predict MODEL FILE_OR_DIR... [--top-k 3] [--format table|json|csv]
                     [--window S] [--hop S] [--aggregate mean|max] [--per-window]
                     [--threshold P] [--embeddings OUT]

MODEL is a trainer checkpoint (.pth) or an export (.onnx, TorchScript .pt, .tflite) with its
JSON sidecar beside it; a waveform-in export gets the windows' samples, the others their
log-mel. Each file is decoded, resampled and cut into windows of the clip length
(sliding with `--hop` when it is longer; centred and zero-padded when shorter), each window's
log-mel computed as in training, and the windows' probabilities aggregated (by default their
mean, or for a multi-label model their maximum: a label heard in one window is in the file).
A file that cannot be used is reported with the reason and skipped; the exit status is 1 when
any was.

Each result names its predicted labels: the most probable one, or for a multi-label model every
label whose probability reaches `--threshold` (0.5, as the trainer's F1), possibly none.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audioclf.audio import BadAudioError, fix_length, read_audio
from audioclf.checkpoint import (
    NOT_FROM_THE_JOB,
    load_checkpoint,
    stored_config,
    stored_normalization,
)
from audioclf.export import ExportError, load_runner
from audioclf.features import LogMelParams, log_mel
from audioclf.layouts import AUDIO_EXTENSIONS, audio_files_below
from audioclf.model import CheckpointError, Model, create_model, load_state
from audioclf.normalization import FeatureNormalization
from audioclf.predict_results import (
    FilePrediction,
    format_results,
    upsampled_note,
    write_embeddings,
)
from audioclf.quant import QuantizationError, load_quantized

EMBEDDINGS_NEED_CHECKPOINT = "--embeddings needs a trainer checkpoint (.pth)"
#: A multi-label model's decision threshold when none is given: the trainer's for its F1
#: (`audioclf.metrics.THRESHOLD`, whose torchmetrics import would add 2.5 s to every call).
THRESHOLD = 0.5


class PredictError(ValueError):
    """A model file that cannot be used for prediction; the message names it."""


@dataclass
class Predictor:
    """Log-mel windows in, logits out, with what is needed to make the windows."""

    classes: list[str]
    feature_params: LogMelParams
    clip_seconds: float
    multi_label: bool
    logits: Callable[[np.ndarray], np.ndarray]
    embeddings: Callable[[np.ndarray], np.ndarray] | None = None
    #: The model takes waveforms of `clip_samples` (a waveform-in export), not log-mel.
    waveform_input: bool = False
    #: `logits` returns probabilities (a MediaPipe export: the activation is inside).
    probabilities: bool = False

    @property
    def sample_rate(self) -> int:
        return self.feature_params.sample_rate

    @property
    def clip_samples(self) -> int:
        return round(self.clip_seconds * self.sample_rate)

    def check_window(self, window_seconds: float | None) -> None:
        """PredictError when a waveform-in model is asked for windows of another length."""
        if (
            self.waveform_input
            and window_seconds is not None
            and round(window_seconds * self.sample_rate) != self.clip_samples
        ):
            raise PredictError(
                f"--window: a waveform-in export takes clips of {self.clip_seconds:g} s exactly"
            )


def load_predictor(path: str | Path) -> Predictor:
    """A Predictor for a trainer checkpoint (.pth, float or int8) or an export (.onnx, .pt,
    .tflite) with its sidecar."""
    path = Path(path)
    if path.suffix in (".onnx", ".pt", ".tflite"):
        return _export_predictor(path)
    return _checkpoint_predictor(path)


def _checkpoint_predictor(path: Path) -> Predictor:
    content = load_checkpoint(path)
    if "features" not in content:
        raise PredictError(f"{path}: holds no feature parameters; {NOT_FROM_THE_JOB}")
    _, settings = stored_config(content, path)
    params = LogMelParams(**content["features"])
    model_params = dict(settings.model.params)
    if model_params.get("n_mels", 0) is None:
        model_params["n_mels"] = params.n_mels
    model = create_model(settings.model.name, len(content["classes"]), **model_params)
    int8 = "quantized" in content
    if int8:
        try:
            model = load_quantized(model, content["quantized"], str(path))
        except QuantizationError as error:
            raise PredictError(str(error)) from error
    else:
        load_state(model, content["model"], path, strict=True)
    model.eval()
    normalization = stored_normalization(content, path)

    def prepare(features: np.ndarray) -> torch.Tensor:
        batch = features if normalization is None else normalization(features)
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))

    def logits(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(prepare(features)).numpy()

    def embeddings(features: np.ndarray) -> np.ndarray:
        if int8:
            raise PredictError(
                f"{path}: an int8 graph has no embedding output; use the float checkpoint"
            )
        with torch.no_grad():
            return _pooled(model, prepare(features)).numpy()

    return Predictor(
        list(content["classes"]),
        params,
        settings.data.clip_seconds,
        settings.data.multi_label,
        logits,
        embeddings,
    )


def _pooled(model: Model, features: torch.Tensor) -> torch.Tensor:
    if features.dim() == 3:
        features = features.unsqueeze(1)
    return model.forward_features(features)


def _export_predictor(path: Path) -> Predictor:
    sidecar_path = Path(f"{path}.json")
    try:
        info = json.loads(sidecar_path.read_text())
        params = LogMelParams(**info["features"])
        classes = list(info["classes"])
        clip_seconds = float(info["clip_seconds"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PredictError(
            f"{sidecar_path}: the export's sidecar is missing or unreadable ({error})"
        ) from error
    try:
        runner = load_runner(path)
    except ExportError:
        raise
    except Exception as error:  # noqa: BLE001 - a runtime refusing the file: name the file
        raise PredictError(f"{path}: cannot load ({type(error).__name__}: {error})") from error
    waveform_input = info.get("input", {}).get("kind") == "waveform"
    probabilities = bool(info.get("output", {}).get("activation"))
    stats = info.get("normalization")
    if stats and not stats.get("inside_model", True):
        # TFLite and int8 files take normalised features (the sidecar has the statistics).
        normalization = FeatureNormalization(
            np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
        )
        inner = runner

        def runner(features: np.ndarray) -> np.ndarray:
            return inner(normalization(features))

    return Predictor(
        classes,
        params,
        clip_seconds,
        bool(info.get("multi_label")),
        runner,
        waveform_input=waveform_input,
        probabilities=probabilities,
    )


def windows(
    waveform: np.ndarray, clip_samples: int, hop_samples: int
) -> list[tuple[float, np.ndarray]]:
    """(start sample, window) pairs: one centred clip for short audio, else windows every
    `hop_samples` with the last one flush with the end."""
    if len(waveform) <= clip_samples:
        return [(0, fix_length(waveform, clip_samples))]
    starts = list(range(0, len(waveform) - clip_samples + 1, hop_samples))
    if starts[-1] != len(waveform) - clip_samples:
        starts.append(len(waveform) - clip_samples)
    return [(start, waveform[start : start + clip_samples]) for start in starts]


def predict_file(
    predictor: Predictor,
    path: Path,
    top_k: int = 3,
    window_seconds: float | None = None,
    hop_seconds: float | None = None,
    aggregate: str | None = None,
    per_window: bool = False,
    embed: bool = False,
    batch_size: int = 32,
    threshold: float = THRESHOLD,
) -> FilePrediction:
    """Classify one file (BadAudioError when it cannot be used). Its windows go through the
    model `batch_size` at a time, so memory does not grow with the file's length. A
    multi-label model's labels at or above `threshold` are all listed, in `top` too even
    beyond `top_k`."""
    waveform, audio = read_audio(path, predictor.sample_rate)
    clip = round((window_seconds or predictor.clip_seconds) * predictor.sample_rate)
    hop_seconds = hop_seconds or (window_seconds or predictor.clip_seconds) / 2
    hop = round(hop_seconds * predictor.sample_rate)
    parts = windows(waveform, clip, max(hop, 1))
    if embed and predictor.embeddings is None:
        raise PredictError(EMBEDDINGS_NEED_CHECKPOINT)
    if predictor.waveform_input:
        predictor.check_window(window_seconds)
    chunks, vectors = [], []
    for first in range(0, len(parts), batch_size):
        batch = [window for _, window in parts[first : first + batch_size]]
        if predictor.waveform_input:
            chunks.append(predictor.logits(np.stack(batch).astype(np.float32)))
            continue
        features = np.stack([log_mel(window, predictor.feature_params) for window in batch])
        features = features[:, np.newaxis]
        chunks.append(predictor.logits(features))
        if embed:
            vectors.append(predictor.embeddings(features))
    logits = np.concatenate(chunks)
    if predictor.probabilities:
        probabilities = logits
    elif predictor.multi_label:
        probabilities = 1 / (1 + np.exp(-logits))
    else:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    if aggregate is None:
        aggregate = "max" if predictor.multi_label else "mean"
    pooled = probabilities.mean(axis=0) if aggregate == "mean" else probabilities.max(axis=0)

    def decide(row: np.ndarray) -> tuple[list[tuple[str, float]], list[str]]:
        if not predictor.multi_label:
            top = _top(row, predictor.classes, top_k)
            return top, [top[0][0]]
        above = int((row >= threshold).sum())
        top = _top(row, predictor.classes, max(top_k, above))
        return top, [label for label, _ in top[:above]]

    result = FilePrediction(str(path), *decide(pooled), sample_rate=audio.sample_rate)
    if per_window:
        for (start, _), row in zip(parts, probabilities, strict=True):
            top, labels = decide(row)
            result.windows.append(
                {
                    "start_seconds": round(start / predictor.sample_rate, 3),
                    "top": top,
                    "labels": labels,
                }
            )
    if embed:
        result.embedding = np.concatenate(vectors).mean(axis=0)
    return result


def _top(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probabilities)[:k]
    return [(classes[index], float(probabilities[index])) for index in order]


def audio_files(arguments: Iterable[str]) -> list[Path]:
    """Files as given, and the audio files below any folder given (hidden ones left out, as in
    training); a folder with none is a PredictError naming it (a mistyped folder would
    otherwise predict nothing, quietly)."""
    paths = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = audio_files_below(path)
            if not found:
                raise PredictError(
                    f"{path}: no audio files below it ({', '.join(sorted(AUDIO_EXTENSIONS))})"
                )
            paths += found
        else:
            paths.append(path)
    return paths


def _number(kind: type, accepts: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` that `accepts` takes, else argparse's usage error
    saying it must be `expected` (NaN fails every comparison, so it is refused too)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, not {text!r}")
        return value

    return parse


def _positive(kind: type) -> Callable[[str], Any]:
    return _number(kind, lambda value: value > 0, "a number above 0")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (1 when any file failed)."""
    parser = argparse.ArgumentParser(prog="audioclf-predict", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="trainer checkpoint (.pth), .onnx or TorchScript .pt")
    parser.add_argument("inputs", nargs="+", help="audio files or folders")
    parser.add_argument("--top-k", type=_positive(int), default=3)
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument(
        "--window", type=_positive(float), help="window seconds (default: clip length)"
    )
    parser.add_argument("--hop", type=_positive(float), help="hop seconds (default: half a window)")
    parser.add_argument(
        "--aggregate",
        choices=("mean", "max"),
        help="pooling of the windows (default: mean; max for a multi-label model)",
    )
    parser.add_argument("--per-window", action="store_true", help="also each window's top-k")
    parser.add_argument(
        "--threshold",
        type=_number(float, lambda value: 0 <= value <= 1, "a probability in [0, 1]"),
        help=f"multi-label models: predict each label at or above it (default {THRESHOLD})",
    )
    parser.add_argument("--embeddings", type=Path, help="write pooled embeddings to OUT.npy/.csv")
    parser.add_argument(
        "--batch-size", type=_positive(int), default=32, help="windows per model call (memory)"
    )
    arguments = parser.parse_args(argv)
    try:
        predictor = load_predictor(arguments.model)
    except (PredictError, CheckpointError, ExportError) as error:
        print(f"audioclf-predict: {error}", file=sys.stderr)
        return 2
    frame = predictor.feature_params.frame_length
    if arguments.window is not None and arguments.window * predictor.sample_rate < frame:
        print(
            f"audioclf-predict: --window {arguments.window:g} s is shorter than one feature "
            f"frame ({frame} samples at {predictor.sample_rate} Hz)",
            file=sys.stderr,
        )
        return 2
    if arguments.embeddings is not None and predictor.embeddings is None:
        print(f"audioclf-predict: {EMBEDDINGS_NEED_CHECKPOINT}", file=sys.stderr)
        return 2
    if arguments.threshold is not None and not predictor.multi_label:
        print(
            f"audioclf-predict: --threshold: {arguments.model} is a multi-class model, which "
            "predicts its most probable label",
            file=sys.stderr,
        )
        return 2
    try:
        predictor.check_window(arguments.window)
    except PredictError as error:
        print(f"audioclf-predict: {arguments.model}: {error}", file=sys.stderr)
        return 2
    try:
        paths = audio_files(arguments.inputs)
    except PredictError as error:
        print(f"audioclf-predict: {error}", file=sys.stderr)
        return 2
    results = []
    for path in paths:
        try:
            results.append(
                predict_file(
                    predictor,
                    path,
                    arguments.top_k,
                    arguments.window,
                    arguments.hop,
                    arguments.aggregate,
                    arguments.per_window,
                    arguments.embeddings is not None,
                    arguments.batch_size,
                    THRESHOLD if arguments.threshold is None else arguments.threshold,
                )
            )
        except BadAudioError as error:
            results.append(FilePrediction(str(path), error=error.reason))
    print(format_results(results, arguments.format, arguments.per_window, predictor.multi_label))
    if arguments.embeddings is not None:
        npy, table = write_embeddings(results, arguments.embeddings)
        print(f"embeddings: {npy}, {table}", file=sys.stderr)
    upsampled = upsampled_note(results, predictor.sample_rate)
    if upsampled:
        print(f"audioclf-predict: {upsampled}", file=sys.stderr)
    failed = [r for r in results if r.error]
    if failed:
        print(f"audioclf-predict: {len(failed)} of {len(results)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
