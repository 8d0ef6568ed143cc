"""The Learn tab: what OCT shows, the classes of Kermany et al. 2018, how to read a heat map."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from mirage_demo.ui.context import AppContext

__all__ = ["LEARN_MD", "build_learn_tab"]

LEARN_MD = """
## What is OCT?
**Optical coherence tomography** measures how deep tissue reflects near-infrared light, by
interferometry, and builds cross-sections of the retina at a few micrometres' resolution. One
cross-section is a **B-scan**: the vitreous (dark) at the top, then the retinal layers — from the
bright nerve fibre layer down to the bright band of the retinal pigment epithelium (RPE) and
Bruch's membrane — and the choroid below. The dip in the middle of a macular scan is the fovea.

## The four classes (Kermany et al. 2018)
- **CNV — choroidal neovascularisation** (neovascular, "wet" age-related macular degeneration):
  vessels growing from the choroid through Bruch's membrane. On OCT: a lumpy, hyper-reflective
  lesion under the retina or the RPE, often with sub-retinal or intra-retinal fluid (dark spaces)
  and a detached, irregular RPE.
- **DME — diabetic macular oedema**: a thickened retina with dark, cyst-like pockets of
  intra-retinal fluid, bright dots of hard exudate, sometimes fluid under the retina.
- **DRUSEN** (early or intermediate AMD): deposits between the RPE and Bruch's membrane that
  lift the RPE into small domes or a wavy line; the retina above is usually dry.
- **NORMAL**: a smooth foveal dip, continuous layers, no fluid, a straight RPE.

## Reading a heat map
- **Grad-CAM and its variants** weigh the last block's features by how much they raise the score
  of the chosen class: warm colours mark image regions whose features pushed the model *towards*
  that class. Pick another class in "Explain class" to see the evidence for it.
- **EigenCAM**, **attention** and **attention rollout** do not depend on the class: they show
  what the model's features or attention concentrate on, not why it chose a label.
- A ViT at 512x512 with 32-pixel patches sees a 16x16 grid: the maps are coarse, then smoothed
  to the scan's size. They show *where*, never *what*: they are not a segmentation of the lesion.

## Foundation models, features and probes
- A **foundation model** such as MIRAGE is pre-trained once, without labels, on a very large
  number of OCT scans. It learns to turn a scan into **features**: a list of numbers (768 for
  MIRAGE-Base) that describe what the scan shows. (The demo models here were trained from
  scratch on about a thousand labelled scans: not a foundation model, but their features show
  the same ideas.)
- If scans of one disease get similar features, a new task needs little: a **linear probe** is
  a single layer (a logistic regression) fitted on the frozen features, in seconds, from a few
  labelled scans. The large model itself is not changed.
- The **feature map** (Model tab) draws every test scan as a point placed by its features
  (t-SNE or PCA squeeze them into two dimensions): when the colours (the reference classes)
  form clusters, the features already separate the diseases; crosses are the model's mistakes,
  often where two clusters meet.
- **Adapt** fits a probe on scans you bring (any classes) with cross-validation, and draws the
  **label-efficiency curve**: balanced accuracy with 1, 2, 5, ... labelled scans per class.
  The better the features, the fewer labels the curve needs to rise; with a handful of scans
  the estimates are rough (read the confidence interval).

## Pitfalls
- A plausible map does not make a prediction right: wrong answers get convincing maps too.
- Maps can light up borders, text, padding or noise: signs of shortcuts a model learnt from its
  training data rather than disease.
- Different methods disagree; some barely change when the model's weights are randomised
  (Adebayo et al., *Sanity checks for saliency maps*, 2018). Compare several before concluding.
- The probabilities are the model's, calibrated on its validation split; they are not the
  probability that a patient has a disease.
"""


def build_learn_tab(ctx: AppContext) -> None:
    """Teaching text around a gallery of the bundled example scans."""
    with gr.Tab("Learn", id="learn"):
        intro, rest = LEARN_MD.split("## Reading a heat map")
        gr.Markdown(intro)
        if ctx.examples:
            gr.Gallery(
                [(path, f"{cls} ({Path(path).name})") for path, cls in ctx.examples],
                label="Real scans of each class (Kermany et al. 2018, CC BY 4.0)",
                columns=5,
                height="auto",
                object_fit="contain",
            )
        gr.Markdown("## Reading a heat map" + rest)
        build_learn_links(ctx.tabs)


#: Learn tab: each concept and the place in the app where it can be seen (tab id).
CONCEPTS = (
    (
        "**Sensitivity, specificity and the confusion matrix**: each cell counts the scans "
        "of one class given one answer; open a cell to see the scans behind a number.",
        "Model tab: explore the confusion matrix",
        "model",
    ),
    (
        "**Class-agnostic methods** (EigenCAM, attention, rollout) show the same map whatever "
        "class you ask about; **faithfulness** and the **sanity check** tell which maps follow "
        "what the model uses and learnt.",
        "Classify tab: compare all methods",
        "classify",
    ),
    (
        "**Calibration**: a model that says 80% should be right 8 times in 10; the reliability "
        "diagram shows how far it is.",
        "Model tab: reliability diagram",
        "model",
    ),
    (
        "**Features**: how the model arranges the test scans; do the diseases form clusters, "
        "and where are its mistakes?",
        "Model tab: feature map",
        "model",
    ),
    (
        "**A probe and the labels it needs**: fit one on your labelled scans and see how good "
        "it gets with 1, 2, 5, ... labelled scans per class.",
        "Adapt to your scans",
        "adapt",
    ),
    (
        "**Generalisation**: a model is only as good as its figures on scans like yours; "
        "evaluate it on your own labelled scans.",
        "Evaluate your scans",
        "evaluate",
    ),
    (
        "**Reading scans yourself**: classify the scans the model was evaluated on, then "
        "compare your answers with the reference and "
        "the model.",
        "Test yourself",
        "quiz",
    ),
)


def build_learn_links(tabs: gr.Tabs | None) -> None:
    """Buttons that take the reader from a concept to where the app shows it."""
    if tabs is None:
        return
    gr.Markdown("## See it in the app")
    for text, where, tab_id in CONCEPTS:
        with gr.Row(equal_height=True):
            gr.Markdown(text, scale=4)
            button = gr.Button(f"→ {where}", scale=1, size="sm")
        button.click(
            lambda tab_id=tab_id: gr.Tabs(selected=tab_id),
            outputs=[tabs],
            api_visibility="private",
        )


#: Styles of the teaching views: numbers readable from the back of a lecture room.
