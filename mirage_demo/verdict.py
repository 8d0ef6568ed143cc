"""One verdict for every answer: how far to trust it, decided in one place.

Every answer (:class:`~mirage_demo.inference.Prediction`, the command line's ``--json``, the
app's ``/predict_json``, Batch, the quiz, the explorer, Evaluate) carries one of four verdicts,
decided in this order:

``"not_a_bscan"``
    the quality gate (:mod:`mirage_demo.quality`) says the image is not an OCT B-scan: colour,
    blank, too small to read, or without retinal layers. There is no answer to give.
``"unlike_training"``
    the scan is unlike the scans the model was trained on (the out-of-distribution flag of
    :mod:`mirage_demo.uncertainty`): another device or acquisition. The prediction set's
    promise does not hold for it.
``"unsure"``
    the prediction set holds two classes or more (the model cannot tell them apart), or its
    one class is less probable than the checkpoint's bar for "sure" (fitted on the validation
    scans: :func:`mirage_demo.uncertainty.sure_bar`).
``"sure"``
    none of those: a B-scan like the training scans, a set of one class and a probability at
    or above the bar. The only verdict that may call an answer sure.

A checkpoint without prediction sets or the flag gets ``None`` for an image that passes the
gate: how far to trust the answer cannot be told (never ``"sure"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "NOT_A_BSCAN",
    "SURE",
    "UNLIKE_TRAINING",
    "UNSURE",
    "VERDICTS",
    "decide",
    "verdict_report",
    "verdict_words",
]

NOT_A_BSCAN = "not_a_bscan"
UNLIKE_TRAINING = "unlike_training"
UNSURE = "unsure"
SURE = "sure"
#: The verdicts, in the order they are decided (the first that applies).
VERDICTS = (NOT_A_BSCAN, UNLIKE_TRAINING, UNSURE, SURE)
#: How a table cell or a count names each verdict (``None``: no statistics).
_WORDS = {
    NOT_A_BSCAN: "not an OCT B-scan",
    UNLIKE_TRAINING: "unlike the training scans",
    UNSURE: "unsure",
    SURE: "sure",
    None: "not available",
}


def decide(
    looks_like_oct: bool,
    out_of_distribution: bool | None,
    set_size: int | None,
    probable_enough: bool = True,
) -> str | None:
    """The verdict of one answer from the quality gate's result, the out-of-distribution flag,
    the number of classes in the prediction set (``None`` for both: the checkpoint has no
    statistics) and whether the top class's probability reaches the bar for "sure"."""
    if not looks_like_oct:
        return NOT_A_BSCAN
    if out_of_distribution is None or set_size is None:
        return None
    if out_of_distribution:
        return UNLIKE_TRAINING
    return SURE if set_size == 1 and probable_enough else UNSURE


def verdict_words(verdict: str | None) -> str:
    """The verdict in a student's words (``"unlike the training scans"``)."""
    if verdict not in _WORDS:
        raise ValueError(f"unknown verdict {verdict!r}; verdicts: {', '.join(VERDICTS)}")
    return _WORDS[verdict]


def verdict_report(verdicts: Sequence[str | None], correct: Sequence[bool]) -> dict[str, Any]:
    """For each verdict: how many answers got it, their share and the accuracy among them
    (None where no answer got it); ``"sure_and_wrong"``: the share of all answers that were
    called sure and were wrong."""
    verdicts, correct = list(verdicts), np.asarray(correct, bool)
    if len(verdicts) != len(correct):
        raise ValueError(f"{len(verdicts)} verdicts for {len(correct)} answers")
    total = max(len(verdicts), 1)
    report: dict[str, Any] = {}
    for verdict in (*VERDICTS, None):
        mine = np.array([v == verdict for v in verdicts], bool)
        if verdict is None and not mine.any():
            continue
        report[verdict or "not_available"] = {
            "images": int(mine.sum()),
            "share": float(mine.sum() / total),
            "accuracy": float(correct[mine].mean()) if mine.any() else None,
        }
    sure = np.array([v == SURE for v in verdicts], bool)
    report["sure_and_wrong"] = float((sure & ~correct).sum() / total)
    return report
