"""The run's settings: every config section checked at start, as frozen dataclasses.

Each section is a dataclass whose annotations give the types and whose field metadata gives
the ranges and choices (`audioclf.typed_config` fills and checks them). `load_settings` turns
a composed Hydra config into them, and any value that cannot work is a ConfigError naming the
key and what it allows, before anything runs. The library below the CLI takes these
dataclasses or plain values, never a DictConfig.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from audioclf.typed_config import ConfigError, bounded, build_section, join_key

CONFIG_DIR = Path(__file__).resolve().parent / "config"
# A source checkout (`pip install -e .`): src/audioclf/ -> the repository, whose data/ holds
# the bundled FSDD.
PROJECT_DATA_DIR = Path(__file__).resolve().parents[2] / "data"


def bundled_data(relative: str) -> str:
    """`${bundled:fsdd/recordings}` in the config: the repository's `data/<relative>` when this
    package runs from a source checkout that has it, so that `audioclf` run in any directory
    trains on the bundled dataset; else `data/<relative>` below the current directory."""
    path = PROJECT_DATA_DIR / relative
    return str(path) if path.is_dir() else str(Path("data") / relative)


OmegaConf.register_new_resolver("bundled", bundled_data, replace=True)

# Where today's default of each section's keys is written (the primary config and the default
# group options); `fill_missing_keys` reads them. `model` and `teacher_model` are not here:
# their params belong to the architecture, and their other keys have defaults below.
_DEFAULTS = {
    "system": "config.yaml",
    "data": "data/fsdd.yaml",
    "features": "config.yaml",
    "training": "config.yaml",
    "run": "config.yaml",
    "augmentations": "config.yaml",
}


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class SystemConfig:
    """The `system` section."""

    seed: int = bounded(ge=0)
    device: str
    num_workers: int = bounded(ge=0)
    pin_memory: bool | Literal["auto"]
    persistent_workers: bool
    cache: bool
    cache_dir: str
    output_dir: str
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    deterministic: bool


@dataclass(frozen=True)
class ColumnsConfig:
    """`data.columns`: the manifest column (or a `{column}` template) for each of ours."""

    path: str
    label: str
    split: str | None = None
    fold: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class SplitManifests:
    """`data.manifest` as a manifest per split (NeMo's train/validation/test manifests), or
    a list of them (NeMo's `manifest_filepath: [speech.json, noise.json]`)."""

    train: str | list[str] | None = None
    val: str | list[str] | None = None
    test: str | list[str] | None = None

    def given(self) -> dict[str, list[str]]:
        """The splits that have manifests, and their paths."""
        return {
            split: [paths] if isinstance(paths, str) else paths
            for split, paths in dataclasses.asdict(self).items()
            if paths
        }


@dataclass(frozen=True)
class DataConfig:
    """The `data` section."""

    format: Literal["fsdd", "folder", "manifest", "speech_commands", "fsd50k"]
    name: str
    root: str | None
    #: One manifest, or one per split.
    manifest: str | SplitManifests | None
    sample_rate: int = bounded(gt=0)
    clip_seconds: float = bounded(gt=0)
    val_fraction: float = bounded(ge=0, lt=1)
    test_fraction: float = bounded(ge=0, le=1)
    split_seed: int = bounded(ge=0)
    val_fold: int | str | None
    test_fold: int | str | None
    on_bad_file: Literal["error", "skip"]
    multi_label: bool
    columns: ColumnsConfig | None = None
    #: The classes in their output order (None: the training labels, sorted); numbers are
    #: names (`[0, 1, 2]` is FSDD's "0", "1", "2").
    classes: list[str | int] | None = None
    #: data=speech_commands: the keyword task's words (None: every word is a class).
    words: list[str] | None = None
    unknown_fraction: float = bounded(0.1, ge=0)
    silence_fraction: float = bounded(0.1, ge=0)

    @property
    def class_names(self) -> list[str] | None:
        """`classes` as the labels they name."""
        return None if self.classes is None else [str(label) for label in self.classes]

    def column_map(self) -> dict[str, str | None] | None:
        """`columns` as `index_manifest` takes them (None: the manifest's own names)."""
        return None if self.columns is None else dataclasses.asdict(self.columns)


@dataclass(frozen=True)
class FeaturesConfig:
    """The `features` section: a preset and overrides (None keeps the preset's value)."""

    preset: str
    frame_seconds: float | None = bounded(gt=0)
    frame_length: int | None = bounded(gt=0)
    hop_seconds: float | None = bounded(gt=0)
    hop_length: int | None = bounded(gt=0)
    n_fft: int | None = bounded(gt=0)
    n_mels: int | None = bounded(gt=0)
    fmin_hz: float | None = bounded(ge=0)
    fmax_hz: float | None = bounded(gt=0)
    center: bool | None
    pad_mode: Literal["constant", "reflect"] | None
    power: float | None = bounded(gt=0)
    mel_scale: Literal["slaney", "htk", "tf"] | None
    log: Literal["db", "log_offset", "none"] | None
    amin: float | None = bounded(gt=0)
    top_db: float | None = bounded(ge=0)
    log_offset: float | None = bounded(gt=0)
    normalize: bool

    def overrides(self) -> dict[str, Any]:
        """The parameters set here (not None), as `resolve_params` takes them."""
        values = dataclasses.asdict(self)
        values.pop("preset")
        values.pop("normalize")
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class DistillationConfig:
    """`training.distillation`."""

    alpha: float = bounded(0.5, ge=0, le=1)
    temperature: float = bounded(4.0, gt=0)


MONITORS = Literal[
    "auto",
    "val_loss",
    "val_accuracy",
    "val_precision",
    "val_recall",
    "val_f1",
    "val_mAP",
    "val_roc_auc",
    "train_loss",
    "train_accuracy",
]


@dataclass(frozen=True)
class TrainingConfig:
    """The `training` section; the defaults are config.yaml's, for use from Python."""

    batch_size: int = bounded(64, ge=1)
    #: An optimizer step every N batches, on their summed gradients (batch_size x N per step).
    accumulate_grad_batches: int = bounded(1, ge=1)
    epochs: int = bounded(30, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = bounded(1e-3, gt=0)
    weight_decay: float = bounded(1e-2, ge=0)
    momentum: float = bounded(0.9, ge=0, lt=1)
    nesterov: bool = True
    lr_schedule: Literal["constant", "cosine", "step", "plateau", "onecycle"] = "cosine"
    warmup_epochs: float = bounded(1.0, ge=0)
    lr_step_epochs: int = bounded(10, ge=1)
    lr_gamma: float = bounded(0.1, gt=0, le=1)
    plateau_patience: int = bounded(3, ge=0)
    plateau_factor: float = bounded(0.5, gt=0, lt=1)
    amp: bool | Literal["auto"] = "auto"
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    channels_last: bool = True
    compile: bool = False
    grad_clip_norm: float | None = bounded(5.0, gt=0)
    grad_clip_value: float | None = bounded(None, gt=0)
    label_smoothing: float = bounded(0.0, ge=0, lt=1)
    mixup_alpha: float = bounded(0.0, ge=0)
    class_balance: Literal["none", "weights", "sampler"] = "none"
    early_stopping_patience: int | None = bounded(10, ge=0)
    monitor: MONITORS = "auto"
    monitor_mode: Literal["auto", "max", "min"] = "auto"
    min_delta: float = bounded(0.0, ge=0)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)


@dataclass(frozen=True)
class RunConfig:
    """The `run` section: the stages of the main job."""

    train: bool
    test: bool
    quantise: bool
    export: bool
    export_formats: list[Literal["onnx", "torchscript", "tflite", "mediapipe"]]
    export_inputs: list[Literal["log_mel", "waveform"]]
    checkpoint_path: str | None
    resume: bool | str
    folds: Literal["all"] | list[int | str] | None
    tflite_input_layout: Literal["nchw", "nhwc"] = "nchw"

    @property
    def tests_only(self) -> bool:
        """Whether the job uses a checkpoint as it is (neither training nor quantising it):
        its data then needs no training clips."""
        return bool(self.checkpoint_path) and not (self.train or self.quantise)


@dataclass(frozen=True)
class SpecAugmentConfig:
    """`augmentations.spec_augment`."""

    time_masks: int = bounded(ge=0)
    time_mask_max_frames: int = bounded(ge=0)
    freq_masks: int = bounded(ge=0)
    freq_mask_max_bins: int = bounded(ge=0)
    mask_value: float | Literal["mean"]


@dataclass(frozen=True)
class AudioAugmentConfig:
    """`augmentations.audio`: transforms, checked in detail when they are built."""

    transforms: list[dict]


@dataclass(frozen=True)
class AugmentationsConfig:
    """The `augmentations` section."""

    audio: AudioAugmentConfig
    spec_augment: SpecAugmentConfig


@dataclass(frozen=True)
class QuantizationConfig:
    """`model.quantization`: how `run.quantise` makes the int8 model (see `audioclf.quant`)."""

    qat: bool = False
    mode: Literal["ptq", "qat"] = "ptq"
    backend: Literal["xnnpack", "x86"] = "xnnpack"
    per_channel: bool = True
    calibration_clips: int = bounded(512, ge=1)
    epochs: int = bounded(3, ge=1)
    lr: float = bounded(1e-4, gt=0)
    freeze_bn_epoch: int = bounded(1, ge=0)
    # From epoch 0 the ranges would never observe a batch, and could not be converted.
    freeze_observer_epoch: int = bounded(2, ge=1)

    @property
    def effective_mode(self) -> str:
        """`qat: true` is the same as `mode: qat`."""
        return "qat" if self.qat else self.mode


@dataclass(frozen=True)
class ModelConfig:
    """The `model` (or `teacher_model`) section; `params` are checked by `create_model`."""

    name: str
    params: dict
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    checkpoint_path: str | None = None


@dataclass(frozen=True)
class Settings:
    """Every section of a run's config, checked."""

    system: SystemConfig
    data: DataConfig
    features: FeaturesConfig
    model: ModelConfig
    training: TrainingConfig
    run: RunConfig
    augmentations: AugmentationsConfig
    teacher_model: ModelConfig | None = None


# ---------------------------------------------------------------- checking

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def _named_twice(names: list[str]) -> list[str]:
    """The names a list holds more than once, sorted."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


def _check_classes(data: DataConfig) -> None:
    """`data.classes`: two or more, each once, none empty."""
    names = data.class_names
    if names is None:
        return
    if len(names) < 2:
        raise ConfigError(f"data.classes has {len(names)}; a classifier needs at least 2")
    twice = _named_twice(names)
    if twice:
        raise ConfigError(f"data.classes names {twice} twice; give each class once")
    if any(not label.strip() for label in names):
        raise ConfigError(f"data.classes has an empty name: {names}")


def _check_words(data: DataConfig) -> None:
    """`data.words`: Speech Commands words, each once, none of the task's own classes."""
    if data.words is None:
        return
    if data.format != "speech_commands":
        raise ConfigError(f"data.words picks Speech Commands words; data={data.name} has none")
    if not data.words:
        raise ConfigError("data.words is empty; give the keywords, each once")
    twice = _named_twice(data.words)
    if twice:
        raise ConfigError(f"data.words names {twice} twice; give the keywords, each once")
    reserved = [word for word in data.words if word.startswith("_")]
    if reserved:
        raise ConfigError(f"data.words names {reserved}: folders starting with _ hold no words")


def _check_split_manifests(settings: Settings) -> None:
    """`data.manifest` as a manifest per split: one at least, with training's when training;
    the splits it gives leave no folds to pick."""
    manifests = settings.data.manifest
    if not isinstance(manifests, SplitManifests):
        return
    given = manifests.given()
    if not given:
        raise ConfigError("data.manifest gives no file: {train: ..., val: ..., test: ...}")
    if "train" not in given and settings.run.train:
        raise ConfigError(
            f"data.manifest has no train manifest (only {', '.join(given)}); training needs one, "
            "or run.train=false to test a checkpoint"
        )
    folds = [
        key
        for key, value in (
            ("data.test_fold", settings.data.test_fold),
            ("data.val_fold", settings.data.val_fold),
            ("run.folds", settings.run.folds),
        )
        if value is not None
    ]
    if folds:
        raise ConfigError(
            f"{' and '.join(folds)} pick splits from one manifest's folds; data.manifest gives "
            "a manifest per split"
        )


def load_settings(config: DictConfig) -> Settings:
    """Check every section of a composed config; the first bad value is a ConfigError."""
    try:
        values = OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key} must be set (it is ??? in the config)") from error
    values.pop("hydra", None)
    settings = build_section(Settings, values, "")
    if not _DEVICE.match(settings.system.device):
        raise ConfigError(
            f"system.device must be auto, cpu, cuda, cuda:N or mps, not {settings.system.device!r}"
        )
    data = settings.data
    fractions = data.val_fraction + data.test_fraction
    # Testing a checkpoint may take every clip (data.test_fraction=1); training needs some.
    tests_only = settings.run.tests_only
    if fractions > 1 if tests_only else fractions >= 1:
        bound = "<= 1" if tests_only else "< 1 (training needs clips)"
        raise ConfigError(
            f"data.val_fraction + data.test_fraction must be {bound}, not "
            f"{data.val_fraction} + {data.test_fraction}"
        )
    if data.format == "fsd50k" and not data.multi_label:
        raise ConfigError("data=fsd50k is multi-label: data.multi_label must be true")
    if data.columns is not None and data.format != "manifest":
        raise ConfigError(f"data.columns maps manifest columns; data={data.name} has no manifest")
    _check_classes(data)
    _check_words(data)
    _check_split_manifests(settings)
    if settings.run.export and "onnx" in settings.run.export_formats:
        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not _installed(name)]
        if missing:
            raise ConfigError(
                f"run.export_formats has onnx, which needs {', '.join(missing)}: "
                'pip install -e ".[export]", or run.export=false'
            )
    if settings.run.export and not settings.run.export_inputs:
        raise ConfigError("run.export_inputs is empty: give log_mel, waveform or both")
    for fmt, modules in (
        ("tflite", ("litert_torch", "ai_edge_litert", "tflite_micro")),
        ("mediapipe", ("litert_torch", "ai_edge_litert", "mediapipe")),
    ):
        if not settings.run.export or fmt not in settings.run.export_formats:
            continue
        missing = [name for name in modules if not _installed(name)]
        if missing:
            raise ConfigError(
                f"run.export_formats has {fmt}, which needs {', '.join(missing)}: "
                f'pip install -e ".[tflite]", or drop {fmt} from run.export_formats'
            )
        quantization = settings.model.quantization
        if settings.run.quantise and quantization.backend == "x86":
            raise ConfigError(
                f"run.export_formats has {fmt} with model.quantization.backend=x86: "
                "x86-quantized graphs convert but crash the TFLite interpreter; use "
                "backend=xnnpack for TFLite"
            )
    quantization = settings.model.quantization
    if settings.run.quantise and not quantization.per_channel and quantization.backend != "xnnpack":
        raise ConfigError("model.quantization.per_channel=false needs backend=xnnpack")
    if settings.run.folds is not None:
        if data.format != "manifest":
            raise ConfigError("run.folds needs data=manifest with a fold column")
        if not settings.run.test:
            raise ConfigError("run.folds needs run.test=true: each fold reports its test metrics")
        if data.val_fold is not None:
            raise ConfigError(
                "run.folds: set data.val_fold=null; each fold's validation set is carved from "
                "its training folds (data.val_fraction)"
            )
    if settings.training.monitor in ("val_mAP", "val_roc_auc") and not data.multi_label:
        raise ConfigError(
            f"training.monitor={settings.training.monitor} is measured on multi-label data only "
            "(data.multi_label=true); use val_accuracy, val_f1 or val_loss"
        )
    if settings.teacher_model is not None and not settings.teacher_model.checkpoint_path:
        raise ConfigError("teacher_model.checkpoint_path must be set to the teacher's weights")
    return settings


def fill_missing_keys(config: DictConfig) -> list[str]:
    """Give a run config written by an earlier audioclf (a checkpoint's) every key that today's
    defaults have and it lacks, with today's default value; the dotted keys it added.

    Keys are added over time (`run.export_inputs`, `data.columns`); a checkpoint from before
    one of them must still test, predict and export. Values the config has are kept.
    """
    added: list[str] = []
    files = {source: OmegaConf.load(CONFIG_DIR / source) for source in set(_DEFAULTS.values())}
    for section, source in _DEFAULTS.items():
        defaults = files[source][section] if source == "config.yaml" else files[source]
        stored = OmegaConf.select(config, section)
        if isinstance(stored, DictConfig):
            _fill(stored, defaults, section, added)
    return sorted(added)


def _fill(stored: DictConfig, defaults: DictConfig, key: str, added: list[str]) -> None:
    for name in defaults:
        if OmegaConf.is_interpolation(defaults, name):
            continue  # a value of the composing run (`${hydra:...}`, `${data.root}`)
        default = defaults[name]
        if name not in stored:
            stored[name] = default
            added.append(join_key(key, name))
        elif isinstance(default, DictConfig) and isinstance(stored[name], DictConfig):
            _fill(stored[name], default, join_key(key, name), added)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
