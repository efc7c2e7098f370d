"""The Trainer: fit / validate / test, checkpoints, early stopping, logging.

The loop reads top to bottom; every optional feature (AMP, channels_last, torch.compile,
mixup, clipping, a plateau schedule) is a few visible lines that do nothing when off.
Randomness is reseeded from (seed, epoch) at each epoch start, and the EpochSampler gives
every item its own seed, so a run resumed from `last.pth` repeats an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
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
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from audioclf.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from audioclf.losses import classification_loss, distillation_loss, mixup
from audioclf.metrics import (
    confusion_matrix_figure,
    format_report,
    multiclass_metrics,
    multilabel_metrics,
    write_evaluation,
)
from audioclf.model import CheckpointError, Model, load_state
from audioclf.quant import QuantizedModel, load_graph_state
from audioclf.schedules import Schedule, ScheduleSpec, make_optimizer
from audioclf.settings import TrainingConfig

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when there is one, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def is_main_process() -> bool:
    """Rank 0 of a distributed run, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def has_compiler() -> bool:
    """Whether torch.compile's CPU backend finds a C++ compiler."""
    return any(shutil.which(name) for name in ("c++", "g++", "clang++", "cl"))


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs without an improvement of more than `min_delta`."""

    mode: str
    patience: int | None
    min_delta: float = 0.0
    best: float | None = None
    bad_epochs: int = 0

    def update(self, value: float) -> bool:
        """Record an epoch's monitored value; return whether it is a new best."""
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best = value
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs > self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.bad_epochs = state["bad_epochs"]


@dataclass
class EpochStats:
    """What one training epoch measured."""

    loss: float = 0.0
    accuracy: float = 0.0
    grad_norm: float = 0.0
    clips_per_second: float = 0.0
    seconds: float = 0.0
    clips: int = 0


class Trainer:
    """Trains a `Model` on batches of `(features, targets)`.

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
        model: Model,
        options: TrainingConfig,
        classes: list[str],
        output_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        multi_label: bool = False,
        threshold: float = 0.5,
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
        self.mode = options.monitor_mode
        if self.mode == "auto":
            self.mode = "min" if self.monitor.endswith("loss") else "max"
        # AMP: fp16 with a GradScaler on CUDA (bf16 where asked), bf16 on the CPU; `auto` is on
        # for CUDA only, since bf16 made the default model's CPU training step 13x slower.
        self.amp = options.amp is True or (options.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = (
            torch.bfloat16
            if self.device.type == "cpu" or options.amp_dtype == "bfloat16"
            else torch.float16
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp and self.amp_dtype == torch.float16
        )
        self.channels_last = options.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # What a step calls: the model, wrapped for DDP under torchrun, compiled when asked.
        self.eager_model: nn.Module = self.model
        if dist.is_initialized():
            self.eager_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.step_model = self.eager_model
        if options.compile:
            if has_compiler():
                self.step_model = torch.compile(self.eager_model)
            else:
                log.warning("training.compile: no C++ compiler found; training runs eagerly")
        self.early_stopping = EarlyStopping(
            self.mode, options.early_stopping_patience, options.min_delta
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: Schedule | None = None
        self.history: list[dict[str, float]] = []
        #: The full metrics of the last `test()` (per-class figures, confusion matrix).
        self.test_metrics: dict[str, Any] | None = None
        self.best_path = self.output_dir / "checkpoints" / "best.pth"
        self.last_path = self.output_dir / "checkpoints" / "last.pth"
        self._writer: SummaryWriter | None = None

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
        steps_per_epoch = len(train_loader)
        self.optimizer = make_optimizer(
            self.model.parameters(),
            options.optimizer,
            options.lr,
            options.weight_decay,
            options.momentum,
            options.nesterov,
        )
        spec = ScheduleSpec(
            name=options.lr_schedule,
            total_steps=max(steps_per_epoch * options.epochs, 1),
            steps_per_epoch=max(steps_per_epoch, 1),
            warmup_steps=round(options.warmup_epochs * steps_per_epoch),
            step_epochs=options.lr_step_epochs,
            gamma=options.lr_gamma,
        )
        self.schedule = Schedule(
            self.optimizer, spec, self.mode, options.plateau_patience, options.plateau_factor
        )
        started = time.perf_counter()
        start_epoch = 0
        if resume_from is not None:
            start_epoch = self._resume(Path(resume_from))
        self._log_start(train_loader)
        if self.early_stopping.should_stop:
            log.info("the resumed run had stopped early: nothing left to train")
            start_epoch = options.epochs
        for epoch in range(start_epoch, options.epochs):
            self._seed_epoch(epoch, train_loader)
            if self.on_epoch_start is not None:
                self.on_epoch_start(epoch)
            stats = self._train_epoch(train_loader, epoch)
            val = self.validate(val_loader)
            monitored = self._monitored(stats, val)
            self.schedule.step_epoch(monitored)
            improved = self.early_stopping.update(monitored)
            record = self._record(epoch, stats, val)
            self._save(epoch, record, improved)
            self._log_epoch(epoch, stats, val, improved)
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
        self._close_writer(hparams=True)
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
        grad_norm_sum = 0.0
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
                self._log_spectrograms(features)
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
            with self._autocast():
                logits = self._forward(features, head_labels)
                if teacher_logits is None:
                    loss = classification_loss(
                        logits,
                        loss_targets,
                        self.multi_label,
                        options.label_smoothing,
                        self.class_weights,
                    )
                else:
                    loss = distillation_loss(
                        logits,
                        teacher_logits,
                        loss_targets,
                        options.distillation.alpha,
                        options.distillation.temperature,
                        self.multi_label,
                        options.label_smoothing,
                    )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            # The pre-clip norm is logged; an infinite max_norm measures without clipping.
            grad_norm = nn.utils.clip_grad_norm_(
                self.model.parameters(), options.grad_clip_norm or math.inf
            )
            if options.grad_clip_value is not None:
                nn.utils.clip_grad_value_(self.model.parameters(), options.grad_clip_value)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step_batch()
            batch = features.shape[0]
            stats.clips += batch
            loss_sum += loss.detach() * batch
            correct += self._correct(logits.detach(), targets)
            grad_norm_sum += float(grad_norm)
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
        stats.grad_norm = grad_norm_sum / max(len(loader), 1)
        stats.clips_per_second = stats.clips / max(stats.seconds, 1e-9)
        return stats

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Logits and targets of every batch, and the mean loss, in eval mode."""
        self.model.eval()
        all_logits, all_targets, loss_sum, count = [], [], 0.0, 0
        for features, targets, *_ in loader:
            features, targets = self._to_device(features, targets)
            with self._autocast():
                logits = self._forward(features)
            logits = logits.float()
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

    def _to_device(
        self, features: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features = features.to(self.device, non_blocking=True)
        if self.channels_last:
            features = features.contiguous(memory_format=torch.channels_last)
        return features, targets.to(self.device, non_blocking=True)

    def _forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.step_model is self.eager_model:
            return self.eager_model(features, labels)
        try:
            return self.step_model(features, labels)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
            log.warning(
                "training.compile: torch.compile failed (%s: %s); training runs eagerly",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            self.step_model = self.eager_model
            return self.eager_model(features, labels)

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
            "lr": self.optimizer.param_groups[0]["lr"],
            **{f"val_{k}": v for k, v in val.items() if isinstance(v, float)},
        }
        self.history.append(record)
        writer = self._tensorboard()
        if writer is not None:
            step = epoch + 1
            writer.add_scalar("train/loss", stats.loss, step)
            writer.add_scalar("train/accuracy", stats.accuracy, step)
            writer.add_scalar("train/grad_norm", stats.grad_norm, step)
            writer.add_scalar("train/clips_per_second", stats.clips_per_second, step)
            writer.add_scalar("train/lr", record["lr"], step)
            for name, value in val.items():
                if isinstance(value, float):
                    writer.add_scalar(f"val/{name}", value, step)
            if "confusion_matrix" in val:
                figure = confusion_matrix_figure(val["confusion_matrix"], self.classes)
                writer.add_figure("val/confusion_matrix", figure, step)
            writer.flush()
        return record

    def _save(self, epoch: int, record: dict[str, float], improved: bool) -> None:
        if not is_main_process():
            return
        content = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "early_stopping": self.early_stopping.state_dict(),
            "epoch": epoch + 1,
            "rng": rng_state(),
            "metrics": record,
            "history": self.history,
            "monitor": self.monitor,
            "classes": self.classes,
            **self.checkpoint_extra,
        }
        save_checkpoint(self.last_path, content)
        if improved:
            save_checkpoint(self.best_path, content)
            log.info(
                "saved %s (%s %.4f) and %s",
                self.best_path,
                self.monitor,
                self.early_stopping.best,
                self.last_path.name,
            )
        else:
            log.info("saved %s", self.last_path)

    def _resume(self, path: Path) -> int:
        state = load_checkpoint(path)
        if state["classes"] != self.classes:
            raise CheckpointError(
                f"{path}: trained for classes {state['classes']}, this run has {self.classes}"
            )
        missing = [key for key in ("optimizer", "scheduler", "epoch") if key not in state]
        if missing:
            raise CheckpointError(f"{path}: cannot resume from it (no {', '.join(missing)})")
        if isinstance(self.model, QuantizedModel):  # QAT fine-tuning
            load_graph_state(self.model, state["model"], str(path))
        else:
            load_state(self.model, state["model"], path, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.history = list(state.get("history", []))
        set_rng_state(state["rng"])
        # The run's best so far, so that a resumed run in a new folder still ends on it.
        earlier_best = path.parent / "best.pth"
        if is_main_process() and earlier_best.is_file() and earlier_best != self.best_path:
            self.best_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(earlier_best, self.best_path)
        log.info("resumed from %s after epoch %d", path, state["epoch"])
        return int(state["epoch"])

    # ------------------------------------------------------------ logging

    def _tensorboard(self) -> SummaryWriter | None:
        if self._writer is None and is_main_process():
            self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        return self._writer

    def _close_writer(self, hparams: bool) -> None:
        writer = self._tensorboard()
        if writer is None:
            return
        if hparams and self.history:
            final = {f"hparam/{k}": v for k, v in self.history[-1].items() if k != "epoch"}
            if self.early_stopping.best is not None:
                final[f"hparam/best_{self.monitor}"] = self.early_stopping.best
            writer.add_hparams(self._hparams(), final, run_name="hparams")
        writer.close()
        self._writer = None

    def _hparams(self) -> dict[str, Any]:
        options = self.options
        return {
            "optimizer": options.optimizer,
            "lr": options.lr,
            "weight_decay": options.weight_decay,
            "lr_schedule": options.lr_schedule,
            "epochs": options.epochs,
            "label_smoothing": options.label_smoothing,
            "mixup_alpha": options.mixup_alpha,
            "grad_clip_norm": options.grad_clip_norm or 0.0,
            "amp": self.amp,
            "channels_last": self.channels_last,
            "compile": self.options.compile,
        }

    def _log_spectrograms(self, features: torch.Tensor) -> None:
        writer = self._tensorboard()
        if writer is None:
            return
        images = features[:4].detach().float().cpu()
        # (B, 1, frames, mels) -> mels up, frames across, scaled to [0, 1] per image.
        images = images.transpose(2, 3).flip(2)
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        writer.add_images("train/spectrograms", (images - low) / (high - low + 1e-9), 0)

    def _log_start(self, loader: DataLoader) -> None:
        parameters = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info(
            "training %s: %s parameters (%s trainable) on %s%s, %d threads; %d clips in %d "
            "batches per epoch; amp %s, channels_last %s, compile %s",
            type(self.model).__name__,
            f"{parameters:,}",
            f"{trainable:,}",
            self.device,
            f" x {dist.get_world_size()} processes (DDP)" if dist.is_initialized() else "",
            torch.get_num_threads(),
            len(loader.dataset) if hasattr(loader, "dataset") else -1,
            len(loader),
            f"on ({str(self.amp_dtype).removeprefix('torch.')})" if self.amp else "off",
            "on" if self.channels_last else "off",
            "on" if self.step_model is not self.eager_model else "off",
        )

    def _log_epoch(
        self, epoch: int, stats: EpochStats, val: dict[str, Any], improved: bool
    ) -> None:
        memory = ""
        if self.device.type == "cuda":
            memory = f" | peak GPU {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB"
            torch.cuda.reset_peak_memory_stats(self.device)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f f1 %.4f | lr %.2e | "
            "%.0f clips/s, %.1f s%s%s",
            epoch + 1,
            self.options.epochs,
            stats.loss,
            stats.accuracy,
            val["loss"],
            val["accuracy"],
            val["f1"],
            self.optimizer.param_groups[0]["lr"],
            stats.clips_per_second,
            stats.seconds,
            memory,
            " *" if improved else "",
        )
