"""The main job end to end: compose, index, prepare, summarise; and the console entry points."""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from audioclf import overrides
from audioclf.audio import BadAudioError
from audioclf.cli import run
from audioclf.index import Clip, DatasetError
from audioclf.model import create_model
from audioclf.pipeline import build_model
from audioclf.predict import load_predictor, predict_file
from audioclf.settings import ConfigError, load_settings
from audioclf.summary import describe_audio
from conftest import (
    FSDD,
    REPO,
    fsd50k_like,
    fsdd_clip,
    speech_commands_like,
    tiny_split_manifest,
)


@pytest.fixture
def manifest(tmp_path, manifest_rows):
    path = tmp_path / "clips.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "fold"])
        writer.writerows(manifest_rows)
    return path


def _manifest_overrides(manifest, *extra):
    return [
        "data=manifest",
        f"data.manifest={manifest}",
        f"data.root={FSDD}",
        "data.sample_rate=8000",
        "data.test_fold=1",
        "data.val_fold=2",
        *extra,
    ]


def test_main_job_writes_a_dataset_summary(compose_config, manifest, manifest_rows, tmp_path):
    summary = run(compose_config(*_manifest_overrides(manifest)))
    assert summary["classes"] == ["3", "4"]
    assert {split: info["clips"] for split, info in summary["splits"].items()} == {
        "train": 12,
        "val": 6,
        "test": 6,
    }
    assert summary["features"]["shape"] == [1, 101, 64]
    assert summary["bad_files"] == []
    # The files' own rates and lengths, as soundfile reads them; nothing to warn of.
    lengths = [sf.info(FSDD / row[0]).duration for row in manifest_rows]
    assert summary["audio"] == {
        "sample_rates": {"8000": 24},
        "parts": 0,
        "seconds": {
            "min": round(min(lengths), 3),
            "median": round(statistics.median(lengths), 3),
            "max": round(max(lengths), 3),
        },
        "warnings": [],
    }
    written = json.loads((tmp_path / "outputs" / "dataset_summary.json").read_text())
    assert written == summary


def test_files_below_the_sample_rate_or_longer_than_the_clip_are_warned_of(
    compose_config, manifest, caplog, tmp_path
):
    # FSDD is 8 kHz, with clips of 0.3-0.6 s: a 16 kHz run upsamples every file, and 0.2 s
    # windows see a part of each word.
    overrides = _manifest_overrides(manifest, "data.sample_rate=16000", "data.clip_seconds=0.2")
    training = ["run.train=true", "training.epochs=1", "model.params.width_mult=0.25"]
    summary = run(compose_config(*overrides, *training))
    upsampled, windowed = summary["audio"]["warnings"]
    assert upsampled.startswith("24 of 24 files are recorded below data.sample_rate=16000 Hz")
    assert "(8000 Hz: 24)" in upsampled
    assert "data.sample_rate=8000 fits 24 of them" in upsampled
    assert windowed.startswith("the median file is 0.4 s long, data.clip_seconds=0.2")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert upsampled in warned
    assert windowed in warned
    assert "files        8000 Hz: 24; 0." in caplog.text  # the summary's line
    # A checkpoint's model has its rate and clip length: no advice to change them.
    best = tmp_path / "best.pth"
    shutil.copy(tmp_path / "outputs" / "checkpoints" / "best.pth", best)
    tested = run(
        compose_config(
            *_manifest_overrides(manifest),
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'tested'}",
        )
    )
    upsampled, windowed = tested["audio"]["warnings"]
    assert upsampled.endswith(f"hold nothing; the model of {best} works at 16000 Hz")
    assert windowed.endswith(f"the model of {best} was trained on 0.2 s clips")
    # Downsampling warns of nothing; nor does a clip length that covers the files.
    summary = run(compose_config(*_manifest_overrides(manifest, "data.sample_rate=4000")))
    assert summary["audio"]["warnings"] == []


def test_many_rates_are_listed_most_files_first_and_unchecked_clips_give_nothing():
    rates = [8000] * 3 + [11025] * 2 + [16000, 22050, 48000, 48000]
    clips = [Clip(Path(f"{i}.wav"), "a", sample_rate=r, seconds=1.0) for i, r in enumerate(rates)]
    (upsampled,) = describe_audio(clips, 32000, 1.0)["warnings"]
    assert upsampled.startswith(
        "7 of 9 files are recorded below data.sample_rate=32000 Hz (8000 Hz: 3, 11025 Hz: 2, "
        "16000 Hz: 1, 1 more rate): they are upsampled, and the features above 11025 Hz "
        "hold nothing; data.sample_rate=8000 fits 3 of them"
    )
    assert describe_audio([Clip(Path("a.wav"), "a")], 32000, 1.0) is None


def test_parts_of_a_file_count_as_one_file_and_their_length_is_the_clips():
    # Sound events in two long 8 kHz recordings: 2 files, 6 parts of 3 s.
    clips = [
        Clip(Path(f"{n}.wav"), "a", sample_rate=8000, seconds=3.0, offset=10.0 * i, duration=3.0)
        for n in range(2)
        for i in range(3)
    ]
    audio = describe_audio(clips, 16000, 1.0)
    assert audio["parts"] == 6
    upsampled, windowed = audio["warnings"]
    assert upsampled.startswith("2 of 2 files are recorded below data.sample_rate=16000 Hz")
    assert windowed.startswith("the median clip is 3.0 s long, data.clip_seconds=1")


def test_second_run_reads_evaluation_features_from_the_cache(compose_config, manifest):
    config = compose_config(*_manifest_overrides(manifest))
    first = run(config)
    second = run(config)
    assert (first["cache"]["hits"], first["cache"]["computed"]) == (0, 12)
    # Training items are augmented (never cached); validation and test are all hits.
    assert (second["cache"]["hits"], second["cache"]["computed"]) == (12, 0)
    assert second["cache"]["not_cached"] == 12


def test_bad_file_in_skip_mode_is_counted_in_the_summary(compose_config, manifest, tmp_path):
    with manifest.open("a", newline="") as handle:
        csv.writer(handle).writerow([str(tmp_path / "broken.wav"), "3", 3])
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    summary = run(compose_config(*_manifest_overrides(manifest, "data.on_bad_file=skip")))
    assert [bad["path"] for bad in summary["bad_files"]] == [str(tmp_path / "broken.wav")]
    assert summary["splits"]["train"]["clips"] == 12


def test_bad_file_in_error_mode_stops_the_job(compose_config, manifest, tmp_path):
    with manifest.open("a", newline="") as handle:
        csv.writer(handle).writerow([str(tmp_path / "broken.wav"), "3", 1])
    (tmp_path / "broken.wav").write_bytes(b"")
    lines = len(manifest.read_text().splitlines())
    # The manifest's line too, as in skip mode's warning (it was the path alone).
    broken = tmp_path / "broken.wav"
    named = "^" + re.escape(f"{manifest}, line {lines} ({broken}): ")
    with pytest.raises(BadAudioError, match=named) as raised:
        run(compose_config(*_manifest_overrides(manifest)))
    assert raised.value.path == str(broken)


def test_missing_data_root_names_the_key(compose_config, tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        run(compose_config(f"data.root={tmp_path / 'nowhere'}"))


def test_training_without_a_validation_split_stops_at_start_naming_the_key(
    compose_config, manifest
):
    # Fold 1 tests, no val_fold, and val_fraction 0: nothing to validate on.
    overrides = [o for o in _manifest_overrides(manifest) if o != "data.val_fold=2"]
    with pytest.raises(DatasetError, match="validation split is empty.*data.val_fraction"):
        run(compose_config(*overrides, "data.val_fraction=0", "run.train=true"))


def test_a_validation_fraction_with_nothing_to_take_says_why(compose_config, tmp_path):
    # One clip per class: data.val_fraction=0.1 is above 0 and still takes nothing, which the
    # message used to answer with "set data.val_fraction above 0".
    for digit in (1, 2):
        (tmp_path / str(digit)).mkdir()
        shutil.copy(fsdd_clip(digit), tmp_path / str(digit))
    overrides = ["data=folder", f"data.root={tmp_path}", "data.sample_rate=8000"]
    with pytest.raises(DatasetError, match=r"val_fraction=0.1 took no clip, as no class has 2"):
        run(compose_config(*overrides, "run.train=true"))


def test_main_job_builds_the_configured_model_for_the_dataset(compose_config, manifest):
    summary = run(compose_config(*_manifest_overrides(manifest, "model=panns_mobilenetv1")))
    # Two classes, and n_mels: null takes the features' 64 mel bins.
    expected = create_model("panns_mobilenetv1", 2, n_mels=64)
    assert summary["model"]["parameters"] == sum(p.numel() for p in expected.parameters())


def test_null_n_mels_follows_the_feature_mel_bins(compose_config):
    config = compose_config("model=panns_cnn14", "features.n_mels=40")
    model = build_model(load_settings(config).model, 3, n_mels=40)
    assert model.bn0.num_features == 40


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.params.size=xl", r"model.params: model 'efficientnet_v2': size must be one of"),
        ("model.params.pretrained_path=/nowhere/cnn14.pth", "/nowhere/cnn14.pth"),
    ],
)
def test_bad_model_setting_stops_the_job_naming_it(compose_config, manifest, override, message):
    with pytest.raises(ConfigError, match=message):
        run(compose_config(*_manifest_overrides(manifest, override)))


def test_cfg_job_prints_the_composed_config():
    result = subprocess.run(
        [sys.executable, "main.py", "--cfg", "job"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for section in ("system:", "data:", "model:", "training:", "run:", "augmentations:"):
        assert f"\n{section}" in f"\n{result.stdout}"


def test_console_script_runs_the_same_app_from_another_directory(tmp_path, manifest):
    script = Path(sys.executable).parent / "audioclf"
    assert script.exists(), "the package is not installed with its console script"
    result = subprocess.run(
        [
            str(script),
            *_manifest_overrides(manifest),
            "system.num_workers=0",
            "training.epochs=2",
            "model.params.width_mult=0.25",
            "model.params.depth_mult=0.25",
            f"system.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "dataset_summary.json").exists()
    output = result.stderr + result.stdout
    assert "classes      2: 3, 4" in output
    assert "epoch 2/2" in output
    assert "test: accuracy" in output
    assert (tmp_path / "run" / "checkpoints" / "best.pth").exists()
    # The default job exports too, each format checked.
    assert (tmp_path / "run" / "export" / "model.onnx").exists()
    assert "exports checked on 6 clips" in output


def test_relative_paths_start_where_the_command_ran_when_hydra_changes_directory(tmp_path):
    # Under hydra.job.chdir=true the job runs in its output folder: data.root=clips was
    # "no such folder", and a relative cache started empty in each run's folder.
    (tmp_path / "clips").symlink_to(FSDD)
    tiny_split_manifest(tmp_path)  # m.csv, naming FSDD files
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "main.py"),
            "data=manifest",
            "data.manifest=m.csv",
            "data.root=clips",
            "data.sample_rate=8000",
            "system.cache_dir=cache",
            "system.num_workers=0",
            "training.epochs=1",
            "training.batch_size=4",
            "run.test=false",
            "run.export=false",
            "hydra.run.dir=run",
            "hydra.job.chdir=true",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoints" / "best.pth").exists()
    assert list((tmp_path / "cache").iterdir())
    assert not (tmp_path / "run" / "cache").exists()


def test_only_relative_paths_given_by_the_user_are_moved_to_the_launch_directory(
    compose_config, tmp_path
):
    config = compose_config(
        "data=esc50",
        "data.root=esc",  # its manifest, ${data.root}/meta/esc50.csv, follows
        "system.cache_dir=/abs/cache",
        "system.output_dir=runs/a",
        "run.resume=true",
        "model.params.pretrained_path='~/w.pth'",
        "augmentations.audio.transforms=[{name:AddBackgroundNoise,sounds_path:noise,p:1.0}]",
    )
    changed = overrides.from_launch_directory(config, tmp_path)
    assert changed == [
        "system.output_dir",
        "data.root",
        "augmentations.audio.transforms.0.sounds_path",
    ]
    assert config.system.output_dir == str(tmp_path / "runs" / "a")
    assert config.data.root == str(tmp_path / "esc")
    assert config.data.manifest == str(tmp_path / "esc" / "meta" / "esc50.csv")
    assert config.augmentations.audio.transforms[0].sounds_path == str(tmp_path / "noise")
    assert config.system.cache_dir == "/abs/cache"
    assert config.run.resume is True
    assert config.model.params.pretrained_path == "~/w.pth"


def test_speech_commands_trains_on_the_official_split_with_its_background_noise(
    compose_config, tmp_path
):
    root = speech_commands_like(tmp_path / "speech_commands")
    noise = root / "_background_noise_"
    summary = run(
        compose_config(
            "data=speech_commands",
            f"data.root={root}",
            "data.sample_rate=8000",
            f"augmentations.audio.transforms=[{{name:AddBackgroundNoise,sounds_path:{noise},p:1.0}}]",
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
        )
    )
    assert summary["classes"] == ["one", "zero"]
    assert {split: info["clips"] for split, info in summary["splits"].items()} == {
        "train": 16,
        "val": 4,
        "test": 4,
    }
    assert "test" in summary


def test_fsd50k_trains_multi_label_on_its_official_split(compose_config, tmp_path, caplog):
    root = fsd50k_like(tmp_path / "FSD50K")
    summary = run(
        compose_config(
            "data=fsd50k",
            f"data.root={root}",
            "data.sample_rate=8000",
            "data.clip_seconds=1.0",
            "training.monitor=val_mAP",
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
        )
    )
    assert summary["classes"] == ["One", "Speech", "Two"]
    assert 0.0 <= summary["test"]["mAP"] <= 1.0
    # The console's last test line carries the multi-label ranking metrics too.
    assert f"mAP {summary['test']['mAP']:.4f}, ROC-AUC" in caplog.text
    with pytest.raises(ConfigError, match="data=fsd50k is multi-label"):
        load_settings(compose_config("data=fsd50k", f"data.root={root}", "data.multi_label=false"))


@pytest.mark.parametrize(
    ("program", "command"),
    [
        ("main.py", "python main.py run.resume=true"),
        ("/repo/.venv/lib/python3.11/site-packages/audioclf/__main__.py", "python -m audioclf"),
        ("/repo/.venv/bin/audioclf", "audioclf run.resume=true"),
    ],
)
def test_the_resume_hint_names_the_way_the_job_was_started(monkeypatch, program, command):
    from audioclf.cli import resume_command

    monkeypatch.setattr(sys, "argv", [program])
    assert resume_command().startswith(command)


@pytest.mark.parametrize(
    ("world", "local", "command"),
    [
        ("2", "2", "torchrun --nproc_per_node=2 main.py run.resume=true"),
        ("8", "4", "torchrun --nnodes=2 --nproc_per_node=4 main.py run.resume=true"),
    ],
)
def test_the_resume_hint_under_torchrun_is_a_torchrun_command(monkeypatch, world, local, command):
    # It said `python main.py ...`: one process where the run had trained with several.
    from audioclf.cli import resume_command

    monkeypatch.setattr(sys, "argv", ["main.py"])
    for name, value in {
        "TORCHELASTIC_RUN_ID": "job",
        "WORLD_SIZE": world,
        "LOCAL_WORLD_SIZE": local,
    }.items():
        monkeypatch.setenv(name, value)
    assert resume_command() == command


def test_the_readmes_python_job_runs_as_printed_into_a_folder_of_its_own(
    tmp_path, monkeypatch, capsys
):
    """README, "Training and evaluation": the main job from Python, its code as printed (on
    the tiny dataset, two epochs), trains into outputs/<date>/<time> below the working
    directory, and its checkpoint predicts with nothing else."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Training and evaluation") : readme.index("- **Optimizers**")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "compose_config([" in code
    test_data = [
        *tiny_split_manifest(tmp_path),
        f"system.cache_dir={tmp_path / 'cache'}",
        "system.num_workers=0",
        "training.epochs=2",
        "run.export=false",
    ]
    composed = overrides.compose_config
    monkeypatch.setattr(overrides, "compose_config", lambda given: composed([*given, *test_data]))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md: the main job from Python", "exec"), {})  # noqa: S102
    printed = capsys.readouterr().out
    folder = Path(re.search(r"files in (\S+)", printed).group(1))
    relative = str(folder.relative_to(tmp_path))
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}", relative)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert f"test accuracy {metrics['test']['accuracy']:.4f}" in printed
    predictor = load_predictor(folder / "checkpoints" / "best.pth")
    assert predict_file(predictor, fsdd_clip(1)).top[0][0] in ("1", "2")
