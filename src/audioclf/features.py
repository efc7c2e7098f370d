"""Log-mel front ends: librosa's, TensorFlow tf.signal's and PANNs' (torchlibrosa's).

Public API: `compute_log_mel(waveform, sample_rate, preset, **overrides)`.
A preset is a set of parameters; the frame sizes of a preset given in seconds scale with the
sample rate the way the TF reference (`make_reference.py`) scales them: `int(seconds * rate)`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import librosa
import numpy as np
from threadpoolctl import ThreadpoolController

log = logging.getLogger(__name__)

# Bump when the feature code changes what it computes: every cached feature is then recomputed.
FEATURE_CODE_VERSION = 1

MEL_SCALES = ("slaney", "htk", "tf")
LOG_KINDS = ("db", "log_offset", "none")
PAD_MODES = ("constant", "reflect")

PRESETS: dict[str, dict[str, Any]] = {
    # librosa.feature.melspectrogram + librosa.power_to_db with their defaults, 25 ms / 10 ms.
    "librosa": {
        "frame_seconds": 0.025,
        "hop_seconds": 0.010,
        "n_fft": None,
        "n_mels": 64,
        "fmin_hz": 0.0,
        "fmax_hz": None,
        "center": True,
        "pad_mode": "constant",
        "power": 2.0,
        "mel_scale": "slaney",
        "log": "db",
        "amin": 1e-10,
        "top_db": 80.0,
    },
    # tf.signal.stft (no centring) + linear_to_mel_weight_matrix + log(mel + 0.001).
    "tf_yamnet_style": {
        "frame_seconds": 0.025,
        "hop_seconds": 0.010,
        "n_fft": 512,
        "n_mels": 64,
        "fmin_hz": 125.0,
        "fmax_hz": 7500.0,
        "center": False,
        "power": 1.0,
        "mel_scale": "tf",
        "log": "log_offset",
        "log_offset": 0.001,
    },
    # tf.signal.stft power spectrogram + TF mel + 10 * log10(max(mel, 1e-10)).
    "tf_power_db": {
        "frame_length": 512,
        "hop_seconds": 0.010,
        "n_fft": 512,
        "n_mels": 64,
        "fmin_hz": 0.0,
        "fmax_hz": None,
        "center": False,
        "power": 2.0,
        "mel_scale": "tf",
        "log": "db",
        "amin": 1e-10,
        "top_db": None,
    },
    # torchlibrosa Spectrogram + LogmelFilterBank as PANNs builds them (at 32 kHz: 1024 / 320).
    "panns": {
        "frame_seconds": 0.032,
        "hop_seconds": 0.010,
        "n_fft": None,
        "n_mels": 64,
        "fmin_hz": 50.0,
        "fmax_hz": 14000.0,
        "center": True,
        "pad_mode": "reflect",
        "power": 2.0,
        "mel_scale": "slaney",
        "log": "db",
        "amin": 1e-10,
        "top_db": None,
    },
}


@dataclass(frozen=True)
class LogMelParams:
    """Every parameter of a log-mel computation, in samples and Hz at one sample rate."""

    sample_rate: int
    frame_length: int
    hop_length: int
    n_fft: int
    n_mels: int
    fmin_hz: float
    fmax_hz: float
    center: bool
    pad_mode: str
    power: float
    mel_scale: str
    log: str
    amin: float
    top_db: float | None
    log_offset: float

    def as_dict(self) -> dict[str, Any]:
        """Plain dict, e.g. for a cache key."""
        return asdict(self)


PARAMETER_NAMES = frozenset(
    {
        "frame_seconds",
        "frame_length",
        "hop_seconds",
        "hop_length",
        "n_fft",
        "n_mels",
        "fmin_hz",
        "fmax_hz",
        "center",
        "pad_mode",
        "power",
        "mel_scale",
        "log",
        "amin",
        "top_db",
        "log_offset",
    }
)
_DEFAULTS = {
    "n_fft": None,
    "fmin_hz": 0.0,
    "fmax_hz": None,
    "pad_mode": "constant",
    "amin": 1e-10,
    "top_db": None,
    "log_offset": 0.001,
}


def _samples(seconds: float, sample_rate: int) -> int:
    # int() as in the TF reference; the epsilon keeps 0.01 * 16000 = 159.99999... at 160.
    return int(seconds * sample_rate + 1e-9)


def resolve_params(
    preset: str | Mapping[str, Any], sample_rate: int, **overrides: Any
) -> LogMelParams:
    """Turn a preset name or dict, plus overrides, into concrete parameters at `sample_rate`."""
    sample_rate = _check_sample_rate(sample_rate)
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown feature preset {preset!r}; known: {sorted(PRESETS)}")
        raw = dict(PRESETS[preset])
    else:
        raw = dict(preset)
    for name in ("frame_length", "hop_length"):
        # A length in samples given as an override replaces the preset's length in seconds.
        if name in overrides:
            raw.pop(name.replace("length", "seconds"), None)
    for name in ("frame_seconds", "hop_seconds"):
        if name in overrides:
            raw.pop(name.replace("seconds", "length"), None)
    raw.update(overrides)
    unknown = set(raw) - PARAMETER_NAMES
    if unknown:
        raise ValueError(f"unknown log-mel parameter(s) {sorted(unknown)}")
    merged = {**_DEFAULTS, **raw}

    def length(name: str) -> int:
        if merged.get(f"{name}_length") is not None:
            return int(merged[f"{name}_length"])
        if merged.get(f"{name}_seconds") is not None:
            return _samples(float(merged[f"{name}_seconds"]), sample_rate)
        raise ValueError(f"log-mel parameters need {name}_length or {name}_seconds")

    for name in ("n_mels", "center", "power", "mel_scale", "log"):
        if merged.get(name) is None:
            raise ValueError(f"log-mel parameter {name!r} is missing")
    frame_length = length("frame")
    hop_length = length("hop")
    n_fft = merged["n_fft"] or 1 << (frame_length - 1).bit_length()
    nyquist = sample_rate / 2
    fmax_hz = min(float(merged["fmax_hz"] or nyquist), nyquist)
    params = LogMelParams(
        sample_rate=int(sample_rate),
        frame_length=frame_length,
        hop_length=hop_length,
        n_fft=int(n_fft),
        n_mels=int(merged["n_mels"]),
        fmin_hz=float(merged["fmin_hz"]),
        fmax_hz=fmax_hz,
        center=bool(merged["center"]),
        pad_mode=str(merged["pad_mode"]),
        power=float(merged["power"]),
        mel_scale=str(merged["mel_scale"]),
        log=str(merged["log"]),
        amin=float(merged["amin"]),
        top_db=None if merged["top_db"] is None else float(merged["top_db"]),
        log_offset=float(merged["log_offset"]),
    )
    _validate(params)
    _warn_empty_bands(params)
    return params


@functools.lru_cache(maxsize=32)
def _warn_empty_bands(params: LogMelParams) -> None:
    """Log once per process and parameter set when mel bands get no FFT bin. A warning, not
    an error: TensorFlow's pipeline has such bands too (tf_power_db at 44.1 kHz has one), and
    the TF presets match it."""
    empty = empty_mel_bands(params)
    if empty:
        log.warning(
            "log-mel: %d of %d mel bands get no FFT bin (n_fft=%d at %d Hz: bins %.3g Hz "
            "apart), so they are constant; lower n_mels or raise n_fft (features.n_mels, "
            "features.n_fft)",
            empty,
            params.n_mels,
            params.n_fft,
            params.sample_rate,
            params.sample_rate / params.n_fft,
        )


def _check_sample_rate(sample_rate: Any) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | float | np.number):
        raise ValueError(f"sample_rate must be a positive number of Hz, not {sample_rate!r}")
    if not (sample_rate > 0 and float(sample_rate).is_integer()):
        raise ValueError(f"sample_rate must be a positive whole number of Hz, not {sample_rate}")
    return int(sample_rate)


def _validate(params: LogMelParams) -> None:
    checks = [
        (params.frame_length > 0, "frame_length must be positive"),
        (params.hop_length > 0, "hop_length must be positive"),
        (
            params.n_fft >= params.frame_length,
            "n_fft must be at least frame_length (override n_fft for this sample rate)",
        ),
        (params.n_mels > 0, "n_mels must be positive"),
        (0 <= params.fmin_hz < params.fmax_hz, "need 0 <= fmin_hz < fmax_hz"),
        (params.mel_scale in MEL_SCALES, f"mel_scale must be one of {MEL_SCALES}"),
        (params.log in LOG_KINDS, f"log must be one of {LOG_KINDS}"),
        (params.pad_mode in PAD_MODES, f"pad_mode must be one of {PAD_MODES}"),
        (params.power > 0, "power must be positive"),
        (params.log != "db" or params.amin > 0, "amin must be positive (log of 0 is -inf)"),
        (
            params.log != "log_offset" or params.log_offset > 0,
            "log_offset must be positive (log of 0 is -inf)",
        ),
        (params.top_db is None or params.top_db >= 0, "top_db must be >= 0 or None"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"log-mel parameters: {message} (got {params})")


def num_frames(num_samples: int, params: LogMelParams) -> int:
    """How many frames `compute_log_mel` returns for `num_samples` samples.

    Every preset needs at least one frame of input (`frame_length` samples); fewer is a
    ValueError naming both lengths.
    """
    if num_samples < params.frame_length:
        raise ValueError(
            f"{num_samples} samples are shorter than one frame ({params.frame_length} samples, "
            f"{params.frame_length / params.sample_rate * 1000:g} ms at {params.sample_rate} Hz)"
        )
    if params.center:
        return 1 + num_samples // params.hop_length
    return 1 + (num_samples - params.frame_length) // params.hop_length


def tf_mel_matrix(
    sample_rate: int, n_fft: int, n_mels: int, fmin_hz: float, fmax_hz: float
) -> np.ndarray:
    """TF's `linear_to_mel_weight_matrix`, shape (n_fft // 2 + 1, n_mels), in float64.

    HTK mel scale with the triangles drawn as straight lines on the mel axis (librosa draws
    them in Hz), no area normalisation, and a zero DC row.
    """

    def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)

    num_bins = n_fft // 2 + 1
    bin_mel = hz_to_mel(np.linspace(0.0, sample_rate / 2, num_bins))
    edges = np.linspace(hz_to_mel(fmin_hz), hz_to_mel(fmax_hz), n_mels + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel[:, None] - lower) / (centre - lower)
    falling = (upper - bin_mel[:, None]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


@functools.lru_cache(maxsize=32)
def _mel_matrix(
    sample_rate: int, n_fft: int, n_mels: int, fmin_hz: float, fmax_hz: float, scale: str
) -> np.ndarray:
    """Mel filterbank, shape (n_mels, n_fft // 2 + 1); built once per parameter set."""
    if scale == "tf":
        matrix = tf_mel_matrix(sample_rate, n_fft, n_mels, fmin_hz, fmax_hz).T
    else:
        # librosa warns of empty bands in every process that builds the matrix (each loader
        # worker); resolve_params says it once, naming the keys to change.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Empty filters detected", UserWarning)
            matrix = librosa.filters.mel(
                sr=sample_rate,
                n_fft=n_fft,
                n_mels=n_mels,
                fmin=fmin_hz,
                fmax=fmax_hz,
                htk=scale == "htk",
                norm="slaney" if scale == "slaney" else None,
                dtype=np.float64,
            )
    matrix.setflags(write=False)
    return matrix


def mel_matrix(params: LogMelParams) -> np.ndarray:
    """The mel filterbank of `params`, shape (n_mels, n_fft // 2 + 1), float64, read-only."""
    return _mel_matrix(
        params.sample_rate,
        params.n_fft,
        params.n_mels,
        params.fmin_hz,
        params.fmax_hz,
        params.mel_scale,
    )


def empty_mel_bands(params: LogMelParams) -> int:
    """How many mel bands of `params` no FFT bin falls in: constant inputs to a model (too
    many mel bands for the FFT's resolution)."""
    return int((mel_matrix(params).max(axis=1) == 0).sum())


@functools.lru_cache(maxsize=32)
def _tf_window(frame_length: int, n_fft: int) -> np.ndarray:
    # TF puts the windowed frame at the start of the FFT buffer and the zeros after it.
    window = np.zeros(n_fft)
    window[:frame_length] = librosa.filters.get_window("hann", frame_length, fftbins=True)
    window.setflags(write=False)
    return window


def _spectrogram(waveform: np.ndarray, params: LogMelParams) -> np.ndarray:
    """|STFT| ** power, shape (1 + n_fft // 2, frames), in float64."""
    if params.center:
        stft = librosa.stft(
            waveform,
            n_fft=params.n_fft,
            hop_length=params.hop_length,
            win_length=params.frame_length,
            window="hann",
            center=True,
            pad_mode=params.pad_mode,
        )
    else:
        frames = num_frames(len(waveform), params)
        padded = np.pad(waveform, (0, params.n_fft - params.frame_length))
        stft = librosa.stft(
            padded,
            n_fft=params.n_fft,
            hop_length=params.hop_length,
            window=_tf_window(params.frame_length, params.n_fft),
            center=False,
        )[:, :frames]
    magnitude = np.abs(stft)
    return magnitude if params.power == 1.0 else magnitude**params.power


def _log(mel: np.ndarray, params: LogMelParams) -> np.ndarray:
    if params.log == "db":
        return librosa.power_to_db(mel, ref=1.0, amin=params.amin, top_db=params.top_db)
    if params.log == "log_offset":
        return np.log(mel + params.log_offset)
    return mel


def as_signal(waveform: np.ndarray) -> np.ndarray:
    """A mono waveform as float64 in [-1, 1] units, checked.

    Floats are taken as they are. Integer PCM is scaled as audio files store it: signed
    integers by 2 ** (bits - 1), 8-bit unsigned around 128. Other types, more than one
    dimension, and NaN or infinite samples are a ValueError.
    """
    array = np.asarray(waveform)
    if array.ndim != 1:
        raise ValueError(f"expected a mono waveform (1-D), got shape {array.shape}")
    kind = array.dtype.kind
    if kind == "f":
        signal = array.astype(np.float64)
    elif kind == "i":
        signal = array.astype(np.float64) / -float(np.iinfo(array.dtype).min)
    elif array.dtype == np.uint8:
        signal = (array.astype(np.float64) - 128.0) / 128.0
    else:
        raise ValueError(
            f"waveform samples must be float or integer PCM (int8/16/32/64, uint8), "
            f"not {array.dtype}"
        )
    if not np.isfinite(signal).all():
        raise ValueError("waveform contains NaN or infinite samples")
    return signal


def log_mel(waveform: np.ndarray, params: LogMelParams) -> np.ndarray:
    """Log-mel of a mono waveform with resolved parameters, shape (frames, n_mels), float32.

    See `as_signal` for the sample types taken; input shorter than one frame is a ValueError.
    """
    signal = as_signal(waveform)
    num_frames(len(signal), params)
    spectrogram = _spectrogram(signal, params)
    with _blas().limit(limits=1, user_api="blas"):
        mel = mel_matrix(params) @ spectrogram
    return np.ascontiguousarray(_log(mel, params).T, dtype=np.float32)


@functools.cache
def _blas() -> ThreadpoolController:
    """NumPy's BLAS, which the mel projection runs on one thread. OpenBLAS threads it, and its
    threads spinning after so small a product took cores from torch's: a training epoch that
    computed features in its own process ran at half speed on two cores (about 380 against
    690 clips/s)."""
    return ThreadpoolController()


def compute_log_mel(
    waveform: np.ndarray, sample_rate: int, preset: str | Mapping[str, Any], **overrides: Any
) -> np.ndarray:
    """Log-mel features of a mono waveform, shape (frames, n_mels), float32.

    The waveform is float (taken as is) or integer PCM (scaled to [-1, 1]); it must hold at
    least one frame (`frame_length` samples), else ValueError, for every preset alike.

    Args:
        preset: a name from `PRESETS` ("librosa", "tf_yamnet_style", "tf_power_db", "panns")
            or a dict of parameters (the names in `LogMelParams`, with frame and hop given
            as `*_length` in samples or `*_seconds`).
        overrides: single parameters that replace the preset's.
    """
    return log_mel(waveform, resolve_params(preset, sample_rate, **overrides))
