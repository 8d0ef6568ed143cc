"""The feature map: scans placed by the model's features in 2-D; choose one to open it.

On the Model tab (the checkpoint's test scans, :func:`~mirage_demo.testscans.scan_set_for`)
and on the Evaluate tab (uploaded labelled scans, once evaluated). The map is computed once per
model and scan set (:func:`mirage_demo.featuremap.cached_feature_map`); a chosen point opens
its scan with the map of the predicted class, as the confusion-matrix explorer does
(:func:`~mirage_demo.ui.explore.explorer_open`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np

from mirage_demo.featuremap import (
    PROJECTIONS,
    FeatureMap,
    cached_feature_map,
    compute_feature_map,
    feature_map_key,
    nearest_point,
    plot_feature_map,
)
from mirage_demo.testscans import ScanSet, scan_set_for
from mirage_demo.ui.context import STATE_TTL_S, AppContext, image_file, output_file, picture
from mirage_demo.ui.explore import ExplorerState, explorer_open

__all__ = [
    "FeatureMapState",
    "build_feature_map",
    "feature_map_choose",
    "feature_map_click",
    "feature_map_draw",
    "feature_map_for",
]

MAP_GPU_SECONDS = 60  # embedding a few hundred scans, once per model
FEATURE_MAP_INTRO = (
    "Each point is a scan, placed by the **features** the model computes before its last "
    "layer (the numbers a probe is fitted on). Scans the model finds alike lie close together. "
    "Colour: the reference class; **a cross: the model's answer was wrong**. Clusters that "
    "follow the colours mean the features already separate the diseases. **Click a point** "
    "(or pick a scan in the list) to open it with its heat map."
)


@dataclass
class FeatureMapState:
    """A session's map: the points, how they are drawn and the one chosen."""

    fmap: FeatureMap
    method: str
    pixels: np.ndarray  # (n, 2) each point's position in the drawn picture
    explorer: ExplorerState  # ``shown``: the map's scans, in point order
    chosen: int | None = None


def feature_map_draw(state: FeatureMapState, method: str | None = None) -> tuple[str, Any]:
    """Draw ``state``'s map (by ``method``, else its own) into a new file: ``(path, state)``."""
    if method in state.fmap.coords:
        state.method = method
    path = output_file("featuremap", ".png")
    state.pixels = plot_feature_map(state.fmap, state.method, path, state.chosen)
    return str(path), state


def feature_map_for(
    predictor: Any, scans: ScanSet | None, method: str, why: str = ""
) -> tuple[str | None, str, FeatureMapState | None]:
    """``(picture, text, state)`` of ``scans`` placed by ``predictor``'s features (computed on
    first use, then cached); ``why`` says why there are no scans."""
    if scans is None or not scans.entries:
        return None, why or "There are no labelled scans to place.", None
    key = feature_map_key(predictor.model, predictor.preprocessing, scans)

    model, preprocessing = predictor.model, predictor.preprocessing
    fmap = cached_feature_map(
        key, lambda: compute_feature_map(model, preprocessing, scans, predictor.device)
    )
    if not fmap.entries:
        return None, "None of these scans could be read.", None
    method = method if method in fmap.coords else next(iter(fmap.coords))
    explorer = ExplorerState(list(fmap.class_names), scans.matrix(), scans, shown=fmap.entries)
    state = FeatureMapState(fmap, method, np.zeros((0, 2)), explorer)
    path, state = feature_map_draw(state)
    seconds = fmap.seconds
    cost = f"embedding {seconds['embedding']:.1f} s" + "".join(
        f", {name} {seconds[name]:.1f} s" for name in PROJECTIONS if name in seconds
    )
    wrong = int(fmap.wrong.sum())
    text = (
        f"**{len(fmap.entries)} scans, {wrong} of them answered wrongly by the model.** "
        f"{PROJECTIONS[method]}. Scans: {scans.origin}. Cost: {cost} (once per model; "
        "redrawing is instant)."
    )
    return path, text, state


def feature_map_click(state: FeatureMapState | None, x: float, y: float) -> int | None:
    """The point drawn at pixel ``(x, y)`` of the picture, if any."""
    if state is None:
        return None
    return nearest_point(state.pixels, x, y)


def feature_map_choose(
    predictor: Any, state: FeatureMapState | None, index: int | None
) -> tuple[Any, Any, str, FeatureMapState | None]:
    """Open point ``index``: ``(picture with it ringed, its heat map, caption, state)``."""
    if state is None:
        return None, None, "Draw the map first.", state
    if index is None or not 0 <= index < len(state.fmap.entries):
        return gr.skip(), None, "No scan there: click on a point.", state
    overlay, text = explorer_open(predictor, state.explorer, index)
    state.chosen = index
    path, state = feature_map_draw(state)
    return path, (image_file(overlay) if overlay is not None else None), text, state


def _choices(state: FeatureMapState | None) -> Any:
    if state is None:
        return gr.update(choices=[], value=None)
    names = [
        f"{e.file}: labelled {e.true}, said {e.predicted}" + ("" if e.correct else " (wrong)")
        for e in state.fmap.entries
    ]
    return gr.update(choices=names, value=None)


def build_feature_map(ctx: AppContext, prefix: str, source: gr.State | None = None) -> None:
    """Lay out a feature map and wire it: the Model tab's test scans, or (``source``: an
    explorer's state) the scans of that explorer."""
    gr.Markdown("## How the model arranges the scans (feature map)")
    gr.Markdown(FEATURE_MAP_INTRO, elem_classes="teach-big")
    with gr.Row(equal_height=True):
        method = gr.Radio(list(PROJECTIONS), value="t-SNE", label="Projection to 2-D", scale=2)
        button = gr.Button("Draw the feature map", variant="primary", scale=1)
    text = gr.Markdown(elem_id=f"{prefix}-text")
    plot = gr.Image(
        label="Feature map: click a point",
        interactive=False,
        type="filepath",
        elem_id=f"{prefix}-plot",
        buttons=["download", "fullscreen"],
        alt_text="Feature map: each scan a point placed by the model's features, coloured by "
        "its class; crosses mark the model's wrong answers",
    )
    pick = gr.Dropdown([], type="index", label="…or pick a scan", elem_id=f"{prefix}-pick")
    with gr.Row():
        overlay = picture("The chosen scan and where the model looked", f"{prefix}-overlay")
        caption = gr.Markdown(elem_id=f"{prefix}-caption")
    state = gr.State(None, time_to_live=STATE_TTL_S)

    @ctx.model_call(duration=MAP_GPU_SECONDS)
    def on_draw(name: str, how: str, scans_state: Any = None):
        registry = ctx.registry
        if source is None:
            scans, why = scan_set_for(registry.directory(name))
        else:
            scans = getattr(scans_state, "scans", None)
            why = "Evaluate a zip of labelled scans first."
        path, message, new = feature_map_for(registry.get(name), scans, how, why)
        return path, message, new, _choices(new), None, ""

    inputs = [ctx.model, method] + ([source] if source is not None else [])
    button.click(
        on_draw,
        inputs=inputs,
        outputs=[plot, text, state, pick, overlay, caption],
        api_visibility="private",
        **ctx.model_events,
    )

    def on_method(current: FeatureMapState | None, how: str):
        if current is None:
            return gr.skip(), current
        return feature_map_draw(current, how)

    method.change(
        on_method, inputs=[state, method], outputs=[plot, state], api_visibility="private"
    )

    @ctx.model_call
    def on_click(current: FeatureMapState | None, name: str, evt: gr.SelectData):
        x, y = evt.index
        index = feature_map_click(current, x, y)
        return feature_map_choose(ctx.registry.get(name), current, index)

    plot.select(
        on_click,
        inputs=[state, ctx.model],
        outputs=[plot, overlay, caption, state],
        api_visibility="private",
        **ctx.model_events,
    )

    @ctx.model_call
    def on_pick(current: FeatureMapState | None, name: str, index: int | None):
        if index is None:
            return gr.skip(), gr.skip(), gr.skip(), current
        return feature_map_choose(ctx.registry.get(name), current, index)

    pick.input(
        on_pick,
        inputs=[state, ctx.model, pick],
        outputs=[plot, overlay, caption, state],
        api_visibility="private",
        **ctx.model_events,
    )

    def on_model(_name: str):
        return None, "", None, _choices(None), None, ""

    ctx.model.change(
        on_model,
        inputs=[ctx.model],
        outputs=[plot, text, state, pick, overlay, caption],
        api_visibility="private",
    )
