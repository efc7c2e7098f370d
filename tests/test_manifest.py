"""Manifests as NeMo writes them: JSON lines, a manifest per split, offset and duration."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import soundfile as sf

from audioclf import overrides
from audioclf.cli import run
from audioclf.dataset import check_clips
from audioclf.index import DatasetError, drop_duplicates, split_listing
from audioclf.manifest import check_durations, index_manifest, index_split_manifests
from audioclf.settings import ConfigError, load_settings
from conftest import FSDD, fsdd_clip

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
    assert listing.clips[0].listed_seconds == pytest.approx(items[0]["duration"])
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
        ('{"audio_filepath": "a.wav", "label": "x", "offset": 2.5}', r"line 2: offset 2\.5 s: a "),
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


def test_a_row_whose_duration_is_a_part_of_its_file_is_an_error(tmp_path):
    # NeMo loads `duration` seconds of the file: a shorter duration means a part of it.
    whole = nemo_item(1, 10)
    part = {**nemo_item(2, 10), "duration": 0.2}
    unmeasured = {**nemo_item(2, 11), "duration": 0.0}  # NeMo's --skip_duration
    manifest = write_json_lines(tmp_path / "m.json", [whole, unmeasured, part])
    clips, _ = check_clips(index_manifest(manifest, None, 0.1, 0.1).clips)
    with pytest.raises(
        DatasetError, match=r"1 manifest row\(s\) .* line 3 \(.*\): duration 0\.2 s, the file"
    ):
        check_durations(clips)
    check_durations(clips[:2])  # the whole file, and a duration not measured


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
    with pytest.raises(DatasetError, match=r"t\.json: has a split column, but it is the train"):
        index_split_manifests({"train": train}, None, 0.1)


def test_the_main_job_trains_on_nemo_manifests_and_tests_a_checkpoint_on_one(
    compose_config, tmp_path
):
    manifests = nemo_manifests(tmp_path)
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
    config = compose_config("data=manifest", "data.manifest={train:m/train.json,test:/abs/t.json}")
    changed = overrides.from_launch_directory(config, tmp_path)
    assert changed == ["data.manifest.train"]
    assert config.data.manifest.train == str(tmp_path / "m" / "train.json")
    assert config.data.manifest.test == "/abs/t.json"


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
    clip = fsdd_clip(1, index=10)
    assert warning.endswith(f"{manifest}, line 2 ({clip}) repeats {manifest}, line 1 ({clip})")
