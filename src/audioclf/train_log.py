"""What a training run reports: TensorBoard events in its folder and console lines.

Only the main process writes. `tensorboard --logdir outputs/` finds every run's events: scalars
per epoch (train and validation loss and metrics, LR, grad norm, clips/s), the validation
confusion matrix, a few input spectrograms and the hparams with the final metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from audioclf.metrics import confusion_matrix_figure
from audioclf.runtime import is_main_process
from audioclf.settings import TrainingConfig

log = logging.getLogger(__name__)


#: TensorBoard tag -> key of the Trainer's per-epoch record.
_TRAIN_SCALARS = {
    "train/loss": "train_loss",
    "train/accuracy": "train_accuracy",
    "train/grad_norm": "grad_norm",
    "train/clips_per_second": "clips_per_second",
    "train/lr": "lr",
}


class TrainingLog:
    """TensorBoard events (in `log_dir`, opened on first use) and console lines of a run."""

    def __init__(self, log_dir: Path, classes: list[str]) -> None:
        self.log_dir = log_dir
        self.classes = classes
        self._writer: SummaryWriter | None = None

    @property
    def writer(self) -> SummaryWriter | None:
        """The event writer; None outside the main process."""
        if self._writer is None and is_main_process():
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def start(
        self,
        model: nn.Module,
        device: torch.device,
        clips: int,
        batches: int,
        amp_dtype: torch.dtype | None,
        channels_last: bool,
        compiled: bool,
        accumulate: int = 1,
    ) -> None:
        """The line at the start of training: size, device, threads, data and speed switches."""
        parameters = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "training %s: %s parameters (%s trainable) on %s%s, %d threads; %d clips in %d "
            "batches per epoch%s; amp %s, channels_last %s, compile %s",
            type(model).__name__,
            f"{parameters:,}",
            f"{trainable:,}",
            device,
            f" x {dist.get_world_size()} processes (DDP)" if dist.is_initialized() else "",
            torch.get_num_threads(),
            clips,
            batches,
            f", an optimizer step every {accumulate} batches" if accumulate > 1 else "",
            "off" if amp_dtype is None else f"on ({str(amp_dtype).removeprefix('torch.')})",
            "on" if channels_last else "off",
            "on" if compiled else "off",
        )

    def spectrograms(self, features: torch.Tensor) -> None:
        """The first four inputs of a batch as images: mels up, frames across."""
        writer = self.writer
        if writer is None:
            return
        images = features[:4].detach().float().cpu()
        # (B, 1, frames, mels) -> mels up, frames across, scaled to [0, 1] per image.
        images = images.transpose(2, 3).flip(2)
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        writer.add_images("train/spectrograms", (images - low) / (high - low + 1e-9), 0)

    def epoch(self, record: dict[str, float], val: dict[str, Any]) -> None:
        """An epoch's scalars (`record`, as the Trainer keeps it in its history) and the
        validation confusion matrix."""
        writer = self.writer
        if writer is None:
            return
        step = int(record["epoch"])
        for tag, key in _TRAIN_SCALARS.items():
            writer.add_scalar(tag, record[key], step)
        for name, value in val.items():
            if isinstance(value, float):
                writer.add_scalar(f"val/{name}", value, step)
        if "confusion_matrix" in val:
            figure = confusion_matrix_figure(val["confusion_matrix"], self.classes)
            writer.add_figure("val/confusion_matrix", figure, step)
        writer.flush()

    def epoch_line(
        self,
        epochs: int,
        record: dict[str, float],
        val: dict[str, Any],
        seconds: float,
        improved: bool,
        device: torch.device,
    ) -> None:
        """One console line per epoch; on CUDA with the epoch's peak GPU memory."""
        memory = ""
        if device.type == "cuda":
            memory = f" | peak GPU {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
            torch.cuda.reset_peak_memory_stats(device)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f f1 %.4f | lr %.2e | "
            "%.0f clips/s, %.1f s%s%s",
            record["epoch"],
            epochs,
            record["train_loss"],
            record["train_accuracy"],
            val["loss"],
            val["accuracy"],
            val["f1"],
            record["lr"],
            record["clips_per_second"],
            seconds,
            memory,
            " *" if improved else "",
        )

    def close(
        self,
        hparams: dict[str, Any],
        history: list[dict[str, float]],
        monitor: str,
        best: float | None,
    ) -> None:
        """Write the hparams with the last epoch's metrics and the best monitored value (nothing
        before a first epoch) and close the events file."""
        writer = self.writer
        if writer is None:
            return
        if history:
            final = {f"hparam/{k}": v for k, v in history[-1].items() if k != "epoch"}
            if best is not None:
                final[f"hparam/best_{monitor}"] = best
            writer.add_hparams(hparams, final, run_name="hparams")
        writer.close()
        self._writer = None


def run_hparams(options: TrainingConfig, amp: bool) -> dict[str, Any]:
    """The hparams TensorBoard shows beside a run's final metrics (`amp` as resolved for this
    machine, not as configured)."""
    return {
        "optimizer": options.optimizer,
        "lr": options.lr,
        "weight_decay": options.weight_decay,
        "lr_schedule": options.lr_schedule,
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "accumulate_grad_batches": options.accumulate_grad_batches,
        "label_smoothing": options.label_smoothing,
        "mixup_alpha": options.mixup_alpha,
        "grad_clip_norm": options.grad_clip_norm or 0.0,
        "amp": amp,
        "channels_last": options.channels_last,
        "compile": options.compile,
    }


def divergence_message(epoch: int, what: str, lr: float, options: TrainingConfig, amp: bool) -> str:
    """What to tell a user whose run diverged in epoch `epoch` (0-based) and what to try."""
    remedies = [f"a lower training.lr (now {options.lr:g})"]
    if options.grad_clip_norm is None:
        remedies.append("training.grad_clip_norm (off)")
    if amp:
        remedies.append("training.amp=false")
    kept = {0: "no checkpoint was written", 1: "checkpoints/ holds epoch 1"}.get(
        epoch, f"checkpoints/ holds epochs 1-{epoch}"
    )
    return (
        f"training diverged in epoch {epoch + 1}: {what} (learning rate {lr:.3g}; {kept}). "
        f"Try {', or '.join(remedies)}"
    )
