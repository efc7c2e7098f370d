"""Shared fixtures: composed configs, a few FSDD clips, small audio files written on the fly, and a
tiny model with separable features for the trainer's tests."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from audioclf.cli import CONFIG_DIR
from audioclf.model import Model
from audioclf.model.heads import LinearHead
from audioclf.settings import TrainingConfig
from audioclf.train import Trainer

REPO = Path(__file__).resolve().parents[1]
FSDD = REPO / "data" / "fsdd" / "recordings"
TEST_DATA = Path(__file__).resolve().parent / "data"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs in two pytest-xdist workers (pyproject's addopts) on two cores: one
    # thread each, as two processes of two threads would fight over them.
    torch.set_num_threads(1)


@pytest.fixture
def compose_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose the real config tree with overrides; cache and outputs go to tmp_path."""

    defaults = {
        "system.cache_dir": str(tmp_path / "cache"),
        "system.output_dir": str(tmp_path / "outputs"),
        "system.num_workers": "0",
        # The main job's data pass only, unless a test asks for training or testing.
        "run.train": "false",
        "run.test": "false",
        "run.export": "false",
    }

    def _compose(*overrides: str) -> DictConfig:
        given = {override.split("=", 1)[0].lstrip("+") for override in overrides}
        chosen = [f"{key}={value}" for key, value in defaults.items() if key not in given]
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=[*chosen, *overrides])

    return _compose


def fsdd_clip(digit: int, speaker: str = "jackson", index: int = 10) -> Path:
    """The path of one bundled FSDD recording."""
    return FSDD / f"{digit}_{speaker}_{index}.wav"


def write_manifest(path: Path, header: list[str], rows: list[tuple]) -> Path:
    """Write a CSV manifest with a header row and return the path."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> Path:
    """Write audio (samples or samples x channels) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, waveform, sample_rate, subtype=subtype)
    return path


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    """root/{train,val,test}/{digit}/*.wav with real FSDD clips of three digits."""
    root = tmp_path / "folder"
    layout = {"train": range(10, 14), "val": range(5, 7), "test": range(0, 2)}
    for split, indices in layout.items():
        for digit in (0, 1, 2):
            for index in indices:
                target = root / split / str(digit) / f"{digit}_{index}.wav"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(fsdd_clip(digit, index=index), target)
    return root


@pytest.fixture
def manifest_rows() -> list[tuple[str, str, int]]:
    """(relative path, label, fold) for 24 FSDD clips: two digits, four folds."""
    rows = []
    for digit in (3, 4):
        for n, index in enumerate(range(10, 22)):
            rows.append((f"{digit}_jackson_{index}.wav", str(digit), n % 4 + 1))
    return rows


def tiny_split_manifest(folder: Path) -> list[str]:
    """Overrides for a manifest of 16 FSDD clips of digits 1 and 2 with a split column
    (8 train, 4 val, 4 test): the smallest real dataset the main job runs on."""
    rows = [
        (f"{d}_jackson_{i}.wav", str(d), split)
        for d in (1, 2)
        for i, split in [(10, "train"), (11, "train"), (12, "train"), (13, "train")]
        + [(5, "val"), (6, "val"), (0, "test"), (1, "test")]
    ]
    return fsdd_manifest(write_manifest(folder / "m.csv", ["path", "label", "split"], rows))


def fsdd_manifest(path: Path) -> list[str]:
    """Overrides that read the manifest at `path`, whose rows name bundled FSDD files."""
    return ["data=manifest", f"data.manifest={path}", f"data.root={FSDD}", "data.sample_rate=8000"]


SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
ESC50_HEADER = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]


def esc50_like(root: Path, folds: int) -> tuple[Path, Path]:
    """ESC-50's layout over 12 FSDD clips (digits 3 and 4 as `dog` and `rooster`):
    `audio/*.wav` and `meta/esc50.csv` with ESC-50's header, as shipped. Returns the root and
    the metadata file."""
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows = []
    for digit, category in [(3, "dog"), (4, "rooster")]:
        for n, index in enumerate(range(10, 16)):
            fold = n % folds + 1
            name = f"{fold}-{index}-A-{digit}.wav"
            shutil.copy(fsdd_clip(digit, index=index), root / "audio" / name)
            rows.append((name, fold, digit, category, "False", index, "A"))
    return root, write_manifest(root / "meta" / "esc50.csv", ESC50_HEADER, rows)


def speech_commands_like(root: Path, words: tuple[str, ...] = ("zero", "one")) -> Path:
    """Speech Commands' layout over 12 FSDD clips a word (`zero/`, `one/`, ... of those
    digits) with `SPEAKER_nohash_N.wav` of six speakers, lucas listed for validation and theo
    for test, and a `_background_noise_` folder."""
    lists: dict[str, list[str]] = {"validation_list.txt": [], "testing_list.txt": []}
    listed = {"lucas": "validation_list.txt", "theo": "testing_list.txt"}
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for word in words:
        digit = digits.index(word)
        (root / word).mkdir(parents=True)
        for speaker in SPEAKERS:
            for n in range(2):
                relative = f"{word}/{speaker}_nohash_{n}.wav"
                shutil.copy(fsdd_clip(digit, speaker, 10 + n), root / relative)
                if speaker in listed:
                    lists[listed[speaker]].append(relative)
    (root / "_background_noise_").mkdir()
    shutil.copy(fsdd_clip(9, "theo", 30), root / "_background_noise_" / "noise.wav")
    for name, entries in lists.items():
        (root / name).write_text("\n".join(entries) + "\n")
    return root


def fsd50k_like(root: Path) -> Path:
    """FSD50K's layout over 16 FSDD clips: `FSD50K.ground_truth/dev.csv` (8 train, 4 val rows)
    and `eval.csv` (4 rows) with comma-separated labels in quoted cells, and the clips in
    `FSD50K.dev_audio/` and `FSD50K.eval_audio/` named by `fname`."""
    truth = root / "FSD50K.ground_truth"
    truth.mkdir(parents=True)
    dev, evaluation = [], []
    for digit, labels in [(1, "One,Speech"), (2, "Speech,Two")]:
        for index, split in [(10, "train"), (11, "train"), (12, "train"), (13, "train")] + [
            (5, "val"),
            (6, "val"),
            (0, "test"),
            (1, "test"),
        ]:
            fname = str(1000 * digit + index)
            audio = "FSD50K.eval_audio" if split == "test" else "FSD50K.dev_audio"
            (root / audio).mkdir(exist_ok=True)
            shutil.copy(fsdd_clip(digit, index=index), root / audio / f"{fname}.wav")
            if split == "test":
                evaluation.append((fname, labels, "/m/x,/m/y"))
            else:
                dev.append((fname, labels, "/m/x,/m/y", split))
    write_manifest(truth / "dev.csv", ["fname", "labels", "mids", "split"], dev)
    write_manifest(truth / "eval.csv", ["fname", "labels", "mids"], evaluation)
    return root


def torchrun(arguments: list[str], cwd: Path, timeout: float = 300) -> str:
    """`torchrun --standalone --nproc_per_node=2 ARGUMENTS` in `cwd`: its output (stdout and
    stderr), after checking that it succeeded. A run that hangs is stopped with SIGTERM,
    which torchrun passes on to its workers; killed outright it would leave them running
    (each in a session of its own), holding the output open."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port: not 29500, which another run may hold
            "--nproc_per_node=2",
            *arguments,
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output = "(its workers did not stop either)"
        pytest.fail(f"torchrun did not finish in {timeout:g} s:\n{output}")
    assert process.returncode == 0, output
    return output


# ---------------------------------------------------------------- a tiny model to train


class TinyNet(Model):
    """Conv-BN-ReLU, mean pool, dropout, linear: a few hundred parameters."""

    def __init__(self, num_classes: int, channels: int = 8) -> None:
        super().__init__(num_classes)
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
        self.classifier = LinearHead(channels, num_classes, dropout=0.2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


def training_options(**changes) -> TrainingConfig:
    base = {
        "epochs": 3,
        "lr": 3e-2,
        "warmup_epochs": 0.0,
        "channels_last": False,
        "early_stopping_patience": None,
    }
    return TrainingConfig(**{**base, **changes})


def separable_features(n: int = 48, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Features whose mean level gives the class away."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    features = torch.randn(n, 1, 16, 8, generator=generator) + labels.view(-1, 1, 1, 1) * 3.0
    return TensorDataset(features, labels)


def separable_loaders(n: int = 48) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(separable_features(n), batch_size=16, shuffle=True)
    val = DataLoader(separable_features(24, seed=1), batch_size=16)
    return train, val


def tiny_trainer(tmp_path, options=None, classes=("a", "b", "c"), **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = TinyNet(len(classes))
    return Trainer(model, options or training_options(), list(classes), tmp_path / "run", **kwargs)
