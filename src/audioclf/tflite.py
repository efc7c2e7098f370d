"""TFLite through litert-torch (conversion) and ai-edge-litert (the interpreter); no
TensorFlow install. Needs the `tflite` extra: pip install -e ".[tflite]".

An int8 PT2E graph (`audioclf.quant`, XNNPACK rules) converts to a full-int8 file: int8 input
and output, with their scale and zero point in the file, and int8 ops throughout, as
microcontroller runtimes need. The exported files have a fixed batch of one (TFLite Micro has
no dynamic shapes) and run one clip at a time here; a file with a dynamic batch dimension is
resized to each batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from audioclf.runtime import quiet_pytree_warnings

INSTALL = 'pip install -e ".[tflite]"'
_PROGRESS = "LITERT_TORCH_SHOW_PROGRESS"  # litert-torch's progress lines on stdout


def convert(
    module: nn.Module, example: torch.Tensor, path: Path, *, int8: bool, batch: Any
) -> Path:
    """Convert `module` (traced on `example`, batch dimension `batch`) to a .tflite file."""
    with quiet_logs():
        import litert_torch  # its import logs and prints too (TensorFlow's, torchao's)

        edge = litert_torch.convert(
            module.eval(),
            (example,),
            dynamic_shapes=None if batch is None else ({0: batch},),
            quant_config=_full_int8() if int8 else None,
        )
        edge.export(str(path))
    return path


def _full_int8() -> Any:
    """The graph is quantised already; this tells the converter that its quantize /
    dequantize pairs are static int8 (weights and activations): a full-int8 file."""
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import QuantConfig

    return QuantConfig(
        pt2e_quantizer=PT2EQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True)
        )
    )


def _interpreter(path: Path, threads: int | None = None):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise ImportError(f"running TFLite needs ai-edge-litert: {INSTALL}") from error
    with quiet_logs():
        return Interpreter(model_path=str(path), num_threads=threads)


def runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """inputs (NCHW float32 log-mel, or waveforms) -> float32 logits through the interpreter:
    transposed for a channel-last file, quantised for an int8 input, int8 logits dequantised,
    one clip at a time for a file with a fixed batch of one."""
    interpreter = _interpreter(path, torch.get_num_threads())
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    signature = list(source["shape_signature"])
    channel_last = _channel_last(signature)
    allocated: tuple[int, ...] | None = None

    def run(features: np.ndarray) -> np.ndarray:
        nonlocal allocated
        if signature[0] == 1 and len(features) > 1:
            # A file with a fixed batch of one (as exported): one clip at a time.
            return np.concatenate(
                [run(features[index : index + 1]) for index in range(len(features))]
            )
        features = _file_input(features, channel_last, source["dtype"], source["quantization"])
        if allocated != features.shape:  # a new batch size (the last batch, most often)
            interpreter.resize_tensor_input(source["index"], list(features.shape))
            with quiet_logs():  # the XNNPACK delegate announces itself on stderr when applied
                interpreter.allocate_tensors()
            allocated = features.shape
        interpreter.set_tensor(source["index"], features)
        interpreter.invoke()
        output = interpreter.get_tensor(target["index"])
        return _logits(output, target["dtype"], target["quantization"])

    return run


class MicroError(RuntimeError):
    """TFLite Micro cannot run a file (an op it lacks, or one that fails to prepare)."""


class MicroRunner:
    """`runner`, through TFLite Micro's interpreter instead (the reference kernels of
    microcontroller builds, from tflite-micro's Python package), which runs a file's stored
    shapes as they are: one clip at a time. MicroError, with TFLite Micro's own message,
    when it cannot run the file. `arena_bytes`, once a clip has run: the tensor arena TFLite
    Micro allocated (its recording allocator's total), the RAM a microcontroller needs beside
    the model."""

    def __init__(self, path: Path) -> None:
        try:
            from tflite_micro.python.tflite_micro import runtime
        except ImportError as error:
            raise ImportError(f"running TFLite Micro needs tflite-micro: {INSTALL}") from error
        with _stderr_text() as printed:
            try:
                self.interpreter = runtime.Interpreter.from_file(str(path))
            except RuntimeError as error:
                raise MicroError(_micro_message(error, printed())) from error
        self.source = self.interpreter.get_input_details(0)
        self.target = self.interpreter.get_output_details(0)
        self.shape = [int(size) for size in self.source["shape"]]
        self.channel_last = _channel_last(self.shape)
        self.input_quantization = _micro_quantization(self.source)
        self.output_quantization = _micro_quantization(self.target)
        self.arena_bytes: int | None = None

    def __call__(self, features: np.ndarray) -> np.ndarray:
        rows = []
        for index in range(len(features)):
            clip = _file_input(
                features[index : index + 1],
                self.channel_last,
                self.source["dtype"],
                self.input_quantization,
            )
            with _stderr_text() as printed:
                try:
                    self.interpreter.set_input(clip.reshape(self.shape), 0)
                    self.interpreter.invoke()
                except RuntimeError as error:
                    raise MicroError(_micro_message(error, printed())) from error
            output = self.interpreter.get_output(0)
            if len(output) != 1:
                raise MicroError(
                    f"TFLite Micro: {len(output)} outputs for one clip (input shape "
                    f"{self.shape}): the file's stored shapes are not one clip's, as a file "
                    "traced on a batch of several with a dynamic batch dimension has them"
                )
            rows.append(_logits(output, self.target["dtype"], self.output_quantization))
            if self.arena_bytes is None:
                with _stderr_text() as printed:
                    self.interpreter.print_allocations()
                    found = re.search(r"Arena allocation total (\d+) bytes", printed())
                self.arena_bytes = int(found.group(1)) if found else None
        return np.concatenate(rows)


def _micro_quantization(details: dict[str, Any]) -> tuple[float, int]:
    """A TFLite Micro tensor's (scale, zero point); (0, 0) for a float one."""
    parameters = details["quantization_parameters"]
    if not len(parameters["scales"]):
        return 0.0, 0
    return float(parameters["scales"][0]), int(parameters["zero_points"][0])


def _micro_message(error: RuntimeError, printed: str) -> str:
    """TFLite Micro raises a bare 'failed to allocate tensors' and prints why to stderr."""
    lines = [line.strip() for line in printed.splitlines() if line.strip()]
    return f"TFLite Micro: {error}" + (f" ({'; '.join(lines[-3:])})" if lines else "")


@contextlib.contextmanager
def _stderr_text() -> Iterator[Callable[[], str]]:
    """Native code's stderr inside the block goes to a file; the function yielded reads it."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as sink, _stderr_into(sink):

        def printed() -> str:
            sink.seek(0)
            return sink.read()

        yield printed


@contextlib.contextmanager
def _stderr_into(sink: Any) -> Iterator[None]:
    """File descriptor 2 (native code's stderr) goes into the open file `sink` inside the
    block."""
    saved = os.dup(2)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _channel_last(shape: list[int]) -> bool:
    """A log-mel input of shape (batch, frames, mels, 1)."""
    return len(shape) == 4 and shape[-1] == 1 and shape[1] != 1


def _file_input(
    features: np.ndarray, channel_last: bool, dtype: Any, quantization: tuple[float, int]
) -> np.ndarray:
    """NCHW float32 features (or waveforms) as the file takes them: transposed for a
    channel-last file, quantised for an int8 input."""
    if channel_last:
        features = features.transpose(0, 2, 3, 1)
    features = np.ascontiguousarray(features, dtype=np.float32)
    if dtype == np.int8:
        scale, zero_point = quantization
        features = np.clip(np.round(features / scale) + zero_point, -128, 127).astype(np.int8)
    return features


def _logits(output: np.ndarray, dtype: Any, quantization: tuple[float, int]) -> np.ndarray:
    """A file's output as float32 logits (int8 ones dequantised)."""
    if dtype == np.int8:
        scale, zero_point = quantization
        output = (output.astype(np.float32) - zero_point) * scale
    return np.array(output, dtype=np.float32)


def io_quantization(path: Path) -> dict[str, Any]:
    """The int8 scale and zero point of a file's input and output (None where float)."""
    interpreter = _interpreter(path)
    result = {}
    for key, details in (
        ("input", interpreter.get_input_details()[0]),
        ("output", interpreter.get_output_details()[0]),
    ):
        scale, zero_point = details["quantization"]
        result[key] = (
            {"dtype": "int8", "scale": float(scale), "zero_point": int(zero_point)}
            if details["dtype"] == np.int8
            else None
        )
    return result


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """litert-torch logs through logging, prints its progress (about 70 lines a file) to
    stdout unless LITERT_TORCH_SHOW_PROGRESS is off, and native messages to stderr; its
    copies of exported programs raise torch's pytree FutureWarning (`isinstance(treespec,
    LeafSpec)`), up to 30 a file, which warning capture (pytest's, a notebook's) showed
    though stderr is silenced. Errors still raise."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    progress = os.environ.get(_PROGRESS)
    os.environ[_PROGRESS] = "n"
    try:
        with open(os.devnull, "w") as sink, _stderr_into(sink), quiet_pytree_warnings():
            yield
    finally:
        logging.disable(previous)
        if progress is None:
            del os.environ[_PROGRESS]
        else:
            os.environ[_PROGRESS] = progress
