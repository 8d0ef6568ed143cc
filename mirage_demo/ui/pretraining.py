"""The "How it learned" tab: hide most of a scan and watch a masked autoencoder rebuild it
(``/reconstruct``); with MIRAGE's own release weights, also the layer map and the SLO it
predicts from the B-scan alone."""

from __future__ import annotations

import html
import json
from typing import Any

import gradio as gr
from PIL import Image

from mirage_demo.images import ImageReadError
from mirage_demo.pretraining import LAYER_NOTE, PretrainingError
from mirage_demo.reconstruction import (
    SOURCES,
    TINY_MIRAGE,
    layer_legend_html,
    load_reconstructor,
    reconstruct_scan,
)
from mirage_demo.ui.classify import examples_gallery, wire_examples
from mirage_demo.ui.context import (
    AppContext,
    output_file,
    picture,
    unreadable,
    upload_path,
)

__all__ = [
    "INTRO",
    "LEARN_PRETRAINING_MD",
    "available_sources",
    "build_pretraining_tab",
    "label_efficiency_markdown",
    "reconstruct_view",
]

INTRO = """
**How a foundation model learns without labels.** MIRAGE was pre-trained on a very large
collection of scans that nobody had labelled: each time, most of a scan was hidden and the
model had to fill in the rest. To do that well it has to learn what retinas look like. Hide
part of a scan below and see what the model rebuilds.
"""
#: The tiny MIRAGE's label-efficiency curve (``benchmarks/label_efficiency.py``'s JSON).
LABEL_EFFICIENCY = TINY_MIRAGE / "label_efficiency.json"
PRETRAINED, RANDOM = "pretraining:assets/tiny-mirage", "mirage_tiny_patch32_512:random"
#: The Learn tab's paragraphs on masked pre-training (the curve follows them).
LEARN_PRETRAINING_MD = """
## How a foundation model learns without labels
- **Masking.** In pre-training, most of each scan (three patches in four) is hidden and the
  model must fill in what is missing from what is left. Nobody labels anything: the scan is its
  own answer. To guess well the model has to learn what retinas look like: where the layers
  run, how bright each one is, how they dip at the fovea. That knowledge is what it brings to
  a new task.
- **Why the reconstruction is blurry.** The exact grain (speckle) of a hidden patch cannot be
  known from its neighbours. A model trained to keep its errors small gives the average of
  everything that could be there, and an average is smooth. The layers come back in the right
  place and brightness; the fine grain does not. Small lesions hidden completely cannot come
  back either: the model draws the retina it expects.
- **What "foundation" buys.** A pre-trained model starts a new task already knowing what
  retinas look like, so it needs fewer labelled scans to learn it. MIRAGE was pre-trained on
  a very large collection of scans. The small model of the **How it learned** tab, pre-trained
  here on 2,255 scans for about an hour, shows the idea in miniature: a linear probe on its
  features (the model itself unchanged) against the same probe on a model that was never
  pre-trained, tested on 452 scans it never saw.
"""
EMPTY = "Upload a scan or pick an example, then choose how much to hide."
MIN_RATIO, MAX_RATIO = 0.1, 0.95


def available_sources(release: str | None) -> list[str]:
    """The reconstruction models this app offers: the bundled tiny MIRAGE (when bundled) and
    MIRAGE's release weights when asked for (``--pretraining``)."""
    sources = ["tiny"] if (TINY_MIRAGE / "config.json").is_file() else []
    if release:
        if release not in SOURCES or release == "tiny":
            raise ValueError(f"--pretraining must be mirage_base or mirage_large, not {release!r}")
        sources.insert(0, release)
    return sources


def label_efficiency_markdown() -> str:
    """The bundled label-efficiency curve as a table (pre-trained vs not), or "" without it."""
    try:
        results = json.loads(LABEL_EFFICIENCY.read_text())["results"]
        rows = zip(results[PRETRAINED], results[RANDOM], strict=True)
        lines = [
            "| labelled scans per class | pre-trained (masking) | not pre-trained |",
            "| ---: | ---: | ---: |",
        ]
        for ours, base in rows:
            count = int(ours["labels_per_class"])
            label = f"{count} (all)" if ours["per_class"] == "all" else str(count)
            lines.append(f"| {label} | {_score(ours)} | {_score(base)} |")
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return (
        "\n".join(lines)
        + "\n\nBalanced accuracy (0.25 is guessing among the four classes; in brackets, the "
        "range where the true value likely lies). With a handful of labels neither model does "
        "better than guessing; with hundreds, the pre-trained features are clearly better. A "
        "model this small, pre-trained this briefly, is a weak foundation; MIRAGE was "
        "pre-trained on far more scans for far longer, which is what makes a foundation "
        "model worth reusing (its curve is not measured here). The Adapt tab draws this "
        "curve for the model you load."
    )


def _score(point: dict[str, Any]) -> str:
    low, high = point["ci95"]
    return f"{float(point['balanced_accuracy']):.2f} [{float(low):.2f}, {float(high):.2f}]"


def reconstruct_view(upload: Any, ratio: Any, seed: Any, source: str) -> tuple[Any, ...]:
    """``/reconstruct``: the masked scan, the reconstruction, the difference, a text, and
    (MIRAGE's weights only) the layer map, the SLO and the legend."""
    if upload is None:
        return None, None, None, EMPTY, None, None, ""
    if source not in SOURCES:
        raise gr.Error("Choose one of the models offered.")
    try:
        ratio = min(MAX_RATIO, max(MIN_RATIO, float(ratio)))
        seed = int(seed or 0) % 1_000_000
    except (TypeError, ValueError) as err:
        raise gr.Error("The share hidden must be a number and the seed a whole number.") from err
    try:
        model = load_reconstructor(source)
    except PretrainingError as err:
        raise gr.Error(html.escape(str(err)), title="Model not available") from err
    try:
        result = reconstruct_scan(model, upload_path(upload), ratio, seed)
    except ImageReadError as err:
        raise unreadable(err) from err
    text = result.summary() + f" ({result.seconds:.2f} s)"
    layers = _jpeg(result.layers) if result.layers is not None else None
    slo = _jpeg(result.slo) if result.slo is not None else None
    legend = layer_legend_html(result.layer_classes) if result.layers is not None else ""
    images = [_jpeg(image) for image in (result.masked, result.rebuilt, result.difference)]
    return *images, text, layers, slo, legend


def _jpeg(image: Image.Image) -> str:
    """``image`` as a new JPEG output file (WebP took ~0.27 s a picture: most of a request)."""
    path = output_file("rebuild", ".jpg")
    image.save(path, "JPEG", quality=92)
    return str(path)


def build_pretraining_tab(ctx: AppContext) -> None:
    """A scan, how much of it to hide and which patches; the three pictures side by side."""
    sources = available_sources(ctx.pretraining)
    if not sources:
        return
    with gr.Tab("How it learned", id="pretraining"):
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                scan = gr.Image(
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    label="OCT B-scan",
                    height=240,
                )
                examples = examples_gallery(ctx, elem_id="rebuild-examples", columns=5)
                ratio = gr.Slider(
                    MIN_RATIO, MAX_RATIO, value=0.75, step=0.05, label="Share of the scan hidden"
                )
                seed = gr.Number(
                    0, precision=0, minimum=0, maximum=999_999, label="Seed (which patches)"
                )
                source = gr.Radio(
                    [(SOURCES[s], s) for s in sources],
                    value=sources[0],
                    label="Model",
                    visible=len(sources) > 1,
                )
                button = gr.Button("Hide and rebuild", variant="primary")
            with gr.Column(scale=3):
                with gr.Row():
                    masked = picture("What the model saw", "rebuild-masked", height=260)
                    rebuilt = picture("Its reconstruction", "rebuild-rebuilt", height=260)
                    difference = picture("Difference", "rebuild-difference", height=260)
                info = gr.Markdown(EMPTY, elem_id="rebuild-info")
                release = any(s != "tiny" for s in sources)
                with gr.Row(visible=release):
                    layers = picture("Layer map, from the B-scan alone", "rebuild-layers")
                    slo = picture("SLO, from the B-scan alone", "rebuild-slo")
                legend = gr.HTML("", visible=release)
                if release:
                    gr.Markdown(f"<small>{LAYER_NOTE}</small>")
        gr.Markdown(
            "<small>The hidden patches are painted blue. In the reconstruction the visible "
            "patches are the scan's own; the hidden ones are the model's guess. The difference "
            "is bright where the guess is wrong.</small>"
        )
    outputs = [masked, rebuilt, difference, info, layers, slo, legend]
    wire_examples(ctx, examples, scan)
    _wire(ctx, [scan, ratio, seed, source, button], outputs)


def _wire(ctx: AppContext, inputs: list[Any], outputs: list[Any]) -> None:
    """``/reconstruct`` on every change of the scan or its settings. It runs on the CPU, also
    on ZeroGPU (the tiny model in a fraction of a second, MIRAGE-Base in about one: the
    encoder sees a quarter of the patches), so it never asks for a GPU."""
    scan, ratio, seed, source, button = inputs
    gr.on(
        [button.click, scan.change, ratio.release, seed.submit, source.change],
        ctx.wrap_model_call(reconstruct_view),
        inputs=[scan, ratio, seed, source],
        outputs=outputs,
        api_name="reconstruct",
        trigger_mode="always_last",
        preprocess=False,
        **ctx.model_events,
    )
