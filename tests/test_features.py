"""Log-mel presets against TensorFlow goldens, an independent PANNs recipe and librosa."""

from __future__ import annotations

import json

import librosa
import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from audioclf import features
from audioclf.features import PRESETS, compute_log_mel, num_frames, resolve_params
from conftest import TEST_DATA

GOLDENS = TEST_DATA / "tf_logmel"
METADATA = json.loads((GOLDENS / "metadata.json").read_text())
CLIPS = [(clip, preset) for clip in METADATA["clips"] for preset in clip["outputs"]]
FSDD_CLIP_TOLERANCE = {"tf_yamnet_style": 1e-4, "tf_power_db": 2e-3}


def _golden(clip: dict, preset: str) -> tuple[np.ndarray, np.ndarray]:
    wave = np.load(GOLDENS / clip["wave_file"])
    return wave, np.load(GOLDENS / clip["outputs"][preset]["file"])


@pytest.mark.parametrize(
    ("clip", "preset"), CLIPS, ids=lambda value: value["name"] if isinstance(value, dict) else value
)
def test_tf_preset_matches_tensorflow_golden(clip, preset):
    wave, golden = _golden(clip, preset)
    ours = compute_log_mel(wave, clip["sample_rate"], preset)
    assert ours.dtype == np.float32
    assert ours.shape == golden.shape
    # The README's floors: below them TF's float32 noise dominates and no exact match exists.
    if preset == "tf_power_db":
        reliable = golden >= golden.max() - 80.0
    else:
        reliable = golden > np.log(0.001) + 1.0
    assert np.abs(ours - golden)[reliable].max() <= 2e-3
    if clip["source"].startswith("FSDD"):
        assert np.abs(ours - golden).max() <= FSDD_CLIP_TOLERANCE[preset]


@pytest.mark.parametrize(("clip", "preset"), CLIPS[:2], ids=["yamnet", "power_db"])
def test_tf_preset_parameters_match_the_reference_record(clip, preset):
    params = resolve_params(preset, clip["sample_rate"])
    record = clip["outputs"][preset]["params"]
    assert params.frame_length == record["frame_length"]
    assert params.hop_length == record["frame_step"]
    assert params.n_fft == record["fft_length"]
    assert params.power == record["magnitude_power"]
    assert (params.fmin_hz, params.fmax_hz) == (
        record["lower_edge_hertz"],
        record["upper_edge_hertz"],
    )


def _torchlibrosa_recipe(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """PANNs' front end written out in NumPy: reflect-padded centred frames, periodic Hann,
    |rfft|^2, librosa's Slaney mel (what torchlibrosa calls), 10*log10(max(x, 1e-10))."""
    n_fft, hop = 1024, 320
    padded = np.pad(wave.astype(np.float64), n_fft // 2, mode="reflect")
    count = 1 + (len(padded) - n_fft) // hop
    frames = np.stack([padded[i * hop : i * hop + n_fft] for i in range(count)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel_basis = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=64, fmin=50, fmax=14000)
    return 10.0 * np.log10(np.maximum(power @ mel_basis.T, 1e-10))


def test_panns_preset_matches_the_torchlibrosa_recipe():
    rng = np.random.default_rng(3)
    seconds = np.arange(32000) / 32000
    wave = 0.3 * np.sin(2 * np.pi * 440 * seconds) + 0.05 * rng.standard_normal(32000)
    ours = compute_log_mel(wave.astype(np.float32), 32000, "panns")
    expected = _torchlibrosa_recipe(wave.astype(np.float32), 32000)
    assert ours.shape == expected.shape == (101, 64)
    np.testing.assert_allclose(ours, expected, atol=1e-3)


def test_panns_preset_has_the_documented_parameters():
    params = resolve_params("panns", 32000)
    assert (params.frame_length, params.hop_length, params.n_fft) == (1024, 320, 1024)
    assert (params.fmin_hz, params.fmax_hz, params.n_mels) == (50.0, 14000.0, 64)
    assert (params.center, params.pad_mode, params.top_db) == (True, "reflect", None)


def test_librosa_preset_equals_librosa_melspectrogram_and_power_to_db():
    wave = np.load(GOLDENS / "synthetic_chirp.wave.npy")
    mel = librosa.feature.melspectrogram(
        y=wave.astype(np.float64), sr=16000, n_fft=512, hop_length=160, win_length=400, n_mels=64
    )
    expected = librosa.power_to_db(mel).T
    np.testing.assert_allclose(compute_log_mel(wave, 16000, "librosa"), expected, atol=1e-4)


def test_override_replaces_one_parameter():
    wave = np.load(GOLDENS / "synthetic_noise.wave.npy")
    features = compute_log_mel(wave, 16000, "tf_yamnet_style", n_mels=40, hop_length=320)
    assert features.shape == (1 + (16000 - 400) // 320, 40)


def test_dict_preset_is_accepted():
    wave = np.load(GOLDENS / "synthetic_noise.wave.npy")
    as_dict = compute_log_mel(wave, 16000, dict(PRESETS["tf_power_db"]))
    np.testing.assert_array_equal(as_dict, compute_log_mel(wave, 16000, "tf_power_db"))


@pytest.mark.filterwarnings("ignore:n_fft=.*is too large")
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("samples", [512, 7999, 16000])
def test_frame_count_follows_the_preset_framing(preset, samples):
    wave = np.random.default_rng(0).standard_normal(samples).astype(np.float32)
    params = resolve_params(preset, 16000)
    assert compute_log_mel(wave, 16000, preset).shape == (num_frames(samples, params), 64)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="no_such_preset"):
        compute_log_mel(np.zeros(1000), 16000, "no_such_preset")


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="n_melz"):
        compute_log_mel(np.zeros(1000), 16000, "librosa", n_melz=10)


def test_stereo_input_is_rejected():
    with pytest.raises(ValueError, match="mono"):
        compute_log_mel(np.zeros((2, 1000)), 16000, "librosa")


def test_frame_longer_than_the_fft_asks_for_a_larger_n_fft():
    with pytest.raises(ValueError, match="override n_fft"):
        compute_log_mel(np.zeros(32000), 32000, "tf_yamnet_style")
    assert compute_log_mel(np.zeros(32000), 32000, "tf_yamnet_style", n_fft=1024).shape[1] == 64


def test_mel_bands_without_an_fft_bin_are_said_once_naming_the_keys(caplog, recwarn):
    # librosa warned in every process that built the matrix (each loader worker), five
    # times in one run, and the keys to change were not named.
    features._warn_empty_bands.cache_clear()
    for _ in range(3):
        wide = compute_log_mel(np.ones(8000, np.float32), 8000, "librosa", n_mels=256)
    assert features.empty_mel_bands(resolve_params("librosa", 8000, n_mels=256)) == 58
    assert (wide == wide.min()).all(axis=0).sum() >= 58  # constant bands
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [
        "log-mel: 58 of 256 mel bands get no FFT bin (n_fft=256 at 8000 Hz: bins 31.2 Hz "
        "apart), so they are constant; lower n_mels or raise n_fft (features.n_mels, "
        "features.n_fft)"
    ]
    assert not [w for w in recwarn if "Empty filters" in str(w.message)]
    # The presets are quiet at common rates, except where TensorFlow has such a band too.
    assert features.empty_mel_bands(resolve_params("librosa", 8000)) == 0
    assert features.empty_mel_bands(resolve_params("tf_power_db", 44100)) == 1


def test_the_mel_projection_runs_numpys_blas_on_one_thread(monkeypatch):
    """OpenBLAS threads it otherwise, and they took cores from torch's in training."""

    def blas_threads():
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]

    seen = []

    class Filterbank(np.ndarray):
        def __matmul__(self, other):
            seen.append(blas_threads())
            return np.asarray(self) @ other

    real = features.mel_matrix
    monkeypatch.setattr(features, "mel_matrix", lambda params: real(params).view(Filterbank))
    waveform = np.random.default_rng(0).standard_normal(8000) * 0.1
    with threadpool_limits(limits=2, user_api="blas"):  # 2 where the machine has 2 cores
        before = blas_threads()
        compute_log_mel(waveform, 8000, "librosa")
        after = blas_threads()
    assert seen == [[1] * len(before)]
    assert after == before  # the caller's setting is back
