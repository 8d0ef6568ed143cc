"""Test yourself: a round of the model's labelled test scans; the student against the model
(:class:`mirage_demo.quiz.Quiz`, kept per browser session only)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import gradio as gr

from mirage_demo.quiz import Quiz, QuizItem
from mirage_demo.testscans import ScanSet
from mirage_demo.ui.context import (
    STATE_TTL_S,
    AppContext,
    image_file,
    method_name,
    output_file,
    picture,
)
from mirage_demo.uncertainty import OOD_NOTE

__all__ = ["build_quiz_tab", "quiz_answer", "quiz_next", "quiz_start", "quiz_summary"]


def quiz_items(scans: ScanSet) -> list[QuizItem]:
    return [
        QuizItem(e.file, str(e.image), e.true, e.predicted, dict(e.probabilities))
        for e in scans.entries
    ]


def quiz_score(quiz: Quiz) -> str:
    return (
        f"**You: {quiz.student_score}** · **Model: {quiz.model_score}** "
        f"(after {len(quiz.turns)} of {quiz.size} scans)"
    )


def quiz_start(
    found: tuple[ScanSet | None, str], class_names: list[str], size: int, seed: int | None = None
):
    """A new round of the scans ``found`` (:meth:`ModelRegistry.scan_set`, which finds them
    only in the bundled copies or the folders the app was given): ``(quiz, first image,
    text)``; ``quiz`` is None when there are no scans."""
    scans, message = found
    if scans is None:
        return None, None, f"No labelled scans for this model: {message}"
    quiz = Quiz(quiz_items(scans), int(size), class_names=class_names, seed=seed)
    return quiz, unnamed_copy(quiz.current.image), quiz_score(quiz)


def quiz_answer(predictor: Any, quiz: Quiz | None, choice: str | None):
    """Record an answer: ``(map overlay, feedback, score)``."""
    if quiz is None or quiz.finished:
        raise gr.Error("Start a round first.")
    if not choice:
        raise gr.Error("Pick a class first.")
    item = quiz.current
    turn = quiz.answer(choice)
    method = "gradcam" if "gradcam" in predictor.methods else predictor.methods[0]
    explanation = predictor.explain(item.image, method=method, target=item.model_answer)
    you = "right" if turn.correct else "wrong"
    model = "right" if turn.model_correct else "wrong"
    confidence = item.probabilities.get(item.model_answer, 0.0)
    feedback = (
        f"## Reference: {item.reference}\n"
        f"- **You said {choice}**: {you}.\n"
        f"- **The model said {item.model_answer}** ({confidence:.0%}): {model}.\n\n"
        f"{unsure_line(explanation.prediction)}"
        f"The map ({method_name(method)}) shows where the model looked for "
        f"{item.model_answer}."
    )
    if quiz.finished:
        feedback += "\n\n" + quiz_summary(quiz)
    return explanation.overlay, feedback, quiz_score(quiz)


def unsure_line(prediction: Any) -> str:
    """After the answer: whether the model was unsure (a set of 2+ classes) or the scan is
    unlike its training scans; nothing for a checkpoint without prediction sets."""
    if prediction.prediction_set is None:
        return ""
    names = ", ".join(prediction.prediction_set)
    if len(prediction.prediction_set) > 1:
        text = f"**The model was unsure here**: its {prediction.level:.0%} set is {{{names}}}."
    else:
        text = f"The model was sure here: its {prediction.level:.0%} set is {{{names}}}."
    if prediction.out_of_distribution:
        text += f" This scan is {OOD_NOTE}."
    return text + "\n\n"


def quiz_next(quiz: Quiz | None):
    """The next scan: ``(image, text)``."""
    if quiz is None:
        raise gr.Error("Start a round first.")
    if quiz.finished:
        return None, quiz_summary(quiz)
    return unnamed_copy(quiz.current.image), ""


def unnamed_copy(path: str) -> str:
    """A copy of a scan to show, under a new name: its file name (``DME-30521-1.jpg``)
    would give the answer away in the page."""
    copy = output_file("scan", Path(path).suffix.lower())
    shutil.copyfile(path, copy)
    return str(copy)


def quiz_summary(quiz: Quiz) -> str:
    summary = quiz.summary()
    lines = [
        f"## Round over: you {summary['student']} of {summary['size']}, "
        f"the model {summary['model']} of {summary['size']}",
        "",
        "| Reference class | Scans | Your mistakes | The model's mistakes |",
        "|---|---|---|---|",
    ]
    for cls in quiz.class_names:
        seen = summary["seen_per_class"].get(cls, 0)
        if not seen:
            continue
        lines.append(
            f"| {cls} | {seen} | {_mistakes(summary['student_mistakes'].get(cls))} | "
            f"{_mistakes(summary['model_mistakes'].get(cls))} |"
        )
    lines.append("\nNothing about your answers is kept: start a new round to play again.")
    return "\n".join(lines)


def _mistakes(row: dict[str, int] | None) -> str:
    if not row:
        return "none"
    return ", ".join(f"{n} as {cls}" for cls, n in sorted(row.items()))


def build_quiz_tab(ctx: AppContext) -> None:
    """Test yourself: a round of labelled test scans; you against the model."""
    registry = ctx.registry
    classes = list(registry.config(registry.default).class_names)
    with gr.Tab("Test yourself", id="quiz"):
        gr.Markdown(
            "Look at a scan the model was tested on, choose its class, then see the reference "
            "label, the model's answer and where it looked. Your answers are not stored."
        )
        with gr.Row():
            size = gr.Slider(3, 30, value=10, step=1, label="Scans in a round")
            start = gr.Button("Start a round", variant="primary", elem_id="quiz-start")
        score = gr.Markdown(elem_id="quiz-score", elem_classes="teach-big")
        with gr.Row():
            image = picture("Which class is this scan?", "quiz-scan", kind="filepath")
            overlay = picture("Where the model looked", "quiz-map")
        choice = gr.Radio(classes, label="Your answer", elem_id="quiz-choice")
        with gr.Row():
            answer = gr.Button("Answer", variant="primary", elem_id="quiz-answer")
            following = gr.Button("Next scan", elem_id="quiz-next")
        feedback = gr.Markdown(elem_id="quiz-feedback", elem_classes="teach-big")
        state = gr.State(None, time_to_live=STATE_TTL_S)  # a round idle 10 min ends

    def on_start(name, count):
        names = list(registry.config(name).class_names)
        quiz, first, text = quiz_start(registry.scan_set(name), names, int(count))
        ready = gr.update(interactive=quiz is not None)
        return quiz, first, None, gr.update(choices=names, value=None), text, "", ready

    start.click(
        on_start,
        inputs=[ctx.model, size],
        outputs=[state, image, overlay, choice, score, feedback, answer],
        api_visibility="private",
    )

    @ctx.model_call
    def on_answer(quiz, name, picked):
        shown, text, scores = quiz_answer(registry.get(name), quiz, picked)
        return quiz, image_file(shown), text, scores, gr.update(interactive=False)

    answer.click(
        on_answer,
        inputs=[state, ctx.model, choice],
        outputs=[state, overlay, feedback, score, answer],
        **ctx.model_events,
        api_visibility="private",
    )

    def on_next(quiz):
        shown, text = quiz_next(quiz)
        scores = quiz_score(quiz) if quiz else ""
        ready = gr.update(interactive=quiz is not None and not quiz.finished)
        return shown, None, gr.update(value=None), text, scores, ready

    following.click(
        on_next,
        inputs=[state],
        outputs=[image, overlay, choice, feedback, score, answer],
        api_visibility="private",
    )

    def on_model(name):
        return None, None, None, gr.update(choices=list(registry.config(name).class_names)), ""

    ctx.on_model(on_model, [state, image, overlay, choice, feedback])
