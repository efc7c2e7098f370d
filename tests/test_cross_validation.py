"""Cross-validation over a fold manifest (`run.folds`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from audioclf.cli import run
from audioclf.settings import ConfigError
from conftest import (
    FSDD,
    esc50_like,
    fsdd_manifest,
    write_manifest,
)


def test_folds_all_trains_and_tests_each_fold_and_reports_mean_and_std(
    compose_config, tmp_path, manifest_rows
):
    from audioclf.cli import run_folds

    manifest = write_manifest(tmp_path / "folds.csv", ["path", "label", "fold"], manifest_rows)
    result = run_folds(
        compose_config(
            "data=manifest",
            f"data.manifest={manifest}",
            f"data.root={FSDD}",
            "data.sample_rate=8000",
            "data.val_fraction=0.25",
            "run.folds=all",
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
        )
    )
    assert [fold["fold"] for fold in result["folds"]] == ["1", "2", "3", "4"]
    written = json.loads((tmp_path / "outputs" / "cv_metrics.json").read_text())
    assert written == result
    accuracies = [fold["accuracy"] for fold in result["folds"]]
    assert result["mean"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert result["std"]["accuracy"] == pytest.approx(np.std(accuracies))
    for fold in "1234":
        tested = json.loads((tmp_path / "outputs" / f"fold_{fold}" / "metrics.json").read_text())
        assert sum(map(sum, tested["test"]["confusion_matrix"])) == 6


def _fold_manifest_config(compose_config, folder, rows, *overrides):
    """The config of a fold manifest of `rows` (written into `folder`) with `overrides`."""
    manifest = write_manifest(folder / "folds.csv", ["path", "label", "fold"], rows)
    return compose_config(*fsdd_manifest(manifest), *overrides)


def test_folds_that_the_manifest_lacks_stop_before_the_first_fold_trains(
    compose_config, tmp_path, manifest_rows
):
    from audioclf.cli import run_folds

    config = _fold_manifest_config(
        compose_config,
        tmp_path,
        manifest_rows,
        "run.folds=[1,5]",
        "run.train=true",
        "run.test=true",
    )
    with pytest.raises(ConfigError, match=r"no row of .*folds.csv has fold\(s\) \['5'\]"):
        run_folds(config)
    assert not (tmp_path / "outputs").exists()


def test_the_job_run_once_refuses_a_config_that_asks_for_folds(
    compose_config, tmp_path, manifest_rows
):
    """From Python, `run` with run.folds set trained once on the configured split."""
    from audioclf.settings import ConfigError

    config = _fold_manifest_config(compose_config, tmp_path, manifest_rows, "run.folds=all")
    with pytest.raises(ConfigError, match=r"run.folds=all asks for .* audioclf.job.run_folds"):
        run(config)
    assert not (tmp_path / "outputs").exists()


def test_esc50_config_reads_the_shipped_metadata_and_cross_validates(compose_config, tmp_path):
    from audioclf.cli import run_folds

    root, _ = esc50_like(tmp_path / "ESC-50-master", folds=2)
    result = run_folds(
        compose_config(
            "data=esc50",
            f"data.root={root}",
            "data.sample_rate=8000",
            "data.clip_seconds=1.0",
            "data.val_fraction=0.25",
            "run.folds=all",
            "run.train=true",
            "run.test=true",
            "training.epochs=1",
        )
    )
    assert [fold["fold"] for fold in result["folds"]] == ["1", "2"]
    tested = json.loads((tmp_path / "outputs" / "fold_2" / "metrics.json").read_text())
    assert tested["test"]["classes"] == ["dog", "rooster"]
    assert sum(map(sum, tested["test"]["confusion_matrix"])) == 6


def test_folds_without_a_fold_manifest_is_a_config_error(compose_config):
    from audioclf.settings import load_settings

    with pytest.raises(ConfigError, match="run.folds needs data=manifest"):
        load_settings(compose_config("run.folds=all"))


def test_folds_without_testing_stop_before_the_first_fold_trains(
    compose_config, tmp_path, manifest_rows
):
    # Before: the first fold trained in full, then the job stopped for want of its metrics.
    from audioclf.cli import run_folds

    config = _fold_manifest_config(
        compose_config, tmp_path, manifest_rows, "run.folds=all", "run.test=false"
    )
    with pytest.raises(ConfigError, match="run.folds needs run.test=true"):
        run_folds(config)
    assert not (tmp_path / "outputs").exists()
