"""Teaching views: the confusion-matrix explorer, evaluating labelled scans, every explanation
method side by side with its trust checks, and the quiz.

Handlers are plain functions of the inputs (usable without a browser); builders lay out
components and wire events around an app context (``registry``, ``model`` picker, ``demo``,
``model_call``, ``on_model``). Class names, counts and texts come from the loaded checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from mirage_demo.data import DataError, ImageReadError
from mirage_demo.evaluation import evaluate_upload
from mirage_demo.quiz import Quiz, QuizItem
from mirage_demo.testscans import ScanEntry, ScanSet, scan_set_for, scan_set_from_predictions
from mirage_demo.trust import compare_methods

__all__ = [
    "compare_scan",
    "evaluate_scans",
    "example_label",
    "explorer_cell",
    "explorer_open",
    "explorer_view",
    "quiz_answer",
    "quiz_next",
    "quiz_start",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_MANIFEST = REPO_ROOT / "assets" / "examples" / "manifest.csv"
METHOD_NAMES = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "attention": "Attention (last block)",
    "rollout": "Attention rollout",
}
MAX_GALLERY = 60
EVALUATIONS_KEPT_S = 3600  # unpacked uploads and reports older than this are deleted
CORNER = "true ↓ · said →"


def _method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


# --------------------------------------------------------------------------------------------
# Bundled examples: their reference label


@lru_cache(maxsize=1)
def _example_labels() -> dict[str, str]:
    if not EXAMPLES_MANIFEST.is_file():
        return {}
    with open(EXAMPLES_MANIFEST, newline="") as stream:
        return {row["sha256"]: row["class"] for row in csv.DictReader(stream)}


def example_label(path: str | Path) -> str | None:
    """The reference class of a bundled example scan (recognised by its content), else None."""
    labels = _example_labels()
    if not labels:
        return None
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
    return labels.get(digest)


def reference_line(
    reference: str | None,
    predicted: str,
    confidence: float,
    class_names: list[str] | None = None,
) -> str:
    """``labelled DME; the model says NORMAL`` when a labelled scan is misclassified."""
    if reference is None:
        return ""
    if class_names is not None and reference not in class_names:
        return (
            f"Labelled **{reference}**, a class this model does not know; it says "
            f"**{predicted}** ({confidence:.0%}).\n\n"
        )
    if reference == predicted:
        return f"Labelled **{reference}**; the model agrees ({confidence:.0%}).\n\n"
    return (
        f"**Labelled {reference}; the model says {predicted}** ({confidence:.0%}). The model "
        "disagrees with the reference label: a wrong answer, worth a close look.\n\n"
    )


# --------------------------------------------------------------------------------------------
# Confusion-matrix explorer


@dataclass
class ExplorerState:
    """What the explorer shows: the matrix's scans (if reachable) and the chosen cell."""

    class_names: list[str]
    counts: list[list[int]]
    scans: ScanSet | None = None
    cell: tuple[str, str] | None = None
    shown: list[ScanEntry] = field(default_factory=list)


def matrix_frame(state: ExplorerState) -> Any:
    """The confusion matrix as a table: rows the reference class, columns the prediction;
    the diagonal green, errors red, darker with more scans."""
    names = state.class_names
    frame = pd.DataFrame(
        [[name, *row] for name, row in zip(names, state.counts, strict=True)],
        columns=[CORNER, *names],
    )
    largest = max([max(row) for row in state.counts] + [1])

    def colour(row: pd.Series) -> list[str]:
        styles = ["font-weight: bold"]
        for name in names:
            count = row[name]
            share = count / largest
            if count == 0:
                styles.append("color: #94a3b8")
            elif names[row.name] == name:
                styles.append(f"background-color: rgba(22, 163, 74, {0.15 + 0.6 * share:.2f})")
            else:
                styles.append(f"background-color: rgba(220, 38, 38, {0.2 + 0.6 * share:.2f})")
        return styles

    return frame.style.apply(colour, axis=1)


def explorer_view(directory: Path, report: dict[str, Any] | None, class_names: list[str]):
    """``(matrix, message, state)`` for a checkpoint: its test scans when reachable."""
    scans, message = scan_set_for(directory)
    if scans is not None:
        counts = scans.matrix()
        message = (
            f"Showing {message}. **Choose a cell** to see its scans: the diagonal is what the "
            "model gets right, the other cells are its mistakes."
        )
    elif report and report.get("confusion_matrix"):
        counts = report["confusion_matrix"]
    else:
        counts = [[0] * len(class_names) for _ in class_names]
    state = ExplorerState(list(class_names), counts, scans)
    return matrix_frame(state), message, state


def explorer_cell(
    state: ExplorerState | None, row: int, column: int
) -> tuple[list[tuple[str, str]], str, ExplorerState | None]:
    """The scans of one cell (reference class ``row``, prediction ``column``) as a gallery."""
    if state is None:
        return [], "", state
    if column == 0:  # the class-name column
        return [], "Choose a cell with a count, not the class name.", state
    names = state.class_names
    true, predicted = names[row], names[column - 1]
    if state.scans is None:
        return (
            [],
            (
                f"{state.counts[row][column - 1]} scans of class {true} predicted {predicted}: "
                "their images are not available here."
            ),
            state,
        )
    entries = state.scans.cell(true, predicted)
    state.cell, state.shown = (true, predicted), entries[:MAX_GALLERY]
    verdict = "right" if true == predicted else "wrong"
    head = f"**{len(entries)} scans labelled {true}, predicted {predicted}**"
    head += f" (the model was {verdict})"
    if len(entries) > MAX_GALLERY:
        head += f"; the {MAX_GALLERY} most confident are shown"
    if not entries:
        return [], head + ".", state
    gallery = [(str(e.image), _caption(e)) for e in state.shown]
    return gallery, head + ". Click one to see where the model looked.", state


def _caption(entry: ScanEntry) -> str:
    """The probabilities of the answer and, for a mistake, of the reference class."""
    shown = f"{entry.predicted} {entry.probabilities[entry.predicted]:.0%}"
    if not entry.correct:
        shown += f" · {entry.true} {entry.probabilities[entry.true]:.0%}"
    return shown


def explorer_open(predictor: Any, state: ExplorerState | None, index: int) -> tuple[Any, str]:
    """One scan of the chosen cell with the map of the class the model predicted."""
    if state is None or not 0 <= index < len(state.shown):
        return None, ""
    entry = state.shown[index]
    method = "gradcam" if "gradcam" in predictor.methods else predictor.methods[0]
    try:
        explanation = predictor.explain(entry.image, method=method, target=entry.predicted)
    except (ImageReadError, ValueError) as err:
        raise gr.Error(f"Cannot open {entry.file}: {err}") from err
    now = explanation.prediction
    text = (
        f"**{entry.file}**: labelled **{entry.true}**; the model said **{entry.predicted}** "
        f"({entry.probabilities[entry.predicted]:.0%}). {_method_name(method)} map for "
        f"{entry.predicted}."
    )
    if now.label != entry.predicted:
        text += (
            f" (On the picture shown here, a downsized copy, it now says {now.label} "
            f"{now.confidence:.0%}.)"
        )
    return explanation.overlay, text


# --------------------------------------------------------------------------------------------
# Evaluate your own labelled scans


def _uploads(files: Any) -> list[tuple[str, str]]:
    """``(name, path)`` of Gradio file payloads; a name keeps its folder when it has one."""
    out = []
    for item in files or []:
        if isinstance(item, dict):
            path = item.get("path") or item.get("name")
            name = item.get("orig_name") or Path(path).name
        else:
            path = getattr(item, "path", None) or getattr(item, "name", None) or item
            name = Path(str(path)).name
        out.append((str(name), str(path)))
    return out


def _clean_old(parent: Path) -> None:
    for folder in parent.glob("oct-eval-*"):
        try:
            if time.time() - folder.stat().st_mtime > EVALUATIONS_KEPT_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def evaluate_scans(predictor: Any, files: Any, progress: Any = None) -> dict[str, Any]:
    """``/evaluate``: the report of ``train.evaluate`` on uploaded labelled scans.

    Returns ``metrics`` (the metrics.json content), ``folder`` (report files and unpacked
    scans), ``csv`` (predictions.csv), ``figures`` and the explorer's ``state``.
    """
    uploads = _uploads(files)
    if not uploads:
        raise gr.Error("Upload a .zip of labelled scans laid out as <CLASS>/<image>.")
    parent = Path(tempfile.gettempdir())
    _clean_old(parent)
    out = Path(tempfile.mkdtemp(prefix="oct-eval-", dir=parent))
    config = predictor.config

    def on_batch(done: int, total: int) -> None:
        if progress is not None:
            progress((done, total), desc="Evaluating", unit="batches")

    try:
        metrics, upload = evaluate_upload(
            predictor.model, config, uploads, out, device=predictor.device, on_batch=on_batch
        )
    except DataError as err:
        shutil.rmtree(out, ignore_errors=True)
        raise gr.Error(str(err), title="Cannot evaluate these scans") from err
    scans = scan_set_from_predictions(
        out / "predictions.csv", upload.root, config.class_names, "your scans"
    )
    state = ExplorerState(list(config.class_names), scans.matrix(), scans)
    figures = {
        name: str(out / name)
        for name in ("confusion_matrix.png", "roc_curves.png", "reliability.png")
    }
    skipped = f" Skipped (not images): {len(upload.skipped)}." if upload.skipped else ""
    return {
        "metrics": metrics,
        "folder": out,
        "csv": str(out / "predictions.csv"),
        "figures": figures,
        "state": state,
        "note": f"{metrics['num_images']} labelled scans evaluated.{skipped}",
    }


# --------------------------------------------------------------------------------------------
# Every method side by side


def faithfulness_verdict(score: float) -> str:
    if score > 0.05:
        return "points at what the model uses"
    if score < -0.05:
        return "worse than a random part"
    return "no better than a random part"


def sanity_verdict(similarity: float) -> str:
    if similarity >= 0.7:
        return "barely changes: fails the sanity check"
    if similarity >= 0.3:
        return "partly changes"
    return "changes: depends on what the model learnt"


def compare_scan(
    predictor: Any, path: str, name: str, target: str | None = None
) -> tuple[list, list[list[Any]], str]:
    """``/compare``: every method's map of one scan, its faithfulness and sanity scores.

    Returns a gallery (the maps of the trained model, then the same maps after randomising
    the model's last block, one method per column), a table (one row per method) and a text.
    """
    try:
        comparison = compare_methods(predictor, path, target=target, name=name)
    except ImageReadError as err:
        raise gr.Error(f"Could not read {name}: {err}", title="Unreadable image") from err
    except ValueError as err:
        raise gr.Error(str(err)) from err
    maps, randomized, rows = [], [], []
    for score in comparison.scores:
        label = _method_name(score.method)
        maps.append((score.overlay, f"{label} {score.faithfulness * 100:+.0f}"))
        randomized.append((score.randomized_overlay, f"random · ρ {score.similarity:.2f}"))
        rows.append(
            [
                label,
                round(score.faithfulness * 100, 1),
                faithfulness_verdict(score.faithfulness),
                round(score.drop * 100, 1),
                round(score.random_drop * 100, 1),
                round(score.similarity, 2),
                sanity_verdict(score.similarity),
            ]
        )
    prediction = comparison.prediction
    reference = reference_line(
        example_label(path), prediction.label, prediction.confidence, predictor.class_names
    )
    text = (
        reference
        + f"Predicted **{prediction.label}** ({prediction.confidence:.0%}); the maps explain "
        f"**{comparison.target}**. Top row: the trained model's maps. Bottom row: the same "
        "maps after the model's last block was replaced by random weights.\n\n"
        f"- **Faithfulness**: how many more percentage points the probability of "
        f"{comparison.target} falls when the map's top {comparison.fraction:.0%} of the scan "
        "is blurred away than when a random part of the same size is (higher is better).\n"
        "- **Sanity check**: ρ, the rank correlation of a map with its randomised twin; near "
        "1, the map does not depend on what the model learnt (it fails the check).\n\n"
        f"{comparison.timing['total_s']:.2f} s for the whole grid."
    )
    return maps + randomized, rows, text


COMPARE_HEADERS = [
    "Method",
    "Faithfulness (points)",
    "Reading",
    "Drop: map's part",
    "Drop: random part",
    "ρ after randomising",
    "Sanity check",
]


# --------------------------------------------------------------------------------------------
# Test yourself


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


def quiz_start(directory: Path, class_names: list[str], size: int, seed: int | None = None):
    """A new round: ``(quiz, first image, text)``; ``quiz`` is None when there are no scans."""
    scans, message = scan_set_for(directory)
    if scans is None:
        return None, None, f"No labelled scans for this model: {message}"
    quiz = Quiz(quiz_items(scans), int(size), class_names=class_names, seed=seed)
    return quiz, quiz.current.image, quiz_score(quiz)


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
        f"The map ({_method_name(method)}) shows where the model looked for "
        f"{item.model_answer}."
    )
    if quiz.finished:
        feedback += "\n\n" + quiz_summary(quiz)
    return explanation.overlay, feedback, quiz_score(quiz)


def quiz_next(quiz: Quiz | None):
    """The next scan: ``(image, text)``."""
    if quiz is None:
        raise gr.Error("Start a round first.")
    if quiz.finished:
        return None, quiz_summary(quiz)
    return quiz.current.image, ""


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


def open_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("L")


# --------------------------------------------------------------------------------------------
# Layout: builders around the app context (``registry``, ``model`` picker, ``model_call``,
# ``on_model``)


@dataclass
class ExplorerViews:
    """The components of one confusion-matrix explorer."""

    matrix: gr.Dataframe
    message: gr.Markdown
    gallery: gr.Gallery
    overlay: gr.Image
    caption: gr.Markdown
    state: gr.State

    @property
    def outputs(self) -> list[Any]:
        return [self.matrix, self.message, self.state]


def explorer_views(ctx: Any, prefix: str) -> ExplorerViews:
    """Lay out an explorer (matrix, the chosen cell's gallery, one opened scan) and wire it."""
    message = gr.Markdown(elem_id=f"{prefix}-message")
    with gr.Row():
        with gr.Column(scale=2):
            matrix = gr.Dataframe(
                label="Confusion matrix: choose a cell",
                interactive=False,
                elem_id=f"{prefix}-matrix",
                elem_classes="explorer-matrix",
                max_height=400,
            )
        with gr.Column(scale=3):
            cell_text = gr.Markdown(elem_id=f"{prefix}-cell")
            gallery = gr.Gallery(
                label="Scans in the chosen cell",
                columns=4,
                height=340,
                object_fit="contain",
                allow_preview=False,
                elem_id=f"{prefix}-gallery",
            )
    with gr.Row():
        overlay = gr.Image(
            label="The chosen scan and where the model looked",
            type="pil",
            interactive=False,
            height=360,
            elem_id=f"{prefix}-overlay",
        )
        caption = gr.Markdown(elem_id=f"{prefix}-caption")
    state = gr.State(None)

    def on_cell(current: ExplorerState | None, evt: gr.SelectData):
        row, column = evt.index
        gallery_items, text, current = explorer_cell(current, int(row), int(column))
        return gallery_items, text, current, None, ""

    matrix.select(
        on_cell,
        inputs=[state],
        outputs=[gallery, cell_text, state, overlay, caption],
        api_visibility="private",
    )

    @ctx.model_call
    def on_open(current: ExplorerState | None, name: str, evt: gr.SelectData):
        return explorer_open(ctx.registry.get(name), current, int(evt.index))

    gallery.select(
        on_open, inputs=[state, ctx.model], outputs=[overlay, caption], api_visibility="private"
    )
    return ExplorerViews(matrix, message, gallery, overlay, caption, state)


def build_model_explorer(ctx: Any) -> None:
    """The Model tab's explorer of the checkpoint's own test scans."""
    gr.Markdown("## Explore the confusion matrix")
    views = explorer_views(ctx, "explorer")

    def on_model(name: str):
        registry = ctx.registry
        predictor = registry.get(name)
        return explorer_view(
            registry.directory(name), registry.report(name), list(predictor.class_names)
        )

    ctx.on_model(on_model, views.outputs)


EVALUATE_INTRO = (
    "Upload a **.zip** of labelled scans laid out as `<CLASS>/<image>` (or images named "
    "`CLASS-PATIENT-N.jpeg`, as Kermany's are). You get the report of `python -m "
    "train.evaluate`: metrics with 95% confidence intervals, per-class figures, confusion "
    "matrix, ROC curves and reliability, an explorer of your scans and their predictions as "
    "CSV. Class folders must be classes the model knows: **{classes}**. Nothing is kept after "
    "an hour."
)


def build_evaluate_tab(ctx: Any, metrics_markdown: Any) -> None:
    """Evaluate your own labelled scans (named endpoint ``/evaluate``)."""
    registry = ctx.registry
    classes = ", ".join(registry.get(registry.default).class_names)
    with gr.Tab("Evaluate your scans", id="evaluate"):
        intro = gr.Markdown(EVALUATE_INTRO.format(classes=classes))
        files = gr.File(
            file_count="multiple",
            file_types=[".zip", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"],
            label="Labelled scans: a .zip of <CLASS>/<image>",
            elem_id="evaluate-files",
        )
        button = gr.Button("Evaluate", variant="primary")
        note = gr.Markdown(elem_id="evaluate-note")
        report = gr.Markdown(elem_id="evaluate-report")
        figures = [
            gr.Image(
                label="Confusion matrix", interactive=False, visible=False, elem_id="evaluate-cm"
            )
        ]
        with gr.Row():
            figures += [
                gr.Image(label=label, interactive=False, visible=False, elem_id=f"evaluate-{key}")
                for key, label in (("roc", "ROC curves"), ("reliability", "Reliability"))
            ]
        csv_file = gr.File(label="Predictions (CSV)", elem_id="evaluate-csv")
        with gr.Accordion("All numbers (metrics.json)", open=False):
            numbers = gr.JSON(elem_id="evaluate-json")
        gr.Markdown("### Explore your scans")
        views = explorer_views(ctx, "evaluate")

    @ctx.model_call
    def on_evaluate(uploaded, name, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        result = evaluate_scans(registry.get(name), uploaded, progress)
        state = result["state"]
        message = "Choose a cell of the matrix to see those of your scans."
        return (
            result["note"],
            metrics_markdown(result["metrics"]),
            *[gr.update(value=path, visible=True) for path in result["figures"].values()],
            result["csv"],
            result["metrics"],
            matrix_frame(state),
            message,
            state,
        )

    button.click(
        on_evaluate,
        inputs=[files, ctx.model],
        outputs=[note, report, *figures, csv_file, numbers, *views.outputs],
        api_name="evaluate",
    )

    def on_model(name: str):
        names = ", ".join(registry.get(name).class_names)
        return EVALUATE_INTRO.format(classes=names)

    ctx.on_model(on_model, [intro])


def build_compare_section(ctx: Any, scan: Any, target: Any, predicted_label: str) -> None:
    """Classify tab: every method side by side with its scores (named endpoint ``/compare``)."""
    with gr.Accordion("Compare all methods, with a trust check", open=False, elem_id="compare"):
        gr.Markdown(
            "Every explanation method on this scan, each with a **faithfulness** score (does "
            "blurring away what the map highlights change the answer more than blurring a "
            "random part?) and a **sanity check** (does the map change when the model's last "
            "block is replaced by random weights? It should: Adebayo et al. 2018)."
        )
        button = gr.Button("Compare all methods", variant="primary", elem_id="compare-button")
        text = gr.Markdown(elem_id="compare-text")
        maps = gr.Gallery(
            label="Top: the trained model's maps. Bottom: after randomising its last block",
            columns=5,
            height="auto",
            object_fit="contain",
            elem_id="compare-maps",
        )
        table = gr.Dataframe(
            headers=COMPARE_HEADERS, interactive=False, wrap=True, elem_id="compare-table"
        )

    @ctx.model_call
    def on_compare(upload, name, target_name):
        if upload is None:
            raise gr.Error("Upload a scan or pick an example first.")
        path = _path_of(upload)
        shown = upload.get("orig_name") if isinstance(upload, dict) else None
        explained = None if target_name in (None, "", predicted_label) else target_name
        gallery, rows, info = compare_scan(
            ctx.registry.get(name), path, shown or Path(path).name, explained
        )
        return gallery, rows, info

    button.click(
        on_compare,
        inputs=[scan, ctx.model, target],
        outputs=[maps, table, text],
        api_name="compare",
        preprocess=False,
    )

    def on_model(name: str):  # one column per method: the randomised maps line up below
        return gr.update(columns=len(ctx.registry.get(name).methods), value=None), None, ""

    ctx.on_model(on_model, [maps, table, text])


def _path_of(upload: Any) -> str:
    if isinstance(upload, dict):
        return str(upload.get("path") or upload.get("name"))
    return str(getattr(upload, "path", None) or upload)


def build_quiz_tab(ctx: Any) -> None:
    """Test yourself: a round of labelled test scans; you against the model."""
    registry = ctx.registry
    classes = list(registry.get(registry.default).class_names)
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
            image = gr.Image(
                label="Which class is this scan?",
                type="filepath",
                interactive=False,
                height=380,
                elem_id="quiz-scan",
            )
            overlay = gr.Image(
                label="Where the model looked",
                type="pil",
                interactive=False,
                height=380,
                elem_id="quiz-map",
            )
        choice = gr.Radio(classes, label="Your answer", elem_id="quiz-choice")
        with gr.Row():
            answer = gr.Button("Answer", variant="primary", elem_id="quiz-answer")
            following = gr.Button("Next scan", elem_id="quiz-next")
        feedback = gr.Markdown(elem_id="quiz-feedback", elem_classes="teach-big")
        state = gr.State(None)

    def on_start(name, count):
        names = list(registry.get(name).class_names)
        quiz, first, text = quiz_start(registry.directory(name), names, int(count))
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
        return quiz, shown, text, scores, gr.update(interactive=False)

    answer.click(
        on_answer,
        inputs=[state, ctx.model, choice],
        outputs=[state, overlay, feedback, score, answer],
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
        return None, None, None, gr.update(choices=list(registry.get(name).class_names)), ""

    ctx.on_model(on_model, [state, image, overlay, choice, feedback])


#: Learn tab: each concept and the place in the app where it can be seen (tab id).
CONCEPTS = (
    (
        "**Sensitivity, specificity and the confusion matrix**: each cell counts the test "
        "scans of one class given one answer; open a cell to see the scans behind a number.",
        "Model tab: explore the confusion matrix",
        "model",
    ),
    (
        "**Class-agnostic methods** (EigenCAM, attention, rollout) show the same map whatever "
        "class you ask about; **faithfulness** and the **sanity check** tell which maps follow "
        "what the model uses and learnt.",
        "Classify tab: compare all methods",
        "classify",
    ),
    (
        "**Calibration**: a model that says 80% should be right 8 times in 10; the reliability "
        "diagram shows how far it is.",
        "Model tab: reliability diagram",
        "model",
    ),
    (
        "**Generalisation**: a model is only as good as its figures on scans like yours; "
        "evaluate it on your own labelled scans.",
        "Evaluate your scans",
        "evaluate",
    ),
    (
        "**Reading scans yourself**: classify test scans, then compare with the reference and "
        "the model.",
        "Test yourself",
        "quiz",
    ),
)


def build_learn_links(tabs: gr.Tabs) -> None:
    """Buttons that take the reader from a concept to where the app shows it."""
    gr.Markdown("## See it in the app")
    for text, where, tab_id in CONCEPTS:
        with gr.Row(equal_height=True):
            gr.Markdown(text, scale=4)
            button = gr.Button(f"→ {where}", scale=1, size="sm")
        button.click(
            lambda tab_id=tab_id: gr.Tabs(selected=tab_id),
            outputs=[tabs],
            api_visibility="private",
        )


#: Styles of the teaching views: numbers readable from the back of a lecture room.
TEACH_CSS = """
.explorer-matrix [role=gridcell], .explorer-matrix [role=columnheader] {
  font-size: 1.2rem; min-height: 2.6rem; align-items: center;
}
.explorer-matrix [role=gridcell] {cursor: pointer;}
.teach-big p, .teach-big li {font-size: 1.15rem;}
"""
