"""Adapt the model to your labelled scans (named endpoint ``/adapt``): a linear probe on the
loaded model's frozen features (:func:`mirage_demo.adapt.adapt_upload`, the code of
``python -m train --mode probe``), its cross-validated report, the label-efficiency curve,
then "Use it" (this session's picker serves it) and "Download" (its checkpoint)."""

from __future__ import annotations

import html
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch

from mirage_demo.adapt import MIN_PATIENTS, Adaptation, adapt_upload, plot_label_efficiency
from mirage_demo.checkpoint import WEIGHTS_NAME, save_checkpoint
from mirage_demo.inference import Predictor
from mirage_demo.metrics import REPORT_FILES
from mirage_demo.ui.batch import batch_gpu_seconds
from mirage_demo.ui.context import STATE_TTL_S, AppContext, current_session
from mirage_demo.ui.evaluate import labelled_scans_input, uploaded_files
from mirage_demo.ui.jobs import account, job_folder
from mirage_demo.ui.registry import MAX_MODELS_PER_SESSION, SESSION_PREFIX
from mirage_demo.ui.report import metrics_markdown

__all__ = ["adapt_scans", "build_adapt_tab", "download_adapted", "use_adapted"]

ADAPT_PREFIX = "adapt-"  # a job folder (mirage_demo.ui.jobs): kept an hour, capped on disk
CURVE_FILE = "label_efficiency.png"
DOWNLOAD_NAME = "adapted-model.zip"


def adapt_scans(predictor: Any, name: str, files: Any, progress: Any = None) -> dict[str, Any]:
    """``/adapt``: a probe on ``predictor``'s frozen features fitted to uploaded labelled
    scans of any classes. Returns ``adaptation``, ``folder``, ``note``, ``report`` (Markdown),
    ``matrix`` and ``curve`` (figure paths); a request that fails leaves nothing on disk."""
    uploads = uploaded_files(files)
    if not uploads:
        raise gr.Error("Upload a .zip of labelled scans first: one folder per class (DME/a.png).")

    def on_progress(done: int, total: int) -> None:
        if progress is not None:
            progress((done, total), desc="Computing features", unit="scans")

    with job_folder(ADAPT_PREFIX, "Cannot adapt to these scans") as out:
        adaptation = adapt_upload(
            predictor.model,
            predictor.preprocessing,
            predictor.config,
            uploads,
            out,
            device=predictor.device,
            on_progress=on_progress,
        )
        classes = len(adaptation.config.class_names)
        plot_label_efficiency(adaptation.curve, full_point(adaptation), classes, out / CURVE_FILE)
    return {
        "adaptation": adaptation,
        "folder": out,
        "note": _note(adaptation, name),
        "report": metrics_markdown(adaptation.metrics),
        "matrix": str(out / "confusion_matrix.png"),
        "curve": str(out / CURVE_FILE),
    }


def full_point(adaptation: Adaptation) -> dict[str, Any]:
    """The curve's last point: the probe on all training folds (scans per class there, on
    average) with the report's balanced accuracy and its 95% CI."""
    labels = np.array([s.label for s in adaptation.samples])
    folds = len(adaptation.cv.fits)
    per_class = float(np.bincount(labels).mean()) * (folds - 1) / folds
    return {"per_class": per_class, **adaptation.metrics["overall"]["balanced_accuracy"]}


def _note(adaptation: Adaptation, name: str) -> str:
    metrics, upload = adaptation.metrics, adaptation.upload
    counts = ", ".join(f"{k} {v}" for k, v in metrics["images_per_class"].items())
    seconds = adaptation.seconds
    value = metrics["overall"]["balanced_accuracy"]["value"]
    low, high = metrics["overall"]["balanced_accuracy"]["ci95"]
    interval = f" (95% CI {low:.0%}–{high:.0%})" if low is not None else ""
    note = (
        f"**A probe on the frozen features of {html.escape(name)}**, fitted to "
        f"{metrics['num_images']} of your scans ({html.escape(counts)}): cross-validated "
        f"balanced accuracy **{value:.0%}**{interval} over {len(adaptation.cv.fits)} "
        f"patient-disjoint folds. Features {seconds['embedding']:.1f} s, cross-validation "
        f"{seconds['cross_validation']:.1f} s, label-efficiency curve "
        f"{seconds['label_efficiency']:.1f} s."
    )
    if not adaptation.curve:
        note += (
            " Too few scans of some class in the training folds for a label-efficiency curve: "
            "only the probe on all of them is shown."
        )
    if upload.skipped:
        note += f" Left out: {len(upload.skipped)} ({html.escape(upload.skipped[0])}"
        note += ", ...)." if len(upload.skipped) > 1 else ")."
    unreadable = len(upload.samples) - len(adaptation.samples)
    if unreadable:
        note += f" Unreadable images left out: {unreadable}."
    return note


def use_adapted(
    registry: Any, state: dict[str, Any] | None, session: str | None = None
) -> tuple[str, str]:
    """Serve the adapted model in the picker of the browser tab ``session`` (only there):
    ``(its name, message)``. Nothing is written: the model is the served one's twin in memory."""
    if state is None:
        raise gr.Error("Adapt the model to your scans first.")
    adaptation, folder = state["adaptation"], state["folder"]
    if state.get("name") is None:
        classes = "/".join(adaptation.config.class_names)
        state["name"] = (
            f"{SESSION_PREFIX}{state['base']} → {classes}, {len(adaptation.samples)} scans "
            f"#{uuid.uuid4().hex[:6]}"
        )
    config = adaptation.config
    predictor = Predictor(
        adaptation.model, config.class_names, config.preprocessing, config.temperature
    )
    predictor.config = config
    replaced = registry.add_session_model(state["name"], predictor, folder, owner=session)
    message = (
        f"**Now serving “{html.escape(state['name'])}”** in the model picker above, for this "
        "browser tab only: Classify, Compare, the Model tab (its cross-validated report and "
        "explorer on your scans) and Test yourself use it. Each browser tab keeps its "
        f"{MAX_MODELS_PER_SESSION} latest adapted models; one unused for 10 minutes is "
        "forgotten."
    )
    if replaced:
        message += f" It replaces {html.escape(replaced[0])}."
    return state["name"], message


def download_adapted(state: dict[str, Any] | None) -> str:
    """A zip of the adapted model's checkpoint (float16 weights) and report, written once into
    the job's folder (counted with it) and handed out again on a second Download: its path."""
    if state is None:
        raise gr.Error("Adapt the model to your scans first.")
    folder, adaptation = Path(state["folder"]), state["adaptation"]
    path = folder / DOWNLOAD_NAME
    if not folder.is_dir():
        raise gr.Error("This adapted model is no longer kept: adapt again to download it.")
    if not path.is_file():
        staging, part = folder / "checkpoint", path.with_suffix(".part")
        save_checkpoint(staging, adaptation.model, adaptation.config, dtype=torch.float16)
        try:
            with zipfile.ZipFile(part, "w") as archive:  # weights stored: they do not deflate
                for name in ("config.json", WEIGHTS_NAME):
                    archive.write(staging / name, f"adapted-model/{name}")
                for name in (*REPORT_FILES, CURVE_FILE):
                    if (folder / name).is_file():
                        archive.write(folder / name, f"adapted-model/{name}", zipfile.ZIP_DEFLATED)
            part.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            part.unlink(missing_ok=True)
        account(keep=folder)  # the zip counts against the jobs' cap at once
    return str(path)


ADAPT_INTRO = """
A **foundation model** learns general features of OCT scans once; a new task then needs only
a small **probe**: a linear classifier fitted on those frozen features. Bring a **.zip of
labelled scans**, one folder per class (`NORMAL/scan1.png`, ...), **any classes** (another
data set, another device, a two-class CNV-vs-NORMAL task): the loaded model computes each
scan's features once, a probe is fitted and tested on scans of other patients than those it
learnt from (**patient-disjoint cross-validation**), and you get its report, the
**label-efficiency curve** (how good it is with 1, 2, 5, ... labelled scans per class) and a
model you can **use** here or **download**. At least {min} patients per class (one
scan each is enough); at most 1,000 images. Nothing is kept after an hour.
"""


def build_adapt_tab(ctx: AppContext) -> None:
    """Adapt the loaded model to your labelled scans (named endpoint ``/adapt``)."""
    registry = ctx.registry
    with gr.Tab("Adapt to your scans", id="adapt"):
        gr.Markdown(ADAPT_INTRO.format(min=MIN_PATIENTS), elem_classes="teach-big")
        files = labelled_scans_input("adapt-files")
        button = gr.Button("Adapt the model to these scans", variant="primary")
        note = gr.Markdown(elem_id="adapt-note", elem_classes="teach-big")
        with gr.Row():
            use = gr.Button("Use it: serve the adapted model here", elem_id="adapt-use")
            download = gr.Button("Download the adapted model", elem_id="adapt-download")
        served = gr.Markdown(elem_id="adapt-served")
        checkpoint = gr.File(label="Adapted model (zip)", elem_id="adapt-checkpoint")
        curve = gr.Image(
            label="Label efficiency",
            interactive=False,
            elem_id="adapt-curve",
            visible=False,
            alt_text="Label-efficiency curve: balanced accuracy of the probe against the number "
            "of labelled scans per class",
        )
        report = gr.Markdown(elem_id="adapt-report")
        matrix = gr.Image(
            label="Confusion matrix (cross-validated)",
            interactive=False,
            elem_id="adapt-cm",
            visible=False,
            alt_text="Confusion matrix of the probe, cross-validated on your scans",
        )
        with gr.Accordion("All numbers (metrics.json, label-efficiency curve)", open=False):
            numbers = gr.JSON(elem_id="adapt-json")
            curve_rows = gr.JSON(elem_id="adapt-curve-json")
        state = gr.State(None, time_to_live=STATE_TTL_S)

    @ctx.model_call(duration=batch_gpu_seconds)  # as /evaluate: a base plus per image
    def on_adapt(uploaded, name, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        result = adapt_scans(registry.get(name), name, uploaded, progress)
        adaptation = result["adaptation"]
        return (
            result["note"],
            result["report"],
            gr.update(value=result["matrix"], visible=True),
            gr.update(value=result["curve"], visible=True),
            adaptation.metrics,
            adaptation.curve,
            {"adaptation": adaptation, "folder": result["folder"], "base": name},
            "",
            None,
        )

    button.click(
        on_adapt,
        inputs=[files, ctx.model],
        outputs=[note, report, matrix, curve, numbers, curve_rows, state, served, checkpoint],
        api_name="adapt",
        **ctx.long_events,
    )

    def on_use(current):
        session = current_session()
        name, message = use_adapted(registry, current, session)
        choices = [*registry.names, *registry.session_names(session)]
        return gr.update(choices=choices, value=name, visible=True), message, current

    use.click(
        on_use,
        inputs=[state],
        outputs=[ctx.model, served, state],
        api_visibility="private",
        **ctx.long_events,
    )
    download.click(
        download_adapted,
        inputs=[state],
        outputs=[checkpoint],
        api_visibility="private",
        **ctx.long_events,
    )
