"""Evaluate your own labelled scans (named endpoint ``/evaluate``): the report of
``python -m train.evaluate`` (:func:`mirage_demo.evaluation.evaluate_upload`, the same code),
the explorer on those scans and their predictions as CSV."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from mirage_demo.evaluation import evaluate_upload
from mirage_demo.testscans import scan_set_from_predictions
from mirage_demo.ui.batch import batch_gpu_seconds
from mirage_demo.ui.context import AppContext
from mirage_demo.ui.explore import ExplorerState, explorer_views, matrix_frame
from mirage_demo.ui.featuremap import build_feature_map
from mirage_demo.ui.jobs import job_folder
from mirage_demo.ui.report import REPORT_FIGURES, metrics_markdown, trust_headline

__all__ = ["build_evaluate_tab", "evaluate_scans", "labelled_scans_input", "uploaded_files"]

REPORT_GPU_SECONDS = 10  # ZeroGPU time /evaluate adds to /batch's: bootstrap and figures


def uploaded_files(files: Any) -> list[tuple[str, str]]:
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


def evaluate_scans(predictor: Any, files: Any, progress: Any = None) -> dict[str, Any]:
    """``/evaluate``: the report of ``train.evaluate`` on uploaded labelled scans.

    Returns ``metrics`` (the metrics.json content), ``folder`` (report files and unpacked
    scans), ``csv`` (predictions.csv), ``figures`` and the explorer's ``state``. A request
    that fails leaves nothing on disk.
    """
    uploads = uploaded_files(files)
    if not uploads:
        raise gr.Error("Upload a .zip of labelled scans first: one folder per class (DME/a.png).")
    config = predictor.config

    def on_batch(done: int, total: int) -> None:
        if progress is not None:
            progress((done, total), desc="Evaluating", unit="batches")

    with job_folder("oct-eval-", "Cannot evaluate these scans") as out:
        metrics, upload = evaluate_upload(
            predictor.model,
            config,
            uploads,
            out,
            device=predictor.device,
            on_batch=on_batch,
            uncertainty=predictor.uncertainty,
        )
        scans = scan_set_from_predictions(
            out / "predictions.csv", upload.root, config.class_names, "your scans"
        )
    state = ExplorerState(list(config.class_names), scans.matrix(), scans)
    figures = {name: str(out / name) for name in REPORT_FIGURES}
    return {
        "metrics": metrics,
        "folder": out,
        "csv": str(out / "predictions.csv"),
        "figures": figures,
        "state": state,
        "note": _note(metrics["num_images"], len(upload.samples), upload.skipped),
    }


def _note(evaluated: int, unpacked: int, skipped: list[str]) -> str:
    """``N labelled scans evaluated.`` and what was left out (names escaped)."""
    note = f"{evaluated} labelled scans evaluated."
    if skipped:
        note += f" Left out: {len(skipped)} ({html.escape(skipped[0])}"
        note += ", ...)." if len(skipped) > 1 else ")."
    if unpacked > evaluated:
        note += f" Unreadable images left out: {unpacked - evaluated}."
    return note


EVALUATE_INTRO = (
    "Upload a **.zip** of labelled scans: one folder per class, named after it (`DME/scan1.png`"
    ", ...), or images named as Kermany's are (`DME-1234-1.jpeg`). You get the same report as "
    "the model's own test report: figures with 95% confidence intervals, per-class figures, "
    "the confusion matrix, ROC curves and calibration, an explorer of your scans and the "
    "answers as a spreadsheet (CSV). The folders must be classes the model knows: "
    "**{classes}**. Nothing is kept after an hour."
)


def evaluate_gpu_seconds(uploads: Any, *_: Any, **__: Any) -> int:
    """ZeroGPU seconds for ``/evaluate``: as ``/batch``, plus the report (bootstrap, figures)."""
    return batch_gpu_seconds(uploads) + REPORT_GPU_SECONDS


def labelled_scans_input(elem_id: str) -> gr.File:
    """The upload of labelled scans (``/evaluate``, ``/adapt``): zips of <CLASS>/<image>."""
    return gr.File(
        file_count="multiple",
        file_types=[".zip", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"],
        label="Labelled scans: a .zip with one folder per class",
        elem_id=elem_id,
    )


def build_evaluate_tab(ctx: AppContext) -> None:
    """Evaluate your own labelled scans (named endpoint ``/evaluate``). The page shows an
    error in its panel, where it stays; the endpoint raises it."""
    registry = ctx.registry
    classes = ", ".join(registry.config(registry.default).class_names)
    with gr.Tab("Evaluate your scans", id="evaluate"):
        intro = gr.Markdown(EVALUATE_INTRO.format(classes=classes))
        files = labelled_scans_input("evaluate-files")
        button = gr.Button("Evaluate", variant="primary", elem_id="evaluate-button")
        api_button = gr.Button("Evaluate (API)", visible=False)
        note = gr.Markdown(elem_id="evaluate-note", elem_classes="teach-big")
        report = gr.Markdown(elem_id="evaluate-report")
        figures = [
            gr.Image(
                label="Confusion matrix",
                interactive=False,
                visible=False,
                elem_id="evaluate-cm",
                alt_text="Confusion matrix of the model on your scans: counts and shares",
            )
        ]
        with gr.Row():
            figures += [
                gr.Image(
                    label=label,
                    interactive=False,
                    visible=False,
                    elem_id=f"evaluate-{key}",
                    alt_text=f"{label} of the model on your scans",
                )
                for key, label in (("roc", "ROC curves"), ("reliability", "Reliability diagram"))
            ]
        csv_file = gr.File(label="Answers (CSV)", elem_id="evaluate-csv", visible=False)
        with gr.Accordion("All numbers (metrics.json)", open=False, visible=False) as details:
            numbers = gr.JSON(elem_id="evaluate-json")
        with gr.Column(visible=False) as explore:
            gr.Markdown("### Explore your scans")
            views = explorer_views(ctx, "evaluate")
            build_feature_map(ctx, "evaluate-map", source=views.state)
    outputs = [note, report, *figures, csv_file, numbers, *views.outputs]

    @ctx.model_call(duration=evaluate_gpu_seconds)
    def on_evaluate(uploaded, name, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        result = evaluate_scans(registry.get(name), uploaded, progress)
        return _shown(result, registry.report(name), page=False)

    @ctx.model_call(duration=evaluate_gpu_seconds)
    def on_evaluate_page(uploaded, name, progress=gr.Progress()):  # noqa: B008
        try:
            result = evaluate_scans(registry.get(name), uploaded, progress)
        except gr.Error as err:  # kept in the panel, not a toast that fades
            hidden = gr.update(value=None, visible=False)
            failed = f"**{err.title or 'Cannot evaluate these scans'}:** {err.message}"
            return failed, "", *[hidden] * 4, None, None, "", None, *[gr.update(visible=False)] * 2
        shown = [gr.update(visible=True)] * 2
        return *_shown(result, registry.report(name), page=True), *shown

    api_button.click(
        on_evaluate,
        inputs=[files, ctx.model],
        outputs=outputs,
        api_name="evaluate",
        **ctx.long_events,
    )
    button.click(
        on_evaluate_page,
        inputs=[files, ctx.model],
        outputs=[*outputs, details, explore],
        api_visibility="private",
        **ctx.long_events,
    )

    def on_model(name: str):
        names = ", ".join(registry.config(name).class_names)
        return EVALUATE_INTRO.format(classes=names)

    ctx.on_model(on_model, [intro])


def _shown(
    result: dict[str, Any], own_report: dict[str, Any] | None, page: bool
) -> tuple[Any, ...]:
    """An evaluation's outputs: note, report (headed by the verdicts, compared with the
    model's ``own_report`` on its test split), the three figures, the CSV (for the ``page``,
    shown; for the API, its path), the numbers, the explorer's matrix, message and state."""
    state = result["state"]
    headline = trust_headline(result["metrics"], own_report)
    return (
        result["note"],
        headline + "\n\n" + metrics_markdown(result["metrics"], verdicts=False),
        *[gr.update(value=path, visible=True) for path in result["figures"].values()],
        gr.update(value=result["csv"], visible=True) if page else result["csv"],
        result["metrics"],
        matrix_frame(state),
        "Choose a cell of the matrix to see those of your scans.",
        state,
    )
