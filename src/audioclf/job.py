"""The main job, wired from the library: data, model, training, test, quantisation, export,
and cross-validation over folds. `audioclf.cli` (Hydra) calls it with the composed config;
`run(config)` runs it from Python with a config composed another way (as the command line
would: `audioclf.overrides.compose_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict

from audioclf.audio import BadAudioError
from audioclf.checkpoint import (
    load_checkpoint,
    pack_digests,
    resume_paths,
    stored_config,
    stored_normalization,
    stored_seen_clips,
)
from audioclf.deploy import export_run, int8_model, quantise_run
from audioclf.distill import WithTeacherLogits, build_teacher
from audioclf.export import ExportError
from audioclf.index import DatasetError, check_unseen, content_digests
from audioclf.manifest import manifest_folds
from audioclf.model import (
    CheckpointError,
    ModelError,
    load_state,
)
from audioclf.model.pretrained import load_file
from audioclf.pipeline import (
    build_datasets,
    build_loaders,
    build_model,
    loss_class_weights,
    normalization_for,
    pretrained_checkpoint,
    pretrained_feature_differences,
)
from audioclf.quant import QuantizationError, QuantizedModel
from audioclf.runtime import (
    is_main_process,
    rank_zero_first,
    resolve_device,
    set_log_level,
    shared_output_dir,
    wait_for_rank_zero,
)
from audioclf.settings import ConfigError, load_settings
from audioclf.summary import data_source, format_summary, prepare_splits
from audioclf.train import Trainer, TrainingDiverged

log = logging.getLogger("audioclf")

#: Errors that are the user's input, reported in one line (traceback at DEBUG) with exit 2.
USER_ERRORS = (
    TrainingDiverged,
    ConfigError,
    DatasetError,
    BadAudioError,
    CheckpointError,
    ModelError,
    ExportError,
    QuantizationError,
)


def make_output_dir(path: str) -> Path:
    """Create the run's output folder, or stop at start naming `system.output_dir`."""
    output_dir = Path(path)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # A name of this process's own: torchrun's ranks check rank 0's folder at once.
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"system.output_dir: cannot write to {output_dir} ({error.strerror or error})"
        ) from error
    return output_dir


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch in this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def from_checkpoint(config: DictConfig, path: str) -> tuple[DictConfig, dict[str, Any]]:
    """The run's config with the checkpoint's model, features, sample rate, clip length,
    multi-label setting, class order (`data.classes`) and keyword task (from the config stored
    in it), and the checkpoint.
    How to quantise (`model.quantization`) stays the run's: quantising a float checkpoint is
    this run's job. The checkpoints this run writes store the config as adopted, so they need
    no flags either."""
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(f"run.checkpoint_path: {error}") from error
    trained, _ = stored_config(checkpoint, path)
    adopted = copy.deepcopy(config)
    with open_dict(adopted):
        adopted.model = trained.model
        adopted.model.quantization = config.model.quantization
        adopted.features = trained.features
        adopted.data.sample_rate = trained.data.sample_rate
        adopted.data.clip_seconds = trained.data.clip_seconds
        adopted.data.multi_label = trained.data.multi_label
        if trained.data.get("classes") is not None:
            adopted.data.classes = trained.data.classes  # the model's output order
        if "words" in adopted.data and trained.data.get("words") is not None:
            # The keyword task's classes: which words, and how much _unknown_ and _silence_.
            for key in KEYWORD_KEYS:
                adopted.data[key] = trained.data[key]
    return adopted, checkpoint


#: The data keys of Speech Commands' keyword task, which a checkpoint brings with its classes.
KEYWORD_KEYS = ("words", "unknown_fraction", "silence_fraction")


#: The data keys that decide which clips a ratio or fold split puts in each split.
SPLIT_KEYS = ("val_fraction", "test_fraction", "split_seed", "val_fold", "test_fold")


def _split_hint(trained: dict[str, Any], config: DictConfig) -> str:
    """How the checkpoint's run split the data where this run splits it otherwise: the
    values that test on the checkpoint's own test split."""
    trained_data = trained.get("data", {})
    differing = [
        key
        for key in SPLIT_KEYS
        if key in trained_data and trained_data[key] != OmegaConf.select(config.data, key)
    ]
    if not differing:
        return ""
    theirs = " ".join(f"data.{key}={trained_data[key]}" for key in differing)
    ours = ", ".join(f"{OmegaConf.select(config.data, key)}" for key in differing)
    return (
        f"; its run split the data with {theirs} (this run: {ours}): "
        "set those to test on its own test split"
    )


def run(config: DictConfig) -> dict[str, Any]:
    """The main job: check the config, prepare the data, build the model, train, test.

    `system.deterministic` turns PyTorch's deterministic algorithms on for the job (and back
    off after it). See `_run` for the rest.
    """
    folds = OmegaConf.select(config, "run.folds")
    if folds is not None:
        # One run on the configured split would look like the cross-validation's result.
        raise ConfigError(
            f"run.folds={folds} asks for cross-validation, "
            "which audioclf.job.run_folds(config) runs; run(config) trains and tests once"
        )
    deterministic = bool(OmegaConf.select(config, "system.deterministic", default=False))
    if not deterministic or torch.are_deterministic_algorithms_enabled():
        # Set only when it changes: setting it imports TorchInductor (1.3 s of a job's start).
        return _run(config)
    torch.use_deterministic_algorithms(True)
    try:
        return _run(config)
    finally:
        torch.use_deterministic_algorithms(False)


def _run(config: DictConfig) -> dict[str, Any]:
    """The main job: check the config, prepare the data, build the model, train, test.

    With `run.checkpoint_path`, the model, features and normalisation come from that
    checkpoint (trained further when `run.train`). Returns the data summary with the
    training result and test metrics added.
    """
    checkpoint = None
    checkpoint_path = OmegaConf.select(config, "run.checkpoint_path")
    if checkpoint_path:
        # Adopted before the check: the config is checked as it will run.
        config, checkpoint = from_checkpoint(config, str(checkpoint_path))
    settings = load_settings(config)
    # Under torchrun, rank 0 logs; the other ranks say only what goes wrong.
    set_log_level(settings.system.log_level)
    seed_everything(settings.system.seed)
    output_dir = make_output_dir(shared_output_dir(settings.system.output_dir))
    device = resolve_device(settings.system.device)  # a device this machine lacks fails now
    resume, qat_resume = None, None
    if settings.run.train or settings.run.quantise:
        resume, qat_resume = resume_paths(settings.run.resume, output_dir)
    qat = settings.run.quantise and settings.model.quantization.effective_mode == "qat"
    distils = settings.teacher_model is not None and (settings.run.train or qat)
    if distils and not Path(settings.teacher_model.checkpoint_path).is_file():
        # Read after the data pass (it needs the classes): a missing file fails now.
        raise ConfigError(
            "teacher_model.checkpoint_path: no such checkpoint file "
            f"{settings.teacher_model.checkpoint_path!r}"
        )
    # Under torchrun, rank 0 fills the cache first; the others then find it filled.
    with rank_zero_first():
        # Testing a checkpoint: its classes, and no training clips needed.
        index, datasets, bad_files = build_datasets(
            settings, checkpoint["classes"] if settings.run.tests_only else None
        )
        if checkpoint is not None and checkpoint["classes"] != index.classes:
            hint = (
                f"; to fine-tune it on these classes (a new head), give it as "
                f"model.params.pretrained_path={settings.run.checkpoint_path} instead"
                if settings.run.train
                else ""
            )
            raise DatasetError(
                f"{settings.run.checkpoint_path} was trained for classes "
                f"{checkpoint['classes']}; this dataset has {index.classes}{hint}"
            )
        # Built before the slow data pass, so a bad model parameter or checkpoint fails early.
        n_mels = datasets["train"].feature_shape[-1]
        model = build_model(settings.model, len(index.classes), n_mels)
        pretrained = pretrained_checkpoint(settings.model)
        differences = pretrained_feature_differences(pretrained, datasets["train"].feature_params)
        if differences:
            log.warning(
                "model.params.pretrained_path %s was trained on other features than this "
                "run's (%s): its weights will see other inputs",
                settings.model.params["pretrained_path"],
                "; ".join(differences),
            )
        # Clips that trained or validated the model, or the weights it starts from (a
        # fine-tune from one of our checkpoints has learnt that one's too): stored with it,
        # never tested on.
        learnt = []
        if checkpoint is not None:
            hint = _split_hint(checkpoint["config"], config)
            learnt.append((str(settings.run.checkpoint_path), checkpoint, hint))
        if pretrained is not None:
            path = settings.model.params["pretrained_path"]
            learnt.append((f"model.params.pretrained_path {path}", pretrained, ""))
        seen: set[str] = set()
        for source, content, hint in learnt:
            clips = stored_seen_clips(content)
            if settings.run.test and clips:
                check_unseen(datasets["test"].clips, clips, source, hint)
            seen |= clips
        resumed = None if resume is None else load_file(resume, mmap=True)
        if resumed is not None:
            seen |= stored_seen_clips(resumed)
        seen |= content_digests(datasets["train"].clips + datasets["val"].clips)
        if checkpoint is not None and "quantized" in checkpoint:
            model = int8_model(settings, model, checkpoint)
        elif checkpoint is not None:
            load_state(model, checkpoint["model"], settings.run.checkpoint_path, strict=True)
        summary = prepare_splits(
            datasets,
            bad_files,
            settings.data.on_bad_file,
            settings.system.num_workers,
            data_source(settings.data),
            preset=settings.features.preset,
            files_checked=True,  # build_datasets ran check_clips on every file
            checkpoint=None if checkpoint is None else str(settings.run.checkpoint_path),
        )
        if checkpoint is not None:
            normalization = stored_normalization(checkpoint, settings.run.checkpoint_path)
        elif resumed is not None:
            # The statistics the run trained with, whatever data.root holds now.
            normalization = stored_normalization(resumed, resume)
        else:
            normalization = normalization_for(settings, datasets, model)
    for dataset in datasets.values():
        dataset.normalization = normalization
    summary["normalization"] = normalization is not None
    summary["model"] = {
        "name": settings.model.name,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if is_main_process():
        for warning in (summary["audio"] or {}).get("warnings", []):
            log.warning("%s", warning)
        (output_dir / "dataset_summary.json").write_text(json.dumps(summary, indent=1))
        log.info(
            "dataset summary (%s):\n%s",
            output_dir / "dataset_summary.json",
            format_summary(summary),
        )
    teacher = None
    if distils:
        # QAT fine-tuning distils too: a distilled QAT student.
        teacher, logits, how = build_teacher(settings, datasets["train"], normalization, device)
        summary["distillation"] = {"teacher": settings.teacher_model.name, "how": how}
        log.info("distilling from %s (%s)", settings.teacher_model.name, how)
        if logits is not None:
            datasets["train"] = WithTeacherLogits(datasets["train"], logits)
    world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    loaders = build_loaders(settings, datasets, device, *world)
    trainer = Trainer(
        model,
        settings.training,
        index.classes,
        output_dir,
        device=device,
        multi_label=settings.data.multi_label,
        class_weights=loss_class_weights(settings, datasets["train"]),
        checkpoint_extra={
            "config": OmegaConf.to_container(config, resolve=True),
            "features": datasets["train"].feature_params.as_dict(),
            "normalization": None if normalization is None else normalization.as_lists(),
            "seen_clips": pack_digests(seen),
        },
        seed=settings.system.seed,
        teacher=teacher,
    )
    weights = (
        "the checkpoint's"
        if checkpoint is not None
        else "pretrained"
        if settings.model.params.get("pretrained_path")
        else "random initial"
    )
    if settings.run.train and settings.training.epochs > 0:
        summary["training"] = trainer.fit(loaders["train"], loaders["val"], resume)
    elif settings.run.train:
        log.warning(
            "training.epochs=0: nothing is trained; what follows uses the model as built "
            "(%s weights)",
            weights,
        )
    elif checkpoint is None and (settings.run.test or settings.run.export):
        # Most often a forgotten run.checkpoint_path: the metrics would be a random model's.
        log.warning(
            "run.train=false with no run.checkpoint_path: what follows uses the model as built "
            "(%s weights); run.checkpoint_path=<run>/checkpoints/best.pth uses a trained one",
            weights,
        )
    if settings.run.test:
        if not datasets["test"].clips:
            log.warning("run.test: the test split is empty; nothing to test")
        else:
            accuracy, precision, recall, f1 = trainer.test(loaders["test"])
            summary["test"] = trainer.test_metrics
            ranking = "".join(
                f", {name} {summary['test'][key]:.4f}"
                for key, name in (("mAP", "mAP"), ("roc_auc", "ROC-AUC"))
                if key in summary["test"]
            )
            log.info(
                "test: accuracy %.4f, macro precision %.4f, recall %.4f, F1 %.4f%s",
                accuracy,
                precision,
                recall,
                f1,
                ranking,
            )
    quantized = model if isinstance(model, QuantizedModel) else None
    # Under torchrun, QAT fine-tunes on every rank (DDP, as training did) and PTQ calibrates
    # in rank 0 alone; rank 0 saves, tests and exports the int8 model.
    if settings.run.quantise and (qat or is_main_process()):
        quantized = quantise_run(
            settings,
            trainer.model,
            datasets,
            loaders,
            output_dir,
            trainer.checkpoint_extra,
            qat_resume=qat_resume,
            teacher=trainer.teacher,
        )
        if settings.run.test and datasets["test"].clips and is_main_process():
            int8_trainer = Trainer(
                quantized,
                # The int8 graph as it runs once exported: no bf16 handling of its convolutions.
                dataclasses.replace(settings.training, amp=False),
                index.classes,
                output_dir,
                multi_label=settings.data.multi_label,
            )
            int8_trainer.test(loaders["test"], name="test_int8")
            summary["test_int8"] = int8_trainer.test_metrics
            log.info(
                "test (int8): accuracy %.4f, float %s",
                summary["test_int8"]["accuracy"],
                "-" if "test" not in summary else f"{summary['test']['accuracy']:.4f}",
            )
    if settings.run.export and is_main_process():
        float_model = None if isinstance(trainer.model, QuantizedModel) else trainer.model
        summary["export"] = export_run(settings, float_model, datasets, output_dir, quantized)
    wait_for_rank_zero()  # under torchrun: the next fold, or the exit, starts together
    return summary


CV_METRICS = ("accuracy", "precision", "recall", "f1", "mAP", "roc_auc")


def run_folds(config: DictConfig) -> dict[str, Any]:
    """`run.folds`: the main job once per test fold (each in `fold_<k>/` of the output
    folder); per-fold and mean +- std test metrics in `cv_metrics.json`."""
    settings = load_settings(config)
    data = settings.data
    available = manifest_folds(Path(data.manifest), data.column_map())
    folds = available if settings.run.folds == "all" else [str(f) for f in settings.run.folds]
    # Checked before the first fold trains, not when a later fold comes to it.
    unknown = [fold for fold in folds if fold not in available]
    if unknown:
        raise ConfigError(
            f"run.folds: no row of {data.manifest} has fold(s) {unknown}; its folds are {available}"
        )
    # Under torchrun every rank works in rank 0's folder; only rank 0 logs and writes.
    set_log_level(settings.system.log_level)
    output_dir = make_output_dir(shared_output_dir(settings.system.output_dir))
    per_fold = []
    for fold in folds:
        log.info("cross-validation: test fold %s of %s", fold, list(folds))
        fold_config = copy.deepcopy(config)
        OmegaConf.update(fold_config, "run.folds", None)
        OmegaConf.update(fold_config, "data.test_fold", fold)
        OmegaConf.update(fold_config, "system.output_dir", str(output_dir / f"fold_{fold}"))
        summary = run(fold_config)
        if "test" not in summary:  # every clip of the fold was a bad file, skipped
            raise DatasetError(f"run.folds: fold {fold} has no test clip left to report on")
        test = summary["test"]
        per_fold.append(
            {
                "fold": fold,
                "best": summary.get("training", {}).get("best"),
                **{name: test[name] for name in CV_METRICS if name in test},
            }
        )
    names = [name for name in CV_METRICS if name in per_fold[0]]
    result = {
        "folds": per_fold,
        "mean": {name: float(np.mean([f[name] for f in per_fold])) for name in names},
        "std": {name: float(np.std([f[name] for f in per_fold])) for name in names},
    }
    bests = [f["best"] for f in per_fold if f["best"] is not None]
    result["best"] = float(np.mean(bests)) if bests else None
    if not is_main_process():
        return result
    (output_dir / "cv_metrics.json").write_text(json.dumps(result, indent=1))
    log.info(
        "cross-validation over %d folds (%s): %s",
        len(per_fold),
        output_dir / "cv_metrics.json",
        ", ".join(f"{n} {result['mean'][n]:.4f} +- {result['std'][n]:.4f}" for n in names),
    )
    return result
