"""The trainer: fitting, clipping, early stopping, schedules, checkpoints, resume, metrics,
losses, TensorBoard events, and the main job's train / test / test-from-checkpoint paths."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from audioclf import runtime
from audioclf.audio import fix_length, load_audio
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
from audioclf.features import LogMelParams, log_mel, resolve_params
from audioclf.index import Clip, DatasetError
from audioclf.loading import EpochSampler, make_loader
from audioclf.losses import classification_loss, distillation_loss, mixup
from audioclf.metrics import multiclass_metrics, multilabel_metrics, write_evaluation
from audioclf.model import CheckpointError, Model
from audioclf.model.heads import LinearHead
from audioclf.normalization import FeatureNormalization
from audioclf.pipeline import class_weights
from audioclf.predict import load_predictor
from audioclf.schedules import EarlyStopping, Schedule, ScheduleSpec, lr_factor, make_optimizer
from audioclf.settings import ConfigError, DistillationConfig, TrainingConfig
from audioclf.train import Trainer, TrainingDiverged
from conftest import (
    FSDD,
    REPO,
    esc50_like,
    fsdd_clip,
    fsdd_manifest,
    tiny_split_manifest,
    torchrun,
    write_manifest,
)


class TinyNet(Model):
    """Conv-BN-ReLU, mean pool, dropout, linear: a few hundred parameters."""

    def __init__(self, num_classes: int, channels: int = 8) -> None:
        super().__init__(num_classes)
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.classifier = LinearHead(channels, num_classes, dropout=0.2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def _options(**changes) -> TrainingConfig:
    base = {
        "epochs": 3,
        "lr": 3e-2,
        "warmup_epochs": 0.0,
        "channels_last": False,
        "early_stopping_patience": None,
    }
    return TrainingConfig(**{**base, **changes})


def _separable(n: int = 48, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Features whose mean level gives the class away."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    features = torch.randn(n, 1, 16, 8, generator=generator) + labels.view(-1, 1, 1, 1) * 3.0
    return TensorDataset(features, labels)


def _loaders(n: int = 48) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(_separable(n), batch_size=16, shuffle=True)
    val = DataLoader(_separable(24, seed=1), batch_size=16)
    return train, val


def _trainer(tmp_path, options=None, classes=("a", "b", "c"), **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = TinyNet(len(classes))
    return Trainer(model, options or _options(), list(classes), tmp_path / "run", **kwargs)


# ---------------------------------------------------------------- fitting


def test_a_short_fit_lowers_the_loss_and_learns(tmp_path):
    trainer = _trainer(tmp_path, _options(epochs=8))
    train, val = _loaders(96)
    result = trainer.fit(train, val)
    losses = [record["train_loss"] for record in result["history"]]
    assert losses[-1] < losses[0] * 0.7
    assert result["history"][-1]["val_accuracy"] > 0.8


def test_accumulated_batches_step_as_one_batch_of_their_clips(tmp_path, caplog):
    # 10 clips in batches of 4, two batches a step: the steps of batches of 8 (4 + 4, then the
    # 2 left over alone), so the same weights. No BatchNorm or dropout: their batch
    # statistics and random draws would differ.
    def fit(batch_size: int, accumulate: int) -> Trainer:
        torch.manual_seed(0)
        model = _plain_net(4)
        options = _options(epochs=2, amp=False, accumulate_grad_batches=accumulate)
        trainer = Trainer(model, options, ["a", "b", "c"], tmp_path / f"{batch_size}x{accumulate}")
        train = DataLoader(_separable(10), batch_size=batch_size)
        trainer.fit(train, DataLoader(_separable(6, seed=1), batch_size=6))
        return trainer

    caplog.set_level(logging.INFO, logger="audioclf")
    accumulated, large, small = fit(4, 2), fit(8, 1), fit(4, 1)
    assert "10 clips in 3 batches per epoch, an optimizer step every 2 batches;" in caplog.text
    for key, value in large.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[key], value)
        assert not torch.allclose(small.model.state_dict()[key], value)
    # Two optimizer steps an epoch: the schedule and the logged gradient norm are per step.
    assert accumulated.schedule.state_dict() == large.schedule.state_dict()
    for one, other in zip(accumulated.history, large.history, strict=True):
        assert one["lr"] == pytest.approx(other["lr"])
        assert one["grad_norm"] == pytest.approx(other["grad_norm"], rel=1e-5)


def _plain_net(channels: int) -> nn.Module:
    """A plain PyTorch module (no `labels` parameter, no BatchNorm or dropout): conv, ReLU,
    mean pool, linear, for 3 classes."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 3),
    )


def test_any_module_that_takes_features_trains(tmp_path):
    # A plain PyTorch module has no `labels` parameter: it was called with two arguments.
    torch.manual_seed(0)
    model = _plain_net(8)
    trainer = Trainer(model, _options(epochs=8), ["a", "b", "c"], tmp_path)
    train, val = _loaders(96)
    best = trainer.fit(train, val)["best"]
    assert best > 0.9
    assert trainer.test(val)[0] == pytest.approx(best)  # the best weights, loaded


def test_bf16_autocast_trains_on_the_cpu_and_evaluation_is_float32(tmp_path):
    trainer = _trainer(tmp_path, _options(epochs=1, amp=True))
    seen = []
    trainer.model.classifier.fc.register_forward_hook(
        lambda module, i, o: seen.append((module.training, o.dtype))
    )
    train, val = _loaders()
    trainer.fit(train, val)
    assert (trainer.amp, trainer.amp_dtype) == (True, torch.bfloat16)
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    # Validation and test see the float32 model that is saved, exported and quantised.
    assert {dtype for training, dtype in seen if not training} == {torch.float32}
    logits, _, _ = trainer.evaluate(val)
    features = torch.cat([batch[0] for batch in val])
    with torch.no_grad():
        assert torch.equal(logits, trainer.model.eval()(features))
    assert math.isfinite(trainer.history[-1]["train_loss"])


def _fit_without_dropout(tmp_path, **options) -> Trainer:
    trainer = _trainer(tmp_path, _options(epochs=2, **options))
    trainer.model.classifier.dropout.p = 0.0  # inductor draws other random numbers than eager
    trainer.fit(*_loaders())
    return trainer


@pytest.mark.skipif(not runtime.has_compiler(), reason="torch.compile needs a C++ compiler")
def test_compiled_training_computes_what_eager_training_does(tmp_path):
    eager = _fit_without_dropout(tmp_path / "eager")
    compiled = _fit_without_dropout(tmp_path / "compiled", compile=True)
    assert compiled.step_model.compiled is not None  # still compiled at the end
    for ours, theirs in zip(compiled.history, eager.history, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-3)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-3)


def test_compile_without_a_compiler_trains_eagerly_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "has_compiler", lambda: False)
    with caplog.at_level(logging.WARNING, logger="audioclf.runtime"):
        trainer = _fit_without_dropout(tmp_path, compile=True)
    assert trainer.step_model.compiled is None
    warnings = [r.getMessage() for r in caplog.records if "training.compile" in r.getMessage()]
    assert warnings == ["training.compile: no C++ compiler found; training runs eagerly"]


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch, caplog):
    def broken(model):
        def run(*args):
            raise RuntimeError("C++ compile error\ndetails")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="audioclf.runtime"):
        trainer = _fit_without_dropout(tmp_path, compile=True)
    assert trainer.step_model.compiled is None
    assert len(trainer.history) == 2
    assert math.isfinite(trainer.history[-1]["train_loss"])
    warnings = [r.getMessage() for r in caplog.records if "training.compile" in r.getMessage()]
    assert warnings == [
        "training.compile: torch.compile failed (RuntimeError: C++ compile error); "
        "training runs eagerly"
    ]


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_on_the_cpu_is_bf16_where_the_cpu_has_it(tmp_path, monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    trainer = _trainer(tmp_path, _options(amp="auto"))
    assert (trainer.amp, trainer.amp_dtype) == (
        (True, torch.bfloat16) if native else (False, torch.float32)
    )


def test_a_diverging_run_stops_before_saving_non_finite_weights(tmp_path):
    # At lr 1e6 the loss reached 1.8e14, then NaN: the run went on, saved NaN weights as
    # last.pth, tested and exported them, and ended in a failed export check.
    trainer = _trainer(tmp_path, _options(epochs=4, lr=1e6, grad_clip_norm=None))
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch \d.*lower training.lr") as e:
        trainer.fit(*_loaders())
    assert "training.grad_clip_norm (off)" in str(e.value)
    for path in trainer.output_dir.glob("checkpoints/*.pth"):
        weights = load_checkpoint(path)["model"].values()
        assert all(torch.isfinite(value).all() for value in weights if value.is_floating_point())


def test_a_non_finite_gradient_stops_the_step_that_would_write_it(tmp_path):
    trainer = _trainer(tmp_path, _options(epochs=2))
    features, labels = _separable(32).tensors
    features[20, 0, 0, 0] = float("inf")  # the second batch of the first epoch
    loader = DataLoader(TensorDataset(features, labels), batch_size=16)
    before = [parameter.detach().clone() for parameter in trainer.model.parameters()]
    with pytest.raises(TrainingDiverged, match=r"epoch 1: batch 2 of 2 .*no checkpoint"):
        trainer.fit(loader, _loaders()[1])
    after = list(trainer.model.parameters())
    assert all(torch.isfinite(parameter).all() for parameter in after)
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))  # batch 1


def test_clipping_by_norm_bounds_the_gradient_norm(tmp_path):
    trainer = _trainer(tmp_path, _options(epochs=1, grad_clip_norm=1e-3, lr=1e-9))
    train, val = _loaders(16)
    trainer.fit(train, val)
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in trainer.model.parameters() if p.grad is not None])
    )
    assert norm <= 1e-3 * (1 + 1e-5)
    # The logged norm is the one before clipping.
    assert trainer.history[-1]["grad_norm"] > 1e-3


def test_clipping_by_value_bounds_every_gradient(tmp_path):
    trainer = _trainer(tmp_path, _options(epochs=1, grad_clip_norm=None, grad_clip_value=1e-4))
    trainer.fit(*_loaders(16))
    largest = max(p.grad.abs().max() for p in trainer.model.parameters() if p.grad is not None)
    assert largest <= 1e-4


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path):
    # No improvement can exceed a min_delta of 1 (accuracy): epoch 1 is the best, then 2 more.
    options = _options(epochs=10, early_stopping_patience=1, min_delta=1.0)
    result = _trainer(tmp_path, options).fit(*_loaders())
    assert len(result["history"]) == 3


def test_early_stopping_counts_min_delta_and_mode():
    stopper = EarlyStopping("min", patience=2, min_delta=0.1)
    assert [stopper.update(v) for v in (1.0, 0.95, 0.85, 0.9, 0.8)] == [
        True,
        False,
        True,
        False,
        False,
    ]
    assert not stopper.should_stop
    stopper.update(0.9)
    assert stopper.should_stop


def test_fit_ends_with_the_best_weights(tmp_path):
    trainer = _trainer(tmp_path, _options(epochs=4))
    trainer.fit(*_loaders())
    best = load_checkpoint(trainer.best_path)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, best["model"][name]), name


@pytest.mark.parametrize(("multi_label", "monitor"), [(False, "val_accuracy"), (True, "val_mAP")])
def test_the_auto_monitor_is_map_on_multi_label_data(tmp_path, multi_label, monitor):
    trainer = _trainer(tmp_path, _options(monitor="auto"), multi_label=multi_label)
    assert (trainer.monitor, trainer.mode) == (monitor, "max")


def test_unknown_monitor_is_named(tmp_path):
    trainer = _trainer(tmp_path, dataclasses.replace(_options(), monitor="val_mAP"))
    with pytest.raises(ValueError, match="val_mAP"):
        trainer.fit(*_loaders(16))


# ---------------------------------------------------------------- schedules


def _lrs(name: str, steps: int = 20, steps_per_epoch: int = 5, **spec) -> list[float]:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = Schedule(
        optimizer, ScheduleSpec(name, steps, steps_per_epoch, **spec), "max", plateau_patience=1
    )
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step_batch()
    return lrs


def test_cosine_with_warmup_follows_its_formula():
    lrs = _lrs("cosine", warmup_steps=5)
    expected = [0.1 * (s + 1) / 5 for s in range(5)] + [
        0.1 * (1 + math.cos(math.pi * (s - 5) / 15)) / 2 for s in range(5, 20)
    ]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    # No step trains at rate 0: a 3-epoch run of one batch an epoch spent its last epoch so.
    assert min(_lrs("cosine", 3, 1, warmup_steps=1)) > 0


def test_a_warmup_as_long_as_the_run_is_named(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="audioclf.schedules"):
        _trainer(tmp_path, _options(epochs=1, warmup_epochs=2.0)).fit(*_loaders(48))
    assert "warmup_epochs=2 is not shorter than training.epochs=1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="audioclf.schedules"):
        _trainer(tmp_path / "b", _options(epochs=2, warmup_epochs=1.0)).fit(*_loaders(48))
    assert "warmup_epochs" not in caplog.text


def test_the_logged_rate_is_the_one_each_epoch_trained_at(tmp_path):
    # It was the rate after the epoch's last step: the next epoch's, 0 for the last epoch.
    trainer = _trainer(tmp_path, _options(epochs=2, lr=0.1))
    history = trainer.fit(*_loaders(16))["history"]  # one batch an epoch
    assert [record["lr"] for record in history] == pytest.approx([0.1, 0.05])


def test_step_schedule_multiplies_by_gamma_every_step_epochs():
    lrs = _lrs("step", step_epochs=2, gamma=0.5)
    expected = [0.1 * 0.5 ** ((s // 5) // 2) for s in range(20)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)


def test_constant_schedule_is_constant_after_warmup():
    assert _lrs("constant", warmup_steps=2)[:4] == pytest.approx([0.05, 0.1, 0.1, 0.1])


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_onecycle_matches_pytorchs_one_cycle_lr_and_momentum(optimizer_name):
    def curve(schedule_for, step):
        optimizer = make_optimizer(nn.Linear(2, 2).parameters(), optimizer_name, 0.1, 0.0)
        schedule = schedule_for(optimizer)
        seen = []
        for _ in range(20):
            group = optimizer.param_groups[0]
            seen.append((group["lr"], group["betas"][0] if "betas" in group else group["momentum"]))
            optimizer.step()
            step(schedule)
        return seen

    expected = curve(
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
        lambda schedule: schedule.step(),
    )
    # Momentum (Adam's beta1) falls from 0.95 to 0.85 while the rate rises, then back up.
    actual = curve(
        lambda o: Schedule(o, ScheduleSpec("onecycle", 20, 5)),
        lambda schedule: schedule.step_batch(),
    )
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_plateau_cuts_the_rate_after_patience_epochs():
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    schedule = Schedule(optimizer, ScheduleSpec("plateau", 10, 1), "max", plateau_patience=1)
    for metric in (0.5, 0.5, 0.5):
        schedule.step_epoch(metric)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert lr_factor(ScheduleSpec("plateau", 10, 1), 7) == 1.0


def test_plateau_warms_up_then_cuts_the_rate():
    # Its warmup never ended: the rate stayed at 1/warmup_steps of training.lr all run.
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    spec = ScheduleSpec("plateau", 12, 2, warmup_steps=4)
    schedule = Schedule(optimizer, spec, "max", plateau_patience=0)
    lrs = []
    for _epoch in range(6):
        for _ in range(2):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step_batch()
        schedule.step_epoch(0.5)  # no improvement after the first epoch past warmup
    assert lrs == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125]
    )


def test_a_schedule_resumed_over_a_longer_plan_follows_that_plans_curve(caplog):
    # A run of 10 steps resumed with twice the epochs: the rest of the 20-step curve, not the
    # old plan's last rate (0 at the end of a cosine) for the first resumed step.
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    first = Schedule(optimizer, ScheduleSpec("cosine", 10, 5, warmup_steps=2))
    for _ in range(10):
        optimizer.step()
        first.step_batch()
    assert optimizer.param_groups[0]["lr"] == 0.0
    resumed_optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    longer = Schedule(resumed_optimizer, ScheduleSpec("cosine", 20, 5, warmup_steps=2))
    with caplog.at_level("WARNING", logger="audioclf.schedules"):
        longer.load_state_dict(first.state_dict())
    assert "planned over 10 steps and is now over 20" in caplog.text
    rest = []
    for _ in range(10):
        rest.append(resumed_optimizer.param_groups[0]["lr"])
        resumed_optimizer.step()
        longer.step_batch()
    np.testing.assert_allclose(rest, _lrs("cosine", 20, warmup_steps=2)[10:], rtol=1e-6)


def test_a_finished_run_resumed_with_fewer_epochs_says_nothing_is_left(tmp_path, caplog):
    # It said only that the schedule was re-planned "at 0 times the base rate", and trained
    # nothing.
    _trainer(tmp_path, _options(epochs=2)).fit(*_loaders(16))
    resumed = _trainer(tmp_path / "again", _options(epochs=1))
    with caplog.at_level("INFO"):
        resumed.fit(*_loaders(16), resume_from=tmp_path / "run" / "checkpoints" / "last.pth")
    assert "has trained 2 epochs (training.epochs=1): nothing left to train" in caplog.text
    assert "schedule was planned over" not in caplog.text
    assert len(resumed.history) == 2


# ---------------------------------------------------------------- checkpoints and resume


def test_checkpoint_holds_what_test_predict_and_export_need(tmp_path):
    extra = {"config": {"a": 1}, "features": {"n_mels": 8}, "normalization": None}
    trainer = _trainer(tmp_path, _options(epochs=1), checkpoint_extra=extra)
    trainer.fit(*_loaders(16))
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
    trainer = _trainer(tmp_path, _options(epochs=1))
    trainer.fit(*_loaders(16))
    other = Trainer(TinyNet(3, channels=4), _options(), ["a", "b", "c"], tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"last.pth does not fit .*conv\.0\.weight"):
        other.fit(*_loaders(16), resume_from=trainer.last_path)


def test_resume_for_other_classes_is_refused(tmp_path):
    trainer = _trainer(tmp_path, _options(epochs=1))
    trainer.fit(*_loaders(16))
    other = _trainer(tmp_path / "b", classes=("x", "y", "z"))
    with pytest.raises(CheckpointError, match=r"classes \['a', 'b', 'c'\]"):
        other.fit(*_loaders(16), resume_from=trainer.last_path)


def test_resume_with_other_settings_than_the_checkpoints_is_refused_naming_them(tmp_path):
    config = {"training": {"lr": 0.03, "epochs": 1}, "model": {"name": "tiny"}}
    trainer = _trainer(tmp_path, _options(epochs=1), checkpoint_extra={"config": config})
    trainer.fit(*_loaders(16))
    # More epochs and another worker count may change; the learning rate may not.
    longer = {"training": {"lr": 0.03, "epochs": 2}, "model": {"name": "tiny"}}
    longer["system"] = {"num_workers": 4}
    resumed = _trainer(tmp_path / "b", _options(epochs=2), checkpoint_extra={"config": longer})
    assert len(resumed.fit(*_loaders(16), resume_from=trainer.last_path)["history"]) == 2
    other = {"training": {"lr": 0.01, "epochs": 2}, "model": {"name": "tiny"}}
    refused = _trainer(tmp_path / "c", _options(epochs=2), checkpoint_extra={"config": other})
    with pytest.raises(CheckpointError) as error:
        refused.fit(*_loaders(16), resume_from=trainer.last_path)
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


def test_ctrl_c_during_a_save_takes_effect_once_the_file_is_written(tmp_path, monkeypatch):
    # Before: the KeyboardInterrupt cut torch.save's zip writer, whose cleanup then raised
    # "unexpected pos" over it: a traceback instead of the interrupt (1 run in 4 of the
    # Ctrl-C test).
    import signal

    import audioclf.checkpoint

    real_save = torch.save

    def interrupted_save(content, handle):
        os.kill(os.getpid(), signal.SIGINT)
        real_save(content, handle)

    monkeypatch.setattr(audioclf.checkpoint.torch, "save", interrupted_save)
    path = tmp_path / "last.pth"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_ctrl_c_while_saving_last_still_writes_best(tmp_path, monkeypatch):
    import signal

    import audioclf.train_state

    trainer = _trainer(tmp_path, _options(epochs=3))
    real_save = audioclf.train_state.save_checkpoint

    def save(path, content):
        if path == trainer.last_path:
            os.kill(os.getpid(), signal.SIGINT)
        real_save(path, content)

    monkeypatch.setattr(audioclf.train_state, "save_checkpoint", save)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(*_loaders(16))
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
    options = _options(epochs=3, lr=1e-2, mixup_alpha=0.4, warmup_epochs=1.0)
    train, val = _fsdd_training(tmp_path)
    whole = _trainer(tmp_path / "whole", options, classes=("0", "1"), seed=3)
    whole.fit(train, val)

    interrupted = _trainer(tmp_path / "cut", options, classes=("0", "1"), seed=3)
    with pytest.raises(_KilledAt):
        interrupted.fit(_DyingLoader(train, epoch=2, after_batches=1), val)
    assert load_checkpoint(interrupted.last_path)["epoch"] == 2
    resumed = _trainer(tmp_path / "cut", options, classes=("0", "1"), seed=3)
    torch.manual_seed(12345)  # whatever the new process drew before does not matter
    resumed.fit(train, val, resume_from=interrupted.last_path)

    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


# ---------------------------------------------------------------- evaluation


def test_multiclass_metrics_against_hand_computed_values():
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    metrics = multiclass_metrics(F.one_hot(predicted, 3).float(), targets)
    # precision: 0 -> 1/2, 1 -> 2/3, 2 -> 1; recall: 1/2, 1, 1/2
    precision, recall = [0.5, 2 / 3, 1.0], [0.5, 1.0, 0.5]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["precision"] == pytest.approx(np.mean(precision))
    assert metrics["recall"] == pytest.approx(np.mean(recall))
    assert metrics["f1"] == pytest.approx(np.mean(f1))
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_multilabel_metrics_against_hand_computed_values():
    targets = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])
    scores = torch.tensor([[0.9, 0.2], [0.6, 0.4], [0.3, 0.8], [0.7, 0.1]])
    metrics = multilabel_metrics(torch.logit(scores), targets)
    # label 0: ranked 0.9(+), 0.7(-), 0.6(+), 0.3(-): AP = (1/1 + 2/3) / 2; AUC = 3/4
    # label 1: ranked 0.8(+), 0.4(+), 0.2(-), 0.1(-): AP = 1; AUC = 1
    assert metrics["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert metrics["roc_auc"] == pytest.approx((0.75 + 1) / 2)
    # at 0.5: label 0 predicted [1,1,0,1]: P 2/3, R 1; label 1 predicted [0,0,1,0]: P 1, R 1/2
    assert metrics["precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["recall"] == pytest.approx((1 + 0.5) / 2)
    assert metrics["f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_labels_without_positives_are_left_out_of_map_and_roc_auc(recwarn, tmp_path):
    # The two labels above, plus label 2 (no positive clip) and label 3 (no negative one):
    # 2 has no AP and no ROC-AUC, 3 has AP 1 and no ROC-AUC; neither counts as a 0.
    targets = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1]])
    scores = torch.tensor(
        [[0.9, 0.2, 0.3, 0.6], [0.6, 0.4, 0.1, 0.2], [0.3, 0.8, 0.7, 0.9], [0.7, 0.1, 0.2, 0.4]]
    )
    metrics = multilabel_metrics(torch.logit(scores), targets)
    assert metrics["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1 + 1) / 3)
    assert metrics["roc_auc"] == pytest.approx((0.75 + 1) / 2)
    assert metrics["per_class"]["average_precision"][2:] == [None, pytest.approx(1.0)]
    assert not [w for w in recwarn if "torchmetrics" in w.filename]
    paths = write_evaluation(metrics, ["a", "b", "c", "d"], tmp_path)
    rows = list(csv.DictReader(paths["per_class"].open()))
    assert [row["average_precision"] for row in rows][2:] == ["", "1.0000"]
    assert math.isclose(json.loads(paths["metrics"].read_text())["test"]["mAP"], metrics["mAP"])


def test_class_names_no_font_draws_give_one_warning_not_one_per_glyph_and_drawing(tmp_path, caplog):
    # Chinese class names on a machine without a CJK font: matplotlib warned for each missing
    # glyph on every figure drawn (14 warnings in a 3-epoch run).
    from audioclf import metrics as metrics_module

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = metrics_module.confusion_matrix_figure([[1, 0], [0, 1]], ["café", "Größe"])
        figure.savefig(tmp_path / "latin.png")
        assert not [w for w in caught if "Glyph" in str(w.message)]  # the default font has them
        with caplog.at_level("WARNING", logger="audioclf.metrics"):
            for _ in range(3):
                figure = metrics_module.confusion_matrix_figure([[1, 0], [0, 1]], ["猫", "犬"])
                figure.savefig(tmp_path / "cjk.png")
    assert not [w for w in caught if "Glyph" in str(w.message)]
    # One warning, or none where a font for Chinese is installed (it is then used).
    found = metrics_module._font_for("猫犬") is not None
    assert caplog.text.count("no installed font draws every character") == (0 if found else 1)


def test_test_returns_the_four_figures_and_writes_its_files(tmp_path):
    trainer = _trainer(tmp_path, _options(epochs=2))
    trainer.fit(*_loaders())
    figures = trainer.test(DataLoader(_separable(30, seed=2), batch_size=8))
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    assert figures == (
        written["accuracy"],
        written["precision"],
        written["recall"],
        written["f1"],
    )
    for name in ("test_per_class.csv", "test_confusion_matrix.csv", "test_confusion_matrix.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert sum(map(sum, written["confusion_matrix"])) == 30


def test_console_reports_start_epochs_and_saves_without_a_progress_bar_off_a_terminal(
    tmp_path, caplog, capsys
):
    trainer = _trainer(tmp_path, _options(epochs=2, amp=False))
    parameters = sum(p.numel() for p in trainer.model.parameters())
    with caplog.at_level(logging.INFO, logger="audioclf"):
        trainer.fit(*_loaders())
    lines = [record.getMessage() for record in caplog.records]
    start = next(line for line in lines if line.startswith("training TinyNet"))
    assert f"{parameters:,} parameters" in start
    assert f"on cpu, {torch.get_num_threads()} threads" in start
    assert "48 clips in 3 batches" in start
    assert "amp off, channels_last off, compile off" in start
    assert [line.split("  ")[0] for line in lines if line.startswith("epoch ")] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
    saves = [line for line in lines if line.startswith("saved ")]
    assert len(saves) == 2
    best = trainer.history[0]["val_accuracy"]  # the first epoch is always an improvement
    assert saves[0] == f"saved {trainer.best_path} (val_accuracy {best:.4f}) and last.pth"
    # pytest's captured stderr is not a terminal: no progress bar is drawn.
    assert "epoch 1/2:" not in capsys.readouterr().err


def test_tensorboard_reader_finds_the_runs_events(tmp_path):
    trainer = _trainer(tmp_path, _options(epochs=2))
    trainer.fit(*_loaders())
    accumulator = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={})
    accumulator.Reload()
    tags = accumulator.Tags()
    for scalar in ("train/loss", "train/lr", "train/grad_norm", "val/accuracy", "val/loss"):
        assert scalar in tags["scalars"]
        assert len(accumulator.Scalars(scalar)) == 2
    assert {"val/confusion_matrix", "train/spectrograms"} <= set(tags["images"])
    # The hparams with the final metrics, as TensorBoard's HPARAMS tab reads them.
    hparams = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "hparams"))
    hparams.Reload()
    content = hparams.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["lr"].number_value == pytest.approx(0.03)
    assert start.session_start_info.hparams["lr_schedule"].string_value == "cosine"
    final = hparams.Scalars("hparam/best_val_accuracy")
    assert final[0].value == pytest.approx(trainer.early_stopping.best)
    assert hparams.Scalars("hparam/val_loss")[0].value == pytest.approx(
        trainer.history[-1]["val_loss"]
    )


# ---------------------------------------------------------------- losses


def test_distillation_loss_against_a_hand_computation():
    student = torch.tensor([[2.0, 0.5, -1.0]])
    teacher = torch.tensor([[1.0, 3.0, 0.0]])
    target = torch.tensor([1])
    alpha, temperature = 0.3, 2.0

    def softmax(values):
        exp = np.exp(values - values.max())
        return exp / exp.sum()

    s, t = student.numpy()[0], teacher.numpy()[0]
    hard = -np.log(softmax(s)[1])
    p_t, p_s = softmax(t / temperature), softmax(s / temperature)
    soft = float(np.sum(p_t * np.log(p_t / p_s)))
    expected = alpha * hard + (1 - alpha) * temperature**2 * soft
    loss = distillation_loss(student, teacher, target, alpha, temperature)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Class weights weigh the term on the labels (a weighted mean over the batch).
    weights = torch.tensor([1.0, 4.0, 1.0])
    pair = (torch.cat([student, teacher]), torch.cat([teacher, student]), torch.tensor([1, 0]))
    weighted = distillation_loss(*pair, alpha, temperature, class_weights=weights)
    hard = F.cross_entropy(pair[0], pair[2], weight=weights)
    soft = distillation_loss(*pair, 0.0, temperature)
    assert float(weighted) == pytest.approx(float(alpha * hard + (1 - alpha) * soft), rel=1e-5)


def test_mixup_blends_features_and_targets_with_one_weight():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3])
    # Each example's feature is its label, so a mixed feature is the soft target's mean label.
    mixed, soft, dominant, _ = mixup(labels.float().view(4, 1, 1, 1), labels, 0.4, 4)
    assert torch.allclose(soft.sum(dim=1), torch.ones(4))
    assert torch.allclose(mixed.flatten(), soft @ torch.arange(4.0), atol=1e-6)
    assert torch.equal(dominant, soft.argmax(dim=1))


def test_label_smoothing_against_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    smoothing = 0.1
    log_p = torch.log_softmax(logits, 1)[0].numpy()
    # The true class keeps 1 - smoothing + smoothing / C, the others get smoothing / C each.
    expected = -((1 - smoothing + smoothing / 3) * log_p[0] + smoothing / 3 * log_p[1:].sum())
    loss = classification_loss(logits, torch.tensor([0]), label_smoothing=smoothing)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_multi_label_smoothing_moves_targets_towards_one_half():
    logits = torch.tensor([[1.0, -2.0]])
    p = 1 / (1 + np.exp(-logits[0].numpy()))
    # Targets (1, 0) with smoothing 0.2 become (0.9, 0.1); BCE is the mean over the classes.
    expected = -np.mean(
        [0.9 * np.log(p[0]) + 0.1 * np.log(1 - p[0]), 0.1 * np.log(p[1]) + 0.9 * np.log(1 - p[1])]
    )
    loss = classification_loss(
        logits, torch.tensor([[1, 0]]), multi_label=True, label_smoothing=0.2
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_class_weights_weigh_each_class_term():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    targets = torch.tensor([0, 1])
    weighted = classification_loss(logits, targets, class_weights=torch.tensor([1.0, 0.0]))
    assert float(weighted) == pytest.approx(float(F.cross_entropy(logits[:1], targets[:1])))


def _labelled(labels: list[str], classes: list[str], multi_label: bool) -> SpectrogramDataset:
    clips = [Clip(fsdd_clip(1), label) for label in labels]  # no file is read
    params = resolve_params("librosa", 8000)
    return SpectrogramDataset(clips, classes, 8000, 0.5, params, None, multi_label=multi_label)


def test_class_weights_make_every_class_weigh_the_same_in_total():
    dataset = _labelled(["a"] * 6 + ["b"] * 3 + ["c"], ["a", "b", "c"], multi_label=False)
    weights = class_weights(dataset)
    # N / (C * n_c): 10 / 18, 10 / 9, 10 / 3; each class's clips then sum to N / C.
    assert weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert (weights * torch.tensor([6.0, 3.0, 1.0])).tolist() == pytest.approx([10 / 3] * 3)


def test_multi_label_class_weights_are_negatives_over_positives():
    dataset = _labelled(["a;b", "a", "a", "b"], ["a", "b", "c"], multi_label=True)
    # (N - n_c) / n_c with N = 4 clips: a is on 3, b on 2, c on none (counted as 1).
    assert class_weights(dataset).tolist() == pytest.approx([1 / 3, 1.0, 4.0])


# ---------------------------------------------------------------- the main job


def test_main_job_trains_tests_and_reports(compose_config, tmp_path):
    summary = run(
        compose_config(
            *tiny_split_manifest(tmp_path), "run.train=true", "run.test=true", "training.epochs=2"
        )
    )
    assert len(summary["training"]["history"]) == 2
    assert summary["normalization"] is True
    assert set(summary["test"]) >= {"accuracy", "precision", "recall", "f1", "confusion_matrix"}
    assert (tmp_path / "outputs" / "checkpoints" / "best.pth").exists()
    assert (tmp_path / "outputs" / "metrics.json").exists()


def test_zero_epochs_says_the_model_is_used_untrained(compose_config, tmp_path, caplog):
    config = compose_config(*tiny_split_manifest(tmp_path), "run.train=true", "training.epochs=0")
    with caplog.at_level("WARNING", logger="audioclf"):
        summary = run(config)
    assert "training" not in summary
    assert "training.epochs=0: nothing is trained" in caplog.text
    assert "(random initial weights)" in caplog.text


def test_testing_without_training_or_a_checkpoint_says_the_model_is_untrained(
    compose_config, tmp_path, caplog
):
    # A forgotten run.checkpoint_path: the test metrics are a randomly initialised model's.
    config = compose_config(*tiny_split_manifest(tmp_path), "run.test=true")
    with caplog.at_level("WARNING", logger="audioclf"):
        run(config)
    assert "run.train=false with no run.checkpoint_path" in caplog.text
    assert "(random initial weights)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="audioclf"):
        run(compose_config(*tiny_split_manifest(tmp_path)))  # the data pass alone
    assert "no run.checkpoint_path" not in caplog.text


def test_a_checkpoint_path_that_is_no_checkpoint_is_named_with_its_key(compose_config, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    for path, reason in ((tmp_path / "nope.pth", "no such checkpoint file"), (text, "not a")):
        config = compose_config(*tiny_split_manifest(tmp_path), f"run.checkpoint_path={path}")
        named = rf"^run\.checkpoint_path: {re.escape(str(path))}: {reason}"
        with pytest.raises(CheckpointError, match=named):
            run(config)


def test_normalisation_statistics_come_from_the_training_split_alone(compose_config, tmp_path):
    run(
        compose_config(
            *tiny_split_manifest(tmp_path), "run.train=true", "run.test=false", "training.epochs=1"
        )
    )
    content = load_checkpoint(tmp_path / "outputs" / "checkpoints" / "last.pth")
    stored = FeatureNormalization.from_lists(content["normalization"])
    # Recomputed here from the files: the 8 training clips, centred and padded to the clip.
    params = LogMelParams(**content["features"])
    data = content["config"]["data"]
    clip_samples = round(data["clip_seconds"] * data["sample_rate"])
    with open(data["manifest"], newline="") as file:
        rows = list(csv.DictReader(file))

    def split_features(*splits):
        for row in rows:
            if row["split"] in splits:
                waveform = load_audio(FSDD / row["path"], data["sample_rate"])
                yield log_mel(fix_length(waveform, clip_samples), params)

    expected = FeatureNormalization.fit(split_features("train"))
    np.testing.assert_allclose(stored.mean, expected.mean, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stored.std, expected.std, rtol=1e-5, atol=1e-4)
    with_test_clips = FeatureNormalization.fit(split_features("train", "test"))
    assert not np.allclose(stored.mean, with_test_clips.mean, atol=1e-2)


@pytest.mark.parametrize(
    "override", ["features.normalize=false", "model=panns_mobilenetv1"], ids=["off", "panns"]
)
def test_no_normalisation_when_off_or_the_model_has_its_own(compose_config, tmp_path, override):
    summary = run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.train=true",
            "run.test=false",
            "training.epochs=1",
            override,
        )
    )
    assert summary["normalization"] is False
    content = load_checkpoint(tmp_path / "outputs" / "checkpoints" / "last.pth")
    assert content["normalization"] is None


def test_testing_from_a_checkpoint_needs_no_other_flags(compose_config, tmp_path):
    trained = run(
        compose_config(
            *tiny_split_manifest(tmp_path), "run.train=true", "run.test=true", "training.epochs=1"
        )
    )
    best = tmp_path / "best.pth"
    shutil.copy(tmp_path / "outputs" / "checkpoints" / "best.pth", best)
    # Another model, other features and sample rate in this config: the checkpoint's win.
    tested = run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.test=true",
            f"run.checkpoint_path={best}",
            "model=panns_mobilenetv1",
            "features.n_mels=40",
            "data.sample_rate=16000",
            f"system.output_dir={tmp_path / 'again'}",
        )
    )
    assert tested["features"]["shape"] == trained["features"]["shape"]
    assert tested["test"]["accuracy"] == trained["test"]["accuracy"]
    assert tested["test"]["confusion_matrix"] == trained["test"]["confusion_matrix"]


def test_a_checkpoint_is_tested_on_data_with_no_training_clips(compose_config, tmp_path):
    trained = run(
        compose_config(
            *tiny_split_manifest(tmp_path), "run.train=true", "run.test=true", "training.epochs=1"
        )
    )
    best = tmp_path / "outputs" / "checkpoints" / "best.pth"
    # The tiny manifest's test clips alone: as a manifest's test rows, and as class folders.
    clips = [(fsdd_clip(digit, index=index), str(digit)) for digit in (1, 2) for index in (0, 1)]
    rows = [(path.name, label, "test") for path, label in clips]
    manifest = write_manifest(tmp_path / "test.csv", ["path", "label", "split"], rows)
    for path, label in clips:
        (tmp_path / "folder" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "folder" / label / path.name)
    folder = ["data=folder", f"data.root={tmp_path / 'folder'}", "data.sample_rate=8000"]
    every_clip = ["data.val_fraction=0", "data.test_fraction=1"]
    checkpoint = ["run.test=true", f"run.checkpoint_path={best}"]
    for name, data in [("manifest", fsdd_manifest(manifest)), ("folder", folder + every_clip)]:
        tested = run(compose_config(*data, *checkpoint, f"system.output_dir={tmp_path / name}"))
        assert tested["splits"]["train"]["clips"] == 0
        assert tested["test"]["confusion_matrix"] == trained["test"]["confusion_matrix"]
    with pytest.raises(ConfigError, match=r"must be < 1 \(training needs clips\), not 0.0 \+ 1"):
        run(compose_config(*folder, *every_clip, *checkpoint, "run.train=true"))


def test_a_checkpoint_fine_tuned_from_pretrained_weights_needs_not_that_file(
    compose_config, tmp_path
):
    manifest = tiny_split_manifest(tmp_path)
    run(compose_config(*manifest, "run.train=true", "training.epochs=1"))
    pretrained = tmp_path / "pretrained.pth"
    shutil.copy(tmp_path / "outputs" / "checkpoints" / "best.pth", pretrained)
    fine_tuned = tmp_path / "tuned"
    run(
        compose_config(
            *manifest,
            "run.train=true",
            "training.epochs=1",
            f"model.params.pretrained_path={pretrained}",
            f"system.output_dir={fine_tuned}",
        )
    )
    pretrained.unlink()  # as on another machine: the checkpoint's weights are all it needs
    best = fine_tuned / "checkpoints" / "best.pth"
    tested = run(
        compose_config(
            *manifest,
            "run.test=true",
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'again'}",
        )
    )
    assert 0.0 <= tested["test"]["accuracy"] <= 1.0
    assert load_predictor(best).classes == ["1", "2"]
    taught = _student_run(compose_config, tmp_path, str(best))
    assert taught["distillation"]["how"] == "online, on the student's features"


def test_a_checkpoint_trained_further_stores_the_config_it_was_trained_with(
    compose_config, tmp_path
):
    manifest = tiny_split_manifest(tmp_path)
    first_run = compose_config(
        *manifest, "run.train=true", "training.epochs=1", "model=panns_mobilenetv1"
    )
    run(first_run)
    first = tmp_path / "first.pth"
    shutil.copy(tmp_path / "outputs" / "checkpoints" / "best.pth", first)
    # This run's config names another model and features: the checkpoint's are trained on.
    further = tmp_path / "further"
    trained = run(
        compose_config(
            *manifest,
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
            "features.n_mels=40",
            f"run.checkpoint_path={first}",
            f"system.output_dir={further}",
        )
    )
    best = further / "checkpoints" / "best.pth"
    stored = load_checkpoint(best)["config"]
    assert stored["model"]["name"] == "panns_mobilenetv1"
    assert stored["features"] == OmegaConf.to_container(first_run.features, resolve=True)
    tested = run(
        compose_config(
            *manifest,
            "run.test=true",
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'again'}",
        )
    )
    assert tested["model"]["name"] == "panns_mobilenetv1"
    assert tested["test"]["confusion_matrix"] == trained["test"]["confusion_matrix"]


def test_a_dataset_with_other_classes_than_the_checkpoint_is_named(compose_config, tmp_path):
    run(compose_config(*tiny_split_manifest(tmp_path), "run.train=true", "training.epochs=1"))
    best = tmp_path / "outputs" / "checkpoints" / "best.pth"
    rows = [(f"{d}_jackson_{i}.wav", str(d)) for d in (1, 3) for i in range(10, 16)]
    other = write_manifest(tmp_path / "other.csv", ["path", "label"], rows)
    with pytest.raises(DatasetError, match=r"labels \['3'\] .* trained for classes \['1', '2'\]"):
        run(
            compose_config(
                "data=manifest",
                f"data.manifest={other}",
                f"data.root={FSDD}",
                "data.val_fraction=0.2",
                "data.test_fraction=0.2",
                "run.test=true",
                f"run.checkpoint_path={best}",
            )
        )


def test_pretrained_checkpoint_with_other_features_is_warned_about(
    compose_config, tmp_path, caplog
):
    manifest = tiny_split_manifest(tmp_path)
    run(compose_config(*manifest, "run.train=true", "training.epochs=1", "features.n_mels=40"))
    pretrained = tmp_path / "outputs" / "checkpoints" / "best.pth"

    def fine_tune(*overrides):
        caplog.clear()
        run(
            compose_config(
                *manifest,
                "run.train=false",
                f"model.params.pretrained_path={pretrained}",
                f"system.output_dir={tmp_path / 'tuned'}",
                *overrides,
            )
        )
        return [r.getMessage() for r in caplog.records if "other features" in r.getMessage()]

    (warning,) = fine_tune()
    assert str(pretrained) in warning
    assert "n_mels 40 vs 64" in warning
    assert fine_tune("features.n_mels=40") == []


def test_fine_tuning_on_other_classes_is_pointed_to_pretrained_path_which_works(
    compose_config, tmp_path
):
    run(compose_config(*tiny_split_manifest(tmp_path), "run.train=true", "training.epochs=1"))
    best = tmp_path / "best.pth"
    shutil.copy(tmp_path / "outputs" / "checkpoints" / "best.pth", best)
    rows = [
        (f"{d}_jackson_{i}.wav", str(d), split)
        for d in (3, 4, 5)
        for i, split in [(10, "train"), (11, "train"), (5, "val"), (0, "test")]
    ]
    other = write_manifest(tmp_path / "other.csv", ["path", "label", "split"], rows)
    data = ["data=manifest", f"data.manifest={other}", f"data.root={FSDD}", "data.sample_rate=8000"]
    hint = rf"this dataset has \['3', '4', '5'\]; to fine-tune .*pretrained_path={best}"
    with pytest.raises(DatasetError, match=hint):
        run(compose_config(*data, "run.train=true", f"run.checkpoint_path={best}"))
    tuned = run(
        compose_config(
            *data,
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
            f"model.params.pretrained_path={best}",
            f"system.output_dir={tmp_path / 'tuned'}",
        )
    )
    assert tuned["classes"] == ["3", "4", "5"]
    assert len(tuned["test"]["confusion_matrix"]) == 3


# ---------------------------------------------------------------- distillation


def test_teacher_stays_frozen_and_gets_no_gradients(tmp_path):
    torch.manual_seed(1)
    teacher = TinyNet(3)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    trainer = _trainer(tmp_path, _options(epochs=2), teacher=teacher)
    trainer.fit(*_loaders())
    assert not teacher.training
    assert all(parameter.grad is None for parameter in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_distillation_uses_the_teachers_soft_targets(tmp_path):
    # alpha = 0: the loss is the soft term alone, so a student matching a constant teacher
    # learns the teacher's (uniform) output, not the labels.
    class Uniform(nn.Module):
        def forward(self, x, labels=None):
            return torch.zeros(x.shape[0], 3)

    options = _options(epochs=4, distillation=DistillationConfig(alpha=0.0, temperature=1.0))
    trainer = _trainer(tmp_path, options, teacher=Uniform())
    trainer.fit(*_loaders())
    probabilities = torch.softmax(trainer.model.eval()(_separable(12).tensors[0]), dim=1)
    assert torch.allclose(probabilities, torch.full_like(probabilities, 1 / 3), atol=0.15)


def test_a_distilling_run_keeps_its_class_weights(tmp_path):
    # alpha = 1: the loss is the term on the labels alone, weighted as without a teacher.
    # Under distillation the weights were dropped.
    options = _options(epochs=1, distillation=DistillationConfig(alpha=1.0, temperature=2.0))
    weights = torch.tensor([3.0, 1.0, 0.5])
    losses = []
    for name, teacher in [("alone", None), ("taught", TinyNet(3))]:
        trainer = _trainer(tmp_path / name, options, class_weights=weights, teacher=teacher)
        losses.append(trainer.fit(*_loaders(16))["history"][0]["train_loss"])
    unweighted = _trainer(tmp_path / "plain", options).fit(*_loaders(16))["history"][0]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert unweighted["train_loss"] != pytest.approx(losses[0], rel=1e-3)


def test_arcface_student_distils(tmp_path):
    from audioclf.model import create_model

    torch.manual_seed(0)
    student = create_model("efficientnet_v2", 3, width_mult=0.25, depth_mult=0.25, arcface=True)
    trainer = Trainer(student, _options(epochs=1), ["a", "b", "c"], tmp_path, teacher=TinyNet(3))
    result = trainer.fit(*_loaders(16))
    assert math.isfinite(result["history"][0]["train_loss"])


def _teacher_run(compose_config, tmp_path, *overrides) -> str:
    run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.train=true",
            "training.epochs=1",
            f"system.output_dir={tmp_path / 'teacher'}",
            *overrides,
        )
    )
    return str(tmp_path / "teacher" / "checkpoints" / "best.pth")


def _student_run(compose_config, tmp_path, teacher: str) -> dict:
    return run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.train=true",
            "training.epochs=1",
            "teacher_model=efficientnet_v2",
            f"teacher_model.checkpoint_path={teacher}",
        )
    )


def test_teacher_on_the_students_features_runs_on_every_batch(compose_config, tmp_path):
    teacher = _teacher_run(compose_config, tmp_path, "model.params.width_mult=0.5")
    summary = _student_run(compose_config, tmp_path, teacher)
    assert summary["distillation"]["how"] == "online, on the student's features"


def test_teacher_with_its_own_features_gives_cached_logits(compose_config, tmp_path):
    teacher = _teacher_run(
        compose_config, tmp_path, "data.sample_rate=16000", "features=tf_power_db"
    )
    summary = _student_run(compose_config, tmp_path, teacher)
    assert summary["distillation"]["how"].startswith("logits of 8 clean clips at 16000 Hz")
    assert summary["training"]["history"][0]["train_loss"] > 0


def test_panns_teacher_with_other_mel_bins_is_built_for_its_own_features(compose_config, tmp_path):
    # bn0 of a PANNs model has one channel per mel bin: 40 for this teacher, 64 for the student.
    teacher = _teacher_run(
        compose_config, tmp_path, "model=panns_mobilenetv1", "features.n_mels=40"
    )
    summary = _student_run(compose_config, tmp_path, teacher)
    assert summary["features"]["shape"][-1] == 64
    assert summary["distillation"]["how"].startswith("logits of 8 clean clips at 8000 Hz")


def test_teacher_for_other_classes_is_refused_naming_them(compose_config, tmp_path):
    rows = [(f"{d}_jackson_{i}.wav", str(d)) for d in (4, 5) for i in range(10, 20)]
    other = write_manifest(tmp_path / "other.csv", ["path", "label"], rows)
    teacher = _teacher_run(
        compose_config,
        tmp_path,
        f"data.manifest={other}",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
    )
    with pytest.raises(CheckpointError, match=r"classes \['4', '5'\], the student learns"):
        run(
            compose_config(
                *tiny_split_manifest(tmp_path),
                "run.train=true",
                "teacher_model=efficientnet_v2",
                f"teacher_model.checkpoint_path={teacher}",
            )
        )


def test_a_missing_teacher_file_stops_before_the_data_pass(compose_config, tmp_path, monkeypatch):
    # Before: the teacher was read after every clip had been decoded and featurised, and
    # the error named the file but not the key.
    import audioclf.job
    from audioclf.settings import ConfigError

    monkeypatch.setattr(
        audioclf.job, "build_datasets", lambda *_: pytest.fail("the data pass ran first")
    )
    with pytest.raises(
        ConfigError, match=r"^teacher_model.checkpoint_path: no such checkpoint file '.*nope.pth'"
    ):
        run(
            compose_config(
                *tiny_split_manifest(tmp_path),
                "run.train=true",
                "teacher_model=efficientnet_v2",
                f"teacher_model.checkpoint_path={tmp_path / 'nope.pth'}",
            )
        )


# ---------------------------------------------------------------- cross-validation


def test_folds_all_trains_and_tests_each_fold_and_reports_mean_and_std(
    compose_config, tmp_path, manifest_rows
):
    from audioclf.cli import run_folds

    manifest = write_manifest(tmp_path / "folds.csv", ["path", "label", "fold"], manifest_rows)
    result = run_folds(
        compose_config(
            "data=manifest",
            f"data.manifest={manifest}",
            f"data.root={FSDD}",
            "data.sample_rate=8000",
            "data.val_fraction=0.25",
            "run.folds=all",
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
        )
    )
    assert [fold["fold"] for fold in result["folds"]] == ["1", "2", "3", "4"]
    written = json.loads((tmp_path / "outputs" / "cv_metrics.json").read_text())
    assert written == result
    accuracies = [fold["accuracy"] for fold in result["folds"]]
    assert result["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert result["std"]["accuracy"] == pytest.approx(np.std(accuracies))
    for fold in "1234":
        tested = json.loads((tmp_path / "outputs" / f"fold_{fold}" / "metrics.json").read_text())
        assert sum(map(sum, tested["test"]["confusion_matrix"])) == 6


def _fold_manifest_config(compose_config, folder, rows, *overrides):
    """The config of a fold manifest of `rows` (written into `folder`) with `overrides`."""
    manifest = write_manifest(folder / "folds.csv", ["path", "label", "fold"], rows)
    return compose_config(*fsdd_manifest(manifest), *overrides)


def test_folds_that_the_manifest_lacks_stop_before_the_first_fold_trains(
    compose_config, tmp_path, manifest_rows
):
    from audioclf.cli import run_folds
    from audioclf.settings import ConfigError

    config = _fold_manifest_config(
        compose_config,
        tmp_path,
        manifest_rows,
        "run.folds=[1,5]",
        "run.train=true",
        "run.test=true",
    )
    with pytest.raises(ConfigError, match=r"no row of .*folds.csv has fold\(s\) \['5'\]"):
        run_folds(config)
    assert not (tmp_path / "outputs").exists()


def test_the_job_run_once_refuses_a_config_that_asks_for_folds(
    compose_config, tmp_path, manifest_rows
):
    """From Python, `run` with run.folds set trained once on the configured split."""
    from audioclf.cli import run
    from audioclf.settings import ConfigError

    config = _fold_manifest_config(compose_config, tmp_path, manifest_rows, "run.folds=all")
    with pytest.raises(ConfigError, match=r"run.folds=all asks for .* audioclf.job.run_folds"):
        run(config)
    assert not (tmp_path / "outputs").exists()


def test_esc50_config_reads_the_shipped_metadata_and_cross_validates(compose_config, tmp_path):
    from audioclf.cli import run_folds

    root, _ = esc50_like(tmp_path / "ESC-50-master", folds=2)
    result = run_folds(
        compose_config(
            "data=esc50",
            f"data.root={root}",
            "data.sample_rate=8000",
            "data.clip_seconds=1.0",
            "data.val_fraction=0.25",
            "run.folds=all",
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
        )
    )
    assert [fold["fold"] for fold in result["folds"]] == ["1", "2"]
    tested = json.loads((tmp_path / "outputs" / "fold_2" / "metrics.json").read_text())
    assert tested["test"]["classes"] == ["dog", "rooster"]
    assert sum(map(sum, tested["test"]["confusion_matrix"])) == 6


def test_folds_without_a_fold_manifest_is_a_config_error(compose_config):
    from audioclf.settings import ConfigError, load_settings

    with pytest.raises(ConfigError, match="run.folds needs data=manifest"):
        load_settings(compose_config("run.folds=all"))


def test_folds_without_testing_stop_before_the_first_fold_trains(
    compose_config, tmp_path, manifest_rows
):
    # Before: the first fold trained in full, then the job stopped for want of its metrics.
    from audioclf.cli import run_folds
    from audioclf.settings import ConfigError

    config = _fold_manifest_config(
        compose_config, tmp_path, manifest_rows, "run.folds=all", "run.test=false"
    )
    with pytest.raises(ConfigError, match="run.folds needs run.test=true"):
        run_folds(config)
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------- distributed


def _torchrun(tmp_path, *overrides: str) -> str:
    """The main job in 2 torchrun processes from tmp_path (batch 4, no export, no workers);
    its output, after checking that it succeeded."""
    return torchrun(
        [
            str(REPO / "main.py"),
            "training.batch_size=4",
            "run.export=false",
            "system.num_workers=0",
            f"system.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
        tmp_path,
    )


def test_two_process_ddp_run_trains_and_rank_zero_writes(tmp_path):
    output = _torchrun(
        tmp_path,
        *tiny_split_manifest(tmp_path),
        "training.epochs=2",
        # Batches that do not step keep their gradients in their process (DDP's no_sync).
        "training.batch_size=2",
        "training.accumulate_grad_batches=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "x 2 processes (DDP)" in output
    assert output.count("epoch 2/2") == 1  # rank 0 logs, rank 1 does not
    assert "terminate called" not in output
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pth")
    assert checkpoint["epoch"] == 2
    assert "test" in json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_quantising_under_torchrun_finishes_and_rank_zero_saves_and_tests_the_int8_model(
    tmp_path, mode
):
    # Rank 0 used to quantise alone, and its Trainers (QAT's, and the int8 test's) waited for
    # the other rank in DDP's construction: the run hung after the float test. QAT now
    # fine-tunes on both ranks.
    output = _torchrun(
        tmp_path,
        *tiny_split_manifest(tmp_path),
        "model.params.width_mult=0.25",
        "model.params.depth_mult=0.25",
        "training.epochs=1",
        "run.quantise=true",
        f"model.quantization.mode={mode}",
        "model.quantization.epochs=1",
        "model.quantization.calibration_clips=4",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    # Training, then (QAT) the fine-tuning, each in DDP.
    assert output.count("x 2 processes (DDP)") == (2 if mode == "qat" else 1)
    # The float model trained channels_last; QAT's gradients must fit DDP's buckets.
    assert "Grad strides do not match" not in output
    assert "terminate called" not in output
    run_dir = tmp_path / "run"
    if mode == "qat":
        assert load_checkpoint(run_dir / "qat" / "checkpoints" / "last.pth")["epoch"] == 1
    assert (
        load_checkpoint(run_dir / "checkpoints" / "int8.pth")["quantized"]["spec"]["mode"] == mode
    )
    assert "test_int8" in json.loads((run_dir / "metrics.json").read_text())


def test_cross_validation_under_torchrun_writes_one_result_in_rank_zeros_folder(
    tmp_path, manifest_rows
):
    # Each rank has its own Hydra run folder; rank 1 wrote a second cv_metrics.json into its
    # own while the folds went to rank 0's.
    manifest = write_manifest(tmp_path / "folds.csv", ["path", "label", "fold"], manifest_rows)
    output = _torchrun(
        tmp_path,
        "data=manifest",
        f"data.manifest={manifest}",
        f"data.root={FSDD}",
        "data.sample_rate=8000",
        "data.val_fraction=0.25",
        "run.folds=[1,2]",
        "training.epochs=1",
    )
    (written,) = (tmp_path / "outputs").glob("*/*/cv_metrics.json")
    assert sorted(path.name for path in written.parent.glob("fold_*")) == ["fold_1", "fold_2"]
    assert [fold["fold"] for fold in json.loads(written.read_text())["folds"]] == ["1", "2"]
    assert output.count("cross-validation: test fold 1") == 1


def test_multirun_sweep_runs_each_value_into_its_own_folder(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "main.py"),
            "-m",
            *tiny_split_manifest(tmp_path),
            "training.epochs=1",
            "training.lr=1e-3,3e-3",
            "run.test=false",
            "run.export=false",
            "system.num_workers=0",
            f"system.cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lrs = []
    for job in ("0", "1"):
        checkpoint = load_checkpoint(tmp_path / "sweep" / job / "checkpoints" / "last.pth")
        lrs.append(checkpoint["config"]["training"]["lr"])
    assert lrs == [1e-3, 3e-3]


# ---------------------------------------------------------------- multi-label


def _multi_labeltiny_split_manifest(tmp_path, negatives: bool = False) -> list[str]:
    """Digits 1-3 tagged with their names and parities; with `negatives`, 4s with no tag."""
    rows = []
    tagged = [(1, "one;odd"), (2, "two;even"), (3, "odd;three")] + ([(4, "")] if negatives else [])
    for digit, tags in tagged:
        for index, split in [(10, "train"), (11, "train"), (12, "train"), (13, "train")] + [
            (5, "val"),
            (6, "val"),
            (0, "test"),
            (1, "test"),
        ]:
            rows.append((f"{digit}_jackson_{index}.wav", tags, split))
    path = write_manifest(tmp_path / "tags.csv", ["path", "label", "split"], rows)
    return [
        "data=manifest",
        f"data.manifest={path}",
        f"data.root={FSDD}",
        "data.sample_rate=8000",
        "data.multi_label=true",
    ]


def test_multi_label_manifest_gives_multi_hot_targets(tmp_path):
    from audioclf.index import split_listing
    from audioclf.layouts import index_manifest

    path = write_manifest(
        tmp_path / "m.csv",
        ["path", "label"],
        [
            ("1_jackson_10.wav", "odd; one;odd"),
            ("2_jackson_10.wav", "even;two"),
            ("5_jackson_10.wav", ""),  # a negative: no class applies
        ],
    )
    listing = index_manifest(path, FSDD, 0.0, 0.0, multi_label=True)
    assert [clip.label for clip in listing.clips] == ["odd;one", "even;two", ""]
    index = split_listing(listing, seed=0, multi_label=True)
    assert index.classes == ["even", "odd", "one", "two"]
    dataset = SpectrogramDataset(
        index.splits["train"],
        index.classes,
        8000,
        0.5,
        resolve_params("librosa", 8000),
        FeatureCache(tmp_path / "cache"),
        multi_label=True,
    )
    targets = {clip.label: dataset.label_index(clip).tolist() for clip in dataset.clips}
    assert targets == {"odd;one": [0, 1, 1, 0], "even;two": [1, 0, 0, 1], "": [0, 0, 0, 0]}
    # A multi-class manifest still refuses an empty label.
    with pytest.raises(DatasetError, match=r"m\.csv, line 4: empty label"):
        index_manifest(path, FSDD, 0.0, 0.0)


def test_multi_label_main_job_trains_with_bce_and_reports_map(compose_config, tmp_path, caplog):
    # With clips that no class applies to (negatives, an empty label cell), counted apart.
    caplog.set_level(logging.INFO, logger="audioclf")
    summary = run(
        compose_config(
            *_multi_labeltiny_split_manifest(tmp_path, negatives=True),
            "run.train=true",
            "run.test=true",
            "training.epochs=2",
            "training.mixup_alpha=0.2",
        )
    )
    assert summary["classes"] == ["even", "odd", "one", "three", "two"]
    assert summary["splits"]["train"]["per_class"]["odd"] == 8
    assert summary["splits"]["train"]["clips"] == 16
    assert [summary["splits"][split]["no_label"] for split in ("train", "val", "test")] == [4, 2, 2]
    assert "train        16 clips (4-8 per class, 4 with no label)" in caplog.text
    test = summary["test"]
    assert {"mAP", "roc_auc", "f1", "accuracy"} <= set(test)
    assert 0.0 <= test["mAP"] <= 1.0
    assert summary["training"]["monitor"] == "val_mAP"


def test_a_multi_label_checkpoint_tests_as_multi_label_with_no_other_flags(
    compose_config, tmp_path
):
    overrides = _multi_labeltiny_split_manifest(tmp_path)
    run(compose_config(*overrides, "run.train=true", "training.epochs=1"))
    best = tmp_path / "outputs" / "checkpoints" / "best.pth"
    without_flag = [o for o in overrides if o != "data.multi_label=true"]
    tested = run(
        compose_config(
            *without_flag,
            "run.test=true",
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'again'}",
        )
    )
    assert tested["classes"] == ["even", "odd", "one", "three", "two"]
    assert "mAP" in tested["test"]
    # Training further, monitoring a multi-label metric: checked as adopted, so it runs.
    further = run(
        compose_config(
            *without_flag,
            "run.train=true",
            "training.epochs=1",
            "training.monitor=val_mAP",
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'further'}",
        )
    )
    assert further["training"]["monitor"] == "val_mAP"


# ---------------------------------------------------------------- sampling


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    first, again, other_epoch = EpochSampler(20, seed=3), EpochSampler(20, seed=3), None
    first.set_epoch(4)
    again.set_epoch(4)
    assert list(first) == list(again)
    other_epoch = EpochSampler(20, seed=3)
    other_epoch.set_epoch(5)
    assert list(first) != list(other_epoch)
    assert sorted(index for index, _ in first) == list(range(20))


def test_ranks_share_the_single_process_order():
    single = list(EpochSampler(10, seed=1))
    ranks = [list(EpochSampler(10, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(share) for share in ranks] == [5, 5]
    interleaved = [key for pair in zip(*ranks, strict=True) for key in pair]
    assert interleaved == single


def test_balanced_sampler_draws_classes_equally():
    from audioclf.loading import balanced_weights

    clips = [Clip(fsdd_clip(0), "a")] * 90 + [Clip(fsdd_clip(1), "b")] * 10
    sampler = EpochSampler(100, seed=0, weights=balanced_weights(clips))
    drawn = [clips[index].label for epoch in range(20) for index, _ in _epoch(sampler, epoch)]
    assert 0.4 < drawn.count("b") / len(drawn) < 0.6


def test_the_main_jobs_balanced_sampler_weighs_multi_label_clips_by_their_labels(
    compose_config, tmp_path
):
    # Six clips tagged a and two tagged a;b: b is the rare label. The main job counted the
    # label *sets* as classes, so a;b clips weighed 1/2 against 1/6, not 5/16 against 1/8.
    from audioclf.pipeline import build_datasets, build_loaders
    from audioclf.settings import load_settings

    rows = [(f"1_jackson_{i}.wav", "a" if i < 16 else "a;b", "train") for i in range(10, 18)]
    rows += [(f"2_jackson_{i}.wav", "a;b", "val") for i in range(10, 12)]
    # Clips with no label weigh as one class together.
    rows += [(f"3_jackson_{i}.wav", "", "train") for i in range(10, 12)]
    path = write_manifest(tmp_path / "m.csv", ["path", "label", "split"], rows)
    settings = load_settings(
        compose_config(
            *fsdd_manifest(path),
            "data.multi_label=true",
            "training.class_balance=sampler",
        )
    )
    _, datasets, _ = build_datasets(settings)
    weights = build_loaders(settings, datasets, torch.device("cpu"))["train"].sampler.weights
    weight = {"a": 1 / 8, "a;b": (1 / 8 + 1 / 2) / 2, "": 1 / 2}
    expected = [weight[clip.label] for clip in datasets["train"].clips]
    np.testing.assert_allclose(weights, expected)


def _epoch(sampler: EpochSampler, epoch: int) -> list:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_deterministic_mode_is_on_for_the_job_only(compose_config, tmp_path):
    summary = run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.train=true",
            "training.epochs=1",
            "system.deterministic=true",
        )
    )
    assert len(summary["training"]["history"]) == 1
    assert not torch.are_deterministic_algorithms_enabled()


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
    trainer = _trainer(tmp_path / "first", _options(epochs=2))
    trainer.fit(*_loaders())
    # No later epoch can beat the earlier best: the resumed run must end on that best.
    options = _options(epochs=3, min_delta=1.0)
    resumed = _trainer(tmp_path / "second", options)
    resumed.fit(*_loaders(), resume_from=trainer.last_path)
    earlier = load_checkpoint(trainer.best_path)
    assert resumed.best_path.exists()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, earlier["model"][name]), name


def _self_signalling_main(folder: Path, name: str, batch: int) -> Path:
    """A script that runs the main job and sends itself signal `name` as its training batch
    number `batch` (from 1, over the whole run) starts: a Ctrl-C or a kill at a chosen point,
    where a signal from outside would race the run."""
    script = folder / "main.py"
    script.write_text(
        "import os, signal\n"
        "from audioclf import cli, runtime\n"
        "step, batches = runtime.StepModel.__call__, []\n"
        "def signalling(self, features, labels):\n"
        "    batches.extend([None] if self.eager.training else [])\n"
        f"    if len(batches) == {batch}:\n"
        f"        os.kill(os.getpid(), signal.{name})\n"
        "    return step(self, features, labels)\n"
        "runtime.StepModel.__call__ = signalling\n"
        "cli.main()\n"
    )
    return script


def _tiny_job(tmp_path: Path, program: Path, run_dir: str, *extra: str) -> list[str]:
    """The main job on the tiny manifest, 2 batches an epoch, no test or export."""
    import sys

    return [
        sys.executable,
        str(program),
        *tiny_split_manifest(tmp_path),
        "training.epochs=4",
        "training.batch_size=4",
        "run.test=false",
        "run.export=false",
        "system.num_workers=0",
        f"system.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / run_dir}",
        *extra,
    ]


def test_ctrl_c_stops_the_main_job_with_a_resume_hint_and_no_traceback(tmp_path):
    import subprocess

    program = _self_signalling_main(tmp_path, "SIGINT", batch=3)  # in epoch 2
    command = _tiny_job(tmp_path, program, "run")
    job = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = job.stdout + job.stderr
    assert job.returncode == 130, output
    # The command to continue, with this run's own overrides: a resumed run needs them.
    hint = output.split("continues from its last finished epoch with: ")[1].splitlines()[0]
    assert hint.startswith(f"python {program} data=manifest ")
    assert hint.endswith(
        f"training.epochs=4 training.batch_size=4 run.test=false run.export=false "
        f"system.num_workers=0 system.cache_dir={tmp_path / 'cache'} "
        f"hydra.run.dir={tmp_path / 'run'} run.resume=true"
    )
    assert "Traceback" not in output
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pth")["epoch"] == 1


def test_ctrl_c_before_the_first_save_says_there_is_nothing_to_resume(tmp_path):
    import subprocess

    # run.resume=true would look for the newest earlier run, here a finished one of the same
    # settings, and test that instead.
    earlier = _tiny_job(tmp_path, REPO / "main.py", "earlier", "training.epochs=1")
    assert subprocess.run(earlier, capture_output=True, timeout=300).returncode == 0
    program = _self_signalling_main(tmp_path, "SIGINT", batch=1)
    job = subprocess.run(
        _tiny_job(tmp_path, program, "run", "training.epochs=1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = job.stdout + job.stderr
    assert job.returncode == 130, output
    assert "interrupted before the first epoch ended: no checkpoint was saved" in output
    assert "run.resume" not in output
    assert "Traceback" not in output


def test_main_job_killed_with_sigkill_and_resumed_equals_an_uninterrupted_run(tmp_path):
    import signal
    import subprocess

    def command(run_dir, *extra, program=REPO / "main.py"):
        return _tiny_job(
            tmp_path,
            program,
            run_dir,
            "training.mixup_alpha=0.2",
            "system.deterministic=true",
            *extra,
        )

    # Killed as its 6th training batch starts: in epoch 3, after epoch 2's save. (A poll from
    # outside raced the run: CI once saw it end before the kill.)
    killer = _self_signalling_main(tmp_path, "SIGKILL", batch=6)
    whole = subprocess.run(command("whole"), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    killed = subprocess.run(command("killed", program=killer), capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = tmp_path / "killed" / "checkpoints" / "last.pth"
    assert load_checkpoint(last)["epoch"] == 2
    resumed = subprocess.run(
        command("resumed", f"run.resume={last}"), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    expected = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pth")
    actual = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pth")
    assert actual["epoch"] == expected["epoch"] == 4
    timing = {"clips_per_second"}  # the only figure that depends on the machine's load
    assert [{k: v for k, v in r.items() if k not in timing} for r in actual["history"]] == [
        {k: v for k, v in r.items() if k not in timing} for r in expected["history"]
    ]
    for name, value in expected["model"].items():
        assert torch.equal(value, actual["model"][name]), name
