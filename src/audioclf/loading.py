"""Loading: DataLoaders, their worker processes, and the seeded epoch sampler."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, Dataset, Sampler

from audioclf.index import Clip


class EpochSampler(Sampler):
    """Item keys `(index, seed)` in a seeded order that depends only on (seed, epoch).

    Each item gets its own seed, so its augmentation does not depend on which worker loads it
    or on what was drawn before: an epoch repeats exactly, with any number of workers, and a
    resumed run repeats an uninterrupted one. `weights` (one per item) draws the epoch with
    replacement in proportion to them (a balanced sampler); `rank` and `world_size` take one
    process's share of the epoch for distributed training (padded to equal shares).
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and seeds to yield."""
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.world_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is not None:
            order = rng.choice(self.size, self.size, p=self.weights / self.weights.sum())
        elif self.shuffle:
            order = rng.permutation(self.size)
        else:
            order = np.arange(self.size)
        seeds = rng.integers(0, 2**62, size=len(order))
        padded = len(self) * self.world_size
        order = np.resize(order, padded)
        seeds = np.resize(seeds, padded)
        for position in range(self.rank, padded, self.world_size):
            yield int(order[position]), int(seeds[position])


def balanced_weights(clips: Sequence[Clip], multi_label: bool = False) -> list[float]:
    """Per-item sampling weights that give every class the same expected share (multi-label:
    each clip weighs the mean of its labels' inverse counts; clips with no label, together,
    the share of one class)."""
    if not multi_label:
        counts = Counter(clip.label for clip in clips)
        return [1.0 / counts[clip.label] for clip in clips]
    tags = [clip.labels or ("",) for clip in clips]  # "": no label
    counts = Counter(label for labels in tags for label in labels)
    return [float(np.mean([1.0 / counts[label] for label in labels])) for labels in tags]


def _die_with_parent() -> None:
    """Have Linux kill this worker when the process that started it dies.

    Without it, a main process killed while its workers start can leave a worker orphaned,
    holding the cache and the log, indefinitely.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = multiprocessing.parent_process()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died before prctl: then this process was already reparented.
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _stop_worker(signum: int, frame: object) -> None:
    # As torch's handler does for its parent's SIGTERM. Raising KeyboardInterrupt instead
    # printed a traceback when it landed in soundfile's read callback, where it cannot pass.
    os._exit(0)


def init_worker(worker_id: int) -> None:
    """Set up a loader worker: dies with its parent, ends quietly on SIGTERM, one BLAS thread,
    and seeds from the seed torch gave it.

    torch's own SIGTERM handler ends a worker quietly only when its parent sent the signal. A
    SIGTERM to the whole process group (`docker stop`, a scheduler's preemption, `kill -TERM
    -PGID`) killed the workers, and the main process, which stops with its resume hint, added
    a "DataLoader worker is killed by signal" traceback to it. A worker that ends while its
    parent goes on is still named by the parent ("exited unexpectedly").

    Workers already share the cores between them; BLAS threads on top (torch limits its own
    to one per worker, NumPy's OpenBLAS does not) oversubscribe them and slowed feature
    computation several times over in measurements on two cores.
    """
    _die_with_parent()
    signal.signal(signal.SIGTERM, _stop_worker)
    threadpool_limits(limits=1)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def worker_options(num_workers: int) -> dict[str, Any]:
    """DataLoader arguments for `num_workers` worker processes, set up by `init_worker`.

    Workers fork (cheap) unless JAX has been loaded: litert-torch's TFLite conversion starts
    JAX's threads, a process forked beside them can deadlock, and JAX warns at each fork. The
    next job of a fold loop or a sweep in the same process then spawns its workers.
    """
    options: dict[str, Any] = {"num_workers": num_workers, "worker_init_fn": init_worker}
    if num_workers > 0 and "jax" in sys.modules:
        options["multiprocessing_context"] = "spawn"
    return options


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader whose shuffling and per-worker randomness follow `seed`.

    With a `sampler` (an EpochSampler for training), it decides the order and `shuffle` must
    be False. A dataset that reads from a FeatureStore loads in this process: its items are
    slices of a mapped file, and worker processes would only add copies between processes
    (they halved the throughput in measurements).
    """
    if getattr(dataset, "reads_from_store", False):
        num_workers = 0
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        **worker_options(num_workers),
        generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
    )
