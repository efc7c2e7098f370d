"""The MediaPipe export: a waveform-in TFLite file with probabilities out and the labels and
sample rate in its metadata, run through MediaPipe's own AudioClassifier."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

pytest.importorskip("litert_torch", reason="the tflite extra is not installed")
pytest.importorskip("mediapipe", reason="the tflite extra is not installed")

from audioclf import settings  # noqa: E402
from audioclf.cli import run  # noqa: E402
from audioclf.export import (  # noqa: E402
    ExportError,
    check_export,
    export_model,
    inference_model,
    mediapipe_file,  # noqa: E402
)
from audioclf.features import log_mel, resolve_params  # noqa: E402
from audioclf.model import create_model  # noqa: E402
from audioclf.normalization import FeatureNormalization  # noqa: E402
from audioclf.predict import load_predictor, predict_file  # noqa: E402
from audioclf.settings import ConfigError  # noqa: E402
from conftest import fsdd_clip, tiny_split_manifest  # noqa: E402

CLASSES = ["zero", "one", "two", "three", "four", "five"]
RATE, SAMPLES = 8000, 4000


def _clips() -> tuple[np.ndarray, np.ndarray]:
    """Six FSDD clips of half a second, centred: waveforms and their log-mel features."""
    from audioclf.audio import fix_length, load_audio

    params = resolve_params("librosa", RATE)
    waves = np.stack(
        [
            fix_length(load_audio(fsdd_clip(digit, "jackson", 0), RATE), SAMPLES)
            for digit in range(6)
        ]
    ).astype(np.float32)
    return waves, np.stack([log_mel(wave, params) for wave in waves])[:, np.newaxis]


def _export(directory, formats, multi_label=False):
    waves, features = _clips()
    torch.manual_seed(0)
    model = create_model("efficientnet_v2", len(CLASSES), width_mult=0.25, depth_mult=0.25)
    with torch.no_grad():
        # A fresh model's logits are about 1e-3: its sigmoids would all sit within float32
        # rounding of 0.5, where the label sets of two exact runtimes differ by chance.
        model.classifier.fc.weight.mul_(100.0)
    normalization = FeatureNormalization.fit(features[:, 0])
    checks = export_model(
        model.eval(),
        formats,
        directory,
        classes=CLASSES,
        feature_params=resolve_params("librosa", RATE),
        clip_seconds=SAMPLES / RATE,
        normalization=normalization,
        check_features=features,
        model_name="efficientnet_v2",
        multi_label=multi_label,
        inputs=["waveform"],
        check_waveforms=waves,
    )
    with torch.no_grad():
        logits = inference_model(model, normalization)(torch.from_numpy(features)).numpy()
    return checks, waves, logits


# One worker runs the whole module, so its module fixture (the TFLite and MediaPipe files)
# is built once, not once in each pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("mediapipe")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The float model as a plain waveform-in TFLite file and as MediaPipe's."""
    directory = tmp_path_factory.mktemp("mediapipe")
    checks, waves, logits = _export(directory, ["tflite", "mediapipe"])
    return directory, checks, waves, logits


def _classify(path, waves):
    """MediaPipe's AudioClassifier on each clip: (category names by index, scores)."""
    from mediapipe.tasks.python.audio import audio_classifier
    from mediapipe.tasks.python.components.containers import audio_data
    from mediapipe.tasks.python.core import base_options

    options = audio_classifier.AudioClassifierOptions(
        base_options=base_options.BaseOptions(model_asset_path=str(path)), max_results=-1
    )
    names, scores = {}, np.zeros((len(waves), len(CLASSES)))
    with audio_classifier.AudioClassifier.create_from_options(options) as classifier:
        for row, wave in enumerate(waves):
            (result,) = classifier.classify(audio_data.AudioData.create_from_array(wave, RATE))
            for category in result.classifications[0].categories:
                names[category.index] = category.category_name
                scores[row, category.index] = category.score
    return [names[index] for index in range(len(CLASSES))], scores


def test_mediapipes_audio_classifier_reads_the_labels_and_gives_the_models_probabilities(
    exported,
):
    directory, checks, waves, logits = exported
    check = next(check for check in checks if check.format == "mediapipe")
    assert check.passed
    assert check.input == "waveform"
    assert check.top1_agreement == 1.0
    path = directory / "model_mediapipe.tflite"
    assert check.path == str(path)
    names, scores = _classify(path, waves)
    assert names == CLASSES
    softmax = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    # The file's float32 front end against compute_log_mel's float64: within 1e-3 in log-mel.
    np.testing.assert_allclose(scores, softmax, atol=1e-3)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    # Inside the file: the labels as a packed labels.txt, and the input's sample rate.
    with zipfile.ZipFile(path) as archive:
        assert archive.read(mediapipe_file.LABELS_FILE).decode().splitlines() == CLASSES
    info = json.loads((directory / "model_mediapipe.tflite.json").read_text())
    assert info["format"] == "mediapipe"
    assert info["input"]["shape"] == [1, SAMPLES]
    assert info["output"]["shape"] == [1, len(CLASSES)]
    assert info["output"]["activation"] == "softmax"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": CLASSES[::-1]}, "MediaPipe reads label 'five' at index 0, where the model"),
        # MediaPipe resamples the 8 kHz clips to the rate it reads: two windows, not one.
        ({"sample_rate": 2 * RATE}, r"gave [2-9] results for one clip of 4000 samples at 8000 Hz"),
    ],
)
def test_metadata_that_is_not_the_models_fails_the_check(exported, tmp_path, change, message):
    directory, _, waves, _ = exported
    path = tmp_path / "model.tflite"
    shutil.copy(directory / "model_waveform.tflite", path)  # the same file, no metadata yet
    info = json.loads((directory / "model_waveform.tflite.json").read_text())
    Path(f"{path}.json").write_text(json.dumps(info))  # the runner's expectations
    mediapipe_file.add_metadata(path, {**info, **change}, "m")
    with pytest.raises(ExportError, match=message):
        mediapipe_file.runner(path)(waves[:1])


def test_predict_reads_the_probabilities_as_they_are(exported, tmp_path):
    # The plain file gives logits and predict applies the softmax; MediaPipe's has it inside
    # and must not get a second one.
    directory, _, waves, _ = exported
    wav = tmp_path / "clip.wav"
    sf.write(wav, waves[2], RATE)
    plain = predict_file(load_predictor(directory / "model_waveform.tflite"), wav, top_k=6)
    inside = predict_file(load_predictor(directory / "model_mediapipe.tflite"), wav, top_k=6)
    assert [label for label, _ in inside.top] == [label for label, _ in plain.top]
    np.testing.assert_allclose(
        [p for _, p in inside.top], [p for _, p in plain.top], rtol=1e-5, atol=1e-6
    )


def test_a_multi_label_model_gets_a_sigmoid_per_class(tmp_path):
    (check,), waves, logits = _export(tmp_path, ["mediapipe"], multi_label=True)
    assert check.passed
    assert check.label_set_agreement == 1.0
    names, scores = _classify(tmp_path / "model_mediapipe.tflite", waves)
    assert names == CLASSES
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits)), atol=1e-3)
    info = json.loads((tmp_path / "model_mediapipe.tflite.json").read_text())
    assert info["output"]["activation"] == "sigmoid"


def test_the_format_needs_mediapipe_installed(compose_config, monkeypatch):
    config = compose_config("run.export=true", "run.export_formats=[mediapipe]")
    settings.load_settings(config)
    monkeypatch.setattr(settings, "_installed", lambda module: module != "mediapipe")
    with pytest.raises(
        ConfigError, match=r"run.export_formats has mediapipe, which needs mediapipe"
    ):
        settings.load_settings(OmegaConf.create(OmegaConf.to_container(config)))


def test_probabilities_are_checked_at_the_threshold_of_one_half():
    # MediaPipe's file outputs probabilities: a label set is what reaches 0.5, not logit 0.
    expected = np.array([[0.9, 0.50002, 0.1]], np.float32)
    exported = np.array([[0.9, 0.49998, 0.1]], np.float32)  # within 1e-4, the same top one
    check = check_export(
        "mediapipe",
        Path("m.tflite"),
        lambda batch: torch.from_numpy(expected),
        np.zeros((1, SAMPLES), np.float32),
        multi_label=True,
        runner=lambda path: lambda batch: exported,
        probabilities=True,
    )
    assert not check.passed
    assert check.failure == "label-set agreement (probability >= 0.5) 0.00% < 100%"


def test_main_job_exports_the_mediapipe_file_whatever_the_export_inputs(compose_config, tmp_path):
    # The format takes raw audio: it needs the check clips' waveforms even where the run's
    # other exports take log-mel only.
    summary = run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.train=true",
            "training.epochs=1",
            "model.params.width_mult=0.25",
            "model.params.depth_mult=0.25",
            "run.export=true",
            "run.export_formats=[onnx,mediapipe]",
            "run.export_inputs=[log_mel]",
        )
    )
    assert [(check["format"], check["input"]) for check in summary["export"]] == [
        ("onnx", "log_mel"),
        ("mediapipe", "waveform"),
    ]
    assert all(check["passed"] for check in summary["export"])
    path = tmp_path / "outputs" / "export" / "model_mediapipe.tflite"
    with zipfile.ZipFile(path) as archive:
        assert archive.read(mediapipe_file.LABELS_FILE).decode().splitlines() == ["1", "2"]
