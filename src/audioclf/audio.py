"""Waveform in, waveform out: decode, mix down to mono, resample, fix the length."""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import librosa
import numpy as np
import soundfile as sf

RESAMPLER = "soxr_hq"
#: Formats whose frame count and seeking are exact, so that `load_crop` may read a part.
_SEEKABLE = frozenset({"WAV", "WAVEX", "W64", "RF64", "FLAC", "AIFF"})
#: Samples (at the target rate) decoded on each side of a crop: more than the resampler's
#: reach, so the crop equals that of the whole file resampled (measured: within 1e-7).
_CROP_MARGIN = 256


class BadAudioError(ValueError):
    """An audio file that cannot be used: unreadable, corrupt, empty or non-finite."""

    def __init__(self, path: str | Path, reason: str, where: str | None = None) -> None:
        """`where` names the file in the message instead of `path` (a manifest's line too)."""
        super().__init__(f"{where or path}: {reason}")
        self.path = str(path)
        self.reason = reason


def read_bytes(path: str | Path) -> bytes:
    """The raw bytes of an audio file; a missing or unreadable file is a BadAudioError."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise BadAudioError(path, f"cannot read file ({error.strerror or error})") from error


# path -> (stat signature, digest); per process, so each process hashes an unchanged file once.
_digests: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def file_digest(path: str | Path) -> tuple[str, bytes | None]:
    """A digest of a file's bytes, and the bytes when they had to be read for it.

    The digest is remembered per (size, mtime, inode, device): a file that was not touched is
    not read again in this process; an edited one is.
    """
    try:
        stat = os.stat(path)
    except OSError as error:
        raise BadAudioError(path, f"cannot read file ({error.strerror or error})") from error
    signature = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
    remembered = _digests.get(str(path))
    if remembered is not None and remembered[0] == signature:
        return remembered[1], None
    data = read_bytes(path)
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    _digests[str(path)] = (signature, digest)
    return digest, data


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _decode_error(error: Exception) -> str:
    # soundfile names the in-memory buffer ("<_io.BytesIO object at 0x...>"), which changes
    # every run; BadAudioError names the path itself.
    message = getattr(error, "error_string", None) or str(error) or type(error).__name__
    return _OBJECT_REPR.sub("the file", message).strip()


class AudioInfo(NamedTuple):
    """A file's own sample rate and length."""

    sample_rate: int
    seconds: float


def _read_samples(data: bytes, path: str | Path) -> tuple[np.ndarray, AudioInfo]:
    """Decode audio bytes to (samples, channels) float32 at the file's own rate, checked, and
    that rate and the length."""
    if not data:
        raise BadAudioError(path, "empty file (0 bytes)")
    try:
        samples, native_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, EOFError) as error:
        raise BadAudioError(path, f"cannot decode audio ({_decode_error(error)})") from error
    if samples.shape[0] == 0:
        raise BadAudioError(path, "no audio samples (zero-length)")
    if not np.isfinite(samples).all():
        raise BadAudioError(path, "audio contains NaN or infinite samples")
    return samples, AudioInfo(native_rate, samples.shape[0] / native_rate)


def check_audio(data: bytes, path: str | Path) -> AudioInfo:
    """The file's own rate and length; BadAudioError when audio bytes cannot be used (cheaper
    than decoding: no resampling, which cannot turn a usable file unusable)."""
    return _read_samples(data, path)[1]


def decode_audio(data: bytes, path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode audio bytes to a mono float32 waveform at `sample_rate`.

    `path` only names the file in errors. Any channel count, bit depth and rate is accepted.
    """
    return _decode(data, path, sample_rate)[0]


def _decode(data: bytes, path: str | Path, sample_rate: int) -> tuple[np.ndarray, AudioInfo]:
    """`decode_audio`'s waveform, and the file's own rate and length."""
    samples, info = _read_samples(data, path)
    return _mono_at(samples, info.sample_rate, sample_rate), info


def _mono_at(samples: np.ndarray, native: int, sample_rate: int) -> np.ndarray:
    """(frames, channels) samples at rate `native` as a mono float32 waveform at
    `sample_rate`."""
    waveform = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if native != sample_rate:
        waveform = librosa.resample(
            waveform, orig_sr=native, target_sr=sample_rate, res_type=RESAMPLER
        )
    return np.ascontiguousarray(waveform, dtype=np.float32)


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read a file and return a mono float32 waveform at `sample_rate`."""
    return read_audio(path, sample_rate)[0]


def read_audio(path: str | Path, sample_rate: int) -> tuple[np.ndarray, AudioInfo]:
    """`load_audio`'s waveform, and the file's own rate and length (one read)."""
    return _decode(read_bytes(path), path, sample_rate)


def _seekable_info(path: str | Path) -> Any:
    """soundfile's info on a file whose format seeks exactly; None for other formats and for
    a file it cannot open (whole-file decoding then names the error)."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError):
        return None
    return info if info.format in _SEEKABLE else None


def _part_samples(path: str | Path, info: Any, offset: float, duration: float | None) -> np.ndarray:
    """The (frames, channels) float32 samples of a part of a seekable file, read from its
    first sample, checked."""
    _check_offset(path, offset, info.frames / info.samplerate)
    start = round(offset * info.samplerate)
    frames = -1 if duration is None else round(duration * info.samplerate)
    samples = _read_frames(path, start, frames)
    if samples.shape[0] == 0:
        raise BadAudioError(path, f"no audio samples from {offset:g} s on")
    return samples


def _read_frames(path: str | Path, start: int, count: int) -> np.ndarray:
    """`count` frames (-1: to the end) of a seekable file from frame `start`, as
    (frames, channels) float32, checked finite."""
    try:
        with sf.SoundFile(str(path)) as handle:
            handle.seek(start)
            samples = handle.read(count, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as error:
        raise BadAudioError(path, f"cannot decode audio ({_decode_error(error)})") from error
    if not np.isfinite(samples).all():
        raise BadAudioError(path, "audio contains NaN or infinite samples")
    return samples


def load_segment(
    path: str | Path, sample_rate: int, offset: float, duration: float | None
) -> tuple[np.ndarray, AudioInfo]:
    """The mono float32 waveform at `sample_rate` of the part of a file `offset` seconds in
    and `duration` seconds long (None: to the end; a file that ends sooner gives what it
    has), and the file's own rate and length. WAV, FLAC and AIFF are read from the part's
    first sample (seeking is exact in them); other formats are decoded whole and cut. An
    offset at or past the file's end is a BadAudioError naming both."""
    info = _seekable_info(path)
    if info is None:
        waveform, whole = read_audio(path, sample_rate)
        _check_offset(path, offset, whole.seconds)
        start = round(offset * sample_rate)
        stop = None if duration is None else start + round(duration * sample_rate)
        return np.ascontiguousarray(waveform[start:stop]), whole
    samples = _part_samples(path, info, offset, duration)
    whole = AudioInfo(info.samplerate, info.frames / info.samplerate)
    return _mono_at(samples, info.samplerate, sample_rate), whole


def check_segment(path: str | Path, offset: float, duration: float | None) -> AudioInfo:
    """`check_audio` for a part of a file: the file's own rate and length; BadAudioError when
    the part cannot be used. Only the part is read where the format seeks exactly, so the
    events of an hour-long recording do not each decode the hour."""
    info = _seekable_info(path)
    if info is None:
        whole = check_audio(read_bytes(path), path)
        _check_offset(path, offset, whole.seconds)
        return whole
    _part_samples(path, info, offset, duration)
    return AudioInfo(info.samplerate, info.frames / info.samplerate)


def _check_offset(path: str | Path, offset: float, seconds: float) -> None:
    if offset >= seconds:
        reason = f"offset {offset:g} s is at or past the file's end ({seconds:g} s)"
        raise BadAudioError(path, reason)


def load_crop(
    path: str | Path, sample_rate: int, num_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """`fix_length(load_audio(path, sample_rate), num_samples, rng)`, with the same random
    draw, decoding only the part of a long file that the crop needs (a 1 s crop of a 30 s
    recording: 1/30 of the decoding and resampling). Files shorter than two crops, and
    formats without exact seeking, are decoded whole."""
    info = _seekable_info(path)
    length = 0  # decode whole: unreadable here, or no exact seeking
    if info is not None:
        # The resampled length, as librosa.resample computes it (exact at the same rate).
        length = math.ceil(info.frames * (sample_rate / info.samplerate))
    if length < 2 * num_samples:
        return fix_length(load_audio(path, sample_rate), num_samples, rng)
    native = info.samplerate
    offset = int(rng.integers(0, length - num_samples + 1))
    # Read whole resampling periods (native/g source samples are sample_rate/g target ones),
    # so the part's output samples fall on the whole file's.
    g = math.gcd(native, sample_rate)
    period_in, period_out = native // g, sample_rate // g
    first = max(0, offset - _CROP_MARGIN) // period_out
    last = -(-(offset + num_samples + _CROP_MARGIN) // period_out)
    count = min(last * period_in, info.frames) - first * period_in
    samples = _read_frames(path, first * period_in, count)
    waveform = _mono_at(samples, native, sample_rate)
    start = offset - first * period_out
    crop = waveform[start : start + num_samples]
    if len(crop) != num_samples:  # a file shorter than its header says
        raise BadAudioError(path, f"{len(crop)} samples where {num_samples} were read for")
    return np.ascontiguousarray(crop, dtype=np.float32)


def fix_length(
    waveform: np.ndarray, num_samples: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Crop or zero-pad to exactly `num_samples`.

    With `rng`, the crop start (or the clip's place inside the padding) is random, as in
    training; without, the clip is centred, as in evaluation.
    """
    excess = len(waveform) - num_samples
    if excess == 0:
        return waveform
    offset = int(rng.integers(0, abs(excess) + 1)) if rng is not None else abs(excess) // 2
    if excess > 0:
        return waveform[offset : offset + num_samples]
    return np.pad(waveform, (offset, -excess - offset))


def pad_for_random_crop(waveform: np.ndarray, num_samples: int) -> np.ndarray:
    """Zero-pad a short clip on both sides so any crop of `num_samples` is a valid placement.

    A clip of n < num_samples samples gets num_samples - n zeros on each side: every window of
    num_samples over the result holds the whole clip at one of its possible offsets.
    """
    shortfall = num_samples - len(waveform)
    if shortfall <= 0:
        return waveform
    return np.pad(waveform, (shortfall, shortfall))


def rates_text(rates: Counter, chosen: Iterable[int] | None = None) -> str:
    """'8000 Hz: 70, 11025 Hz: 3' for files per sample rate (the `chosen` rates, or all),
    most files first, at most three named."""
    ordered = sorted(rates if chosen is None else chosen, key=lambda rate: (-rates[rate], rate))
    text = ", ".join(f"{rate} Hz: {rates[rate]}" for rate in ordered[:3])
    more = len(ordered) - 3
    return text + (f", {more} more rate{'s' if more > 1 else ''}" if more > 0 else "")
