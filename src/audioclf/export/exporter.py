"""`export_model`: every requested format and input of a run's float and int8 models,
each written with its sidecar and checked against PyTorch."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from audioclf import tflite
from audioclf.export import mediapipe_file
from audioclf.export.checks import Check, check_export, table
from audioclf.export.formats import (
    EXPORTERS,
    FORMATS,
    SUFFIXES,
    TFLITE_FORMATS,
    ExportError,
    MicroCheckRunner,
)
from audioclf.export.modules import (
    ChannelLast,
    Int8Model,
    WaveformModel,
    inference_model,
)
from audioclf.export.sidecar import LAYOUTS, sidecar
from audioclf.features import LogMelParams
from audioclf.frontend import LogMelFrontEnd
from audioclf.model import Model
from audioclf.normalization import FeatureNormalization
from audioclf.quant import QuantizedModel

log = logging.getLogger(__name__)

INPUTS = ("log_mel", "waveform")
#: The runtimes a format's files are checked in, as (name in the report, runner factory; None:
#: `load_runner`'s). A TFLite file runs in LiteRT and again in TFLite Micro, as a
#: microcontroller runs it (its own kernels, the stored shapes); MediaPipe's file in MediaPipe.
CHECK_RUNTIMES = {
    "tflite": [("tflite", None), ("tflite-micro", MicroCheckRunner)],
    "mediapipe": [("mediapipe", mediapipe_file.runner)],
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
    inputs: Sequence[str] = ("log_mel",),
    check_waveforms: np.ndarray | None = None,
) -> list[Check]:
    """Export the float `model` (`model.<suffix>`) and the int8 `quantized` one
    (`model_int8.<suffix>`), whichever are given, in each format into `directory`, each with
    a sidecar `<file>.json`; check each against PyTorch on `check_features` (N, 1, frames,
    mels, before normalisation) and write `export_report.json`. Raises ExportError naming the
    first failed check, after the report is written.

    `inputs` with `waveform` adds files that take raw audio (`*_waveform.<suffix>`): the
    log-mel front end and normalisation inside, checked on `check_waveforms` (N, clip
    samples, the clips `check_features` were computed from). The `mediapipe` format takes
    raw audio whatever `inputs` says (`model_mediapipe.tflite`: probabilities out, metadata
    inside), and is checked through MediaPipe's AudioClassifier.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; this version has {FORMATS}")
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise ExportError(f"unknown export input(s) {unknown}; one of {INPUTS}")
    if tflite_layout not in LAYOUTS:
        raise ExportError(f"tflite layout {tflite_layout!r}: one of {sorted(LAYOUTS)}")
    if ("waveform" in inputs or "mediapipe" in formats) and check_waveforms is None:
        raise ExportError("waveform-in exports need the check clips' waveforms")
    directory.mkdir(parents=True, exist_ok=True)
    raw = np.ascontiguousarray(check_features, dtype=np.float32)
    labels = None if multi_label else check_labels
    variants = _Variants(
        model, quantized, normalization, raw, check_waveforms, feature_params, multi_label
    )
    float_accuracy = None
    if variants.inside is not None and labels is not None:
        with torch.no_grad():
            logits = variants.inside(torch.from_numpy(raw)).numpy()
        float_accuracy = float((logits.argmax(1) == labels).mean())
    checks = []
    for fmt in formats:
        for input_kind in ("waveform",) if fmt == "mediapipe" else inputs:
            for stem, module, check_inputs, int8, stats in variants.of(fmt, input_kind):
                path = directory / f"{stem}{SUFFIXES[fmt]}"
                layout = tflite_layout if fmt == "tflite" and input_kind == "log_mel" else "nchw"
                exported = ChannelLast(module) if layout == "nhwc" else module
                example = torch.from_numpy(check_inputs[:2])
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
                frontend_diff, frontend_dtype = variants.frontend_deviation(module)
                io = tflite.io_quantization(path) if fmt in TFLITE_FORMATS else {}
                info = sidecar(
                    exported,
                    classes,
                    feature_params,
                    clip_seconds,
                    raw.shape[1:],
                    fmt,
                    model_name,
                    multi_label,
                    normalization=stats,
                    layout=layout,
                    io_quantization=io or None,
                    frontend_max_abs_diff=frontend_diff,
                )
                Path(f"{path}.json").write_text(json.dumps(info, indent=1))
                if fmt == "mediapipe":
                    mediapipe_file.add_metadata(path, info, f"{model_name} ({stem})")
                for name, runner in CHECK_RUNTIMES.get(fmt, [(fmt, None)]):
                    checks.append(
                        check_export(
                            name,
                            path,
                            module,
                            check_inputs,
                            int8=int8,
                            labels=labels,
                            float_accuracy=float_accuracy,
                            input_kind=input_kind,
                            frontend_max_abs_diff=frontend_diff,
                            frontend_dtype=frontend_dtype,
                            output_step=(io.get("output") or {}).get("scale"),
                            multi_label=multi_label,
                            runner=runner,
                            probabilities=fmt == "mediapipe",
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


class _Variants:
    """The modules to export, each built (copied, fused) once whatever the formats, with the
    inputs each is checked on."""

    def __init__(
        self,
        model: Model | None,
        quantized: QuantizedModel | None,
        normalization: FeatureNormalization | None,
        raw: np.ndarray,
        waveforms: np.ndarray | None,
        feature_params: LogMelParams,
        multi_label: bool,
    ) -> None:
        self.normalization = normalization
        self.activation = "sigmoid" if multi_label else "softmax"
        self.raw = raw
        self.normalised = raw if normalization is None else normalization(raw)
        self.waveforms = None if waveforms is None else np.ascontiguousarray(waveforms, np.float32)
        self.feature_params = feature_params
        self.model = model
        self.inside = None if model is None else inference_model(model, normalization)
        self.int8 = None if quantized is None else Int8Model(quantized)
        # An int8 graph without the model's input BatchNorm takes it as normalisation too.
        self.int8_normalization, self.int8_normalised = normalization, self.normalised
        if quantized is not None and quantized.input_normalization is not None:
            self.int8_normalization = quantized.input_normalization.after(normalization)
            self.int8_normalised = self.int8_normalization(raw)
        self._frontends: dict[torch.dtype, tuple[LogMelFrontEnd, float]] = {}

    @functools.cached_property
    def bare(self) -> nn.Module | None:
        """The float model without the normalisation (TFLite, waveform-in): built only when
        one of those is exported."""
        if self.model is None or self.normalization is None:
            return self.inside
        return inference_model(self.model, None)

    def of(
        self, fmt: str, input_kind: str
    ) -> list[tuple[str, nn.Module, np.ndarray, bool, FeatureNormalization | None]]:
        """(file stem, module, check inputs, int8, normalisation) for each model in `fmt`
        with `input_kind`."""
        stems = [] if self.inside is None else [("model", False)]
        stems += [] if self.int8 is None else [("model_int8", True)]
        result = []
        for stem, int8 in stems:
            stats = self.int8_normalization if int8 else self.normalization
            if input_kind == "waveform":
                # TFLite has no float64 kernels: its front end computes in float32.
                dtype = torch.float32 if fmt in TFLITE_FORMATS else torch.float64
                module = self.int8 if int8 else self.bare
                # MediaPipe's AudioClassifier reports the output as scores: probabilities.
                activation = self.activation if fmt == "mediapipe" else None
                wrapped = WaveformModel(self._frontend(dtype), stats, module, activation)
                suffix = "mediapipe" if fmt == "mediapipe" else "waveform"
                result.append((f"{stem}_{suffix}", wrapped.eval(), self.waveforms, int8, stats))
            elif int8 or fmt == "tflite":
                # TFLite and int8 files take normalised features (the sidecar has the
                # statistics): an int8 input is quantised after normalising, and litert-torch
                # could not convert the broadcast against the dynamic batch TFLite files had
                # before they took one clip.
                module, inputs = (
                    (self.int8, self.int8_normalised) if int8 else (self.bare, self.normalised)
                )
                result.append((stem, module, inputs, int8, stats))
            else:
                # ONNX and TorchScript normalise inside.
                result.append((stem, self.inside, self.raw, int8, stats))
        return result

    def _frontend(self, dtype: torch.dtype) -> LogMelFrontEnd:
        if dtype not in self._frontends:
            frontend = LogMelFrontEnd(
                self.feature_params, self.waveforms.shape[1], dtype=dtype
            ).eval()
            with torch.no_grad():
                log_mel = frontend(torch.from_numpy(self.waveforms)).numpy()
            self._frontends[dtype] = (frontend, float(np.abs(log_mel - self.raw).max()))
        return self._frontends[dtype][0]

    def frontend_deviation(self, module: nn.Module) -> tuple[float | None, str | None]:
        """Max |log-mel difference| of a waveform module's front end against the check
        features (compute_log_mel's), and the front end's dtype; Nones for log-mel input."""
        if not isinstance(module, WaveformModel):
            return None, None
        dtype = module.frontend.dtype
        return self._frontends[dtype][1], str(dtype).removeprefix("torch.")
