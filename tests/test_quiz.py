"""Test yourself: rounds without repeats, scores, mistakes per class."""

import pytest

from mirage_demo.quiz import Quiz, QuizItem

CLASSES = ["A", "B", "C"]


def items(n=9):
    # reference cycles A, B, C; the model answers "A" every time
    return [QuizItem(f"scan{i}", f"scan{i}.jpg", CLASSES[i % 3], "A") for i in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_a_round_never_repeats_a_scan(seed):
    quiz = Quiz(items() + items(), size=9, class_names=CLASSES, seed=seed)  # duplicates too
    shown = []
    while not quiz.finished:
        shown.append(quiz.current.key)
        quiz.answer("B")
    assert len(shown) == 9 == len(set(shown))
    assert quiz.current is None


def test_a_round_is_capped_by_the_scans_available():
    quiz = Quiz(items(4), size=10, class_names=CLASSES, seed=0)
    assert quiz.size == 4


def test_scores_and_mistakes_per_class():
    quiz = Quiz(items(6), size=6, class_names=CLASSES, seed=1)
    truth = {item.key: item.reference for item in quiz.round}
    wrong_keys = set()
    for n, item in enumerate(list(quiz.round)):
        if n < 2:  # the student errs on the first two scans, answering "C" (or "B" for a C)
            choice = "B" if item.reference == "C" else "C"
            wrong_keys.add(item.key)
        else:
            choice = item.reference
        turn = quiz.answer(choice)
        assert turn.correct == (item.key not in wrong_keys)
        assert turn.model_correct == (item.reference == "A")
    summary = quiz.summary()
    assert summary["student"] == 4 and summary["model"] == 2  # two A scans among six
    assert summary["answered"] == summary["size"] == 6
    expected = {}
    for key in wrong_keys:
        row = expected.setdefault(truth[key], {})
        choice = "B" if truth[key] == "C" else "C"
        row[choice] = row.get(choice, 0) + 1
    assert summary["student_mistakes"] == expected
    assert summary["model_mistakes"] == {"B": {"A": 2}, "C": {"A": 2}}
    assert summary["seen_per_class"] == {"A": 2, "B": 2, "C": 2}


def test_wrong_use_is_refused():
    quiz = Quiz(items(1), size=1, class_names=CLASSES, seed=0)
    with pytest.raises(ValueError, match="unknown class"):
        quiz.answer("Z")
    quiz.answer("A")
    with pytest.raises(ValueError, match="round is over"):
        quiz.answer("A")
    with pytest.raises(ValueError, match="no labelled scans"):
        Quiz([], size=3)
    with pytest.raises(ValueError, match="at least one"):
        Quiz(items(), size=0)


def test_rare_classes_get_their_turn():
    common = [QuizItem(f"a{i}", "x", "A", "A") for i in range(50)]
    rare = [QuizItem("b", "x", "B", "A"), QuizItem("c", "x", "C", "A")]
    for seed in range(5):
        quiz = Quiz(common + rare, size=4, class_names=CLASSES, seed=seed)
        assert sorted(item.reference for item in quiz.round) == ["A", "A", "B", "C"]
