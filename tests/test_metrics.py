import csv
import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from mirage_demo.metrics import (
    OVERALL_METRICS,
    PER_CLASS_METRICS,
    compute_metrics,
    expected_calibration_error,
    fit_temperature,
    softmax,
    write_report,
)

CLASSES = ["CNV", "DME", "NORMAL"]
# Six images; rows are class probabilities. Predictions: 0, 0, 1, 1, 1, 2.
Y_TRUE = [0, 0, 0, 1, 1, 2]
PROBS = np.array(
    [
        [0.90, 0.05, 0.05],
        [0.70, 0.20, 0.10],
        [0.40, 0.50, 0.10],
        [0.20, 0.70, 0.10],
        [0.35, 0.45, 0.20],
        [0.10, 0.05, 0.85],
    ]
)


def value(metrics, name, cls=None):
    entry = metrics["overall"][name] if cls is None else metrics["per_class"][cls][name]
    return entry["value"]


def test_hand_computed_values():
    m = compute_metrics(Y_TRUE, PROBS, CLASSES, n_bootstrap=0)
    # confusion matrix [[2, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert m["num_images"] == 6
    assert m["images_per_class"] == {"CNV": 3, "DME": 2, "NORMAL": 1}
    assert value(m, "accuracy") == pytest.approx(5 / 6)
    assert value(m, "balanced_accuracy") == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert value(m, "macro_f1") == pytest.approx((4 / 5 + 4 / 5 + 1) / 3)
    # MCC: (c*s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)) = (30 - 13) / sqrt(22 * 22)
    assert value(m, "mcc") == pytest.approx(17 / 22)
    # kappa: p_o = 5/6, p_e = 13/36
    assert value(m, "cohen_kappa") == pytest.approx(17 / 23)
    # DME one-vs-rest: positives 0.70, 0.45; negatives 0.05, 0.20, 0.50, 0.05 -> 7 of 8 pairs
    assert value(m, "auroc", "DME") == pytest.approx(7 / 8)
    assert value(m, "auroc", "CNV") == 1.0 and value(m, "auroc", "NORMAL") == 1.0
    assert value(m, "macro_auroc") == pytest.approx((1 + 7 / 8 + 1) / 3)
    assert value(m, "sensitivity", "CNV") == pytest.approx(2 / 3)
    assert value(m, "specificity", "DME") == pytest.approx(3 / 4)
    assert value(m, "precision", "DME") == pytest.approx(2 / 3)
    assert value(m, "f1", "NORMAL") == 1.0
    assert m["per_class"]["DME"]["support"] == 2
    # ECE, 15 bins: |1-.9| + |2-1.4| + |0-.5| + |1-.45| + |1-.85| over 6 images
    assert value(m, "ece") == pytest.approx(1.9 / 6)
    assert expected_calibration_error(Y_TRUE, PROBS) == pytest.approx(1.9 / 6)
    assert m["bootstrap"] == {"n": 0, "seed": 0}
    assert m["overall"]["accuracy"]["ci95"] == [None, None]


def test_tied_scores_share_their_mean_rank():
    from mirage_demo.metrics import _average_ranks

    ranks = _average_ranks(np.array([[0.3, 0.1, 0.3, 0.2], [1.0, 1.0, 1.0, 0.0]]))
    assert ranks.tolist() == [[3.5, 1.0, 3.5, 2.0], [3.0, 3.0, 3.0, 1.0]]


def test_agrees_with_scikit_learn_on_random_data():
    rng = np.random.default_rng(3)
    n, k = 400, 4
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = softmax(np.round(logits, 1))  # rounding makes ties in the AUROC ranks
    m = compute_metrics(y, probs, list("ABCD"), n_bootstrap=0)
    pred = probs.argmax(1)
    assert value(m, "accuracy") == pytest.approx(skm.accuracy_score(y, pred))
    assert value(m, "balanced_accuracy") == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert value(m, "macro_f1") == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert value(m, "mcc") == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert value(m, "cohen_kappa") == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert value(m, "macro_auroc") == pytest.approx(
        skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    )
    recall = skm.recall_score(y, pred, average=None)
    precision = skm.precision_score(y, pred, average=None)
    for c, name in enumerate("ABCD"):
        assert value(m, "auroc", name) == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]))
        assert value(m, "sensitivity", name) == pytest.approx(recall[c])
        assert value(m, "precision", name) == pytest.approx(precision[c])
        assert value(m, "specificity", name) == pytest.approx(skm.recall_score(y != c, pred != c))


def test_bootstrap_intervals_are_seeded_and_bracket_the_value():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    probs = softmax(rng.normal(size=(150, 3)) + 2 * np.eye(3)[y])
    a = compute_metrics(y, probs, CLASSES, n_bootstrap=300, seed=7)
    b = compute_metrics(y, probs, CLASSES, n_bootstrap=300, seed=7)
    c = compute_metrics(y, probs, CLASSES, n_bootstrap=300, seed=8)
    a.pop("created"), b.pop("created"), c.pop("created")
    assert a == b and a != c
    for name in OVERALL_METRICS:
        lo, hi = a["overall"][name]["ci95"]
        assert lo <= a["overall"][name]["value"] <= hi, name
        assert hi - lo > 0.005, name  # a real interval, not a point
    lo, hi = a["overall"]["accuracy"]["ci95"]
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.7 * 0.3 / 150), abs=0.06)


def test_absent_class_gives_null_not_nan(tmp_path):
    y = [0, 0, 1, 1]
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    write_report(tmp_path, y, probs, CLASSES, [f"x{i}.png" for i in range(4)], n_bootstrap=50)
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    m = json.loads(text)
    assert m["per_class"]["NORMAL"]["auroc"] == {"value": None, "ci95": [None, None]}
    assert m["per_class"]["NORMAL"]["sensitivity"]["value"] is None
    assert m["per_class"]["NORMAL"]["precision"]["value"] is None  # never predicted
    assert m["per_class"]["NORMAL"]["specificity"]["value"] == 1.0
    assert m["per_class"]["NORMAL"]["support"] == 0
    # balanced accuracy and macro AUROC average the classes present: (1/2 + 1) / 2
    assert value(m, "balanced_accuracy") == pytest.approx(0.75)
    assert value(m, "macro_auroc") == pytest.approx(1.0)


def test_report_follows_the_contract(tmp_path):
    files = [f"test/{CLASSES[t]}/img{i}.png" for i, t in enumerate(Y_TRUE)]
    m = write_report(
        tmp_path, Y_TRUE, PROBS, CLASSES, files, split="test", temperature=1.3, n_bootstrap=100
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == m
    umask = os.umask(0)
    os.umask(umask)
    for name in ("metrics.json", "predictions.csv"):  # not mkstemp's private 0600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert set(saved) == {
        "split",
        "num_images",
        "class_names",
        "images_per_class",
        "temperature",
        "overall",
        "per_class",
        "confusion_matrix",
        "bootstrap",
        "created",
    }
    assert saved["temperature"] == 1.3 and saved["split"] == "test"
    assert set(saved["overall"]) == set(OVERALL_METRICS)
    for entry in saved["overall"].values():
        assert set(entry) == {"value", "ci95"} and len(entry["ci95"]) == 2
    for cls in CLASSES:
        assert set(saved["per_class"][cls]) == {*PER_CLASS_METRICS, "support"}
    assert saved["bootstrap"] == {"n": 100, "seed": 0}
    with open(tmp_path / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "true", "predicted", "prob_CNV", "prob_DME", "prob_NORMAL"]
    assert rows[2]["file"] == "test/CNV/img2.png"
    assert rows[2]["true"] == "CNV" and rows[2]["predicted"] == "DME"
    assert float(rows[2]["prob_DME"]) == pytest.approx(0.5)
    for name, min_size in [
        ("confusion_matrix.png", (700, 300)),
        ("roc_curves.png", (500, 500)),
        ("reliability.png", (500, 500)),
    ]:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"
            assert image.width >= min_size[0] and image.height >= min_size[1], name
            assert np.asarray(image.convert("L")).std() > 10, name  # not blank


def test_fit_temperature_recovers_overconfidence():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(size=(4000, 4)) * 1.5
    u = rng.random(4000)[:, None]
    y = (u > np.cumsum(softmax(true_logits), axis=1)).sum(1)
    overconfident = true_logits * 2.5
    assert fit_temperature(overconfident, y) == pytest.approx(2.5, rel=0.1)
    assert fit_temperature(true_logits, y) == pytest.approx(1.0, rel=0.1)
    assert fit_temperature(np.zeros((0, 4)), []) == 1.0
    separable = np.eye(4)[y] * 5.0  # every image right: no finite optimum, model left as is
    assert fit_temperature(separable, y) == 1.0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="probs must be"):
        compute_metrics([0, 1], np.ones((2, 2)) / 2, CLASSES)
    with pytest.raises(ValueError, match="labels must be"):
        compute_metrics([0, 3], np.ones((2, 3)) / 3, CLASSES)


def test_one_predictions_file_for_report_cli_and_app(tmp_path):
    from mirage_demo.metrics import write_predictions_csv

    classes = ["CNV", "DME"]
    probs = [[0.25, 0.75], None]
    path = write_predictions_csv(
        tmp_path / "p.csv",
        classes,
        ["a.png", "b.png"],
        probs,
        warnings=[["colour image"], []],
        errors=[None, "b.png: corrupt"],
    )
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["file", "predicted", "prob_CNV", "prob_DME", "warnings", "error"]
    assert rows[0] == {
        "file": "a.png",
        "predicted": "DME",
        "prob_CNV": "0.250000",
        "prob_DME": "0.750000",
        "warnings": "colour image",
        "error": "",
    }
    assert rows[1]["predicted"] == "" and rows[1]["prob_CNV"] == "" and rows[1]["error"]
    with pytest.raises(ValueError, match="1 probabilities for 2 files"):
        write_predictions_csv(tmp_path / "q.csv", classes, ["a", "b"], [[0.5, 0.5]])
