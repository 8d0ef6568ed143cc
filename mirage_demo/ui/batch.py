"""The Batch tab: many scans or ``.zip`` archives at once (``/batch``), a table and a CSV."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from mirage_demo.data import IMAGE_SUFFIXES, ImageReadError
from mirage_demo.inference import Prediction
from mirage_demo.metrics import write_predictions_csv
from mirage_demo.ui.context import AppContext, display_name, upload_path
from mirage_demo.ui.registry import ModelRegistry

__all__ = ["MAX_BATCH_FILES", "MAX_ZIP_BYTES", "build_batch_tab", "classify_batch"]

MAX_BATCH_FILES = 500
MAX_ZIP_BYTES = 500 * 2**20
BATCH_SIZE = 8
UNREADABLE = "unreadable"


def batch_inputs(uploads: Sequence[Any]) -> list[tuple[str, Any]]:
    """(name, image source) for every uploaded image and every image inside uploaded zips;
    a member that cannot be taken out of its zip is an :class:`ImageReadError` in its place."""
    items: list[tuple[str, Any]] = []
    for upload in uploads or []:
        path = upload_path(upload)
        name = display_name(upload, path)
        if name.lower().endswith(".zip"):
            items += zip_members(path, name)
        else:
            items.append((name, path))
    if not items:
        raise gr.Error("Upload some OCT scans (or a .zip of them) first.")
    if len(items) > MAX_BATCH_FILES:
        raise gr.Error(f"{len(items)} images is too many for one batch (limit {MAX_BATCH_FILES}).")
    return items


def zip_members(path: str, name: str) -> list[tuple[str, bytes | ImageReadError]]:
    """The image files in a zip archive, as (``archive/member``, bytes)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise gr.Error(f"{name} is not a readable zip archive.") from err
    with archive:
        members = [
            m
            for m in archive.infolist()
            if not m.is_dir()
            and Path(m.filename).suffix.lower() in IMAGE_SUFFIXES
            and not Path(m.filename).name.startswith(".")
        ]
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise gr.Error(f"{name} unpacks to more than {MAX_ZIP_BYTES // 2**20} MB.")
        out: list[tuple[str, bytes | ImageReadError]] = []
        for member in members:
            member_name = f"{name}/{member.filename}"
            try:
                out.append((member_name, archive.read(member)))
            except (zipfile.BadZipFile, OSError) as err:
                out.append((member_name, ImageReadError(member_name, f"corrupt in zip ({err})")))
    return out


def batch_header(class_names: Sequence[str]) -> list[str]:
    """The batch table's columns (the CSV download has the one predictions format)."""
    return ["file", "prediction", *[f"p({c})" for c in class_names], "warnings / errors"]


def classify_batch(
    registry: ModelRegistry,
    uploads: Sequence[Any],
    model_name: str | None = None,
    progress: gr.Progress | None = None,
) -> tuple[list[list[Any]], str, str]:
    """``/batch``: a table of predictions (one row per image), a CSV file and a summary."""
    predictor = registry.get(model_name)
    items = batch_inputs(uploads)
    names = [name for name, _ in items]

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress((done, total), desc="Classifying", unit="images")

    results = predictor.predict_batch(
        [source for _, source in items],
        batch_size=BATCH_SIZE,
        names=names,
        on_error="return",
        progress=report,
    )
    classes = predictor.class_names
    rows: list[list[Any]] = []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, Prediction):
            probs = [round(result.probabilities[c], 4) for c in classes]
            rows.append([name, result.label, *probs, "; ".join(result.warnings)])
        else:
            rows.append([name, UNREADABLE, *[None] * len(classes), result.reason])
    handle, csv_path = tempfile.mkstemp(prefix="oct-predictions-", suffix=".csv")
    os.close(handle)
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
    )
    failed = sum(not isinstance(r, Prediction) for r in results)
    counts = {c: sum(row[1] == c for row in rows) for c in classes}
    summary = f"**{len(rows) - failed} classified**" + (
        f", **{failed} unreadable**" if failed else ""
    )
    summary += " — " + ", ".join(f"{c}: {n}" for c, n in counts.items())
    return rows, csv_path, summary


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

    @ctx.model_call
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
    )
    ctx.model.change(on_model, inputs=[ctx.model], outputs=[batch_table], api_visibility="private")
