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
