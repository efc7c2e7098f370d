"""Exports for deployment (ONNX, TorchScript), each checked against PyTorch on real clips.

An exported model takes log-mel features as `compute_log_mel` makes them, `(batch, 1, frames,
mels)` float32, and returns logits `(batch, classes)`: the run's per-mel-bin normalisation is
inside the graph and BatchNorm is folded into the convolutions. A JSON sidecar beside each
file says everything on-device code needs to build that input from raw audio: classes, sample
rate, clip length, every resolved log-mel parameter, the normalisation statistics, and the
input and output names, shapes and layouts.

Every export is run on real test clips and compared with the PyTorch model it came from: float
exports must agree to max |delta logit| <= 1e-4 with 100% top-1 agreement, else ExportError
names the check that failed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from audioclf.features import FeatureNormalization, LogMelParams
from audioclf.model import Model

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME = "log_mel"
OUTPUT_NAME = "logits"
#: Float exports: the largest |logit difference| allowed against PyTorch.
MAX_ABS_DIFF = 1e-4


class ExportError(RuntimeError):
    """An export that could not be written or failed its check against PyTorch."""


class InferenceModel(nn.Module):
    """What is exported: normalisation, then the (fused, eval-mode) model; logits out."""

    def __init__(self, model: Model, normalization: FeatureNormalization | None) -> None:
        super().__init__()
        self.model = model
        n_mels = None if normalization is None else len(normalization.mean)
        mean = np.zeros(1, np.float32) if normalization is None else normalization.mean
        std = np.ones(1, np.float32) if normalization is None else normalization.std
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.n_mels = n_mels

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        return self.model((log_mel - self.mean) / self.std)


def inference_model(model: Model, normalization: FeatureNormalization | None) -> InferenceModel:
    """A fused eval-mode copy of `model` behind its normalisation (the original is untouched)."""
    fused = copy.deepcopy(model).eval().to("cpu", memory_format=torch.contiguous_format)
    fused.fuse_model()
    return InferenceModel(fused, normalization).eval()


@dataclass(frozen=True)
class Check:
    """An export's agreement with PyTorch on the check clips."""

    format: str
    path: str
    clips: int
    max_abs_diff: float
    top1_agreement: float
    passed: bool
    failure: str | None


def export_onnx(module: InferenceModel, example: torch.Tensor, path: Path) -> Path:
    """ONNX through torch.onnx's dynamo exporter, one self-contained file, dynamic batch."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"log_mel": {0: batch}},
        )
    return path


def export_torchscript(module: InferenceModel, example: torch.Tensor, path: Path) -> Path:
    """TorchScript by tracing (the graph is shape-generic in the batch)."""
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    traced.save(str(path))
    return path


EXPORTERS: dict[str, Callable[[InferenceModel, torch.Tensor, Path], Path]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
}


def load_runner(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function features -> logits for an exported file (.onnx, TorchScript .pt)."""
    path = Path(path)
    if path.suffix == ".onnx":
        try:
            import onnxruntime
        except ImportError as error:
            raise ExportError(
                'running ONNX needs onnxruntime: pip install -e ".[export]"'
            ) from error

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda features: session.run(None, {name: features.astype(np.float32)})[0]
    if path.suffix == ".pt":
        with _quiet():
            scripted = torch.jit.load(str(path), map_location="cpu")
        scripted.eval()

        def run(features: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return scripted(torch.from_numpy(features.astype(np.float32))).numpy()

        return run
    raise ExportError(f"{path}: not an export this project reads (.onnx, .pt)")


def check_export(
    fmt: str,
    path: Path,
    reference: InferenceModel,
    features: np.ndarray,
    batch_size: int = 32,
) -> Check:
    """Run the export and the PyTorch model on `features` and compare them."""
    runner = load_runner(path)
    exported, expected = [], []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = features[start : start + batch_size]
            exported.append(runner(batch))
            expected.append(reference(torch.from_numpy(batch)).numpy())
    exported_logits, expected_logits = np.concatenate(exported), np.concatenate(expected)
    if exported_logits.shape != expected_logits.shape:
        return Check(fmt, str(path), len(features), float("inf"), 0.0, False, "output shape")
    max_abs_diff = float(np.abs(exported_logits - expected_logits).max())
    agreement = float((exported_logits.argmax(1) == expected_logits.argmax(1)).mean())
    failure = None
    if not max_abs_diff <= MAX_ABS_DIFF:
        failure = f"max |delta logit| {max_abs_diff:.3g} > {MAX_ABS_DIFF:g}"
    elif agreement < 1.0:
        failure = f"top-1 agreement {agreement:.2%} < 100%"
    return Check(fmt, str(path), len(features), max_abs_diff, agreement, failure is None, failure)


def sidecar(
    module: InferenceModel,
    classes: Sequence[str],
    feature_params: LogMelParams,
    clip_seconds: float,
    feature_shape: Sequence[int],
    fmt: str,
    model_name: str,
    multi_label: bool = False,
) -> dict[str, Any]:
    """What on-device code needs to feed the exported file from raw audio."""
    mean, std = module.mean.tolist(), module.std.tolist()
    return {
        "format": fmt,
        "model": model_name,
        "classes": list(classes),
        "multi_label": multi_label,
        "sample_rate": feature_params.sample_rate,
        "clip_seconds": clip_seconds,
        "clip_samples": round(clip_seconds * feature_params.sample_rate),
        "features": asdict(feature_params),
        "normalization": None
        if module.n_mels is None
        else {"mean": mean, "std": std, "inside_model": True},
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", *feature_shape],
            "layout": "NCHW: (batch, 1, frames, mels), log-mel as compute_log_mel returns it",
            "dtype": "float32",
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(classes)],
            "meaning": "logits: sigmoid for probabilities"
            if multi_label
            else "logits: softmax for probabilities",
            "dtype": "float32",
        },
    }


def export_model(
    model: Model,
    formats: Sequence[str],
    directory: Path,
    *,
    classes: Sequence[str],
    feature_params: LogMelParams,
    clip_seconds: float,
    normalization: FeatureNormalization | None,
    check_features: np.ndarray,
    model_name: str,
    multi_label: bool = False,
) -> list[Check]:
    """Export `model` in each format into `directory` (`model.<suffix>` plus
    `model.<suffix>.json`), check each against PyTorch on `check_features` (N, 1, frames,
    mels), and write `export_report.json`. Raises ExportError naming the first failed check,
    after the report is written."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; this version has {FORMATS}")
    directory.mkdir(parents=True, exist_ok=True)
    module = inference_model(model, normalization)
    example = torch.from_numpy(np.ascontiguousarray(check_features[:2], dtype=np.float32))
    checks = []
    for fmt in formats:
        path = directory / f"model{SUFFIXES[fmt]}"
        try:
            EXPORTERS[fmt](module, example, path)
        except Exception as error:  # noqa: BLE001 - any exporter failure is this format failing
            raise ExportError(f"{fmt} export failed: {type(error).__name__}: {error}") from error
        info = sidecar(
            module,
            classes,
            feature_params,
            clip_seconds,
            check_features.shape[1:],
            fmt,
            model_name,
            multi_label,
        )
        Path(f"{path}.json").write_text(json.dumps(info, indent=1))
        checks.append(check_export(fmt, path, module, check_features))
    report = directory / "export_report.json"
    report.write_text(json.dumps([asdict(check) for check in checks], indent=1))
    log.info("exports checked on %d clips (%s):\n%s", len(check_features), report, table(checks))
    failed = [check for check in checks if not check.passed]
    if failed:
        raise ExportError(
            "export check failed: "
            + "; ".join(f"{check.format} ({check.path}): {check.failure}" for check in failed)
        )
    return checks


def table(checks: Sequence[Check]) -> str:
    """The checks as a text table."""
    lines = [f"{'format':<12} {'max |dlogit|':>12} {'top-1 agree':>12}  result"]
    for check in checks:
        result = "ok" if check.passed else f"FAILED: {check.failure}"
        lines.append(
            f"{check.format:<12} {check.max_abs_diff:>12.3g} {check.top1_agreement:>12.2%}  "
            f"{result}"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet():
    # The exporters print progress and deprecation notices (torch.jit.trace is deprecated in
    # torch 2.13 but still the way to TorchScript); the check below is what matters.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
