"""audioclf-predict: every model format on wav files, long files in windows, bad files,
output formats and embeddings."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from audioclf import predict, settings
from audioclf.audio import load_audio
from audioclf.checkpoint import load_checkpoint, save_checkpoint, stored_config
from audioclf.cli import run
from audioclf.features import log_mel, resolve_params
from audioclf.model import CheckpointError
from audioclf.predict import Predictor, load_predictor, main, predict_file, windows
from audioclf.settings import ConfigError, load_settings
from conftest import FSDD, fsdd_clip, write_manifest

# One worker runs the whole module, so its module fixture (a trained run and its
# exports) is built once, not once in each pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("predict")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run on digits 1 and 2 with its checkpoint, ONNX and TorchScript exports."""
    from hydra import compose, initialize_config_dir

    from audioclf.cli import CONFIG_DIR

    folder = tmp_path_factory.mktemp("trained")
    rows = [
        (f"{d}_{speaker}_{i}.wav", str(d), split)
        for d in (1, 2)
        for speaker in ("jackson", "theo")
        for i, split in [(10, "train"), (11, "train"), (12, "train"), (13, "train")]
        + [(14, "train"), (15, "train"), (5, "val"), (0, "test")]
    ]
    manifest = write_manifest(folder / "m.csv", ["path", "label", "split"], rows)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        config = compose(
            "config",
            overrides=[
                "data=manifest",
                f"data.manifest={manifest}",
                f"data.root={FSDD}",
                "data.sample_rate=8000",
                "training.epochs=6",
                "training.lr=3e-3",
                "run.export=true",
                "system.num_workers=0",
                f"system.cache_dir={folder / 'cache'}",
                f"system.output_dir={folder / 'run'}",
            ],
        )
    run(config)
    return folder / "run"


def _models(trained):
    return {
        "pth": trained / "checkpoints" / "best.pth",
        "onnx": trained / "export" / "model.onnx",
        "pt": trained / "export" / "model.pt",
        "onnx_waveform": trained / "export" / "model_waveform.onnx",
        "pt_waveform": trained / "export" / "model_waveform.pt",
    }


@pytest.fixture
def wavs(tmp_path):
    files = []
    for digit in (1, 2):
        target = tmp_path / "audio" / f"{digit}.wav"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(fsdd_clip(digit, speaker="theo", index=20), target)
        files.append(target)
    return files


def _json(capsys, *argv):
    status = main(["--format", "json", *map(str, argv)])
    return status, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fmt", ["pth", "onnx", "pt", "onnx_waveform", "pt_waveform"])
def test_every_model_format_classifies_wav_files(trained, wavs, capsys, fmt):
    status, results = _json(capsys, _models(trained)[fmt], *wavs, "--top-k", "2")
    assert status == 0
    assert [r["path"] for r in results] == [str(w) for w in wavs]
    for r in results:
        assert [t["label"] for t in r["top"]] in (["1", "2"], ["2", "1"])
        assert sum(t["probability"] for t in r["top"]) == pytest.approx(1.0, abs=1e-5)


def test_all_formats_give_the_same_probabilities(trained, wavs, capsys):
    answers = {fmt: _json(capsys, path, *wavs)[1] for fmt, path in _models(trained).items()}
    for fmt in ("onnx", "pt", "onnx_waveform", "pt_waveform"):
        for mine, reference in zip(answers[fmt], answers["pth"], strict=True):
            assert [t["label"] for t in mine["top"]] == [t["label"] for t in reference["top"]]
            np.testing.assert_allclose(
                [t["probability"] for t in mine["top"]],
                [t["probability"] for t in reference["top"]],
                atol=1e-4,
            )


@pytest.mark.parametrize("fmt", ["pth", "onnx_waveform"])
def test_a_long_file_is_classified_in_sliding_windows(trained, tmp_path, capsys, fmt):
    audio = np.concatenate([load_audio(fsdd_clip(d, index=30), 8000) for d in (1, 2, 1)])
    long_file = tmp_path / "long.wav"
    sf.write(long_file, audio, 8000)
    seconds = len(audio) / 8000
    status, (result,) = _json(
        capsys, _models(trained)[fmt], long_file, "--per-window", "--hop", "0.25"
    )
    assert status == 0
    starts = [w["start_seconds"] for w in result["windows"]]
    assert starts[0] == 0.0
    assert starts[-1] == pytest.approx(seconds - 1.0, abs=1e-3)  # the last window ends flush
    assert all(b - a <= 0.25 + 1e-9 for a, b in zip(starts, starts[1:], strict=False))


@pytest.mark.parametrize("fmt", ["pth", "onnx_waveform"])
def test_a_long_files_windows_go_through_the_model_a_batch_at_a_time(trained, tmp_path, fmt):
    # An hour of audio in one batch took 3.6 GB with the default model (0.6 GB in batches).
    audio = np.concatenate([load_audio(fsdd_clip(d, index=31), 8000) for d in (1, 2) * 5])
    long_file = tmp_path / "long.wav"
    sf.write(long_file, audio, 8000)
    predictor = load_predictor(_models(trained)[fmt])
    whole = predict_file(predictor, long_file, per_window=True, hop_seconds=0.25, batch_size=99)
    sizes, model = [], predictor.logits
    predictor.logits = lambda batch: sizes.append(len(batch)) or model(batch)
    batched = predict_file(
        predictor,
        long_file,
        per_window=True,
        hop_seconds=0.25,
        batch_size=4,
        embed=fmt == "pth",
    )
    windows_count = len(whole.windows)
    assert windows_count > 8
    assert sizes == [4] * (windows_count // 4) + ([windows_count % 4] if windows_count % 4 else [])
    for mine, reference in zip(batched.windows, whole.windows, strict=True):
        assert [label for label, _ in mine["top"]] == [label for label, _ in reference["top"]]
        np.testing.assert_allclose(
            [p for _, p in mine["top"]], [p for _, p in reference["top"]], atol=1e-5
        )
    if fmt == "pth":
        parts = windows(load_audio(long_file, 8000), 8000, 2000)
        features = np.stack([log_mel(w, predictor.feature_params) for _, w in parts])
        once = predictor.embeddings(features[:, np.newaxis]).mean(axis=0)
        np.testing.assert_allclose(batched.embedding, once, atol=1e-5)


def test_window_positions():
    wave = np.arange(25, dtype=np.float32)
    assert [start for start, _ in windows(wave, 10, 5)] == [0, 5, 10, 15]
    (only,) = windows(wave[:6], 10, 5)
    assert len(only[1]) == 10


def test_a_bad_file_is_reported_and_the_rest_still_classified(trained, wavs, tmp_path, capsys):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    status = main([str(_models(trained)["onnx"]), str(wavs[0]), str(broken), "--format", "csv"])
    captured = capsys.readouterr()
    assert status == 1
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert {row["path"] for row in rows if not row["error"]} == {str(wavs[0])}
    (bad,) = [row for row in rows if row["error"]]
    assert bad["path"] == str(broken)
    assert "cannot decode audio" in bad["error"]
    assert "1 of 2 file(s) failed" in captured.err


def test_files_below_the_models_sample_rate_are_named_in_one_line(trained, wavs, tmp_path, capsys):
    # The model works at 8 kHz (FSDD); a 4 kHz copy of a clip is upsampled to it.
    low = tmp_path / "low.wav"
    sf.write(low, load_audio(wavs[0], 4000), 4000)
    model = str(_models(trained)["onnx"])
    assert main([model, *map(str, wavs)]) == 0
    assert "recorded below" not in capsys.readouterr().err
    assert main([model, str(wavs[1]), str(low), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert [r["path"] for r in json.loads(captured.out)] == [str(wavs[1]), str(low)]
    assert (
        "audioclf-predict: 1 of 2 file(s) are recorded below the model's 8000 Hz (4000 Hz: 1): "
        "they are upsampled, and the model, trained on 8000 Hz audio, sees nothing above "
        "2000 Hz in them"
    ) in captured.err


def test_embeddings_are_written_per_file(trained, wavs, tmp_path, capsys):
    out = tmp_path / "emb" / "vectors"
    status = main([str(_models(trained)["pth"]), *map(str, wavs), "--embeddings", str(out)])
    assert status == 0
    matrix = np.load(out.with_suffix(".npy"))
    assert matrix.shape[0] == 2
    assert matrix.shape[1] > 8
    with out.with_suffix(".csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0][0] == "path"
    assert [row[0] for row in rows[1:]] == [str(w) for w in wavs]


def test_embeddings_from_an_export_are_refused(trained, wavs, tmp_path, capsys):
    status = main([str(_models(trained)["onnx"]), str(wavs[0]), "--embeddings", str(tmp_path)])
    assert status == 2
    assert "needs a trainer checkpoint" in capsys.readouterr().err


def test_a_waveform_in_export_refuses_another_window_length(trained, wavs, capsys):
    status = main([str(_models(trained)["onnx_waveform"]), str(wavs[0]), "--window", "0.5"])
    assert status == 2
    assert "takes clips of 1 s exactly" in capsys.readouterr().err


def test_a_model_file_that_is_not_one_is_named(tmp_path, wavs, capsys):
    fake = tmp_path / "model.pth"
    fake.write_text("# Notes\n")  # the unpickler's "unsupported operand" case
    assert main([str(fake), str(wavs[0])]) == 2
    error = capsys.readouterr().err
    assert "model.pth: not a PyTorch checkpoint" in error
    # torch's own advice (weights_only=False) would let a file run code: not passed on.
    assert "weights_only=False" not in error


def test_a_folder_without_audio_files_is_named(trained, tmp_path, capsys):
    empty = tmp_path / "clips"
    empty.mkdir()
    (empty / "notes.txt").write_text("no audio here")
    assert main([str(trained / "checkpoints" / "best.pth"), str(empty)]) == 2
    assert f"{empty}: no audio files below it" in capsys.readouterr().err


def test_a_folder_copied_from_a_mac_predicts_its_clips_only(trained, wavs, capsys):
    folder = wavs[0].parent
    (folder / "._1.wav").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble metadata, not audio
    assert main([str(trained / "checkpoints" / "best.pth"), str(folder), "--format", "csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert sorted({row[0] for row in rows[1:]}) == [str(w) for w in wavs]


def test_console_script_and_module_both_run(trained, wavs):
    script = [str(__import__("pathlib").Path(sys.executable).parent / "audioclf-predict")]
    for command in (script, [sys.executable, "-m", "audioclf.predict"]):
        result = subprocess.run(
            [*command, str(_models(trained)["pt"]), str(wavs[0])],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert str(wavs[0]) in result.stdout


def test_a_checkpoint_from_before_newer_config_keys_still_tests_and_predicts(
    trained, wavs, tmp_path, caplog
):
    # Written by an audioclf that had no run.export_inputs, data.columns or
    # augmentations.spec_augment.mask_value yet: today's defaults fill them, its own values stay.
    content = load_checkpoint(trained / "checkpoints" / "best.pth")
    del content["config"]["run"]["export_inputs"]
    del content["config"]["data"]["columns"]
    del content["config"]["augmentations"]["spec_augment"]["mask_value"]
    old = tmp_path / "old.pth"
    save_checkpoint(old, content)
    with pytest.raises(ConfigError, match="missing key run.export_inputs"):
        load_settings(OmegaConf.create(content["config"]))  # what a plain check says
    with caplog.at_level("INFO", logger="audioclf.checkpoint"):
        config, stored = stored_config(load_checkpoint(old), old)
    assert "written before augmentations.spec_augment.mask_value, data.columns, " in caplog.text
    assert stored.run.export_inputs == ["log_mel", "waveform"]
    assert stored.data.columns is None
    assert stored.augmentations.spec_augment.mask_value == "mean"
    assert (stored.data.format, stored.data.root) == ("manifest", str(FSDD))  # not fsdd's
    assert stored.training.epochs == 6
    assert predict_file(load_predictor(old), wavs[0]).top[0][0] in ("1", "2")


def test_a_qat_fine_tuning_checkpoint_points_to_the_int8_and_float_ones(
    trained, wavs, tmp_path, capsys
):
    # <run>/qat/checkpoints/best.pth holds the fake-quantized graph that run.resume continues;
    # read as a model it gave a list of 800 differing keys.
    content = load_checkpoint(trained / "checkpoints" / "best.pth")
    content["quantized_prepared"] = True
    qat = tmp_path / "run" / "qat" / "checkpoints" / "best.pth"
    save_checkpoint(qat, content)
    assert main([str(qat), str(wavs[0])]) == 2
    error = capsys.readouterr().err
    assert "a QAT fine-tuning checkpoint" in error
    assert f"the int8 model is {tmp_path / 'run' / 'checkpoints' / 'int8.pth'}" in error


def test_a_checkpoint_from_a_newer_audioclf_says_so(trained, wavs, tmp_path, capsys):
    content = load_checkpoint(trained / "checkpoints" / "best.pth")
    content["config"]["run"]["a_later_switch"] = True
    newer = tmp_path / "newer.pth"
    save_checkpoint(newer, content)
    assert main([str(newer), str(wavs[0])]) == 2
    error = capsys.readouterr().err
    assert "unknown key(s) ['run.a_later_switch']; a newer audioclf wrote it)" in error


def test_a_checkpoint_of_the_trainer_alone_says_what_predicting_needs(
    trained, wavs, tmp_path, capsys
):
    """A Trainer used without the main job saves no config or feature parameters."""
    content = load_checkpoint(trained / "checkpoints" / "best.pth")
    bare = tmp_path / "bare.pth"
    save_checkpoint(bare, {key: content[key] for key in ("model", "classes", "epoch")})
    assert main([str(bare), str(wavs[0])]) == 2
    error = capsys.readouterr().err
    assert "bare.pth: holds no feature parameters; a Trainer used on its own" in error
    assert "audioclf.job.run from Python" in error
    del content["config"]
    save_checkpoint(bare, content)
    with pytest.raises(CheckpointError, match=r"bare.pth: holds no run config; a Trainer used"):
        stored_config(load_checkpoint(bare), bare)


@pytest.mark.parametrize(
    "option",
    [
        ["--top-k", "0"],
        ["--top-k", "-1"],
        ["--window", "-1"],
        ["--hop", "0"],
        ["--batch-size", "0"],
        ["--window", "nan"],
    ],
)
def test_numbers_out_of_range_are_usage_errors(trained, wavs, capsys, option):
    # --top-k -1 printed all labels but the last; --window -1 ended in a traceback.
    with pytest.raises(SystemExit) as stop:
        main([str(_models(trained)["pth"]), str(wavs[0]), *option])
    assert stop.value.code == 2
    assert f"{option[0]}: must be a number above 0, not '{option[1]}'" in capsys.readouterr().err


def _fixed(logits: list[float], multi_label: bool) -> Predictor:
    """A predictor whose model answers `logits` to every window."""
    return Predictor(
        ["a", "b", "c", "d"],
        resolve_params("librosa", 8000),
        1.0,
        multi_label,
        lambda features: np.tile(np.float32(logits), (len(features), 1)),
    )


# sigmoid: a 0.95, b 0.73, c 0.5, d 0.12
MULTI_LABEL_LOGITS = [np.log(19), 1.0, 0.0, -2.0]


def test_a_multi_label_model_predicts_every_label_at_the_threshold(wavs):
    predictor = _fixed(MULTI_LABEL_LOGITS, multi_label=True)
    result = predict_file(predictor, wavs[0], top_k=1, per_window=True)
    # Every label at or above 0.5 is predicted, and listed in `top` beyond --top-k 1.
    assert result.labels == ["a", "b", "c"]
    assert [label for label, _ in result.top] == ["a", "b", "c"]
    assert result.windows[0]["labels"] == ["a", "b", "c"]
    assert predict_file(predictor, wavs[0], threshold=0.6).labels == ["a", "b"]
    none = predict_file(predictor, wavs[0], top_k=2, threshold=0.99)
    assert (none.labels, [label for label, _ in none.top]) == ([], ["a", "b"])


def test_a_multi_label_model_pools_windows_by_their_maximum(wavs):
    # A label heard in one window is in the file: the mean of 3+ windows hid it.
    def first_window_only(features):
        logits = np.full((len(features), 4), -5.0, np.float32)
        logits[0, 0] = 5.0
        return logits

    for multi_label, pooled in ((True, ["a"]), (False, ["a"])):
        predictor = _fixed([0.0] * 4, multi_label)
        predictor.logits = first_window_only
        windows = {"window_seconds": 0.1, "hop_seconds": 0.1}
        result = predict_file(predictor, wavs[0], **windows)
        assert result.labels == pooled
        probability = dict(result.top)["a"]
        assert probability > 0.99 if multi_label else probability < 0.5  # max / mean
        assert predict_file(predictor, wavs[0], aggregate="mean", **windows).labels == (
            [] if multi_label else ["a"]
        )


def test_a_multi_class_model_predicts_its_top_label(wavs):
    result = predict_file(_fixed([0.0, 3.0, 1.0, 2.0], multi_label=False), wavs[0], top_k=3)
    assert result.labels == ["b"]
    assert [label for label, _ in result.top] == ["b", "d", "c"]


def test_predicted_labels_in_every_output_format(wavs, monkeypatch, capsys):
    monkeypatch.setattr(predict, "load_predictor", lambda _: _fixed(MULTI_LABEL_LOGITS, True))
    assert main(["m.pth", str(wavs[0]), "--threshold", "0.6", "--top-k", "3"]) == 0
    assert capsys.readouterr().out.split("  ")[1:3] == ["[a, b]", "a 0.950, b 0.731, c 0.500\n"]
    assert main(["m.pth", str(wavs[0]), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["labels"] == ["a", "b", "c"]
    assert main(["m.pth", str(wavs[0]), "--format", "csv", "--threshold", "0.6"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(row["label"], row["predicted"]) for row in rows] == [
        ("a", "1"),
        ("b", "1"),
        ("c", "0"),
    ]
    assert main(["m.pth", str(wavs[0]), "--threshold", "1", "--top-k", "1"]) == 0
    assert capsys.readouterr().out.split("  ")[1] == "[-]"


def test_a_threshold_for_a_multi_class_model_is_refused(trained, wavs, capsys):
    assert main([str(_models(trained)["pth"]), str(wavs[0]), "--threshold", "0.3"]) == 2
    assert "--threshold: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main([str(_models(trained)["pth"]), str(wavs[0]), "--threshold", "1.5"])
    assert stop.value.code == 2
    assert "must be a probability in [0, 1], not '1.5'" in capsys.readouterr().err


def test_a_window_shorter_than_one_frame_is_named(trained, wavs, capsys):
    assert main([str(_models(trained)["pth"]), str(wavs[0]), "--window", "0.01"]) == 2
    error = capsys.readouterr().err
    assert "--window 0.01 s is shorter than one feature frame (200 samples at 8000 Hz)" in error


def test_predictor_reads_features_from_the_sidecar(trained):
    predictor = load_predictor(_models(trained)["onnx"])
    assert predictor.classes == ["1", "2"]
    assert predictor.sample_rate == 8000
    assert predictor.clip_samples == 8000


def test_a_checkpoint_predicts_where_its_training_runs_export_extras_are_absent(
    trained, wavs, tmp_path, monkeypatch
):
    # Trained where onnx and litert-torch were installed, with exports on; read on a lean
    # machine: the stored run's export switches are history, not a job for this machine.
    content = load_checkpoint(trained / "checkpoints" / "best.pth")
    content["config"]["run"].update(export=True, export_formats=["onnx", "tflite"])
    moved = tmp_path / "best.pth"
    save_checkpoint(moved, content)
    monkeypatch.setattr(settings, "_installed", lambda module: False)
    with pytest.raises(ConfigError, match="needs onnx"):
        load_settings(OmegaConf.create(content["config"]))  # what a check of them would say
    predictor = load_predictor(moved)
    assert predict_file(predictor, wavs[0]).top[0][0] in ("1", "2")
