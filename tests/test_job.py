"""The main job's training paths: train and test, test from a checkpoint, normalisation,
pretrained weights, sweeps, and Ctrl-C or a kill mid-run."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from audioclf.audio import fix_length, load_audio
from audioclf.checkpoint import load_checkpoint, stored_seen_clips
from audioclf.cli import run
from audioclf.features import LogMelParams, log_mel
from audioclf.index import DatasetError
from audioclf.model import CheckpointError
from audioclf.normalization import FeatureNormalization
from audioclf.settings import ConfigError
from conftest import (
    FSDD,
    REPO,
    fsdd_clip,
    fsdd_manifest,
    tiny_split_manifest,
    write_manifest,
)


def test_main_job_trains_tests_and_reports(compose_config, tmp_path):
    summary = run(
        compose_config(
            *tiny_split_manifest(tmp_path), "run.train=true", "run.test=true", "training.epochs=2"
        )
    )
    assert len(summary["training"]["history"]) == 2
    assert summary["normalization"] is True
    assert set(summary["test"]) >= {"accuracy", "precision", "recall", "f1", "confusion_matrix"}
    assert (tmp_path / "outputs" / "checkpoints" / "best.pth").exists()
    assert (tmp_path / "outputs" / "metrics.json").exists()


def test_data_classes_order_the_outputs_and_come_with_the_checkpoint(compose_config, tmp_path):
    data = tiny_split_manifest(tmp_path)
    summary = run(
        compose_config(*data, "run.train=true", "training.epochs=1", "data.classes=[2,1]")
    )
    assert summary["classes"] == ["2", "1"]
    best = tmp_path / "outputs" / "checkpoints" / "best.pth"
    assert load_checkpoint(best)["classes"] == ["2", "1"]
    # Trained further from it with no data.classes given: its order, not the sorted one.
    further = run(
        compose_config(
            *data,
            "run.train=true",
            "training.epochs=1",
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'further'}",
        )
    )
    assert further["classes"] == ["2", "1"]


def test_zero_epochs_says_the_model_is_used_untrained(compose_config, tmp_path, caplog):
    config = compose_config(*tiny_split_manifest(tmp_path), "run.train=true", "training.epochs=0")
    with caplog.at_level("WARNING", logger="audioclf"):
        summary = run(config)
    assert "training" not in summary
    assert "training.epochs=0: nothing is trained" in caplog.text
    assert "(random initial weights)" in caplog.text


def test_testing_without_training_or_a_checkpoint_says_the_model_is_untrained(
    compose_config, tmp_path, caplog
):
    # A forgotten run.checkpoint_path: the test metrics are a randomly initialised model's.
    config = compose_config(*tiny_split_manifest(tmp_path), "run.test=true")
    with caplog.at_level("WARNING", logger="audioclf"):
        run(config)
    assert "run.train=false with no run.checkpoint_path" in caplog.text
    assert "(random initial weights)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="audioclf"):
        run(compose_config(*tiny_split_manifest(tmp_path)))  # the data pass alone
    assert "no run.checkpoint_path" not in caplog.text


def test_a_checkpoint_path_that_is_no_checkpoint_is_named_with_its_key(compose_config, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    for path, reason in ((tmp_path / "nope.pth", "no such checkpoint file"), (text, "not a")):
        config = compose_config(*tiny_split_manifest(tmp_path), f"run.checkpoint_path={path}")
        named = rf"^run\.checkpoint_path: {re.escape(str(path))}: {reason}"
        with pytest.raises(CheckpointError, match=named):
            run(config)


def test_normalisation_statistics_come_from_the_training_split_alone(compose_config, tmp_path):
    run(
        compose_config(
            *tiny_split_manifest(tmp_path), "run.train=true", "run.test=false", "training.epochs=1"
        )
    )
    content = load_checkpoint(tmp_path / "outputs" / "checkpoints" / "last.pth")
    stored = FeatureNormalization.from_lists(content["normalization"])
    # Recomputed here from the files: the 8 training clips, centred and padded to the clip.
    params = LogMelParams(**content["features"])
    data = content["config"]["data"]
    clip_samples = round(data["clip_seconds"] * data["sample_rate"])
    with open(data["manifest"], newline="") as file:
        rows = list(csv.DictReader(file))

    def split_features(*splits):
        for row in rows:
            if row["split"] in splits:
                waveform = load_audio(FSDD / row["path"], data["sample_rate"])
                yield log_mel(fix_length(waveform, clip_samples), params)

    expected = FeatureNormalization.fit(split_features("train"))
    np.testing.assert_allclose(stored.mean, expected.mean, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stored.std, expected.std, rtol=1e-5, atol=1e-4)
    with_test_clips = FeatureNormalization.fit(split_features("train", "test"))
    assert not np.allclose(stored.mean, with_test_clips.mean, atol=1e-2)


@pytest.mark.parametrize(
    "override", ["features.normalize=false", "model=panns_mobilenetv1"], ids=["off", "panns"]
)
def test_no_normalisation_when_off_or_the_model_has_its_own(compose_config, tmp_path, override):
    summary = run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.train=true",
            "run.test=false",
            "training.epochs=1",
            override,
        )
    )
    assert summary["normalization"] is False
    content = load_checkpoint(tmp_path / "outputs" / "checkpoints" / "last.pth")
    assert content["normalization"] is None


def test_testing_from_a_checkpoint_needs_no_other_flags(compose_config, tmp_path):
    trained = run(
        compose_config(
            *tiny_split_manifest(tmp_path), "run.train=true", "run.test=true", "training.epochs=1"
        )
    )
    best = tmp_path / "best.pth"
    shutil.copy(tmp_path / "outputs" / "checkpoints" / "best.pth", best)
    # Another model, other features and sample rate in this config: the checkpoint's win.
    tested = run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.test=true",
            f"run.checkpoint_path={best}",
            "model=panns_mobilenetv1",
            "features.n_mels=40",
            "data.sample_rate=16000",
            f"system.output_dir={tmp_path / 'again'}",
        )
    )
    assert tested["features"]["shape"] == trained["features"]["shape"]
    assert tested["test"]["accuracy"] == trained["test"]["accuracy"]
    assert tested["test"]["confusion_matrix"] == trained["test"]["confusion_matrix"]


def _trained_on_digits(compose_config, tmp_path) -> tuple[list[str], list[str], Path]:
    """A folder of 8 clips of digits 1 and 2 each, the overrides that read it and split it
    50/25/25, and the best.pth of one epoch on that split."""
    root = tmp_path / "digits"
    for digit in (1, 2):
        for index in range(10, 18):
            (root / str(digit)).mkdir(parents=True, exist_ok=True)
            shutil.copy(fsdd_clip(digit, index=index), root / str(digit) / f"{digit}_{index}.wav")
    data = ["data=folder", f"data.root={root}", "data.sample_rate=8000"]
    split = ["data.val_fraction=0.25", "data.test_fraction=0.25"]
    run(compose_config(*data, *split, "run.train=true", "training.epochs=1"))
    return data, split, tmp_path / "outputs" / "checkpoints" / "best.pth"


def test_a_checkpoint_is_not_tested_on_clips_it_trained_or_validated_on(compose_config, tmp_path):
    # Trained on a 50/25/25 ratio split, then tested with the default 80/10/10 one: most of
    # the new test clips had trained it, and the test said 100%.
    data, split, best = _trained_on_digits(compose_config, tmp_path)
    summary = run(compose_config(*data, *split, "run.test=true", f"run.checkpoint_path={best}"))
    assert summary["test"]["per_class"]["support"] == [2, 2]

    with pytest.raises(DatasetError) as refused:
        run(compose_config(*data, "run.test=true", f"run.checkpoint_path={best}"))
    message = str(refused.value)
    assert re.match(r"2 of the 2 test clips trained or validated .*best\.pth \(.*digits/", message)
    assert message.endswith(
        "its run split the data with data.val_fraction=0.25 data.test_fraction=0.25 "
        "(this run: 0.1, 0.1): set those to test on its own test split"
    )

    # Trained further on another split, it has seen the first split's test clips too.
    further = tmp_path / "further"
    run(
        compose_config(
            *data,
            *split,
            "data.split_seed=1",
            "run.train=true",
            "training.epochs=1",
            f"run.checkpoint_path={best}",
            f"system.output_dir={further}",
        )
    )
    seen = stored_seen_clips(load_checkpoint(further / "checkpoints" / "best.pth"))
    assert stored_seen_clips(load_checkpoint(best)) < seen
    assert len(seen) == 16 - 2  # two clips were in both runs' test splits
    with pytest.raises(DatasetError, match="trained or validated .*further"):
        run(
            compose_config(
                *data,
                *split,
                "run.test=true",
                f"run.checkpoint_path={further / 'checkpoints' / 'best.pth'}",
            )
        )


def test_a_checkpoint_is_tested_on_data_with_no_training_clips(compose_config, tmp_path):
    trained = run(
        compose_config(
            *tiny_split_manifest(tmp_path), "run.train=true", "run.test=true", "training.epochs=1"
        )
    )
    best = tmp_path / "outputs" / "checkpoints" / "best.pth"
    # The tiny manifest's test clips alone: as a manifest's test rows, and as class folders.
    clips = [(fsdd_clip(digit, index=index), str(digit)) for digit in (1, 2) for index in (0, 1)]
    rows = [(path.name, label, "test") for path, label in clips]
    manifest = write_manifest(tmp_path / "test.csv", ["path", "label", "split"], rows)
    for path, label in clips:
        (tmp_path / "folder" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "folder" / label / path.name)
    folder = ["data=folder", f"data.root={tmp_path / 'folder'}", "data.sample_rate=8000"]
    every_clip = ["data.val_fraction=0", "data.test_fraction=1"]
    checkpoint = ["run.test=true", f"run.checkpoint_path={best}"]
    for name, data in [("manifest", fsdd_manifest(manifest)), ("folder", folder + every_clip)]:
        tested = run(compose_config(*data, *checkpoint, f"system.output_dir={tmp_path / name}"))
        assert tested["splits"]["train"]["clips"] == 0
        assert tested["test"]["confusion_matrix"] == trained["test"]["confusion_matrix"]
    with pytest.raises(ConfigError, match=r"must be < 1 \(training needs clips\), not 0.0 \+ 1"):
        run(compose_config(*folder, *every_clip, *checkpoint, "run.train=true"))


def test_a_checkpoint_trained_further_stores_the_config_it_was_trained_with(
    compose_config, tmp_path
):
    manifest = tiny_split_manifest(tmp_path)
    first_run = compose_config(
        *manifest, "run.train=true", "training.epochs=1", "model=panns_mobilenetv1"
    )
    run(first_run)
    first = tmp_path / "first.pth"
    shutil.copy(tmp_path / "outputs" / "checkpoints" / "best.pth", first)
    # This run's config names another model and features: the checkpoint's are trained on.
    further = tmp_path / "further"
    trained = run(
        compose_config(
            *manifest,
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
            "features.n_mels=40",
            f"run.checkpoint_path={first}",
            f"system.output_dir={further}",
        )
    )
    best = further / "checkpoints" / "best.pth"
    stored = load_checkpoint(best)["config"]
    assert stored["model"]["name"] == "panns_mobilenetv1"
    assert stored["features"] == OmegaConf.to_container(first_run.features, resolve=True)
    tested = run(
        compose_config(
            *manifest,
            "run.test=true",
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'again'}",
        )
    )
    assert tested["model"]["name"] == "panns_mobilenetv1"
    assert tested["test"]["confusion_matrix"] == trained["test"]["confusion_matrix"]


def test_a_dataset_with_other_classes_than_the_checkpoint_is_named(compose_config, tmp_path):
    run(compose_config(*tiny_split_manifest(tmp_path), "run.train=true", "training.epochs=1"))
    best = tmp_path / "outputs" / "checkpoints" / "best.pth"
    rows = [(f"{d}_jackson_{i}.wav", str(d)) for d in (1, 3) for i in range(10, 16)]
    other = write_manifest(tmp_path / "other.csv", ["path", "label"], rows)
    with pytest.raises(DatasetError, match=r"labels \['3'\] .* trained for classes \['1', '2'\]"):
        run(
            compose_config(
                "data=manifest",
                f"data.manifest={other}",
                f"data.root={FSDD}",
                "data.val_fraction=0.2",
                "data.test_fraction=0.2",
                "run.test=true",
                f"run.checkpoint_path={best}",
            )
        )


def test_pretrained_checkpoint_with_other_features_is_warned_about(
    compose_config, tmp_path, caplog
):
    manifest = tiny_split_manifest(tmp_path)
    run(compose_config(*manifest, "run.train=true", "training.epochs=1", "features.n_mels=40"))
    pretrained = tmp_path / "outputs" / "checkpoints" / "best.pth"

    def fine_tune(*overrides):
        caplog.clear()
        run(
            compose_config(
                *manifest,
                "run.train=false",
                f"model.params.pretrained_path={pretrained}",
                f"system.output_dir={tmp_path / 'tuned'}",
                *overrides,
            )
        )
        return [r.getMessage() for r in caplog.records if "other features" in r.getMessage()]

    (warning,) = fine_tune()
    assert str(pretrained) in warning
    assert "n_mels 40 vs 64" in warning
    assert fine_tune("features.n_mels=40") == []


def test_fine_tuning_on_other_classes_is_pointed_to_pretrained_path_which_works(
    compose_config, tmp_path
):
    run(compose_config(*tiny_split_manifest(tmp_path), "run.train=true", "training.epochs=1"))
    best = tmp_path / "best.pth"
    shutil.copy(tmp_path / "outputs" / "checkpoints" / "best.pth", best)
    rows = [
        (f"{d}_jackson_{i}.wav", str(d), split)
        for d in (3, 4, 5)
        for i, split in [(10, "train"), (11, "train"), (5, "val"), (0, "test")]
    ]
    other = write_manifest(tmp_path / "other.csv", ["path", "label", "split"], rows)
    data = ["data=manifest", f"data.manifest={other}", f"data.root={FSDD}", "data.sample_rate=8000"]
    hint = rf"this dataset has \['3', '4', '5'\]; to fine-tune .*pretrained_path={best}"
    with pytest.raises(DatasetError, match=hint):
        run(compose_config(*data, "run.train=true", f"run.checkpoint_path={best}"))
    tuned = run(
        compose_config(
            *data,
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
            f"model.params.pretrained_path={best}",
            f"system.output_dir={tmp_path / 'tuned'}",
        )
    )
    assert tuned["classes"] == ["3", "4", "5"]
    assert len(tuned["test"]["confusion_matrix"]) == 3


def test_deterministic_mode_is_on_for_the_job_only(compose_config, tmp_path):
    summary = run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.train=true",
            "training.epochs=1",
            "system.deterministic=true",
        )
    )
    assert len(summary["training"]["history"]) == 1
    assert not torch.are_deterministic_algorithms_enabled()


def test_multirun_sweep_runs_each_value_into_its_own_folder(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "main.py"),
            "-m",
            *tiny_split_manifest(tmp_path),
            "training.epochs=1",
            "training.lr=1e-3,3e-3",
            "run.test=false",
            "run.export=false",
            "system.num_workers=0",
            f"system.cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lrs = []
    for job in ("0", "1"):
        checkpoint = load_checkpoint(tmp_path / "sweep" / job / "checkpoints" / "last.pth")
        lrs.append(checkpoint["config"]["training"]["lr"])
    assert lrs == [1e-3, 3e-3]


def _self_signalling_main(folder: Path, name: str, batch: int) -> Path:
    """A script that runs the main job and sends itself signal `name` as its training batch
    number `batch` (from 1, over the whole run) starts: a Ctrl-C or a kill at a chosen point,
    where a signal from outside would race the run."""
    script = folder / "main.py"
    script.write_text(
        "import os, signal\n"
        "from audioclf import cli, runtime\n"
        "step, batches = runtime.StepModel.__call__, []\n"
        "def signalling(self, features, labels):\n"
        "    batches.extend([None] if self.eager.training else [])\n"
        f"    if len(batches) == {batch}:\n"
        f"        os.kill(os.getpid(), signal.{name})\n"
        "    return step(self, features, labels)\n"
        "runtime.StepModel.__call__ = signalling\n"
        "cli.main()\n"
    )
    return script


def _tiny_job(tmp_path: Path, program: Path, run_dir: str, *extra: str) -> list[str]:
    """The main job on the tiny manifest, 2 batches an epoch, no test or export."""
    import sys

    return [
        sys.executable,
        str(program),
        *tiny_split_manifest(tmp_path),
        "training.epochs=4",
        "training.batch_size=4",
        "run.test=false",
        "run.export=false",
        "system.num_workers=0",
        f"system.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / run_dir}",
        *extra,
    ]


@pytest.mark.parametrize(
    ("name", "status", "said"),
    [("SIGINT", 130, "interrupted;"), ("SIGTERM", 143, "interrupted (stopped by SIGTERM);")],
)
def test_ctrl_c_or_sigterm_stops_the_main_job_with_a_resume_hint_and_no_traceback(
    tmp_path, name, status, said
):
    # SIGTERM (kill, docker stop, a scheduler's preemption) ended the job at once, silently.
    import subprocess

    program = _self_signalling_main(tmp_path, name, batch=3)  # in epoch 2
    command = _tiny_job(tmp_path, program, "run")
    job = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = job.stdout + job.stderr
    assert job.returncode == status, output
    assert said in output
    # The command to continue, with this run's own overrides: a resumed run needs them.
    hint = output.split("continues from its last finished epoch with: ")[1].splitlines()[0]
    assert hint.startswith(f"python {program} data=manifest ")
    assert hint.endswith(
        f"training.epochs=4 training.batch_size=4 run.test=false run.export=false "
        f"system.num_workers=0 system.cache_dir={tmp_path / 'cache'} "
        f"hydra.run.dir={tmp_path / 'run'} run.resume=true"
    )
    assert "Traceback" not in output
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pth")["epoch"] == 1


def test_an_error_after_a_sigterm_that_python_dropped_is_reported_as_the_sigterm(tmp_path):
    # Python drops what a signal handler raises inside a weakref callback or __del__; the
    # job then failed on its next step ("DataLoader worker ... exited unexpectedly": SIGTERM
    # had ended the workers too) with a traceback instead of the resume hint.
    import subprocess

    program = tmp_path / "main.py"
    program.write_text(
        "import signal\n"
        "from audioclf import cli, runtime\n"
        "step, batches = runtime.StepModel.__call__, []\n"
        "def failing(self, features, labels):\n"
        "    batches.extend([None] if self.eager.training else [])\n"
        "    if len(batches) == 3:\n"
        "        try:\n"
        "            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)\n"
        "        except runtime.Terminated:\n"
        "            pass  # as Python drops it\n"
        "        raise RuntimeError('DataLoader worker (pid(s) 1) exited unexpectedly')\n"
        "    return step(self, features, labels)\n"
        "runtime.StepModel.__call__ = failing\n"
        "cli.main()\n"
    )
    job = subprocess.run(
        _tiny_job(tmp_path, program, "run"), capture_output=True, text=True, timeout=300
    )
    output = job.stdout + job.stderr
    assert job.returncode == 143, output
    assert "interrupted (stopped by SIGTERM); checkpoints are written whole" in output
    assert "Traceback" not in output


def test_ctrl_c_before_the_first_save_says_there_is_nothing_to_resume(tmp_path):
    import subprocess

    # run.resume=true would look for the newest earlier run, here a finished one of the same
    # settings, and test that instead.
    earlier = _tiny_job(tmp_path, REPO / "main.py", "earlier", "training.epochs=1")
    assert subprocess.run(earlier, capture_output=True, timeout=300).returncode == 0
    program = _self_signalling_main(tmp_path, "SIGINT", batch=1)
    job = subprocess.run(
        _tiny_job(tmp_path, program, "run", "training.epochs=1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = job.stdout + job.stderr
    assert job.returncode == 130, output
    assert "interrupted before the first epoch ended: no checkpoint was saved" in output
    assert "run.resume" not in output
    assert "Traceback" not in output


def test_main_job_killed_with_sigkill_and_resumed_equals_an_uninterrupted_run(tmp_path):
    import signal
    import subprocess

    def command(run_dir, *extra, program=REPO / "main.py"):
        return _tiny_job(
            tmp_path,
            program,
            run_dir,
            "training.mixup_alpha=0.2",
            "system.deterministic=true",
            *extra,
        )

    # Killed as its 6th training batch starts: in epoch 3, after epoch 2's save. (A poll from
    # outside raced the run: CI once saw it end before the kill.)
    killer = _self_signalling_main(tmp_path, "SIGKILL", batch=6)
    whole = subprocess.run(command("whole"), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    killed = subprocess.run(command("killed", program=killer), capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = tmp_path / "killed" / "checkpoints" / "last.pth"
    assert load_checkpoint(last)["epoch"] == 2
    resumed = subprocess.run(
        command("resumed", f"run.resume={last}"), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    expected = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pth")
    actual = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pth")
    assert actual["epoch"] == expected["epoch"] == 4
    timing = {"clips_per_second"}  # the only figure that depends on the machine's load
    assert [{k: v for k, v in r.items() if k not in timing} for r in actual["history"]] == [
        {k: v for k, v in r.items() if k not in timing} for r in expected["history"]
    ]
    for name, value in expected["model"].items():
        assert torch.equal(value, actual["model"][name]), name


def test_a_model_fine_tuned_from_a_checkpoint_is_not_tested_on_that_ones_clips(
    compose_config, tmp_path
):
    # model.params.pretrained_path: a new head on the checkpoint's weights, which have learnt
    # its training and validation clips; another split's test would hold some of them.
    data, split, best = _trained_on_digits(compose_config, tmp_path)
    fine_tune = [*data, *split, "data.split_seed=1", f"model.params.pretrained_path={best}"]
    with pytest.raises(DatasetError) as refused:
        run(compose_config(*fine_tune, "run.train=true", "run.test=true", "training.epochs=1"))
    assert re.match(
        r"2 of the 4 test clips trained or validated model.params.pretrained_path .*best\.pth",
        str(refused.value),
    )
    # Trained without that test, its checkpoints carry those clips on.
    tuned = tmp_path / "tuned"
    run(compose_config(*fine_tune, "run.train=true", f"system.output_dir={tuned}"))
    seen = stored_seen_clips(load_checkpoint(tuned / "checkpoints" / "best.pth"))
    assert stored_seen_clips(load_checkpoint(best)) < seen
