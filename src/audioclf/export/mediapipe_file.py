"""The file MediaPipe's AudioClassifier runs: a waveform-in TFLite model that outputs
probabilities, with TFLite Model Metadata inside (the input's sample rate and channels, the
labels as a packed `labels.txt`), so that MediaPipe Tasks (Android, iOS, web, Python) load it
with no other file, as they load a TensorFlow Lite Model Maker audio model.

The metadata is built with MediaPipe's generated metadata schema and put into the model with
ai-edge-litert's TFLite schema: MediaPipe's own writer needs a compiled module its PyPI wheel
(1.2) does not ship. The check runs the file through MediaPipe's AudioClassifier itself, so
what it reads (labels, sample rate, scores) is what an app gets.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from audioclf import __version__, tflite
from audioclf.export.formats import ExportError

#: The name TFLite runtimes look the metadata buffer up by, and the identifiers of the two
#: flatbuffers (metadata_schema.fbs, schema.fbs).
METADATA_NAME = "TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
LABELS_FILE = "labels.txt"
#: The oldest metadata parser that reads every field written here: AudioProperties came in
#: metadata schema 1.3.0.
MIN_PARSER_VERSION = "1.3.0"


def add_metadata(path: Path, info: dict[str, Any], name: str) -> None:
    """Write the model metadata and the labels into the TFLite file at `path`, just
    converted (in place): the classes, sample rate, clip length and multi_label of `info`
    (the file's sidecar), and `name`."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))
    builder = flatbuffers.Builder(0)
    builder.Finish(_metadata(info, name).Pack(builder), METADATA_IDENTIFIER)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(bytes(builder.Output()), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    # The associated files are a zip archive after the flatbuffer, as TFLite metadata has it.
    data = io.BytesIO(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    data.seek(0, io.SEEK_END)
    with zipfile.ZipFile(data, "a") as archive:
        # A fixed date: the same model gives the same file.
        labels = zipfile.ZipInfo(LABELS_FILE, date_time=(1980, 1, 1, 0, 0, 0))
        archive.writestr(labels, "".join(f"{label}\n" for label in info["classes"]))
    path.write_bytes(data.getvalue())


def _metadata(info: dict[str, Any], name: str):
    from mediapipe.tasks.metadata import metadata_schema_py_generated as schema

    classes, sample_rate, multi_label = info["classes"], info["sample_rate"], info["multi_label"]
    audio = schema.AudioPropertiesT()
    audio.sampleRate, audio.channels = sample_rate, 1
    clip = schema.TensorMetadataT()
    clip.name = "audio_clip"
    clip.description = (
        f"{info['clip_seconds']:g} s of mono float32 audio in [-1, 1] at {sample_rate} Hz; the "
        "log-mel front end is inside the model"
    )
    clip.content = schema.ContentT()
    clip.content.contentPropertiesType = schema.ContentProperties.AudioProperties
    clip.content.contentProperties = audio
    labels = schema.AssociatedFileT()
    labels.name = LABELS_FILE
    labels.description = "The class of each score, one per line, in the output's order."
    labels.type = schema.AssociatedFileType.TENSOR_AXIS_LABELS
    scores = schema.TensorMetadataT()
    scores.name = "probability"
    scores.description = (
        "Each class's probability (a sigmoid per class: several may be present)"
        if multi_label
        else "The probability of each class (softmax)"
    )
    scores.content = schema.ContentT()
    scores.content.contentPropertiesType = schema.ContentProperties.FeatureProperties
    scores.content.contentProperties = schema.FeaturePropertiesT()
    scores.associatedFiles = [labels]
    subgraph = schema.SubGraphMetadataT()
    subgraph.inputTensorMetadata = [clip]
    subgraph.outputTensorMetadata = [scores]
    metadata = schema.ModelMetadataT()
    metadata.name = name
    metadata.description = (
        f"Audio classifier ({'multi-label, ' if multi_label else ''}{len(classes)} classes) "
        "trained with audioclf"
    )
    metadata.version = __version__
    metadata.author = "audioclf"
    metadata.subgraphMetadata = [subgraph]
    metadata.minParserVersion = MIN_PARSER_VERSION
    return metadata


def runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """waveforms (N, clip samples, at the sidecar's rate) -> (N, classes) scores through
    MediaPipe's AudioClassifier, one clip at a time. Raises ExportError when the labels it
    reads from the file are not the sidecar's classes, in their order, or when it does not
    give one result per clip (a sample rate in the metadata other than the clips')."""
    try:
        from mediapipe.tasks.python.audio import audio_classifier
        from mediapipe.tasks.python.components.containers import audio_data
        from mediapipe.tasks.python.core import base_options
    except ImportError as error:
        raise ExportError(f"running a MediaPipe file needs mediapipe: {tflite.INSTALL}") from error
    info = json.loads(Path(f"{path}.json").read_text())
    classes, sample_rate = list(info["classes"]), int(info["sample_rate"])
    options = audio_classifier.AudioClassifierOptions(
        base_options=base_options.BaseOptions(model_asset_path=str(path)), max_results=-1
    )
    with tflite.quiet_logs():  # MediaPipe's native start-up lines on stderr
        classifier = audio_classifier.AudioClassifier.create_from_options(options)

    def run(waveforms: np.ndarray) -> np.ndarray:
        rows = []
        for waveform in waveforms:
            clip = audio_data.AudioData.create_from_array(
                np.ascontiguousarray(waveform, np.float32), sample_rate
            )
            results = classifier.classify(clip)
            if len(results) != 1:
                raise ExportError(
                    f"MediaPipe's AudioClassifier gave {len(results)} results for one "
                    f"clip of {len(waveform)} samples at {sample_rate} Hz (expected 1)"
                )
            rows.append(_scores(results[0].classifications[0].categories, classes))
        return np.stack(rows)

    return run


def _scores(categories, classes: Sequence[str]) -> np.ndarray:
    """Each class's score, by its index; ExportError naming the first label (by index) that
    MediaPipe read otherwise, or a class it gave no score."""
    names = {category.index: category.category_name for category in categories}
    for index, expected in enumerate(classes):
        if index not in names:
            raise ExportError(f"MediaPipe gave no score for class {index} ({expected!r})")
        if names[index] != expected:
            raise ExportError(
                f"MediaPipe reads label {names[index]!r} at index {index}, where the model "
                f"has {expected!r}"
            )
    if len(names) != len(classes):
        raise ExportError(f"MediaPipe gave {len(names)} scores for {len(classes)} classes")
    scores = np.zeros(len(classes), np.float32)
    for category in categories:
        scores[category.index] = category.score
    return scores
