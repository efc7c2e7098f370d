"""The JSON sidecar beside each exported file: what on-device code needs to feed it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from torch import nn

from audioclf.export.formats import OUTPUT_NAME, TFLITE_FORMATS
from audioclf.export.modules import InferenceModel, Int8Model, WaveformModel, input_name, unwrap
from audioclf.features import LogMelParams
from audioclf.normalization import FeatureNormalization

LAYOUTS = {
    "nchw": "NCHW: (batch, 1, frames, mels), log-mel as compute_log_mel returns it",
    "nhwc": "NHWC: (batch, frames, mels, 1), channel-last as TensorFlow code feeds it",
}
WAVEFORM_LAYOUT = (
    "(batch, clip_samples): mono float32 samples in [-1, 1] at sample_rate Hz, each clip "
    "centred and zero-padded (or cropped) to clip_samples; the log-mel front end and the "
    "normalisation are inside the model"
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
    frontend_max_abs_diff: float | None = None,
) -> dict[str, Any]:
    """What on-device code needs to feed the exported `module` (as written to a `fmt` file)
    from raw audio: classes, rates, every feature parameter, normalisation, input and output
    names, shapes, layouts and int8 quantisation."""
    inner = unwrap(module)
    int8 = isinstance(inner, Int8Model)
    waveform = isinstance(module, WaveformModel)
    stats = None
    if isinstance(inner, InferenceModel) and inner.n_mels is not None:
        stats = {"mean": inner.mean.tolist(), "std": inner.std.tolist(), "inside_model": True}
    elif normalization is not None and (int8 or isinstance(inner, InferenceModel)):
        stats = {
            "mean": normalization.mean.tolist(),
            "std": normalization.std.tolist(),
            "inside_model": waveform,
        }
    clip_samples = round(clip_seconds * feature_params.sample_rate)
    batch = 1 if fmt in TFLITE_FORMATS else "batch"  # TFLite files take one clip
    if waveform:
        shape, description = [batch, clip_samples], WAVEFORM_LAYOUT
    else:
        _, frames, mels = feature_shape
        shape = [batch, 1, frames, mels] if layout == "nchw" else [batch, frames, mels, 1]
        description = LAYOUTS[layout] + (
            "" if stats is None or stats["inside_model"] else ", normalised first"
        )
    io = io_quantization or {}
    activation = module.activation if waveform else None
    if activation is not None:
        output_name, meaning = "probabilities", f"probabilities ({activation} inside)"
    else:
        output_name = OUTPUT_NAME
        meaning = f"logits: {'sigmoid' if multi_label else 'softmax'} for probabilities"
    frontend = None
    if waveform:
        frontend = {
            "inside_model": True,
            "dtype": str(module.frontend.dtype).removeprefix("torch."),
            "max_abs_diff_vs_compute_log_mel": frontend_max_abs_diff,
        }
    return {
        "format": fmt,
        "model": model_name,
        "precision": "int8" if int8 else "float32",
        "classes": list(classes),
        "multi_label": multi_label,
        "sample_rate": feature_params.sample_rate,
        "clip_seconds": clip_seconds,
        "clip_samples": clip_samples,
        "features": asdict(feature_params),
        "frontend": frontend,
        "normalization": stats,
        "input": {
            "name": input_name(module),
            "kind": "waveform" if waveform else "log_mel",
            "shape": shape,
            "layout": description,
            "dtype": "int8" if io.get("input") else "float32",
            "quantization": io.get("input"),
        },
        "output": {
            "name": output_name,
            "shape": [batch, len(classes)],
            "meaning": meaning,
            "activation": activation,
            "dtype": "int8" if io.get("output") else "float32",
            "quantization": io.get("output"),
        },
    }
