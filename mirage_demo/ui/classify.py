"""The Classify tab: one scan's probabilities and where the model looked (``/predict``,
``/explain``)."""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from mirage_demo.data import ImageReadError
from mirage_demo.explain import render_overlay
from mirage_demo.ui.context import (
    METHOD_LABELS,
    PREDICTED,
    AppContext,
    display_name,
    timing_line,
    unreadable,
    upload_path,
    warnings_markdown,
)
from mirage_demo.ui.registry import ModelRegistry

__all__ = ["build_classify_tab", "explain_scan", "predict_scan", "reblend"]

EMPTY_INFO = "Upload a scan or pick an example."


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
            f"{METHOD_LABELS.get(method, method)} is not available for this model; "
            f"choose one of: {', '.join(METHOD_LABELS.get(m, m) for m in predictor.methods)}."
        )
    explained_class = None if target in (None, "", PREDICTED) else target
    try:
        explanation = predictor.explain(
            path, method=method, target=explained_class, name=name, opacity=float(opacity)
        )
    except ImageReadError as err:
        raise unreadable(err) from err
    except ValueError as err:
        raise gr.Error(str(err)) from err
    prediction = explanation.prediction
    what = f"Prediction + {METHOD_LABELS.get(explanation.method, explanation.method)}"
    shown = (
        f"Map for class **{explanation.target}**."
        if explanation.class_specific
        else "This map is class-agnostic: it does not depend on the class chosen."
    )
    info = (
        warnings_markdown(prediction)
        + f"Predicted **{prediction.label}** ({prediction.confidence:.0%}). {shown}\n\n"
        + timing_line(prediction, what, str(predictor.device))
    )
    state = {
        "scan": explanation.image,
        "heatmap": explanation.heatmap,
        "colormap": predictor.colormap,
    }
    return explanation.overlay, prediction.probabilities, info, state


def reblend(state: dict[str, Any] | None, opacity: float) -> Any:
    """A new overlay at another opacity, from the last explanation (no model call)."""
    if not state:
        return gr.skip()
    return render_overlay(state["scan"], state["heatmap"], state["colormap"], float(opacity))


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
        state = gr.State(None)
        predict_button = gr.Button("Predict only", visible=False)

    @ctx.model_call
    def on_explain(upload, name, method_name, target_name, alpha):
        if upload is None:  # cleared
            return None, None, EMPTY_INFO, None
        return explain_scan(registry, upload, name, method_name, target_name, alpha)

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
    )
    opacity.release(reblend, inputs=[state, opacity], outputs=[overlay], api_visibility="private")
    predict_button.click(
        on_predict,
        inputs=[scan, ctx.model],
        outputs=[probabilities, info],
        api_name="predict",
        preprocess=False,
    )
    ctx.on_model(on_model, [method, target, probabilities]).then(
        on_explain,
        inputs=explain_inputs,
        outputs=explain_outputs,
        preprocess=False,
        api_visibility="private",
    )
