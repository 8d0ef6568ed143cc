"""The Compare grid's table and text: verdicts that cannot contradict each other."""

import itertools
from dataclasses import replace

import pytest

from mirage_demo.faithfulness import RoadScore
from mirage_demo.inference import Predictor
from mirage_demo.trust import compare_methods
from mirage_demo.ui.compare import (
    CHANCE_MARGIN,
    COMPARE_HEADERS,
    FAITHFULNESS_VERDICTS,
    SANITY_VERDICTS,
    _explanation,
    table_rows,
)
from tests.synthetic_oct import lesion_scan, tiny_cnn_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

#: What each verdict claims, one phrase per claim; a row must make exactly one of each kind.
SCORE_CLAIMS = {
    "higher": "points at what the model uses",
    "chance": "no better than a random map",
    "lower": "points away from what the model uses",
}
LEARNING_CLAIMS = {
    "changes": "depends on what the model learnt",
    "partly": "depends partly on what the model learnt",
    "barely": "mostly shows the scan's structure",
}
#: Words of the old wording, which judged a map twice over ("points at what the model uses"
#: beside "fails the sanity check").
JUDGEMENTS = ("fail", "pass", "trust", "wrong", "good", "bad")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    directory = tiny_cnn_checkpoint(tmp_path_factory.mktemp("cnn"), ["A", "B", "C"])
    predictor = Predictor.from_pretrained(directory)
    return predictor, compare_methods(predictor, lesion_scan(1, seed=3)[0])


def road(faithfulness: float) -> RoadScore:
    return RoadScore(morf=-faithfulness, lerf=faithfulness, morf_curve=(), lerf_curve=())


def test_verdicts_speak_of_different_things():
    """Faithfulness speaks only of what removing pixels does to the score, the sanity check
    only of the randomised model: neither can deny what the other says."""
    for verdict in FAITHFULNESS_VERDICTS.values():
        assert "removing" in verdict
        assert not any(w in verdict for w in ("randomised", "learnt", "structure"))
    for verdict in SANITY_VERDICTS.values():
        assert "randomised" in verdict
        assert not any(w in verdict for w in ("removing", "score", "uses", "random map"))


@pytest.mark.parametrize(
    ("faithfulness", "similarity", "same_as"),
    itertools.product(
        [1.0, CHANCE_MARGIN + 0.01, 0.0, -CHANCE_MARGIN - 0.01, -1.0],
        [0.05, 0.29, 0.31, 0.69, 0.71, 0.99],
        [None, "gradcam"],
    ),
)
def test_every_combination_of_verdicts_reads_without_contradiction(
    comparison, faithfulness, similarity, same_as
):
    predictor, compared = comparison
    score = replace(
        compared.score("hirescam"), road=road(faithfulness), similarity=similarity, same_as=same_as
    )
    shown = replace(compared, scores=[score])
    row = table_rows(shown)[0]
    assert len(row) == len(COMPARE_HEADERS)
    text = " ".join(str(cell) for cell in row)
    level = "higher" if faithfulness > CHANCE_MARGIN else "chance"
    level = "lower" if faithfulness < -CHANCE_MARGIN else level
    claims = [k for k, phrase in SCORE_CLAIMS.items() if phrase in text]
    assert claims == [level], text
    sanity = "barely" if similarity >= 0.7 else "partly" if similarity >= 0.3 else "changes"
    claims = [k for k, phrase in LEARNING_CLAIMS.items() if phrase in text]
    assert claims == [sanity], text
    assert not any(word in text.lower() for word in JUDGEMENTS), text
    assert row[-1] == ("Grad-CAM" if same_as else "")
    explanation = _explanation(shown, predictor).lower()
    assert not any(word in explanation for word in JUDGEMENTS), explanation


def test_identical_maps_are_grouped_with_the_reason(comparison):
    predictor, compared = comparison
    scores = [
        replace(s, same_as="gradcam" if s.method == "hirescam" else None) for s in compared.scores
    ]
    text = _explanation(replace(compared, scores=scores), predictor)
    assert "Grad-CAM and HiResCAM draw the same map" in text
    assert "global average pooling" in text  # the tiny CNN is a ResNet
    rows = table_rows(replace(compared, scores=scores))
    assert rows[-1][0] == "A random map (chance level)"
    assert rows[-1][1] == round(compared.random_reference.faithfulness, 2)
