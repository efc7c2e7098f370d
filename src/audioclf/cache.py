"""The disk cache of features: diskcache, keyed by audio content and every feature parameter."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import diskcache
import numpy as np

log = logging.getLogger(__name__)

SHARDS = 8


def parameters_digest(parameters: Mapping[str, Any]) -> str:
    """A digest of every parameter that shapes a feature array (JSON-serialisable values)."""
    text = json.dumps(parameters, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def feature_key(audio_digest: str, parameters_digest: str) -> str:
    """The cache key of one feature array: the audio's digest plus its parameters' digest."""
    return f"{audio_digest}-{parameters_digest}"


def _encode(array: np.ndarray) -> bytes:
    # Raw bytes behind a JSON header rather than a pickle: the checksum catches a damaged
    # entry, and reading one runs no code from the cache directory.
    payload = np.ascontiguousarray(array).tobytes()
    header = json.dumps(
        {"dtype": array.dtype.str, "shape": array.shape, "crc32": zlib.crc32(payload)}
    ).encode()
    return len(header).to_bytes(4, "little") + header + payload


def _decode(value: Any) -> np.ndarray:
    if not isinstance(value, bytes) or len(value) < 4:
        raise ValueError(f"not a feature entry ({type(value).__name__})")
    header_end = 4 + int.from_bytes(value[:4], "little")
    header = json.loads(value[4:header_end])
    payload = value[header_end:]
    if zlib.crc32(payload) != header["crc32"]:
        raise ValueError("checksum mismatch")
    return np.frombuffer(payload, dtype=np.dtype(header["dtype"])).reshape(header["shape"])


class FeatureCache:
    """Feature arrays on disk, shared by every process that opens the same directory.

    Each process opens its own handle (DataLoader workers included), so it is safe with
    `num_workers > 0`. An entry that cannot be read is logged, recomputed and rewritten.
    With `enabled=False` nothing is read or written.
    """

    def __init__(self, directory: str | Path, enabled: bool = True) -> None:
        self.directory = Path(directory)
        self.enabled = enabled
        self._handle: diskcache.FanoutCache | None = None
        self._handle_pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A handle belongs to the process that opened it: workers open their own.
        return {**self.__dict__, "_handle": None, "_handle_pid": None}

    @property
    def _cache(self) -> diskcache.FanoutCache:
        if self._handle is None or self._handle_pid != os.getpid():
            # Shards keep loader workers that write at once from queueing on one database lock.
            self._handle = diskcache.FanoutCache(
                str(self.directory), shards=SHARDS, timeout=1.0, eviction_policy="none"
            )
            self._handle_pid = os.getpid()
        return self._handle

    @property
    def store_directory(self) -> Path:
        """Where FeatureStore files live (deleting it only costs a rebuild)."""
        return self.directory / "stores"

    def get(self, key: str) -> np.ndarray | None:
        """The cached array, or None when absent or unreadable."""
        if not self.enabled:
            return None
        try:
            value = self._cache.get(key, retry=True)
            return None if value is None else _decode(value)
        except (OSError, sqlite3.Error, ValueError, KeyError, TypeError) as error:
            log.warning("feature cache entry %s unreadable (%s): recomputing", key, error)
            return None

    def put(self, key: str, array: np.ndarray) -> None:
        """Store an array; a failed write is logged and the run goes on without it."""
        if not self.enabled:
            return
        try:
            self._cache.set(key, _encode(array), retry=True)
        except (OSError, sqlite3.Error) as error:
            log.warning("feature cache write failed for %s (%s)", key, error)

    def get_or_compute(
        self, key: str, compute: Callable[[], np.ndarray]
    ) -> tuple[np.ndarray, bool]:
        """The array for `key` and whether it came from the cache; a miss computes and stores."""
        cached = self.get(key)
        if cached is not None:
            return cached, True
        array = compute()
        self.put(key, array)
        return array, False


def store_key(audio_digests: Iterable[str], parameters_digest: str) -> str:
    """The key of one dataset's feature store: its clips' audio digests in order, and the
    digest of every parameter that shapes the features."""
    text = "\n".join([parameters_digest, *audio_digests])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class FeatureStore:
    """The features of one dataset's items in one memory-mapped float32 array.

    A warm item is then a slice of a mapped file instead of a database read: the per-entry
    cache tops out near 20x a cold pass on short clips, a store past 50x (README,
    "Benchmarks"). `{key}.f32` holds every item's (frames, n_mels) rows one after another;
    `{key}.json` holds each item's first row, the shape and a CRC32 of the array, and is
    written last, so a store without it is incomplete and ignored. The array is mapped lazily
    and per process, so loader workers share the operating system's page cache.
    """

    def __init__(self, array_path: Path, offsets: list[int], n_mels: int) -> None:
        self.array_path = array_path
        self.offsets = offsets
        self.n_mels = n_mels
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The mapping belongs to the process that made it: workers map the file themselves.
        state = {**self.__dict__, "_array": None}
        state.pop("stacked", None)
        return state

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def array(self) -> np.ndarray:
        """All rows, (total frames, n_mels), mapped read-only."""
        if self._array is None:
            rows = self.offsets[-1]
            mapped = np.memmap(self.array_path, np.float32, "r", shape=(rows, self.n_mels))
            # A plain ndarray over the mapping: slicing np.memmap runs Python code per slice.
            self._array = mapped.view(np.ndarray)
        return self._array

    def __getitem__(self, index: int) -> np.ndarray:
        return self.array[self.offsets[index] : self.offsets[index + 1]]

    @functools.cached_property
    def stacked(self) -> np.ndarray | None:
        """All items as one (items, frames, n_mels) view when they have equal frame counts
        (evaluation items do), else None."""
        lengths = np.diff(self.offsets)
        if len(lengths) == 0 or (lengths != lengths[0]).any():
            return None
        return self.array.reshape(len(self), int(lengths[0]), self.n_mels)

    @classmethod
    def open(cls, directory: Path, key: str) -> FeatureStore | None:
        """The complete, intact store under `key`, or None (a damaged one is logged)."""
        meta_path = directory / f"{key}.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            store = cls(directory / f"{key}.f32", meta["offsets"], meta["n_mels"])
            expected_bytes = store.offsets[-1] * store.n_mels * 4
            if store.array_path.stat().st_size != expected_bytes:
                raise ValueError(f"array size differs from the {expected_bytes} bytes expected")
            if zlib.crc32(store.array) != meta["crc32"]:
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("feature store %s unreadable (%s): rebuilding", meta_path, error)
            return None
        return store

    @classmethod
    def build(
        cls, directory: Path, key: str, items: Iterable[np.ndarray], n_mels: int
    ) -> FeatureStore:
        """Write the items' features as the store `key` (atomically) and return it."""
        directory.mkdir(parents=True, exist_ok=True)
        array_path = directory / f"{key}.f32"
        partial = directory / f"{key}.{os.getpid()}.partial"
        offsets, crc = [0], 0
        with partial.open("wb") as handle:
            for features in items:
                data = np.ascontiguousarray(features, dtype=np.float32)
                if data.ndim != 2 or data.shape[1] != n_mels:
                    raise ValueError(f"store items must be (frames, {n_mels}), not {data.shape}")
                handle.write(data.tobytes())
                crc = zlib.crc32(data, crc)
                offsets.append(offsets[-1] + len(data))
        os.replace(partial, array_path)
        meta = {"offsets": offsets, "n_mels": n_mels, "crc32": crc}
        _write_atomically(directory / f"{key}.json", json.dumps(meta).encode())
        return cls(array_path, offsets, n_mels)


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
