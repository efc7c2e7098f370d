"""The main job under torchrun: DDP training, quantising, and cross-validation."""

from __future__ import annotations

import json

import pytest

from audioclf.checkpoint import (
    load_checkpoint,
)
from conftest import (
    FSDD,
    REPO,
    tiny_split_manifest,
    torchrun,
    write_manifest,
)


def _torchrun(tmp_path, *overrides: str) -> str:
    """The main job in 2 torchrun processes from tmp_path (batch 4, no export, no workers);
    its output, after checking that it succeeded."""
    return torchrun(
        [
            str(REPO / "main.py"),
            "training.batch_size=4",
            "run.export=false",
            "system.num_workers=0",
            f"system.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ],
        tmp_path,
    )


def test_two_process_ddp_run_trains_and_rank_zero_writes(tmp_path):
    output = _torchrun(
        tmp_path,
        *tiny_split_manifest(tmp_path),
        "training.epochs=2",
        # Batches that do not step keep their gradients in their process (DDP's no_sync).
        "training.batch_size=2",
        "training.accumulate_grad_batches=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "x 2 processes (DDP)" in output
    assert output.count("epoch 2/2") == 1  # rank 0 logs, rank 1 does not
    assert "terminate called" not in output
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pth")
    assert checkpoint["epoch"] == 2
    assert "test" in json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.parametrize("mode", ["ptq", "qat"])
def test_quantising_under_torchrun_finishes_and_rank_zero_saves_and_tests_the_int8_model(
    tmp_path, mode
):
    # Rank 0 used to quantise alone, and its Trainers (QAT's, and the int8 test's) waited for
    # the other rank in DDP's construction: the run hung after the float test. QAT now
    # fine-tunes on both ranks.
    output = _torchrun(
        tmp_path,
        *tiny_split_manifest(tmp_path),
        "model.params.width_mult=0.25",
        "model.params.depth_mult=0.25",
        "training.epochs=1",
        "run.quantise=true",
        f"model.quantization.mode={mode}",
        "model.quantization.epochs=1",
        "model.quantization.calibration_clips=4",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    # Training, then (QAT) the fine-tuning, each in DDP.
    assert output.count("x 2 processes (DDP)") == (2 if mode == "qat" else 1)
    # The float model trained channels_last; QAT's gradients must fit DDP's buckets.
    assert "Grad strides do not match" not in output
    assert "terminate called" not in output
    run_dir = tmp_path / "run"
    if mode == "qat":
        assert load_checkpoint(run_dir / "qat" / "checkpoints" / "last.pth")["epoch"] == 1
    assert (
        load_checkpoint(run_dir / "checkpoints" / "int8.pth")["quantized"]["spec"]["mode"] == mode
    )
    assert "test_int8" in json.loads((run_dir / "metrics.json").read_text())


def test_cross_validation_under_torchrun_writes_one_result_in_rank_zeros_folder(
    tmp_path, manifest_rows
):
    # Each rank has its own Hydra run folder; rank 1 wrote a second cv_metrics.json into its
    # own while the folds went to rank 0's. Then that folder held only its log, beside rank 0's
    # in outputs/: two folders a run.
    manifest = write_manifest(tmp_path / "folds.csv", ["path", "label", "fold"], manifest_rows)
    output = _torchrun(
        tmp_path,
        "data=manifest",
        f"data.manifest={manifest}",
        f"data.root={FSDD}",
        "data.sample_rate=8000",
        "data.val_fraction=0.25",
        "run.folds=[1,2]",
        "training.epochs=1",
    )
    (written,) = (tmp_path / "outputs").glob("*/*/cv_metrics.json")
    # One run folder: rank 1's log is in it, and its own Hydra folder is gone.
    assert list((tmp_path / "outputs").glob("*/*")) == [written.parent]
    assert (written.parent / "cli_rank1.log").is_file()
    assert sorted(path.name for path in written.parent.glob("fold_*")) == ["fold_1", "fold_2"]
    assert [fold["fold"] for fold in json.loads(written.read_text())["folds"]] == ["1", "2"]
    assert output.count("cross-validation: test fold 1") == 1
