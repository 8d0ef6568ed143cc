"""The answer card: how every view of the app shows one answer and how far to trust it.

One function, :func:`answer_card`, renders the answer (the class and its probability, the
prediction set, the verdict of :mod:`mirage_demo.verdict` in plain words, the reference label
when the scan has one) for Classify, the quiz, the explorer (Model and Evaluate tabs) and the
Volume tab; :func:`answer_label` is what the probabilities panel shows (no class headline for
an image that is not a B-scan) and :func:`verdict_cells` the cells of a Batch row. Only the
verdict ``"sure"`` ever calls an answer sure.
"""

from __future__ import annotations

from typing import Any

from mirage_demo.inference import Prediction
from mirage_demo.ui.context import reference_line
from mirage_demo.uncertainty import DEFAULT_LEVEL, GUARANTEE
from mirage_demo.verdict import NOT_A_BSCAN, SURE, UNLIKE_TRAINING, UNSURE, verdict_words

__all__ = ["NOT_A_BSCAN_HEADLINE", "answer_card", "answer_label", "verdict_cells", "verdict_line"]

NOT_A_BSCAN_HEADLINE = "Not an OCT B-scan"
UNLIKE_WARNING = (
    "**Warning: this scan is unlike the scans this model was trained on** (another device or "
    "acquisition?). Its answer is less reliable, and what its prediction set promises does "
    "not hold for this scan."
)
NO_STATISTICS = (
    "How far to trust this answer cannot be told for this checkpoint: it has no prediction "
    "sets and no unlike-the-training-scans check."
)


def answer_label(prediction: Prediction) -> dict[str, float] | str:
    """What the probabilities panel (``gr.Label``) shows: the class probabilities, or for an
    image that is not a B-scan the words :data:`NOT_A_BSCAN_HEADLINE` (no class headline)."""
    if prediction.trust == NOT_A_BSCAN:
        return NOT_A_BSCAN_HEADLINE
    return prediction.probabilities


def _set_text(prediction: Prediction) -> str:
    return "{" + ", ".join(prediction.prediction_set or []) + "}"


def _level(prediction: Prediction) -> float:
    return prediction.level or DEFAULT_LEVEL


def _against_bar(prediction: Prediction) -> tuple[str, str]:
    """The answer's probability and the bar for "sure" as percentages with as many decimals
    as it takes to tell them apart (89.6% and 90.0%, not 90% and 90%)."""
    answer, bar = prediction.confidence, prediction.sure_probability or 0.0
    for digits in (0, 1, 2):
        shown = f"{answer:.{digits}%}", f"{min(bar, 1.0):.{digits}%}"
        if (shown[0] == shown[1]) == (answer == bar):
            break
    return shown


def verdict_line(prediction: Prediction, *, past: bool = False) -> str:
    """One sentence: the verdict and why (``past=True``: "was", for the quiz's feedback)."""
    be = "was" if past else "is"
    level, shown = _level(prediction), _set_text(prediction)
    answer, bar = _against_bar(prediction)
    verdict = prediction.trust
    if verdict == NOT_A_BSCAN:
        return f"The image {be} **not an OCT B-scan**: the model's answer means nothing."
    if verdict == UNLIKE_TRAINING:
        return (
            f"The scan {be} **unlike the scans the model was trained on**: its answer is less "
            f"reliable, and its {level:.0%} set ({shown}) promises nothing for it."
        )
    if verdict == UNSURE and len(prediction.prediction_set or []) < 2:
        return (
            f"The model {be} **unsure**: its {level:.0%} set is {shown} alone, but this "
            f"answer's probability ({answer}) is below the model's bar ({bar}) for trusting an "
            "answer of one class."
        )
    if verdict == UNSURE:
        return (
            f"The model {be} **unsure**: its {level:.0%} set is {shown}; it cannot tell these "
            "classes apart at this level."
        )
    if verdict == SURE and not prediction.sure_probability:  # fitted before the bar
        return (
            f"The model {be} **sure** at the {level:.0%} level: its set is {shown} alone, and "
            "the scan is like the ones it was trained on."
        )
    if verdict == SURE:
        return (
            f"The model {be} **sure** at the {level:.0%} level: its set is {shown} alone, its "
            f"probability ({answer}) reaches the model's bar ({bar}), and the scan is like the "
            "ones it was trained on."
        )
    return NO_STATISTICS


def _probability_table(prediction: Prediction) -> str:
    ranked = sorted(prediction.probabilities.items(), key=lambda item: -item[1])
    rows = "\n".join(f"| {name} | {p:.0%} |" for name, p in ranked)
    return f"| Class | Probability |\n|---|---|\n{rows}"


def answer_card(
    prediction: Prediction,
    *,
    reference: str | None = None,
    class_names: list[str] | None = None,
    guarantee: bool = True,
) -> str:
    """Markdown for one answer, the same in every view.

    ``prediction``: the answer (its ``trust`` verdict decides the wording);
    ``reference``: the scan's reference label when it has one (a bundled example, a quiz or
    explorer scan, an evaluated upload): the card says whether the model agrees;
    ``class_names``: the model's classes (a reference outside them is said to be unknown);
    ``guarantee``: add, in small print, what the prediction set promises (off where a page
    says it once for many answers).

    - not an OCT B-scan: what is wrong, no class headline; the probabilities behind a closed
      disclosure, for the curious;
    - unlike the training scans: the warning first, then the answer, its set and that the
      set's promise does not hold;
    - unsure / sure: the answer, then the verdict with the set.
    """
    if prediction.trust == NOT_A_BSCAN:
        reasons = "\n".join(f"- {w}" for w in prediction.warnings)
        return (
            f"### {NOT_A_BSCAN_HEADLINE}\n"
            "This image does not look like an OCT B-scan, so the model gives no answer for "
            f"it:\n{reasons}\n\nUpload a grayscale OCT B-scan (a cross-section of the retina)."
            "\n\n<details><summary>What the model would have said anyway (meaningless for this "
            f"image)</summary>\n\n{_probability_table(prediction)}\n\n</details>\n\n"
        )
    parts = [UNLIKE_WARNING] if prediction.trust == UNLIKE_TRAINING else []
    said = f"The model says **{prediction.label}** ({prediction.confidence:.0%})."
    if reference is not None:
        said = reference_line(reference, prediction.label, prediction.confidence, class_names)
    parts += [said.strip(), verdict_line(prediction)]
    if guarantee and prediction.prediction_set is not None:
        parts.append("<small>" + GUARANTEE.format(level=_level(prediction)) + "</small>")
    return "\n\n".join(parts) + "\n\n"


def verdict_cells(prediction: Prediction | Any) -> list[str]:
    """A Batch row's cells: the set, whether the scan is unlike the training scans, and the
    verdict in words ("n/a": the checkpoint has no statistics)."""
    verdict = verdict_words(prediction.trust)
    if prediction.prediction_set is None:
        return ["n/a", "n/a", verdict]
    flag = "yes" if prediction.out_of_distribution else "no"  # its score is in the CSV
    return [", ".join(prediction.prediction_set), flag, verdict]
