"""The feature cache: hits, misses, invalidation, corrupt entries, other processes; and the
feature store that prepare() builds from it."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest

from audioclf.cache import FeatureCache
from audioclf.dataset import SpectrogramDataset, prepare
from audioclf.features import resolve_params
from audioclf.index import Clip
from audioclf.loading import make_loader
from conftest import fsdd_clip


def _dataset(tmp_path, files, enabled=True, **feature_overrides) -> SpectrogramDataset:
    return SpectrogramDataset(
        clips=[Clip(path, "0") for path in files],
        classes=["0"],
        sample_rate=8000,
        clip_seconds=0.5,
        feature_params=resolve_params("librosa", 8000, **feature_overrides),
        cache=FeatureCache(tmp_path / "cache", enabled=enabled),
    )


@pytest.fixture
def clip_files(tmp_path):
    files = []
    for digit in (0, 1, 2):
        target = tmp_path / "audio" / f"{digit}.wav"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(fsdd_clip(digit), target)
        files.append(target)
    return files


def test_first_access_misses_and_second_hits(tmp_path, clip_files):
    dataset = _dataset(tmp_path, clip_files)
    first, hit_first = dataset.cached_features(0)
    second, hit_second = dataset.cached_features(0)
    assert (hit_first, hit_second) == (False, True)
    np.testing.assert_array_equal(first, second)


def test_a_new_process_handle_reuses_entries(tmp_path, clip_files):
    assert prepare(_dataset(tmp_path, clip_files)).computed == len(clip_files)
    report = prepare(_dataset(tmp_path, clip_files), num_workers=2)
    assert (report.cache_hits, report.computed) == (len(clip_files), 0)


def test_editing_the_file_recomputes(tmp_path, clip_files):
    dataset = _dataset(tmp_path, clip_files)
    before, _ = dataset.cached_features(0)
    shutil.copy(fsdd_clip(7), clip_files[0])
    after, hit = dataset.cached_features(0)
    assert not hit
    assert not np.array_equal(before, after)


def test_changing_a_feature_parameter_recomputes(tmp_path, clip_files):
    _dataset(tmp_path, clip_files).cached_features(0)
    features, hit = _dataset(tmp_path, clip_files, n_mels=32).cached_features(0)
    assert not hit
    assert features.shape[1] == 32


def test_changing_the_clip_length_recomputes(tmp_path, clip_files):
    _dataset(tmp_path, clip_files).cached_features(0)
    longer = _dataset(tmp_path, clip_files)
    longer.clip_seconds = 1.0
    _, hit = longer.cached_features(0)
    assert not hit


def test_same_content_under_another_name_hits(tmp_path, clip_files):
    _dataset(tmp_path, clip_files).cached_features(0)
    renamed = tmp_path / "audio" / "renamed.wav"
    os.rename(clip_files[0], renamed)
    _, hit = _dataset(tmp_path, [renamed]).cached_features(0)
    assert hit


def test_corrupt_entry_is_recomputed_and_rewritten(tmp_path, clip_files, caplog):
    dataset = _dataset(tmp_path, clip_files)
    good, _ = dataset.cached_features(0)
    handle = dataset.cache._cache
    for key in list(handle):
        value = handle[key]
        handle[key] = value[:-7] + b"garbage"
    features, hit = dataset.cached_features(0)
    assert not hit
    np.testing.assert_array_equal(features, good)
    assert "unreadable" in caplog.text
    _, hit = dataset.cached_features(0)
    assert hit


def test_entry_of_the_wrong_type_is_recomputed(tmp_path, clip_files):
    dataset = _dataset(tmp_path, clip_files)
    dataset.cached_features(0)
    handle = dataset.cache._cache
    for key in list(handle):
        handle[key] = 12345
    _, hit = dataset.cached_features(0)
    assert not hit


def test_disabled_cache_writes_nothing(tmp_path, clip_files):
    dataset = _dataset(tmp_path, clip_files, enabled=False)
    dataset.cached_features(0)
    _, hit = dataset.cached_features(0)
    assert not hit
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- the feature store


def _expected(tmp_path, files, **feature_overrides) -> list[np.ndarray]:
    """Features computed with no cache at all."""
    reference = _dataset(tmp_path / "reference", files, enabled=False, **feature_overrides)
    return [reference.features(index) for index in range(len(reference))]


def _store_files(tmp_path, suffix: str) -> list:
    return sorted((tmp_path / "cache" / "stores").glob(f"*{suffix}"))


def test_prepare_attaches_a_store_that_serves_the_same_features(tmp_path, clip_files):
    dataset = _dataset(tmp_path, clip_files)
    prepare(dataset)
    assert dataset.reads_from_store
    for index, expected in enumerate(_expected(tmp_path, clip_files)):
        np.testing.assert_array_equal(dataset.features(index), expected)


def test_a_new_run_opens_the_store_without_reading_cache_entries(tmp_path, clip_files, monkeypatch):
    prepare(_dataset(tmp_path, clip_files))
    again = _dataset(tmp_path, clip_files)
    monkeypatch.setattr(FeatureCache, "get", lambda *_: pytest.fail("read a cache entry"))
    report = prepare(again)
    assert (report.cache_hits, report.computed) == (len(clip_files), 0)
    assert again.reads_from_store


def test_editing_a_file_builds_a_new_store_with_its_features(tmp_path, clip_files):
    prepare(_dataset(tmp_path, clip_files))
    shutil.copy(fsdd_clip(7), clip_files[0])
    edited = _dataset(tmp_path, clip_files)
    report = prepare(edited)
    assert (report.cache_hits, report.computed) == (2, 1)
    np.testing.assert_array_equal(edited.features(0), _expected(tmp_path, clip_files)[0])
    assert len(_store_files(tmp_path, ".json")) == 2


def test_changing_a_feature_parameter_builds_a_new_store(tmp_path, clip_files):
    prepare(_dataset(tmp_path, clip_files))
    narrower = _dataset(tmp_path, clip_files, n_mels=32)
    assert prepare(narrower).computed == len(clip_files)
    assert narrower.features(0).shape[1] == 32


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_damaged_store_is_logged_and_rebuilt(tmp_path, clip_files, caplog, damage):
    prepare(_dataset(tmp_path, clip_files))
    (array_file,) = _store_files(tmp_path, ".f32")
    data = bytearray(array_file.read_bytes())
    if damage == "flipped byte":
        data[100] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    array_file.write_bytes(bytes(data))
    again = _dataset(tmp_path, clip_files)
    prepare(again)
    assert "unreadable" in caplog.text
    assert again.reads_from_store
    np.testing.assert_array_equal(again.features(0), _expected(tmp_path, clip_files)[0])


def test_store_without_its_index_file_is_incomplete_and_rebuilt(tmp_path, clip_files):
    prepare(_dataset(tmp_path, clip_files))
    (index_file,) = _store_files(tmp_path, ".json")
    index_file.unlink()
    again = _dataset(tmp_path, clip_files)
    prepare(again)
    assert again.reads_from_store
    assert len(_store_files(tmp_path, ".json")) == 1


def test_training_items_are_random_windows_of_the_stored_clip(tmp_path, clip_files):
    dataset = _dataset(tmp_path, clip_files)
    dataset.training = True
    dataset.clip_seconds = 0.25  # shorter than the clips: windows start anywhere along them
    prepare(dataset)
    assert dataset.reads_from_store
    whole = dataset.store[0]
    frames = dataset.feature_shape[1]
    starts = set()
    for _ in range(8):
        item = dataset.features(0)
        matches = [
            s for s in range(len(whole) - frames + 1) if np.array_equal(whole[s : s + frames], item)
        ]
        assert matches
        starts.add(matches[0])
    assert len(starts) > 1


def test_store_covers_the_clips_left_after_skipping_a_bad_file(tmp_path, clip_files):
    broken = tmp_path / "audio" / "broken.wav"
    broken.write_bytes(b"not audio")
    dataset = _dataset(tmp_path, [clip_files[0], broken, *clip_files[1:]])
    prepare(dataset, "skip")
    assert len(dataset.store) == len(dataset.clips) == len(clip_files)
    for index, expected in enumerate(_expected(tmp_path, clip_files)):
        np.testing.assert_array_equal(dataset.features(index), expected)


def test_loader_over_a_stored_dataset_runs_in_this_process(tmp_path, clip_files):
    dataset = _dataset(tmp_path, clip_files)
    prepare(dataset)
    loader = make_loader(dataset, batch_size=2, shuffle=False, num_workers=2)
    assert loader.num_workers == 0
    features, labels = next(iter(loader))
    np.testing.assert_array_equal(features[1, 0].numpy(), _expected(tmp_path, clip_files)[1])


def test_stored_dataset_survives_pickling_for_worker_processes(tmp_path, clip_files):
    dataset = _dataset(tmp_path, clip_files)
    prepare(dataset)
    copy = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(copy.features(2), dataset.features(2))


def test_disabled_cache_builds_no_store(tmp_path, clip_files):
    dataset = _dataset(tmp_path, clip_files, enabled=False)
    prepare(dataset)
    assert not dataset.reads_from_store
    assert not (tmp_path / "cache").exists()


def test_a_batch_read_from_the_store_equals_its_items_read_one_by_one(tmp_path, clip_files):
    dataset = _dataset(tmp_path, clip_files)
    prepare(dataset)
    assert dataset.store.stacked is not None
    batch = dataset.__getitems__([2, 0])
    for (features, label), index in zip(batch, [2, 0], strict=True):
        expected_features, expected_label = dataset[index]
        assert features.shape == expected_features.shape == (1, *dataset.feature_shape[1:])
        np.testing.assert_array_equal(features.numpy(), expected_features.numpy())
        assert label == expected_label
