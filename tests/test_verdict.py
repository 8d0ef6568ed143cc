"""One verdict for every answer: the decision, and every view that shows an answer (Classify,
``/predict``, Batch and its CSV, the quiz, the explorer, Evaluate's headline) calls it sure
only when the verdict is ``"sure"``; the quality gate on images that are not B-scans and on
the bundled real scans."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mirage_demo.inference import Explanation, Prediction
from mirage_demo.quality import QualityReport, assess_image
from mirage_demo.quiz import Quiz, QuizItem
from mirage_demo.reports import ReportError, check_report
from mirage_demo.testscans import ScanEntry
from mirage_demo.ui.answer import answer_card, answer_label, verdict_cells
from mirage_demo.ui.batch import classify_batch
from mirage_demo.ui.classify import explain_scan, predict_scan
from mirage_demo.ui.explore import ExplorerState, explorer_open
from mirage_demo.ui.quiz import quiz_answer
from mirage_demo.ui.report import sure_bar_line, trust_headline, uncertainty_markdown
from mirage_demo.uncertainty import NEVER_SURE
from mirage_demo.verdict import VERDICTS, decide, verdict_report, verdict_words
from tests.non_bscans import non_bscans

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
SURE_WORD = re.compile(r"\bsure\b", re.IGNORECASE)  # not "unsure"


def test_the_verdict_is_decided_in_order():
    assert decide(False, True, 3) == "not_a_bscan"  # the gate first
    assert decide(False, None, None) == "not_a_bscan"  # even without statistics
    assert decide(True, True, 1) == "unlike_training"  # then the flag
    assert decide(True, False, 2) == "unsure"
    assert decide(True, False, 1) == "sure"
    assert decide(True, False, 1, probable_enough=False) == "unsure"  # below the bar
    assert decide(True, True, 1, probable_enough=False) == "unlike_training"
    assert decide(True, None, None) is None  # no statistics: never sure
    assert [verdict_words(v) for v in VERDICTS] == [
        "not an OCT B-scan",
        "unlike the training scans",
        "unsure",
        "sure",
    ]
    with pytest.raises(ValueError, match="unknown verdict"):
        verdict_words("certain")


def test_verdict_report_gives_shares_and_accuracy_within_each():
    verdicts = ["sure", "sure", "sure", "unsure", "unlike_training", "not_a_bscan"]
    correct = [True, True, False, False, True, False]
    report = verdict_report(verdicts, correct)
    assert report["sure"] == {"images": 3, "share": 0.5, "accuracy": pytest.approx(2 / 3)}
    assert report["unsure"]["accuracy"] == 0.0 and report["unlike_training"]["share"] == 1 / 6
    assert report["sure_and_wrong"] == pytest.approx(1 / 6)
    assert "not_available" not in report
    assert verdict_report([None, "sure"], [True, True])["not_available"]["images"] == 1


# --------------------------------------------------------------------------------------------
# Every view, for every verdict


def _answer(verdict: str | None, sure_probability: float = 0.55) -> Prediction:
    """A DRUSEN answer (60%) with the given verdict, as the Predictor would give it (the bar
    for sure at ``sure_probability``; an unsure answer above 0.6 has a set of one class)."""
    warnings = (
        ("it is in colour, and OCT B-scans are grayscale",) if verdict == "not_a_bscan" else ()
    )
    quality = QualityReport(0.9, 40.0 if warnings else 0.0, 0.9, 0.7, 1.25, warnings)
    below_bar = verdict == "unsure" and sure_probability > 0.6
    sets = {"sure": ["DRUSEN"], "unsure": ["DRUSEN"] if below_bar else ["DRUSEN", "CNV"]}
    sets["unlike_training"] = ["DRUSEN"]
    probabilities = {"CNV": 0.3, "DME": 0.05, "DRUSEN": 0.6, "NORMAL": 0.05}
    return Prediction(
        label="DRUSEN",
        index=2,
        probabilities=probabilities,
        logits=[0.0, 0.0, 1.0, 0.0],
        warnings=list(warnings),
        quality=quality,
        image_size=(96, 144),
        timing={"model_s": 0.01, "total_s": 0.02},
        source="scan.png",
        prediction_set=None if verdict is None else sets.get(verdict, ["DRUSEN", "CNV"]),
        level=None if verdict is None else 0.9,
        ood_score=None if verdict is None else (1.7 if verdict == "unlike_training" else 0.4),
        out_of_distribution=None if verdict is None else verdict == "unlike_training",
        sure_probability=None if verdict is None else sure_probability,
        trust=verdict,
    )


class FakePredictor:
    """Answers every scan with one fixed answer (the views' code runs unchanged)."""

    def __init__(self, prediction: Prediction) -> None:
        self.prediction = prediction
        self.class_names = CLASSES
        self.methods = ("gradcam",)
        self.colormap = "jet"
        self.device = "cpu"

    def predict(self, image, *, name=None, level=None):
        return self.prediction

    def predict_batch(self, images, batch_size=8, *, names=None, on_error="raise", **_):
        return [self.prediction for _ in images]

    def explain(self, image, method="gradcam", target=None, **_):
        scan = np.zeros((96, 144), np.float32)
        return Explanation(
            prediction=self.prediction,
            method=method,
            target=self.prediction.label,
            target_index=self.prediction.index,
            heatmap=scan,
            overlay=Image.new("RGB", (144, 96)),
            class_specific=True,
            image=scan,
        )


def _registry(prediction: Prediction) -> SimpleNamespace:
    return SimpleNamespace(get=lambda name=None: FakePredictor(prediction))


def _views(verdict: str | None, tmp_path: Path, sure_probability: float = 0.55) -> dict[str, str]:
    """Every text a student reads about this answer, by view."""
    prediction = _answer(verdict, sure_probability)
    registry = _registry(prediction)
    scan = tmp_path / "scan.png"
    Image.new("L", (144, 96)).save(scan)
    texts = {
        "card": answer_card(prediction),
        "card with a reference": answer_card(prediction, reference="CNV", class_names=CLASSES),
        "Classify /predict": predict_scan(registry, str(scan))[1],
        "Classify /explain": explain_scan(registry, str(scan))[2],
    }
    rows, csv_path, summary = classify_batch(registry, [str(scan)])
    texts["Batch row"] = " | ".join(str(cell) for cell in rows[0])
    texts["Batch summary"] = summary
    with open(csv_path, newline="") as stream:
        texts["Batch CSV"] = " | ".join(next(iter(csv.DictReader(stream))).values())
    quiz = Quiz([QuizItem("a", str(scan), "CNV", "DRUSEN", prediction.probabilities)], 1)
    texts["quiz feedback"] = quiz_answer(FakePredictor(prediction), quiz, "CNV")[1]
    entry = ScanEntry("a.png", scan, "CNV", "DRUSEN", prediction.probabilities)
    state = ExplorerState(CLASSES, [[0] * 4] * 4, None, ("CNV", "DRUSEN"), [entry])
    texts["explorer"] = explorer_open(FakePredictor(prediction), state, 0)[1]
    return texts


@pytest.mark.parametrize("verdict", [*VERDICTS, None])
def test_no_view_calls_an_answer_sure_unless_its_verdict_is_sure(verdict, tmp_path):
    for view, text in _views(verdict, tmp_path).items():
        if view == "Batch summary":  # counts by verdict: "sure: 1" names the verdict's count
            assert (SURE_WORD.search(text) is not None) == (verdict == "sure"), text
            continue
        said = SURE_WORD.search(text.replace("sure_", ""))
        assert (said is not None) == (verdict == "sure"), f"{view}: {text}"


def test_an_answer_of_one_class_below_the_bar_is_unsure_in_every_view(tmp_path):
    """A set of one class whose probability is under the checkpoint's bar: no view says sure,
    and the card says why, with both figures told apart (60% vs 61%, 59.6% vs 60.0%)."""
    for view, text in _views("unsure", tmp_path, sure_probability=0.61).items():
        if view != "Batch summary":
            assert SURE_WORD.search(text.replace("sure_", "")) is None, f"{view}: {text}"
    card = answer_card(_answer("unsure", sure_probability=0.61))
    assert "{DRUSEN} alone" in card and "probability (60%) is below the model's bar (61%)" in card
    close = _answer("unsure", sure_probability=0.6004)
    close.probabilities["DRUSEN"] = 0.5996
    assert "(60.0%) is below the model's bar (60.0%)" not in answer_card(close)
    assert "(59.96%) is below the model's bar (60.04%)" in answer_card(close)


def test_the_model_tab_states_the_bar_for_sure():
    metrics = json.loads((ROOT / "assets/demo-model/metrics.json").read_text())
    bar = metrics["uncertainty"]["sure_probability"]
    assert 0.5 < bar < 1
    assert f"at least **{bar:.1%}**" in uncertainty_markdown(metrics)
    assert "never calls an answer sure" in sure_bar_line(NEVER_SURE)
    metrics["uncertainty"]["sure_probability"] = "high"  # untrusted: a one-line error
    with pytest.raises(ReportError, match="sure_probability must be a number"):
        check_report(metrics, CLASSES)


def test_each_verdict_is_worded_for_a_student(tmp_path):
    unlike = answer_card(_answer("unlike_training"))
    assert unlike.startswith("**Warning: this scan is unlike the scans")  # the warning first
    assert "promises nothing" in unlike
    unsure = answer_card(_answer("unsure"))
    assert "**unsure**" in unsure and "{DRUSEN, CNV}" in unsure
    sure = answer_card(_answer("sure"))
    assert "**sure** at the 90% level" in sure and "{DRUSEN} alone" in sure
    none = answer_card(_answer(None))
    assert "cannot be told for this checkpoint" in none


def test_not_a_bscan_has_no_class_headline_and_hides_the_probabilities(tmp_path):
    prediction = _answer("not_a_bscan")
    assert answer_label(prediction) == "Not an OCT B-scan"
    card = answer_card(prediction)
    headline = card.split("<details>")[0]
    assert "in colour" in headline and "DRUSEN" not in headline
    assert "<details><summary>" in card and "| DRUSEN | 60% |" in card.split("<details>")[1]
    assert answer_label(_answer("sure")) == prediction.probabilities
    rows, _, _ = classify_batch(_registry(prediction), [str(tmp_path / "x.png")])
    assert rows[0][1] == "(not an OCT B-scan)" and rows[0][-2] == "not an OCT B-scan"
    assert verdict_cells(_answer(None)) == ["n/a", "n/a", "not available"]


def test_evaluate_headline_gives_each_verdict_and_warns_when_far_below():
    verdicts = verdict_report(
        ["sure"] * 6 + ["unsure"] * 2 + ["unlike_training"] * 2, [True] * 6 + [False] * 4
    )
    uploaded = {
        "split": "uploaded",
        "overall": {"balanced_accuracy": {"value": 0.55, "ci95": [0.45, 0.65]}},
        "uncertainty": {"level": 0.9, "verdicts": verdicts},
    }
    own = {"split": "test", "overall": {"balanced_accuracy": {"value": 0.89, "ci95": [0.86, 0.92]}}}
    text = trust_headline(uploaded, own)
    assert (
        "| **sure**: a B-scan like the training scans, one class, probable enough | 6 | 60.0% "
        "| 100.0% |" in text
    )
    assert (
        "| **unlike the training scans**: another device or acquisition? | 2 | 20.0% | 0.0% |"
        in text
    )
    assert "far below the model's own test figures" in text and "55% against 89%" in text
    close = {**uploaded, "overall": {"balanced_accuracy": {"value": 0.85, "ci95": [0.8, 0.9]}}}
    assert "far below" not in trust_headline(close, own)
    assert "cannot be told" in trust_headline({"overall": {}}, own)


# --------------------------------------------------------------------------------------------
# The quality gate

REJECTED = {  # the image, and what the gate says about it
    "fundus photograph (colour)": "in colour",
    "fundus photograph (red-free, grayscale)": "no retinal layers",
    "SLO en-face image (infrared, grayscale)": "no dark background",
    "retinal thickness map (colour)": "in colour",
    "noise (uniform, grayscale)": "noise",
    "noise (Gaussian, grayscale)": "noise",
    "noise (colour)": "in colour",
    "noise (salt and pepper)": "noise",
    "blank (black)": "blank",
    "blank (mid grey)": "blank",
    "blank (white)": "blank",
    "blank (grey, faint noise)": "blank",
    "photograph (colour)": "in colour",
    "screenshot (document)": "no dark background",
    "tiny image (24x32)": "too small",
    "checkerboard": "nothing in it runs across the image",
}


def test_the_gate_rejects_images_that_are_not_bscans_and_says_why():
    images = non_bscans()
    for name, reason in REJECTED.items():
        report = assess_image(images[name])
        assert not report.looks_like_oct and reason in report.warnings[0], (name, report)
    let_through = sorted(set(images) - set(REJECTED))  # for the unlike-the-training check
    assert len(let_through) == 3, let_through


def test_layers_that_run_across_the_scan_pass_even_bent_or_from_another_device():
    """The continuity test follows a layer up or down: a bundled scan bent by a parabola
    (as a myopic eye or another device shows it), or narrowed to 60% of its field."""
    scan = np.asarray(Image.open(ROOT / "assets/examples/NORMAL/NORMAL-1384-3.jpeg").convert("L"))
    height, width = scan.shape
    rows = (np.arange(height)[:, None] + 0.15 * height * np.linspace(-1, 1, width) ** 2).astype(int)
    bent = np.take_along_axis(scan, np.clip(rows, 0, height - 1), axis=0)
    narrow = np.asarray(Image.fromarray(scan[:, : int(0.6 * width)]).resize((width, height)))
    for image in (scan, bent, narrow):
        report = assess_image(image)
        assert report.looks_like_oct and report.continuity > 0.8, report
    blobs = ndimage.gaussian_filter(np.random.default_rng(0).random((height, width)), 8)
    blobs = (blobs - blobs.min()) / (blobs.max() - blobs.min()) * 255  # shapes, no layers
    assert assess_image(blobs.astype(np.uint8)).continuity < 0.3


@pytest.mark.slow  # reads the 462 bundled real scans (~20 s)
def test_the_gate_passes_every_bundled_real_scan():
    folders = [ROOT / "assets" / "examples", ROOT / "assets" / "test-scans" / "images"]
    scans = [p for folder in folders for p in folder.rglob("*.jp*g")]
    assert len(scans) >= 460
    rejected = [p.name for p in scans if not assess_image(p).looks_like_oct]
    assert rejected == []


# --------------------------------------------------------------------------------------------
# Learn's examples


def test_learn_shows_one_real_example_of_each_verdict_and_each_still_gets_it():
    from mirage_demo.inference import Predictor
    from mirage_demo.ui.learn import VERDICT_EXAMPLES, verdict_example
    from mirage_demo.ui.registry import ASSETS

    assert sorted(v for v, _, _ in VERDICT_EXAMPLES) == sorted(VERDICTS)
    predictor = Predictor.from_pretrained()  # the bundled ResNet-18
    for verdict, path, caption in VERDICT_EXAMPLES:
        shown = verdict_example(verdict, ASSETS / path)
        source = shown if isinstance(shown, Image.Image) else Path(shown)
        assert predictor.predict(source).trust == verdict, (path, caption)


def test_the_slide_figure_gives_no_class_headline_for_what_is_not_a_bscan():
    from mirage_demo.ui.slides import figure_caption

    about = {
        "scan": "photo.png",
        "method": "Grad-CAM",
        "target": None,
        "label": "CNV",
        "confidence": 0.66,
        "trust": "not_a_bscan",
        "verdict": "not an OCT B-scan",
        "set": ["CNV"],
        "level": 0.9,
    }
    title, lines = figure_caption({"about": about}, "demo")
    assert "CNV" not in title and "Not an OCT B-scan" in title
    assert "Verdict: not an OCT B-scan" in lines[-1] and "sure" not in lines[-1]
    title, _ = figure_caption({"about": {**about, "trust": "sure", "verdict": "sure"}}, "demo")
    assert title == "The model says CNV (66%)"
