"""The Volume tab: drop an OCT volume, classify every B-scan, scrub through the eye
(``/volume``).

The whole volume is classified once, in the long-jobs lane with a progress bar
(:func:`classify_volume_upload`); the session keeps its per-B-scan probabilities and a small
en-face picture, never the B-scans. Moving the slider (mouse or arrow keys) redraws the
probability strip and the localizer at once (:func:`slice_pictures`, no model) and explains the
B-scan shown (:func:`explain_bscan`: the volume is re-opened and that one B-scan decoded, so
its map and answer are those of the very array that was classified).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from mirage_demo.images import ImageReadError
from mirage_demo.ui.answer import answer_card, answer_label
from mirage_demo.ui.context import (
    STATE_TTL_S,
    AppContext,
    display_name,
    image_file,
    picture,
    timing_line,
    upload_path,
)
from mirage_demo.ui.registry import ModelRegistry
from mirage_demo.volume_figures import (
    enface_row,
    localizer_base,
    localizer_figure,
    probability_strip,
)
from mirage_demo.volume_io import load_volume
from mirage_demo.volume_predict import classify_volume, summarize
from mirage_demo.volumes import Volume, VolumeError, slice_label

__all__ = [
    "EXAMPLE_VOLUME",
    "build_volume_tab",
    "classify_volume_upload",
    "explain_bscan",
    "slice_pictures",
    "volume_gpu_seconds",
]

EXAMPLE_VOLUME = Path(__file__).resolve().parents[2] / "assets" / "volumes" / "example-eye.dcm"
#: ZeroGPU time ``/volume`` reserves (seconds): base + per B-scan, at most the cap.
VOLUME_GPU_SECONDS = (10, 0.25, 120)
EMPTY = (
    "Drop an OCT volume: a Heidelberg `.vol`, `.e2e` or XML export (as a `.zip`), a DICOM "
    "file from Zeiss, Topcon or others, or a `.zip` of B-scan images. Or try the example."
)
INTRO = (
    "A clinic's OCT is a **volume**: dozens of B-scans across one eye. The model looks at "
    "one B-scan at a time, so every B-scan is classified; the strip shows each class along the "
    "eye and the map shows where each B-scan lies. Move the slider (or press the arrow keys on "
    "it) to go through the B-scans."
)


def classify_volume_upload(
    registry: ModelRegistry,
    upload: Any,
    model_name: str | None = None,
    progress: Any = None,
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """``/volume``: classify every B-scan of an uploaded volume. Returns the view's state
    (per-B-scan probabilities, the en-face picture), the summary in words and the summary
    record (the command line's ``volume_summary``)."""
    predictor = registry.get(model_name)
    path = upload_path(upload)
    name = display_name(upload, path)
    try:
        volume = load_volume(path, name)
    except VolumeError as err:
        raise gr.Error(f"Could not read {html.escape(name)}: {html.escape(err.reason)}") from err
    rows: list[np.ndarray] = []
    results = []

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress((done, total), desc="Classifying the B-scans", unit="B-scans")

    with volume:
        for item in classify_volume(predictor, volume, progress=report):
            rows.append(enface_row(item.image) if item.image is not None else _blank(volume))
            item.image = None  # one batch of B-scans at a time
            results.append(item)
        base, lines, base_title = localizer_base(volume.localizer, volume.positions, rows)
        described = volume.describe()
    summary = summarize(results, predictor.class_names)
    classes = predictor.class_names
    state = {
        "path": path,
        "name": name,
        "model": model_name,
        "count": len(results),
        "classes": classes,
        "probabilities": np.array(
            [
                [r.prediction.probabilities[c] if r.prediction else np.nan for c in classes]
                for r in results
            ],
            dtype=np.float32,
        ),
        "labels": [r.prediction.label if r.prediction else None for r in results],
        "errors": {r.index: r.result.reason for r in results if r.prediction is None},
        "base": base,
        "lines": lines,
        "base_title": base_title,
        "key": summary.key_slice or 0,
    }
    text = (
        f"**{html.escape(name)}**: {html.escape(described)}.\n\n{html.escape(summary.text())}"
        "\n\n<small>B-scans are numbered from 1. A disease seen in one B-scan is a finding "
        "for the eye: the volume is called normal only when every B-scan is.</small>"
    )
    return state, text, summary.to_dict()


def _blank(volume: Volume) -> np.ndarray:
    return np.zeros(volume.shape[1], np.float32)


def slice_pictures(state: dict[str, Any] | None, number: Any) -> tuple[Any, Any]:
    """The probability strip and the localizer with B-scan ``number`` (from 1) marked."""
    if not state:
        return None, None
    index = _index(state, number)
    strip = probability_strip(state["probabilities"], state["labels"], state["classes"], index)
    where = localizer_figure(
        state["base"],
        state["lines"],
        state["labels"],
        state["classes"],
        index,
        state["base_title"],
    )
    return image_file(strip, "volume-strip"), image_file(where, "volume-map")


def explain_bscan(
    registry: ModelRegistry, state: dict[str, Any] | None, number: Any
) -> tuple[Any, Any, str]:
    """B-scan ``number`` (from 1) with its Grad-CAM map, its probabilities and its answer
    (warnings, the prediction set, the unlike-the-training-scans check), from the model that
    classified the volume."""
    if not state:
        return None, None, EMPTY
    index = _index(state, number)
    header = f"**B-scan {index + 1} of {state['count']}**"
    if index in state["errors"]:
        return None, None, f"{header}: could not be read ({html.escape(state['errors'][index])})."
    predictor = registry.get(state["model"])
    method = "gradcam" if "gradcam" in predictor.methods else predictor.methods[0]
    try:
        with load_volume(state["path"], state["name"]) as volume:
            bscan = volume.bscans[index]
        explanation = predictor.explain(bscan, method, name=slice_label(state["name"], index))
    except (VolumeError, ImageReadError) as err:
        return None, None, f"{header}: could not be read ({html.escape(err.reason)})."
    prediction = explanation.prediction
    text = (
        f"{header}\n\n"
        + answer_card(prediction, guarantee=False)
        + f"The map shows where the model looked for {prediction.label}.\n\n"
        + timing_line(prediction, "This B-scan", str(predictor.device))
    )
    return image_file(explanation.overlay, "volume-bscan"), answer_label(prediction), text


def _index(state: dict[str, Any], number: Any) -> int:
    try:
        value = round(float(number))
    except (TypeError, ValueError):
        value = state["key"] + 1
    return min(max(value, 1), state["count"]) - 1


def volume_gpu_seconds(upload: Any, *_: Any, **__: Any) -> int:
    """ZeroGPU seconds to reserve for ``/volume``: a base plus a little per B-scan, capped."""
    base, per_bscan, cap = VOLUME_GPU_SECONDS
    try:
        with load_volume(upload_path(upload)) as volume:
            count = len(volume)
    except (VolumeError, OSError, gr.Error):
        count = 0
    return int(min(cap, base + per_bscan * count))


def build_volume_tab(ctx: AppContext) -> None:
    """Upload a volume; scrub through its B-scans with their maps, the probability strip and
    the localizer."""
    registry = ctx.registry
    with gr.Tab("Volume", id="volume"):
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                upload = gr.File(
                    label="OCT volume (.vol, .e2e, DICOM, or a .zip of an export or B-scans)",
                    type="filepath",
                    elem_id="volume-upload",
                )
                if EXAMPLE_VOLUME.is_file():
                    gr.Examples(
                        examples=[[str(EXAMPLE_VOLUME)]],
                        inputs=[upload],
                        label="Example: 25 real B-scans of different patients, stacked as "
                        "one DICOM volume (not one eye)",
                    )
                summary = gr.Markdown(EMPTY, elem_id="volume-summary")
                record = gr.JSON(visible=False)
            with gr.Column(scale=3, min_width=300):
                slider = gr.Slider(
                    1,
                    2,
                    value=1,
                    step=1,
                    label="B-scan",
                    interactive=True,
                    elem_id="volume-slider",
                )
                bscan = picture(
                    "The B-scan and where the model looked",
                    "volume-bscan",
                    kind="filepath",
                    height=320,
                )
                with gr.Row(equal_height=False):
                    with gr.Column(min_width=200):
                        probabilities = gr.Label(
                            label="This B-scan",
                            num_top_classes=registry.config().num_classes,
                            elem_id="volume-probabilities",
                        )
                    with gr.Column(min_width=220):
                        answer = gr.Markdown(elem_id="volume-answer")
        with gr.Row():
            strip = picture(
                "Class probabilities along the volume",
                "volume-strip",
                kind="filepath",
                height=300,
            )
            where = picture("Where each B-scan lies", "volume-map", kind="filepath", height=440)
        state = gr.State(None, time_to_live=STATE_TTL_S)
    _wire(
        ctx,
        registry,
        upload,
        slider,
        state,
        summary,
        record,
        (bscan, probabilities, answer),
        (strip, where),
    )


def _wire(ctx, registry, upload, slider, state, summary, record, answer_outputs, pictures):
    """The upload (and the model picker) classifies; the slider redraws and explains."""

    @ctx.model_call(duration=volume_gpu_seconds)
    def on_volume(upload_value, name, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        if upload_value is None:
            return None, EMPTY, None, gr.update(value=1, maximum=2)
        saved, text, summary_record = classify_volume_upload(registry, upload_value, name, progress)
        key = saved["key"] + 1
        return saved, text, summary_record, gr.update(value=key, maximum=max(2, saved["count"]))

    @ctx.model_call
    def on_bscan(saved, number, name):  # name: the picker's (the volume's model explains)
        return explain_bscan(registry, saved, number)

    def on_pictures(saved, number):
        return slice_pictures(saved, number)

    classified = dict(
        fn=on_volume, inputs=[upload, ctx.model], outputs=[state, summary, record, slider]
    )
    redraw = dict(
        fn=on_pictures, inputs=[state, slider], outputs=list(pictures), api_visibility="private"
    )
    explain = dict(
        fn=on_bscan,
        inputs=[state, slider, ctx.model],
        outputs=list(answer_outputs),
        api_visibility="private",
        **ctx.model_events,
    )
    for trigger, options in (
        (upload.change, {"api_name": "volume"}),
        (ctx.model.change, {"api_visibility": "private"}),
    ):
        event = trigger(**classified, **options, **ctx.long_events)
        event.then(**redraw).then(**explain)
    # arrow keys and drags fire `input` at every step: the last one wins, and the pictures
    # shown stay until their successors arrive (no spinner flashing over them)
    quiet = {"trigger_mode": "always_last", "show_progress": "hidden"}
    probabilities = answer_outputs[1]
    ctx.on_model(
        lambda name: gr.update(num_top_classes=registry.config(name).num_classes), [probabilities]
    )
    slider.input(**redraw, **quiet)
    slider.input(**explain, **quiet)
