"""Fault injection: hostile cache entries, damaged shards and stores, read-only caches, orphan
workers, duplicated and malformed manifests, leakage, bad config values, bad API inputs.

Each test asserts the exact error class and that the message names the key, file or line.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import diskcache
import numpy as np
import pytest

from audioclf.audio import BadAudioError, load_audio
from audioclf.cache import SHARDS, FeatureCache, FeatureStore
from audioclf.cli import run
from audioclf.dataset import SpectrogramDataset, prepare
from audioclf.features import PRESETS, compute_log_mel, resolve_params
from audioclf.index import Clip, DatasetError, split_listing
from audioclf.job import make_output_dir
from audioclf.manifest import index_manifest
from audioclf.model import CheckpointError, ModelError, create_model, read_state_dict
from audioclf.settings import ConfigError, load_settings
from conftest import FSDD, REPO, fsdd_clip, write_manifest

# ---------------------------------------------------------------- 1. nothing read runs code


class _RunsCode:
    """Pickles to a call of os.system: what a tampered cache entry could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _foreign_write(directory: Path, key: str, value) -> None:
    """Write an entry as plain diskcache would (pickling anything that is not raw bytes)."""
    with diskcache.FanoutCache(str(directory), shards=SHARDS, eviction_policy="none") as cache:
        cache.set(key, value)


def test_pickled_cache_entry_is_refused_unread_and_rewritten(tmp_path, caplog):
    marker = tmp_path / "code-ran"
    _foreign_write(tmp_path / "cache", "k", _RunsCode(marker))
    cache = FeatureCache(tmp_path / "cache")
    array, hit = cache.get_or_compute("k", lambda: np.ones((3, 4), np.float32))
    assert not marker.exists()
    assert not hit
    assert "k unreadable" in caplog.text
    assert "pickled" in caplog.text
    again, hit = FeatureCache(tmp_path / "cache").get_or_compute(
        "k", lambda: pytest.fail("computed again")
    )
    assert hit
    np.testing.assert_array_equal(again, array)


@pytest.mark.parametrize(
    "value",
    [
        12345,
        "text entry",
        b"\x05\x00\x00\x00[1,2]payload",
        b'\x2b\x00\x00\x00{"dtype": "|O", "shape": [1, 1], "crc32": 0}' + b"\x00" * 8,
        b'\x2e\x00\x00\x00{"dtype": "<f4", "shape": [99, 99], "crc32": 0}' + b"\x00" * 8,
        [1.0, 2.0],
    ],
    ids=["int", "str", "bad-header", "object-dtype", "short-payload", "list"],
)
def test_cache_entry_of_the_wrong_kind_is_recomputed(tmp_path, caplog, value):
    _foreign_write(tmp_path / "cache", "k", value)
    cache = FeatureCache(tmp_path / "cache")
    array, hit = cache.get_or_compute("k", lambda: np.zeros((2, 2), np.float32))
    assert not hit
    assert array.shape == (2, 2)
    assert "k unreadable" in caplog.text
    assert cache.get("k") is not None


def test_store_index_with_wrong_types_is_rebuilt(tmp_path, caplog):
    (tmp_path / "key.json").write_text('{"offsets": ["0", "5"], "n_mels": 4, "crc32": 0}')
    (tmp_path / "key.f32").write_bytes(b"\x00" * 80)
    assert FeatureStore.open(tmp_path, "key") is None
    assert "key.json unreadable" in caplog.text


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "content",
    [b"hello world\n", b"}", b"(lp0\n", b"\x80\x02}q\x00", b"0\n1\n2\n", b"]", b"\x80\x05N."],
)
def test_any_unreadable_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="weights.pth"):
        read_state_dict(path)


# ---------------------------------------------------------------- 2. data correctness


def _split_rows(digits=(3, 4)) -> list[tuple]:
    return [
        (f"{d}_jackson_{i}.wav", str(d), split)
        for d in digits
        for i, split in [(10, "train"), (11, "train"), (12, "val"), (1, "test")]
    ]


def test_exact_duplicate_row_is_dropped_with_a_warning_naming_it(tmp_path, caplog):
    rows = _split_rows()
    path = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], [*rows, rows[0]])
    index = split_listing(index_manifest(path, FSDD, 0.1, 0.1), seed=0)
    assert index.counts() == {"train": 4, "val": 2, "test": 2}
    assert "m.csv, line 10" in caplog.text
    assert "m.csv, line 2" in caplog.text


def test_file_listed_in_two_splits_is_an_error_naming_both_rows(tmp_path):
    rows = _split_rows()
    leaked = (rows[0][0], rows[0][1], "test")
    path = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], [*rows, leaked])
    with pytest.raises(DatasetError, match=r"two splits: train at .*line 2.* test at .*line 10"):
        split_listing(index_manifest(path, FSDD, 0.1, 0.1), seed=0)


def test_same_file_reached_by_another_path_counts_as_the_same_file(tmp_path):
    rows = _split_rows()
    leaked = (f"../recordings/{rows[0][0]}", rows[0][1], "test")
    path = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], [*rows, leaked])
    with pytest.raises(DatasetError, match="two splits"):
        split_listing(index_manifest(path, FSDD, 0.1, 0.1), seed=0)


def test_file_listed_with_two_labels_is_an_error(tmp_path):
    rows = _split_rows()
    relabelled = (rows[0][0], "4", "train")
    path = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], [*rows, relabelled])
    with pytest.raises(DatasetError, match=r"two labels: '3' at .*line 2.* '4' at .*line 10"):
        split_listing(index_manifest(path, FSDD, 0.1, 0.1), seed=0)


def test_identical_content_in_train_and_test_is_an_error_naming_both_files(tmp_path):
    for digit in (3, 4):
        for index in (10, 11, 12, 1):
            shutil.copy(fsdd_clip(digit, index=index), tmp_path / f"{digit}_{index}.wav")
    shutil.copy(fsdd_clip(3, index=10), tmp_path / "copy_of_3_10.wav")
    rows = [(f"{d}_{i}.wav", str(d), s) for d in (3, 4) for i, s in _split_indices()]
    rows.append(("copy_of_3_10.wav", "3", "test"))
    path = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], rows)
    with pytest.raises(DatasetError, match=r"identical audio in train and test: .*3_10\.wav.*copy"):
        split_listing(index_manifest(path, None, 0.1, 0.1), seed=0)


def _split_indices():
    return [(10, "train"), (11, "train"), (12, "val"), (1, "test")]


def test_ratio_split_keeps_identical_content_in_one_split(tmp_path):
    rows = []
    for digit in (3, 4):
        for index in range(10, 20):
            name = f"{digit}_{index}.wav"
            shutil.copy(fsdd_clip(digit, index=index), tmp_path / name)
            rows.append((name, str(digit)))
    for copy in range(3):
        shutil.copy(fsdd_clip(3, index=10), tmp_path / f"copy{copy}.wav")
        rows.append((f"copy{copy}.wav", "3"))
    path = write_manifest(tmp_path / "m.csv", ["path", "label"], rows)
    for seed in range(6):
        index = split_listing(index_manifest(path, None, 0.2, 0.2), seed=seed)
        homes = {
            split
            for split, clips in index.splits.items()
            for clip in clips
            if clip.path.name in {"3_10.wav", "copy0.wav", "copy1.wav", "copy2.wav"}
        }
        assert len(homes) == 1


def _job_manifest(tmp_path: Path, rows: list[tuple], header=("path", "label", "split")) -> list:
    path = write_manifest(tmp_path / "job.csv", list(header), rows)
    return [
        "data=manifest",
        f"data.manifest={path}",
        f"data.root={FSDD}",
        "data.sample_rate=8000",
        "data.on_bad_file=skip",
    ]


def test_bad_files_are_dropped_before_the_ratio_split(compose_config, tmp_path):
    rows = [(f"{d}_jackson_{i}.wav", str(d)) for d in (3, 4) for i in range(10, 20)]
    for n in range(6):
        (tmp_path / f"bad{n}.wav").write_bytes(b"not audio")
        rows.append((str(tmp_path / f"bad{n}.wav"), "3"))
    overrides = _job_manifest(tmp_path, rows, header=("path", "label"))
    summary = run(compose_config(*overrides, "data.val_fraction=0.2", "data.test_fraction=0.2"))
    assert len(summary["bad_files"]) == 6
    assert summary["splits"]["val"]["per_class"] == {"3": 2, "4": 2}
    assert summary["splits"]["train"]["per_class"] == {"3": 6, "4": 6}


def test_split_left_without_a_class_by_bad_files_is_an_error_naming_it(compose_config, tmp_path):
    rows = _split_rows()
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"")
    rows = [row for row in rows if not (row[1] == "4" and row[2] == "val")]
    rows.append((str(broken), "4", "val"))
    with pytest.raises(
        DatasetError, match=r"val split \(\d+ clips\) has no clip of class\(es\) \['4'\]; add"
    ):
        run(compose_config(*_job_manifest(tmp_path, rows)))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"path,label\na.wav\n", r"m\.csv, line 2: 1 field\(s\), the header has 2"),
        (b"path,label\na.wav,3,extra\n", r"m\.csv, line 2: 3 field\(s\)"),
        (b"path,label\na.wav,3\n\xe9t\xe9.wav,3\n", r"m\.csv, line 3: not UTF-8"),
        (b"path,label\na.wav, \n", r"m\.csv, line 2: empty label"),
        (b"path,label\n,3\n", r"m\.csv, line 2: empty path"),
        (b"path,label,split\na.wav,3,holdout\n", r"m\.csv, line 2: split 'holdout' is not"),
        (b"file,label\na.wav,3\n", r"m\.csv, line 1: header .* lacks column\(s\) \['path'\]"),
        (b"path,label,speaker\na.wav,3,x\n", r"m\.csv, line 1: unknown column\(s\) \['speaker'\]"),
        (b"", r"m\.csv: empty manifest"),
    ],
    ids=[
        "short",
        "long",
        "latin-1",
        "empty-label",
        "empty-path",
        "split",
        "header",
        "col",
        "empty",
    ],
)
def test_malformed_manifest_names_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "m.csv"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        index_manifest(path, None, 0.1, 0.1)


def test_manifest_with_a_utf8_bom_reads_its_header(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffpath,label\n3_jackson_10.wav,3\n".encode())
    listing = index_manifest(path, FSDD, 0.0, 0.0)
    assert [(clip.path.name, clip.label) for clip in listing.clips] == [("3_jackson_10.wav", "3")]


# ---------------------------------------------------------------- 3. config


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("training.batch_size=abc", "training.batch_size", "whole number >= 1"),
        ("training.batch_size=0", "training.batch_size", "whole number >= 1"),
        ("training.epochs=-1", "training.epochs", ">= 0"),
        ("training.lr=0", "training.lr", "> 0"),
        ("training.optimizer=adam", "training.optimizer", "one of adamw, sgd"),
        ("training.grad_clip_norm=-1", "training.grad_clip_norm", "a number > 0 or null"),
        ("training.distillation.alpha=2", "training.distillation.alpha", "<= 1"),
        ("system.num_workers=-1", "system.num_workers", ">= 0"),
        ("system.log_level=LOUD", "system.log_level", "one of DEBUG"),
        ("system.device=gpu", "system.device", "auto, cpu, cuda"),
        ("system.cache=maybe", "system.cache", "true or false"),
        ("data.sample_rate=0", "data.sample_rate", "> 0"),
        ("data.sample_rate=-8000", "data.sample_rate", "> 0"),
        ("data.sample_rate=abc", "data.sample_rate", "whole number > 0"),
        ("data.clip_seconds=0", "data.clip_seconds", "> 0"),
        ("data.clip_seconds=-1", "data.clip_seconds", "> 0"),
        ("data.val_fraction=1.5", "data.val_fraction", "< 1"),
        ("data.on_bad_file=ignore", "data.on_bad_file", "one of error, skip"),
        ("features.n_mels=0", "features.n_mels", "> 0"),
        ("features.mel_scale=bark", "features.mel_scale", "one of slaney"),
        ("run.train=yes", "run.train", "true or false"),
        ("run.export_formats=[pdf]", r"run.export_formats\[0\]", "one of onnx"),
        ("augmentations.spec_augment.time_masks=-2", "time_masks", ">= 0"),
        ("augmentations.spec_augment.mask_value=zero", "mask_value", "mean"),
        ("model.quantization.backend=arm", "model.quantization.backend", "one of xnnpack"),
        # Ranges frozen before QAT observed a batch: conversion failed on empty ranges.
        ("model.quantization.freeze_observer_epoch=0", "freeze_observer_epoch", ">= 1"),
    ],
)
def test_bad_config_value_names_the_key_and_what_it_allows(compose_config, override, key, allowed):
    with pytest.raises(ConfigError, match=rf"{key} must be .*{allowed}"):
        load_settings(compose_config(override))


def test_mandatory_value_left_unset_is_named(compose_config):
    with pytest.raises(ConfigError, match=r"data.root must be set"):
        load_settings(compose_config("data=folder"))


def test_output_folder_that_cannot_be_written_is_named_at_start(compose_config, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    config = compose_config(f"system.output_dir={tmp_path / 'taken' / 'run'}")
    with pytest.raises(ConfigError, match="system.output_dir: cannot write"):
        run(config)


def test_the_write_check_of_one_process_leaves_anothers_alone(tmp_path):
    # torchrun's ranks check rank 0's folder at once: one rank's probe removed by another
    # failed the job ("cannot write ... No such file or directory") in a fold's folder.
    (tmp_path / ".write-check").write_text("another rank's probe")
    assert make_output_dir(str(tmp_path)) == tmp_path
    assert (tmp_path / ".write-check").read_text() == "another rank's probe"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".write-check"]


def test_fractions_that_leave_no_training_clips_are_an_error(compose_config):
    config = compose_config("data.val_fraction=0.5", "data.test_fraction=0.5")
    with pytest.raises(ConfigError, match=r"data.val_fraction \+ data.test_fraction"):
        load_settings(config)


def test_clip_shorter_than_one_feature_frame_is_an_error_naming_clip_seconds(compose_config):
    with pytest.raises(ConfigError, match=r"data.clip_seconds=0.001 is too short"):
        run(compose_config("data.clip_seconds=0.001"))


def test_bad_augmentation_transform_is_a_config_error(compose_config):
    config = compose_config("augmentations.audio.transforms.0.name=no_such_transform")
    with pytest.raises(ConfigError, match=r"transforms\[0\]: unknown transform"):
        run(config)


def test_teacher_without_checkpoint_path_is_named(compose_config):
    with pytest.raises(ConfigError, match="teacher_model.checkpoint_path"):
        load_settings(compose_config("teacher_model=panns_mobilenetv1"))


def _main(*arguments: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_bad_value_on_the_command_line_is_one_line_and_exit_status_2(tmp_path):
    result = _main("data.sample_rate=abc", f"hydra.run.dir={tmp_path}")
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "data.sample_rate must be a whole number > 0, not 'abc'" in output
    assert "Traceback" not in output
    debug = _main("data.sample_rate=abc", "system.log_level=DEBUG", f"hydra.run.dir={tmp_path}")
    assert debug.returncode == 2
    assert "Traceback" in debug.stdout + debug.stderr


def test_runs_started_together_get_their_own_directories(tmp_path):
    processes = [
        subprocess.Popen(
            [sys.executable, str(REPO / "main.py"), "training.epochs=-1"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for process in processes:
        process.communicate(timeout=180)
        assert process.returncode == 2
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        log_text = (run_dir / "cli.log").read_text()
        assert log_text.count("training.epochs must be") == 1


# ---------------------------------------------------------------- 4. cache faults heal


@pytest.fixture
def twelve_clips(tmp_path) -> list[Path]:
    files = []
    for digit in range(4):
        for index in (10, 11, 12):
            target = tmp_path / "audio" / f"{digit}_{index}.wav"
            target.parent.mkdir(exist_ok=True)
            shutil.copy(fsdd_clip(digit, index=index), target)
            files.append(target)
    return files


def _dataset(cache_dir: Path, files: list[Path]) -> SpectrogramDataset:
    return SpectrogramDataset(
        clips=[Clip(path, "0") for path in files],
        classes=["0"],
        sample_rate=8000,
        clip_seconds=0.5,
        feature_params=resolve_params("librosa", 8000),
        cache=FeatureCache(cache_dir),
    )


def _damage_shards(cache_dir: Path, how: str) -> list[Path]:
    shards = sorted(path.parent for path in cache_dir.glob("*/cache.db"))
    for shard in shards:
        database = shard / "cache.db"
        if how == "flip":
            data = bytearray(database.read_bytes())
            data[0] ^= 0xFF
            database.write_bytes(bytes(data))
        else:
            os.truncate(database, database.stat().st_size // 3)
    return shards


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_shards_are_rebuilt_with_one_warning_each(tmp_path, twelve_clips, caplog, how):
    cache_dir = tmp_path / "cache"
    dataset = _dataset(cache_dir, twelve_clips)
    for index in range(len(dataset)):
        dataset.cached_features(index)
    dataset.cache._cache.close()  # damage between runs, as a crash or a bad disk leaves it
    damaged = _damage_shards(cache_dir, how)
    assert len(damaged) >= 2
    caplog.clear()
    cache = FeatureCache(cache_dir)
    cache.check()
    warnings = _warnings(caplog)
    assert len(warnings) == len(damaged)
    assert all(any(str(shard) in message for message in warnings) for shard in damaged)
    fresh = _dataset(cache_dir, twelve_clips)
    fresh.cache = cache
    report = prepare(fresh)
    assert report.computed == len(twelve_clips)
    assert len(_warnings(caplog)) == len(damaged)
    reopened = _dataset(cache_dir, twelve_clips)
    assert [reopened.cached_features(i)[1] for i in range(len(reopened))] == [True] * 12


def test_shard_damaged_during_a_run_warns_once(tmp_path, twelve_clips, caplog):
    cache_dir = tmp_path / "cache"
    first = _dataset(cache_dir, twelve_clips)
    for index in range(len(first)):
        first.cached_features(index)
    first.cache._cache.close()
    _damage_shards(cache_dir, "flip")
    caplog.clear()
    second = _dataset(cache_dir, twelve_clips)
    for index in range(len(second)):
        features, hit = second.cached_features(index)
        assert features.shape[1] == 64
        assert not hit
    assert len(_warnings(caplog)) == 1
    assert "off for the rest of this process" in caplog.text


def test_store_path_taken_by_a_folder_is_replaced(tmp_path, twelve_clips, caplog):
    cache_dir = tmp_path / "cache"
    prepare(_dataset(cache_dir, twelve_clips))
    (array_file,) = (cache_dir / "stores").glob("*.f32")
    array_file.unlink()
    array_file.mkdir()
    (array_file / "inside").write_text("x")
    dataset = _dataset(cache_dir, twelve_clips)
    prepare(dataset)
    assert dataset.store is not None
    assert array_file.is_file()
    again = _dataset(cache_dir, twelve_clips)
    assert prepare(again).cache_hits == len(twelve_clips)


def test_store_folder_that_cannot_be_written_leaves_entry_reads(tmp_path, twelve_clips, caplog):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "stores").write_text("a file where the stores folder belongs")
    dataset = _dataset(cache_dir, twelve_clips)
    report = prepare(dataset)
    assert report.computed == len(twelve_clips)
    assert dataset.store is None
    assert "cannot be written" in caplog.text
    assert dataset[0][0].shape == (1, 51, 64)


_READ_ONLY_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    from audioclf.cache import FeatureCache
    from audioclf.dataset import SpectrogramDataset, prepare
    from audioclf.features import resolve_params
    from audioclf.index import Clip

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    cache = FeatureCache(sys.argv[1])
    cache.check()
    files = [Path(name) for name in sys.argv[2:]]
    dataset = SpectrogramDataset(
        [Clip(path, "0") for path in files], ["0"], 8000, 0.5,
        resolve_params("librosa", 8000), cache,
    )
    report = prepare(dataset)
    print("enabled", cache.enabled, "computed", report.computed, "shape", dataset[0][0].shape)
    """
)


@pytest.mark.parametrize("state", ["empty", "filled"])
def test_read_only_cache_runs_with_the_cache_off_and_one_warning(tmp_path, twelve_clips, state):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    if state == "filled":
        prepare(_dataset(cache_dir, twelve_clips))
    script = tmp_path / "read_only.py"
    script.write_text(_READ_ONLY_SCRIPT)
    command = [sys.executable, str(script), str(cache_dir), *map(str, twelve_clips)]
    if os.geteuid() == 0:
        # Root ignores file modes: mount the folder read-only in a private mount namespace.
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare: cannot make a read-only folder")
        mount = f"mount --bind {cache_dir} {cache_dir} && mount -o remount,bind,ro {cache_dir}"
        command = ["unshare", "--mount", "sh", "-c", f'{mount} && exec "$0" "$@"', *command]
    else:
        for path in [cache_dir, *cache_dir.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stderr
    assert f"feature cache {cache_dir} cannot be written" in warnings[0]
    assert "enabled False computed 12 shape torch.Size([1, 51, 64])" in result.stdout


_ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from torch.utils.data import DataLoader, Dataset
    from audioclf.loading import init_worker

    pids = sys.argv[1]

    def slow_start(worker_id):
        init_worker(worker_id)
        with open(pids, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        time.sleep(120)  # a worker still starting when the main process dies

    class Items(Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, index):
            return torch.zeros(1)

    next(iter(DataLoader(Items(), num_workers=2, worker_init_fn=slow_start)))
    """
)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_loader_workers_die_with_a_killed_main_process(tmp_path):
    script, pids = tmp_path / "orphans.py", tmp_path / "pids"
    script.write_text(_ORPHAN_SCRIPT)
    main = subprocess.Popen([sys.executable, str(script), str(pids)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_pids(pids)) < 2:
        time.sleep(0.1)
    workers = _pids(pids)
    assert len(workers) == 2
    main.send_signal(signal.SIGKILL)
    main.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(map(_alive, workers)):
        time.sleep(0.1)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == []


def test_a_loader_worker_sent_sigterm_by_another_process_ends_quietly():
    # SIGTERM to the whole process group (docker stop, a scheduler): torch's own handler
    # ends a worker quietly only for its parent's SIGTERM, so the workers died of it and the
    # main process reported "DataLoader worker ... is killed by signal: Terminated".
    from torch.utils.data import DataLoader

    from audioclf.loading import worker_options

    loader = DataLoader(list(range(8)), batch_size=2, **worker_options(1))
    batches = iter(loader)
    next(batches)
    (worker,) = batches._workers
    # Sent by a process that is not the worker's parent.
    sender = f"import os, signal; os.kill({worker.pid}, signal.SIGTERM)"
    subprocess.run([sys.executable, "-c", sender], check=True)
    worker.join(timeout=30)
    assert worker.exitcode == 0
    del batches


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


# ---------------------------------------------------------------- 5. Python API


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("samples", [0, 1, 100])
def test_input_shorter_than_one_frame_is_the_same_value_error_for_every_preset(preset, samples):
    with pytest.raises(ValueError, match="shorter than one frame"):
        compute_log_mel(np.zeros(samples, np.float32), 16000, preset)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_int16_pcm_gives_the_same_features_as_the_same_audio_as_float(preset):
    pcm = (load_audio(fsdd_clip(2), 8000) * 32767).round().astype(np.int16)
    from_int = compute_log_mel(pcm, 8000, preset)
    from_float = compute_log_mel(pcm.astype(np.float32) / 32768, 8000, preset)
    np.testing.assert_allclose(from_int, from_float, atol=1e-4)


def test_uint8_pcm_is_centred_and_scaled():
    ramp = np.linspace(-0.5, 0.5, 8000)
    pcm = np.round(ramp * 128 + 128).astype(np.uint8)
    from_uint8 = compute_log_mel(pcm, 8000, "librosa")
    expected = compute_log_mel((pcm.astype(np.float64) - 128) / 128, 8000, "librosa")
    np.testing.assert_allclose(from_uint8, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("waveform", "message"),
    [
        (np.ones(8000, np.complex64), "float or integer PCM"),
        (np.ones(8000, bool), "float or integer PCM"),
        (np.full(8000, np.nan), "NaN or infinite"),
        (np.ones((2, 8000)), "mono"),
    ],
)
def test_unusable_waveform_is_a_value_error_saying_why(waveform, message):
    with pytest.raises(ValueError, match=message):
        compute_log_mel(waveform, 8000, "librosa")


@pytest.mark.parametrize("sample_rate", [0, -16000, "16000", 16000.5, None])
def test_bad_sample_rate_is_named(sample_rate):
    with pytest.raises(ValueError, match="sample_rate"):
        compute_log_mel(np.zeros(16000), sample_rate, "librosa")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"log": "log_offset", "log_offset": 0.0}, "log_offset must be positive"),
        ({"log": "db", "amin": 0.0}, "amin must be positive"),
        ({"top_db": -1.0}, "top_db must be"),
    ],
)
def test_log_parameters_that_give_infinite_features_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        compute_log_mel(np.zeros(16000), 16000, "librosa", **overrides)


@pytest.mark.parametrize("num_classes", ["3", None, 2.5, True, 0])
def test_bad_class_count_is_a_model_error_naming_it(num_classes):
    with pytest.raises(ModelError, match="num_classes"):
        create_model("efficientnet_v2", num_classes)


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("efficientnet_v2", {"width_mult": 0}, "width_mult must be > 0"),
        ("efficientnet_v2", {"depth_mult": -1.0}, "depth_mult must be > 0"),
        ("efficientnet_v2", {"width_mult": "wide"}, "width_mult must be a finite number"),
        ("efficientnet_v2", {"dropout": 1.5}, r"dropout must be in \[0.0, 1.0\)"),
        ("efficientnet_v2", {"arcface": "yes"}, "arcface must be true or false"),
        ("ghost_efficientnet_v2", {"ghost_ratio": 2.5}, "ghost_ratio must be a whole number"),
        ("ghost_efficientnet_v2", {"width_mult": 0.0}, "width_mult must be > 0"),
        ("panns_cnn14", {"n_mels": 0}, "n_mels must be >= 1"),
        ("panns_mobilenetv2", {"dropout": -0.1}, "dropout must be in"),
    ],
)
def test_bad_model_parameter_is_a_model_error_naming_it(name, params, key):
    with pytest.raises(ModelError, match=key):
        create_model(name, 3, **params)


def test_bad_audio_reason_names_the_path_and_is_the_same_every_time(tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really audio")
    reasons = []
    for _ in range(2):
        with pytest.raises(BadAudioError) as caught:
            load_audio(broken, 8000)
        reasons.append(caught.value.reason)
    assert reasons[0] == reasons[1]
    assert "0x" not in reasons[0]
    assert "BytesIO" not in reasons[0]
    assert str(caught.value).startswith(str(broken))


@pytest.mark.parametrize(
    "normalization",
    [
        {"mean": [0.0, 1.0], "std": [1.0]},
        {"mean": "x", "std": [1.0]},
        {"mean": [0.0], "std": [0.0]},
    ],
)
def test_unusable_normalisation_in_a_checkpoint_names_the_file(tmp_path, normalization):
    from audioclf.checkpoint import stored_normalization

    with pytest.raises(CheckpointError, match="model.pth: unusable normalisation"):
        stored_normalization({"normalization": normalization}, tmp_path / "model.pth")


def test_onnx_export_without_its_packages_stops_at_start(compose_config, monkeypatch):
    import audioclf.settings as settings

    monkeypatch.setattr(settings, "_installed", lambda module: module != "onnxruntime")
    with pytest.raises(ConfigError, match=r"needs onnxruntime: pip install -e \".\[export\]\""):
        load_settings(compose_config("run.export=true"))
    load_settings(compose_config("run.export=true", "run.export_formats=[torchscript]"))


def test_a_full_disk_anywhere_in_the_main_job_is_one_line_and_exit_status_2(tmp_path, monkeypatch):
    import errno
    import sys

    from audioclf import cli

    def full(config):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.json"))

    monkeypatch.setattr(cli, "run", full)
    monkeypatch.setattr(sys, "argv", ["main.py", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    log = (tmp_path / "run" / "cli.log").read_text()  # Hydra's own logging took over
    errors = [line.split(" - ", 1)[1] for line in log.splitlines() if "[ERROR]" in line]
    assert errors == [f"[Errno 28] No space left on device: '{tmp_path / 'metrics.json'}'"]


def test_a_diverged_run_is_one_line_and_exit_status_2(tmp_path, monkeypatch):
    import sys

    from audioclf import cli
    from audioclf.train import TrainingDiverged

    def diverging(config):
        raise TrainingDiverged("training diverged in epoch 2: the validation loss is nan")

    monkeypatch.setattr(cli, "run", diverging)
    monkeypatch.setattr(sys, "argv", ["main.py", f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    log = (tmp_path / "run" / "cli.log").read_text()
    errors = [line.split(" - ", 1)[1] for line in log.splitlines() if "[ERROR]" in line]
    assert errors == ["training diverged in epoch 2: the validation loss is nan"]


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_bad_file_error_says_how_to_skip_bad_files(tmp_path, monkeypatch, policy):
    import sys

    from audioclf import cli

    def bad(config):
        raise BadAudioError(tmp_path / "empty.wav", "empty file (0 bytes)")

    monkeypatch.setattr(cli, "run", bad)
    argv = ["main.py", f"hydra.run.dir={tmp_path / 'run'}", f"data.on_bad_file={policy}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    log = (tmp_path / "run" / "cli.log").read_text()
    errors = [line.split(" - ", 1)[1] for line in log.splitlines() if "[ERROR]" in line]
    hint = " (data.on_bad_file=skip leaves bad files out, and counts and lists them)"
    # Under skip, a file that goes bad after the check is not the policy's to mend.
    assert errors == [f"{tmp_path / 'empty.wav'}: empty file (0 bytes){hint * (policy == 'error')}"]
