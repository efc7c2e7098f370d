"""A training run's checkpoints: what `best.pth` and `last.pth` hold, writing them, and
restoring a run from one (`Trainer.fit(resume_from=...)`).

A checkpoint holds `model` (the state_dict, the layout PANNs users expect), the state of each
stateful part of the loop (optimizer, scheduler, scaler, early stopping), the epoch, the RNG
state of every generator, the epoch's metrics, the history and the class names, and what the
caller adds (the resolved config, the feature parameters, the normalisation statistics): test,
predict and export need only the checkpoint. Files are written by
`audioclf.checkpoint.save_checkpoint` (temporary file, fsync, rename).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from audioclf.checkpoint import (
    check_resumable,
    interrupts_held,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from audioclf.model import load_state
from audioclf.quant import QuantizedModel, load_graph_state
from audioclf.runtime import is_main_process

log = logging.getLogger(__name__)


class RunCheckpoints:
    """`best.pth` and `last.pth` in `folder`.

    `parts` (given to `save` and `restore`) name the run's stateful objects: `model` and
    anything else with `state_dict` / `load_state_dict`, stored under their names.
    """

    def __init__(
        self, folder: Path, classes: list[str], monitor: str, extra: dict[str, Any]
    ) -> None:
        self.best_path = folder / "best.pth"
        self.last_path = folder / "last.pth"
        self.classes = classes
        self.monitor = monitor
        self.extra = extra

    def save(
        self,
        parts: dict[str, Any],
        epoch: int,
        record: dict[str, float],
        history: list[dict[str, float]],
        best: float,
        improved: bool,
    ) -> None:
        """Write `last.pth` after `epoch` (0-based), and `best.pth` too when it `improved`
        (`best` is the monitored metric's best value); only the main process writes."""
        if not is_main_process():
            return
        content = {
            **{name: part.state_dict() for name, part in parts.items()},
            "epoch": epoch + 1,
            "rng": rng_state(),
            "metrics": record,
            "history": history,
            "monitor": self.monitor,
            "classes": self.classes,
            **self.extra,
        }
        with interrupts_held():  # last.pth and best.pth agree, even after Ctrl-C
            save_checkpoint(self.last_path, content)
            if improved:
                save_checkpoint(self.best_path, content)
        if improved:
            log.info(
                "saved %s (%s %.4f) and %s", self.best_path, self.monitor, best, self.last_path.name
            )
        else:
            log.info("saved %s", self.last_path)

    def restore(self, path: Path, parts: dict[str, Any]) -> tuple[int, list[dict[str, float]]]:
        """Load every part's state and the RNG states from the checkpoint at `path`, after
        checking that it is this run's (classes and config); the epochs it had trained and its
        history."""
        state = load_checkpoint(path)
        check_resumable(state, path, self.classes, self.extra.get("config"))
        model = parts["model"]
        if isinstance(model, QuantizedModel):  # QAT fine-tuning
            load_graph_state(model, state["model"], str(path))
        else:
            load_state(model, state["model"], path, strict=True)
        for name, part in parts.items():
            if name != "model":
                part.load_state_dict(state[name])
        set_rng_state(state["rng"])
        # The run's best so far, so that a resumed run in a new folder still ends on it.
        earlier_best = path.parent / "best.pth"
        if is_main_process() and earlier_best.is_file() and earlier_best != self.best_path:
            self.best_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(earlier_best, self.best_path)
        log.info("resumed from %s after epoch %d", path, state["epoch"])
        return int(state["epoch"]), list(state.get("history", []))
