"""The confusion-matrix explorer: choose a cell, see its scans, open one with its map.

Used twice: in the Model tab on the checkpoint's own test scans
(:meth:`~mirage_demo.ui.registry.ModelRegistry.scan_set`: the bundled copies, the original
images in a folder the app was given, or a sentence saying why they cannot be shown) and in
the Evaluate tab on uploaded labelled scans.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import pandas as pd

from mirage_demo.figures import describe_heatmap
from mirage_demo.images import ImageReadError
from mirage_demo.inference import DEFAULT_COLORMAP
from mirage_demo.testscans import ScanEntry, ScanSet
from mirage_demo.ui.answer import answer_card
from mirage_demo.ui.context import (
    STATE_TTL_S,
    AppContext,
    method_name,
    picture,
    shown_picture,
)
from mirage_demo.ui.slides import colour_bar_html
from mirage_demo.verdict import NOT_A_BSCAN

__all__ = [
    "ExplorerState",
    "ExplorerViews",
    "build_model_explorer",
    "explorer_cell",
    "explorer_open",
    "explorer_view",
    "explorer_views",
    "matrix_frame",
]

MAX_GALLERY = 60
CORNER = "true ↓ said →"  # rows: the reference class; columns: the model's answer


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


def explorer_view(
    found: tuple[ScanSet | None, str], report: dict[str, Any] | None, class_names: list[str]
):
    """``(matrix, message, state)`` for a checkpoint: its test scans when it has them
    (``found``: :meth:`~mirage_demo.ui.registry.ModelRegistry.scan_set`)."""
    scans, message = found
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
                f"{state.counts[row][column - 1]} scan(s) of class {true} predicted {predicted}: "
                "their images are not available here."
            ),
            state,
        )
    entries = state.scans.cell(true, predicted)
    if entries and not entries[0].image.exists():
        return [], "These scans are no longer kept: evaluate them again to explore them.", state
    state.cell, state.shown = (true, predicted), entries[:MAX_GALLERY]
    verdict = "right" if true == predicted else "wrong"
    noun = "scan" if len(entries) == 1 else "scans"
    head = f"**{len(entries)} {noun} labelled {true}, predicted {predicted}**"
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
        raise gr.Error(html.escape(f"Cannot open {entry.file}: {err}")) from err
    now = explanation.prediction
    text = f"**{html.escape(entry.file)}**: {method_name(method)} map for {entry.predicted}.\n\n"
    text += answer_card(
        now, reference=entry.true, class_names=predictor.class_names, guarantee=False
    )
    if now.label != entry.predicted and now.trust != NOT_A_BSCAN:
        text += (
            f"(On the original scan, the one the matrix counts, it said {entry.predicted} "
            f"{entry.probabilities[entry.predicted]:.0%}; the picture shown here is a "
            "downsized copy.)"
        )
    overlay = explanation.overlay
    overlay.info["alt_text"] = describe_heatmap(
        method_name(method), entry.predicted, explanation.heatmap, f"a scan labelled {entry.true}"
    )
    return overlay, text


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


def explorer_views(ctx: AppContext, prefix: str) -> ExplorerViews:
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
                columns=3,
                height=420,
                object_fit="contain",
                allow_preview=False,
                elem_id=f"{prefix}-gallery",
            )
    with gr.Row():
        overlay = picture(
            "The chosen scan and where the model looked",
            f"{prefix}-overlay",
            elem_classes="phone-short",
        )
        with gr.Column():
            caption = gr.Markdown(elem_id=f"{prefix}-caption")
            gr.HTML(colour_bar_html(DEFAULT_COLORMAP), padding=False)
    state = gr.State(None, time_to_live=STATE_TTL_S)

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
        overlay, text = explorer_open(ctx.registry.get(name), current, int(evt.index))
        return shown_picture(overlay), text  # a new file each

    gallery.select(
        on_open,
        inputs=[state, ctx.model],
        outputs=[overlay, caption],
        api_visibility="private",
        **ctx.model_events,
    )
    return ExplorerViews(matrix, message, gallery, overlay, caption, state)


def build_model_explorer(ctx: AppContext) -> None:
    """The Model tab's explorer of the checkpoint's own test scans."""
    gr.Markdown("## Explore the confusion matrix", elem_id="explorer-heading")
    views = explorer_views(ctx, "explorer")

    def on_model(name: str):
        registry = ctx.registry
        names = list(registry.config(name).class_names)
        return explorer_view(registry.scan_set(name), registry.report(name), names)

    ctx.on_model(on_model, views.outputs)
