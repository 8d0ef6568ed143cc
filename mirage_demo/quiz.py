"""Test yourself: a round of labelled scans, the student's answers against the model's.

A :class:`Quiz` is pure state (no I/O, no model): it draws ``size`` different scans for a round,
records the student's answer to each, and keeps both scores and the mistakes per class. The
model's answer comes with each :class:`QuizItem` (e.g. the bundled test scans' predictions).
Nothing about the student outlives the object: the app keeps one per browser session.

>>> quiz = Quiz(items, size=10, seed=7)
>>> item = quiz.current           # show item.image; ask for a class
>>> turn = quiz.answer("DME")     # turn.correct, turn.model_correct, turn.item.reference
>>> quiz.finished, quiz.summary()

A lesson gives every student the same scans in the same order (:meth:`Quiz.fixed`); an item
may leave the model's answer to be found when it is answered (``model_answer=None``: the app
asks the model then). :func:`write_answers_csv` writes a student's answers for the teacher.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirage_demo.predictions_csv import csv_text

__all__ = ["ANSWERS_HEADER", "Quiz", "QuizItem", "Turn", "write_answers_csv"]


@dataclass(frozen=True)
class QuizItem:
    """One labelled scan: where it is, its reference class and the model's answer."""

    key: str  # unique within a quiz (e.g. the scan's file name)
    image: str
    reference: str
    model_answer: str | None = None  # None: asked of the model when the scan is answered
    probabilities: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Turn:
    """One answered scan."""

    item: QuizItem
    answer: str
    model_answer: str = ""  # the item's, or the one found when the scan was answered
    model_verdict: str = ""  # how sure the model was ("sure", "unsure", ...), if known

    @property
    def correct(self) -> bool:
        return self.answer == self.item.reference

    @property
    def model_correct(self) -> bool:
        return self.model_answer == self.item.reference


class Quiz:
    """A round of ``size`` scans drawn without repeats from ``items`` (all if fewer), the
    reference classes as evenly as the scans allow."""

    def __init__(
        self,
        items: Sequence[QuizItem],
        size: int = 10,
        *,
        class_names: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a round needs at least one scan, got size={size}")
        unique = {item.key: item for item in items}
        if not unique:
            raise ValueError("no labelled scans to quiz on")
        self.class_names = list(class_names or sorted({i.reference for i in unique.values()}))
        self.rng = random.Random(seed)
        self.round: list[QuizItem] = self._draw(list(unique.values()), size)
        self.turns: list[Turn] = []
        self.title = ""  # a lesson's title, if the round is one

    @classmethod
    def fixed(cls, items: Sequence[QuizItem], class_names: Sequence[str], title: str = "") -> Quiz:
        """A round of exactly ``items``, in their order (a lesson: every student the same)."""
        keys = [item.key for item in items]
        if len(set(keys)) != len(keys):
            raise ValueError("a lesson lists a scan twice")
        quiz = cls(items, size=max(1, len(items)), class_names=class_names, seed=0)
        quiz.round = list(items)
        quiz.title = title
        return quiz

    def _draw(self, items: list[QuizItem], size: int) -> list[QuizItem]:
        """``size`` different items, the classes taking turns (so a rare class is seen even
        when most scans are of two classes), in random order."""
        by_class: dict[str, list[QuizItem]] = {}
        for item in self.rng.sample(items, len(items)):
            by_class.setdefault(item.reference, []).append(item)
        order = self.rng.sample(sorted(by_class), len(by_class))
        drawn: list[QuizItem] = []
        while len(drawn) < size and any(by_class.values()):
            for cls in order:
                if by_class[cls] and len(drawn) < size:
                    drawn.append(by_class[cls].pop())
        self.rng.shuffle(drawn)
        return drawn

    @property
    def size(self) -> int:
        return len(self.round)

    @property
    def finished(self) -> bool:
        return len(self.turns) == len(self.round)

    @property
    def current(self) -> QuizItem | None:
        """The scan to answer now (``None`` when the round is over)."""
        return None if self.finished else self.round[len(self.turns)]

    def answer(self, choice: str, model_answer: str | None = None, verdict: str = "") -> Turn:
        """Record the student's class for the current scan, with the model's answer (the
        item's when it has one, else ``model_answer``) and how sure it was (``verdict``)."""
        if self.finished:
            raise ValueError("the round is over: start a new one")
        if choice not in self.class_names:
            raise ValueError(f"unknown class {choice!r}; choose from {', '.join(self.class_names)}")
        item = self.round[len(self.turns)]
        model = item.model_answer or model_answer
        if model is None:
            raise ValueError("the model's answer to this scan is needed to record an answer")
        turn = Turn(item, choice, model, verdict)
        self.turns.append(turn)
        return turn

    @property
    def student_score(self) -> int:
        return sum(turn.correct for turn in self.turns)

    @property
    def model_score(self) -> int:
        return sum(turn.model_correct for turn in self.turns)

    def mistakes(self, who: str = "student") -> dict[str, dict[str, int]]:
        """Per reference class: ``{answered class: count}`` of the wrong answers of ``who``
        (``"student"`` or ``"model"``), classes without mistakes left out."""
        if who not in ("student", "model"):
            raise ValueError("who must be 'student' or 'model'")
        out: dict[str, dict[str, int]] = {}
        for turn in self.turns:
            given = turn.answer if who == "student" else turn.model_answer
            if given != turn.item.reference:
                row = out.setdefault(turn.item.reference, {})
                row[given] = row.get(given, 0) + 1
        return out

    def summary(self) -> dict[str, Any]:
        """Scores and mistakes so far, and the scans of each class seen."""
        seen: dict[str, int] = {}
        for turn in self.turns:
            seen[turn.item.reference] = seen.get(turn.item.reference, 0) + 1
        return {
            "answered": len(self.turns),
            "size": self.size,
            "student": self.student_score,
            "model": self.model_score,
            "seen_per_class": seen,
            "student_mistakes": self.mistakes("student"),
            "model_mistakes": self.mistakes("model"),
        }


#: The columns of a student's answers (:func:`write_answers_csv`).
ANSWERS_HEADER = (
    "scan",
    "scan id",
    "your answer",
    "reference",
    "you were",
    "model's answer",
    "model was",
    "model's verdict",
)


def write_answers_csv(quiz: Quiz, path: str | Path) -> Path:
    """A student's answers so far, one row per scan: its number in the round and its id, the
    student's answer, the reference, the model's answer and how sure it was. Text cells are
    written so a spreadsheet never runs them (:func:`~mirage_demo.predictions_csv.csv_text`)."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(ANSWERS_HEADER)
        for number, turn in enumerate(quiz.turns, start=1):
            writer.writerow(
                [
                    number,
                    csv_text(turn.item.key),
                    csv_text(turn.answer),
                    csv_text(turn.item.reference),
                    "right" if turn.correct else "wrong",
                    csv_text(turn.model_answer),
                    "right" if turn.model_correct else "wrong",
                    csv_text(turn.model_verdict),
                ]
            )
    return path
