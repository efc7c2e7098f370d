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

from audioclf import tflite
from audioclf.features import FeatureNormalization, LogMelParams
from audioclf.model import Model
from audioclf.quant import QuantizedModel

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "tflite")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "tflite": ".tflite"}
LAYOUTS = {
    "nchw": "NCHW: (batch, 1, frames, mels), log-mel as compute_log_mel returns it",
    "nhwc": "NHWC: (batch, frames, mels, 1), channel-last as TensorFlow code feeds it",
}
INPUT_NAME = "log_mel"
OUTPUT_NAME = "logits"
#: Float exports: the largest |logit difference| allowed against PyTorch.
MAX_ABS_DIFF = 1e-4
#: Int8 exports: the least top-1 agreement with the int8 PyTorch model, and the most test
#: accuracy (points) they may lose against the float model.
MIN_INT8_AGREEMENT = 0.99
MAX_INT8_ACCURACY_DROP = 0.5
_MAX_BATCH = 4096


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
        if self.n_mels is None:
            return self.model(log_mel)
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
    precision: str
    clips: int
    max_abs_diff: float
    top1_agreement: float
    test_accuracy: float | None
    passed: bool
    failure: str | None


class ChannelLast(nn.Module):
    """`module` fed channel-last input, (batch, frames, mels, 1), as TensorFlow code feeds it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        return self.module(log_mel.permute(0, 3, 1, 2))


class Int8Model(nn.Module):
    """What an int8 export holds: the converted PT2E graph on normalised features (the
    normalisation stays outside, before the input is quantised; the sidecar has it)."""

    def __init__(self, quantized: QuantizedModel) -> None:
        super().__init__()
        self.network = quantized.eval().network
        self.backend = quantized.spec.backend

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        return self.network(log_mel)


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=_MAX_BATCH)


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """ONNX through torch.onnx's dynamo exporter, one self-contained file, dynamic batch (int8
    graphs become QuantizeLinear / DequantizeLinear pairs, which onnxruntime runs in int8)."""
    # onnx-ir logs every pass at INFO (hundreds of lines under Hydra's root logger).
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)
    with _quiet():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"log_mel": {0: _batch_dim()}},
        )
    return path


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """TorchScript by tracing (the graph is shape-generic in the batch)."""
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    traced.save(str(path))
    return path


def export_tflite(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """TFLite through litert-torch (`audioclf.tflite`); an int8 graph becomes a full-int8
    file. x86-quantized graphs are refused: they convert but crash the interpreter."""
    inner = _unwrap(module)
    int8 = isinstance(inner, Int8Model)
    if int8 and inner.backend != "xnnpack":
        raise ExportError(
            "tflite: an x86-quantized model converts but crashes the TFLite interpreter; "
            "quantise with model.quantization.backend=xnnpack for TFLite"
        )
    return tflite.convert(module, example, path, int8=int8, batch=_batch_dim())


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, ChannelLast) else module


EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], Path]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
    "tflite": export_tflite,
}


def load_runner(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function features -> logits for an exported file (.onnx, TorchScript .pt, .tflite).
    Features are NCHW float32 as `compute_log_mel` makes them (normalised first where the
    file's sidecar says the normalisation is outside); a channel-last or int8 file gets them
    transposed or quantised here, and int8 logits come back dequantised."""
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
    if path.suffix == ".tflite":
        return tflite.runner(path)
    raise ExportError(f"{path}: not an export this project reads (.onnx, .pt, .tflite)")


def check_export(
    fmt: str,
    path: Path,
    reference: nn.Module,
    features: np.ndarray,
    *,
    int8: bool = False,
    labels: np.ndarray | None = None,
    float_accuracy: float | None = None,
    batch_size: int = 32,
) -> Check:
    """Run the export and the PyTorch model (`reference`, NCHW) on `features` and compare:
    float exports to max |delta logit| <= 1e-4 and 100% top-1 agreement; int8 exports to at
    least 99% top-1 agreement with the int8 PyTorch model and, given `labels` and the float
    model's accuracy, test accuracy at most 0.5 points below it."""
    runner = load_runner(path)
    exported, expected = [], []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = features[start : start + batch_size]
            exported.append(runner(batch))
            expected.append(reference(torch.from_numpy(batch)).numpy())
    exported_logits, expected_logits = np.concatenate(exported), np.concatenate(expected)
    precision = "int8" if int8 else "float32"
    if exported_logits.shape != expected_logits.shape:
        return Check(
            fmt, str(path), precision, len(features), float("inf"), 0.0, None, False, "output shape"
        )
    max_abs_diff = float(np.abs(exported_logits - expected_logits).max())
    agreement = float((exported_logits.argmax(1) == expected_logits.argmax(1)).mean())
    accuracy = None if labels is None else float((exported_logits.argmax(1) == labels).mean())
    failure = None
    if int8:
        if agreement < MIN_INT8_AGREEMENT:
            failure = (
                f"top-1 agreement with int8 PyTorch {agreement:.2%} < {MIN_INT8_AGREEMENT:.0%}"
            )
        elif (
            accuracy is not None
            and float_accuracy is not None
            and 100 * (float_accuracy - accuracy) > MAX_INT8_ACCURACY_DROP
        ):
            failure = (
                f"test accuracy {accuracy:.2%} is more than {MAX_INT8_ACCURACY_DROP} points "
                f"below the float model's {float_accuracy:.2%}"
            )
    elif not max_abs_diff <= MAX_ABS_DIFF:
        failure = f"max |delta logit| {max_abs_diff:.3g} > {MAX_ABS_DIFF:g}"
    elif agreement < 1.0:
        failure = f"top-1 agreement {agreement:.2%} < 100%"
    return Check(
        fmt,
        str(path),
        precision,
        len(features),
        max_abs_diff,
        agreement,
        accuracy,
        failure is None,
        failure,
    )


def sidecar(
    module: nn.Module,
    classes: Sequence[str],
    feature_params: LogMelParams,
    clip_seconds: float,
    feature_shape: Sequence[int],
    fmt: str,
    model_name: str,
    multi_label: bool = False,
    *,
    normalization: FeatureNormalization | None = None,
    layout: str = "nchw",
    io_quantization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What on-device code needs to feed the exported file from raw audio."""
    inner = _unwrap(module)
    int8 = isinstance(inner, Int8Model)
    stats = None
    if isinstance(inner, InferenceModel) and inner.n_mels is not None:
        stats = {"mean": inner.mean.tolist(), "std": inner.std.tolist(), "inside_model": True}
    elif normalization is not None and (int8 or isinstance(inner, InferenceModel)):
        stats = {
            "mean": normalization.mean.tolist(),
            "std": normalization.std.tolist(),
            "inside_model": False,
        }
    _, frames, mels = feature_shape
    shape = ["batch", 1, frames, mels] if layout == "nchw" else ["batch", frames, mels, 1]
    io = io_quantization or {}
    return {
        "format": fmt,
        "model": model_name,
        "precision": "int8" if int8 else "float32",
        "classes": list(classes),
        "multi_label": multi_label,
        "sample_rate": feature_params.sample_rate,
        "clip_seconds": clip_seconds,
        "clip_samples": round(clip_seconds * feature_params.sample_rate),
        "features": asdict(feature_params),
        "normalization": stats,
        "input": {
            "name": INPUT_NAME,
            "shape": shape,
            "layout": LAYOUTS[layout]
            + ("" if stats is None or stats["inside_model"] else ", normalised first"),
            "dtype": "int8" if io.get("input") else "float32",
            "quantization": io.get("input"),
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(classes)],
            "meaning": "logits: sigmoid for probabilities"
            if multi_label
            else "logits: softmax for probabilities",
            "dtype": "int8" if io.get("output") else "float32",
            "quantization": io.get("output"),
        },
    }


def export_model(
    model: Model | None,
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
    quantized: QuantizedModel | None = None,
    check_labels: np.ndarray | None = None,
    tflite_layout: str = "nchw",
) -> list[Check]:
    """Export the float `model` (`model.<suffix>`) and the int8 `quantized` one
    (`model_int8.<suffix>`), whichever are given, in each format into `directory`, each with
    a sidecar `<file>.json`; check each against PyTorch on `check_features` (N, 1, frames,
    mels, before normalisation) and write `export_report.json`. Raises ExportError naming the
    first failed check, after the report is written."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; this version has {FORMATS}")
    if tflite_layout not in LAYOUTS:
        raise ExportError(f"tflite layout {tflite_layout!r}: one of {sorted(LAYOUTS)}")
    directory.mkdir(parents=True, exist_ok=True)
    raw = np.ascontiguousarray(check_features, dtype=np.float32)
    labels = None if multi_label else check_labels
    # Each module is built (copied and fused) once, whatever the formats.
    normalised = raw if normalization is None else normalization(raw)
    inside = None if model is None else inference_model(model, normalization)
    outside = inside  # the float model TFLite gets: without the normalisation, when there is one
    if model is not None and normalization is not None and "tflite" in formats:
        outside = inference_model(model, None)
    int8_module = None if quantized is None else Int8Model(quantized)
    float_accuracy = None
    if inside is not None and labels is not None:
        with torch.no_grad():
            logits = inside(torch.from_numpy(raw)).numpy()
        float_accuracy = float((logits.argmax(1) == labels).mean())
    checks = []
    for fmt in formats:
        variants = []
        if inside is not None:
            # TFLite and int8 files take normalised features (the sidecar has the statistics):
            # litert-torch cannot convert a broadcast against a dynamic batch, and an int8
            # input is quantised after normalising. ONNX and TorchScript normalise inside.
            variants.append(
                ("model", outside, normalised, False)
                if fmt == "tflite"
                else ("model", inside, raw, False)
            )
        if int8_module is not None:
            variants.append(("model_int8", int8_module, normalised, True))
        for stem, module, features, int8 in variants:
            path = directory / f"{stem}{SUFFIXES[fmt]}"
            layout = tflite_layout if fmt == "tflite" else "nchw"
            exported = ChannelLast(module) if layout == "nhwc" else module
            example = torch.from_numpy(features[:2])
            if layout == "nhwc":
                example = example.permute(0, 2, 3, 1).contiguous()
            try:
                EXPORTERS[fmt](exported, example, path)
            except ExportError:
                raise
            except Exception as error:  # noqa: BLE001 - any exporter failure is this format's
                raise ExportError(
                    f"{fmt} export of {stem} failed: {type(error).__name__}: {error}"
                ) from error
            info = sidecar(
                exported,
                classes,
                feature_params,
                clip_seconds,
                raw.shape[1:],
                fmt,
                model_name,
                multi_label,
                normalization=normalization,
                layout=layout,
                io_quantization=tflite.io_quantization(path) if fmt == "tflite" else None,
            )
            Path(f"{path}.json").write_text(json.dumps(info, indent=1))
            checks.append(
                check_export(
                    fmt,
                    path,
                    module,
                    features,
                    int8=int8,
                    labels=labels,
                    float_accuracy=float_accuracy,
                )
            )
    report = directory / "export_report.json"
    report.write_text(json.dumps([asdict(check) for check in checks], indent=1))
    log.info("exports checked on %d clips (%s):\n%s", len(raw), report, table(checks))
    failed = [check for check in checks if not check.passed]
    if failed:
        raise ExportError(
            "export check failed: "
            + "; ".join(f"{check.format} ({check.path}): {check.failure}" for check in failed)
        )
    return checks


def table(checks: Sequence[Check]) -> str:
    """The checks as a text table."""
    lines = [
        f"{'format':<12} {'precision':<9} {'max |dlogit|':>12} {'top-1 agree':>12} "
        f"{'accuracy':>9}  result"
    ]
    for check in checks:
        result = "ok" if check.passed else f"FAILED: {check.failure}"
        accuracy = "-" if check.test_accuracy is None else f"{check.test_accuracy:.2%}"
        lines.append(
            f"{check.format:<12} {check.precision:<9} {check.max_abs_diff:>12.3g} "
            f"{check.top1_agreement:>12.2%} {accuracy:>9}  {result}"
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
