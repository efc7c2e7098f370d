"""Exports for deployment (ONNX, TorchScript, TFLite, MediaPipe's TFLite), each checked against
PyTorch on real clips.

An exported model takes log-mel features as `compute_log_mel` makes them, `(batch, 1, frames,
mels)` float32, or, with the `waveform` input, raw audio `(batch, clip_samples)` with the
log-mel front end inside; it returns logits `(batch, classes)`. BatchNorm is folded into the
convolutions. A JSON sidecar beside each file says everything on-device code needs to build
the input from raw audio: classes, sample rate, clip length, every resolved log-mel parameter,
the normalisation statistics (and whether they are inside the file), and the input and output
names, shapes, layouts and int8 quantisation. The `mediapipe` format is a waveform-in TFLite
file with probabilities out and the labels and sample rate in its TFLite metadata, for
MediaPipe's AudioClassifier (`audioclf.export.mediapipe_file`), checked through it.

Every export is run on real test clips and compared with the PyTorch model it came from: float
exports must agree to max |delta logit| <= 1e-4 with 100% top-1 agreement, int8 exports to 99%
top-1 agreement with the int8 PyTorch model and test accuracy within 0.5 points of float, else
ExportError names the check that failed. TFLite files (a fixed batch of 1) are run in LiteRT and
again in TFLite Micro's interpreter, as a microcontroller runs them.
"""

from audioclf.export.checks import Check, check_export, table
from audioclf.export.exporter import INPUTS, export_model
from audioclf.export.formats import EXPORTERS, FORMATS, ExportError, load_runner
from audioclf.export.modules import InferenceModel, Int8Model, WaveformModel, inference_model
from audioclf.export.sidecar import LAYOUTS, sidecar

__all__ = [
    "EXPORTERS",
    "FORMATS",
    "INPUTS",
    "LAYOUTS",
    "Check",
    "ExportError",
    "InferenceModel",
    "Int8Model",
    "WaveformModel",
    "check_export",
    "export_model",
    "inference_model",
    "load_runner",
    "sidecar",
    "table",
]
