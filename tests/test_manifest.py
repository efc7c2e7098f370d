"""Manifests as NeMo writes them: JSON lines, a manifest per split, offset and duration."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audioclf import audio, overrides
from audioclf.audio import BadAudioError
from audioclf.augment import AudioAugment
from audioclf.cache import FeatureCache
from audioclf.cli import run
from audioclf.dataset import SpectrogramDataset, check_clips
from audioclf.features import log_mel, resolve_params
from audioclf.index import Clip, DatasetError, drop_duplicates, split_listing
from audioclf.manifest import index_manifest, index_split_manifests
from audioclf.settings import ConfigError, load_settings
from conftest import FSDD, fsdd_clip, write_manifest, write_wav

SPLIT_INDICES = {"train": (10, 11, 12, 13), "val": (5, 6), "test": (0, 1)}


def write_json_lines(path: Path, items: list[dict]) -> Path:
    """A NeMo-style manifest: one JSON object per line."""
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def nemo_item(digit: int, index: int, **extra) -> dict:
    """The line NeMo's speech-commands script writes for a file: path, duration, command."""
    path = fsdd_clip(digit, index=index)
    return {"audio_filepath": str(path), "duration": sf.info(path).duration, "command": str(digit)}


def nemo_manifests(folder: Path) -> dict[str, Path]:
    """train/validation/test manifests of FSDD digits 1 and 2, as NeMo names them."""
    names = {"train": "train_manifest", "val": "validation_manifest", "test": "test_manifest"}
    return {
        split: write_json_lines(
            folder / f"{names[split]}.json",
            [nemo_item(digit, index) for digit in (1, 2) for index in indices],
        )
        for split, indices in SPLIT_INDICES.items()
    }


def test_a_json_lines_manifest_reads_nemos_keys_and_logs_those_it_does_not_read(tmp_path, caplog):
    items = [
        {**nemo_item(digit, index), "text": "_", "speaker": "jackson"}
        for digit in (3, 4)
        for index in range(10, 16)
    ]
    manifest = write_json_lines(tmp_path / "train_manifest.json", items)
    with caplog.at_level(logging.INFO, logger="audioclf"):
        listing = index_manifest(manifest, None, 0.25, 0.25)
    assert [(clip.path, clip.label) for clip in listing.clips] == [
        (Path(item["audio_filepath"]), item["command"]) for item in items
    ]
    assert listing.clips[0].origin == f"{manifest}, line 1"
    assert listing.clips[0].duration == pytest.approx(items[0]["duration"])
    assert "key(s) ['text', 'speaker'] not read" in caplog.text
    index = split_listing(listing, seed=0)
    assert index.counts() == {"train": 4, "val": 4, "test": 4}


def test_a_json_array_manifest_with_label_lists_reads_as_multi_label(tmp_path):
    manifest = tmp_path / "tags.json"
    manifest.write_text(
        json.dumps(
            [
                {"path": "3_jackson_10.wav", "label": ["dog", "bark", "dog"], "split": "train"},
                {"path": "4_jackson_10.wav", "label": [], "split": "test"},
            ],
            indent=2,
        )
    )
    listing = index_manifest(manifest, FSDD, 0.0, 0.0, multi_label=True)
    assert [(clip.label, clip.split) for clip in listing.clips] == [
        ("bark;dog", None),
        ("", "test"),
    ]
    assert listing.clips[1].origin == f"{manifest}, item 2"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"audio_filepath": "a.wav", "label": "x", "duration": -1}', "line 2: duration -1 is neg"),
        ('{"audio_filepath": "a.wav", "label": "x", "offset": "soon"}', "line 2: offset 'soon' is"),
        ('{"audio_filepath": "a.wav", "label": ""}', "line 2: empty label"),
        ('{"audio_filepath": "a.wav",', "line 2: not JSON .*one object per line"),
        ('["a.wav", "x"]', "line 2: list where an object was expected"),
    ],
)
def test_a_bad_json_line_is_named(tmp_path, line, message):
    good = '{"audio_filepath": "b.wav", "label": "x", "offset": 0, "duration": 0.0}'
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(f"{good}\n{line}\n")
    with pytest.raises(DatasetError, match=f"^{manifest}, {message}"):
        index_manifest(manifest, None, 0.1, 0.1)


def test_a_json_manifest_without_a_path_key_names_nemos_keys(tmp_path):
    manifest = write_json_lines(tmp_path / "m.json", [{"file": "a.wav", "label": "x"}])
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['path'\].*NeMo's audio_filepath"):
        index_manifest(manifest, None, 0.1, 0.1)


def long_recording(
    path: Path, digits: tuple[int, ...], gap: float = 0.25, index: int = 10
) -> list[float]:
    """Write FSDD recordings of `digits` (jackson's, `index`) one after another with `gap` s
    of silence between (8 kHz, 16-bit); return each recording's offset in seconds."""
    parts, offsets, at = [], [], 0.0
    for digit in digits:
        samples, rate = sf.read(fsdd_clip(digit, index=index), dtype="int16")
        offsets.append(at)
        parts += [samples, np.zeros(int(gap * rate), np.int16)]
        at += (len(samples) + int(gap * rate)) / rate
    sf.write(path, np.concatenate(parts), 8000, subtype="PCM_16")
    return offsets


def event_dataset(clips, cache_dir: Path, **kwargs) -> SpectrogramDataset:
    params = resolve_params("librosa", 8000)
    return SpectrogramDataset(
        clips, ["1", "2"], 8000, 1.0, params, FeatureCache(cache_dir), **kwargs
    )


def test_a_row_with_an_offset_and_duration_is_that_part_of_its_file(tmp_path):
    # NeMo's offset and duration: two sound events in one long recording.
    recording = tmp_path / "long.wav"
    offsets = long_recording(recording, (1, 2))
    seconds = [sf.info(fsdd_clip(digit)).duration for digit in (1, 2)]
    whole = {"audio_filepath": str(fsdd_clip(1)), "offset": 0, "duration": seconds[0], "label": "1"}
    events = [
        {"audio_filepath": "long.wav", "offset": offset, "duration": length, "label": label}
        for offset, length, label in zip(offsets, seconds, ("1", "2"), strict=True)
    ]
    manifest = write_json_lines(tmp_path / "events.json", [whole, *events])
    clips, bad = check_clips(index_manifest(manifest, None, 0.1, 0.1).clips)
    assert not bad
    # A part from 0 s to the end of its file is the whole file.
    parts = list(zip(offsets, seconds, strict=True))
    assert [clip.segment for clip in clips] == [None, *parts]
    assert [clip.seconds for clip in clips] == pytest.approx([seconds[0], *seconds])
    assert clips[2].where == (
        f"{manifest}, line 3 ({recording} from {offsets[1]:g} s to {offsets[1] + seconds[1]:g} s)"
    )
    dataset = event_dataset(clips, tmp_path / "cache")
    # Each part's features are those of the recording it was cut from, cached apart.
    for index, digit in ((1, 1), (2, 2)):
        alone = event_dataset([Clip(fsdd_clip(digit), str(digit))], tmp_path / "cache")
        np.testing.assert_allclose(dataset.features(index), alone.features(0), atol=1e-5)
    assert not np.allclose(dataset.features(1), dataset.features(2))
    np.testing.assert_allclose(dataset.waveform(2), alone.waveform(0), atol=1e-6)


def test_a_part_is_read_alike_from_formats_with_and_without_exact_seeking(tmp_path, monkeypatch):
    recording = tmp_path / "long.flac"
    long_recording(recording, (1, 2, 3))
    seeked, info = audio.load_segment(recording, 8000, 1.0, 0.5)
    monkeypatch.setattr(audio, "_SEEKABLE", frozenset())
    decoded, same = audio.load_segment(recording, 8000, 1.0, 0.5)
    assert info == same
    assert len(seeked) == 4000
    np.testing.assert_array_equal(seeked, decoded)


def test_an_augmented_training_crop_stays_inside_its_part(tmp_path):
    # Silence, then noise: a crop of the noisy part never reaches into the silence.
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 8000).astype(np.float32)
    path = write_wav(tmp_path / "r.wav", np.concatenate([np.zeros(16000, np.float32), noise]), 8000)
    clip = Clip(path, "1", offset=2.0, duration=1.0)
    augment = AudioAugment([{"name": "gain", "p": 1.0, "min_gain_db": 0.0, "max_gain_db": 0.0}])
    dataset = event_dataset([clip], tmp_path / "cache", training=True, audio_augment=augment)
    dataset.clip_seconds = 0.5
    silent = log_mel(np.zeros(4000, np.float32), dataset.feature_params).max()
    for seed in range(8):
        features = dataset.features(0, np.random.default_rng(seed))
        assert features.min() > silent + 20


def test_parts_of_one_file_share_a_split(tmp_path):
    recording = tmp_path / "long.wav"
    offsets = long_recording(recording, (1, 2))
    rows = [("long.wav", "1", "train", offsets[0], 0.5), ("long.wav", "2", "test", offsets[1], 0.5)]
    manifest = write_manifest(
        tmp_path / "m.csv", ["path", "label", "split", "offset", "duration"], rows
    )
    with pytest.raises(DatasetError, match=r"two splits: .*\(parts of a file share a split\)$"):
        drop_duplicates(index_manifest(manifest, None, 0.1, 0.1))
    # With a ratio split, a file's parts go to one split together. (The other files are
    # copied beside it: the split's order, by path, must not depend on the checkout's place.)
    others = []
    for digit in (1, 2):
        for index in range(10, 18):
            name = f"{digit}_jackson_{index}.wav"
            shutil.copy(fsdd_clip(digit, index=index), tmp_path / name)
            others.append((name, str(digit), 0, ""))
    rows = [("long.wav", "1", offsets[0], 0.5), ("long.wav", "2", offsets[1], 0.5)]
    manifest = write_manifest(
        tmp_path / "m.csv", ["path", "label", "offset", "duration"], rows + others
    )
    for seed in range(4):
        index = split_listing(index_manifest(manifest, None, 0.25, 0.25), seed=seed)
        holding = [
            s for s, clips in index.splits.items() if any(c.path == recording for c in clips)
        ]
        assert len(holding) == 1
        assert sum(clip.path == recording for clip in index.splits[holding[0]]) == 2


def test_a_part_past_its_files_end_is_a_bad_row(tmp_path, caplog):
    rows = [("1_jackson_10.wav", "1", 0.2, ""), ("2_jackson_10.wav", "2", 30, 1)]
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "offset", "duration"], rows)
    clips = index_manifest(manifest, FSDD, 0.1, 0.1).clips
    named = rf"^{manifest}, line 3 \(.*2_jackson_10\.wav from 30 s to 31 s\): offset 30 s is at"
    with pytest.raises(BadAudioError, match=named):
        check_clips(clips)
    good, bad = check_clips(clips, on_bad_file="skip")
    assert [clip.label for clip in good] == ["1"]
    assert good[0].seconds == pytest.approx(sf.info(fsdd_clip(1)).duration - 0.2)
    assert [reason for _, reason in bad] == [
        f"offset 30 s is at or past the file's end ({sf.info(fsdd_clip(2)).duration:g} s)"
    ]


def test_a_manifest_per_split_gives_each_file_its_split(tmp_path, caplog):
    manifests = nemo_manifests(tmp_path)
    listing = index_split_manifests(manifests, None, 0.5)
    index = split_listing(listing, seed=0)
    assert index.counts() == {"train": 8, "val": 4, "test": 4}
    for split, indices in SPLIT_INDICES.items():
        assert {clip.path.name for clip in index.splits[split]} == {
            f"{digit}_jackson_{i}.wav" for digit in (1, 2) for i in indices
        }
    # Without a validation manifest, validation is held out of training; without a test
    # manifest the test split is empty, and the log says so.
    with caplog.at_level(logging.WARNING, logger="audioclf"):
        listing = index_split_manifests({"train": manifests["train"]}, None, 0.5)
    assert "no test manifest: the test split is empty" in caplog.text
    assert split_listing(listing, seed=0).counts() == {"train": 4, "val": 4, "test": 0}


def test_a_split_manifest_with_a_split_column_is_an_error(tmp_path):
    train = write_json_lines(tmp_path / "t.json", [{**nemo_item(1, 10), "split": "test"}])
    with pytest.raises(DatasetError, match=r"t\.json: has a split column, but it is a train"):
        index_split_manifests({"train": train}, None, 0.1)


def train_one_epoch(compose_config, manifests: dict[str, Path]) -> dict:
    """The main job's summary after one epoch on a manifest per split of 8, 4 and 4 clips."""
    given = ",".join(f"{split}:{path}" for split, path in manifests.items())
    summary = run(
        compose_config(
            "data=manifest",
            f"data.manifest={{{given}}}",
            "data.sample_rate=8000",
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
        )
    )
    clips = {split: info["clips"] for split, info in summary["splits"].items()}
    assert clips == {"train": 8, "val": 4, "test": 4}
    return summary


def test_the_main_job_trains_on_nemo_manifests_and_tests_a_checkpoint_on_one(
    compose_config, tmp_path
):
    manifests = nemo_manifests(tmp_path)
    summary = train_one_epoch(compose_config, manifests)
    checkpoint = tmp_path / "outputs" / "checkpoints" / "best.pth"
    tested = run(
        compose_config(
            "data=manifest",
            f"data.manifest={{test:{manifests['test']}}}",
            "data.sample_rate=8000",
            "run.test=true",
            f"run.checkpoint_path={checkpoint}",
            "system.output_dir=" + str(tmp_path / "second"),
        )
    )
    assert tested["test"]["accuracy"] == summary["test"]["accuracy"]
    # Its training manifest as the test split: the checkpoint trained on those clips.
    with pytest.raises(DatasetError, match="8 of the 8 test clips trained or validated"):
        run(
            compose_config(
                "data=manifest",
                f"data.manifest={{test:{manifests['train']}}}",
                "data.sample_rate=8000",
                "run.test=true",
                f"run.checkpoint_path={checkpoint}",
            )
        )


@pytest.mark.parametrize(
    ("overrides_", "message"),
    [
        (["data.manifest={test:t.json}", "run.train=true"], "has no train manifest"),
        (["data.manifest={train:t.json}", "data.test_fold=1"], "data.test_fold pick splits"),
        (["data.manifest={}"], "gives no file"),
        (
            ["data.manifest={train:t.json,validation:v.json}"],
            r"\['data\.manifest\.validation'\]; data\.manifest has train, val, test$",
        ),
        (["data.manifest=[t.json,v.json]"], r"text or a section \(train, val, test\) or null"),
    ],
)
def test_a_manifest_per_split_that_cannot_work_fails_at_start(compose_config, overrides_, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(compose_config("data=manifest", *overrides_))


def test_relative_paths_of_a_manifest_per_split_start_at_the_launch_directory(
    compose_config, tmp_path
):
    config = compose_config(
        "data=manifest", "data.manifest={train:[m/a.json,/abs/b.json],val:v.json,test:/abs/t.json}"
    )
    changed = overrides.from_launch_directory(config, tmp_path)
    assert changed == ["data.manifest.train.0", "data.manifest.val"]
    assert list(config.data.manifest.train) == [str(tmp_path / "m" / "a.json"), "/abs/b.json"]
    assert config.data.manifest.val == str(tmp_path / "v.json")
    assert config.data.manifest.test == "/abs/t.json"


def test_a_split_may_have_several_manifests(compose_config, tmp_path):
    # NeMo's manifest_filepath: [speech.json, noise.json] for one split.
    manifests = nemo_manifests(tmp_path)
    extra = write_json_lines(tmp_path / "more.json", [nemo_item(1, 20), nemo_item(2, 20)])
    listing = index_split_manifests(
        {"train": [manifests["train"], extra], "test": manifests["test"]}, None, 0.25
    )
    assert listing.source == f"{manifests['train']}, {extra}, {manifests['test']}"
    index = split_listing(listing, seed=0)
    assert index.counts() == {"train": 8, "val": 2, "test": 4}
    assert {clip.path.name for split in ("train", "val") for clip in index.splits[split]} >= {
        "1_jackson_20.wav",
        "2_jackson_20.wav",
    }
    # From the config: the missing one of a split's manifests is named by its place.
    given = f"data.manifest={{train:[{manifests['train']},{tmp_path / 'nope.json'}]}}"
    config = compose_config("data=manifest", given, "data.sample_rate=8000")
    with pytest.raises(ConfigError, match=r"^data\.manifest\.train\[1\]: no such file"):
        run(config)


def test_repeated_rows_are_dropped_with_one_warning_that_counts_them(tmp_path, caplog):
    # NeMo's --rebalance repeats training rows to even out the classes.
    items = [nemo_item(1, 10)] * 5 + [nemo_item(2, 10)] * 2 + [nemo_item(2, 11)]
    manifest = write_json_lines(tmp_path / "train_manifest.json", items)
    with caplog.at_level(logging.WARNING, logger="audioclf"):
        listing = drop_duplicates(index_manifest(manifest, None, 0.1, 0.1))
    assert [clip.path.name for clip in listing.clips] == [
        "1_jackson_10.wav",
        "2_jackson_10.wav",
        "2_jackson_11.wav",
    ]
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith("dropped 5 repeated listing(s)")
    assert f"the first: {manifest}, line 2 ({fsdd_clip(1, index=10)} " in warning
    assert f"repeats {manifest}, line 1 (" in warning


def test_the_main_job_trains_on_sound_events_in_long_recordings(compose_config, tmp_path):
    # A manifest per split of events (offset, duration) in recordings of "1", then "2".
    manifests = {}
    for split, indices in SPLIT_INDICES.items():
        items = []
        for index in indices:
            recording = tmp_path / f"rec_{index}.wav"
            offsets = long_recording(recording, (1, 2), index=index)
            for digit, offset in zip((1, 2), offsets, strict=True):
                length = sf.info(fsdd_clip(digit, index=index)).duration
                items.append(
                    {
                        "audio_filepath": recording.name,
                        "offset": offset,
                        "duration": length,
                        "label": str(digit),
                    }
                )
        manifests[split] = write_json_lines(tmp_path / f"{split}.json", items)
    summary = train_one_epoch(compose_config, manifests)
    assert summary["splits"]["test"]["per_class"] == {"1": 2, "2": 2}
    # The clips' lengths are the events', not the recordings'; files are counted once.
    assert summary["audio"]["seconds"]["max"] < 0.7
    assert summary["audio"]["sample_rates"] == {"8000": 8}
    assert summary["audio"]["parts"] == 16
    assert summary["manifest"] == ", ".join(f"{k}: {v}" for k, v in manifests.items())


def test_checking_a_part_of_a_wav_reads_only_that_part(tmp_path, monkeypatch):
    # The events of an hour-long recording must not each decode the hour.
    recording = tmp_path / "long.wav"
    offsets = long_recording(recording, (1, 2, 3))

    def whole_file(path):
        raise AssertionError(f"{path} read whole")

    monkeypatch.setattr("audioclf.dataset.read_bytes", whole_file)
    monkeypatch.setattr("audioclf.audio.read_bytes", whole_file)
    clips = [Clip(recording, str(d), offset=offsets[d - 1], duration=0.3) for d in (1, 2, 3)]
    good, _ = check_clips(clips)
    assert [clip.seconds for clip in good] == pytest.approx([0.3] * 3)
