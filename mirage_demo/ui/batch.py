"""The Batch tab: many scans or ``.zip`` archives at once (``/batch``), a table and a CSV."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import gradio as gr

from mirage_demo.images import IMAGE_SUFFIXES, ImageReadError
from mirage_demo.inference import Prediction
from mirage_demo.predictions_csv import write_predictions_csv
from mirage_demo.ui.context import AppContext, display_name, output_file, upload_path
from mirage_demo.ui.registry import ModelRegistry
from mirage_demo.uncertainty import DEFAULT_LEVEL
from mirage_demo.uploads import RequestBudget, expand_uploads, zip_entry_count

__all__ = ["MAX_BATCH_FILES", "build_batch_tab", "classify_batch"]

MAX_BATCH_FILES = 500  # images (and listed entries) per request
#: ZeroGPU time ``/batch`` reserves (seconds): base (a scan's) + per image, at most the cap.
BATCH_GPU_SECONDS = (10, 0.25, 120)
BATCH_SIZE = 8
UNREADABLE = "unreadable"


def batch_header(class_names: Sequence[str]) -> list[str]:
    """The batch table's columns (the CSV download has the one predictions format)."""
    probabilities = [f"p({c})" for c in class_names]
    trust = [f"{DEFAULT_LEVEL:.0%} set", "unlike training scans"]
    return ["file", "prediction", *probabilities, *trust, "warnings / errors"]


def _trust_cells(result: Prediction) -> list[str]:
    """The set and out-of-distribution columns ("n/a": the checkpoint has neither)."""
    if result.prediction_set is None:
        return ["n/a", "n/a"]
    flag = f"yes ({result.ood_score:.1f})" if result.out_of_distribution else "no"
    return [", ".join(result.prediction_set), flag]


def classify_batch(
    registry: ModelRegistry,
    uploads: Sequence[Any],
    model_name: str | None = None,
    progress: gr.Progress | None = None,
) -> tuple[list[list[Any]], str, str]:
    """``/batch``: a table of predictions (one row per image), a CSV file and a summary.

    Zip members are read (capped, see :mod:`mirage_demo.uploads`) only when their turn comes,
    :data:`BATCH_SIZE` at a time; an entry that cannot be read is a row with the reason."""
    predictor = registry.get(model_name)
    files = [(display_name(u, upload_path(u)), upload_path(u)) for u in uploads or []]
    if not files:
        raise gr.Error("Upload some OCT scans (or a .zip of them) first.")
    budget = RequestBudget()
    names: list[str] = []
    results: list[Prediction | ImageReadError] = []
    with ExitStack() as stack:
        items = expand_uploads(files, stack)
        if len(items) > MAX_BATCH_FILES:
            raise gr.Error(
                f"{len(items)} files is too many for one batch (limit {MAX_BATCH_FILES})."
            )
        for start in range(0, len(items), BATCH_SIZE):
            if progress is not None:
                progress((start, len(items)), desc="Classifying", unit="images")
            part = items[start : start + BATCH_SIZE]
            sources: list[Any] = []
            for item in part:
                try:
                    sources.append(item.load(budget))
                except ImageReadError as err:
                    sources.append(err)
            names += [item.name for item in part]
            results += predictor.predict_batch(
                sources, batch_size=BATCH_SIZE, names=[i.name for i in part], on_error="return"
            )
            del sources  # the members' bytes: one batch at a time
    classes = predictor.class_names
    rows: list[list[Any]] = []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, Prediction):
            probs = [round(result.probabilities[c], 4) for c in classes]
            trust = _trust_cells(result)
            rows.append([name, result.label, *probs, *trust, "; ".join(result.warnings)])
        else:
            rows.append([name, UNREADABLE, *[None] * (len(classes) + 2), result.reason])
    csv_path = output_file("oct-predictions", ".csv")
    write_predictions_csv(
        csv_path,
        classes,
        names,
        [
            [r.probabilities[c] for c in classes] if isinstance(r, Prediction) else None
            for r in results
        ],
        warnings=[r.warnings if isinstance(r, Prediction) else [] for r in results],
        errors=[None if isinstance(r, Prediction) else r.reason for r in results],
        uncertainty=[r.to_dict() if isinstance(r, Prediction) else None for r in results],
    )
    failed = sum(not isinstance(r, Prediction) for r in results)
    counts = {c: sum(row[1] == c for row in rows) for c in classes}
    summary = f"**{len(rows) - failed} classified**" + (
        f", **{failed} unreadable**" if failed else ""
    )
    summary += " — " + ", ".join(f"{c}: {n}" for c, n in counts.items())
    return rows, str(csv_path), summary


def batch_gpu_seconds(uploads: Sequence[Any] | None, *_: Any, **__: Any) -> int:
    """ZeroGPU seconds to reserve for ``/batch``: a base plus a little per image, capped."""
    base, per_image, cap = BATCH_GPU_SECONDS
    images = 0
    for upload in uploads or []:
        path = upload_path(upload)
        images += zip_entry_count(path) if str(path).lower().endswith(".zip") else 1
    return int(min(cap, base + per_image * images))


def build_batch_tab(ctx: AppContext) -> None:
    """Classify many scans or zips: a table, a CSV download, a progress bar."""
    registry = ctx.registry
    with gr.Tab("Batch", id="batch"):
        gr.Markdown(
            "Classify many scans at once: select several images, or a .zip of them. "
            "Unreadable files are listed, not fatal."
        )
        batch_files = gr.File(
            file_count="multiple",
            file_types=[*sorted(IMAGE_SUFFIXES), ".zip"],
            label="Scans or .zip archives",
        )
        batch_button = gr.Button("Classify all", variant="primary")
        batch_summary = gr.Markdown()
        batch_table = gr.Dataframe(
            headers=batch_header(registry.config().class_names),
            label="Predictions",
            interactive=False,
            wrap=True,
        )
        batch_csv = gr.File(label="Download as CSV")

    @ctx.model_call(duration=batch_gpu_seconds)
    def on_batch(files, name, progress=gr.Progress()):  # noqa: B008 (Gradio's idiom)
        rows, csv_path, summary = classify_batch(registry, files, name, progress)
        header = batch_header(registry.config(name).class_names)
        return {"headers": header, "data": rows}, csv_path, summary

    def on_model(name):
        return {"headers": batch_header(registry.config(name).class_names), "data": []}

    batch_button.click(
        on_batch,
        inputs=[batch_files, ctx.model],
        outputs=[batch_table, batch_csv, batch_summary],
        api_name="batch",
        **ctx.long_events,
    )
    ctx.model.change(on_model, inputs=[ctx.model], outputs=[batch_table], api_visibility="private")
