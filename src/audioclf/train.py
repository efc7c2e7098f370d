"""The Trainer: fit / validate / test.

What checkpoints hold, writing them and resuming from them are in `train_state`; TensorBoard
and console output in `train_log`; device, processes and mixed precision in `runtime`;
optimizers, LR schedules and early stopping in `schedules`.

The loop reads top to bottom; every optional feature (AMP, channels_last, torch.compile,
mixup, clipping, a plateau schedule) is a few visible lines that do nothing when off.
Randomness is reseeded from (seed, epoch) at each epoch start, and the EpochSampler gives
every item its own seed, so a run resumed from `last.pth` repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from audioclf.checkpoint import load_checkpoint
from audioclf.losses import classification_loss, mixup, training_loss
from audioclf.metrics import (
    THRESHOLD,
    format_report,
    multiclass_metrics,
    multilabel_metrics,
    write_evaluation,
)
from audioclf.runtime import (
    StepModel,
    autocast_dtype,
    is_main_process,
    keep_strided_grouped_convs_fp32,
)
from audioclf.schedules import EarlyStopping, Schedule, make_optimizer, schedule_spec
from audioclf.settings import TrainingConfig
from audioclf.train_log import TrainingLog, divergence_message, run_hparams
from audioclf.train_state import RunCheckpoints

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite: the next step would write NaN weights."""


@dataclass
class EpochStats:
    """What one training epoch measured."""

    loss: float = 0.0
    accuracy: float = 0.0
    grad_norm: float = 0.0
    clips_per_second: float = 0.0
    seconds: float = 0.0
    clips: int = 0
    lr: float = 0.0  # the rate the epoch's last step trained at


class Trainer:
    """Trains a `Model` (or any module that takes a batch of features) on batches of
    `(features, targets)`.

    Args:
        options: the training section (optimizer, schedule, clipping, speed switches...).
        classes: class names in output order.
        output_dir: checkpoints (`checkpoints/best.pth`, `last.pth`), TensorBoard events
            (`tensorboard/`) and evaluation files go here.
        checkpoint_extra: stored in every checkpoint besides the training state (the resolved
            config, the feature parameters, the normalisation statistics), so that test,
            predict and export need only the checkpoint.
        seed: the run's seed; each epoch reseeds every generator from (seed, epoch).
        teacher: a model that takes the same features, for distillation on each batch as
            the student sees it (frozen, eval mode). A loader may instead yield
            `(features, targets, teacher_logits)` with logits computed beforehand
            (`audioclf.distill`); either way the loss is `distillation_loss` with
            `options.distillation`'s alpha and temperature.
        on_epoch_start: called with each epoch's index (0-based) before it trains; QAT
            freezes BatchNorm and the quantization ranges from it.
    """

    def __init__(
        self,
        model: nn.Module,
        options: TrainingConfig,
        classes: list[str],
        output_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        multi_label: bool = False,
        threshold: float = THRESHOLD,
        class_weights: torch.Tensor | None = None,
        checkpoint_extra: dict[str, Any] | None = None,
        seed: int = 0,
        teacher: nn.Module | None = None,
        on_epoch_start: Callable[[int], None] | None = None,
    ) -> None:
        self.options = options
        self.on_epoch_start = on_epoch_start
        self.classes = list(classes)
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.multi_label = multi_label
        self.threshold = threshold
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.seed = seed
        self.model = model.to(self.device)
        self.class_weights = None if class_weights is None else class_weights.to(self.device)
        self.teacher = None
        if teacher is not None:
            self.teacher = teacher.to(self.device).eval()
            for parameter in self.teacher.parameters():
                parameter.requires_grad_(False)
        self.monitor = options.monitor
        if self.monitor == "auto":
            # Per-label accuracy is no guide on multi-label data: an all-negative model of
            # sparse labels scores near 1. PANNs and the FSD50K paper report mAP.
            self.monitor = "val_mAP" if multi_label else "val_accuracy"
        self.mode = options.monitor_mode
        if self.mode == "auto":
            self.mode = "min" if self.monitor.endswith("loss") else "max"
        # AMP: fp16 with a GradScaler on CUDA (bf16 where asked), bf16 on the CPU; `auto` is on
        # for CUDA and for CPUs with bf16 in hardware (audioclf.runtime says what was measured).
        dtype = autocast_dtype(options.amp, self.device, options.amp_dtype)
        self.amp = dtype is not None
        self.amp_dtype = dtype or torch.float32
        if self.amp and self.device.type == "cpu":
            kept = keep_strided_grouped_convs_fp32(self.model)
            if self.teacher is not None:
                keep_strided_grouped_convs_fp32(self.teacher)
            if kept:
                log.info("bf16 autocast: %d strided grouped convolutions kept in float32", kept)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp and self.amp_dtype == torch.float16
        )
        self.channels_last = options.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model = StepModel(self.model, self.device, options.compile)
        self.early_stopping = EarlyStopping(
            self.mode, options.early_stopping_patience, options.min_delta
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: Schedule | None = None
        self.history: list[dict[str, float]] = []
        #: The full metrics of the last `test()` (per-class figures, confusion matrix).
        self.test_metrics: dict[str, Any] | None = None
        self.checkpoints = RunCheckpoints(
            self.output_dir / "checkpoints", self.classes, self.monitor, self.checkpoint_extra
        )
        self.best_path = self.checkpoints.best_path
        self.last_path = self.checkpoints.last_path
        self.run_log = TrainingLog(self.output_dir / "tensorboard", self.classes)

    # ------------------------------------------------------------ the loop

    def fit(
        self,
        train_loader: DataLoader,
        val_loader: DataLoader,
        resume_from: str | Path | None = None,
    ) -> dict[str, Any]:
        """Train for `options.epochs` (or until early stopping), validating every epoch;
        then load the best weights. Returns the best monitored value and the history."""
        options = self.options
        # Optimizer steps: one per `accumulate_grad_batches` batches, and one for the rest.
        steps_per_epoch = math.ceil(len(train_loader) / options.accumulate_grad_batches)
        self.optimizer = make_optimizer(
            self.model.parameters(),
            options.optimizer,
            options.lr,
            options.weight_decay,
            options.momentum,
            options.nesterov,
        )
        spec = schedule_spec(options, steps_per_epoch)
        self.schedule = Schedule(
            self.optimizer, spec, self.mode, options.plateau_patience, options.plateau_factor
        )
        started = time.perf_counter()
        start_epoch = 0
        if resume_from is not None:
            start_epoch, self.history = self.checkpoints.restore(Path(resume_from), self._parts())
        self.step_model.distribute()  # under torchrun: every rank trains, in DDP
        self.run_log.start(
            self.model,
            self.device,
            len(train_loader.dataset) if hasattr(train_loader, "dataset") else -1,
            len(train_loader),
            self.amp_dtype if self.amp else None,
            self.channels_last,
            self.step_model.compiled is not None,
            options.accumulate_grad_batches,
        )
        if self.early_stopping.should_stop:
            log.info("the resumed run had stopped early: nothing left to train")
            start_epoch = options.epochs
        elif resume_from is not None and start_epoch >= options.epochs:
            log.info(
                "the resumed run has trained %d epochs (training.epochs=%d): nothing left to "
                "train; a higher training.epochs trains on",
                start_epoch,
                options.epochs,
            )
        for epoch in range(start_epoch, options.epochs):
            self._seed_epoch(epoch, train_loader)
            if self.on_epoch_start is not None:
                self.on_epoch_start(epoch)
            stats = self._train_epoch(train_loader, epoch)
            val = self.validate(val_loader)
            if not math.isfinite(val["loss"]):
                raise self._diverged(
                    epoch,
                    f"the validation loss is {val['loss']:.4g} (train loss {stats.loss:.4g})",
                )
            monitored = self._monitored(stats, val)
            self.schedule.step_epoch(monitored)
            improved = self.early_stopping.update(monitored)
            record = self._record(epoch, stats, val)
            self.checkpoints.save(
                self._parts(),
                epoch,
                record,
                self.history,
                self.early_stopping.best,
                improved,
            )
            self.run_log.epoch_line(
                options.epochs, record, val, stats.seconds, improved, self.device
            )
            if self.early_stopping.should_stop:
                log.info(
                    "early stopping: %s has not improved for %d epochs (best %.4f)",
                    self.monitor,
                    self.early_stopping.bad_epochs,
                    self.early_stopping.best,
                )
                break
        if dist.is_initialized():
            dist.barrier()  # rank 0 has written best.pth
        if self.best_path.exists():
            best = load_checkpoint(self.best_path)
            self.model.load_state_dict(best["model"])
        self.run_log.close(
            run_hparams(options, self.amp),
            self.history,
            self.monitor,
            self.early_stopping.best,
        )
        return {
            "best": self.early_stopping.best,
            "monitor": self.monitor,
            "history": self.history,
            "seconds": time.perf_counter() - started,
        }

    def _train_epoch(self, loader: DataLoader, epoch: int) -> EpochStats:
        options = self.options
        self.model.train()
        stats = EpochStats()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        grad_norm_sum, optimizer_steps = 0.0, 0
        started = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{options.epochs}",
            leave=False,
            disable=None if is_main_process() else True,
        )
        for step, (features, targets, *given) in enumerate(bar):
            features, targets = self._to_device(features, targets)
            teacher_logits = given[0].to(self.device) if given else None
            if epoch == 0 and step == 0:
                self.run_log.spectrograms(features)
            head_labels = targets if not self.multi_label else None
            loss_targets = targets
            if options.mixup_alpha > 0:
                features, loss_targets, head_labels, blend = mixup(
                    features, targets, options.mixup_alpha, len(self.classes)
                )
                if teacher_logits is not None:
                    teacher_logits = blend(teacher_logits)
                if self.multi_label:
                    head_labels = None
            if self.teacher is not None:
                with torch.no_grad(), self._autocast():
                    teacher_logits = self.teacher(features)
            # Accumulation: each batch adds its share of its group's mean loss to the
            # gradients; the group's last batch steps (under DDP, the others do not reduce).
            first = step - step % options.accumulate_grad_batches
            group = min(options.accumulate_grad_batches, len(loader) - first)
            steps = step - first == group - 1
            if step == first:
                self.optimizer.zero_grad(set_to_none=True)
            with self.step_model.gradient_sync(steps):
                with self._autocast():
                    logits = self.step_model(features, head_labels)
                    loss = training_loss(
                        logits,
                        loss_targets,
                        teacher_logits,
                        self.multi_label,
                        options.label_smoothing,
                        self.class_weights,
                        options.distillation,
                    )
                self.scaler.scale(loss / group).backward()
            if steps:
                grad_norm = self._step(epoch, step, len(loader), loss)
                grad_norm_sum += grad_norm
                optimizer_steps += 1
                stats.lr = self.optimizer.param_groups[0]["lr"]
                self.schedule.step_batch()
            batch = features.shape[0]
            stats.clips += batch
            loss_sum += loss.detach() * batch
            correct += self._correct(logits.detach(), targets)
            if bar.disable is False and step % 10 == 0:
                elapsed = time.perf_counter() - started
                bar.set_postfix(
                    loss=f"{float(loss_sum) / stats.clips:.4f}",
                    acc=f"{float(correct) / stats.clips:.4f}",
                    clips_s=f"{stats.clips / elapsed:.0f}",
                )
        if dist.is_initialized():
            clips = torch.tensor(float(stats.clips), device=self.device)
            totals = torch.stack([loss_sum.float(), correct.float(), clips])
            dist.all_reduce(totals)
            loss_sum, correct, clips = totals.tolist()
            stats.clips = int(clips)
        stats.seconds = time.perf_counter() - started
        stats.loss = float(loss_sum) / max(stats.clips, 1)
        stats.accuracy = float(correct) / max(stats.clips, 1)
        stats.grad_norm = grad_norm_sum / max(optimizer_steps, 1)
        stats.clips_per_second = stats.clips / max(stats.seconds, 1e-9)
        return stats

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Logits and targets of every batch, and the mean loss, in eval mode and float32
        (no autocast): the figures are those of the model as it is saved, exported and
        quantised, which bf16 or fp16 would move by a clip or two."""
        self.model.eval()
        all_logits, all_targets, loss_sum, count = [], [], 0.0, 0
        for features, targets, *_ in loader:
            features, targets = self._to_device(features, targets)
            logits = self.step_model(features, None).float()
            loss = classification_loss(logits, targets, self.multi_label)
            loss_sum += float(loss) * features.shape[0]
            count += features.shape[0]
            all_logits.append(logits.cpu())
            all_targets.append(targets.cpu())
        if count == 0:
            raise ValueError("cannot evaluate on an empty split")
        return torch.cat(all_logits), torch.cat(all_targets), loss_sum / count

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        """Multi-class or multi-label metrics of logits against targets."""
        if self.multi_label:
            return multilabel_metrics(logits, targets, self.threshold)
        return multiclass_metrics(logits, targets)

    def validate(self, loader: Iterable) -> dict[str, Any]:
        """Loss and metrics on a validation loader."""
        logits, targets, loss = self.evaluate(loader)
        return {"loss": loss, **self.metrics(logits, targets)}

    def test(self, loader: Iterable, name: str = "test") -> tuple[float, float, float, float]:
        """Accuracy, macro precision, recall and F1 on `loader`; writes `metrics.json` (under
        `name`), the per-class report and the confusion matrix into the output folder."""
        logits, targets, loss = self.evaluate(loader)
        metrics = {"loss": loss, **self.metrics(logits, targets)}
        self.test_metrics = metrics
        if is_main_process():
            paths = write_evaluation(metrics, self.classes, self.output_dir, name)
            log.info(
                "%s metrics (%s):\n%s", name, paths["metrics"], format_report(metrics, self.classes)
            )
        return metrics["accuracy"], metrics["precision"], metrics["recall"], metrics["f1"]

    # ------------------------------------------------------------ pieces

    def _step(self, epoch: int, batch: int, batches: int, loss: torch.Tensor) -> float:
        """Clip the accumulated gradients and step; the pre-clip gradient norm."""
        options = self.options
        self.scaler.unscale_(self.optimizer)
        # The pre-clip norm is logged; an infinite max_norm measures without clipping.
        grad_norm = nn.utils.clip_grad_norm_(
            self.model.parameters(), options.grad_clip_norm or math.inf
        )
        if options.grad_clip_value is not None:
            nn.utils.clip_grad_value_(self.model.parameters(), options.grad_clip_value)
        grad_norm = float(grad_norm)
        # fp16's GradScaler skips an overflowing step itself; elsewhere the step is NaN.
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise self._diverged(
                epoch,
                f"batch {batch + 1} of {batches} gave a loss of {loss.item():.4g} and a "
                f"gradient norm of {grad_norm:.4g}; stopped before the step",
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return grad_norm

    def _diverged(self, epoch: int, what: str) -> TrainingDiverged:
        lr = self.optimizer.param_groups[0]["lr"]
        return TrainingDiverged(divergence_message(epoch, what, lr, self.options, self.amp))

    def _to_device(
        self, features: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features = features.to(self.device, non_blocking=True)
        if self.channels_last:
            features = features.contiguous(memory_format=torch.channels_last)
        return features, targets.to(self.device, non_blocking=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            predicted = (logits > 0).float()
            return (predicted == targets.float()).float().mean(dim=1).sum()
        return (logits.argmax(dim=1) == targets).sum()

    def _seed_epoch(self, epoch: int, loader: DataLoader) -> None:
        # Every generator the epoch draws from starts from (seed, epoch): what happened before
        # (or whether the run was interrupted) does not matter.
        epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        torch.manual_seed(epoch_seed)
        np.random.seed(epoch_seed)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def _monitored(self, stats: EpochStats, val: dict[str, Any]) -> float:
        values = {f"val_{k}": v for k, v in val.items() if isinstance(v, float)}
        values.update(train_loss=stats.loss, train_accuracy=stats.accuracy)
        if self.monitor not in values:
            raise ValueError(
                f"training.monitor: {self.monitor!r} is not measured; choose one of "
                f"{sorted(values)}"
            )
        return values[self.monitor]

    def _record(self, epoch: int, stats: EpochStats, val: dict[str, Any]) -> dict[str, float]:
        record = {
            "epoch": epoch + 1,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "grad_norm": stats.grad_norm,
            "clips_per_second": stats.clips_per_second,
            "lr": stats.lr,
            **{f"val_{k}": v for k, v in val.items() if isinstance(v, float)},
        }
        self.history.append(record)
        self.run_log.epoch(record, val)
        return record

    def _parts(self) -> dict[str, Any]:
        """The stateful parts of the run, as its checkpoints store them."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.schedule,
            "scaler": self.scaler,
            "early_stopping": self.early_stopping,
        }
