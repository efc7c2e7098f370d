"""Learning-rate schedules as pure functions of the step, the optimizers they drive, and
early stopping.

Every schedule but `plateau` is a multiplier of the base learning rate computed from the
optimizer step alone, so it is stepped per batch (a step schedule's multiplier changes only at
epoch boundaries) and resumes exactly from a step count. `plateau` reacts to the monitored
validation metric, so it is stepped once per epoch. Early stopping watches the same metric.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from audioclf.runtime import is_main_process
from audioclf.settings import TrainingConfig

SCHEDULES = ("constant", "cosine", "step", "plateau", "onecycle")
OPTIMIZERS = ("adamw", "sgd")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleSpec:
    """What a schedule needs to know; steps are optimizer steps (batches)."""

    name: str
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine: the floor, as a fraction of the base rate
    step_epochs: int = 10  # step: multiply by `gamma` every `step_epochs` epochs
    gamma: float = 0.1
    onecycle_pct_start: float = 0.3
    onecycle_div_factor: float = 25.0
    onecycle_final_div_factor: float = 1e4
    onecycle_momentum: tuple[float, float] = (0.85, 0.95)  # (at the peak rate, at the ends)


def schedule_spec(options: TrainingConfig, steps_per_epoch: int) -> ScheduleSpec:
    """The schedule of a run of `options.epochs` epochs of `steps_per_epoch` batches. A warmup
    as long as the run (which never reaches `options.lr`) is named in a warning."""
    spec = ScheduleSpec(
        name=options.lr_schedule,
        total_steps=max(steps_per_epoch * options.epochs, 1),
        steps_per_epoch=max(steps_per_epoch, 1),
        warmup_steps=round(options.warmup_epochs * steps_per_epoch),
        step_epochs=options.lr_step_epochs,
        gamma=options.lr_gamma,
    )
    long_warmup = spec.name != "onecycle" and spec.warmup_steps >= spec.total_steps > 1
    if long_warmup and is_main_process():  # once under torchrun
        log.warning(
            "training.warmup_epochs=%g is not shorter than training.epochs=%d: the learning "
            "rate rises for the whole run and never reaches training.lr=%g",
            options.warmup_epochs,
            options.epochs,
            options.lr,
        )
    return spec


def _cosine(start: float, end: float, progress: float) -> float:
    """From `start` at progress 0 to `end` at 1, along half a cosine."""
    return end + (start - end) * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2


def lr_factor(spec: ScheduleSpec, step: int) -> float:
    """The multiplier of the base learning rate at optimizer step `step` (0-based).

    constant: 1 (after warmup). cosine: linear warmup from 0 over `warmup_steps`, then half a
    cosine from 1 down to `min_lr_ratio`, which the step after the last would reach (as
    Hugging Face's and timm's cosines do: every step trains, the last one at a small rate).
    step: `gamma ** (epoch // step_epochs)` (after warmup). onecycle: PyTorch's OneCycleLR
    with cosine annealing, from 1/div_factor up to 1 over `onecycle_pct_start` of the steps,
    then down to 1/(div_factor * final_div_factor). plateau: 1 here (the plateau scheduler
    scales it).
    """
    if spec.name == "onecycle":
        rising, progress = _onecycle_phase(spec, step)
        initial = 1.0 / spec.onecycle_div_factor
        final = initial / spec.onecycle_final_div_factor
        return _cosine(initial, 1.0, progress) if rising else _cosine(1.0, final, progress)
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.name == "cosine":
        decay_steps = max(spec.total_steps - spec.warmup_steps, 1)
        return _cosine(1.0, spec.min_lr_ratio, (step - spec.warmup_steps) / decay_steps)
    if spec.name == "step":
        return spec.gamma ** ((step // spec.steps_per_epoch) // spec.step_epochs)
    if spec.name in ("constant", "plateau"):
        return 1.0
    raise ValueError(f"lr_schedule must be one of {SCHEDULES}, not {spec.name!r}")


def onecycle_momentum(spec: ScheduleSpec, step: int) -> float:
    """OneCycleLR's momentum at `step` (SGD's momentum, Adam's beta1): down from the higher
    value to the lower while the rate rises, back up while it falls."""
    rising, progress = _onecycle_phase(spec, step)
    low, high = spec.onecycle_momentum
    return _cosine(high, low, progress) if rising else _cosine(low, high, progress)


def _onecycle_phase(spec: ScheduleSpec, step: int) -> tuple[bool, float]:
    """Whether `step` is in OneCycleLR's rising phase, and how far through its phase."""
    peak = spec.onecycle_pct_start * spec.total_steps - 1
    if step <= peak:
        return True, step / peak if peak > 0 else 1.0
    return False, (step - peak) / max(spec.total_steps - 1 - peak, 1)


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = True,
) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum (and Nesterov momentum when `nesterov`).

    Both use PyTorch's fused kernels where every parameter is a float on the CPU or CUDA: one
    kernel for the whole update instead of a dozen per parameter group (AdamW's step on
    EfficientNetV2-mobile: 6 ms -> 2 ms on the CPU, about 5% of a training step).
    """
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    fused = bool(trainable) and all(
        parameter.device.type in ("cpu", "cuda") and parameter.is_floating_point()
        for parameter in trainable
    )
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(
            trainable,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov and momentum > 0,
            weight_decay=weight_decay,
            fused=fused or None,
        )
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {name!r}")


class Schedule:
    """The per-batch multiplier of `spec`, and for `plateau` a ReduceLROnPlateau on top.

    `state_dict` / `load_state_dict` carry the step count and the plateau state, so a resumed
    run continues the same curve.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        spec: ScheduleSpec,
        mode: str = "max",
        plateau_patience: int = 3,
        plateau_factor: float = 0.5,
    ) -> None:
        self.spec = spec
        factor: Callable[[int], float] = lambda step: lr_factor(spec, step)  # noqa: E731
        self.per_batch = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        # onecycle cycles the momentum too, as OneCycleLR does (SGD only when it has one).
        self.cycles_momentum = spec.name == "onecycle" and all(
            "betas" in group or group.get("momentum", 0) > 0 for group in optimizer.param_groups
        )
        self._set_momentum()
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=mode, factor=plateau_factor, patience=plateau_patience
            )
            if spec.name == "plateau"
            else None
        )

    def step_batch(self) -> None:
        """After each optimizer step. `plateau` follows its warmup per batch, then leaves
        the rate to the plateau scheduler (a step of the per-batch multiplier would undo its
        cuts)."""
        if self.plateau is None or self.warming_up:
            self.per_batch.step()
        self._set_momentum()

    def _set_momentum(self) -> None:
        if not self.cycles_momentum:
            return
        momentum = onecycle_momentum(self.spec, self.per_batch.last_epoch)
        for group in self.per_batch.optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            else:
                group["momentum"] = momentum

    def step_epoch(self, monitored: float) -> None:
        """After each validation, with the monitored metric (`plateau`: once warmup is over,
        which the plateau's cuts would not survive)."""
        if self.plateau is not None and not self.warming_up:
            self.plateau.step(monitored)

    @property
    def warming_up(self) -> bool:
        return self.per_batch.last_epoch < self.spec.warmup_steps

    def state_dict(self) -> dict:
        return {
            "per_batch": self.per_batch.state_dict(),
            "plateau": None if self.plateau is None else self.plateau.state_dict(),
            "total_steps": self.spec.total_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`'s step. When the plan's length changed since (a resumed run
        given more epochs), the curve is this spec's, from the step reached: the learning rate
        is set to it now, not left at the old plan's value (0 at the end of a cosine)."""
        self.per_batch.load_state_dict(state["per_batch"])
        if self.plateau is not None:
            if state.get("plateau") is not None:
                self.plateau.load_state_dict(state["plateau"])
            return
        step = self.per_batch.last_epoch
        planned = state.get("total_steps", self.spec.total_steps)
        # Said once under torchrun, and only when steps are left to take at the new rate.
        if planned != self.spec.total_steps and step < self.spec.total_steps and is_main_process():
            log.warning(
                "the %s learning-rate schedule was planned over %d steps and is now over %d "
                "(training.epochs or the batches per epoch changed): it continues from step %d "
                "at %.3g times the base rate",
                self.spec.name,
                planned,
                self.spec.total_steps,
                step,
                lr_factor(self.spec, step),
            )
        rates = [base * lr_factor(self.spec, step) for base in self.per_batch.base_lrs]
        for group, rate in zip(self.per_batch.optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        self._set_momentum()


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
