"""The Classify tab: one scan's probabilities and where the model looked (``/predict``,
``/explain``)."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from mirage_demo.explain import render_overlay
from mirage_demo.images import ImageReadError
from mirage_demo.inference import DEFAULT_COLORMAP, Explanation, Prediction
from mirage_demo.ui.answer import answer_card, answer_label
from mirage_demo.ui.compare import build_compare_section
from mirage_demo.ui.context import (
    METHOD_LABELS,
    PREDICTED,
    STATE_TTL_S,
    AppContext,
    display_name,
    example_label,
    image_file,
    method_name,
    neutral_examples,
    timing_line,
    unreadable,
    upload_path,
)
from mirage_demo.ui.registry import ModelRegistry
from mirage_demo.ui.slides import answer_figure_file, colour_bar_html, file_stem, overlay_alt
from mirage_demo.uncertainty import DEFAULT_LEVEL
from mirage_demo.verdict import verdict_words

__all__ = [
    "build_classify_tab",
    "examples_gallery",
    "explain_scan",
    "overlay_state",
    "predict_scan",
    "reblend",
    "wire_examples",
]

EMPTY_INFO = "Upload a scan or pick an example."
EMPTY_ALT = "Where the model looked: a heat map over the scan (none yet)"
STATE_SIDE = 1024  # the overlay and the per-session state: at most this many pixels a side
MIN_LEVEL, MAX_LEVEL = 0.5, 0.99  # the prediction sets' levels a user may pick


def _answer_text(prediction: Prediction, device: str, what: str = "Prediction") -> str:
    return answer_card(prediction) + timing_line(prediction, what, device)


def predict_scan(
    registry: ModelRegistry,
    upload: Any,
    model_name: str | None = None,
    level: float = DEFAULT_LEVEL,
) -> tuple[dict[str, float] | str, str]:
    """``/predict``: class probabilities (for an image that is not an OCT B-scan, the words
    "Not an OCT B-scan") and the answer card (the verdict, the prediction set, timing)."""
    prediction = _predict(registry, upload, model_name, level)
    text = _answer_text(prediction, str(registry.get(model_name).device))
    return answer_label(prediction), text


def predict_record(
    registry: ModelRegistry,
    upload: Any,
    model_name: str | None = None,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """``/predict_json``: the CLI's ``--json`` record (label, probabilities, the ``trust``
    verdict, prediction set, out-of-distribution flag and score, warnings)."""
    return _predict(registry, upload, model_name, level).record()


def _predict(
    registry: ModelRegistry, upload: Any, model_name: str | None, level: Any
) -> Prediction:
    predictor = registry.get(model_name)
    path = upload_path(upload)
    try:
        return predictor.predict(path, name=display_name(upload, path), level=checked_level(level))
    except ImageReadError as err:
        raise unreadable(err) from err


def predict_scans(
    registry: ModelRegistry,
    uploads: list[Any],
    model_names: list[str | None],
    levels: list[float] | None = None,
) -> tuple[list[dict[str, float] | str | None], list[str]]:
    """Batched ``/predict`` (Gradio ``batch=True``): lists in, lists out, one model call per
    model and level. An unreadable scan gets no probabilities and the reason in its text."""
    probabilities: list[dict[str, float] | str | None] = [None] * len(uploads)
    infos = [""] * len(uploads)
    todo: dict[tuple[str | None, float], list[int]] = {}
    for i, upload in enumerate(uploads):
        if upload is None:
            infos[i] = EMPTY_INFO
            continue
        name = model_names[i] if i < len(model_names) else None
        level = checked_level(levels[i] if levels and i < len(levels) else DEFAULT_LEVEL)
        todo.setdefault((name, level), []).append(i)
    for (name, level), indices in todo.items():
        predictor = registry.get(name)
        paths = [upload_path(uploads[i]) for i in indices]
        names = [display_name(uploads[i], path) for i, path in zip(indices, paths, strict=True)]
        results = predictor.predict_batch(
            paths, batch_size=len(paths), names=names, on_error="return", level=level
        )
        for i, result in zip(indices, results, strict=True):
            if isinstance(result, ImageReadError):
                infos[i] = unreadable(result).message
            else:
                probabilities[i] = answer_label(result)
                infos[i] = _answer_text(result, str(predictor.device))
    return probabilities, infos


def explain_scan(
    registry: ModelRegistry,
    upload: Any,
    model_name: str | None = None,
    method: str = "gradcam",
    target: str | None = PREDICTED,
    opacity: float = 0.5,
    level: float = DEFAULT_LEVEL,
) -> tuple[Image.Image, dict[str, float] | str, str, dict[str, Any]]:
    """``/explain``: the overlay, probabilities (or "Not an OCT B-scan"), the answer card
    and the state to re-blend."""
    predictor = registry.get(model_name)
    path = upload_path(upload)
    name = display_name(upload, path)
    if method not in predictor.methods:
        raise gr.Error(
            f"{html.escape(METHOD_LABELS.get(method, str(method)))} is not available for this "
            "model; choose one of: "
            f"{', '.join(METHOD_LABELS.get(m, m) for m in predictor.methods)}."
        )
    explained_class = None if target in (None, "", PREDICTED) else target
    try:
        explanation = predictor.explain(
            path, method=method, target=explained_class, name=name, level=checked_level(level)
        )
    except ImageReadError as err:
        raise unreadable(err) from err
    except ValueError as err:  # an unknown class: the text may echo what was sent
        raise gr.Error(html.escape(str(err))) from err
    prediction = explanation.prediction
    what = f"Prediction + {METHOD_LABELS.get(explanation.method, explanation.method)}"
    shown = (
        f"Map for class **{explanation.target}**."
        if explanation.class_specific
        else "This map is class-agnostic: it does not depend on the class chosen."
    )
    card = answer_card(prediction, reference=example_label(path), class_names=predictor.class_names)
    info = card + f"{shown}\n\n" + timing_line(prediction, what, str(predictor.device))
    state = overlay_state(explanation, predictor.colormap)
    state["about"] = {
        "scan": name,
        "method": method_name(explanation.method),
        "target": explanation.target if explanation.class_specific else None,
        "label": prediction.label,
        "confidence": prediction.confidence,
        "trust": prediction.trust,
        "verdict": verdict_words(prediction.trust),
        "set": list(prediction.prediction_set or []),
        "level": prediction.level,
    }
    return reblend(state, opacity), answer_label(prediction), info, state


def checked_level(level: Any) -> float:
    """The level a request asks for (a number between 0.5 and 0.99), or a one-line error."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        value = float("nan")
    if not MIN_LEVEL <= value <= MAX_LEVEL:
        raise gr.Error(f"The set's level must be a number from {MIN_LEVEL} to {MAX_LEVEL}.")
    return value


def overlay_state(explanation: Explanation, colormap: str) -> dict[str, Any]:
    """What a session keeps to re-blend its overlay: the scan and heatmap as uint8, at most
    :data:`STATE_SIDE` pixels a side (at most 2 MB, whatever was uploaded)."""
    scan, heatmap = explanation.image, explanation.heatmap
    height, width = scan.shape[:2]
    factor = max(1, math.ceil(max(height, width) / STATE_SIDE))
    size = (max(1, width // factor), max(1, height // factor))

    def small(values: np.ndarray) -> np.ndarray:
        image = Image.fromarray(np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8))
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR) if factor > 1 else image)

    return {"scan": small(scan), "heatmap": small(heatmap), "colormap": colormap}


def reblend(state: dict[str, Any] | None, opacity: float) -> Any:
    """The overlay at an opacity (clamped to [0, 1]), from a session's state (no model call)."""
    if not state:
        return gr.skip()
    try:
        alpha = min(1.0, max(0.0, float(opacity)))
    except (TypeError, ValueError):
        alpha = 0.5
    scan, heatmap = state["scan"] / np.float32(255), state["heatmap"] / np.float32(255)
    return render_overlay(scan, heatmap, state["colormap"], alpha)


@dataclass
class ClassifyView:
    """The Classify tab's components: the scan and its settings, the answer panel."""

    scan: gr.Image
    examples: gr.Gallery | None
    method: gr.Dropdown
    target: gr.Dropdown
    opacity: gr.Slider
    level: gr.Slider
    probabilities: gr.Label
    overlay: gr.Image
    colour_bar: gr.HTML
    info: gr.Markdown
    figure_button: gr.Button
    figure: gr.File
    state: gr.State
    predict_button: gr.Button
    record: gr.JSON  # /predict_json's answer (not shown)

    @property
    def explain_inputs(self) -> list[Any]:
        return [self.scan, self.method, self.target, self.opacity, self.level]

    @property
    def explain_outputs(self) -> list[Any]:
        return [self.overlay, self.probabilities, self.info, self.state]


def build_classify_tab(ctx: AppContext) -> None:
    """Upload or pick a scan; see the probabilities, how far to trust the answer, and an
    explanation overlay."""
    with gr.Tab("Classify", id="classify"):
        view = _classify_layout(ctx)
        build_compare_section(ctx, view.scan, view.target, PREDICTED)
    _wire_explain(ctx, view)
    _wire_figure(ctx, view)
    _wire_predict(ctx, view)
    wire_examples(ctx, view.examples, view.scan)


def _classify_layout(ctx: AppContext) -> ClassifyView:
    """Left: the scan, the examples, the explanation settings and the set's level. Right: the
    probabilities, the overlay, the text (warnings, the set, timing). On a phone: the scan,
    the examples, the answer, then the settings."""
    config = ctx.registry.config()
    with gr.Row(elem_classes="ph-flat"):
        with gr.Column(scale=1):
            scan = gr.Image(
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                label="OCT B-scan: drop, paste or click",
                height=320,
                alt_text="The OCT B-scan to classify",
                elem_id="scan",
                elem_classes=["ph-1", "phone-short"],
            )
            examples = examples_gallery(ctx)
            with gr.Row(elem_classes="ph-7"):
                # the model's own methods arrive with on_model (they need the model)
                method = gr.Dropdown(
                    [(label, m) for m, label in METHOD_LABELS.items()],
                    value="gradcam",
                    label="Explanation",
                )
                target = gr.Dropdown(
                    [PREDICTED, *config.class_names], value=PREDICTED, label="Explain class"
                )
            with gr.Row(elem_classes="ph-8"):
                opacity = gr.Slider(
                    0.0, 1.0, value=0.5, step=0.05, label="Opacity", elem_id="opacity"
                )
                level = gr.Slider(
                    MIN_LEVEL,
                    MAX_LEVEL,
                    value=DEFAULT_LEVEL,
                    step=0.01,
                    label="Prediction set level",
                    info="how often the set should hold the true class",
                    elem_id="level",
                )
        with gr.Column(scale=1):
            answer = _answer_panel(config.num_classes)
    return ClassifyView(
        scan,
        examples,
        method,
        target,
        opacity,
        level,
        *answer,
        state=gr.State(None, time_to_live=STATE_TTL_S),
        predict_button=gr.Button("Predict only", visible=False),
        record=gr.JSON(visible=False),
    )


def _answer_panel(classes: int) -> tuple[Any, ...]:
    """The answer: probabilities, the overlay with its colour bar, the text, the figure
    button and its file (in a phone's order: ``ph-3`` ...)."""
    probabilities = gr.Label(
        num_top_classes=classes,
        label="Class probabilities",
        elem_id="probabilities",
        elem_classes="ph-3",
    )
    overlay = gr.Image(
        label="Where the model looked",
        elem_id="overlay",
        type="filepath",
        interactive=False,
        height=320,
        format="png",
        alt_text=EMPTY_ALT,
        buttons=["download", "fullscreen"],
        elem_classes="ph-4",
    )
    colour_bar = gr.HTML(colour_bar_html(DEFAULT_COLORMAP), elem_classes="ph-5", padding=False)
    info = gr.Markdown(EMPTY_INFO, elem_id="info", elem_classes="ph-6")
    figure_button = gr.Button(
        "Figure for slides (PNG: scan, map, colour bar, caption)",
        elem_id="figure-button",
        size="sm",
        elem_classes="ph-9",
    )
    figure = gr.File(
        label="Figure for slides", elem_id="figure", visible=False, elem_classes="ph-9"
    )
    return probabilities, overlay, colour_bar, info, figure_button, figure


def examples_gallery(
    ctx: AppContext, elem_id: str = "examples", columns: int | None = None
) -> gr.Gallery | None:
    """The bundled example scans as thumbnails named "Example scan N" (copies under neutral
    names, in an order that does not follow their class); None when there are none. Wire it
    with :func:`wire_examples`."""
    if not ctx.examples:
        return None
    return gr.Gallery(
        [
            (path, f"Example scan {n}")
            for n, (path, _) in enumerate(neutral_examples(ctx.examples), start=1)
        ],
        label="Or pick a real scan (Kermany et al. 2018, CC BY 4.0)",
        columns=columns or len(ctx.examples),
        height="auto",
        object_fit="cover",
        allow_preview=False,
        buttons=[],
        elem_id=elem_id,
        elem_classes=["ph-2", "examples-strip"],
    )


def wire_examples(ctx: AppContext, gallery: gr.Gallery | None, scan: gr.Image) -> None:
    """A click on an example thumbnail of ``gallery`` puts that scan in the upload box
    ``scan`` (whose change handlers do the rest)."""
    if gallery is None:
        return
    ordered = [path for path, _ in neutral_examples(ctx.examples)]

    def on_pick(evt: gr.SelectData):
        return ordered[int(evt.index)] if 0 <= int(evt.index) < len(ordered) else gr.skip()

    gallery.select(on_pick, outputs=[scan], api_visibility="private")


def _wire_explain(ctx: AppContext, view: ClassifyView) -> None:
    """``/explain`` on every change of the scan or its settings (and of the model); the
    opacity re-blends the session's overlay without the model."""
    registry = ctx.registry

    def explained(upload, name, method_name, target_name, alpha, level):
        if upload is None:  # cleared
            return None, None, EMPTY_INFO, None
        picture, *rest = explain_scan(
            registry, upload, name, method_name, target_name, alpha, level
        )
        return image_file(picture, "overlay", f"map-{file_stem(rest[-1])}"), *rest

    @ctx.model_call
    def on_explain(upload, name, method_name, target_name, alpha, level):
        return explained(upload, name, method_name, target_name, alpha, level)  # the API: a path

    @ctx.model_call
    def on_explain_page(upload, name, method_name, target_name, alpha, level):
        path, *rest = explained(upload, name, method_name, target_name, alpha, level)
        alt = EMPTY_ALT if path is None else overlay_alt(rest[-1])
        return gr.Image(value=path, alt_text=alt), *rest

    def on_reblend(saved, alpha):
        picture = reblend(saved, alpha)
        if not isinstance(picture, Image.Image):
            return picture
        return image_file(
            picture, "overlay", f"map-{file_stem(saved)}" if "about" in saved else None
        )

    def on_model(name):
        predictor = registry.get(name)
        methods = [(METHOD_LABELS.get(m, m), m) for m in predictor.methods]
        chosen = "gradcam" if "gradcam" in predictor.methods else methods[0][1]
        return (
            gr.update(choices=methods, value=chosen),
            gr.update(choices=[PREDICTED, *predictor.class_names], value=PREDICTED),
            gr.update(num_top_classes=len(predictor.class_names)),
            colour_bar_html(predictor.colormap),
        )

    inputs = [view.scan, ctx.model, *view.explain_inputs[1:]]
    explain = dict(
        fn=on_explain_page, inputs=inputs, outputs=view.explain_outputs, preprocess=False
    )
    gr.on(
        [view.scan.change, view.method.change, view.target.change, view.level.release],
        **explain,
        api_visibility="private",
        trigger_mode="always_last",
        **ctx.model_events,
    )
    view.predict_button.click(  # /explain for API clients: the overlay as a file path
        on_explain,
        inputs=inputs,
        outputs=view.explain_outputs,
        preprocess=False,
        api_name="explain",
        **ctx.model_events,
    )
    view.opacity.release(
        on_reblend,
        inputs=[view.state, view.opacity],
        outputs=[view.overlay],
        api_visibility="private",
        trigger_mode="always_last",
    )
    changed = ctx.on_model(
        on_model, [view.method, view.target, view.probabilities, view.colour_bar]
    )
    changed.then(**explain, api_visibility="private", **ctx.model_events)


def _wire_figure(ctx: AppContext, view: ClassifyView) -> None:
    """*Figure for slides*: the answer as one PNG; a new scan hides the last one's."""
    view.scan.change(
        lambda: gr.update(value=None, visible=False),
        outputs=[view.figure],
        api_visibility="private",
    )

    def on_figure(saved, name, alpha):
        return gr.update(value=answer_figure_file(saved, name, alpha), visible=True)

    view.figure_button.click(
        on_figure,
        inputs=[view.state, ctx.model, view.opacity],
        outputs=[view.figure],
        api_visibility="private",
    )


def _wire_predict(ctx: AppContext, view: ClassifyView) -> None:
    """The API's ``/predict`` (probabilities and text; batched when ``--max-batch`` allows)
    and ``/predict_json`` (the CLI's record); the page itself explains."""
    registry = ctx.registry

    @ctx.model_call
    def on_predict(upload, name, level):
        return predict_scan(registry, upload, name, level)

    @ctx.model_call
    def on_record(upload, name, level):
        return predict_record(registry, upload, name, level)

    events: dict[str, Any] = {"fn": on_predict}
    if ctx.max_batch > 1:  # Gradio hands over up to max_batch waiting requests at once

        @ctx.model_call
        def on_predict_batch(uploads, names, levels):
            return predict_scans(registry, uploads, names, levels)

        events = {"fn": on_predict_batch, "batch": True, "max_batch_size": ctx.max_batch}
    inputs = [view.scan, ctx.model, view.level]
    common = dict(inputs=inputs, preprocess=False, **ctx.model_events)
    view.predict_button.click(
        outputs=[view.probabilities, view.info], api_name="predict", **events, **common
    )
    view.predict_button.click(on_record, outputs=[view.record], api_name="predict_json", **common)
