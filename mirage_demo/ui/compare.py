"""Classify tab: every explanation method on one scan, side by side, each with a faithfulness
score and a sanity check (:func:`mirage_demo.trust.compare_methods`; named endpoints
``/compare`` and ``/compare_json``).

The two verdicts answer different questions and are worded so that no pair contradicts:
faithfulness says what *removing* the highlighted pixels does to the model's score on this scan;
the sanity check says whether the map *changes when the model's last block is randomised*,
that is whether it is drawn from what the model learnt or mostly from the scan's structure.
A map of the scan's structure can still point at what the model uses.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from mirage_demo.explain import EARLY_METHOD
from mirage_demo.figures import strongest_region
from mirage_demo.images import ImageReadError
from mirage_demo.trust import SAME_MAP_RHO, Comparison, compare_methods, same_map_reason
from mirage_demo.ui.context import (
    COMPARE_GPU_SECONDS,
    STATE_TTL_S,
    AppContext,
    display_name,
    example_label,
    method_name,
    reference_line,
    unreadable,
    upload_path,
)
from mirage_demo.ui.slides import compare_grid_file

__all__ = [
    "CHANCE_MARGIN",
    "COMPARE_HEADERS",
    "build_compare_section",
    "compare_record",
    "compare_scan",
    "faithfulness_verdict",
    "sanity_verdict",
]

#: A faithfulness within this many nats of 0 is read as chance level: 9 random maps in 10
#: score within it (docs/explanations.md, measured on validation scans of both bundled models).
CHANCE_MARGIN = 0.95
#: Sanity check: rank correlation with the randomised model's map from which a map "barely
#: changes" (and below which it "changes").
BARELY_CHANGES, CHANGES = 0.7, 0.3

FAITHFULNESS_VERDICTS = {
    "higher": "removing what it highlights lowers the model's score more than removing what "
    "it ignores: it points at what the model uses",
    "chance": "removing what it highlights or what it ignores costs about the same: it points "
    "no better than a random map",
    "lower": "removing what it ignores lowers the model's score more than removing what it "
    "highlights: it points away from what the model uses",
}
SANITY_VERDICTS = {
    "changes": "changes when the model's last block is randomised: it depends on what the "
    "model learnt",
    "partly": "partly changes when the model's last block is randomised: it depends partly on "
    "what the model learnt, partly on the scan's structure",
    "barely": "barely changes when the model's last block is randomised: it mostly shows the "
    "scan's structure",
}


def faithfulness_level(score: float) -> str:
    """``higher``, ``chance`` or ``lower``: the faithfulness (nats) against the chance band."""
    if score > CHANCE_MARGIN:
        return "higher"
    return "lower" if score < -CHANCE_MARGIN else "chance"


def sanity_level(similarity: float) -> str:
    """``changes``, ``partly`` or ``barely``: the map against its randomised twin."""
    if similarity >= BARELY_CHANGES:
        return "barely"
    return "partly" if similarity >= CHANGES else "changes"


def faithfulness_verdict(score: float) -> str:
    return FAITHFULNESS_VERDICTS[faithfulness_level(score)]


def sanity_verdict(similarity: float) -> str:
    return SANITY_VERDICTS[sanity_level(similarity)]


COMPARE_HEADERS = [
    "Method",
    "Faithfulness (nats)",
    "Most relevant removed",
    "Least relevant removed",
    "What removing its parts shows",
    "ρ after randomising",
    "Sanity check",
    "Same map as",
]


def compare_scan(
    predictor: Any, path: str, name: str, target: str | None = None
) -> tuple[list, list[list[Any]], str]:
    """``/compare``: every method's map of one scan, its faithfulness and sanity scores.

    Returns a gallery (the maps of the trained model, then the same maps after randomising
    the model's last block, one method per column), a table (one row per method, then the
    random map's) and a text.
    """
    comparison = _compared(predictor, path, name, target)
    maps, randomized = [], []
    for score in comparison.scores:
        label = method_name(score.method)
        # the score first: a caption is cut to the thumbnail's width (its whole text is the
        # picture's alt text and tooltip)
        where = strongest_region(score.heatmap)
        maps.append((score.overlay, f"{score.faithfulness:+.2f} {label}: map strongest {where}"))
        where = strongest_region(score.randomized_heatmap)
        randomized.append(
            (
                score.randomized_overlay,
                f"ρ {score.similarity:.2f} {label}, last block randomised: strongest {where}",
            )
        )
    rows = table_rows(comparison)
    prediction = comparison.prediction
    reference = reference_line(
        example_label(path), prediction.label, prediction.confidence, predictor.class_names
    )
    return maps + randomized, rows, reference + _explanation(comparison, predictor)


def compare_record(
    predictor: Any, path: str, name: str, target: str | None = None
) -> dict[str, Any]:
    """``/compare_json``: the grid's numbers (:meth:`~mirage_demo.trust.Comparison.record`)."""
    return _compared(predictor, path, name, target).record()


def _compared(predictor: Any, path: str, name: str, target: str | None) -> Comparison:
    try:
        return compare_methods(predictor, path, target=target, name=name)
    except ImageReadError as err:
        raise unreadable(err) from err
    except ValueError as err:
        raise gr.Error(html.escape(str(err))) from err


def table_rows(comparison: Comparison) -> list[list[Any]]:
    """One row per method (its scores and both verdicts), then the random map's row."""
    rows = []
    for score in comparison.scores:
        rows.append(
            [
                method_name(score.method),
                round(score.faithfulness, 2),
                round(score.road.morf, 2),
                round(score.road.lerf, 2),
                faithfulness_verdict(score.faithfulness),
                round(score.similarity, 2),
                sanity_verdict(score.similarity),
                method_name(score.same_as) if score.same_as else "",
            ]
        )
    chance = comparison.random_reference
    rows.append(
        [
            "A random map (chance level)",
            round(chance.faithfulness, 2),
            round(chance.morf, 2),
            round(chance.lerf, 2),
            "what any map scores by luck on this scan",
            None,
            "",
            "",
        ]
    )
    return rows


def _explanation(comparison: Comparison, predictor: Any) -> str:
    prediction, target = comparison.prediction, comparison.target
    fractions = ", ".join(f"{f:.0%}" for f in comparison.fractions)
    text = (
        f"Predicted **{prediction.label}** ({prediction.confidence:.0%}); the maps explain "
        f"**{target}**. Top row: the trained model's maps. Bottom row: the same maps after "
        "the model's last block was replaced by random weights.\n\n"
        f"- **Faithfulness** (in nats: log-odds units): the model's score for {target} is how "
        f"strongly it favours {target} over the other classes (its log-odds). For {fractions} "
        "of the scan, the part a map ranks highest, then the part it ranks lowest, is "
        "replaced by a blurred copy. Faithfulness is half the average difference: positive "
        "when removing what the map highlights lowers the score more than removing what it "
        f"ignores. A random map scores {comparison.random_reference.faithfulness:+.2f} here; "
        f"within ±{CHANCE_MARGIN:.2f} is chance level.\n"
        "- **Sanity check**: ρ, the rank correlation of a map with its twin on the randomised "
        "model. Near 1: the map is drawn mostly from the scan's structure, not from what the "
        "model learnt. The two checks answer different questions: a map of the scan's "
        "structure can still point at what the model uses.\n"
    )
    if any(score.method == EARLY_METHOD for score in comparison.scores):
        text += (
            f"- **{method_name(EARLY_METHOD)}**: Grad-CAM taken one block before the last, on "
            "a grid twice as fine; the other CAMs are taken after the last block. Where those "
            "look alike, it shows what the block before them holds.\n"
        )
    vit = predictor.explainer.vit
    for score in comparison.scores:
        if score.same_as:
            first, second = method_name(score.same_as), method_name(score.method)
            reason = same_map_reason(score.same_as, score.method, vit=vit)
            text += (
                f"- **{first} and {second} draw the same map** here (rank correlation at "
                f"least {SAME_MAP_RHO}), so they share one test. {reason}\n"
            )
    return text + f"\n{comparison.timing['total_s']:.2f} s for the whole grid."


def build_compare_section(ctx: AppContext, scan: Any, target: Any, predicted_label: str) -> None:
    """Classify tab: every method side by side with its scores (named endpoints ``/compare``
    and ``/compare_json``)."""
    with gr.Accordion("Compare all methods, with a trust check", open=False, elem_id="compare"):
        gr.Markdown(
            "Every explanation method on this scan, each with a **faithfulness** score (does "
            "blurring away what the map highlights lower the model's score more than blurring "
            "away what it ignores?) and a **sanity check** (does the map change when the "
            "model's last block is replaced by random weights? Adebayo et al. 2018)."
        )
        button = gr.Button("Compare all methods", variant="primary", elem_id="compare-button")
        text = gr.Markdown(elem_id="compare-text")
        gr.Markdown(
            "Swipe the grid sideways to see every method: one column each, its map on the "
            "randomised model below it.",
            elem_classes=["phone-hint"],
            elem_id="compare-phone-hint",
        )
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
        table = gr.Dataframe(
            headers=COMPARE_HEADERS, interactive=False, wrap=True, elem_id="compare-table"
        )
        about = gr.State(None, time_to_live=STATE_TTL_S)  # the last scan and model, for its grid
        numbers_button = gr.Button("Compare (numbers only)", visible=False)
        numbers = gr.JSON(visible=False)  # /compare_json's answer (not shown)

    def arguments(upload: Any, name: str, target_name: str | None) -> tuple:
        if upload is None:
            raise gr.Error("Upload a scan or pick an example first.")
        path = upload_path(upload)
        explained = None if target_name in (None, "", predicted_label) else target_name
        return ctx.registry.get(name), path, display_name(upload, path), explained

    @ctx.model_call(duration=COMPARE_GPU_SECONDS)
    def on_compare(upload, name, target_name):
        predictor, path, scan_name, explained = arguments(upload, name, target_name)
        gallery, rows, info = compare_scan(predictor, path, scan_name, explained)
        return gallery, rows, info, {"scan": scan_name, "model": name}

    @ctx.model_call(duration=COMPARE_GPU_SECONDS)
    def on_compare_record(upload, name, target_name):
        return compare_record(*arguments(upload, name, target_name))

    def on_grid(gallery, rows, saved):
        if not gallery or saved is None:
            return None
        data = rows["data"] if isinstance(rows, dict) else rows.values.tolist()
        title = f"Every method's map of {saved['scan']} ({saved['model']})"
        return compare_grid_file(
            [(_opened(item[0]), item[1]) for item in gallery], data, title, saved["scan"]
        )

    common = dict(inputs=[scan, ctx.model, target], preprocess=False, **ctx.model_events)
    button.click(
        on_compare, outputs=[maps, table, text, about], api_name="compare", **common
    ).success(on_grid, inputs=[maps, table, about], outputs=[grid], api_visibility="private")
    numbers_button.click(on_compare_record, outputs=[numbers], api_name="compare_json", **common)

    def on_model(name: str):  # one column per method: the randomised maps line up below
        columns = len(ctx.registry.get(name).methods)
        return gr.update(columns=columns, value=None), None, "", None

    ctx.on_model(on_model, [maps, table, text, grid])


def _opened(item: Any) -> Any:
    """A gallery item's picture as Gradio hands it to a handler (a path, or an image)."""
    if isinstance(item, (str, Path)):
        with Image.open(item) as image:
            return image.convert("RGB")
    return item
