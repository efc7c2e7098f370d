"""The Trainer: fitting, AMP and compile, clipping, non-finite steps, early stopping, the
monitor, test(), the console and TensorBoard events."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from audioclf import runtime
from audioclf.checkpoint import (
    load_checkpoint,
)
from audioclf.schedules import EarlyStopping
from audioclf.train import Trainer, TrainingDiverged
from conftest import (
    separable_features,
    separable_loaders,
    tiny_trainer,
    training_options,
)


def test_a_short_fit_lowers_the_loss_and_learns(tmp_path):
    trainer = tiny_trainer(tmp_path, training_options(epochs=8))
    train, val = separable_loaders(96)
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
        options = training_options(epochs=2, amp=False, accumulate_grad_batches=accumulate)
        trainer = Trainer(model, options, ["a", "b", "c"], tmp_path / f"{batch_size}x{accumulate}")
        train = DataLoader(separable_features(10), batch_size=batch_size)
        trainer.fit(train, DataLoader(separable_features(6, seed=1), batch_size=6))
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
    trainer = Trainer(model, training_options(epochs=8), ["a", "b", "c"], tmp_path)
    train, val = separable_loaders(96)
    best = trainer.fit(train, val)["best"]
    assert best > 0.9
    assert trainer.test(val)[0] == pytest.approx(best)  # the best weights, loaded


def test_bf16_autocast_trains_on_the_cpu_and_evaluation_is_float32(tmp_path):
    trainer = tiny_trainer(tmp_path, training_options(epochs=1, amp=True))
    seen = []
    trainer.model.classifier.fc.register_forward_hook(
        lambda module, i, o: seen.append((module.training, o.dtype))
    )
    train, val = separable_loaders()
    trainer.fit(train, val)
    assert (trainer.amp, trainer.amp_dtype) == (True, torch.bfloat16)
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    # Validation and test see the float32 model that is saved, exported and quantised.
    assert {dtype for training, dtype in seen if not training} == {torch.float32}
    logits, _, _ = trainer.evaluate(val)
    # Batch by batch, as evaluate runs: a convolution's float32 rounding may depend on the
    # batch size (oneDNN blocks it differently on an AVX512 Xeon than on an EPYC).
    with torch.no_grad():
        float32 = torch.cat([trainer.model.eval()(features) for features, _ in val])
    assert torch.equal(logits, float32)
    assert math.isfinite(trainer.history[-1]["train_loss"])


def _fit_without_dropout(tmp_path, **options) -> Trainer:
    trainer = tiny_trainer(tmp_path, training_options(epochs=2, **options))
    trainer.model.classifier.dropout.p = 0.0  # inductor draws other random numbers than eager
    trainer.fit(*separable_loaders())
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
    trainer = tiny_trainer(tmp_path, training_options(amp="auto"))
    assert (trainer.amp, trainer.amp_dtype) == (
        (True, torch.bfloat16) if native else (False, torch.float32)
    )


def test_a_diverging_run_stops_before_saving_non_finite_weights(tmp_path):
    # At lr 1e6 the loss reached 1.8e14, then NaN: the run went on, saved NaN weights as
    # last.pth, tested and exported them, and ended in a failed export check.
    trainer = tiny_trainer(tmp_path, training_options(epochs=4, lr=1e6, grad_clip_norm=None))
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch \d.*lower training.lr") as e:
        trainer.fit(*separable_loaders())
    assert "training.grad_clip_norm (off)" in str(e.value)
    for path in trainer.output_dir.glob("checkpoints/*.pth"):
        weights = load_checkpoint(path)["model"].values()
        assert all(torch.isfinite(value).all() for value in weights if value.is_floating_point())


def test_a_non_finite_gradient_stops_the_step_that_would_write_it(tmp_path):
    trainer = tiny_trainer(tmp_path, training_options(epochs=2))
    features, labels = separable_features(32).tensors
    features[20, 0, 0, 0] = float("inf")  # the second batch of the first epoch
    loader = DataLoader(TensorDataset(features, labels), batch_size=16)
    before = [parameter.detach().clone() for parameter in trainer.model.parameters()]
    with pytest.raises(TrainingDiverged, match=r"epoch 1: batch 2 of 2 .*no checkpoint"):
        trainer.fit(loader, separable_loaders()[1])
    after = list(trainer.model.parameters())
    assert all(torch.isfinite(parameter).all() for parameter in after)
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))  # batch 1


def test_clipping_by_norm_bounds_the_gradient_norm(tmp_path):
    trainer = tiny_trainer(tmp_path, training_options(epochs=1, grad_clip_norm=1e-3, lr=1e-9))
    train, val = separable_loaders(16)
    trainer.fit(train, val)
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in trainer.model.parameters() if p.grad is not None])
    )
    assert norm <= 1e-3 * (1 + 1e-5)
    # The logged norm is the one before clipping.
    assert trainer.history[-1]["grad_norm"] > 1e-3


def test_clipping_by_value_bounds_every_gradient(tmp_path):
    trainer = tiny_trainer(
        tmp_path, training_options(epochs=1, grad_clip_norm=None, grad_clip_value=1e-4)
    )
    trainer.fit(*separable_loaders(16))
    largest = max(p.grad.abs().max() for p in trainer.model.parameters() if p.grad is not None)
    assert largest <= 1e-4


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path):
    # No improvement can exceed a min_delta of 1 (accuracy): epoch 1 is the best, then 2 more.
    options = training_options(epochs=10, early_stopping_patience=1, min_delta=1.0)
    result = tiny_trainer(tmp_path, options).fit(*separable_loaders())
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
    trainer = tiny_trainer(tmp_path, training_options(epochs=4))
    trainer.fit(*separable_loaders())
    best = load_checkpoint(trainer.best_path)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, best["model"][name]), name


@pytest.mark.parametrize(("multi_label", "monitor"), [(False, "val_accuracy"), (True, "val_mAP")])
def test_the_auto_monitor_is_map_on_multi_label_data(tmp_path, multi_label, monitor):
    trainer = tiny_trainer(tmp_path, training_options(monitor="auto"), multi_label=multi_label)
    assert (trainer.monitor, trainer.mode) == (monitor, "max")


def test_unknown_monitor_is_named(tmp_path):
    trainer = tiny_trainer(tmp_path, dataclasses.replace(training_options(), monitor="val_mAP"))
    with pytest.raises(ValueError, match="val_mAP"):
        trainer.fit(*separable_loaders(16))


def test_test_returns_the_four_figures_and_writes_its_files(tmp_path):
    trainer = tiny_trainer(tmp_path, training_options(epochs=2))
    trainer.fit(*separable_loaders())
    figures = trainer.test(DataLoader(separable_features(30, seed=2), batch_size=8))
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
    trainer = tiny_trainer(tmp_path, training_options(epochs=2, amp=False))
    parameters = sum(p.numel() for p in trainer.model.parameters())
    with caplog.at_level(logging.INFO, logger="audioclf"):
        trainer.fit(*separable_loaders())
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
    trainer = tiny_trainer(tmp_path, training_options(epochs=2))
    trainer.fit(*separable_loaders())
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
