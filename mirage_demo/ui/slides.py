"""Figures for slides and alt texts around an answer: the Classify tab's overlay and figure
(:func:`answer_figure_file`), the colour bar under a heat map, Compare's grid as one PNG
(:func:`compare_grid_file`). The pictures are drawn by :mod:`mirage_demo.figures`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from mirage_demo.figures import answer_figure, colour_stops, describe_heatmap, grid_figure
from mirage_demo.ui.context import image_file
from mirage_demo.verdict import NOT_A_BSCAN

__all__ = [
    "answer_figure_file",
    "colour_bar_html",
    "compare_grid_file",
    "figure_caption",
    "file_stem",
    "overlay_alt",
]


def colour_bar_html(colormap: str) -> str:
    """A colour bar for the heat maps drawn with ``colormap``: weak to strong."""
    gradient = ", ".join(colour_stops(colormap))
    return (
        '<div class="colour-bar" role="img" aria-label="Colour bar: from weak (left) to strong '
        f'(right) evidence"><span>weak</span><span class="bar" style="background: '
        f'linear-gradient(to right, {gradient})"></span><span>strong</span></div>'
    )


def overlay_alt(state: dict[str, Any]) -> str:
    """The alt text of a session's overlay: which map, of which class, where it is strongest."""
    about = state.get("about") or {}
    return describe_heatmap(
        about.get("method", "Heat"), about.get("target"), state["heatmap"], "the B-scan"
    )


def figure_caption(state: dict[str, Any], model_name: str) -> tuple[str, list[str]]:
    """``(title, caption lines)`` of a session's answer figure."""
    about = state["about"]
    title = f"The model says {about['label']} ({about['confidence']:.0%})"
    if about.get("trust") == NOT_A_BSCAN:  # no class headline for what is not a B-scan
        title = "Not an OCT B-scan: the model's answer means nothing here"
    explained = (
        f"map for class {about['target']}" if about["target"] else "a map that ignores the class"
    )
    line = f"Verdict: {about['verdict']}"
    if about["set"]:
        line += f" (its {about['level']:.0%} set: {{{', '.join(about['set'])}}})"
    return title, [
        f"Scan: {about['scan']}   ·   Model: {model_name}",
        f"Method: {about['method']}, {explained}   ·   Probability of {about['label']}: "
        f"{about['confidence']:.0%}",
        line + ".   Teaching tool, not a diagnosis.",
    ]


def answer_figure_file(state: dict[str, Any] | None, model_name: str, opacity: float) -> str:
    """The session's answer as one slide-ready PNG (:func:`mirage_demo.figures.answer_figure`):
    its path, named after the scan, method and class."""
    if not state or "about" not in state:
        raise gr.Error("Classify a scan first: the figure shows its answer.")
    scan, heatmap = state["scan"] / np.float32(255), state["heatmap"] / np.float32(255)
    title, caption = figure_caption(state, model_name)
    alpha = min(1.0, max(0.0, float(opacity)))
    picture = answer_figure(scan, heatmap, state["colormap"], alpha, title, caption)
    return image_file(picture, "figure", f"figure-{file_stem(state)}")


def file_stem(state: dict[str, Any]) -> str:
    """``Grad-CAM-DME-scan``: the method, the class shown and the scan's name."""
    about = state["about"]
    return f"{about['method']}-{about['target'] or about['label']}-{Path(about['scan']).stem}"


def compare_grid_file(
    gallery: list[tuple[Any, str]], rows: list[list[Any]], title: str, name: str
) -> str:
    """Compare's maps as one labelled grid PNG for a slide: the trained model's maps above,
    the maps after randomising its last block below, each titled with its method and score
    (``gallery`` and ``rows`` as :func:`~mirage_demo.ui.compare.compare_scan` returns them: a
    row per method, then the random map's, which has no picture)."""
    count = len(gallery) // 2
    methods = rows[:count]
    trained = [
        (picture, f"{row[0]}\nfaithfulness {row[1]:+.2f}")
        for (picture, _), row in zip(gallery[:count], methods, strict=True)
    ]
    randomised = [
        (picture, f"{row[0]}, ρ {row[5]:.2f}\n{str(row[6]).split(': ')[-1]}")
        for (picture, _), row in zip(gallery[count:], methods, strict=True)
    ]
    chance = f" A random map scored {rows[count][1]:+.2f} here." if len(rows) > count else ""
    picture = grid_figure(
        [trained, randomised],
        ["The trained model", "Last block randomised"],
        title,
        footer="Faithfulness (nats): how much more the model's score for the class falls when "
        "the map's top part is blurred than when its bottom part is." + chance + "\nρ: rank "
        "correlation with the map after randomising the last block (near 1: the map mostly "
        "shows the scan's structure). Teaching tool, not a diagnosis.",
    )
    return image_file(picture, "compare", f"compare-{Path(name).stem}")
