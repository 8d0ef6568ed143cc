"""The Learn tab: what OCT shows, the classes of Kermany et al. 2018, how to read a heat map.

The signs of each class (:data:`CLASS_SIGNS`) live here once: the Learn tab shows them, and
the quiz's feedback quotes the one of the true class and links back to it
(:func:`learn_anchor`). Facts about the loaded model come from its own card
(:func:`model_scale_sentence`), never from this text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from mirage_demo.checkpoint import CheckpointConfig
from mirage_demo.data import minmax
from mirage_demo.explain import render_overlay
from mirage_demo.images import read_image
from mirage_demo.ui.context import AppContext
from mirage_demo.ui.pretraining import (
    LEARN_PRETRAINING_MD,
    available_sources,
    label_efficiency_markdown,
)
from mirage_demo.ui.registry import ASSETS
from mirage_demo.ui.style import TABS_ID, scroll_to_js

__all__ = [
    "CLASS_SIGNS",
    "LEARN_MD",
    "TRUST_MD",
    "VERDICT_EXAMPLES",
    "ClassSigns",
    "build_learn_tab",
    "go_to",
    "learn_anchor",
    "model_scale_sentence",
    "verdict_example",
]


@dataclass(frozen=True)
class ClassSigns:
    """One class of Kermany et al. 2018: its name, what it is, and what to look for (one
    sentence, quoted by the quiz's feedback)."""

    name: str
    what: str
    look_for: str


CLASS_SIGNS: dict[str, ClassSigns] = {
    "CNV": ClassSigns(
        "choroidal neovascularisation",
        'neovascular, "wet" age-related macular degeneration: vessels growing from the '
        "choroid through Bruch's membrane",
        "a lumpy, bright lesion under the retina or the RPE, often with dark pockets of fluid "
        "and a raised, irregular RPE",
    ),
    "DME": ClassSigns(
        "diabetic macular oedema",
        "fluid leaking from damaged vessels in diabetes",
        "a thickened retina with dark, cyst-like pockets of fluid inside it and bright dots of "
        "hard exudate, sometimes fluid under the retina",
    ),
    "DRUSEN": ClassSigns(
        "drusen",
        "deposits between the RPE and Bruch's membrane (early or intermediate age-related "
        "macular degeneration)",
        "small domes or a wavy line lifting the RPE, with a dry retina above",
    ),
    "NORMAL": ClassSigns(
        "a normal retina",
        "no disease seen",
        "a smooth foveal dip, continuous layers, no fluid and a straight RPE",
    ),
}


def learn_anchor(class_name: str) -> str | None:
    """The element id of a class's paragraph in the Learn tab, or None if it has none."""
    return f"learn-{class_name.lower()}" if class_name in CLASS_SIGNS else None


def class_markdown(class_name: str) -> str:
    """A class's paragraph in the Learn tab."""
    signs = CLASS_SIGNS[class_name]
    return f"**{class_name}: {signs.name}** ({signs.what}). **Look for** {signs.look_for}."


def model_scale_sentence(name: str, config: CheckpointConfig | None) -> str:
    """What the loaded model was trained on, from its own card (``config.json``)."""
    if config is None:
        return f"The model loaded now ({name}) says nothing about how it was trained."
    training = config.training or {}
    images = training.get("images") or {}
    total = sum(sum(counts.values()) for counts in images.values() if counts)
    learnt = sum((images.get("train") or {}).values())
    source = (config.source_weights or {}).get("name")
    origin = (
        f"fine-tuned from {source}"
        if source and not (config.source_weights or {}).get("from_scratch")
        else "trained from scratch"
    )
    scans = (
        f" on {total:,} labelled scans ({learnt:,} to learn from, the others to choose and test it)"
        if total
        else ""
    )
    if origin == "trained from scratch":
        return (
            f"The model loaded now, {name}, was {origin}{scans}: not a foundation model, but "
            "its features show the same ideas."
        )
    return f"The model loaded now, {name}, was {origin}{scans}."


OCT_MD = """
## What is OCT?
**Optical coherence tomography** measures how deep tissue reflects near-infrared light, by
interferometry, and builds cross-sections of the retina at a few micrometres' resolution. One
cross-section is a **B-scan**: the vitreous (dark) at the top, then the retinal layers — from the
bright nerve fibre layer down to the bright band of the retinal pigment epithelium (RPE) and
Bruch's membrane — and the choroid below. The dip in the middle of a macular scan is the fovea.

## The four classes (Kermany et al. 2018)
"""

HEATMAP_MD = """
## Reading a heat map
- **Grad-CAM and its variants** weigh the last block's features by how much they raise the score
  of the chosen class: warm colours mark image regions whose features pushed the model *towards*
  that class. Pick another class in "Explain class" to see the evidence for it.
- **Grad-CAM, earlier block** (convolutional networks such as the ResNet-18) is Grad-CAM taken
  one block before the last, on a grid twice as fine: where the last block's maps all look
  alike, it shows what the block before them holds.
- **EigenCAM**, **attention** and **attention rollout** do not depend on the class: they show
  what the model's features or attention concentrate on, not why it chose a label.
- A Vision Transformer sees the scan as a grid of square patches (MIRAGE at 512x512 with
  32-pixel patches: 16x16): its maps are coarse, then smoothed to the scan's size. They show
  *where*, never *what*: they are not a segmentation of the lesion.

## Foundation models, features and probes
- A **foundation model** such as MIRAGE is pre-trained once, without labels, on a very large
  number of OCT scans. It learns to turn a scan into **features**: a list of numbers (768 for
  MIRAGE-Base) that describe what the scan shows.
"""

FEATURES_MD = """
- If scans of one disease get similar features, a new task needs little: a **linear probe** is
  a single layer (a logistic regression) fitted on the frozen features, in seconds, from a few
  labelled scans. The large model itself is not changed.
- The **feature map** (Model tab) draws every test scan as a point placed by its features
  (t-SNE or PCA squeeze them into two dimensions): when the colours (the reference classes)
  form clusters, the features already separate the diseases; crosses are the model's mistakes,
  often where two clusters meet.
- **Adapt** fits a probe on scans you bring (any classes), tested on patients it did not learn
  from, and draws the **label-efficiency curve**: balanced accuracy with 1, 2, 5, ... labelled
  scans per class. The better the features, the fewer labels the curve needs to rise; with a
  handful of scans the estimates are rough (read the confidence interval).
"""

PITFALLS_MD = """
## Pitfalls
- A confident answer is not a right one: read its verdict (above) before its probability.
- A plausible map does not make a prediction right: wrong answers get convincing maps too.
- Maps can light up borders, text, padding or noise: signs of shortcuts a model learnt from its
  training data rather than disease.
- Different methods disagree; some barely change when the model's weights are randomised
  (Adebayo et al., *Sanity checks for saliency maps*, 2018). Compare several before concluding.
- The probabilities are the model's, calibrated on scans it did not learn from; they are not
  the probability that a patient has a disease.
"""

TRUST_MD = """
## How far to trust an answer
Every answer comes with a **verdict**. The app decides it in this order, and stops at the
first that applies:

1. **Not an OCT B-scan.** The image is in colour, blank, only noise, too small, or shows no
   retinal layers: a photograph, a fundus image, a screenshot of a heat map. The model would
   still put out probabilities, but they mean nothing, so the app gives no answer.
2. **Unlike the training scans.** It is a B-scan, but unlike every scan the model learnt
   from: its brightness, background, speckle or shape, or what the model sees in it, are not
   what it knows. Most often it comes from **another OCT device** or clinic. Be careful: on
   such scans a model can be wrong *and* look confident.
3. **Unsure.** The model's **prediction set** holds two classes or more. The set is the
   classes the model cannot rule out: for scans like the ones it was checked on, a 90% set
   holds the right class about 90 times in 100. One class in the set: the model can tell;
   two or more: it cannot decide between them, and neither should you without a closer look.
   An answer is also unsure when its set holds one class but that class is not probable
   enough: each model has a **bar for "sure"**, set on scans kept aside for checking, where
   its answers above the bar were right at least 97 times in 100.
4. **Sure.** None of the above: a B-scan like its training scans, a set of one class, and a
   probability at or above the bar. Even then it is sometimes wrong (for the bundled
   ResNet-18, about 3 answers in 100 on its own test scans): sure is not certain.

**Why the check for unlike scans comes before the set.** The set's promise holds only for
scans like those it was checked on. On another device it breaks without a sign, so the app
first asks whether the scan is like the training scans, and says so when it is not.
"""


#: The Learn tab's text, whole (the classes' paragraphs between its parts).
LEARN_MD = (
    OCT_MD
    + "\n".join(f"- {class_markdown(name)}" for name in CLASS_SIGNS)
    + "\n"
    + HEATMAP_MD
    + FEATURES_MD
    + LEARN_PRETRAINING_MD
    + PITFALLS_MD
    + TRUST_MD
)

#: One real example of each verdict (a bundled scan, or a bundled scan made into what it is
#: not), the verdict the bundled model gives it and a caption; tests/test_verdict.py checks
#: that each still gets its verdict.
VERDICT_EXAMPLES = (
    ("sure", "examples/NORMAL/NORMAL-1384-3.jpeg", "Sure: a normal retina"),
    ("unsure", "examples/CNV/CNV-451136-1.jpeg", "Unsure: CNV or DME? (labelled CNV)"),
    (
        "unlike_training",
        "test-scans/images/CNV/cnv_train_1445.jpg",
        "Unlike the training scans (labelled CNV)",
    ),
    (
        "not_a_bscan",
        "examples/DRUSEN/DRUSEN-228939-1.jpeg",
        "Not an OCT B-scan: a screenshot of a heat map over a scan",
    ),
)


def verdict_example(verdict: str, path: Path) -> Image.Image | str:
    """The picture of a verdict's example: the bundled scan itself, or for "not an OCT
    B-scan" the scan with a colour heat map over it, as a student might upload a screenshot."""
    if verdict != "not_a_bscan":
        return str(path)
    scan = minmax(torch.from_numpy(read_image(path))).numpy()
    rows, cols = np.mgrid[: scan.shape[0], : scan.shape[1]] / np.array(scan.shape)[:, None, None]
    heat = np.exp(-((rows - 0.55) ** 2 + (cols - 0.5) ** 2) / 0.03)
    return render_overlay(scan, heat.astype(np.float32), "jet", 0.5)


def build_learn_tab(ctx: AppContext) -> None:
    """Teaching text around a gallery of the bundled example scans; each class's paragraph
    and the sentence about the loaded model are their own elements (links land on them)."""
    registry = ctx.registry
    with gr.Tab("Learn", id="learn"):
        gr.Markdown(OCT_MD)
        for name in CLASS_SIGNS:
            gr.Markdown(class_markdown(name), elem_id=learn_anchor(name))
        if ctx.examples:
            gr.Gallery(
                [(path, f"{cls} ({Path(path).name})") for path, cls in ctx.examples],
                label="Real scans of each class (Kermany et al. 2018, CC BY 4.0)",
                columns=5,
                height="auto",
                object_fit="contain",
                elem_id="learn-examples",
            )
        gr.Markdown(TRUST_MD)
        examples = [(v, ASSETS / p, caption) for v, p, caption in VERDICT_EXAMPLES]
        if all(path.is_file() for _, path, _ in examples):
            gr.Gallery(
                [(verdict_example(v, path), caption) for v, path, caption in examples],
                label="One real example of each verdict, as the bundled ResNet-18 gives it",
                columns=4,
                height="auto",
                object_fit="contain",
                elem_id="learn-verdicts",
            )
        gr.Markdown(HEATMAP_MD)
        scale = gr.Markdown(
            "- " + model_scale_sentence(registry.default, registry.config(registry.default)),
            elem_id="learn-this-model",
        )
        gr.Markdown(FEATURES_MD)
        pretraining_tab = bool(available_sources(ctx.pretraining))
        if pretraining_tab:
            gr.Markdown(LEARN_PRETRAINING_MD + "\n" + label_efficiency_markdown())
        gr.Markdown(PITFALLS_MD)
        build_learn_links(ctx.tabs, pretraining_tab)

    def on_model(name: str):
        return "- " + model_scale_sentence(name, registry.config(name))

    ctx.model.change(on_model, inputs=[ctx.model], outputs=[scale], api_visibility="private")


#: Learn tab: each concept, the button that shows it, its tab and the element it lands on.
CONCEPTS = (
    (
        "**Sensitivity, specificity and the confusion matrix**: each cell counts the scans "
        "of one class given one answer; open a cell to see the scans behind a number.",
        "Model tab: explore the confusion matrix",
        "model",
        "explorer-heading",
    ),
    (
        "**Class-agnostic methods** (EigenCAM, attention, rollout) show the same map whatever "
        "class you ask about; **faithfulness** and the **sanity check** tell which maps follow "
        "what the model uses and learnt.",
        "Classify tab: compare all methods",
        "classify",
        "compare",
    ),
    (
        "**Calibration**: a model that says 80% should be right 8 times in 10; the reliability "
        "diagram shows how far it is.",
        "Model tab: reliability diagram",
        "model",
        "report-reliability",
    ),
    (
        "**Features**: how the model arranges the test scans; do the diseases form clusters, "
        "and where are its mistakes?",
        "Model tab: feature map",
        "model",
        "featuremap-plot",
    ),
    (
        "**A probe and the labels it needs**: fit one on your labelled scans and see how good "
        "it gets with 1, 2, 5, ... labelled scans per class.",
        "Adapt to your scans",
        "adapt",
        None,
    ),
    (
        "**Verdicts**: each answer says whether it is sure, unsure, unlike the training "
        "scans or not an OCT B-scan at all; try a bundled example, then a photograph.",
        "Classify tab",
        "classify",
        None,
    ),
    (
        "**Generalisation**: a model is only as good as its figures on scans like yours; "
        "evaluate it on your own labelled scans: the verdicts' shares and accuracy come first.",
        "Evaluate your scans",
        "evaluate",
        None,
    ),
    (
        "**Reading scans yourself**: classify the scans the model was evaluated on, then "
        "compare your answers with the reference and the model.",
        "Test yourself",
        "quiz",
        None,
    ),
)


PRETRAINING_CONCEPT = (
    "**Masked pre-training**: hide most of a scan and watch a model that learnt without "
    "labels fill it in.",
    "How it learned",
    "pretraining",
    None,
)


def go_to(button: gr.Button, tabs: gr.Tabs, tab_id: str, elem_id: str | None = None) -> None:
    """Wire ``button`` to open the tab ``tab_id`` and land on its element ``elem_id`` (opened,
    if it is a closed accordion); on the tab's top when ``elem_id`` is None."""
    event = button.click(lambda: gr.Tabs(selected=tab_id), outputs=[tabs], api_visibility="private")
    event.then(None, js=scroll_to_js(elem_id or TABS_ID))


def build_learn_links(tabs: gr.Tabs | None, pretraining_tab: bool = False) -> None:
    """Buttons that take the reader from a concept to where the app shows it (to "How it
    learned" when ``pretraining_tab``)."""
    if tabs is None:
        return
    gr.Markdown("## See it in the app")
    concepts = (*CONCEPTS, PRETRAINING_CONCEPT) if pretraining_tab else CONCEPTS
    for text, where, tab_id, elem_id in concepts:
        with gr.Row(equal_height=True):
            gr.Markdown(text, scale=4)
            button = gr.Button(f"→ {where}", scale=1, size="sm")
        go_to(button, tabs, tab_id, elem_id)
