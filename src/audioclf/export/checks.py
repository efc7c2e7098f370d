"""Each export run on real test clips and compared with the PyTorch model it came from."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from audioclf.export.formats import ExportError, load_runner

#: Float exports: the largest |logit difference| allowed against PyTorch.
MAX_ABS_DIFF = 1e-4
#: Int8 exports: the least top-1 agreement with the int8 PyTorch model, and the most test
#: accuracy (points) they may lose against the float model.
MIN_INT8_AGREEMENT = 0.99
MAX_INT8_ACCURACY_DROP = 0.5
#: Waveform-in exports with the float64 front end: the largest |log-mel difference| allowed
#: against `compute_log_mel` on the check clips (float32 front ends are measured, not held
#: to it: a float32 DFT is off by ~1e-3 where TensorFlow's own float32 front end is).
MAX_FRONTEND_DIFF = 1e-3


@dataclass(frozen=True)
class Check:
    """An export's agreement with PyTorch on the check clips."""

    format: str
    path: str
    precision: str
    clips: int
    max_abs_diff: float
    top1_agreement: float
    test_accuracy: float | None
    passed: bool
    failure: str | None
    input: str = "log_mel"
    #: Waveform-in files: max |log-mel difference| of the front end against compute_log_mel.
    frontend_max_abs_diff: float | None = None
    frontend_dtype: str | None = None
    #: Multi-label models: the share of clips whose predicted labels (logit >= 0, probability
    #: >= 0.5) are those of PyTorch, every label of the clip.
    label_set_agreement: float | None = None
    #: TFLite Micro: the tensor arena it allocated, the RAM a microcontroller needs beside
    #: the model.
    arena_bytes: int | None = None


def check_export(
    fmt: str,
    path: Path,
    reference: nn.Module,
    inputs: np.ndarray,
    *,
    int8: bool = False,
    labels: np.ndarray | None = None,
    float_accuracy: float | None = None,
    batch_size: int = 32,
    input_kind: str = "log_mel",
    frontend_max_abs_diff: float | None = None,
    frontend_dtype: str | None = None,
    output_step: float | None = None,
    multi_label: bool = False,
    runner: Callable[[Path], Callable[[np.ndarray], np.ndarray]] | None = None,
    probabilities: bool = False,
) -> Check:
    """Run the export and the PyTorch model (`reference`, fed the same `inputs`: NCHW log-mel
    or waveforms) and compare: float exports to max |delta logit| <= 1e-4 and 100% top-1
    agreement; int8 exports to at least 99% top-1 agreement with the int8 PyTorch model and,
    given `labels` and the float model's accuracy, test accuracy at most 0.5 points below it.
    A multi-label model's predicted label sets (logit >= 0) must agree as top-1 does (100%,
    or 99% for int8): a label can cross the threshold without moving the top one.
    A float64 front end must also be within 1e-3 of compute_log_mel. `output_step` (an int8
    TFLite file's output scale) lets a failed int8 check say its deviation in output steps.

    `runner` (path -> function inputs -> outputs) runs the file in place of `load_runner`'s
    runtime; an ExportError it raises fails the check with its message. With `probabilities`
    the file and `reference` output probabilities, not logits: the label-set threshold is 0.5.
    """
    batches = [inputs[start : start + batch_size] for start in range(0, len(inputs), batch_size)]
    with torch.no_grad():
        expected_logits = np.concatenate(
            [reference(torch.from_numpy(batch)).numpy() for batch in batches]
        )
    failure = None
    try:
        run = (runner or load_runner)(path)
        exported_logits = np.concatenate([run(batch) for batch in batches])
    except ExportError as error:  # the runtime refused the file: the check's failure
        failure = str(error)
    arena_bytes = getattr(run, "arena_bytes", None) if failure is None else None
    precision = "int8" if int8 else "float32"
    max_abs_diff, agreement, accuracy, label_sets = float("inf"), 0.0, None, None
    if failure is None and exported_logits.shape != expected_logits.shape:
        failure = f"output shape {exported_logits.shape} != {expected_logits.shape}"
    if failure is None:  # outputs of the same shape to compare
        max_abs_diff = float(np.abs(exported_logits - expected_logits).max())
        agreement = float((exported_logits.argmax(1) == expected_logits.argmax(1)).mean())
        if multi_label:
            threshold = 0.5 if probabilities else 0.0
            same = (exported_logits >= threshold) == (expected_logits >= threshold)
            label_sets = float(same.all(axis=1).mean())
        int8_accuracy = None
        if labels is not None:
            accuracy = float((exported_logits.argmax(1) == labels).mean())
            int8_accuracy = float((expected_logits.argmax(1) == labels).mean())
        failure = _failure(
            int8,
            max_abs_diff,
            agreement,
            accuracy,
            float_accuracy,
            label_sets,
            int8_accuracy,
            probabilities,
        )
        if int8 and failure is not None and agreement < MIN_INT8_AGREEMENT:
            failure += _rounding_or_fault(exported_logits, expected_logits, output_step)
    if (
        failure is None
        and frontend_dtype == "float64"
        and frontend_max_abs_diff is not None
        and not frontend_max_abs_diff <= MAX_FRONTEND_DIFF
    ):
        failure = (
            f"front end max |delta log-mel| {frontend_max_abs_diff:.3g} > {MAX_FRONTEND_DIFF:g} "
            "against compute_log_mel"
        )
    return Check(
        fmt,
        str(path),
        precision,
        len(inputs),
        max_abs_diff,
        agreement,
        accuracy,
        failure is None,
        failure,
        input_kind,
        frontend_max_abs_diff,
        frontend_dtype,
        label_sets,
        arena_bytes,
    )


def top1_margins(logits: np.ndarray) -> np.ndarray:
    """Each row's top logit minus its second: how far rounding must move a clip to flip it."""
    top_two = np.sort(logits, axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def _rounding_or_fault(exported: np.ndarray, expected: np.ndarray, step: float | None) -> str:
    """What tells rounding from a converter fault when int8 top-1 agreement is low: the median
    |dlogit| (a correct conversion differs from int8 PyTorch by rounding, measured at 1-2
    output steps; litert-torch's constant mix-up at 29) against int8 PyTorch's median top-1
    margin (a model trained too little has margins of a few steps, which rounding flips)."""
    deviation = float(np.median(np.abs(exported - expected)))
    margin = float(np.median(top1_margins(expected)))
    if step:
        return (
            f" (median |dlogit| {deviation / step:.1f} output steps, int8 PyTorch's median top-1 "
            f"margin {margin / step:.1f}: rounding gives 1-2 steps and flips margins of a few, "
            "as in a model trained too little; a converter fault gives tens)"
        )
    return f" (median |dlogit| {deviation:.3g}, int8 PyTorch's median top-1 margin {margin:.3g})"


def _failure(
    int8: bool,
    max_abs_diff: float,
    agreement: float,
    accuracy: float | None,
    float_accuracy: float | None,
    label_sets: float | None = None,
    int8_accuracy: float | None = None,
    probabilities: bool = False,
) -> str | None:
    """Why the check fails, or None. `int8_accuracy`: the int8 PyTorch model's test accuracy,
    which tells an int8 file's accuracy loss of quantising from one of the conversion.
    `probabilities`: the outputs are probabilities, not logits."""
    output = "probability" if probabilities else "logit"
    label_rule = "probability >= 0.5" if probabilities else "logit >= 0"
    if int8:
        if agreement < MIN_INT8_AGREEMENT:
            return f"top-1 agreement with int8 PyTorch {agreement:.2%} < {MIN_INT8_AGREEMENT:.0%}"
        if label_sets is not None and label_sets < MIN_INT8_AGREEMENT:
            return (
                f"label-set agreement ({label_rule}) with int8 PyTorch {label_sets:.2%} < "
                f"{MIN_INT8_AGREEMENT:.0%}"
            )
        if (
            accuracy is not None
            and float_accuracy is not None
            and 100 * (float_accuracy - accuracy) > MAX_INT8_ACCURACY_DROP
        ):
            failure = (
                f"test accuracy {accuracy:.2%} is more than {MAX_INT8_ACCURACY_DROP} points "
                f"below the float model's {float_accuracy:.2%}"
            )
            # int8_accuracy comes with accuracy: both from the labels.
            if accuracy >= int8_accuracy:
                return failure + (
                    f" (int8 PyTorch: {int8_accuracy:.2%}, so quantising lost it, not the "
                    "conversion: more QAT fine-tuning, model.quantization.epochs, or QAT "
                    "instead of PTQ may win it back)"
                )
            return failure + f" (int8 PyTorch: {int8_accuracy:.2%}: the conversion lost the rest)"
        return None
    if not max_abs_diff <= MAX_ABS_DIFF:
        return f"max |delta {output}| {max_abs_diff:.3g} > {MAX_ABS_DIFF:g}"
    if agreement < 1.0:
        return f"top-1 agreement {agreement:.2%} < 100%"
    if label_sets is not None and label_sets < 1.0:
        return f"label-set agreement ({label_rule}) {label_sets:.2%} < 100%"
    return None


def table(checks: Sequence[Check]) -> str:
    """The checks as a text table."""
    lines = [
        f"{'format':<12} {'input':<8} {'precision':<9} {'max |dlogit|':>12} {'top-1 agree':>12} "
        f"{'accuracy':>9} {'front end':>9}  result"
    ]
    for check in checks:
        result = "ok" if check.passed else f"FAILED: {check.failure}"
        if check.arena_bytes is not None:
            result += f" (arena {check.arena_bytes / 1024:.0f} KB)"
        accuracy = "-" if check.test_accuracy is None else f"{check.test_accuracy:.2%}"
        frontend = (
            "-" if check.frontend_max_abs_diff is None else f"{check.frontend_max_abs_diff:.2g}"
        )
        lines.append(
            f"{check.format:<12} {check.input:<8} {check.precision:<9} "
            f"{check.max_abs_diff:>12.3g} {check.top1_agreement:>12.2%} {accuracy:>9} "
            f"{frontend:>9}  {result}"
        )
    return "\n".join(lines)
