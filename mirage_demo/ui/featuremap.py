"""The feature map: scans placed by the model's features in 2-D; choose one to open it.

On the Model tab (the checkpoint's test scans, :meth:`ModelRegistry.scan_set`) and on the
Evaluate tab (uploaded labelled scans, once evaluated). Two ways to a map:

- **Show** (a map that needs no model: precomputed beside the checkpoint,
  :func:`mirage_demo.featuremap.load_precomputed`, or computed earlier and kept in memory): at
  once, in no model lane, so it never waits behind a long job;
- **Compute** (embedding at most :data:`~mirage_demo.featuremap.MAX_MAP_SCANS` scans, then the
  projection): in the long-jobs lane beside ``/evaluate`` and ``/adapt``, so a ``/predict``
  never waits for it, with a progress bar (scans embedded of all, time left). Before the click,
  the tab says it is not precomputed and what it costs.

A chosen point opens its scan with the map of the predicted class, as the confusion-matrix
explorer does (:func:`~mirage_demo.ui.explore.explorer_open`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from mirage_demo.featuremap import (
    MAX_MAP_SCANS,
    PROJECTIONS,
    FeatureMap,
    FeatureMapError,
    cached_feature_map,
    capped,
    compute_feature_map,
    feature_map_key,
    load_precomputed,
    map_digest,
    nearest_point,
    peek_feature_map,
    plot_feature_map,
)
from mirage_demo.testscans import ScanSet
from mirage_demo.ui.context import STATE_TTL_S, AppContext, image_file, output_file, picture
from mirage_demo.ui.explore import ExplorerState, explorer_open

__all__ = [
    "FeatureMapState",
    "build_feature_map",
    "feature_map_choose",
    "feature_map_click",
    "feature_map_draw",
    "feature_map_for",
    "feature_map_ready",
    "feature_map_status",
]

MAP_GPU_SECONDS = 120  # embedding up to 1,000 scans, once per model
FEATURE_MAP_INTRO = (
    "Each point is a scan, placed by the **features** the model computes before its last "
    "layer (the numbers a probe is fitted on). Scans the model finds alike lie close together. "
    "Colour: the reference class; **a cross: the model's answer was wrong**. Clusters that "
    "follow the colours mean the features already separate the diseases. **Click a point** "
    "(or pick a scan in the list) to open it with its heat map."
)
EVALUATE_NOTE = (
    "Computing the map runs the model again on every scan you evaluated (at most "
    f"{MAX_MAP_SCANS:,}): about as long as the evaluation took. A bar shows its progress."
)
_seconds_per_scan: dict[str, float] = {}  # measured here, per model: the next warning's estimate


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


def _map_key(directory: Path | None, scans: ScanSet) -> str | None:
    """The key of a checkpoint's map (no model needed), else None."""
    return map_digest(directory, scans) if directory is not None else None


def feature_map_ready(directory: Path | None, scans: ScanSet) -> FeatureMap | None:
    """A checkpoint's map that needs no model now: kept in memory, or precomputed beside it
    (then kept). ``scans`` must be :func:`~mirage_demo.featuremap.capped` already."""
    key = _map_key(directory, scans)
    if key is None:
        return None
    found = peek_feature_map(key)
    if found is None and (loaded := load_precomputed(directory, scans)) is not None:
        found = cached_feature_map(key, lambda: loaded)
    return found


def _shown(fmap: FeatureMap, scans: ScanSet, total: int, method: str) -> tuple[str, str, Any]:
    """``(picture, text, state)`` of a map with its projection ``method``."""
    explorer = ExplorerState(list(fmap.class_names), scans.matrix(), scans, shown=fmap.entries)
    state = FeatureMapState(fmap, method, np.zeros((0, 2)), explorer)
    path, state = feature_map_draw(state)
    wrong = int(fmap.wrong.sum())
    text = f"**{len(fmap.entries)} scans, {wrong} of them answered wrongly by the model.** "
    if total > len(scans.entries):
        text += f"(A random {len(scans.entries):,} of the {total:,}: a map places at most that.) "
    text += f"{PROJECTIONS[method]}. Scans: {scans.origin}. "
    if fmap.precomputed:
        text += "Precomputed with the model, checked to match it and these scans."
    else:
        cost = ", ".join(f"{name} {s:.1f} s" for name, s in fmap.seconds.items())
        text += f"Cost: {cost} (once per model; redrawing is instant)."
    return path, text, state


def feature_map_for(
    predictor: Any,
    scans: ScanSet | None,
    method: str,
    why: str = "",
    directory: Path | None = None,
    progress: Any = None,
) -> tuple[str | None, str, FeatureMapState | None]:
    """``(picture, text, state)`` of ``scans`` (at most :data:`MAX_MAP_SCANS`) placed by
    ``predictor``'s features: ready, or computed now (``progress((done, total), desc=...)``
    as scans are embedded); ``why`` says why there are no scans."""
    if scans is None or not scans.entries:
        return None, why or "There are no labelled scans to place.", None
    scans, total = capped(scans)
    model, preprocessing = predictor.model, predictor.preprocessing
    key = _map_key(directory, scans) or feature_map_key(model, preprocessing, scans)
    started = time.perf_counter()

    def on_progress(done: int, count: int) -> None:
        if progress is not None:
            left = (time.perf_counter() - started) / max(done, 1) * (count - done)
            desc = "Running the model on the scans" + (f" (about {left:.0f} s left)" * bool(done))
            progress((done, count), desc=desc, unit="scans")

    def compute() -> FeatureMap:
        on_progress(0, len(scans.entries))
        return compute_feature_map(model, preprocessing, scans, predictor.device, [], on_progress)

    fmap = feature_map_ready(directory, scans) or cached_feature_map(key, compute)
    if not fmap.entries:
        return None, "None of these scans could be read.", None
    if "embedding" in fmap.seconds:
        kind = getattr(predictor.config, "architecture", "")
        _seconds_per_scan[kind] = fmap.seconds["embedding"] / len(fmap.entries)
    method = method if method in PROJECTIONS else "PCA"
    try:
        for name in dict.fromkeys(["PCA", method]):  # PCA is instant: always there
            if name not in fmap.coords and progress is not None:
                progress(None, desc=f"Placing the scans ({name})")
            fmap.ensure(name)
    except FeatureMapError as err:
        if "PCA" not in fmap.coords:
            return None, f"The map cannot be drawn: {err}.", None
        path, text, state = _shown(fmap, scans, total, "PCA")
        return path, f"**{PROJECTIONS[method].split(':')[0]} failed ({err}).** {text}", state
    return _shown(fmap, scans, total, method)


def feature_map_status(
    directory: Path | None, found: tuple[ScanSet | None, str], model_type: str = ""
) -> tuple[str, bool]:
    """Before any click: ``(note, ready)``: whether the map opens at once, or what computing it
    costs."""
    scans, why = found
    if scans is None:
        return f"No feature map: {why}", False
    capped_scans, total = capped(scans)
    if feature_map_ready(directory, capped_scans) is not None:
        return "This model's map is precomputed: it opens at once.", True
    count = len(capped_scans.entries)
    rate = _seconds_per_scan.get(model_type)
    cost = f"about {count * rate / 60:.0f} minutes here" if rate else "minutes on a CPU"
    note = (
        f"**This model's map is not precomputed**: computing it runs the model on {count:,} "
        f"scans ({cost}). A bar shows its progress; you can keep using the other tabs."
    )
    if total > count:
        note += f" (A random {count:,} of its {total:,} scans.)"
    return note, False


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


def _choices(fmap: FeatureMap | None) -> Any:
    if fmap is None:
        return gr.update(choices=[], value=None)
    names = [
        f"{e.file}: labelled {e.true}, said {e.predicted}" + ("" if e.correct else " (wrong)")
        for e in fmap.entries
    ]
    return gr.update(choices=names, value=None)


@dataclass
class MapViews:
    """The components of one feature map."""

    method: gr.Radio
    show: gr.Button
    compute: gr.Button
    note: gr.Markdown
    text: gr.Markdown
    plot: gr.Image
    pick: gr.Dropdown
    overlay: gr.Image
    caption: gr.Markdown
    state: gr.State

    @property
    def drawn(self) -> list[Any]:
        """What drawing a map sets: picture, text, state, the list, and the opened scan."""
        return [self.plot, self.text, self.state, self.pick, self.overlay, self.caption]


def _layout(prefix: str, note: str) -> MapViews:
    gr.Markdown("## How the model arranges the scans (feature map)")
    gr.Markdown(FEATURE_MAP_INTRO, elem_classes="teach-big")
    with gr.Row(equal_height=True):
        method = gr.Radio(list(PROJECTIONS), value="t-SNE", label="Projection to 2-D", scale=2)
        show = gr.Button("Show the feature map", variant="primary", scale=1, visible=False)
        compute = gr.Button("Compute the feature map", variant="primary", scale=1)
    views = MapViews(
        method,
        show,
        compute,
        gr.Markdown(note, elem_id=f"{prefix}-note"),
        gr.Markdown(elem_id=f"{prefix}-text"),
        gr.Image(
            label="Feature map: click a point",
            interactive=False,
            type="filepath",
            elem_id=f"{prefix}-plot",
            buttons=["download", "fullscreen"],
            alt_text="Feature map: each scan a point placed by the model's features, coloured by "
            "its class; crosses mark the model's wrong answers",
        ),
        gr.Dropdown([], type="index", label="…or pick a scan", elem_id=f"{prefix}-pick"),
        None,  # type: ignore[arg-type]  (laid out below)
        None,  # type: ignore[arg-type]
        gr.State(None, time_to_live=STATE_TTL_S),
    )
    with gr.Row():
        views.overlay = picture("The chosen scan and where the model looked", f"{prefix}-overlay")
        views.caption = gr.Markdown(elem_id=f"{prefix}-caption")
    return views


def build_feature_map(ctx: AppContext, prefix: str, source: gr.State | None = None) -> None:
    """Lay out a feature map and wire it: the Model tab's test scans, or (``source``: an
    explorer's state) the scans of that explorer."""
    views = _layout(prefix, EVALUATE_NOTE if source is not None else "")
    registry = ctx.registry

    def scans_of(name: str, scans_state: Any) -> tuple[ScanSet | None, str, Path | None]:
        if source is None:
            return *registry.scan_set(name), registry.directory(name)
        return getattr(scans_state, "scans", None), "Evaluate a zip of labelled scans first.", None

    def on_show(name: str, how: str, scans_state: Any = None):
        scans, why, directory = scans_of(name, scans_state)
        shown = capped(scans)[0] if scans else None
        fmap = feature_map_ready(directory, shown) if shown else None
        if fmap is None or how not in fmap.coords:
            return None, why if scans is None else "Compute the map first.", None, *_cleared()
        return *_shown(fmap, shown, len(scans.entries), how), *_cleared(fmap)

    @ctx.model_call(duration=MAP_GPU_SECONDS)
    def on_compute(name: str, how: str, scans_state: Any = None, progress=gr.Progress()):  # noqa: B008
        scans, why, directory = scans_of(name, scans_state)
        found = feature_map_for(registry.get(name), scans, how, why, directory, progress)
        return *found, *_cleared(found[2].fmap if found[2] else None)

    inputs = [ctx.model, views.method] + ([source] if source is not None else [])
    views.show.click(on_show, inputs=inputs, outputs=views.drawn, api_visibility="private")
    views.compute.click(
        on_compute, inputs=inputs, outputs=views.drawn, api_visibility="private", **ctx.long_events
    )
    _wire_choosing(ctx, views)
    if source is None:

        def on_model(name: str):
            note, ready = feature_map_status(
                registry.directory(name),
                registry.scan_set(name),
                registry.config(name).architecture,
            )
            shown = gr.update(visible=ready), gr.update(visible=not ready)
            return None, "", None, *_cleared(), note, *shown

        ctx.on_model(on_model, [*views.drawn, views.note, views.show, views.compute])


def _cleared(fmap: FeatureMap | None = None) -> tuple[Any, Any, str]:
    """The list of scans (``fmap``'s points) and an empty opened scan."""
    return _choices(fmap), None, ""


def _wire_choosing(ctx: AppContext, views: MapViews) -> None:
    """Redraw by another projection; open the point clicked or the scan picked."""

    def on_method(current: FeatureMapState | None, how: str):
        if current is None:
            return gr.skip(), gr.skip(), current
        if how not in current.fmap.coords:
            return gr.skip(), f"Compute the map to place the scans by {how}.", current
        path, current = feature_map_draw(current, how)
        return path, gr.skip(), current

    views.method.change(
        on_method,
        inputs=[views.state, views.method],
        outputs=[views.plot, views.text, views.state],
        api_visibility="private",
    )

    @ctx.model_call
    def on_click(current: FeatureMapState | None, name: str, evt: gr.SelectData):
        x, y = evt.index
        index = feature_map_click(current, x, y)
        return feature_map_choose(ctx.registry.get(name), current, index)

    @ctx.model_call
    def on_pick(current: FeatureMapState | None, name: str, index: int | None):
        if index is None:
            return gr.skip(), gr.skip(), gr.skip(), current
        return feature_map_choose(ctx.registry.get(name), current, index)

    chosen = [views.plot, views.overlay, views.caption, views.state]
    options = {"api_visibility": "private", **ctx.model_events}
    views.plot.select(on_click, inputs=[views.state, ctx.model], outputs=chosen, **options)
    views.pick.input(
        on_pick, inputs=[views.state, ctx.model, views.pick], outputs=chosen, **options
    )
