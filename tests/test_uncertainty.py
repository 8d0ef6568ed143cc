"""Prediction sets and the out-of-distribution flag: the estimators against MAPIE and their
guarantees on simulated data, storage in a checkpoint, and the Predictor's answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

from mirage_demo.checkpoint import UNCERTAINTY_NAME, CheckpointError, read_config
from mirage_demo.data import Sample
from mirage_demo.imagestats import STAT_NAMES
from mirage_demo.inference import Predictor
from mirage_demo.ood import StatisticsOOD, UnlikeTraining
from mirage_demo.uncertainty import (
    NEVER_SURE,
    ConformalSets,
    fit_uncertainty,
    load_uncertainty,
    save_uncertainty,
    sure_bar,
)
from tests.synthetic_oct import oct_like, train_tiny_checkpoint, write_labelled_scans

pytestmark = pytest.mark.usefixtures("one_thread")


def simulated(n: int, priors: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of an imperfect classifier and true labels, exchangeable across calls."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(priors), size=n, p=priors)
    logits = rng.normal(0, 1, (n, len(priors)))
    logits[np.arange(n), labels] += rng.uniform(0, 3, n)  # sometimes sure, sometimes not
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


# --------------------------------------------------------------------------------------------
# Estimators


@pytest.mark.filterwarnings("ignore:WARNING. your conformalization dataset")
def test_class_conditional_sets_equal_mapie_lac_fitted_on_each_class():
    """Mondrian LAC = MAPIE's split-conformal LAC calibrated on each class's scans alone."""
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Given(ClassifierMixin, BaseEstimator):  # a prefit model whose input is its output
        def fit(self, x, y):
            self.classes_ = np.arange(x.shape[1])
            return self

        def predict_proba(self, x):
            return np.asarray(x)

        def predict(self, x):
            return np.asarray(x).argmax(axis=1)

    priors = [0.5, 0.3, 0.2]
    cal_probs, cal_labels = simulated(600, priors, seed=1)
    test_probs, _ = simulated(500, priors, seed=2)
    ours = ConformalSets().fit(cal_probs, cal_labels)
    for level in (0.8, 0.9, 0.95):
        sets = ours.predict_sets(test_probs, level)
        for k in range(3):
            mine = cal_labels == k
            mapie = SplitConformalClassifier(
                Given().fit(cal_probs, cal_labels), confidence_level=level, prefit=True
            )
            mapie.conformalize(cal_probs[mine], cal_labels[mine])
            _, mapie_sets = mapie.predict_set(test_probs)
            expected = mapie_sets[:, k, 0] | (test_probs.argmax(axis=1) == k)  # top class kept
            np.testing.assert_array_equal(sets[:, k], expected)


@pytest.mark.parametrize("level", [0.8, 0.9])
def test_each_class_gets_its_coverage_including_a_rare_one(level):
    priors = [0.6, 0.35, 0.05]  # the rare class: about 100 of 2,000 calibration scans
    cal_probs, cal_labels = simulated(2000, priors, seed=3)
    test_probs, test_labels = simulated(40000, priors, seed=4)
    sets = ConformalSets().fit(cal_probs, cal_labels).predict_sets(test_probs, level)
    covered = sets[np.arange(len(test_labels)), test_labels]
    for k in range(3):
        assert covered[test_labels == k].mean() >= level - 0.03, k
    assert sets.sum(axis=1).mean() < 3  # not the trivial answer


def test_any_level_at_run_time_and_a_class_too_rare_for_it_is_pooled():
    probs, labels = simulated(400, [0.5, 0.49, 0.01], seed=5)  # class 2: a handful of scans
    sets = ConformalSets().fit(probs, labels)
    sizes = [sets.predict_sets(probs, level).sum(axis=1).mean() for level in (0.5, 0.8, 0.95)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert sets.pooled_classes(0.9) == [2]
    assert sets.pooled_classes(0.5) == []  # 4 scans are enough at 50%
    assert np.isfinite(sets.thresholds(0.9)).all()
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="level"):
            sets.thresholds(bad)


def test_rare_classes_are_calibrated_together_not_with_the_frequent_ones():
    rng = np.random.default_rng(7)
    labels = np.array([0] * 200 + [1] * 5 + [2] * 5)
    probs = np.full((210, 3), 0.05)
    probs[np.arange(210), labels] = np.r_[rng.uniform(0.8, 0.9, 200), rng.uniform(0.1, 0.6, 10)]
    sets = ConformalSets().fit(probs / probs.sum(1, keepdims=True), labels)
    rare = np.sort(np.concatenate(sets.scores_[1:]))  # 10 scores: enough at 90% together
    thresholds = sets.thresholds(0.9)
    assert sets.pooled_classes(0.9) == [1, 2]
    assert thresholds[1] == thresholds[2] == rare[int(np.ceil(11 * 0.9)) - 1]
    assert thresholds[1] > thresholds[0] + 0.3  # the frequent class's easy scores do not set it


def test_mahalanobis_false_alarm_rate_and_detection_of_shifted_features():
    rng = np.random.default_rng(6)
    means = rng.normal(0, 3, (3, 16))

    def draw(n, shift=0.0):
        labels = rng.integers(0, 3, n)
        return means[labels] + rng.normal(0, 1, (n, 16)) + shift, labels

    train, train_labels = draw(3000)
    val, _ = draw(2000)
    ood = UnlikeTraining.fit(train, train_labels, None, val, None, false_alarm=0.05)
    fresh, _ = draw(20000)
    assert abs(ood.flags(fresh).mean() - 0.05) < 0.015
    shifted, _ = draw(2000, shift=rng.normal(0, 3, 16))
    assert ood.flags(shifted).mean() > 0.9
    assert ood.score(shifted).mean() > ood.score(fresh).mean()


def test_two_detectors_share_the_false_alarm_rate_and_each_catches_its_own_shift():
    """Features and image statistics: thresholds set together on validation scans flag about
    5% of fresh scans in all; a shift in either is caught; not-finite scores are flagged."""
    rng = np.random.default_rng(7)
    means = rng.normal(0, 3, (3, 8))

    def draw(n, feature_shift=0.0, stat_shift=0.0):
        labels = rng.integers(0, 3, n)
        features = means[labels] + rng.normal(0, 1, (n, 8)) + feature_shift
        stats = rng.normal(0, 1, (n, 5)) * [1, 2, 0.5, 1, 3] + stat_shift
        return features, labels, stats

    train, labels, train_stats = draw(3000)
    val, _, val_stats = draw(2000)
    ood = UnlikeTraining.fit(train, labels, train_stats, val, val_stats, false_alarm=0.05)
    fresh, _, fresh_stats = draw(20000)
    assert abs(ood.flags(fresh, fresh_stats).mean() - 0.05) < 0.015
    parts = ood.parts(fresh, fresh_stats)
    assert 0.015 < (parts["features"] > 1).mean() < 0.04  # each detector takes a share
    assert 0.015 < (parts["image"] > 1).mean() < 0.04
    moved, _, moved_stats = draw(500, stat_shift=[0, 0, 3, 0, 0])  # a device's fingerprint
    assert ood.flags(moved, moved_stats).mean() > 0.9
    moved, _, moved_stats = draw(500, feature_shift=rng.normal(0, 3, 8))
    assert ood.flags(moved, moved_stats).mean() > 0.9
    broken = fresh_stats[:3].copy()
    broken[0, 1], broken[1, 2], broken[2, 0] = np.nan, np.inf, -np.inf
    assert ood.flags(fresh[:3], broken).all()  # never silently "like the training scans"
    assert np.isinf(ood.score(fresh[:3], broken)).all()
    features = fresh[:2].copy()
    features[0, 0], features[1, 3] = np.nan, 1e308
    assert ood.flags(features, fresh_stats[:2]).all()


def test_statistics_detector_is_scaled_by_the_training_scans_spread():
    rng = np.random.default_rng(3)
    train = rng.normal(0, 1, (500, 3)) * [1, 100, 0.01]
    detector = StatisticsOOD().fit(train)
    np.testing.assert_allclose(detector.scale_, [1.35, 135, 0.0135], rtol=0.2)
    near = detector.score(np.array([[0.0, 50.0, 0.0], [0.0, 0.0, 0.005]]))
    far = detector.score(np.array([[0.0, 0.0, 0.1]]))  # 10 spreads out on a tiny statistic
    assert far[0] > 3 * near.max()


# --------------------------------------------------------------------------------------------
# A checkpoint carrying them


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny trained ViT with prediction sets and the OOD flag fitted on synthetic scans."""
    root = tmp_path_factory.mktemp("uncertainty")
    directory = train_tiny_checkpoint(root / "ckpt", steps=40)
    config = read_config(directory)
    model = Predictor.from_pretrained(directory).model

    def samples(start):
        paths = write_labelled_scans(root / f"scans-{start}", config.class_names, 12, start)
        return [Sample(p, config.class_names.index(p.parent.name), p.stem) for p in paths]

    uncertainty = fit_uncertainty(model, config, samples(0), samples(5000), progress=False)
    save_uncertainty(directory, config, uncertainty)
    return directory, uncertainty


def test_stored_statistics_round_trip_and_are_named_in_config(fitted):
    directory, fitted_now = fitted
    config = read_config(directory)
    ood = config.uncertainty["ood"]
    assert ood["threshold"] == pytest.approx(fitted_now.ood.feature_threshold)
    assert ood["statistics"]["threshold"] == pytest.approx(fitted_now.ood.statistics_threshold)
    assert ood["statistics"]["names"] == list(STAT_NAMES)
    assert config.uncertainty["format_version"] == 3
    assert config.uncertainty["sets"]["calibration_per_class"] == [12, 12]
    assert config.uncertainty["sure"]["probability"] == fitted_now.sure_probability
    loaded = load_uncertainty(directory, config)
    assert loaded.sure_probability == fitted_now.sure_probability
    probs = np.random.default_rng(0).dirichlet([1, 1], 50)
    np.testing.assert_array_equal(
        loaded.sets.predict_sets(probs), fitted_now.sets.predict_sets(probs)
    )
    width = fitted_now.ood.features.class_means_.shape[1]
    features = np.random.default_rng(1).normal(size=(5, width))
    stats = fitted_now.ood.statistics.centre_ + np.random.default_rng(2).normal(size=(5, 19))
    np.testing.assert_allclose(
        loaded.ood.score(features, stats), fitted_now.ood.score(features, stats), rtol=1e-4
    )


def test_predict_and_explain_give_the_set_and_the_flag_of_one_forward(fitted, tmp_path):
    directory, _ = fitted
    predictor = Predictor.from_pretrained(directory)
    scan = oct_like(96, 144, seed=3)
    r = predictor.predict(scan)
    assert r.prediction_set[0] == r.label and set(r.prediction_set) <= set(predictor.class_names)
    assert isinstance(r.out_of_distribution, bool) and r.ood_score > 0 and r.level == 0.9
    assert r.trust in ("sure", "unsure", "unlike_training")
    e = predictor.explain(scan, method="gradcam")
    assert e.prediction.prediction_set == r.prediction_set
    assert e.prediction.ood_score == pytest.approx(r.ood_score, rel=1e-3)
    wide = predictor.predict(scan, level=0.999)  # at a higher level the set can only grow
    assert set(r.prediction_set) <= set(wide.prediction_set)
    record = r.to_dict()
    assert {"prediction_set", "out_of_distribution", "ood_score", "trust"} <= set(record)
    json.dumps(record)
    with pytest.raises(ValueError, match="level"):
        predictor.predict(scan, level=1.2)


def test_a_scan_unlike_the_training_scans_is_flagged(fitted):
    predictor = Predictor.from_pretrained(fitted[0])
    like = predictor.predict(oct_like(96, 144, seed=11))
    rng = np.random.default_rng(0)
    unlike = predictor.predict((rng.random((96, 144)) * 255).astype(np.uint8))  # pure noise
    assert unlike.out_of_distribution and unlike.ood_score > like.ood_score
    assert unlike.trust == "not_a_bscan"  # the gate comes first


def test_a_checkpoint_without_statistics_still_serves(tmp_path):
    directory = train_tiny_checkpoint(tmp_path / "plain", steps=5)
    r = Predictor.from_pretrained(directory).predict(oct_like(96, 144, seed=1))
    assert r.prediction_set is None and r.out_of_distribution is None and r.ood_score is None
    assert r.to_dict()["prediction_set"] is None
    assert r.trust is None  # never "sure" without the statistics


def _copy(directory, tmp_path):
    import shutil

    return shutil.copytree(directory, tmp_path / "copy")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a: a.update(precision=a["precision"][:-1]), "precision"),
        (lambda a: a.update(class_means=np.concatenate([a["class_means"]] * 2)), "class_means"),
        (lambda a: a["calibration_scores"].__setitem__(0, np.nan), "finite"),
        (lambda a: a["calibration_labels"].__setitem__(0, 7), "class indices"),
        (lambda a: a.pop("precision"), "exactly"),
        (lambda a: a["stat_reference"].__setitem__((0, 3), np.nan), "finite"),
        (lambda a: a["stat_centre"].__setitem__(2, np.inf), "finite"),
        (lambda a: a["stat_scale"].__setitem__(1, -1.0), "positive"),
        (lambda a: a.update(stat_reference=a["stat_reference"][:, :5]), "stat_reference"),
        (lambda a: a.update(stat_reference=a["stat_reference"][:4]), "fewer reference"),
        (lambda a: a.pop("stat_scale"), "exactly"),
    ],
)
def test_damaged_statistics_are_one_line_errors(fitted, tmp_path, damage, message):
    directory = _copy(fitted[0], tmp_path)
    arrays = load_file(str(directory / UNCERTAINTY_NAME))
    damage(arrays)
    save_file(arrays, str(directory / UNCERTAINTY_NAME))
    with pytest.raises(CheckpointError, match=message) as err:
        Predictor.from_pretrained(directory)
    assert "\n" not in str(err.value)


def test_unreadable_statistics_are_an_error_and_a_missing_file_serves_without(
    fitted, tmp_path, caplog
):
    directory = _copy(fitted[0], tmp_path)
    (directory / UNCERTAINTY_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        Predictor.from_pretrained(directory)
    (directory / UNCERTAINTY_NAME).unlink()  # e.g. copied without it
    assert Predictor.from_pretrained(directory).uncertainty is None
    assert "missing" in caplog.text


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda u: u["ood"]["statistics"].update(threshold=float("nan")), "threshold"),
        (lambda u: u["ood"]["statistics"].update(threshold=-1.0), "threshold"),
        (lambda u: u["ood"]["statistics"].update(neighbours=10**6), "threshold"),
        (lambda u: u["ood"]["statistics"].update(names=["aspect"]), "not this app's"),
        (lambda u: u["ood"].pop("statistics"), "must hold exactly"),
        (lambda u: u.pop("sure"), "unusable"),
        (lambda u: u["sure"].update(probability=float("nan")), "bar for 'sure'"),
        (lambda u: u["sure"].update(probability=1.5), "bar for 'sure'"),
        (lambda u: u["sure"].update(probability="high"), "unusable"),
        (lambda u: u.update(format_version=9), "format 9"),
    ],
)
def test_a_damaged_summary_is_a_one_line_error(fitted, tmp_path, damage, message):
    directory = _copy(fitted[0], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    damage(config["uncertainty"])
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as err:
        Predictor.from_pretrained(directory)
    assert "\n" not in str(err.value)


def test_the_bar_for_sure_is_the_lowest_probability_that_keeps_the_precision():
    probs, labels = simulated(3000, [0.4, 0.3, 0.2, 0.1], seed=0)
    candidates = np.random.default_rng(1).random(3000) < 0.8  # e.g. sets of one class
    bar = sure_bar(probs, labels, candidates, precision=0.95)
    top, right = probs.max(axis=1), probs.argmax(axis=1) == labels

    def precision_at(p: float) -> float:
        chosen = candidates & (top >= p)
        return right[chosen].mean()

    higher = np.sort(top[candidates & (top >= bar)])
    assert all(precision_at(p) >= 0.95 for p in higher[:-20])  # from the bar up (20 = 1/5%)
    lower = top[candidates & (top < bar)].max()  # the next candidate down
    assert precision_at(lower) < 0.95
    # on answers it was not fitted on, the precision holds (~600 chosen: within 2 errors)
    fresh, fresh_labels = simulated(20000, [0.4, 0.3, 0.2, 0.1], seed=2)
    chosen = fresh.max(axis=1) >= bar
    assert (fresh.argmax(axis=1) == fresh_labels)[chosen].mean() == pytest.approx(0.95, abs=0.02)


def test_no_bar_reaches_an_impossible_precision_so_nothing_is_sure():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    labels = np.array([1, 1, 0])  # right only from 0.7 on: 1 in 3
    assert sure_bar(probs, labels, np.ones(3, bool), precision=0.5) == NEVER_SURE > 1.0
    assert sure_bar(probs, labels, np.zeros(3, bool)) == NEVER_SURE  # no candidates
    # equal probabilities pass or fail together: at 0.8, 2 of 3 right < 0.75
    tied = np.array([[0.95, 0.05], [0.9, 0.1], [0.8, 0.2], [0.8, 0.2]])
    assert sure_bar(tied, np.array([0, 0, 0, 1]), np.ones(4, bool), precision=0.8) == 0.9
    # a mistake among the first few answers (fewer than 1 / (1 - precision)) is not judged
    early = np.array([[0.99, 0.01], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    assert sure_bar(early, np.array([1, 0, 0, 0]), np.ones(4, bool), precision=0.75) == 0.7


def test_a_set_of_one_class_below_the_bar_is_unsure(fitted):
    predictor = Predictor.from_pretrained(fitted[0], level=0.5)
    answers = [predictor.predict(oct_like(96, 144, seed=seed)) for seed in range(12)]
    liked = [r for r in answers if not r.out_of_distribution and len(r.prediction_set) == 1]
    assert liked, "no synthetic scan like the training scans with a set of one class"
    r = liked[0]
    for bar, verdict in ((r.confidence, "sure"), (r.confidence + 1e-6, "unsure")):
        predictor.uncertainty.sure_probability = bar
        again = predictor.predict(oct_like(96, 144, seed=answers.index(r)))
        assert again.trust == verdict and again.sure_probability == bar
        assert again.prediction_set == r.prediction_set


def test_a_checkpoint_fitted_before_the_bar_for_sure_loads_without_one(fitted, tmp_path):
    """Format 2: a set of one class is enough for sure, as it was."""
    directory = _copy(fitted[0], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["uncertainty"]["format_version"] = 2
    config["uncertainty"].pop("sure")
    (directory / "config.json").write_text(json.dumps(config))
    predictor = Predictor.from_pretrained(directory)
    assert predictor.uncertainty.sure_probability == 0.0
    assert predictor.predict(oct_like(96, 144, seed=3)).sure_probability == 0.0


def test_a_checkpoint_fitted_before_image_statistics_still_loads_and_flags(fitted, tmp_path):
    """Format 1 (features alone): the statistics arrays and summary absent."""
    directory = _copy(fitted[0], tmp_path)
    arrays = load_file(str(directory / UNCERTAINTY_NAME))
    for key in ("stat_centre", "stat_scale", "stat_reference"):
        arrays.pop(key)
    save_file(arrays, str(directory / UNCERTAINTY_NAME))
    config = json.loads((directory / "config.json").read_text())
    config["uncertainty"]["format_version"] = 1
    config["uncertainty"]["ood"].pop("statistics")
    config["uncertainty"].pop("sure")
    (directory / "config.json").write_text(json.dumps(config))
    predictor = Predictor.from_pretrained(directory)
    assert predictor.uncertainty.ood.statistics is None
    r = predictor.predict(oct_like(96, 144, seed=3))
    assert isinstance(r.out_of_distribution, bool) and r.trust in (
        "sure",
        "unsure",
        "unlike_training",
    )
    noise = (np.random.default_rng(0).random((96, 144)) * 255).astype(np.uint8)
    assert predictor.predict(noise).trust == "not_a_bscan"


def test_statistics_for_another_model_width_are_refused(fitted, tmp_path):
    directory = _copy(fitted[0], tmp_path)
    arrays = load_file(str(directory / UNCERTAINTY_NAME))
    arrays["class_means"] = np.zeros((2, 8), np.float32)
    arrays["precision"] = np.eye(8, dtype=np.float32)
    save_file(arrays, str(directory / UNCERTAINTY_NAME))
    with pytest.raises(CheckpointError, match="8 features"):
        Predictor.from_pretrained(directory)


def test_the_statistics_are_never_unpickled(fitted, tmp_path, monkeypatch):
    directory = _copy(fitted[0], tmp_path)
    import pickle

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    assert Predictor.from_pretrained(directory).uncertainty is not None


# --------------------------------------------------------------------------------------------
# Where the answer is shown: the app's handlers, the Model tab, the command line


def test_every_view_of_an_answer_shows_the_set_and_the_flag(fitted, tmp_path):
    from mirage_demo.ui import ModelChoice, ModelRegistry
    from mirage_demo.ui.batch import classify_batch
    from mirage_demo.ui.classify import explain_scan, predict_record, predict_scan

    registry = ModelRegistry([ModelChoice("fitted", str(fitted[0]))])
    path = tmp_path / "scan.png"
    Image.fromarray(oct_like(96, 144, seed=4)).save(path)
    _, info = predict_scan(registry, str(path), "fitted", 0.8)
    assert "80% set is {" in info and "the same kind of data" in info
    record = predict_record(registry, str(path), "fitted", 0.8)
    shown = "{" + ", ".join(record["prediction_set"]) + "}"
    assert shown in info
    assert record["level"] == 0.8 and record["prediction_set"][0] == record["label"]
    assert isinstance(record["out_of_distribution"], bool) and record["trust"] is not None
    _, _, explained, _ = explain_scan(registry, str(path), "fitted", "gradcam", level=0.8)
    assert shown in explained
    rows, csv_path, _ = classify_batch(registry, [str(path)], "fitted")
    assert rows[0][4] == ", ".join(predict_record(registry, str(path), "fitted")["prediction_set"])
    assert rows[0][5] in ("no", "yes")
    assert rows[0][6] in ("sure", "unsure", "unlike the training scans")
    header = Path(csv_path).read_text().splitlines()[0]
    assert "prediction_set" in header and "trust" in header


def test_the_app_refuses_a_level_out_of_range(fitted, tmp_path):
    import gradio as gr

    from mirage_demo.ui import ModelChoice, ModelRegistry
    from mirage_demo.ui.classify import predict_scan

    registry = ModelRegistry([ModelChoice("fitted", str(fitted[0]))])
    path = tmp_path / "scan.png"
    Image.fromarray(oct_like(96, 144, seed=4)).save(path)
    for bad in (1.5, "x", None, 0.2):
        with pytest.raises(gr.Error, match="level"):
            predict_scan(registry, str(path), "fitted", bad)


def test_the_model_tab_shows_coverage_per_class_or_says_it_has_none():
    from mirage_demo.ui.report import metrics_markdown

    found = {
        "level": 0.9,
        "images": 20,
        "accuracy": 0.8,
        "coverage": 0.9,
        "mean_set_size": 1.3,
        "flagged": 0.05,
        "mistakes": 4,
        "mistakes_warned": 0.75,
        "pooled_classes": ["LESION"],
        "ood_false_alarm_target": 0.05,
        "per_class": {
            "NORMAL": {"images": 15, "coverage": 0.93, "mean_set_size": 1.2, "flagged": 0.0},
            "LESION": {"images": 5, "coverage": 0.8, "mean_set_size": 1.6, "flagged": 0.2},
        },
    }
    shown = metrics_markdown({"split": "test", "uncertainty": found})
    assert "| LESION | 5 | 80.0% | 1.60 | 20.0% |" in shown
    assert "held the true class for **90.0%**" in shown and "pooled" in shown
    assert "the same kind of data" in shown
    assert "Not available for this model" in metrics_markdown({"split": "test"})


def test_command_line_json_and_csv_carry_the_set_and_the_flag(fitted, tmp_path, capsys):
    from mirage_demo.predict import main

    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(oct_like(96, 144, seed=20 + i)).save(folder / f"s{i}.png")
    code = main(
        [
            "--checkpoint",
            str(fitted[0]),
            "--json",
            "--level",
            "0.95",
            "--out",
            str(tmp_path),
            str(folder),
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(isinstance(line["prediction_set"], list) and line["level"] == 0.95 for line in lines)
    assert all(isinstance(line["out_of_distribution"], bool) for line in lines)
    assert all(line["trust"] in ("sure", "unsure", "unlike_training") for line in lines)
    import csv

    with open(tmp_path / "scans-predictions.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["prediction_set"] for r in rows] == ["|".join(x["prediction_set"]) for x in lines]
    assert {r["out_of_distribution"] for r in rows} <= {"0", "1"}
    assert [r["trust"] for r in rows] == [x["trust"] for x in lines]
    assert main(["--checkpoint", str(fitted[0]), "--level", "1.5", str(folder)]) == 2
