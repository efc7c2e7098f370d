"""Multi-class and multi-label metrics against hand-computed values, and the evaluation files."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audioclf.metrics import multiclass_metrics, multilabel_metrics, write_evaluation


def test_multiclass_metrics_against_hand_computed_values():
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    metrics = multiclass_metrics(F.one_hot(predicted, 3).float(), targets)
    # precision: 0 -> 1/2, 1 -> 2/3, 2 -> 1; recall: 1/2, 1, 1/2
    precision, recall = [0.5, 2 / 3, 1.0], [0.5, 1.0, 0.5]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True)]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["precision"] == pytest.approx(np.mean(precision))
    assert metrics["recall"] == pytest.approx(np.mean(recall))
    assert metrics["f1"] == pytest.approx(np.mean(f1))
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_multilabel_metrics_against_hand_computed_values():
    targets = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])
    scores = torch.tensor([[0.9, 0.2], [0.6, 0.4], [0.3, 0.8], [0.7, 0.1]])
    metrics = multilabel_metrics(torch.logit(scores), targets)
    # label 0: ranked 0.9(+), 0.7(-), 0.6(+), 0.3(-): AP = (1/1 + 2/3) / 2; AUC = 3/4
    # label 1: ranked 0.8(+), 0.4(+), 0.2(-), 0.1(-): AP = 1; AUC = 1
    assert metrics["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert metrics["roc_auc"] == pytest.approx((0.75 + 1) / 2)
    # at 0.5: label 0 predicted [1,1,0,1]: P 2/3, R 1; label 1 predicted [0,0,1,0]: P 1, R 1/2
    assert metrics["precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["recall"] == pytest.approx((1 + 0.5) / 2)
    assert metrics["f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_labels_without_positives_are_left_out_of_map_and_roc_auc(recwarn, tmp_path):
    # The two labels above, plus label 2 (no positive clip) and label 3 (no negative one):
    # 2 has no AP and no ROC-AUC, 3 has AP 1 and no ROC-AUC; neither counts as a 0.
    targets = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1]])
    scores = torch.tensor(
        [[0.9, 0.2, 0.3, 0.6], [0.6, 0.4, 0.1, 0.2], [0.3, 0.8, 0.7, 0.9], [0.7, 0.1, 0.2, 0.4]]
    )
    metrics = multilabel_metrics(torch.logit(scores), targets)
    assert metrics["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1 + 1) / 3)
    assert metrics["roc_auc"] == pytest.approx((0.75 + 1) / 2)
    assert metrics["per_class"]["average_precision"][2:] == [None, pytest.approx(1.0)]
    assert not [w for w in recwarn if "torchmetrics" in w.filename]
    paths = write_evaluation(metrics, ["a", "b", "c", "d"], tmp_path)
    rows = list(csv.DictReader(paths["per_class"].open()))
    assert [row["average_precision"] for row in rows][2:] == ["", "1.0000"]
    assert math.isclose(json.loads(paths["metrics"].read_text())["test"]["mAP"], metrics["mAP"])


def test_class_names_no_font_draws_give_one_warning_not_one_per_glyph_and_drawing(tmp_path, caplog):
    # Chinese class names on a machine without a CJK font: matplotlib warned for each missing
    # glyph on every figure drawn (14 warnings in a 3-epoch run).
    from audioclf import metrics as metrics_module

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figure = metrics_module.confusion_matrix_figure([[1, 0], [0, 1]], ["café", "Größe"])
        figure.savefig(tmp_path / "latin.png")
        assert not [w for w in caught if "Glyph" in str(w.message)]  # the default font has them
        with caplog.at_level("WARNING", logger="audioclf.metrics"):
            for _ in range(3):
                figure = metrics_module.confusion_matrix_figure([[1, 0], [0, 1]], ["猫", "犬"])
                figure.savefig(tmp_path / "cjk.png")
    assert not [w for w in caught if "Glyph" in str(w.message)]
    # One warning, or none where a font for Chinese is installed (it is then used).
    found = metrics_module._font_for("猫犬") is not None
    assert caplog.text.count("no installed font draws every character") == (0 if found else 1)


def test_the_library_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    # Importing audioclf.metrics switched every importer's backend to Agg: a notebook that
    # imported the trainer lost its inline plots. The confusion matrix draws on a Figure of its
    # own, written to PNG whatever the backend.
    import subprocess
    import sys

    code = (
        "import sys, matplotlib; matplotlib.use('svg')\n"
        "import audioclf.job\n"
        "from pathlib import Path\n"
        "from audioclf.metrics import multiclass_metrics, write_evaluation\n"
        "import torch\n"
        "metrics = multiclass_metrics(torch.eye(2), torch.tensor([0, 1]))\n"
        "write_evaluation(metrics, ['a', 'b'], Path(sys.argv[1]))\n"
        "print(matplotlib.get_backend())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "svg"
    assert (tmp_path / "test_confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
