"""Learning-rate schedules against their formulas, warmup, plateau, and a resumed run's schedule."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from audioclf.schedules import Schedule, ScheduleSpec, lr_factor, make_optimizer
from conftest import (
    separable_loaders,
    tiny_trainer,
    training_options,
)


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
        tiny_trainer(tmp_path, training_options(epochs=1, warmup_epochs=2.0)).fit(
            *separable_loaders(48)
        )
    assert "warmup_epochs=2 is not shorter than training.epochs=1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="audioclf.schedules"):
        tiny_trainer(tmp_path / "b", training_options(epochs=2, warmup_epochs=1.0)).fit(
            *separable_loaders(48)
        )
    assert "warmup_epochs" not in caplog.text


def test_the_logged_rate_is_the_one_each_epoch_trained_at(tmp_path):
    # It was the rate after the epoch's last step: the next epoch's, 0 for the last epoch.
    trainer = tiny_trainer(tmp_path, training_options(epochs=2, lr=0.1))
    history = trainer.fit(*separable_loaders(16))["history"]  # one batch an epoch
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
    tiny_trainer(tmp_path, training_options(epochs=2)).fit(*separable_loaders(16))
    resumed = tiny_trainer(tmp_path / "again", training_options(epochs=1))
    with caplog.at_level("INFO"):
        resumed.fit(
            *separable_loaders(16), resume_from=tmp_path / "run" / "checkpoints" / "last.pth"
        )
    assert "has trained 2 epochs (training.epochs=1): nothing left to train" in caplog.text
    assert "schedule was planned over" not in caplog.text
    assert len(resumed.history) == 2
