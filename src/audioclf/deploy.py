"""The main job's deployment stages: `run.quantise` (int8 through PTQ or QAT) and
`run.export` (each format checked against PyTorch). Library functions: `cli.py` calls them
with what it built.

Quantisation writes `<run>/checkpoints/int8.pth`: the float checkpoint's fields (classes,
features, normalisation, config) plus `quantized` (how it was prepared and the prepared
graph's state), which test, predict and export read back with `audioclf.quant.load_quantized`.
QAT fine-tunes with the Trainer in `<run>/qat/` (its own checkpoints and TensorBoard).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from audioclf.checkpoint import save_checkpoint
from audioclf.dataset import SpectrogramDataset
from audioclf.export import export_model
from audioclf.model import CheckpointError, Model
from audioclf.pipeline import loss_class_weights
from audioclf.quant import QuantizationError, QuantizedModel, calibrate, load_quantized, prepare
from audioclf.runtime import is_main_process
from audioclf.settings import ConfigError, Settings
from audioclf.train import Trainer

log = logging.getLogger(__name__)


def quantise_run(
    settings: Settings,
    model: Model,
    datasets: dict[str, SpectrogramDataset],
    loaders: dict[str, DataLoader],
    output_dir: Path,
    checkpoint_extra: dict[str, Any],
    qat_resume: Path | None = None,
    teacher: torch.nn.Module | None = None,
) -> QuantizedModel | None:
    """`run.quantise`: the int8 model of `model` (trained, loaded or, for QAT, fresh) by
    `model.quantization`, saved to `<run>/checkpoints/int8.pth`. QAT continues from
    `qat_resume` (an interrupted fine-tuning's `qat/checkpoints/last.pth`) when given, and
    distils from `teacher` (or from the teacher logits the training loader carries).
    Under torchrun every rank calls it for QAT, which fine-tunes in DDP; rank 0 alone then
    converts, saves and returns the int8 model (the other ranks get None)."""
    options = settings.model.quantization
    mode = options.effective_mode
    train = datasets["train"]
    example = torch.zeros(2, *train.feature_shape)
    if mode == "ptq":
        prepared = prepare(model.cpu().eval(), example, options.backend, "ptq", options.per_channel)
        clips = calibrate(prepared, calibration_batches(train, options.calibration_clips))
        log.info("PTQ (%s): calibrated on %d training clips", options.backend, clips)
    else:
        prepared = prepare(model.cpu(), example, options.backend, "qat", options.per_channel)
        qat_options = dataclasses.replace(
            settings.training,
            epochs=options.epochs,
            lr=options.lr,
            warmup_epochs=0.0,
            amp=False,  # fake quantization runs in float32
            compile=False,
            channels_last=False,
        )
        trainer = Trainer(
            prepared,
            qat_options,
            train.classes,
            output_dir / "qat",
            multi_label=settings.data.multi_label,
            class_weights=loss_class_weights(settings, train),
            checkpoint_extra={**checkpoint_extra, "quantized_prepared": True},
            seed=settings.system.seed,
            teacher=teacher,
            on_epoch_start=lambda epoch: prepared.start_epoch(
                epoch, options.freeze_bn_epoch, options.freeze_observer_epoch
            ),
        )
        log.info(
            "QAT (%s): %d epochs at lr %g, BatchNorm frozen from epoch %d, ranges from %d",
            options.backend,
            options.epochs,
            options.lr,
            options.freeze_bn_epoch + 1,
            options.freeze_observer_epoch + 1,
        )
        trainer.fit(loaders["train"], loaders["val"], qat_resume)
    if not is_main_process():
        return None
    quantized = prepared.convert()
    path = output_dir / "checkpoints" / "int8.pth"
    save_checkpoint(
        path,
        {
            **checkpoint_extra,
            "classes": train.classes,
            "quantized": quantized.checkpoint_state(),
        },
    )
    log.info("saved the int8 model (%s, %s) to %s", mode, options.backend, path)
    return quantized


def calibration_batches(
    train: SpectrogramDataset, clips: int, batch_size: int = 64
) -> list[torch.Tensor]:
    """Up to `clips` training clips, without augmentation, normalised as the model sees them,
    in batches; a fixed spread over the split."""
    plain = dataclasses.replace(train, training=False, audio_augment=None, spec_augment=None)
    count = min(clips, len(plain))
    indices = np.linspace(0, len(plain) - 1, count).round().astype(int).tolist()
    batches = []
    for start in range(0, count, batch_size):
        items = plain.__getitems__(indices[start : start + batch_size])
        batches.append(torch.stack([features for features, _ in items]))
    return batches


def export_run(
    settings: Settings,
    model: Model | None,
    datasets: dict[str, SpectrogramDataset],
    output_dir: Path,
    quantized: QuantizedModel | None = None,
) -> list[dict[str, Any]]:
    """`run.export`: the float model and the int8 one (either may be None) in each of
    `run.export_formats`, checked on the test clips (validation clips when there is no test
    split), into `<run>/export/`."""
    source = datasets["test"] if datasets["test"].clips else datasets["val"]
    if not source.clips:
        raise ConfigError("run.export needs test or validation clips to check the exports on")
    # Exports are checked on features before normalising (the float graph normalises inside).
    raw = dataclasses.replace(source, normalization=None)
    items = raw.__getitems__(range(len(raw)))
    features = np.stack([item[0].numpy() for item in items])
    labels = None if settings.data.multi_label else np.array([int(item[1]) for item in items])
    waveforms = None
    if "waveform" in settings.run.export_inputs or "mediapipe" in settings.run.export_formats:
        waveforms = np.stack([source.waveform(index) for index in range(len(source))])
    train = datasets["train"]
    checks = export_model(
        model,
        settings.run.export_formats,
        output_dir / "export",
        classes=train.classes,
        feature_params=train.feature_params,
        clip_seconds=train.clip_seconds,
        normalization=train.normalization,
        check_features=features,
        model_name=settings.model.name,
        multi_label=settings.data.multi_label,
        quantized=quantized,
        check_labels=labels,
        tflite_layout=settings.run.tflite_input_layout,
        inputs=settings.run.export_inputs,
        check_waveforms=waveforms,
    )
    return [dataclasses.asdict(check) for check in checks]


def int8_model(settings: Settings, model: Model, checkpoint: dict[str, Any]) -> QuantizedModel:
    """The int8 model an `int8.pth` holds, on `model` (its float architecture): test, predict
    and export take it; training and quantising it again do not."""
    path = settings.run.checkpoint_path
    if settings.run.train or settings.run.quantise:
        raise ConfigError(
            f"run.checkpoint_path {path} is an int8 checkpoint: it can be tested and exported "
            "(run.train=false run.quantise=false); quantise again from its float checkpoint"
        )
    try:
        return load_quantized(model, checkpoint["quantized"], path)
    except QuantizationError as error:
        raise CheckpointError(str(error)) from error
