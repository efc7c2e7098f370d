"""Knowledge distillation: a frozen teacher, online and cached teacher logits, and teachers the
job refuses."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch import nn

from audioclf.cli import run
from audioclf.model import CheckpointError
from audioclf.predict import load_predictor
from audioclf.settings import ConfigError, DistillationConfig
from audioclf.train import Trainer
from conftest import (
    TinyNet,
    separable_features,
    separable_loaders,
    tiny_split_manifest,
    tiny_trainer,
    training_options,
    write_manifest,
)


def test_teacher_stays_frozen_and_gets_no_gradients(tmp_path):
    torch.manual_seed(1)
    teacher = TinyNet(3)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    trainer = tiny_trainer(tmp_path, training_options(epochs=2), teacher=teacher)
    trainer.fit(*separable_loaders())
    assert not teacher.training
    assert all(parameter.grad is None for parameter in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_distillation_uses_the_teachers_soft_targets(tmp_path):
    # alpha = 0: the loss is the soft term alone, so a student matching a constant teacher
    # learns the teacher's (uniform) output, not the labels.
    class Uniform(nn.Module):
        def forward(self, x, labels=None):
            return torch.zeros(x.shape[0], 3)

    options = training_options(
        epochs=4, distillation=DistillationConfig(alpha=0.0, temperature=1.0)
    )
    trainer = tiny_trainer(tmp_path, options, teacher=Uniform())
    trainer.fit(*separable_loaders())
    probabilities = torch.softmax(trainer.model.eval()(separable_features(12).tensors[0]), dim=1)
    assert torch.allclose(probabilities, torch.full_like(probabilities, 1 / 3), atol=0.15)


def test_a_distilling_run_keeps_its_class_weights(tmp_path):
    # alpha = 1: the loss is the term on the labels alone, weighted as without a teacher.
    # Under distillation the weights were dropped.
    options = training_options(
        epochs=1, distillation=DistillationConfig(alpha=1.0, temperature=2.0)
    )
    weights = torch.tensor([3.0, 1.0, 0.5])
    losses = []
    for name, teacher in [("alone", None), ("taught", TinyNet(3))]:
        trainer = tiny_trainer(tmp_path / name, options, class_weights=weights, teacher=teacher)
        losses.append(trainer.fit(*separable_loaders(16))["history"][0]["train_loss"])
    unweighted = tiny_trainer(tmp_path / "plain", options).fit(*separable_loaders(16))["history"][0]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert unweighted["train_loss"] != pytest.approx(losses[0], rel=1e-3)


def test_arcface_student_distils(tmp_path):
    from audioclf.model import create_model

    torch.manual_seed(0)
    student = create_model("efficientnet_v2", 3, width_mult=0.25, depth_mult=0.25, arcface=True)
    trainer = Trainer(
        student, training_options(epochs=1), ["a", "b", "c"], tmp_path, teacher=TinyNet(3)
    )
    result = trainer.fit(*separable_loaders(16))
    assert math.isfinite(result["history"][0]["train_loss"])


def _teacher_run(compose_config, tmp_path, *overrides) -> str:
    run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.train=true",
            "training.epochs=1",
            f"system.output_dir={tmp_path / 'teacher'}",
            *overrides,
        )
    )
    return str(tmp_path / "teacher" / "checkpoints" / "best.pth")


def _student_run(compose_config, tmp_path, teacher: str) -> dict:
    return run(
        compose_config(
            *tiny_split_manifest(tmp_path),
            "run.train=true",
            "training.epochs=1",
            "teacher_model=efficientnet_v2",
            f"teacher_model.checkpoint_path={teacher}",
        )
    )


def test_teacher_on_the_students_features_runs_on_every_batch(compose_config, tmp_path):
    teacher = _teacher_run(compose_config, tmp_path, "model.params.width_mult=0.5")
    summary = _student_run(compose_config, tmp_path, teacher)
    assert summary["distillation"]["how"] == "online, on the student's features"


def test_teacher_with_its_own_features_gives_cached_logits(compose_config, tmp_path):
    teacher = _teacher_run(
        compose_config, tmp_path, "data.sample_rate=16000", "features=tf_power_db"
    )
    summary = _student_run(compose_config, tmp_path, teacher)
    assert summary["distillation"]["how"].startswith("logits of 8 clean clips at 16000 Hz")
    assert summary["training"]["history"][0]["train_loss"] > 0


def test_panns_teacher_with_other_mel_bins_is_built_for_its_own_features(compose_config, tmp_path):
    # bn0 of a PANNs model has one channel per mel bin: 40 for this teacher, 64 for the student.
    teacher = _teacher_run(
        compose_config, tmp_path, "model=panns_mobilenetv1", "features.n_mels=40"
    )
    summary = _student_run(compose_config, tmp_path, teacher)
    assert summary["features"]["shape"][-1] == 64
    assert summary["distillation"]["how"].startswith("logits of 8 clean clips at 8000 Hz")


def test_teacher_for_other_classes_is_refused_naming_them(compose_config, tmp_path):
    rows = [(f"{d}_jackson_{i}.wav", str(d)) for d in (4, 5) for i in range(10, 20)]
    other = write_manifest(tmp_path / "other.csv", ["path", "label"], rows)
    teacher = _teacher_run(
        compose_config,
        tmp_path,
        f"data.manifest={other}",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
    )
    with pytest.raises(CheckpointError, match=r"classes \['4', '5'\], the student learns"):
        run(
            compose_config(
                *tiny_split_manifest(tmp_path),
                "run.train=true",
                "teacher_model=efficientnet_v2",
                f"teacher_model.checkpoint_path={teacher}",
            )
        )


def test_a_missing_teacher_file_stops_before_the_data_pass(compose_config, tmp_path, monkeypatch):
    # Before: the teacher was read after every clip had been decoded and featurised, and
    # the error named the file but not the key.
    import audioclf.job

    monkeypatch.setattr(
        audioclf.job, "build_datasets", lambda *_: pytest.fail("the data pass ran first")
    )
    with pytest.raises(
        ConfigError, match=r"^teacher_model.checkpoint_path: no such checkpoint file '.*nope.pth'"
    ):
        run(
            compose_config(
                *tiny_split_manifest(tmp_path),
                "run.train=true",
                "teacher_model=efficientnet_v2",
                f"teacher_model.checkpoint_path={tmp_path / 'nope.pth'}",
            )
        )


def test_a_checkpoint_fine_tuned_from_pretrained_weights_needs_not_that_file(
    compose_config, tmp_path
):
    manifest = tiny_split_manifest(tmp_path)
    run(compose_config(*manifest, "run.train=true", "training.epochs=1"))
    pretrained = tmp_path / "pretrained.pth"
    shutil.copy(tmp_path / "outputs" / "checkpoints" / "best.pth", pretrained)
    fine_tuned = tmp_path / "tuned"
    run(
        compose_config(
            *manifest,
            "run.train=true",
            "training.epochs=1",
            f"model.params.pretrained_path={pretrained}",
            f"system.output_dir={fine_tuned}",
        )
    )
    pretrained.unlink()  # as on another machine: the checkpoint's weights are all it needs
    best = fine_tuned / "checkpoints" / "best.pth"
    tested = run(
        compose_config(
            *manifest,
            "run.test=true",
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'again'}",
        )
    )
    assert 0.0 <= tested["test"]["accuracy"] <= 1.0
    assert load_predictor(best).classes == ["1", "2"]
    taught = _student_run(compose_config, tmp_path, str(best))
    assert taught["distillation"]["how"] == "online, on the student's features"
