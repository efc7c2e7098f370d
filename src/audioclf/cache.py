"""The disk cache of features: diskcache, keyed by audio content and every feature parameter."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
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


class UnsafeEntryError(ValueError):
    """A cache entry that is not raw bytes (a pickle): refused unread, treated as damaged."""


class RawDisk(diskcache.Disk):
    """diskcache's storage with unpickling refused.

    diskcache unpickles any entry stored in its pickle mode, and an unpickled object can run
    code; feature entries are raw bytes, so a pickled entry can only be tampering or damage.
    """

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == diskcache.core.MODE_PICKLE:
            raise UnsafeEntryError("a pickled object, not raw bytes (refused unread)")
        return super().fetch(mode, filename, value, read)


_ENTRY_DTYPE = np.dtype(np.float32)


def _encode(array: np.ndarray) -> bytes:
    # Raw bytes behind a JSON header rather than a pickle: the checksum catches a damaged
    # entry, and reading one runs no code from the cache directory (RawDisk).
    payload = np.ascontiguousarray(array, dtype=_ENTRY_DTYPE).tobytes()
    header = json.dumps(
        {"dtype": _ENTRY_DTYPE.str, "shape": array.shape, "crc32": zlib.crc32(payload)}
    ).encode()
    return len(header).to_bytes(4, "little") + header + payload


def _decode(value: Any) -> np.ndarray:
    """The array of an entry; ValueError for anything but an intact float32 matrix entry."""
    if not isinstance(value, bytes) or len(value) < 4:
        raise ValueError(f"not a feature entry ({type(value).__name__})")
    header_end = 4 + int.from_bytes(value[:4], "little")
    header = json.loads(value[4:header_end])
    if not isinstance(header, dict) or header.get("dtype") != _ENTRY_DTYPE.str:
        raise ValueError("not a feature entry header")
    shape = header.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(n, int) and n >= 0 for n in shape)
    ):
        raise ValueError(f"bad shape {shape!r}")
    payload = value[header_end:]
    if len(payload) != shape[0] * shape[1] * _ENTRY_DTYPE.itemsize:
        raise ValueError("payload size differs from its shape")
    if zlib.crc32(payload) != header.get("crc32"):
        raise ValueError("checksum mismatch")
    return np.frombuffer(payload, dtype=_ENTRY_DTYPE).reshape(shape)


def _database_problem(path: Path) -> str | None:
    """Why an SQLite file is unusable (SQLite's own integrity check), or None."""
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=10.0)) as connection:
            rows = connection.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as error:
        return str(error)
    return None if rows == [("ok",)] else "; ".join(str(row[0]) for row in rows[:3])


class FeatureCache:
    """Feature arrays on disk, shared by every process that opens the same directory.

    Each process opens its own handle (DataLoader workers included), so it is safe with
    `num_workers > 0`. An entry that cannot be read (damaged, or not raw bytes) is logged,
    recomputed and rewritten. With `enabled=False` nothing is read or written. Call
    `check()` in the main process before a run: it heals damaged shards and turns the cache
    off, once and with a warning, when the directory cannot be written.
    """

    def __init__(self, directory: str | Path, enabled: bool = True) -> None:
        self.directory = Path(directory)
        self.enabled = enabled
        self._handle: diskcache.FanoutCache | None = None
        self._handle_pid: int | None = None
        self._failed = False

    def __getstate__(self) -> dict[str, Any]:
        # A handle belongs to the process that opened it: workers open their own.
        return {**self.__dict__, "_handle": None, "_handle_pid": None}

    @property
    def _cache(self) -> diskcache.FanoutCache:
        if self._handle is None or self._handle_pid != os.getpid():
            # Shards keep loader workers that write at once from queueing on one database lock.
            self._handle = diskcache.FanoutCache(
                str(self.directory),
                shards=SHARDS,
                timeout=1.0,
                eviction_policy="none",
                disk=RawDisk,
            )
            self._handle_pid = os.getpid()
        return self._handle

    @property
    def store_directory(self) -> Path:
        """Where FeatureStore files live (deleting it only costs a rebuild)."""
        return self.directory / "stores"

    def check(self) -> None:
        """Make the cache usable for a run: turn it off (one warning) when the directory cannot
        be written, and rebuild any shard whose database is damaged (one warning each)."""
        if not self.enabled:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-check.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            log.warning(
                "feature cache %s cannot be written (%s): running with the cache off",
                self.directory,
                error.strerror or error,
            )
            self.enabled = False
            return
        for index in range(SHARDS):
            shard = self.directory / f"{index:03d}"
            database = shard / "cache.db"
            if not shard.exists() and not shard.is_symlink():
                continue
            problem = (
                "not a folder"
                if not shard.is_dir()
                else _database_problem(database)
                if database.exists()
                else None
            )
            if problem is None:
                continue
            log.warning(
                "feature cache shard %s is damaged (%s): removed, its entries are recomputed",
                shard,
                problem,
            )
            if shard.is_dir() and not shard.is_symlink():
                shutil.rmtree(shard)
            else:
                shard.unlink()

    def _fail(self, action: str, key: str, error: Exception) -> None:
        # A database-level fault repeats for every entry: say it once, then stop using the
        # cache in this process (the next run's check() heals the shard).
        if isinstance(error, sqlite3.DatabaseError) and not isinstance(
            error, sqlite3.OperationalError
        ):
            if not self._failed:
                log.warning(
                    "feature cache %s failed to %s (%s): the cache is off for the rest of "
                    "this process",
                    self.directory,
                    action,
                    error,
                )
            self._failed = True
            return
        log.warning(
            "feature cache entry %s unreadable or unwritable (%s failed: %s)", key, action, error
        )

    def get(self, key: str) -> np.ndarray | None:
        """The cached array, or None when absent or unreadable."""
        if not self.enabled or self._failed:
            return None
        try:
            value = self._cache.get(key, retry=True)
            return None if value is None else _decode(value)
        except (OSError, sqlite3.Error, ValueError, KeyError, TypeError) as error:
            self._fail("read", key, error)
            return None

    def put(self, key: str, array: np.ndarray) -> None:
        """Store an array; a failed write is logged and the run goes on without it."""
        if not self.enabled or self._failed:
            return
        try:
            self._cache.set(key, _encode(array), retry=True)
        except (OSError, sqlite3.Error) as error:
            self._fail("write", key, error)

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
            meta = json.loads(meta_path.read_bytes())
            offsets, n_mels = meta["offsets"], meta["n_mels"]
            if not (
                isinstance(offsets, list)
                and offsets
                and all(isinstance(n, int) for n in offsets)
                and isinstance(n_mels, int)
                and n_mels > 0
                and (np.diff(offsets) >= 0).all()
            ):
                raise ValueError("malformed index")
            store = cls(directory / f"{key}.f32", offsets, n_mels)
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
        """Write the items' features as the store `key` (atomically) and return it.

        Whatever stands at the store's paths (a stale file, a folder) is replaced.
        """
        directory.mkdir(parents=True, exist_ok=True)
        array_path = directory / f"{key}.f32"
        for path in (array_path, directory / f"{key}.json"):
            _clear(path)
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


def _clear(path: Path) -> None:
    """Remove what stands at `path` unless it is a regular file (which a rename replaces)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or (path.exists() and not path.is_file()):
        path.unlink()
