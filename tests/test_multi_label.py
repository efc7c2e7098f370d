"""Multi-label data: multi-hot targets, BCE training, mAP, and testing from a checkpoint."""

from __future__ import annotations

import logging

import pytest

from audioclf.cache import FeatureCache
from audioclf.cli import run
from audioclf.dataset import SpectrogramDataset
from audioclf.features import resolve_params
from audioclf.index import DatasetError
from conftest import (
    FSDD,
    write_manifest,
)


def _multi_labeltiny_split_manifest(tmp_path, negatives: bool = False) -> list[str]:
    """Digits 1-3 tagged with their names and parities; with `negatives`, 4s with no tag."""
    rows = []
    tagged = [(1, "one;odd"), (2, "two;even"), (3, "odd;three")] + ([(4, "")] if negatives else [])
    for digit, tags in tagged:
        for index, split in [(10, "train"), (11, "train"), (12, "train"), (13, "train")] + [
            (5, "val"),
            (6, "val"),
            (0, "test"),
            (1, "test"),
        ]:
            rows.append((f"{digit}_jackson_{index}.wav", tags, split))
    path = write_manifest(tmp_path / "tags.csv", ["path", "label", "split"], rows)
    return [
        "data=manifest",
        f"data.manifest={path}",
        f"data.root={FSDD}",
        "data.sample_rate=8000",
        "data.multi_label=true",
    ]


def test_multi_label_manifest_gives_multi_hot_targets(tmp_path):
    from audioclf.index import split_listing
    from audioclf.manifest import index_manifest

    path = write_manifest(
        tmp_path / "m.csv",
        ["path", "label"],
        [
            ("1_jackson_10.wav", "odd; one;odd"),
            ("2_jackson_10.wav", "even;two"),
            ("5_jackson_10.wav", ""),  # a negative: no class applies
        ],
    )
    listing = index_manifest(path, FSDD, 0.0, 0.0, multi_label=True)
    assert [clip.label for clip in listing.clips] == ["odd;one", "even;two", ""]
    index = split_listing(listing, seed=0, multi_label=True)
    assert index.classes == ["even", "odd", "one", "two"]
    dataset = SpectrogramDataset(
        index.splits["train"],
        index.classes,
        8000,
        0.5,
        resolve_params("librosa", 8000),
        FeatureCache(tmp_path / "cache"),
        multi_label=True,
    )
    targets = {clip.label: dataset.label_index(clip).tolist() for clip in dataset.clips}
    assert targets == {"odd;one": [0, 1, 1, 0], "even;two": [1, 0, 0, 1], "": [0, 0, 0, 0]}
    # A multi-class manifest still refuses an empty label.
    with pytest.raises(DatasetError, match=r"m\.csv, line 4: empty label"):
        index_manifest(path, FSDD, 0.0, 0.0)


def test_multi_label_main_job_trains_with_bce_and_reports_map(compose_config, tmp_path, caplog):
    # With clips that no class applies to (negatives, an empty label cell), counted apart.
    caplog.set_level(logging.INFO, logger="audioclf")
    summary = run(
        compose_config(
            *_multi_labeltiny_split_manifest(tmp_path, negatives=True),
            "run.train=true",
            "run.test=true",
            "training.epochs=2",
            "training.mixup_alpha=0.2",
        )
    )
    assert summary["classes"] == ["even", "odd", "one", "three", "two"]
    assert summary["splits"]["train"]["per_class"]["odd"] == 8
    assert summary["splits"]["train"]["clips"] == 16
    assert [summary["splits"][split]["no_label"] for split in ("train", "val", "test")] == [4, 2, 2]
    assert "train        16 clips (4-8 per class, 4 with no label)" in caplog.text
    test = summary["test"]
    assert {"mAP", "roc_auc", "f1", "accuracy"} <= set(test)
    assert 0.0 <= test["mAP"] <= 1.0
    assert summary["training"]["monitor"] == "val_mAP"


def test_a_multi_label_checkpoint_tests_as_multi_label_with_no_other_flags(
    compose_config, tmp_path
):
    overrides = _multi_labeltiny_split_manifest(tmp_path)
    run(compose_config(*overrides, "run.train=true", "training.epochs=1"))
    best = tmp_path / "outputs" / "checkpoints" / "best.pth"
    without_flag = [o for o in overrides if o != "data.multi_label=true"]
    tested = run(
        compose_config(
            *without_flag,
            "run.test=true",
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'again'}",
        )
    )
    assert tested["classes"] == ["even", "odd", "one", "three", "two"]
    assert "mAP" in tested["test"]
    # Training further, monitoring a multi-label metric: checked as adopted, so it runs.
    further = run(
        compose_config(
            *without_flag,
            "run.train=true",
            "training.epochs=1",
            "training.monitor=val_mAP",
            f"run.checkpoint_path={best}",
            f"system.output_dir={tmp_path / 'further'}",
        )
    )
    assert further["training"]["monitor"] == "val_mAP"
