"""Speech Commands: the official split, and the keyword task (words, _unknown_, _silence_)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audioclf.cli import run
from audioclf.index import DatasetError, split_listing
from audioclf.settings import ConfigError, load_settings
from audioclf.speech_commands import MAX_SILENCE_GAIN, SILENCE, UNKNOWN, index_speech_commands
from conftest import speech_commands_like, write_wav

# ---------------------------------------------------------------- Speech Commands


def test_speech_commands_uses_the_official_lists_and_no_noise_class(tmp_path):
    root = speech_commands_like(tmp_path / "sc")
    index = split_listing(index_speech_commands(root), seed=0)
    assert index.classes == ["one", "zero"]
    assert index.counts() == {"train": 16, "val": 4, "test": 4}
    assert {clip.group for clip in index.splits["val"]} == {"lucas"}
    assert {clip.group for clip in index.splits["test"]} == {"theo"}
    assert {clip.path.parent.name for clip in index.splits["train"]} == {"zero", "one"}


def test_speech_commands_lists_are_checked(tmp_path):
    root = speech_commands_like(tmp_path / "sc")
    with (root / "testing_list.txt").open("a") as handle:
        handle.write("zero/nobody_nohash_0.wav\n")
    with pytest.raises(DatasetError, match=r"testing_list.txt, line 5: zero/nobody_nohash_0.wav"):
        index_speech_commands(root)
    (root / "testing_list.txt").write_text("zero/theo_nohash_0.wav\n")
    with (root / "validation_list.txt").open("a") as handle:
        handle.write("zero/theo_nohash_0.wav\n")
    with pytest.raises(DatasetError, match=r"zero/theo_nohash_0.wav is in validation_list.txt"):
        index_speech_commands(root)
    (root / "testing_list.txt").unlink()
    with pytest.raises(DatasetError, match="no testing_list.txt"):
        index_speech_commands(root)


def test_a_speaker_listed_in_two_splits_is_an_error(tmp_path):
    root = speech_commands_like(tmp_path / "sc")
    with (root / "validation_list.txt").open("a") as handle:
        handle.write("zero/george_nohash_0.wav\n")  # george's other clips train
    with pytest.raises(DatasetError, match="group 'george' is in train and val"):
        split_listing(index_speech_commands(root), seed=0)


# ---------------------------------------------------------------- the keyword task

RATE = 8000
#: The background "noise" is a ramp from RAMP_START up by RAMP_STEP a sample, so that a slice's
#: first and last values tell where in the file it was cut, whatever its gain.
RAMP_START, RAMP_STEP = 0.5, 1e-5


def _keyword_data(root: Path, background_seconds: float = 6.0) -> Path:
    """Words zero, one and two (12 clips each; lucas validates, theo tests) and one ramp as the
    background noise."""
    root = speech_commands_like(root, words=("zero", "one", "two"))
    (root / "_background_noise_" / "noise.wav").unlink()
    ramp = RAMP_START + RAMP_STEP * np.arange(round(background_seconds * RATE))
    write_wav(root / "_background_noise_" / "ramp.wav", ramp.astype(np.float32), RATE, "FLOAT")
    return root


def _keyword_task(root: Path, silence_dir: Path, **kwargs):
    return index_speech_commands(
        root,
        ["zero", "one"],
        silence_dir=silence_dir,
        sample_rate=RATE,
        clip_seconds=1.0,
        **kwargs,
    )


def _where_cut(path: Path) -> tuple[float, float, int]:
    """The (start, end) in seconds of the ramp a silence clip was cut from, and its gain."""
    clip, rate = sf.read(path, dtype="float64")
    assert rate == RATE
    # clip[i] = gain * (start + step * (offset + i)): the ratio of its ends gives the offset.
    ratio = clip[-1] / clip[0]
    offset = (len(clip) - 1) / (ratio - 1) - RAMP_START / RAMP_STEP
    gain = clip[0] / (RAMP_START + RAMP_STEP * offset)
    return offset / RATE, (offset + len(clip)) / RATE, gain


def test_the_keyword_task_keeps_its_words_and_adds_unknown_and_silence_to_each_split(
    tmp_path, caplog
):
    root = _keyword_data(tmp_path / "sc")
    with caplog.at_level("INFO", logger="audioclf.speech_commands"):
        index = split_listing(_keyword_task(root, tmp_path / "silence"), seed=0)
    assert "words + _unknown_ + _silence_: train 16 + 2 + 2, val 4 + 1 + 1, test 4 + 1 + 1" in (
        caplog.text
    )
    assert index.classes == [SILENCE, UNKNOWN, "one", "zero"]
    # 16, 4 and 4 keyword clips; a tenth as many (rounded up) of _unknown_ and of _silence_.
    assert index.counts() == {"train": 20, "val": 6, "test": 6}
    speakers = {"val": {"lucas"}, "test": {"theo"}}
    for split, clips in index.splits.items():
        unknown = [clip for clip in clips if clip.label == UNKNOWN]
        assert {clip.path.parent.name for clip in unknown} == {"two"}
        if split in speakers:  # the official split, kept
            assert {clip.group for clip in unknown} == speakers[split]
    # Each split's silence is cut from its own stretch of the background (2 : 1 : 1 of 6 s),
    # one second long, at a volume up to MAX_SILENCE_GAIN.
    stretches = {"train": (0.0, 3.0), "val": (3.0, 4.5), "test": (4.5, 6.0)}
    for split, (first, last) in stretches.items():
        silence = [clip for clip in index.splits[split] if clip.label == SILENCE]
        assert len(silence) == {"train": 2, "val": 1, "test": 1}[split]
        if split == "train":  # one in ten training silence clips is zeros, a muted microphone
            zeros, *silence = silence
            assert not sf.read(zeros.path)[0].any()
        for clip in silence:
            start, end, gain = _where_cut(clip.path)
            assert first - 1e-3 <= start, (split, start)
            assert end <= last + 1e-3, (split, end)
            assert end - start == pytest.approx(1.0)
            assert 0 < gain <= MAX_SILENCE_GAIN + 1e-6


def test_silence_is_written_once_per_data_and_settings_and_a_lost_clip_is_named(tmp_path):
    root = _keyword_data(tmp_path / "sc")
    silence_dir = tmp_path / "silence"

    def silence(**kwargs):
        listing = _keyword_task(root, silence_dir, **kwargs)
        return [clip.path for clip in listing.clips if clip.label == SILENCE]

    first = silence()
    written = {path: path.stat().st_mtime_ns for path in first}
    assert silence() == first  # found, not written again
    assert {path: path.stat().st_mtime_ns for path in first} == written
    reseeded = silence(seed=1)
    assert reseeded[0].parent.parent != first[0].parent.parent
    assert [sf.read(path)[0].tolist() for path in reseeded] != [
        sf.read(path)[0].tolist() for path in first
    ]
    assert len(silence(silence_fraction=0.5)) == 8 + 2 + 2
    assert silence(silence_fraction=0) == []
    first[1].unlink()
    with pytest.raises(
        DatasetError, match=r"1 of its _silence_ clips are gone .*delete the folder"
    ):
        silence()


def test_silence_is_never_zeros_outside_training_where_the_background_is_silent(tmp_path):
    # The test split's stretch of the background (4.5-6 s) is zeros but for its last 0.1 s:
    # zeros are training's muted microphone, and a file of them in test too would be leakage.
    root = _keyword_data(tmp_path / "sc")
    background = root / "_background_noise_" / "ramp.wav"
    ramp, _ = sf.read(background, dtype="float32")
    ramp[round(4.5 * RATE) : round(5.9 * RATE)] = 0
    write_wav(background, ramp, RATE, "FLOAT")
    index = split_listing(_keyword_task(root, tmp_path / "silence"), seed=0)
    for split in ("val", "test"):
        for clip in index.splits[split]:
            if clip.label == SILENCE:
                assert sf.read(clip.path)[0].any(), clip.path
    ramp[round(4.5 * RATE) :] = 0  # nothing but zeros to cut from
    write_wav(background, ramp, RATE, "FLOAT")
    with pytest.raises(DatasetError, match=r"_background_noise_: 100 slices .* test _silence_"):
        _keyword_task(root, tmp_path / "silence")


def test_keyword_task_errors_name_the_words_and_the_background_folder(tmp_path):
    root = _keyword_data(tmp_path / "sc")
    with pytest.raises(DatasetError, match=r"names \['tree'\], which it has no folder for; its "):
        index_speech_commands(root, ["zero", "tree"], silence_dir=tmp_path / "silence")
    for sound in (root / "_background_noise_").iterdir():
        sound.unlink()
    with pytest.raises(DatasetError, match=r"_background_noise_: no background sounds.*=0"):
        _keyword_task(root, tmp_path / "silence")
    # Without silence, no background is needed; without unknown, the other words are left out.
    listing = _keyword_task(root, tmp_path / "silence", silence_fraction=0, unknown_fraction=0)
    assert {clip.label for clip in listing.clips} == {"zero", "one"}


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("[zero,zero,one]", r"data.words names \['zero'\] twice"),
        ("[zero,_silence_]", r"data.words names \['_silence_'\]: folders starting with _"),
        ("[]", "data.words is empty"),
    ],
)
def test_data_words_is_checked_at_start(compose_config, words, message):
    config = compose_config("data=speech_commands", "data.root=sc", f"data.words={words}")
    with pytest.raises(ConfigError, match=message):
        load_settings(config)


def test_data_words_of_another_dataset_is_named(compose_config):
    with pytest.raises(ConfigError, match="data.words picks Speech Commands words; data=fsdd"):
        load_settings(compose_config("data=fsdd", "+data.words=[zero]"))


def test_yaml_yes_and_no_read_as_true_and_false_are_named_with_the_fix(compose_config):
    config = compose_config("data=speech_commands", "data.root=sc")
    config.data.words = [True, False]  # what a YAML file's bare `[yes, no]` gives
    with pytest.raises(ConfigError, match=r"data.words\[0\] must be text, not True.*quote"):
        load_settings(config)


def test_speech_commands_12_is_the_ten_word_task(compose_config):
    settings = load_settings(compose_config("data=speech_commands_12", "data.root=sc"))
    words = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
    assert settings.data.words == words
    assert (settings.data.unknown_fraction, settings.data.silence_fraction) == (0.1, 0.1)


def test_main_job_trains_the_keyword_task_and_its_checkpoint_tests_it_alone(
    compose_config, tmp_path
):
    root = _keyword_data(tmp_path / "sc")
    data = ["data=speech_commands", f"data.root={root}", "data.sample_rate=8000"]
    tiny = ["model.params.width_mult=0.25", "model.params.depth_mult=0.25"]
    summary = run(
        compose_config(
            *data,
            *tiny,
            "data.words=[zero,one]",
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
            "training.batch_size=4",
        )
    )
    assert summary["classes"] == [SILENCE, UNKNOWN, "one", "zero"]
    assert {split: info["clips"] for split, info in summary["splits"].items()} == {
        "train": 20,
        "val": 6,
        "test": 6,
    }
    # The checkpoint brings its words: tested with the data's root alone, the other words are
    # _unknown_ again (not labels it was never trained on), and the silence is the same.
    again = run(
        compose_config(
            *data,
            "run.test=true",
            f"run.checkpoint_path={tmp_path / 'outputs' / 'checkpoints' / 'best.pth'}",
            f"system.output_dir={tmp_path / 'again'}",
        )
    )
    assert again["classes"] == summary["classes"]
    assert again["test"]["accuracy"] == pytest.approx(summary["test"]["accuracy"])


def test_a_silence_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    root = _keyword_data(tmp_path / "sc")
    blocked = tmp_path / "read-only"

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", refuse)
    with pytest.raises(DatasetError, match=rf"{blocked}: cannot write .*system.cache_dir"):
        _keyword_task(root, blocked)


def test_two_processes_writing_the_same_silence_leave_one_whole_copy(tmp_path):
    from audioclf.speech_commands import _write_silence

    root = _keyword_data(tmp_path / "sc")
    sounds = [root / "_background_noise_" / "ramp.wav"]
    folder = tmp_path / "silence" / "same"
    counts = {"train": 2, "val": 1, "test": 1}
    _write_silence(folder, sounds[0].parent, sounds, counts, RATE, 1.0, seed=0)
    written = {path: path.read_bytes() for path in folder.rglob("*.wav")}
    # A torchrun rank that found no folder too, and renames its copy second.
    _write_silence(folder, sounds[0].parent, sounds, counts, RATE, 1.0, seed=0)
    assert {path: path.read_bytes() for path in folder.rglob("*.wav")} == written
    assert len(written) == 4
    assert [path.name for path in folder.parent.iterdir()] == ["same"]  # no staging left
