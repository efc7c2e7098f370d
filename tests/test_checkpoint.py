"""Checkpoints and resume: contents, finding last.pth, refusing other architectures, classes or
settings, interrupted and failed saves, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader

from audioclf.augment import AudioAugment, SpecAugment
from audioclf.cache import FeatureCache
from audioclf.checkpoint import (
    load_checkpoint,
    resume_conflicts,
    resume_path,
    save_checkpoint,
)
from audioclf.cli import run
from audioclf.dataset import SpectrogramDataset
from audioclf.features import resolve_params
from audioclf.index import Clip
from audioclf.loading import EpochSampler, make_loader
from audioclf.model import CheckpointError
from audioclf.runtime import Terminated, sigterm_stops_like_ctrl_c
from audioclf.settings import ConfigError
from audioclf.train import Trainer
from conftest import (
    TinyNet,
    fsdd_clip,
    separable_loaders,
    tiny_split_manifest,
    tiny_trainer,
    training_options,
    write_manifest,
)


def test_checkpoint_holds_what_test_predict_and_export_need(tmp_path):
    extra = {"config": {"a": 1}, "features": {"n_mels": 8}, "normalization": None}
    trainer = tiny_trainer(tmp_path, training_options(epochs=1), checkpoint_extra=extra)
    trainer.fit(*separable_loaders(16))
    content = load_checkpoint(trainer.last_path)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "rng", "metrics"):
        assert key in content
    assert content["classes"] == ["a", "b", "c"]
    assert (content["config"], content["features"]) == ({"a": 1}, {"n_mels": 8})
    fresh = TinyNet(3)
    fresh.load_state_dict(content["model"])


def _last(folder, mtime: int):
    path = folder / "checkpoints" / "last.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_resume_true_finds_this_runs_last_or_the_newest_under_outputs(tmp_path):
    outputs = tmp_path / "outputs"
    older = _last(outputs / "2026-11-23" / "10-00-00", 1_000)
    newer = _last(outputs / "2026-11-24" / "09-00-00", 2_000)
    here = outputs / "2026-11-25" / "08-00-00"
    assert resume_path(True, here) == newer  # other days are searched too
    own = _last(here, 500)
    assert resume_path(True, here) == own  # this run's own, even when older
    assert resume_path(str(older), here) == older
    with pytest.raises(ConfigError, match="run.resume=true: no .*last.pth under"):
        resume_path(True, tmp_path / "elsewhere" / "day" / "time")


def test_resume_true_in_a_sweep_takes_the_same_job_number(tmp_path):
    sweeps = tmp_path / "multirun"
    job_0 = _last(sweeps / "2026-11-24" / "10-00-00" / "0", 1_000)
    _last(sweeps / "2026-11-24" / "10-00-00" / "1", 2_000)  # newer, but another job's run
    assert resume_path(True, sweeps / "2026-11-25" / "08-00-00" / "0") == job_0
    # Job 2 never began before the sweep was stopped: it starts now (the sweep goes on).
    assert resume_path(True, sweeps / "2026-11-25" / "08-00-00" / "2") is None


def test_resume_true_in_cross_validation_takes_the_same_fold(tmp_path, caplog):
    # Fold 2 of the interrupted run is newer, and its model has trained on fold 1's test clips.
    outputs = tmp_path / "outputs"
    fold_1 = _last(outputs / "2026-11-24" / "10-00-00" / "fold_1", 1_000)
    fold_2 = _last(outputs / "2026-11-24" / "10-00-00" / "fold_2", 2_000)
    now = outputs / "2026-11-25" / "08-00-00"
    assert resume_path(True, now / "fold_1") == fold_1
    assert resume_path(True, now / "fold_2") == fold_2
    assert resume_path(True, now / "fold_3") is None
    assert "no earlier run of fold_3" in caplog.text
    sweep_job = _last(tmp_path / "multirun" / "2026-11-24" / "10-00-00" / "1" / "fold_2", 500)
    assert resume_path(True, tmp_path / "multirun" / "d" / "t" / "1" / "fold_2") == sweep_job
    # A plain run still needs something to resume: folds are not runs.
    with pytest.raises(ConfigError, match=r"no \*/\*/checkpoints/last.pth under"):
        resume_path(True, now)


def test_a_checkpoint_for_another_architecture_names_the_differing_keys(tmp_path):
    trainer = tiny_trainer(tmp_path, training_options(epochs=1))
    trainer.fit(*separable_loaders(16))
    other = Trainer(TinyNet(3, channels=4), training_options(), ["a", "b", "c"], tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"last.pth does not fit .*conv\.0\.weight"):
        other.fit(*separable_loaders(16), resume_from=trainer.last_path)


def test_resume_for_other_classes_is_refused(tmp_path):
    trainer = tiny_trainer(tmp_path, training_options(epochs=1))
    trainer.fit(*separable_loaders(16))
    other = tiny_trainer(tmp_path / "b", classes=("x", "y", "z"))
    with pytest.raises(CheckpointError, match=r"classes \['a', 'b', 'c'\]"):
        other.fit(*separable_loaders(16), resume_from=trainer.last_path)


def test_resume_with_other_settings_than_the_checkpoints_is_refused_naming_them(tmp_path):
    config = {"training": {"lr": 0.03, "epochs": 1}, "model": {"name": "tiny"}}
    trainer = tiny_trainer(
        tmp_path, training_options(epochs=1), checkpoint_extra={"config": config}
    )
    trainer.fit(*separable_loaders(16))
    # More epochs and another worker count may change; the learning rate may not.
    longer = {"training": {"lr": 0.03, "epochs": 2}, "model": {"name": "tiny"}}
    longer["system"] = {"num_workers": 4}
    resumed = tiny_trainer(
        tmp_path / "b", training_options(epochs=2), checkpoint_extra={"config": longer}
    )
    assert len(resumed.fit(*separable_loaders(16), resume_from=trainer.last_path)["history"]) == 2
    other = {"training": {"lr": 0.01, "epochs": 2}, "model": {"name": "tiny"}}
    refused = tiny_trainer(
        tmp_path / "c", training_options(epochs=2), checkpoint_extra={"config": other}
    )
    with pytest.raises(CheckpointError) as error:
        refused.fit(*separable_loaders(16), resume_from=trainer.last_path)
    assert "(training.lr: 0.03 -> 0.01); " in str(error.value)
    assert f"run.checkpoint_path={trainer.last_path} run.train=true" in str(error.value)


def test_resume_conflicts_name_an_added_teacher_and_skip_model_parameters_added_since():
    trained = {"model": {"name": "m", "params": {"width": 1}}, "teacher_model": None}
    current = {
        "model": {"name": "m", "params": {"width": 1, "added_since": True}},
        "teacher_model": {"name": "t", "params": {"n": 2}, "checkpoint_path": "t.pth"},
    }
    assert resume_conflicts(trained, current) == ["teacher_model.name: (unset) -> t"]
    assert resume_conflicts(trained, trained) == []


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("the process died here")


def test_a_save_interrupted_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    big = {"model": {f"w{i}": torch.randn(1000) for i in range(50)}, "later": _Unpicklable()}
    with pytest.raises(RuntimeError, match="died"):
        save_checkpoint(path, big)
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 1
    assert torch.equal(kept["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_a_full_disk_during_a_save_is_named_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch
):
    # torch.save's zip writer turned the failed write into "unexpected pos 2976512 vs ...".
    import errno
    import pathlib

    class Disk:  # a file on a disk that fills after 64 KB
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 65536:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    path = tmp_path / "last.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    real_open = pathlib.Path.open
    monkeypatch.setattr(
        pathlib.Path,
        "open",
        lambda self, *a, **k: (
            Disk(real_open(self, *a, **k)) if "partial" in self.name else real_open(self, *a, **k)
        ),
    )
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(path, {"model": {"w": torch.randn(100_000)}, "epoch": 2})
    assert f"{path}: cannot write it (No space left on device; " in str(error.value)
    assert "MB free on its disk); the previous one is intact" in str(error.value)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


@pytest.mark.parametrize(
    ("name", "raised"), [("SIGINT", KeyboardInterrupt), ("SIGTERM", Terminated)]
)
def test_ctrl_c_or_sigterm_during_a_save_takes_effect_once_the_file_is_written(
    tmp_path, monkeypatch, name, raised
):
    # Before: the KeyboardInterrupt cut torch.save's zip writer, whose cleanup then raised
    # "unexpected pos" over it: a traceback instead of the interrupt (1 run in 4 of the
    # Ctrl-C test). SIGTERM raises as Ctrl-C does in the main job.
    import signal

    import audioclf.checkpoint

    real_save = torch.save

    def interrupted_save(content, handle):
        os.kill(os.getpid(), getattr(signal, name))
        real_save(content, handle)

    monkeypatch.setattr(audioclf.checkpoint.torch, "save", interrupted_save)
    path = tmp_path / "last.pth"
    with sigterm_stops_like_ctrl_c(), pytest.raises(raised):
        save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_ctrl_c_while_saving_last_still_writes_best(tmp_path, monkeypatch):
    import signal

    import audioclf.train_state

    trainer = tiny_trainer(tmp_path, training_options(epochs=3))
    real_save = audioclf.train_state.save_checkpoint

    def save(path, content):
        if path == trainer.last_path:
            os.kill(os.getpid(), signal.SIGINT)
        real_save(path, content)

    monkeypatch.setattr(audioclf.train_state, "save_checkpoint", save)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(*separable_loaders(16))
    # The first epoch improves on nothing: both files hold it, so a resume agrees with best.
    assert load_checkpoint(trainer.last_path)["epoch"] == 1
    assert load_checkpoint(trainer.best_path)["epoch"] == 1


def _fsdd_training(tmp_path) -> tuple[DataLoader, DataLoader]:
    """Real clips with every random part on: audio augmentation, crops, SpecAugment."""
    params = resolve_params("librosa", 8000)
    cache = FeatureCache(tmp_path / "cache")
    clips = [Clip(fsdd_clip(d, index=i), str(d)) for d in (0, 1) for i in range(10, 16)]
    train = SpectrogramDataset(
        clips,
        ["0", "1"],
        8000,
        0.5,
        params,
        cache,
        training=True,
        audio_augment=AudioAugment(
            [{"name": "gain", "p": 0.5}, {"name": "gaussian_snr", "p": 0.5}]
        ),
        spec_augment=SpecAugment(),
    )
    val = SpectrogramDataset(clips[:4], ["0", "1"], 8000, 0.5, params, cache)
    sampler = EpochSampler(len(train), seed=7)
    return (
        make_loader(train, 4, shuffle=False, sampler=sampler),
        make_loader(val, 4, shuffle=False),
    )


class _KilledAt(Exception):
    pass


class _DyingLoader:
    """A loader that dies partway into epoch `epoch` (0-based), as a killed process would."""

    def __init__(self, loader: DataLoader, epoch: int, after_batches: int) -> None:
        self.loader, self.epoch, self.after = loader, epoch, after_batches
        self.sampler, self.dataset = loader.sampler, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for count, batch in enumerate(self.loader):
            if self.sampler.epoch == self.epoch and count == self.after:
                raise _KilledAt
            yield batch


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    options = training_options(epochs=3, lr=1e-2, mixup_alpha=0.4, warmup_epochs=1.0)
    train, val = _fsdd_training(tmp_path)
    whole = tiny_trainer(tmp_path / "whole", options, classes=("0", "1"), seed=3)
    whole.fit(train, val)

    interrupted = tiny_trainer(tmp_path / "cut", options, classes=("0", "1"), seed=3)
    with pytest.raises(_KilledAt):
        interrupted.fit(_DyingLoader(train, epoch=2, after_batches=1), val)
    assert load_checkpoint(interrupted.last_path)["epoch"] == 2
    resumed = tiny_trainer(tmp_path / "cut", options, classes=("0", "1"), seed=3)
    torch.manual_seed(12345)  # whatever the new process drew before does not matter
    resumed.fit(train, val, resume_from=interrupted.last_path)

    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_a_run_resumed_on_more_clips_keeps_the_normalisation_it_trained_with(
    compose_config, tmp_path
):
    # data.manifest may change on resume (the data moved, or grew); the model's input
    # statistics may not: they come from the checkpoint, not from the new training split.
    first = run(
        compose_config(*tiny_split_manifest(tmp_path), "run.train=true", "training.epochs=1")
    )
    last = tmp_path / "outputs" / "checkpoints" / "last.pth"
    stored = load_checkpoint(last)["normalization"]
    rows = [
        (f"{d}_{speaker}_{i}.wav", str(d), split)
        for d in (1, 2)
        for speaker, i, split in [
            ("jackson", 10, "train"),
            ("jackson", 11, "train"),
            ("jackson", 12, "train"),
            ("jackson", 13, "train"),
            ("theo", 20, "train"),
            ("theo", 21, "train"),
            ("jackson", 5, "val"),
            ("jackson", 6, "val"),
            ("jackson", 0, "test"),
            ("jackson", 1, "test"),
        ]
    ]
    grown = write_manifest(tmp_path / "grown.csv", ["path", "label", "split"], rows)
    resumed = run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            f"data.manifest={grown}",
            "run.train=true",
            "training.epochs=2",
            f"run.resume={last}",
            f"system.output_dir={tmp_path / 'resumed'}",
        )
    )
    assert resumed["splits"]["train"]["clips"] == 12 > first["splits"]["train"]["clips"] == 8
    assert (
        load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pth")["normalization"]
        == stored
    )


def test_a_run_resumed_in_a_new_folder_keeps_the_earlier_best(tmp_path):
    trainer = tiny_trainer(tmp_path / "first", training_options(epochs=2))
    trainer.fit(*separable_loaders())
    # No later epoch can beat the earlier best: the resumed run must end on that best.
    options = training_options(epochs=3, min_delta=1.0)
    resumed = tiny_trainer(tmp_path / "second", options)
    resumed.fit(*separable_loaders(), resume_from=trainer.last_path)
    earlier = load_checkpoint(trainer.best_path)
    assert resumed.best_path.exists()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, earlier["model"][name]), name
