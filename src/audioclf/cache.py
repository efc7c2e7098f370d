"""The disk cache of features: diskcache, keyed by audio content and every feature parameter."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import zlib
from collections.abc import Callable, Mapping
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
