"""Audio conversion, bad files, items and loaders."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from audioclf.audio import BadAudioError, fix_length, load_audio, load_crop
from audioclf.augment import AudioAugment, SpecAugment
from audioclf.cache import FeatureCache
from audioclf.dataset import SpectrogramDataset, prepare
from audioclf.features import resolve_params
from audioclf.index import Clip
from audioclf.loading import make_loader
from conftest import fsdd_clip, write_wav


def _dataset(tmp_path, clips, classes, **kwargs) -> SpectrogramDataset:
    return SpectrogramDataset(
        clips=clips,
        classes=classes,
        sample_rate=8000,
        clip_seconds=0.5,
        feature_params=resolve_params("librosa", 8000),
        cache=FeatureCache(tmp_path / "cache"),
        **kwargs,
    )


# ---------------------------------------------------------------- audio conversion


@pytest.mark.parametrize(
    ("channels", "subtype", "rate"),
    [(2, "PCM_16", 8000), (1, "PCM_24", 8000), (1, "FLOAT", 8000), (1, "PCM_16", 22050)],
    ids=["stereo", "24-bit", "float", "22.05kHz"],
)
def test_any_format_is_converted_to_mono_float_at_the_target_rate(
    tmp_path, channels, subtype, rate
):
    seconds = np.arange(rate // 2) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * seconds)
    samples = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    path = write_wav(tmp_path / "a.wav", samples, rate, subtype)
    waveform = load_audio(path, 8000)
    assert waveform.dtype == np.float32
    assert waveform.ndim == 1
    assert abs(len(waveform) - 4000) <= 1
    assert 0.45 < np.abs(waveform).max() < 0.55


def test_evaluation_crop_is_centred_and_padding_is_even():
    assert fix_length(np.arange(10.0), 4).tolist() == [3, 4, 5, 6]
    assert fix_length(np.ones(2), 6).tolist() == [0, 0, 1, 1, 0, 0]


@pytest.mark.parametrize(
    ("channels", "rate", "fmt", "seconds", "whole"),
    [
        (2, 44100, "wav", 6.0, False),
        (1, 8000, "flac", 6.0, False),
        (1, 22050, "ogg", 6.0, True),  # no exact seeking
        (1, 22050, "wav", 0.8, True),  # shorter than two crops
    ],
    ids=["stereo 44.1 kHz wav", "8 kHz flac", "ogg", "short wav"],
)
def test_a_random_crop_of_a_long_file_decodes_only_its_part(
    tmp_path, monkeypatch, channels, rate, fmt, seconds, whole
):
    # Augmented training decoded and resampled the whole file for each crop (37 ms for 30 s of
    # stereo 44.1 kHz audio, where the part a 1 s crop needs takes 1.5 ms).
    from audioclf import audio

    noise = np.random.default_rng(0).standard_normal((round(seconds * rate), channels)) * 0.1
    path = write_wav(tmp_path / f"a.{fmt}", noise, rate, "VORBIS" if fmt == "ogg" else "PCM_16")
    reference = load_audio(path, 8000)
    decoded_whole = []
    monkeypatch.setattr(audio, "load_audio", lambda *a: decoded_whole.append(1) or load_audio(*a))
    for seed in range(5):
        crop = load_crop(path, 8000, 4000, np.random.default_rng(seed))
        expected = fix_length(reference, 4000, np.random.default_rng(seed))
        np.testing.assert_allclose(crop, expected, atol=1e-6)
    assert bool(decoded_whole) is whole
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 3)
    with pytest.raises(BadAudioError, match="corrupt.wav"):
        load_crop(corrupt, 8000, 4000, np.random.default_rng(0))
    # A file that went bad after the check at start: an error naming it, not a crash.
    if not whole:

        def gone(*args, **kwargs):
            raise OSError("gone")

        monkeypatch.setattr(audio.sf.SoundFile, "read", gone)
        with pytest.raises(BadAudioError, match=r"a\.\w+: cannot decode audio \(gone\)"):
            load_crop(path, 8000, 4000, np.random.default_rng(0))


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "corrupt": tmp_path / "corrupt.wav",
        "empty": tmp_path / "empty.wav",
        "missing": tmp_path / "missing.wav",
    }
    files["corrupt"].write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 3)
    files["empty"].write_bytes(b"")
    files["zero-length"] = write_wav(tmp_path / "zero.wav", np.zeros(0), 8000)
    nan = np.full(800, np.nan, dtype=np.float32)
    files["non-finite"] = write_wav(tmp_path / "nan.wav", nan, 8000, "FLOAT")
    return files


@pytest.mark.parametrize("kind", ["corrupt", "empty", "missing", "zero-length", "non-finite"])
def test_bad_file_stops_with_its_path_in_error_mode(tmp_path, kind):
    bad = _bad_files(tmp_path)[kind]
    dataset = _dataset(tmp_path, [Clip(fsdd_clip(0), "0"), Clip(bad, "0")], ["0"])
    with pytest.raises(BadAudioError, match=bad.name):
        prepare(dataset, "error")


def test_bad_files_are_skipped_and_counted_in_skip_mode(tmp_path, caplog):
    bad = _bad_files(tmp_path)
    good = [Clip(fsdd_clip(digit), "0") for digit in (0, 1)]
    dataset = _dataset(tmp_path, good + [Clip(path, "0") for path in bad.values()], ["0"])
    report = prepare(dataset, "skip")
    assert len(report.bad_files) == len(bad)
    assert dataset.clips == good
    for path in bad.values():
        assert caplog.text.count(str(path)) == 1


# ---------------------------------------------------------------- items


def test_evaluation_items_are_deterministic_with_the_clip_shape(tmp_path):
    dataset = _dataset(tmp_path, [Clip(fsdd_clip(3), "3")], ["3"])
    features, label = dataset[0]
    assert features.shape == dataset.feature_shape == (1, 51, 64)
    assert label == 0
    torch.testing.assert_close(features, dataset[0][0])


def test_training_items_are_random_crops_of_the_cached_clip(tmp_path):
    long_clip = tmp_path / "long.wav"
    write_wav(long_clip, np.random.default_rng(0).standard_normal(16000) * 0.1, 8000)
    dataset = _dataset(tmp_path, [Clip(long_clip, "a")], ["a"], training=True)
    crops = {dataset[0][0].sum().item() for _ in range(8)}
    assert dataset[0][0].shape == dataset.feature_shape
    assert len(crops) > 1
    _, hit = dataset.cached_features(0)
    assert hit


def test_audio_augmentation_bypasses_the_cache(tmp_path):
    augment = AudioAugment([{"name": "gain", "p": 1.0, "min_gain_db": -12, "max_gain_db": 12}])
    dataset = _dataset(
        tmp_path, [Clip(fsdd_clip(4), "4")], ["4"], training=True, audio_augment=augment
    )
    first, second = dataset[0][0], dataset[0][0]
    assert first.shape == dataset.feature_shape
    assert not torch.equal(first, second)
    assert len(dataset.cache._cache) == 0


def test_spec_augment_applies_in_training_only(tmp_path):
    masks = SpecAugment(time_masks=2, time_mask_max_frames=20, freq_masks=0, mask_value=-123.0)
    clips = [Clip(fsdd_clip(5), "5")]
    evaluation = _dataset(tmp_path, clips, ["5"], spec_augment=masks)
    training = _dataset(tmp_path, clips, ["5"], training=True, spec_augment=masks)
    assert not (evaluation[0][0] == -123.0).any()
    assert any((training[0][0] == -123.0).any() for _ in range(10))


# ---------------------------------------------------------------- loader


def _augmenting_dataset(tmp_path) -> SpectrogramDataset:
    augment = AudioAugment([{"name": "gaussian_noise", "p": 1.0}])
    clips = [Clip(fsdd_clip(d, index=i), str(d)) for d in (0, 1) for i in range(10, 14)]
    return _dataset(
        tmp_path,
        clips,
        ["0", "1"],
        training=True,
        audio_augment=augment,
        spec_augment=SpecAugment(),
    )


def _epoch(loader) -> list[torch.Tensor]:
    return [features for features, _ in loader]


def test_loader_with_workers_repeats_exactly_under_the_same_seed_with_jax_running(tmp_path):
    dataset = _augmenting_dataset(tmp_path)
    first = _epoch(make_loader(dataset, 4, shuffle=True, num_workers=2, seed=7))
    other = _epoch(make_loader(dataset, 4, shuffle=True, num_workers=2, seed=8))
    # A TFLite conversion starts JAX's threads; a fold loop or a sweep then builds its next
    # loaders in the same process, and forking beside those threads can deadlock.
    jax = importlib.util.find_spec("jax") is not None  # with the tflite extra
    if jax:
        importlib.import_module("jax").devices()  # JAX's runtime and its threads start here
    loader = make_loader(dataset, 4, shuffle=True, num_workers=2, seed=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _epoch(loader)
    assert not [warning for warning in caught if "fork" in str(warning.message)]
    if jax:
        assert loader.multiprocessing_context.get_start_method() == "spawn"
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_loader_workers_draw_different_randomness(tmp_path):
    dataset = _augmenting_dataset(tmp_path)
    dataset.clips = [dataset.clips[0]] * 4
    batches = _epoch(make_loader(dataset, 2, shuffle=False, num_workers=2, seed=0))
    assert not torch.equal(batches[0], batches[1])


def test_loader_batches_have_the_model_input_shape(tmp_path):
    dataset = _augmenting_dataset(tmp_path)
    features, labels = next(iter(make_loader(dataset, 4, shuffle=False)))
    assert features.shape == (4, *dataset.feature_shape)
    assert labels.tolist() == [0, 0, 0, 0]
