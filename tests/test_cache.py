"""The feature cache: hits, misses, invalidation, corrupt entries, other processes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from audioclf.cache import FeatureCache
from audioclf.dataset import Clip, SpectrogramDataset, prepare
from audioclf.features import resolve_params
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
