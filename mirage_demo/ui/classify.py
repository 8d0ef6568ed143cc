"""The Classify tab: one scan's probabilities and where the model looked (``/predict``,
``/explain``)."""

from __future__ import annotations

import html
import math
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from mirage_demo.data import ImageReadError
from mirage_demo.explain import render_overlay
from mirage_demo.inference import Explanation
from mirage_demo.ui.compare import build_compare_section
from mirage_demo.ui.context import (
    METHOD_LABELS,
    PREDICTED,
    STATE_TTL_S,
    AppContext,
    display_name,
    example_label,
    image_file,
    reference_line,
    timing_line,
    unreadable,
    upload_path,
    warnings_markdown,
)
from mirage_demo.ui.registry import ModelRegistry

__all__ = ["build_classify_tab", "explain_scan", "overlay_state", "predict_scan", "reblend"]

EMPTY_INFO = "Upload a scan or pick an example."
STATE_SIDE = 1024  # the overlay and the per-session state: at most this many pixels a side


def predict_scan(
    registry: ModelRegistry, upload: Any, model_name: str | None = None
) -> tuple[dict[str, float], str]:
    """``/predict``: class probabilities and a short text (warnings, timing)."""
    predictor = registry.get(model_name)
    path = upload_path(upload)
    name = display_name(upload, path)
    try:
        prediction = predictor.predict(path, name=name)
    except ImageReadError as err:
        raise unreadable(err) from err
    info = warnings_markdown(prediction) + timing_line(
        prediction, "Prediction", str(predictor.device)
    )
    return prediction.probabilities, info


def predict_scans(
    registry: ModelRegistry, uploads: list[Any], model_names: list[str | None]
) -> tuple[list[dict[str, float] | None], list[str]]:
    """Batched ``/predict`` (Gradio ``batch=True``): lists in, lists out, one model call per
    model. An unreadable scan gets no probabilities and the reason in its text."""
    probabilities: list[dict[str, float] | None] = [None] * len(uploads)
    infos = [""] * len(uploads)
    todo: dict[str | None, list[int]] = {}
    for i, upload in enumerate(uploads):
        if upload is None:
            infos[i] = EMPTY_INFO
        else:
            todo.setdefault(model_names[i] if i < len(model_names) else None, []).append(i)
    for name, indices in todo.items():
        predictor = registry.get(name)
        paths = [upload_path(uploads[i]) for i in indices]
        names = [display_name(uploads[i], path) for i, path in zip(indices, paths, strict=True)]
        results = predictor.predict_batch(
            paths, batch_size=len(paths), names=names, on_error="return"
        )
        for i, result in zip(indices, results, strict=True):
            if isinstance(result, ImageReadError):
                infos[i] = unreadable(result).message
            else:
                probabilities[i] = result.probabilities
                infos[i] = warnings_markdown(result) + timing_line(
                    result, "Prediction", str(predictor.device)
                )
    return probabilities, infos


def explain_scan(
    registry: ModelRegistry,
    upload: Any,
    model_name: str | None = None,
    method: str = "gradcam",
    target: str | None = PREDICTED,
    opacity: float = 0.5,
) -> tuple[Image.Image, dict[str, float], str, dict[str, Any]]:
    """``/explain``: the overlay, probabilities, a short text and the state to re-blend."""
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
        explanation = predictor.explain(path, method=method, target=explained_class, name=name)
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
    info = (
        warnings_markdown(prediction)
        + reference_line(
            example_label(path), prediction.label, prediction.confidence, predictor.class_names
        )
        + f"Predicted **{prediction.label}** ({prediction.confidence:.0%}). {shown}\n\n"
        + timing_line(prediction, what, str(predictor.device))
    )
    state = overlay_state(explanation, predictor.colormap)
    return reblend(state, opacity), prediction.probabilities, info, state


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


def build_classify_tab(ctx: AppContext) -> None:
    """Upload or pick a scan; see the probabilities and an explanation overlay."""
    registry = ctx.registry
    config = registry.config()
    with gr.Tab("Classify", id="classify"):
        with gr.Row():
            with gr.Column(scale=1):
                scan = gr.Image(
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    label="OCT B-scan (drop, paste or click to upload)",
                    height=320,
                )
                with gr.Row():
                    # the model's own methods arrive with on_model (they need the model)
                    method = gr.Dropdown(
                        [(label, m) for m, label in METHOD_LABELS.items()],
                        value="gradcam",
                        label="Explanation",
                    )
                    target = gr.Dropdown(
                        [PREDICTED, *config.class_names], value=PREDICTED, label="Explain class"
                    )
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Opacity")
                if ctx.examples:
                    gr.Examples(
                        examples=[[path] for path, _ in ctx.examples],
                        example_labels=[cls for _, cls in ctx.examples],
                        inputs=[scan],
                        label="Real scans from Kermany et al. 2018 (CC BY 4.0)",
                        examples_per_page=12,
                    )
            with gr.Column(scale=1):
                probabilities = gr.Label(
                    num_top_classes=config.num_classes,
                    label="Class probabilities",
                    elem_id="probabilities",
                )
                overlay = gr.Image(
                    label="Where the model looked",
                    elem_id="overlay",
                    type="pil",
                    interactive=False,
                    height=320,
                    buttons=["download", "fullscreen"],
                )
                info = gr.Markdown(EMPTY_INFO, elem_id="info")
        build_compare_section(ctx, scan, target, PREDICTED)
        state = gr.State(None, time_to_live=STATE_TTL_S)
        predict_button = gr.Button("Predict only", visible=False)

    @ctx.model_call
    def on_explain(upload, name, method_name, target_name, alpha):
        if upload is None:  # cleared
            return None, None, EMPTY_INFO, None
        picture, *rest = explain_scan(registry, upload, name, method_name, target_name, alpha)
        return image_file(picture), *rest

    def on_reblend(saved, alpha):
        picture = reblend(saved, alpha)
        return image_file(picture) if isinstance(picture, Image.Image) else picture

    @ctx.model_call
    def on_predict(upload, name):
        return predict_scan(registry, upload, name)

    def on_model(name):
        predictor = registry.get(name)
        methods = [(METHOD_LABELS.get(m, m), m) for m in predictor.methods]
        chosen = "gradcam" if "gradcam" in predictor.methods else methods[0][1]
        return (
            gr.update(choices=methods, value=chosen),
            gr.update(choices=[PREDICTED, *predictor.class_names], value=PREDICTED),
            gr.update(num_top_classes=len(predictor.class_names)),
        )

    explain_inputs = [scan, ctx.model, method, target, opacity]
    explain_outputs = [overlay, probabilities, info, state]
    gr.on(
        [scan.change, method.change, target.change],
        on_explain,
        inputs=explain_inputs,
        outputs=explain_outputs,
        api_name="explain",
        preprocess=False,
        trigger_mode="always_last",
        **ctx.model_events,
    )
    opacity.release(
        on_reblend, inputs=[state, opacity], outputs=[overlay], api_visibility="private"
    )
    if ctx.max_batch > 1:  # Gradio hands over up to max_batch waiting requests at once

        @ctx.model_call
        def on_predict_batch(uploads, names):
            return predict_scans(registry, uploads, names)

        predict_events = {"fn": on_predict_batch, "batch": True, "max_batch_size": ctx.max_batch}
    else:
        predict_events = {"fn": on_predict}
    predict_button.click(
        inputs=[scan, ctx.model],
        outputs=[probabilities, info],
        api_name="predict",
        preprocess=False,
        **predict_events,
        **ctx.model_events,
    )
    ctx.on_model(on_model, [method, target, probabilities]).then(
        on_explain,
        inputs=explain_inputs,
        outputs=explain_outputs,
        preprocess=False,
        api_visibility="private",
        **ctx.model_events,
    )
