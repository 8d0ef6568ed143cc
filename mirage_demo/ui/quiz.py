"""Test yourself: a round of the model's labelled test scans, or a teacher's lesson; the
student against the model (:class:`mirage_demo.quiz.Quiz`, kept per browser session only).

A lesson (:mod:`mirage_demo.lesson`) starts from a link (``?lesson=`` read when the page
loads), a pasted code, or a lesson file; teachers make one in this tab
(:func:`~mirage_demo.ui.lesson.build_lesson_maker`). After each answer the feedback names
the signs of the true class (the Learn tab's sentence) and links to it; a student can
download their answers as CSV.
"""

from __future__ import annotations

import html
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from mirage_demo.figures import describe_heatmap
from mirage_demo.images import ImageReadError
from mirage_demo.inference import DEFAULT_COLORMAP
from mirage_demo.lesson import LessonError, parse_lesson_code, pick_scans, read_lesson_file
from mirage_demo.lesson import scan_code as code_of
from mirage_demo.quiz import Quiz, QuizItem, write_answers_csv
from mirage_demo.testscans import ScanEntry, ScanSet
from mirage_demo.ui.answer import answer_card
from mirage_demo.ui.context import (
    STATE_TTL_S,
    AppContext,
    method_name,
    output_file,
    picture,
    shown_picture,
    unreadable,
)
from mirage_demo.ui.jobs import job_folder
from mirage_demo.ui.learn import CLASS_SIGNS, learn_anchor
from mirage_demo.ui.lesson import build_lesson_maker
from mirage_demo.ui.slides import colour_bar_html
from mirage_demo.ui.style import scroll_to_js
from mirage_demo.verdict import NOT_A_BSCAN, verdict_words

__all__ = [
    "answers_file",
    "build_quiz_tab",
    "lesson_from_code",
    "lesson_from_file",
    "quiz_answer",
    "quiz_next",
    "quiz_start",
    "quiz_summary",
]

LESSON_PREFIX = "oct-eval-lesson-"  # a lesson file's scans: kept an hour, as evaluations
QUIZ_INTRO = (
    "Look at a scan the model was tested on, choose its class, then see the reference label, "
    "the model's answer and where it looked. Your answers are not stored."
)


def quiz_items(entries: list[ScanEntry]) -> list[QuizItem]:
    """Test scans as quiz items, each known by its code (its name would give the class)."""
    return [
        QuizItem(code_of(e.file), str(e.image), e.true, e.predicted, dict(e.probabilities))
        for e in entries
    ]


def quiz_score(quiz: Quiz) -> str:
    lesson = f"**{html.escape(quiz.title)}** · " if quiz.title else ""
    return (
        f"{lesson}**You: {quiz.student_score}** · **Model: {quiz.model_score}** "
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
    quiz = Quiz(quiz_items(scans.entries), int(size), class_names=class_names, seed=seed)
    return quiz, unnamed_copy(quiz.current.image), quiz_score(quiz)


def lesson_from_code(found: tuple[ScanSet | None, str], class_names: list[str], text: str | None):
    """A lesson from a link or code (the model's test scans ``found`` by
    :meth:`ModelRegistry.scan_set`, in the teacher's order): ``(quiz or None, first image,
    text)``."""
    scans, message = found
    try:
        if scans is None:
            raise LessonError(f"No labelled scans for this model: {message}")
        entries = pick_scans(parse_lesson_code(text), scans.entries)
    except LessonError as err:
        return None, None, f"**Cannot start this lesson:** {err}"
    title = f"Lesson of {len(entries)} scans"
    quiz = Quiz.fixed(quiz_items(entries), class_names, title=title)
    return quiz, unnamed_copy(quiz.current.image), quiz_score(quiz)


def lesson_from_file(path: str, class_names: list[str]):
    """A lesson from an uploaded lesson file (untrusted: :func:`read_lesson_file`), its scans
    kept an hour: ``(quiz or None, first image, text)``."""
    try:
        with job_folder(LESSON_PREFIX, "Cannot open this lesson") as out:
            lesson = read_lesson_file(path, class_names, out)
    except LessonError as err:
        return None, None, f"**Cannot start this lesson:** {html.escape(str(err))}"
    items = [
        QuizItem(f"lesson scan {n}", str(scan.image), scan.reference)
        for n, scan in enumerate(lesson.scans, start=1)
    ]
    title = lesson.title or f"Lesson of {len(items)} scans"
    quiz = Quiz.fixed(items, class_names, title=title)
    return quiz, unnamed_copy(quiz.current.image), quiz_score(quiz)


def quiz_answer(predictor: Any, quiz: Quiz | None, choice: str | None):
    """Record an answer: ``(map overlay, feedback, score, the Learn anchor of the true class
    or "")``. The overlay carries its alt text in ``overlay.info["alt_text"]``."""
    if quiz is None or quiz.finished:
        raise gr.Error("Start a round first.")
    if not choice:
        raise gr.Error("Pick a class first.")
    item = quiz.current
    method = "gradcam" if "gradcam" in predictor.methods else predictor.methods[0]
    try:  # the map of the model's answer (a lesson's: the class it predicts now)
        explanation = predictor.explain(item.image, method=method, target=item.model_answer)
    except ImageReadError as err:
        raise unreadable(err) from err
    prediction = explanation.prediction
    turn = quiz.answer(choice, prediction.label, verdict_words(prediction.trust))
    you = "right" if turn.correct else "wrong"
    card = answer_card(
        prediction, reference=item.reference, class_names=predictor.class_names, guarantee=False
    )
    if prediction.label != turn.model_answer and prediction.trust != NOT_A_BSCAN:
        card += (
            f"(On the original scan, which the score counts, it said {turn.model_answer} "
            f"{(item.probabilities or {}).get(turn.model_answer, 0.0):.0%}.)\n\n"
        )
    feedback = (
        f"## Reference: {item.reference}\n"
        f"**You said {choice}**: {you}.\n\n"
        f"{card}"
        f"{signs_line(item.reference)}"
        f"The map ({method_name(method)}) shows where the model looked for "
        f"{turn.model_answer}."
    )
    if quiz.finished:
        feedback += "\n\n" + quiz_summary(quiz)
    overlay = explanation.overlay
    overlay.info["alt_text"] = describe_heatmap(
        method_name(method), turn.model_answer, explanation.heatmap, "the scan"
    )
    return overlay, feedback, quiz_score(quiz), learn_anchor(item.reference) or ""


def signs_line(class_name: str) -> str:
    """What to look for in a scan of ``class_name``: the Learn tab's sentence, or nothing."""
    signs = CLASS_SIGNS.get(class_name)
    if signs is None:
        return ""
    return f"**{class_name} ({signs.name}): look for** {signs.look_for}.\n\n"


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


def answers_file(quiz: Quiz | None) -> str:
    """A student's answers so far as CSV (:func:`mirage_demo.quiz.write_answers_csv`)."""
    if quiz is None or not quiz.turns:
        raise gr.Error("Answer a scan first: the file lists your answers.")
    path = output_file("answers", ".csv", f"my-answers-{quiz.title or 'round'}")
    return str(write_answers_csv(quiz, path))


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
    lines.append(
        "\nNothing about your answers is kept: download them below before you leave, or start "
        "a new round to play again."
    )
    return "\n".join(lines)


def _mistakes(row: dict[str, int] | None) -> str:
    if not row:
        return "none"
    return ", ".join(f"{n} as {cls}" for cls, n in sorted(row.items()))


def _scan_picture(quiz: Quiz | None, path: str | None) -> Any:
    """The scan to classify, with its alt text (its place in the round, never its class)."""
    if quiz is None or path is None:
        return None
    shown = min(len(quiz.turns) + 1, quiz.size)
    return gr.Image(value=path, alt_text=f"OCT B-scan to classify: scan {shown} of {quiz.size}")


@dataclass
class QuizView:
    """The Test yourself tab's components."""

    size: gr.Slider
    start: gr.Button
    score: gr.Markdown
    image: gr.Image
    choice: gr.Radio
    answer: gr.Button
    following: gr.Button
    feedback: gr.Markdown
    learn: gr.Button  # to the Learn paragraph of the last answer's class
    overlay: gr.Image
    mine: gr.Button
    answers: gr.File
    code: gr.Textbox
    lesson_upload: gr.File
    lesson_start: gr.Button
    anchor: gr.Textbox  # the element id of that paragraph (hidden)
    state: gr.State

    @property
    def round_outputs(self) -> list[Any]:
        """What a new round sets."""
        return [
            self.state,
            self.image,
            self.overlay,
            self.choice,
            self.score,
            self.feedback,
            self.answer,
            self.learn,
            self.answers,
        ]


def build_quiz_tab(ctx: AppContext) -> None:
    """Test yourself: a round of labelled test scans, or a lesson; you against the model."""
    with gr.Tab("Test yourself", id="quiz"):
        view = _quiz_layout(ctx)
        build_lesson_maker(ctx, view.size)
    _wire_rounds(ctx, view)
    _wire_answers(ctx, view)


def _quiz_layout(ctx: AppContext) -> QuizView:
    """The round (on a phone: the scan, the classes and the buttons, then the feedback, then
    the map), the answers' download, and where a student starts a lesson."""
    classes = list(ctx.registry.config(ctx.registry.default).class_names)
    gr.Markdown(QUIZ_INTRO)
    with gr.Row():
        size = gr.Slider(3, 30, value=10, step=1, label="Scans in a round", elem_id="size")
        start = gr.Button("Start a round", variant="primary", elem_id="quiz-start")
    score = gr.Markdown(elem_id="quiz-score", elem_classes="teach-big")
    with gr.Row(elem_classes="ph-flat"):
        with gr.Column():
            image = picture(
                "Which class is this scan?",
                "quiz-scan",
                kind="filepath",
                height=300,
                alt_text="The scan to classify (none yet: start a round)",
                elem_classes=["ph-1", "phone-short"],
            )
            choice = gr.Radio(
                classes, label="Your answer", elem_id="quiz-choice", elem_classes="ph-2"
            )
            with gr.Row(elem_classes="ph-3"):
                answer = gr.Button("Answer", variant="primary", elem_id="quiz-answer")
                following = gr.Button("Next scan", elem_id="quiz-next")
        with gr.Column():
            feedback = gr.Markdown(elem_id="quiz-feedback", elem_classes=["teach-big", "ph-4"])
            learn = gr.Button(
                "→ What this class looks like (Learn)",
                visible=False,
                size="sm",
                elem_id="quiz-learn",
                elem_classes="ph-5",
            )
            overlay = picture(
                "Where the model looked",
                "quiz-map",
                height=300,
                alt_text="Where the model looked (shown after your answer)",
                elem_classes="ph-6",
            )
            gr.HTML(colour_bar_html(DEFAULT_COLORMAP), padding=False, elem_classes="ph-7")
    with gr.Row(equal_height=True):
        mine = gr.Button("Download my answers (CSV)", size="sm", elem_id="quiz-csv-button")
        answers = gr.File(label="Your answers", visible=False, elem_id="quiz-csv")
    with gr.Accordion("Start a lesson your teacher gave you", open=False, elem_id="lesson"):
        code = gr.Textbox(
            label="Lesson link or code", placeholder="paste it here", elem_id="lesson-code"
        )
        lesson_upload = gr.File(
            label="…or the lesson file (.zip)", file_types=[".zip"], elem_id="lesson-file"
        )
        lesson_start = gr.Button("Start the lesson", elem_id="lesson-start")
    return QuizView(
        size,
        start,
        score,
        image,
        choice,
        answer,
        following,
        feedback,
        learn,
        overlay,
        mine,
        answers,
        code,
        lesson_upload,
        lesson_start,
        anchor=gr.Textbox(visible=False),
        state=gr.State(None, time_to_live=STATE_TTL_S),  # a round idle 10 min ends
    )


def _wire_rounds(ctx: AppContext, view: QuizView) -> None:
    """A round starts from the button, a lesson from its link (when the page loads), a pasted
    code or a lesson file; the page then scrolls to the round."""
    registry = ctx.registry

    def started(name: str, quiz: Quiz | None, first: str | None, text: str) -> tuple:
        names = list(registry.config(name).class_names)
        ready = gr.update(interactive=quiz is not None)
        hidden = gr.update(visible=False)
        shown, choices = _scan_picture(quiz, first), gr.update(choices=names, value=None)
        return quiz, shown, None, choices, text, "", ready, hidden, hidden

    def on_start(name, count):
        names = list(registry.config(name).class_names)
        return started(name, *quiz_start(registry.scan_set(name), names, int(count)))

    def on_lesson(name, text, upload):
        names = list(registry.config(name).class_names)
        if upload is not None:
            path = upload if isinstance(upload, str) else getattr(upload, "name", str(upload))
            return started(name, *lesson_from_file(path, names))
        return started(name, *lesson_from_code(registry.scan_set(name), names, text))

    def on_page(name, request: gr.Request):  # a lesson link: ?lesson=...
        text = request.query_params.get("lesson") if request is not None else None
        if not text:
            return [gr.skip()] * (len(view.round_outputs) + 1)
        names = list(registry.config(name).class_names)
        found = lesson_from_code(registry.scan_set(name), names, text)
        return *started(name, *found), gr.Tabs(selected="quiz")

    scroll = scroll_to_js("quiz-score")
    private: dict[str, Any] = {"outputs": view.round_outputs, "api_visibility": "private"}
    view.start.click(on_start, inputs=[ctx.model, view.size], **private).then(None, js=scroll)
    view.lesson_start.click(
        on_lesson, inputs=[ctx.model, view.code, view.lesson_upload], **private
    ).then(None, js=scroll)
    if ctx.tabs is not None:
        ctx.demo.load(
            on_page,
            inputs=[ctx.model],
            outputs=[*view.round_outputs, ctx.tabs],
            api_visibility="private",
        ).then(None, js=scroll)
        to_learn = view.learn.click(
            lambda: gr.Tabs(selected="learn"), outputs=[ctx.tabs], api_visibility="private"
        )
        to_learn.then(None, inputs=[view.anchor], js=scroll_to_js(None))

    def on_model(name):
        return None, None, None, gr.update(choices=list(registry.config(name).class_names)), ""

    # not on page load: a lesson link starts its round then
    ctx.model.change(
        on_model,
        inputs=[ctx.model],
        outputs=[view.state, view.image, view.overlay, view.choice, view.feedback],
        api_visibility="private",
    )


def _wire_answers(ctx: AppContext, view: QuizView) -> None:
    """Answer (the model explains the scan), next scan, and the answers as CSV."""
    registry = ctx.registry

    @ctx.model_call
    def on_answer(quiz, name, picked):
        shown, text, scores, where = quiz_answer(registry.get(name), quiz, picked)
        reference = quiz.turns[-1].item.reference
        learn = gr.update(visible=bool(where), value=f"→ What {reference} looks like (Learn)")
        done = gr.update(interactive=False)
        return quiz, shown_picture(shown), text, scores, done, where, learn

    view.answer.click(
        on_answer,
        inputs=[view.state, ctx.model, view.choice],
        outputs=[
            view.state,
            view.overlay,
            view.feedback,
            view.score,
            view.answer,
            view.anchor,
            view.learn,
        ],
        **ctx.model_events,
        api_visibility="private",
    )

    def on_next(quiz):
        shown, text = quiz_next(quiz)
        scores = quiz_score(quiz) if quiz else ""
        ready = gr.update(interactive=quiz is not None and not quiz.finished)
        hidden = gr.update(visible=False)
        return _scan_picture(quiz, shown), None, gr.update(value=None), text, scores, ready, hidden

    view.following.click(
        on_next,
        inputs=[view.state],
        outputs=[
            view.image,
            view.overlay,
            view.choice,
            view.feedback,
            view.score,
            view.answer,
            view.learn,
        ],
        api_visibility="private",
    )
    view.mine.click(
        lambda quiz: gr.update(value=answers_file(quiz), visible=True),
        inputs=[view.state],
        outputs=[view.answers],
        api_visibility="private",
    )
