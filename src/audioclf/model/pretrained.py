"""Loading weights into a model: official PANNs files, our own checkpoints, bare state_dicts."""

from __future__ import annotations

import itertools
import logging
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from audioclf.model.base import Model

log = logging.getLogger(__name__)

#: PANNs compute log-mels inside the model; ours come from the data pipeline (features=panns).
FRONT_END_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.")
_SHOWN_KEYS = 12


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file
    and the keys."""


@dataclass
class LoadReport:
    """What `load_pretrained` did besides loading matching tensors."""

    loaded: int = 0
    dropped_front_end: list[str] = field(default_factory=list)
    replaced_classifier: list[str] = field(default_factory=list)
    missing_batch_counters: list[str] = field(default_factory=list)


def load_file(path: str | Path, mmap: bool = False) -> Any:
    """What `torch.load(path, weights_only=True)` reads, on the CPU; a missing or unreadable
    file is a CheckpointError naming it. `mmap` maps the tensors instead of reading them, for
    a look at the rest (files in torch's legacy format, which cannot be mapped, are read)."""
    path = Path(path)
    if path.is_dir():  # a run folder, most often
        found = [str(f) for f in sorted(itertools.islice(path.rglob("*.pth"), 100))[:4]]
        raise CheckpointError(
            f"{path}: a folder, not a checkpoint file"
            + (f"; the checkpoints below it include {', '.join(found)}" if found else "")
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
        )
    except pickle.UnpicklingError as error:
        # torch's message here advises weights_only=False, which could run the file's code.
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint, or one holding objects other than tensors and "
            "plain containers (read with weights_only=True, which never runs a file's code)"
        ) from error
    except Exception as error:
        # The unpickler raises almost anything on a file that is not a checkpoint (KeyError,
        # IndexError, RuntimeError, ...): each is this file being unreadable.
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})"
        ) from error


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, with weights stored bare or under the key "model"."""
    content = load_file(path)
    if isinstance(content, Mapping) and isinstance(content.get("model"), Mapping):
        content = content["model"]
    if not isinstance(content, Mapping) or not content:
        raise CheckpointError(f"{path}: holds no state_dict (tensors, bare or under 'model')")
    not_tensors = [key for key, value in content.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {_names(not_tensors)}")
    # DataParallel / DistributedDataParallel save every name with a "module." prefix.
    if all(key.startswith("module.") for key in content):
        return {key.removeprefix("module."): value for key, value in content.items()}
    return dict(content)


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f" ... and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")


def load_pretrained(model: Model, path: str | Path) -> LoadReport:
    """Load a checkpoint's weights into `model`, in place.

    Leaves out the PANNs waveform front end, accepts files without BatchNorm
    `num_batches_tracked` counters, and keeps the model's own (freshly initialised) classifier
    when the checkpoint's has another number of classes. Any other missing, unexpected or
    differently shaped key raises CheckpointError naming it.
    """
    return load_state(model, read_state_dict(path), path)


def load_state(
    model: Model, state: Mapping[str, torch.Tensor], source: str | Path, strict: bool = False
) -> LoadReport:
    """`load_pretrained` for a state_dict already in memory; `source` names it in errors.

    `strict`: a classifier of another shape is an error too (resuming, testing).
    """
    report = LoadReport(dropped_front_end=[k for k in state if k.startswith(FRONT_END_PREFIXES)])
    state = {k: v for k, v in state.items() if not k.startswith(FRONT_END_PREFIXES)}
    own = model.state_dict()
    classifier_prefix = model.classifier_name + "."
    reshaped = []
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            if key.startswith(classifier_prefix) and not strict:
                report.replaced_classifier.append(key)
            else:
                reshaped.append(f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    missing = [key for key in own if key not in state]
    report.missing_batch_counters = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in own]
    found = {"shape differs": reshaped, "missing": missing, "unexpected": unexpected}
    problems = [f"{label}: {_names(keys)}" for label, keys in found.items() if keys]
    if problems:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    loadable = {k: v for k, v in state.items() if k not in report.replaced_classifier}
    model.load_state_dict(loadable, strict=False)
    report.loaded = len(loadable)
    if report.replaced_classifier:
        log.info(
            "%s: classifier has another class count; kept a new one (%s)",
            source,
            ", ".join(report.replaced_classifier),
        )
    return report
