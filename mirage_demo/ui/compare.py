"""Classify tab: every explanation method on one scan, side by side, each with a faithfulness
score and a sanity check (:func:`mirage_demo.trust.compare_methods`; named endpoint
``/compare``)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from mirage_demo.figures import strongest_region
from mirage_demo.images import ImageReadError
from mirage_demo.trust import compare_methods
from mirage_demo.ui.context import (
    COMPARE_GPU_SECONDS,
    STATE_TTL_S,
    AppContext,
    example_label,
    method_name,
    reference_line,
    unreadable,
)
from mirage_demo.ui.slides import compare_grid_file

__all__ = ["COMPARE_HEADERS", "build_compare_section", "compare_scan"]


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
        raise unreadable(err) from err
    except ValueError as err:
        raise gr.Error(html.escape(str(err))) from err
    maps, randomized, rows = [], [], []
    for score in comparison.scores:
        label = method_name(score.method)
        # the score first: a caption is cut to the thumbnail's width (its whole text is the
        # picture's alt text and tooltip)
        where = strongest_region(score.heatmap)
        maps.append(
            (score.overlay, f"{score.faithfulness * 100:+.0f} {label}: map strongest {where}")
        )
        where = strongest_region(score.randomized_heatmap)
        randomized.append(
            (
                score.randomized_overlay,
                f"ρ {score.similarity:.2f} {label}, last block randomised: strongest {where}",
            )
        )
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


def build_compare_section(ctx: AppContext, scan: Any, target: Any, predicted_label: str) -> None:
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
            format="png",
            buttons=["download", "fullscreen"],
            elem_id="compare-maps",
        )
        grid = gr.File(label="The grid as one picture, for a slide (PNG)", elem_id="compare-grid")
        table = gr.Dataframe(headers=COMPARE_HEADERS, interactive=False, elem_id="compare-table")
        about = gr.State(None, time_to_live=STATE_TTL_S)  # the last scan and model, for its grid

    @ctx.model_call(duration=COMPARE_GPU_SECONDS)
    def on_compare(upload, name, target_name):
        if upload is None:
            raise gr.Error("Upload a scan or pick an example first.")
        path = _path_of(upload)
        shown = upload.get("orig_name") if isinstance(upload, dict) else None
        explained = None if target_name in (None, "", predicted_label) else target_name
        scan_name = shown or Path(path).name
        gallery, rows, info = compare_scan(ctx.registry.get(name), path, scan_name, explained)
        return gallery, rows, info, {"scan": scan_name, "model": name}

    def on_grid(gallery, rows, saved):
        if not gallery or saved is None:
            return None
        data = rows["data"] if isinstance(rows, dict) else rows.values.tolist()
        title = f"Every method's map of {saved['scan']} ({saved['model']})"
        return compare_grid_file(
            [(_opened(item[0]), item[1]) for item in gallery], data, title, saved["scan"]
        )

    button.click(
        on_compare,
        inputs=[scan, ctx.model, target],
        outputs=[maps, table, text, about],
        api_name="compare",
        **ctx.model_events,
        preprocess=False,
    ).success(on_grid, inputs=[maps, table, about], outputs=[grid], api_visibility="private")

    def on_model(name: str):  # one column per method: the randomised maps line up below
        columns = len(ctx.registry.get(name).methods)
        return gr.update(columns=columns, value=None), None, "", None

    ctx.on_model(on_model, [maps, table, text, grid])


def _path_of(upload: Any) -> str:
    if isinstance(upload, dict):
        return str(upload.get("path") or upload.get("name"))
    return str(getattr(upload, "path", None) or upload)


def _opened(item: Any) -> Any:
    """A gallery item's picture as Gradio hands it to a handler (a path, or an image)."""
    if isinstance(item, (str, Path)):
        with Image.open(item) as image:
            return image.convert("RGB")
    return item
