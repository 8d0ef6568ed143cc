"""Figures for slides and alt texts: where a heat map is strongest, the answer figure, the
Compare grid, and the words around them (banner, metrics, Learn's facts from the card)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mirage_demo.checkpoint import read_config
from mirage_demo.figures import (
    answer_figure,
    colour_stops,
    describe_heatmap,
    grid_figure,
    strongest_region,
)
from mirage_demo.inference import DEFAULT_CHECKPOINT
from mirage_demo.metrics import load_report
from mirage_demo.ui.learn import CLASS_SIGNS, LEARN_MD, model_scale_sentence
from mirage_demo.ui.report import NO_SCANS, metrics_markdown, trust_note
from mirage_demo.ui.slides import answer_figure_file, compare_grid_file, figure_caption


def blob(row: slice, column: slice, shape=(90, 120)) -> np.ndarray:
    heatmap = np.zeros(shape, dtype=np.float32)
    heatmap[row, column] = 1.0
    return heatmap


@pytest.mark.parametrize(
    "heatmap, words",
    [
        (blob(slice(0, 30), slice(0, 40)), "at the top left"),
        (blob(slice(30, 60), slice(40, 80)), "at the centre"),
        (blob(slice(60, 90), slice(80, 120)), "at the bottom right"),
        (blob(slice(0, 30), slice(40, 80)), "at the top centre"),
        (blob(slice(60, 90), slice(0, 120)), "along the bottom"),
        (blob(slice(0, 90), slice(0, 40)), "down the left"),
        (np.ones((90, 120)), "spread over the whole scan"),
        (np.zeros((90, 120)), "spread over the whole scan"),
    ],
)
def test_where_a_heat_map_is_strongest_in_words(heatmap, words):
    assert strongest_region(heatmap) == words


def test_an_alt_text_names_the_method_the_class_and_the_place():
    text = describe_heatmap("Grad-CAM", "DME", blob(slice(30, 60), slice(40, 80)))
    assert text == "Grad-CAM heat map for DME over the uploaded B-scan, strongest at the centre"
    assert describe_heatmap("EigenCAM", None, np.ones((4, 4)), "the scan").startswith(
        "EigenCAM heat map over the scan"
    )
    with pytest.raises(ValueError, match="2-D"):
        strongest_region(np.zeros((3, 3, 3)))


def scan_and_map(height=96, width=128):
    rng = np.random.default_rng(0)
    scan = rng.random((height, width)).astype(np.float32) * 0.3
    area = (slice(height // 3, 2 * height // 3), slice(width // 3, 2 * width // 3))
    return scan, blob(*area, shape=(height, width))


def test_the_answer_figure_is_a_slide_with_a_colour_bar():
    scan, heatmap = scan_and_map()
    figure = answer_figure(scan, heatmap, "jet", 0.5, "The model says DME (93%)", ["a", "b"])
    assert figure.size == (1600, 900) and figure.mode == "RGB"
    pixels = np.asarray(figure).astype(int)
    jet = [np.array(Image.new("RGB", (1, 1), c).getpixel((0, 0))) for c in colour_stops("jet")]
    # the colour bar: jet's darkest blue and darkest red both appear, in the right third
    right = pixels[:, 1000:].reshape(-1, 3)
    for colour in (jet[0], jet[-1]):
        assert (np.abs(right - colour).sum(axis=1) < 30).any()


def test_the_figure_file_is_a_named_png_with_its_caption(tmp_path):
    scan, heatmap = scan_and_map()
    state = {
        "scan": (scan * 255).astype(np.uint8),
        "heatmap": (heatmap * 255).astype(np.uint8),
        "colormap": "jet",
        "about": {
            "scan": "example-3.jpeg",
            "method": "Grad-CAM",
            "target": "DME",
            "label": "DME",
            "confidence": 0.93,
            "verdict": "sure",
            "set": ["DME"],
            "level": 0.9,
        },
    }
    title, caption = figure_caption(state, "demo-model (bundled)")
    assert title == "The model says DME (93%)"
    assert "Model: demo-model (bundled)" in caption[0] and "Grad-CAM" in caption[1]
    assert "Verdict: sure (its 90% set: {DME})" in caption[2]
    path = answer_figure_file(state, "demo-model (bundled)", 0.5)
    assert path.endswith("/figure-Grad-CAM-DME-example-3.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1600, 900)


def test_the_compare_grid_is_one_labelled_png():
    scan, heatmap = scan_and_map()
    overlay = Image.fromarray((np.dstack([scan, heatmap, scan]) * 255).astype(np.uint8))
    gallery = [(overlay, "map")] * 4
    rows = [  # as compare_scan's table: a row per method, then the random map's (no picture)
        ["Grad-CAM", 1.2, -1.5, 0.9, "points at", 0.1, "changes when ...: it depends", ""],
        ["EigenCAM", -0.1, 0.2, 0.0, "no better", 0.9, "barely changes ...: it mostly", ""],
        ["A random map (chance level)", 0.05, 0.1, 0.2, "what any map scores", None, "", ""],
    ]
    path = compare_grid_file(gallery, rows, "Every method's map", "example-1.jpeg")
    assert path.endswith("/compare-example-1.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height
    one = grid_figure([[(overlay, "a")]], ["row"], "one")
    seven = grid_figure([[(overlay, "a")] * 7, [(overlay, "b")]], ["row", "other"], "seven")
    assert seven.width > one.width and seven.height > one.height  # a column per method


def test_a_class_without_scans_says_so_instead_of_zeros():
    metrics = {
        "split": "uploaded",
        "num_images": 3,
        "overall": {},
        "per_class": {
            "CNV": {"support": 3, "precision": {"value": 1.0, "ci95": [1.0, 1.0]}},
            "DRUSEN": {"support": 0, "precision": {"value": 0.0, "ci95": [0.0, 0.0]}},
        },
    }
    shown = metrics_markdown(metrics)
    assert f"| DRUSEN | 0 | {NO_SCANS} | {NO_SCANS} |" in shown
    assert "0.0 (0.0–0.0)" not in shown
    assert "**MCC**" in shown and "**ECE**" in shown and "**Sensitivity**" in shown


def test_the_banner_is_one_line_with_details_and_plain_words():
    config, report = read_config(DEFAULT_CHECKPOINT), load_report(DEFAULT_CHECKPOINT)
    note = trust_note("demo-model (bundled)", config, report)
    line = note[note.index("<summary>") : note.index("</summary>")]
    assert "not MIRAGE" in line and "not a diagnosis" in line.lower() and "\n" not in line
    assert config.description in note  # the model's own card, not words written here
    assert config.architecture not in line


def test_learn_reads_the_models_facts_from_its_card_and_holds_the_signs_once():
    config = read_config(DEFAULT_CHECKPOINT)
    total = sum(sum(c.values()) for c in config.training["images"].values())
    sentence = model_scale_sentence("demo-model (bundled)", config)
    assert f"{total:,} labelled scans" in sentence and "a thousand" not in LEARN_MD
    for name, signs in CLASS_SIGNS.items():
        assert LEARN_MD.count(signs.look_for) == 1, name
