"""Evaluate your own labelled scans (named endpoint ``/evaluate``): the report of
``python -m train.evaluate`` (:func:`mirage_demo.evaluation.evaluate_upload`, the same code),
the explorer on those scans and their predictions as CSV."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr

from mirage_demo.data import DataError
from mirage_demo.evaluation import evaluate_upload
from mirage_demo.testscans import scan_set_from_predictions
from mirage_demo.ui.batch import batch_gpu_seconds
from mirage_demo.ui.context import AppContext
from mirage_demo.ui.explore import ExplorerState, explorer_views, matrix_frame
from mirage_demo.ui.featuremap import build_feature_map
from mirage_demo.ui.report import REPORT_FIGURES, metrics_markdown

__all__ = ["build_evaluate_tab", "evaluate_scans"]

EVALUATIONS_KEPT_S = 3600  # unpacked uploads and reports older than this are deleted


def _uploads(files: Any) -> list[tuple[str, str]]:
    """``(name, path)`` of Gradio file payloads; a name keeps its folder when it has one."""
    out = []
    for item in files or []:
        if isinstance(item, dict):
            path = item.get("path") or item.get("name")
            name = item.get("orig_name") or Path(path).name
        else:
            path = getattr(item, "path", None) or getattr(item, "name", None) or item
            name = Path(str(path)).name
        out.append((str(name), str(path)))
    return out


def _clean_old(parent: Path) -> None:
    for folder in parent.glob("oct-eval-*"):
        try:
            if time.time() - folder.stat().st_mtime > EVALUATIONS_KEPT_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def evaluate_scans(predictor: Any, files: Any, progress: Any = None) -> dict[str, Any]:
    """``/evaluate``: the report of ``train.evaluate`` on uploaded labelled scans.

    Returns ``metrics`` (the metrics.json content), ``folder`` (report files and unpacked
    scans), ``csv`` (predictions.csv), ``figures`` and the explorer's ``state``.
    """
    uploads = _uploads(files)
    if not uploads:
        raise gr.Error("Upload a .zip of labelled scans laid out as <CLASS>/<image>.")
    parent = Path(tempfile.gettempdir())
    _clean_old(parent)
    out = Path(tempfile.mkdtemp(prefix="oct-eval-", dir=parent))
    config = predictor.config

    def on_batch(done: int, total: int) -> None:
        if progress is not None:
            progress((done, total), desc="Evaluating", unit="batches")

    try:
        metrics, upload = evaluate_upload(
            predictor.model, config, uploads, out, device=predictor.device, on_batch=on_batch
        )
    except DataError as err:
        shutil.rmtree(out, ignore_errors=True)
        raise gr.Error(str(err), title="Cannot evaluate these scans") from err
    scans = scan_set_from_predictions(
        out / "predictions.csv", upload.root, config.class_names, "your scans"
    )
    state = ExplorerState(list(config.class_names), scans.matrix(), scans)
    figures = {name: str(out / name) for name in REPORT_FIGURES}
    skipped = ""
    if upload.skipped:
        skipped = f" Left out: {len(upload.skipped)} ({upload.skipped[0]}"
        skipped += ", ...)." if len(upload.skipped) > 1 else ")."
    unreadable = len(upload.samples) - metrics["num_images"]
    if unreadable:
        skipped += f" Unreadable images left out: {unreadable}."
    return {
        "metrics": metrics,
        "folder": out,
        "csv": str(out / "predictions.csv"),
        "figures": figures,
        "state": state,
        "note": f"{metrics['num_images']} labelled scans evaluated.{skipped}",
    }


EVALUATE_INTRO = (
    "Upload a **.zip** of labelled scans laid out as `<CLASS>/<image>` (or images named "
    "`CLASS-PATIENT-N.jpeg`, as Kermany's are). You get the report of `python -m "
    "train.evaluate`: metrics with 95% confidence intervals, per-class figures, confusion "
    "matrix, ROC curves and reliability, an explorer of your scans and their predictions as "
    "CSV. Class folders must be classes the model knows: **{classes}**. Nothing is kept after "
    "an hour."
)


def build_evaluate_tab(ctx: AppContext) -> None:
    """Evaluate your own labelled scans (named endpoint ``/evaluate``)."""
    registry = ctx.registry
    classes = ", ".join(registry.config(registry.default).class_names)
    with gr.Tab("Evaluate your scans", id="evaluate"):
        intro = gr.Markdown(EVALUATE_INTRO.format(classes=classes))
        files = gr.File(
            file_count="multiple",
            file_types=[".zip", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"],
            label="Labelled scans: a .zip of <CLASS>/<image>",
            elem_id="evaluate-files",
        )
        button = gr.Button("Evaluate", variant="primary")
        note = gr.Markdown(elem_id="evaluate-note")
        report = gr.Markdown(elem_id="evaluate-report")
        figures = [
            gr.Image(
                label="Confusion matrix", interactive=False, visible=False, elem_id="evaluate-cm"
            )
        ]
        with gr.Row():
            figures += [
                gr.Image(label=label, interactive=False, visible=False, elem_id=f"evaluate-{key}")
                for key, label in (("roc", "ROC curves"), ("reliability", "Reliability"))
            ]
        csv_file = gr.File(label="Predictions (CSV)", elem_id="evaluate-csv")
        with gr.Accordion("All numbers (metrics.json)", open=False):
            numbers = gr.JSON(elem_id="evaluate-json")
        gr.Markdown("### Explore your scans")
        views = explorer_views(ctx, "evaluate")
        build_feature_map(ctx, "evaluate-map", source=views.state)

    @ctx.model_call(duration=batch_gpu_seconds)  # as /batch: a base plus per image
    def on_evaluate(uploaded, name, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        result = evaluate_scans(registry.get(name), uploaded, progress)
        state = result["state"]
        message = "Choose a cell of the matrix to see those of your scans."
        return (
            result["note"],
            metrics_markdown(result["metrics"]),
            *[gr.update(value=path, visible=True) for path in result["figures"].values()],
            result["csv"],
            result["metrics"],
            matrix_frame(state),
            message,
            state,
        )

    button.click(
        on_evaluate,
        inputs=[files, ctx.model],
        outputs=[note, report, *figures, csv_file, numbers, *views.outputs],
        api_name="evaluate",
        **ctx.model_events,
    )

    def on_model(name: str):
        names = ", ".join(registry.config(name).class_names)
        return EVALUATE_INTRO.format(classes=names)

    ctx.on_model(on_model, [intro])
