"""Test yourself, for teachers: make a lesson, the same scans in the same order for every
student (:mod:`mirage_demo.lesson`).

From the model's bundled test scans the teacher gets a link (and a lesson file); from an
upload of their own labelled scans, a lesson file. Students open either in Test yourself.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path
from typing import Any

import gradio as gr

from mirage_demo.evaluation import labelled_upload
from mirage_demo.lesson import MAX_LESSON_SCANS, LessonError, lesson_code, write_lesson_file
from mirage_demo.quiz import Quiz, QuizItem
from mirage_demo.testscans import ScanSet
from mirage_demo.ui.context import AppContext, output_file
from mirage_demo.ui.evaluate import uploaded_files
from mirage_demo.ui.jobs import job_folder

__all__ = [
    "TEST_SCANS",
    "UPLOADED",
    "balanced_draw",
    "build_lesson_maker",
    "lesson_from_test_scans",
    "lesson_from_upload",
    "make_lesson",
    "scan_choices",
]

TEST_SCANS = "The model's test scans (a link and a file)"
UPLOADED = "Scans I upload (a file)"
#: Browser code: the page's own address with ``?lesson=CODE`` (empty without a code).
LINK_JS = (
    "(code) => code ? window.location.origin + window.location.pathname + '?lesson=' + code : ''"
)
MAKER_INTRO = """
**A lesson gives every student the same scans, in the same order.** 1. Pick the scans: the
model's test scans below (in the order you pick them; *Fill* draws a balanced set), or upload
your own labelled scans (a .zip with one folder per class; they are shown in the order of their
file names). 2. *Make the lesson*. 3. Share the link (test scans) or the lesson file.
4. Students open the link, or the file under *Start a lesson*, and answer. 5. They download
their answers (CSV) for you.
"""


def scan_choices(scans: ScanSet | None) -> list[tuple[str, str]]:
    """The test scans as ``(label, file)`` choices: class, the model's answer, a short id."""
    if scans is None:
        return []
    choices = []
    for n, entry in enumerate(sorted(scans.entries, key=lambda e: (e.true, e.file)), start=1):
        said = entry.predicted
        mark = "" if entry.correct else " (wrong)"
        choices.append(
            (
                f"{entry.true} #{n}: the model said {said} "
                f"{entry.probabilities.get(said, 0):.0%}{mark}",
                entry.file,
            )
        )
    return choices


def lesson_from_test_scans(
    scans: ScanSet, files: list[str], title: str
) -> tuple[str, str, list[tuple[str, str]], str]:
    """A lesson of test scans, in the order of ``files``: ``(code, lesson file, preview,
    message)``."""
    by_file = {entry.file: entry for entry in scans.entries}
    chosen = [by_file[file] for file in files if file in by_file]
    if len(chosen) != len(files or []):
        raise gr.Error("Some of the scans picked are not test scans of this model: pick again.")
    try:
        code = lesson_code([entry.file for entry in chosen])
        path = write_lesson_file(
            output_file("lesson", ".zip", f"lesson-{title or 'test-scans'}"),
            title,
            [(entry.image, entry.true) for entry in chosen],
        )
    except LessonError as err:
        raise gr.Error(str(err)) from err
    references = [entry.true for entry in chosen]
    preview = [(str(e.image), f"{n}. {e.true}") for n, e in enumerate(chosen, start=1)]
    return code, str(path), preview, _made(references, link=True)


def lesson_from_upload(
    files: Any, class_names: list[str], title: str
) -> tuple[str, list[tuple[str, str]], str]:
    """A lesson file of uploaded labelled scans (read as Evaluate reads them), in the order
    of their file names: ``(lesson file, preview, message)``."""
    uploads = uploaded_files(files)
    if not uploads:
        raise gr.Error("Upload a .zip of labelled scans first: one folder per class.")
    with job_folder("oct-eval-lesson-", "Cannot make a lesson of these scans") as out:
        upload = labelled_upload(uploads, class_names, out / "scans", max_files=MAX_LESSON_SCANS)
        samples = sorted(upload.samples, key=lambda s: (Path(s.path).name, s.path))
        scans = [(s.path, upload.class_names[s.label]) for s in samples]
        path = write_lesson_file(
            output_file("lesson", ".zip", f"lesson-{title or 'my-scans'}"), title, scans
        )
    preview = [(str(p), f"{n}. {cls}") for n, (p, cls) in enumerate(scans, start=1)]
    return str(path), preview, _made([cls for _, cls in scans], link=False)


def _made(references: list[str], link: bool) -> str:
    counts = ", ".join(f"{cls} {n}" for cls, n in sorted(Counter(references).items()))
    share = "the link or the lesson file" if link else "the lesson file"
    return (
        f"**A lesson of {len(references)} scans** ({counts}). Share {share}; students open it "
        "in *Start a lesson* (the link opens it at once)."
    )


def build_lesson_maker(ctx: AppContext, size: gr.Slider) -> None:
    """The teachers' accordion: pick scans, make the lesson, share its link or file
    (``size``: the quiz's *Scans in a round*, how many *Fill* draws)."""
    registry = ctx.registry
    first, _ = registry.scan_set(registry.default)
    with gr.Accordion("For teachers: make a lesson", open=False, elem_id="lesson-maker"):
        gr.Markdown(MAKER_INTRO)
        title = gr.Textbox(label="Lesson title (optional)", max_length=120, elem_id="lesson-title")
        source = gr.Radio([TEST_SCANS, UPLOADED], value=TEST_SCANS, label="Scans")
        with gr.Row():
            picked = gr.Dropdown(
                scan_choices(first),
                value=[],
                multiselect=True,
                max_choices=MAX_LESSON_SCANS,
                label="Test scans, in the order students will see them",
                elem_id="lesson-picked",
                scale=4,
            )
            with gr.Column(scale=1, min_width=160):
                fill = gr.Button("Fill: a balanced draw", size="sm", elem_id="lesson-fill")
        own = gr.File(
            label="Your labelled scans: a .zip with one folder per class",
            file_types=[".zip"],
            visible=False,
            elem_id="lesson-own",
        )
        make = gr.Button("Make the lesson", variant="primary", elem_id="lesson-make")
        message = gr.Markdown(elem_id="lesson-message")
        code = gr.Textbox(visible=False)  # the lesson's code; the page makes the link
        link = gr.Textbox(
            label="Lesson link (for the test scans): share it with the students",
            interactive=False,
            buttons=["copy"],
            elem_id="lesson-link",
        )
        lesson_file = gr.File(label="Lesson file", elem_id="lesson-zip")
        preview = gr.Gallery(
            label="The lesson's scans, in order (for you: the captions give the answers)",
            columns=10,
            height="auto",
            object_fit="contain",
            allow_preview=False,
            elem_id="lesson-preview",
            elem_classes="compact-gallery",
        )
    made = [code, lesson_file, preview, message]

    def on_source(which: str):
        mine = which == UPLOADED
        return gr.update(visible=not mine), gr.update(visible=not mine), gr.update(visible=mine)

    source.change(on_source, inputs=[source], outputs=[picked, fill, own], api_visibility="private")

    fill.click(
        lambda name, count: gr.update(value=balanced_draw(registry, name, int(count))),
        inputs=[ctx.model, size],
        outputs=[picked],
        api_visibility="private",
    )
    inputs = [ctx.model, source, picked, own, title]
    make.click(
        lambda *values: make_lesson(registry, *values),
        inputs=inputs,
        outputs=made,
        api_visibility="private",
        **ctx.long_events,
    ).then(None, inputs=[made[0]], outputs=[link], js=LINK_JS)

    def on_model(name: str):
        scans, _ = registry.scan_set(name)
        return gr.update(choices=scan_choices(scans), value=[]), "", None, None, ""

    ctx.model.change(
        on_model,
        inputs=[ctx.model],
        outputs=[picked, link, *made[1:]],
        api_visibility="private",
    )


def balanced_draw(registry: Any, name: str, count: int) -> list[str]:
    """``count`` test scans of the model ``name`` (their files), the classes taking turns as
    in a quiz round."""
    scans, why = registry.scan_set(name)
    if scans is None:
        raise gr.Error(html.escape(why))
    items = [QuizItem(e.file, "", e.true, e.predicted) for e in scans.entries]
    return [item.key for item in Quiz(items, count, class_names=scans.class_names).round]


def make_lesson(
    registry: Any, name: str, which: str, files: list[str] | None, upload: Any, heading: str
) -> tuple[str, str, list[tuple[str, str]], str]:
    """*Make the lesson*: ``(code or "", lesson file, preview, message)`` of the test scans
    picked, or of the teacher's upload."""
    heading = (heading or "").strip()
    if which == UPLOADED:
        names = list(registry.config(name).class_names)
        path, shown, text = lesson_from_upload(upload, names, heading)
        return "", path, shown, text
    scans, why = registry.scan_set(name)
    if scans is None:
        raise gr.Error(html.escape(why))
    return lesson_from_test_scans(scans, list(files or []), heading)
