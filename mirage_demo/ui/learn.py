"""The Learn tab: what OCT shows, the classes of Kermany et al. 2018, how to read a heat map."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from mirage_demo.data import minmax, read_image
from mirage_demo.explain import render_overlay
from mirage_demo.ui.context import AppContext
from mirage_demo.ui.registry import ASSETS

__all__ = ["LEARN_MD", "TRUST_MD", "VERDICT_EXAMPLES", "build_learn_tab", "verdict_example"]

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
- A confident answer is not a right one: read its verdict (above) before its probability.
- A plausible map does not make a prediction right: wrong answers get convincing maps too.
- Maps can light up borders, text, padding or noise: signs of shortcuts a model learnt from its
  training data rather than disease.
- Different methods disagree; some barely change when the model's weights are randomised
  (Adebayo et al., *Sanity checks for saliency maps*, 2018). Compare several before concluding.
- The probabilities are the model's, calibrated on its validation split; they are not the
  probability that a patient has a disease.
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
4. **Sure.** None of the above: a B-scan like its training scans, and a set of one class.
   Even then it is sometimes wrong (about 2 answers in 100 on its own test scans): sure is
   not certain.

**Why the check for unlike scans comes before the set.** The set's promise holds only for
scans like those it was checked on. On another device it breaks without a sign, so the app
first asks whether the scan is like the training scans, and says so when it is not.
"""

#: One real example of each verdict (a bundled scan, or a bundled scan made into what it is
#: not), the verdict the bundled model gives it and a caption; tests/test_verdict.py checks
#: that each still gets its verdict.
VERDICT_EXAMPLES = (
    ("sure", "examples/NORMAL/NORMAL-1384-3.jpeg", "Sure: a normal retina"),
    ("unsure", "examples/CNV/CNV-451136-1.jpeg", "Unsure: CNV or DME? (labelled CNV)"),
    (
        "unlike_training",
        "test-scans/images/CNV/cnv_train_2236.jpg",
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
        "**Verdicts**: each answer says whether it is sure, unsure, unlike the training "
        "scans or not an OCT B-scan at all; try a bundled example, then a photograph.",
        "Classify tab",
        "classify",
    ),
    (
        "**Generalisation**: a model is only as good as its figures on scans like yours; "
        "evaluate it on your own labelled scans: the verdicts' shares and accuracy come first.",
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
