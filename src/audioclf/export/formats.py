"""The exporters (ONNX, TorchScript, TFLite, MediaPipe's TFLite) and a runner for each
exported file."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from audioclf import tflite
from audioclf.export.modules import Int8Model, input_name, unwrap
from audioclf.runtime import int8_products_saturate

FORMATS = ("onnx", "torchscript", "tflite", "mediapipe")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "tflite": ".tflite", "mediapipe": ".tflite"}
#: The formats written as TFLite files (MediaPipe's: waveform in, probabilities out, with
#: metadata; `audioclf.export.mediapipe_file`).
TFLITE_FORMATS = ("tflite", "mediapipe")
OUTPUT_NAME = "logits"
_MAX_BATCH = 4096
_EXPORTER_LOGGERS = {
    "onnx_ir": logging.WARNING,
    "onnxscript": logging.WARNING,
    "torch.onnx._internal.exporter._registration": logging.ERROR,
}


class ExportError(RuntimeError):
    """An export that could not be written or failed its check against PyTorch."""


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=_MAX_BATCH)


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """ONNX through torch.onnx's dynamo exporter, one self-contained file, dynamic batch (int8
    graphs become QuantizeLinear / DequantizeLinear pairs, which onnxruntime runs in int8)."""
    # onnx-ir and onnxscript log every pass at INFO (hundreds of lines under Hydra's root
    # logger); the exporter warns that torchvision's ops are not registered (not used here).
    for name, level in _EXPORTER_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    with quiet():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=[input_name(module)],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: _batch_dim()},),
        )
    return path


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """TorchScript by tracing (the graph is shape-generic in the batch)."""
    with quiet(), torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    traced.save(str(path))
    return path


def export_tflite(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """TFLite through litert-torch (`audioclf.tflite`); an int8 graph becomes a full-int8
    file. x86-quantized graphs are refused: they convert but crash the interpreter.

    Every file has a fixed batch of 1, as on-device code feeds it: TFLite Micro has no
    dynamic shapes (a file converted with a dynamic batch, traced on 2 clips, failed there at
    its first PAD; traced on 1 clip, torch.export specialises the batch, or with its
    size-oblivious option refused the QAT graphs), and litert-torch cannot convert the
    waveform front end's gather and reshapes against a dynamic batch.
    """
    inner = unwrap(module)
    int8 = isinstance(inner, Int8Model)
    if int8 and inner.backend != "xnnpack":
        raise ExportError(
            "tflite: an x86-quantized model converts but crashes the TFLite interpreter; "
            "quantise with model.quantization.backend=xnnpack for TFLite"
        )
    return tflite.convert(module, example[:1], path, int8=int8, batch=None)


EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], Path]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
    "tflite": export_tflite,
    "mediapipe": export_tflite,  # the metadata is added with the sidecar's facts
}


#: onnxruntime turns int8 activations into uint8 for its u8 x s8 kernels, which on x86 CPUs
#: without VNNI add pairs of products in int16 and saturate: a PANNs MobileNetV1's int8 file
#: agreed with its int8 PyTorch model on 91.33% of FSDD test clips (logits up to 7 off) on an AVX2
#: EPYC. Kept in int8 (s8 x s8 kernels) it agreed on 99.33% (int8 rounding) and passed its
#: check; a batch is about 3x slower there, EfficientNetV2's no slower. Float files have
#: nothing for this optimizer to do.
ORT_DISABLED = ["QDQS8ToU8Transformer"] if int8_products_saturate() else []


def load_runner(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function input -> logits for an exported file (.onnx, TorchScript .pt, .tflite).

    The input is what the file takes: waveforms `(batch, samples)`, or log-mel NCHW float32 as
    `compute_log_mel` makes them (normalised first where the file's sidecar says the
    normalisation is outside); a channel-last or int8 file gets them transposed or quantised
    here, and int8 logits come back dequantised.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        try:
            import onnxruntime
        except ImportError as error:
            raise ExportError(
                'running ONNX needs onnxruntime: pip install -e ".[export]"'
            ) from error

        session = onnxruntime.InferenceSession(
            str(path), providers=["CPUExecutionProvider"], disabled_optimizers=ORT_DISABLED
        )
        name = session.get_inputs()[0].name
        return lambda inputs: session.run(None, {name: inputs.astype(np.float32)})[0]
    if path.suffix == ".pt":
        with quiet():
            scripted = torch.jit.load(str(path), map_location="cpu")
        scripted.eval()

        def run(inputs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return scripted(torch.from_numpy(inputs.astype(np.float32))).numpy()

        return run
    if path.suffix == ".tflite":
        return tflite.runner(path)
    raise ExportError(f"{path}: not an export this project reads (.onnx, .pt, .tflite)")


class MicroCheckRunner:
    """`load_runner` for a .tflite file, through TFLite Micro's interpreter (as a
    microcontroller runs it: `tflite.MicroRunner`); ExportError with TFLite Micro's message
    when it cannot. `arena_bytes`: its tensor arena, once a clip has run."""

    def __init__(self, path: str | Path) -> None:
        try:
            self._run = tflite.MicroRunner(Path(path))
        except (ImportError, tflite.MicroError) as error:
            raise ExportError(str(error)) from error

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        try:
            return self._run(inputs)
        except tflite.MicroError as error:
            raise ExportError(str(error)) from error

    @property
    def arena_bytes(self) -> int | None:
        return self._run.arena_bytes


@contextlib.contextmanager
def quiet():
    """The exporters print progress and deprecation notices (torch.jit.trace is deprecated in
    torch 2.13 but still the way to TorchScript); the checks are what matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            yield
