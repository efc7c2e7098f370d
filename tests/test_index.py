"""Indexing: FSDD, folders and manifests listed, split, and checked for leakage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from audioclf.index import Clip, DatasetError, Listing, split_listing
from audioclf.layouts import index_folder, index_fsd50k, index_fsdd
from audioclf.manifest import index_manifest, manifest_folds
from conftest import (
    FSDD,
    SPEAKERS,
    esc50_like,
    fsd50k_like,
    fsdd_clip,
    write_manifest,
)

# ---------------------------------------------------------------- indexing


def test_fsdd_uses_the_official_test_split_and_index_5_to_9_for_validation():
    index = split_listing(index_fsdd(FSDD), seed=0)
    assert index.classes == [str(digit) for digit in range(10)]
    assert index.counts() == {"train": 2400, "val": 300, "test": 300}
    test_indices = {int(clip.path.stem.split("_")[2]) for clip in index.splits["test"]}
    val_indices = {int(clip.path.stem.split("_")[2]) for clip in index.splits["val"]}
    assert (test_indices, val_indices) == ({0, 1, 2, 3, 4}, {5, 6, 7, 8, 9})


def test_fsdd_rejects_a_foreign_file_name(tmp_path):
    shutil.copy(fsdd_clip(1), tmp_path / "hello.wav")
    with pytest.raises(DatasetError, match="hello.wav"):
        index_fsdd(tmp_path)


def test_folder_with_split_folders(folder_dataset):
    index = split_listing(index_folder(folder_dataset, 0.1, 0.1), seed=0)
    assert index.classes == ["0", "1", "2"]
    assert index.counts() == {"train": 12, "val": 6, "test": 6}


def test_folder_without_split_folders_is_split_stratified_and_seeded(tmp_path, folder_dataset):
    flat = tmp_path / "flat"
    for source in folder_dataset.glob("*/*/*.wav"):
        target = flat / source.parent.name / f"{source.parent.parent.name}_{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    first = split_listing(index_folder(flat, 0.25, 0.25), seed=1)
    assert first.counts() == {"train": 12, "val": 6, "test": 6}
    for split in ("val", "test"):
        assert sorted(clip.label for clip in first.splits[split]) == ["0", "0", "1", "1", "2", "2"]
    assert first.splits == split_listing(index_folder(flat, 0.25, 0.25), seed=1).splits
    assert first.splits != split_listing(index_folder(flat, 0.25, 0.25), seed=2).splits


def test_hidden_files_and_folders_are_not_clips(tmp_path, folder_dataset, caplog):
    # A folder copied from a Mac: `._NAME.wav` metadata beside each file, a `.ipynb_checkpoints`
    # class folder, a `__MACOSX` folder; none of them is audio or a class.
    shutil.copytree(folder_dataset, tmp_path / "copy")
    root = tmp_path / "copy"
    (root / "train" / "0" / "._a.wav").write_bytes(b"\x00\x05\x16\x07")
    (root / "train" / "1" / ".hidden").mkdir()
    shutil.copy(fsdd_clip(1), root / "train" / "1" / ".hidden" / "x.wav")
    for folder in (".ipynb_checkpoints", "0/__MACOSX"):
        (root / "train" / folder).mkdir()
        shutil.copy(fsdd_clip(1), root / "train" / folder / "x.wav")
    with caplog.at_level("INFO", logger="audioclf.layouts"):
        index = split_listing(index_folder(root, 0.1, 0.1), seed=0)
    assert index.classes == ["0", "1", "2"]
    assert index.counts() == {"train": 12, "val": 6, "test": 6}
    assert "left out 2 hidden audio file(s)" in caplog.text  # 0/: ._a.wav and __MACOSX/x.wav


def test_underscored_class_folders_and_double_extensions_are_clips(tmp_path):
    # Google's Speech Commands test set: `_silence_` and `_unknown_` classes, `*.wav.wav` files.
    for label in ("_silence_", "_unknown_", "yes"):
        (tmp_path / "set" / label).mkdir(parents=True)
        shutil.copy(fsdd_clip(1), tmp_path / "set" / label / "a_nohash_0.wav.wav")
    trained = ["_silence_", "_unknown_", "yes"]
    index = split_listing(index_folder(tmp_path / "set", 0.0, 1.0), seed=0, classes=trained)
    assert sorted(clip.label for clip in index.splits["test"]) == trained


def test_split_folders_as_datasets_spell_them(tmp_path, folder_dataset, caplog):
    # Before: validation/ beside train/ was not read (its clips lost, val carved from train),
    # and training/ validation/ testing/ became three classes named after the splits.
    root = tmp_path / "spelled"
    for split, name in [("train", "Training"), ("val", "validation"), ("test", "testing")]:
        shutil.copytree(folder_dataset / split, root / name)
    (root / "extra" / "0").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="audioclf.layouts"):
        index = split_listing(index_folder(root, 0.1, 0.1), seed=0)
    assert index.classes == ["0", "1", "2"]
    assert index.counts() == {"train": 12, "val": 6, "test": 6}
    assert "folder(s) ['extra'] beside the split folders are not read" in caplog.text
    shutil.copytree(folder_dataset / "val", root / "val")
    with pytest.raises(DatasetError, match="both val/ and validation/ hold val"):
        index_folder(root, 0.1, 0.1)
    shutil.rmtree(root / "val")
    shutil.rmtree(root / "Training")
    with pytest.raises(DatasetError, match="has testing/, validation/ but no train/ folder"):
        index_folder(root, 0.1, 0.1)


def test_audio_files_outside_class_folders_are_named(tmp_path, folder_dataset, caplog):
    flat = tmp_path / "flat"
    flat.mkdir()
    for index in (10, 11):
        shutil.copy(fsdd_clip(1, index=index), flat / f"1_{index}.wav")
    with pytest.raises(
        DatasetError, match=r"2 audio file\(s\) \(1_10.wav, ...\) lie in it with no class"
    ):
        index_folder(flat, 0.1, 0.1)
    shutil.copy(fsdd_clip(1), folder_dataset / "train" / "stray.wav")  # beside class folders
    with caplog.at_level("WARNING", logger="audioclf.layouts"):
        index_folder(folder_dataset, 0.1, 0.1)
    assert "train: 1 audio file(s) in it belong to no class folder; not read" in caplog.text


def test_label_in_test_that_training_lacks_is_an_error(folder_dataset):
    extra = folder_dataset / "test" / "9"
    extra.mkdir()
    shutil.copy(fsdd_clip(9), extra / "9.wav")
    with pytest.raises(DatasetError, match=r"\['9'\].*test"):
        split_listing(index_folder(folder_dataset, 0.1, 0.1), seed=0)


def test_data_a_model_is_tested_on_needs_no_training_clips_and_only_its_classes(tmp_path, caplog):
    rows = [(f"{d}_theo_{i}.wav", str(d), "test") for d in (3, 4) for i in (0, 1)]
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], rows)
    listing = index_manifest(manifest, FSDD, 0.1, 0.1)
    with pytest.raises(DatasetError, match="no training clips found"):
        split_listing(listing, seed=0)
    with caplog.at_level("WARNING", logger="audioclf.index"):
        index = split_listing(listing, seed=0, classes=["3", "4", "5"])
    # The model's class order, a class the data lacks included (a warning, not an error).
    assert index.classes == ["3", "4", "5"]
    assert index.counts() == {"train": 0, "val": 0, "test": 4}
    assert "the test split has no clip of ['5']" in caplog.text
    with pytest.raises(
        DatasetError,
        match=r"labels \['4'\] appear in the test split but the model was trained "
        r"for classes \['3', '5'\]",
    ):
        split_listing(listing, seed=0, classes=["3", "5"])


@pytest.mark.parametrize("multi_label", [False, True])
def test_data_classes_fix_the_class_order_and_must_be_the_training_labels(tmp_path, multi_label):
    rows = [
        (f"{d}_theo_{i}.wav", str(d), split)
        for d in (3, 4, 5)
        for i, split in ((10, "train"), (11, "train"), (5, "val"), (0, "test"))
    ]
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], rows)
    listing = index_manifest(manifest, FSDD, 0.1, 0.1, multi_label=multi_label)
    index = split_listing(listing, seed=0, multi_label=multi_label, class_order=["5", "3", "4"])
    assert index.classes == ["5", "3", "4"]  # not sorted: output i is the i-th given
    with pytest.raises(
        DatasetError,
        match=r"labels \['5'\] appear in the train split but not in data.classes \['3', '4'\]",
    ):
        split_listing(listing, seed=0, multi_label=multi_label, class_order=["3", "4"])
    with pytest.raises(DatasetError, match=r"data.classes has \['6'\], which no training clip has"):
        split_listing(listing, seed=0, multi_label=multi_label, class_order=["3", "4", "5", "6"])


@pytest.mark.parametrize("multi_label", [False, True])
def test_a_single_class_is_an_error_naming_it(tmp_path, multi_label):
    rows = [(f"1_jackson_{i}.wav", "one", s) for i, s in [(10, "train"), (11, "train"), (5, "val")]]
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], rows)
    listing = index_manifest(manifest, FSDD, 0.1, 0.1, multi_label=multi_label)
    with pytest.raises(DatasetError, match=r"m.csv: the training clips have one class \('one'\)"):
        split_listing(listing, seed=0, multi_label=multi_label)


def test_manifest_with_split_column(tmp_path):
    rows = [
        (f"{d}_jackson_{i}.wav", str(d), s)
        for d in (3, 4)
        for i, s in [(10, "train"), (11, "train"), (12, "val"), (1, "test")]
    ]
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], rows)
    index = split_listing(index_manifest(manifest, FSDD, 0.1, 0.1), seed=0)
    assert index.counts() == {"train": 4, "val": 2, "test": 2}
    assert index.splits["test"][0].path == FSDD / "3_jackson_1.wav"


def test_manifest_splits_as_datasets_spell_them(tmp_path):
    # Hugging Face's "validation", "training", "testing", any case: the same three splits.
    rows = [
        (f"{d}_jackson_{i}.wav", str(d), s)
        for d in (3, 4)
        for i, s in [
            (10, "Training"),
            (11, "train"),
            (12, "validation"),
            (13, "valid"),
            (1, "Testing "),
        ]
    ]
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], rows)
    index = split_listing(index_manifest(manifest, FSDD, 0.1, 0.1), seed=0)
    assert index.counts() == {"train": 4, "val": 4, "test": 2}


def test_manifest_with_train_and_test_rows_only_holds_validation_out_of_training(tmp_path):
    rows = [
        (f"{d}_jackson_{i}.wav", str(d), s)
        for d in (3, 4)
        for i, s in [(10, "train"), (11, "train"), (12, "train"), (13, "train"), (1, "test")]
    ]
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], rows)
    index = split_listing(index_manifest(manifest, FSDD, 0.25, 0.5), seed=0)
    # val_fraction of each class's training rows; the test rows stay as written.
    assert index.counts() == {"train": 6, "val": 2, "test": 2}
    assert sorted(clip.label for clip in index.splits["val"]) == ["3", "4"]
    assert {clip.path.stem for clip in index.splits["test"]} == {"3_jackson_1", "4_jackson_1"}
    assert {int(clip.path.stem.split("_")[2]) for clip in index.splits["val"]} <= {10, 11, 12, 13}


def test_manifest_with_folds(tmp_path, manifest_rows):
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "fold"], manifest_rows)
    index = split_listing(index_manifest(manifest, FSDD, 0.1, 0.1, val_fold=2, test_fold=1), seed=0)
    assert index.counts() == {"train": 12, "val": 6, "test": 6}
    fold_of = {row[0]: row[2] for row in manifest_rows}
    assert {fold_of[clip.path.name] for clip in index.splits["test"]} == {1}
    assert {fold_of[clip.path.name] for clip in index.splits["val"]} == {2}


def test_manifest_paths_are_relative_to_the_manifest_folder(tmp_path):
    shutil.copy(fsdd_clip(5), tmp_path / "a.wav")
    shutil.copy(fsdd_clip(6), tmp_path / "b.wav")
    manifest = write_manifest(
        tmp_path / "m.csv", ["path", "label"], [("a.wav", "5"), ("b.wav", "6")]
    )
    index = split_listing(index_manifest(manifest, None, 0.0, 0.0), seed=0)
    assert {clip.path for clip in index.splits["train"]} == {tmp_path / "a.wav", tmp_path / "b.wav"}


def test_manifest_test_fold_without_fold_column_is_an_error(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label"], [("a.wav", "5")])
    with pytest.raises(DatasetError, match="fold"):
        index_manifest(manifest, None, 0.1, 0.1, test_fold=1)


def test_manifest_without_label_column_is_an_error(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", ["path", "class"], [("a.wav", "5")])
    with pytest.raises(DatasetError, match="label"):
        split_listing(index_manifest(manifest, None, 0.1, 0.1), seed=0)


# ---------------------------------------------------------------- manifests as datasets ship them

ESC50_COLUMNS = {"path": "audio/{filename}", "label": "category", "fold": "fold"}


def test_manifest_columns_map_a_shipped_header_and_fill_path_templates(tmp_path):
    root, manifest = esc50_like(tmp_path / "ESC-50-master", folds=3)
    listing = index_manifest(manifest, root, 0.0, 0.1, test_fold=2, columns=ESC50_COLUMNS)
    index = split_listing(listing, seed=0)
    assert index.classes == ["dog", "rooster"]
    assert index.counts() == {"train": 8, "val": 0, "test": 4}
    assert {clip.path for clip in index.splits["test"]} == {
        root / "audio" / f"2-{index}-A-{digit}.wav" for digit in (3, 4) for index in (11, 14)
    }
    assert all(clip.path.is_file() for split in index.splits.values() for clip in split)
    assert manifest_folds(manifest, ESC50_COLUMNS) == ["1", "2", "3"]


def test_a_path_template_may_use_several_columns(tmp_path):
    # UrbanSound8K: audio/fold{fold}/{slice_file_name}
    for fold in (1, 2):
        (tmp_path / "audio" / f"fold{fold}").mkdir(parents=True)
    rows = [("a.wav", 7, 1, "car_horn"), ("b.wav", 8, 2, "siren")]
    manifest = write_manifest(
        tmp_path / "m.csv", ["slice_file_name", "fsID", "fold", "class"], rows
    )
    columns = {"path": "audio/fold{fold}/{slice_file_name}", "label": "class", "fold": "fold"}
    listing = index_manifest(manifest, None, 0.0, 0.0, columns=columns)
    assert [(clip.path, clip.label) for clip in listing.clips] == [
        (tmp_path / "audio" / "fold1" / "a.wav", "car_horn"),
        (tmp_path / "audio" / "fold2" / "b.wav", "siren"),
    ]


@pytest.mark.parametrize(
    ("columns", "named"),
    [
        (
            {"path": "audio/{filename}", "label": "class"},
            r"data.columns.label='class' .*\['class'\]",
        ),
        ({"path": "audio/{name}", "label": "category"}, r"data.columns.path=.*\['name'\]"),
    ],
)
def test_a_column_the_header_lacks_names_the_key(tmp_path, columns, named):
    _, manifest = esc50_like(tmp_path / "ESC-50-master", folds=3)
    with pytest.raises(DatasetError, match=named + r" that the header \['filename'"):
        index_manifest(manifest, None, 0.1, 0.1, columns=columns)


def test_a_template_with_a_format_spec_is_named(tmp_path):
    _, manifest = esc50_like(tmp_path / "ESC-50-master", folds=3)
    columns = {"path": "fold{fold:02d}/{filename}", "label": "category"}
    with pytest.raises(DatasetError, match=r"data.columns.path=.*plain \{column\} fields"):
        index_manifest(manifest, None, 0.1, 0.1, columns=columns)


def test_a_shipped_header_without_columns_points_to_data_columns(tmp_path):
    _, manifest = esc50_like(tmp_path / "ESC-50-master", folds=3)
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['path', 'label'\].*data.columns"):
        index_manifest(manifest, None, 0.1, 0.1)


def test_a_test_fold_that_no_row_has_names_the_folds(tmp_path, manifest_rows):
    # Before: an empty test split, and no test metrics, without a word.
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "fold"], manifest_rows)
    with pytest.raises(
        DatasetError, match=r"no row has data.test_fold=0; its folds are 1, 2, 3, 4"
    ):
        index_manifest(manifest, FSDD, 0.1, 0.1, test_fold=0)
    with pytest.raises(DatasetError, match=r"no row has data.val_fold=fold2"):
        index_manifest(manifest, FSDD, 0.1, 0.1, test_fold=1, val_fold="fold2")


def test_one_fold_cannot_be_test_and_validation(tmp_path, manifest_rows):
    # Before: the fold went to validation and the test split was empty.
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "fold"], manifest_rows)
    with pytest.raises(
        DatasetError, match="fold 2 cannot be both data.test_fold and data.val_fold"
    ):
        index_manifest(manifest, FSDD, 0.1, 0.1, test_fold=2, val_fold=2)


# ---------------------------------------------------------------- groups (speakers, recordings)


def test_a_group_column_keeps_each_speaker_in_one_split(tmp_path):
    rows = [
        (f"{digit}_{speaker}_{index}.wav", str(digit), speaker)
        for speaker in SPEAKERS
        for digit in (0, 1)
        for index in range(10, 14)
    ]
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "group"], rows)
    for seed in range(4):
        index = split_listing(index_manifest(manifest, FSDD, 1 / 6, 1 / 6), seed=seed)
        speakers = {
            split: {clip.path.stem.split("_")[1] for clip in clips}
            for split, clips in index.splits.items()
        }
        # Each speaker's clips (of both words) sit in one split: 8 clips are a sixth.
        assert [len(speakers[split]) for split in ("train", "val", "test")] == [4, 1, 1]
        assert set.union(*speakers.values()) == set(SPEAKERS)
        assert index.counts() == {"train": 32, "val": 8, "test": 8}


def test_a_class_too_small_for_its_share_still_gives_each_split_a_clip():
    # At 0.1, round(3 * 0.1) is 0: the rare class gave no validation or test clip, and the
    # run stopped with "the val split has no clip of class(es) ['rare']".
    clips = [Clip(Path(f"common/{i}.wav"), "common") for i in range(40)]
    clips += [Clip(Path(f"rare/{i}.wav"), "rare") for i in range(3)]
    for seed in range(3):
        index = split_listing(Listing("x", clips, {"val": 0.1, "test": 0.1}), seed, str)
        labels = {split: sorted(c.label for c in found) for split, found in index.splits.items()}
        assert labels == {
            "train": ["common"] * 32 + ["rare"],
            "val": ["common"] * 4 + ["rare"],
            "test": ["common"] * 4 + ["rare"],
        }
    # Training keeps one clip of a class first: a pair has none left for the test split.
    pair = [Clip(Path(f"pair/{i}.wav"), "pair") for i in range(2)]
    # Said so, with what helps (a larger test share would not).
    with pytest.raises(
        DatasetError,
        match=r"test split \(5 clips\) has no clip of class\(es\) \['pair'\]: 'pair' has 2 in "
        r"all, fewer than the splits \(train, val, test\); add clips \(3 or more a class\), or "
        r"set data.test_fraction=0",
    ):
        split_listing(Listing("x", clips + pair, {"val": 0.1, "test": 0.1}), 0, str)


def test_rare_multi_label_sets_keep_their_shares():
    # Each label set is its own stratum; forcing one clip of every rare set out of training
    # would take a third of these clips for validation instead of a tenth.
    clips = [Clip(Path(f"{i}.wav"), f"a;t{i % 10}") for i in range(30)]
    index = split_listing(Listing("x", clips, {"val": 0.1}), 0, str, multi_label=True)
    assert index.counts() == {"train": 30, "val": 0, "test": 0}


def test_validation_carved_from_training_folds_keeps_source_recordings_together(tmp_path):
    # ESC-50: clips cut from one source recording (src_file) share a fold; the validation
    # carved from the training folds must not split them either.
    rows = [
        (f"{digit}_jackson_{index}.wav", str(digit), index // 2 % 2 + 1, f"{digit}-{index // 2}")
        for digit in (3, 4)
        for index in range(10, 26)
    ]
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "fold", "group"], rows)
    for seed in range(4):
        index = split_listing(index_manifest(manifest, FSDD, 0.25, 0.0, test_fold=2), seed=seed)
        assert index.counts() == {"train": 12, "val": 4, "test": 16}
        sources = {split: {clip.group for clip in clips} for split, clips in index.splits.items()}
        assert not sources["train"] & sources["val"]
        assert sorted(clip.label for clip in index.splits["val"]) == ["3", "3", "4", "4"]


def test_a_group_in_two_fixed_splits_is_an_error_naming_both(tmp_path):
    rows = [
        ("3_jackson_10.wav", "3", "train", "jackson"),
        ("4_jackson_10.wav", "4", "train", "jackson"),
        ("3_theo_10.wav", "3", "test", "theo"),
        ("4_jackson_1.wav", "4", "test", "jackson"),
    ]
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "split", "group"], rows)
    with pytest.raises(
        DatasetError, match=r"group 'jackson' is in train and test: .*line 2 .*line 5"
    ):
        split_listing(index_manifest(manifest, FSDD, 0.0, 0.0), seed=0)


def test_identical_audio_joins_the_groups_of_its_copies(tmp_path):
    # a.wav (speaker x) and b.wav (speaker y) are one recording: x and y must share a split.
    for name in ("a", "b"):
        shutil.copy(fsdd_clip(5, "theo"), tmp_path / f"{name}.wav")
    rows = [("a.wav", "5", "x"), ("b.wav", "5", "y")]
    for speaker in ("x", "y", "z", "w"):
        for n, digit in enumerate((5, 6, 6)):
            name = f"{speaker}{n}.wav"
            shutil.copy(fsdd_clip(digit, index=10 + len(rows)), tmp_path / name)
            rows.append((name, str(digit), speaker))
    manifest = write_manifest(tmp_path / "m.csv", ["path", "label", "group"], rows)
    for seed in range(6):
        index = split_listing(index_manifest(manifest, None, 0.25, 0.0), seed=seed)
        split_of = {clip.group: split for split, clips in index.splits.items() for clip in clips}
        assert split_of["x"] == split_of["y"]


# ---------------------------------------------------------------- FSD50K


def test_fsd50k_reads_both_ground_truth_files_as_shipped(tmp_path):
    root = fsd50k_like(tmp_path / "FSD50K")
    index = split_listing(index_fsd50k(root), seed=0, multi_label=True)
    assert index.classes == ["One", "Speech", "Two"]
    assert index.counts() == {"train": 8, "val": 4, "test": 4}
    assert {clip.path.parent.name for clip in index.splits["test"]} == {"FSD50K.eval_audio"}
    assert {clip.label for clip in index.splits["train"]} == {"One;Speech", "Speech;Two"}
    assert all(clip.path.is_file() for split in index.splits.values() for clip in split)


def test_fsd50k_rows_are_checked(tmp_path):
    root = fsd50k_like(tmp_path / "FSD50K")
    dev = root / "FSD50K.ground_truth" / "dev.csv"
    with dev.open("a") as handle:
        handle.write('1099,"",/m/x,train\n')
    with pytest.raises(DatasetError, match=r"dev.csv, line 14: empty fname or labels"):
        index_fsd50k(root)
    dev.write_text("fname,labels,mids,split\n1010,One,/m/x,dev\n")
    with pytest.raises(DatasetError, match=r"dev.csv, line 2: split 'dev' is not train or val"):
        index_fsd50k(root)
    dev.write_text("fname,labels\n1010,One\n")
    with pytest.raises(DatasetError, match=r"dev.csv, line 1: header .* lacks \['split'\]"):
        index_fsd50k(root)
