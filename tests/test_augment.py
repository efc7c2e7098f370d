"""Audio transforms from config lists, and SpecAugment masks within their bounds."""

from __future__ import annotations

import numpy as np
import pytest

from audioclf.augment import TRANSFORM_NAMES, AudioAugment, SpecAugment
from conftest import fsdd_clip


@pytest.mark.parametrize("name", sorted(TRANSFORM_NAMES))
def test_every_short_name_builds_and_keeps_the_length(name):
    augment = AudioAugment([{"name": name, "p": 1.0}])
    waveform = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    augmented = augment(waveform, 8000)
    assert augmented.shape == waveform.shape
    assert augmented.dtype == np.float32
    assert not np.array_equal(augmented, waveform)


def test_audiomentations_class_names_work_too():
    assert type(AudioAugment([{"name": "PolarityInversion", "p": 1.0}]).transforms[0]).__name__ == (
        "PolarityInversion"
    )


def test_transforms_with_zero_probability_are_left_out():
    augment = AudioAugment([{"name": "gain", "p": 0.0}, {"name": "time_shift", "p": 0.5}])
    assert [type(t).__name__ for t in augment.transforms] == ["Shift"]
    assert not AudioAugment([{"name": "gain", "p": 0.0}]).active


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "reverse_time_twice", "p": 1.0}, "unknown transform"),
        ({"p": 1.0}, "no 'name'"),
        ({"name": "gain"}, "no 'p'"),
        ({"name": "gain", "p": 1.0, "gain_db": 3}, r"\.gain_db: no such argument of Gain \(Gain"),
        # The close argument named, as for config keys (was Python's "unexpected keyword").
        (
            {"name": "gain", "p": 1.0, "min_gain": -3},
            r"\.min_gain: no such argument of Gain; did you mean .*\[1\]\.min_gain_db\? "
            r"\(Gain takes min_gain_db, max_gain_db, p\)",
        ),
        # audiomentations asserts these: a bare AssertionError and a traceback, before.
        ({"name": "gain", "p": 1.5}, r"\.p \(gain\) must be a probability in \[0, 1\], not 1.5"),
        ({"name": "gain", "p": "often"}, "must be a probability"),
        ({"name": "gain", "p": 0.5, "min_gain_db": 6, "max_gain_db": -6}, "bad arguments"),
    ],
)
def test_bad_transform_entries_name_their_index(spec, message):
    with pytest.raises(ValueError, match=rf"transforms\[1\].*{message}|{message}.*transforms\[1\]"):
        AudioAugment([{"name": "gain", "p": 0.5}, spec])


def test_sound_paths_that_hold_no_audio_are_named(tmp_path):
    # audiomentations finds no file in a path that does not exist and stops on a bare assert.
    (tmp_path / "notes.txt").write_text("not audio")
    clip = fsdd_clip(3)
    for value, message in (
        (tmp_path / "nope", r"\.sounds_path: no such file or folder '.*nope'"),
        ([clip, tmp_path / "nope"], r"\.sounds_path: no such file or folder '.*nope'"),
        (tmp_path, r"\.sounds_path: no audio files in \['.*'\]"),
    ):
        spec = {"name": "AddBackgroundNoise", "p": 1.0, "sounds_path": value}
        with pytest.raises(ValueError, match=rf"^augmentations\.audio\.transforms\[1\]{message}"):
            AudioAugment([{"name": "gain", "p": 0.5}, spec])
    spec = {"name": "AddBackgroundNoise", "p": 1.0, "sounds_path": [str(clip)]}
    assert AudioAugment([spec]).transforms[0].sound_file_paths == [str(clip)]


def _masked_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, width) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return [(start, end - start) for start, end in zip(edges[::2], edges[1::2], strict=True)]


@pytest.mark.parametrize("seed", range(20))
def test_spec_augment_masks_stay_within_their_bounds(seed):
    augment = SpecAugment(
        time_masks=1, time_mask_max_frames=7, freq_masks=1, freq_mask_max_bins=5, mask_value=-1.0
    )
    features = np.random.default_rng(100 + seed).uniform(0, 1, (50, 20)).astype(np.float32)
    masked = augment(features, np.random.default_rng(seed))
    changed = masked != features
    assert np.all(masked[changed] == -1.0)
    full_rows = changed.all(axis=1)
    full_columns = changed.all(axis=0)
    assert all(width <= 7 for _, width in _masked_runs(full_rows))
    assert all(width <= 5 for _, width in _masked_runs(full_columns))
    assert np.array_equal(changed, full_rows[:, None] | full_columns[None, :])


def test_spec_augment_masks_count_and_fill_with_the_mean():
    augment = SpecAugment(time_masks=3, time_mask_max_frames=2, freq_masks=0)
    features = np.arange(40 * 8, dtype=np.float32).reshape(40, 8)
    widths = []
    for seed in range(30):
        masked = augment(features, np.random.default_rng(seed))
        rows = (masked != features).any(axis=1)
        assert np.allclose(masked[rows], features.mean())
        widths.append(rows.sum())
    assert max(widths) <= 3 * 2
    assert max(widths) > 0


def test_spec_augment_leaves_its_input_untouched():
    features = np.zeros((10, 4), np.float32) + 1
    SpecAugment(mask_value=0.0)(features, np.random.default_rng(0))
    assert (features == 1).all()
