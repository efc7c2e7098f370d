"""Trainer checkpoints: written atomically, read with `weights_only=True`.

A checkpoint is a plain dict: `model` (the state_dict, as PANNs users expect it), `optimizer`,
`scheduler`, `scaler`, `epoch`, `rng` (every generator's state), `metrics`, `classes`,
`normalization`, `config` (the resolved run config) and `features` (the log-mel parameters):
test, predict and export need nothing else. `seen_clips` holds the content digests of the
clips that trained or validated the model, so that a later test on them is refused.
`resume_paths` finds the ones `run.resume` means.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from audioclf.model import CheckpointError
from audioclf.model.pretrained import load_file
from audioclf.normalization import FeatureNormalization
from audioclf.settings import ConfigError, Settings, fill_missing_keys, load_settings

log = logging.getLogger(__name__)

#: Bumped when the layout changes in a way older readers would misread.
CHECKPOINT_VERSION = 1


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then deliver the first.

    Checkpoint writes are short; one cut by a KeyboardInterrupt ends in a torch.save error
    and a traceback instead of the interrupt, and files written together (last.pth and
    best.pth) would disagree. Off the main thread nothing is held (Python delivers signals
    to the main thread only).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        held: signal.signal(held, lambda signum, frame: received.append(signum))
        for held in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for held, handler in previous.items():
            signal.signal(held, handler)
    if received:
        signal.raise_signal(received[0])


def save_checkpoint(path: str | Path, content: dict[str, Any]) -> None:
    """Write `content` to `path` so that a crash at any moment leaves either the previous
    file or the new one, never a broken one: temporary file, fsync, rename, fsync the folder.
    Ctrl-C during the write takes effect once the file is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with interrupts_held():
        try:
            with partial.open("wb") as handle:
                writer = _Writes(handle)
                try:
                    torch.save({"version": CHECKPOINT_VERSION, **content}, writer)
                except RuntimeError as error:
                    # torch's zip writer reports a failed write as "unexpected pos"; the
                    # OSError under it (a full disk) is the news.
                    if writer.error is None:
                        raise
                    raise writer.error from error
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except OSError as error:
            free = shutil.disk_usage(path.parent).free / 1e6
            kept = "; the previous one is intact" if path.exists() else ""
            raise CheckpointError(
                f"{path}: cannot write it ({error.strerror or error}; {free:.1f} MB free on "
                f"its disk){kept}"
            ) from error
        finally:
            partial.unlink(missing_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class _Writes:
    """A binary file's `write` for torch.save, keeping the OSError of a failed write."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint the trainer wrote; anything else is a CheckpointError naming the file."""
    content = load_file(path)
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: not a trainer checkpoint (no dict inside)")
    # An int8 checkpoint (audioclf.deploy) holds `quantized` where a float one has `model`.
    weights = "quantized" if "quantized" in content else "model"
    missing = [key for key in (weights, "classes") if key not in content]
    if missing:
        raise CheckpointError(
            f"{path}: not a trainer checkpoint (no {', '.join(missing)}); a bare state_dict "
            "loads through model.params.pretrained_path instead"
        )
    return content


def rng_state() -> dict[str, Any]:
    """The state of every generator a run draws from (Python, NumPy, torch, CUDA), in types
    that `weights_only` loading accepts."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: Why a checkpoint without the run's config or feature parameters cannot be tested, predicted
#: with or exported on its own, and where one that can comes from.
NOT_FROM_THE_JOB = (
    "a Trainer used on its own writes the weights, classes and training state, and testing, "
    "predicting and exporting also need the config and feature parameters that the main job "
    "stores (python main.py, or audioclf.job.run from Python)"
)


def stored_normalization(content: dict[str, Any], path: str | Path) -> FeatureNormalization | None:
    """A checkpoint's normalisation statistics (None when it was trained without); unusable
    ones are a CheckpointError naming the file."""
    stored = content.get("normalization")
    if stored is None:
        return None
    try:
        return FeatureNormalization.from_lists(stored)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: unusable normalisation statistics ({error})") from error


def pack_digests(digests: Iterable[str]) -> torch.Tensor:
    """Hex content digests as one uint8 tensor, a sorted row each: compact in a checkpoint
    and read back with `weights_only=True`."""
    rows = sorted({bytes.fromhex(digest) for digest in digests})
    width = len(rows[0]) if rows else 16
    packed = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), width)
    return torch.from_numpy(packed.copy())


def stored_seen_clips(content: dict[str, Any]) -> set[str]:
    """The content digests of the clips that trained or validated a checkpoint's model (none
    for a checkpoint written before audioclf stored them)."""
    seen = content.get("seen_clips")
    if seen is None:
        return set()
    return {row.tobytes().hex() for row in seen.numpy()}


def stored_config(content: dict[str, Any], path: str | Path) -> tuple[DictConfig, Settings]:
    """The run config a checkpoint was trained with and its checked settings; a
    CheckpointError naming the file when it holds none or the config no longer loads.

    `model.params.pretrained_path` is cleared: the checkpoint's weights replace the pretrained
    ones, and the file it named need not exist where the checkpoint is used. So are the
    stored run's export and quantise switches, which are its history, not this machine's
    job: checking them would ask for the export extras wherever the checkpoint is read.
    Keys that an earlier audioclf did not write take today's defaults. A QAT fine-tuning
    checkpoint is refused, pointing to the run's int8 and float ones.
    """
    if not isinstance(content.get("config"), dict):
        raise CheckpointError(f"{path}: holds no run config; {NOT_FROM_THE_JOB}")
    if content.get("quantized_prepared"):
        run = Path(path).resolve().parent.parent.parent
        raise CheckpointError(
            f"{path}: a QAT fine-tuning checkpoint (the fake-quantized graph, which run.resume "
            f"continues); the int8 model is {run / 'checkpoints' / 'int8.pth'} and the float one "
            f"{run / 'checkpoints' / 'best.pth'}"
        )
    config = OmegaConf.create(content["config"])
    if OmegaConf.select(config, "model.params.pretrained_path") is not None:
        config.model.params.pretrained_path = None
    for switch in ("run.export", "run.quantise"):
        if OmegaConf.select(config, switch) is not None:
            OmegaConf.update(config, switch, False)
    added = fill_missing_keys(config)
    if added:
        log.info("%s: written before %s existed; using today's defaults", path, ", ".join(added))
    try:
        return config, load_settings(config)
    except ConfigError as error:
        newer = "; a newer audioclf wrote it" if "unknown key" in str(error) else ""
        raise CheckpointError(
            f"{path}: its stored config does not load ({error}{newer})"
        ) from error


#: Keys a resumed run may set otherwise than the run it continues: where and how fast it
#: runs, how long it trains and when it stops early, what it does after training, and where
#: the data and pretrained files are. Any other difference (the learning rate, the batch, the
#: model, the features, the splits, the augmentation) would make "continue this run" train
#: something that neither run's config describes.
RESUME_MAY_CHANGE = (
    "system",
    "run",
    "data.root",
    "data.manifest",
    "data.name",
    "data.on_bad_file",
    "training.epochs",
    "training.early_stopping_patience",
    "training.min_delta",
    "training.amp",
    "training.amp_dtype",
    "training.channels_last",
    "training.compile",
    "model.params.pretrained_path",
    "model.params.gradient_checkpointing",
    "model.checkpoint_path",
    "model.quantization.epochs",
    "teacher_model.checkpoint_path",
)


def resume_conflicts(trained: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Where the run config `current` differs from `trained` (that of the checkpoint it would
    resume) outside RESUME_MAY_CHANGE, as "key: trained value -> current value", sorted.
    A key that either lacks (an earlier audioclf did not write it) counts as today's default;
    a model parameter that the checkpoint's config lacks (added since) is not compared. An
    absent section (`teacher_model: null`) has no keys: adding a teacher names its keys."""
    before, after = (
        _flatten({name: value for name, value in _filled(config).items() if value is not None})
        for config in (trained, current)
    )
    conflicts = []
    for key in sorted(set(before) | set(after)):
        if any(key == allowed or key.startswith(allowed + ".") for allowed in RESUME_MAY_CHANGE):
            continue
        if key not in before and key.split(".")[1:2] == ["params"]:
            continue
        if before.get(key, _UNSET) != after.get(key, _UNSET):
            conflicts.append(f"{key}: {before.get(key, _UNSET)} -> {after.get(key, _UNSET)}")
    return conflicts


def check_resumable(
    state: dict[str, Any], path: Path, classes: list[str], config: dict[str, Any] | None
) -> None:
    """A CheckpointError unless a run for `classes` with the run config `config` (None: not
    checked) can continue the checkpoint `state` read from `path`."""
    if state["classes"] != classes:
        raise CheckpointError(
            f"{path}: trained for classes {state['classes']}, this run has {classes}"
        )
    missing = [key for key in ("optimizer", "scheduler", "epoch") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: cannot resume from it (no {', '.join(missing)})")
    if not isinstance(state.get("config"), dict) or not isinstance(config, dict):
        return
    conflicts = resume_conflicts(state["config"], config)
    if conflicts:
        overrides = path.parent.parent / ".hydra" / "overrides.yaml"
        began = f" (it began with the overrides in {overrides})" if overrides.is_file() else ""
        raise CheckpointError(
            f"{path}: cannot resume it with other settings than it trained with "
            f"({'; '.join(conflicts)}); resume with its settings{began}, or start a new run "
            f"from its weights with run.checkpoint_path={path} run.train=true"
        )


_UNSET = "(unset)"


def _filled(config: dict[str, Any]) -> dict[str, Any]:
    filled = OmegaConf.create(config)
    fill_missing_keys(filled)
    return OmegaConf.to_container(filled)


def _flatten(values: Any, key: str = "") -> dict[str, Any]:
    if isinstance(values, dict) and values:
        flat = {}
        for name, value in values.items():
            flat.update(_flatten(value, f"{key}.{name}" if key else str(name)))
        return flat
    return {key: values}


def resume_paths(resume: bool | str, output_dir: Path) -> tuple[Path | None, Path | None]:
    """`run.resume` as the checkpoints to continue from: the training run's `last.pth` and
    the QAT fine-tuning's (`qat/checkpoints/last.pth` beside it), each None when absent.

    A path may name either; true takes this run's folder or the newest run under the same
    outputs/ root. (None, None) for false.
    """
    if resume is False:
        return None, None
    if isinstance(resume, str) and Path(resume).parent.parent.name == "qat":
        qat = Path(resume)
        if not qat.is_file():
            raise ConfigError(f"run.resume: no such checkpoint {resume!r}")
        float_last = qat.parent.parent.parent / "checkpoints" / "last.pth"
        return (float_last if float_last.is_file() else None), qat
    path = resume_path(resume, output_dir)
    if path is None:
        return None, None
    qat = path.parent.parent / "qat" / "checkpoints" / "last.pth"
    return path, (qat if qat.is_file() else None)


def resume_path(resume: bool | str, output_dir: Path) -> Path | None:
    """`run.resume` (not false): a path, or for true the newest `checkpoints/last.pth` of
    this run's folder or of the other runs under the same outputs/ root.

    A part of a larger job (a sweep's job number, multirun/DATE/TIME/N; a cross-validation
    fold, .../fold_k) resumes the same part of an earlier run, never another part's: job N of
    a sweep has job N's overrides, fold k's model has seen the other folds' test clips. A
    part that no earlier run reached is None (it starts from the beginning, with a warning):
    the interrupted job's later parts never began.
    """
    if isinstance(resume, str):
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(f"run.resume: no such checkpoint {resume!r}")
        return path
    own = output_dir / "checkpoints" / "last.pth"
    if own.is_file():
        return own
    part, base = [], output_dir
    if base.name.startswith("fold_"):
        part, base = [base.name], base.parent
    if base.name.isdigit():
        part, base = [base.name, *part], base.parent
    # Hydra's layout: outputs/DATE/TIME; runs of other days are searched too.
    root = base.parent.parent
    pattern = "/".join(["*", "*", *part, "checkpoints", "last.pth"])
    candidates = list(root.glob(pattern))
    if not candidates and part:
        log.warning(
            "run.resume=true: no earlier run of %s (%s under %s); it starts from the beginning",
            "/".join(part),
            pattern,
            root,
        )
        return None
    if not candidates:
        raise ConfigError(
            f"run.resume=true: no {pattern} under {root}; give the file with run.resume=PATH"
        )
    return max(candidates, key=lambda path: path.stat().st_mtime)
