"""The Batch tab: many scans or ``.zip`` archives at once (``/batch``), a table and a CSV."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import gradio as gr

from mirage_demo.images import IMAGE_SUFFIXES, ImageReadError
from mirage_demo.inference import Prediction
from mirage_demo.predictions_csv import write_predictions_csv
from mirage_demo.ui.answer import verdict_cells
from mirage_demo.ui.context import AppContext, display_name, output_file, upload_path
from mirage_demo.ui.registry import ModelRegistry
from mirage_demo.uncertainty import DEFAULT_LEVEL
from mirage_demo.uploads import RequestBudget, expand_uploads, zip_entry_count
from mirage_demo.verdict import NOT_A_BSCAN, VERDICTS, verdict_words
from mirage_demo.volume_io import load_volume, volume_kind
from mirage_demo.volume_predict import VolumeSummary, classify_volume, summarize
from mirage_demo.volumes import Volume, VolumeError, slice_label

__all__ = ["MAX_BATCH_FILES", "build_batch_tab", "classify_batch"]

MAX_BATCH_FILES = 500  # images (and listed entries) per request
#: ZeroGPU time ``/batch`` reserves (seconds): base (a scan's) + per image, at most the cap.
BATCH_GPU_SECONDS = (10, 0.25, 120)
BATCH_SIZE = 8
UNREADABLE = "unreadable"
NO_ANSWER = f"({verdict_words(NOT_A_BSCAN)})"  # the prediction cell: no class for it
VOLUME_FILE_KINDS = ("vol", "e2e", "dicom")  # zips stay batches of images here


def batch_header(class_names: Sequence[str]) -> list[str]:
    """The batch table's columns (the CSV download has the one predictions format)."""
    probabilities = [f"p({c})" for c in class_names]
    trust = [f"{DEFAULT_LEVEL:.0%} set", "unlike training scans", "verdict"]
    return ["file", "prediction", *probabilities, *trust, "warnings / errors"]


Entry = tuple[str, "Prediction | ImageReadError | VolumeSummary"]  # (name, what to show)


def classify_batch(
    registry: ModelRegistry,
    uploads: Sequence[Any],
    model_name: str | None = None,
    progress: gr.Progress | None = None,
) -> tuple[list[list[Any]], str, str]:
    """``/batch``: a table of predictions (one row per image; a volume gives one row per
    B-scan and a summary row), a CSV file and a summary.

    Zip members are read (capped, see :mod:`mirage_demo.uploads`) only when their turn comes,
    :data:`BATCH_SIZE` at a time; an entry that cannot be read is a row with the reason.
    Volume files (:mod:`mirage_demo.volume_io`, told by their content) are read B-scan by
    B-scan, a batch at a time."""
    predictor = registry.get(model_name)
    files = [(display_name(u, upload_path(u)), upload_path(u)) for u in uploads or []]
    if not files:
        raise gr.Error("Upload some OCT scans (or a .zip of them) first.")
    volumes = [(n, p) for n, p in files if volume_kind(p) in VOLUME_FILE_KINDS]
    images = [f for f in files if f not in volumes]
    entries: list[Entry] = []
    with ExitStack() as stack:
        items = expand_uploads(images, stack)
        total, opened = len(items), []
        for name, path in volumes:  # headers only; stops at the limit
            if total > MAX_BATCH_FILES:
                break
            opened.append(_open_volume(name, path, stack))
            total += len(opened[-1][1]) if opened[-1][1] is not None else 1
        if total > MAX_BATCH_FILES:
            what = "files and B-scans are" if volumes else "files is"
            raise gr.Error(f"{total} {what} too many for one batch (limit {MAX_BATCH_FILES}).")
        entries += _classify_items(predictor, items, progress, total)
        for (name, _), (error, volume) in zip(volumes, opened, strict=True):
            if volume is None:
                entries.append((name, ImageReadError(name, error)))
                continue
            entries += _classify_volume(predictor, volume, progress, len(entries), total)
    rows = [_row(name, result, predictor.class_names) for name, result in entries]
    return rows, _write_csv(entries, predictor.class_names), _summary_line(entries)


def _open_volume(name: str, path: str, stack: ExitStack) -> tuple[str, Volume | None]:
    """A volume file opened (closed with ``stack``), or the reason it cannot be."""
    try:
        volume = load_volume(path, name)
    except VolumeError as err:
        return err.reason, None
    stack.callback(volume.close)
    return "", volume


def _classify_items(
    predictor: Any, items: list[Any], progress: gr.Progress | None, total: int
) -> list[Entry]:
    budget = RequestBudget()
    entries: list[Entry] = []
    for start in range(0, len(items), BATCH_SIZE):
        if progress is not None:
            progress((start, total), desc="Classifying", unit="images")
        part = items[start : start + BATCH_SIZE]
        sources: list[Any] = []
        for item in part:
            try:
                sources.append(item.load(budget))
            except ImageReadError as err:
                sources.append(err)
        names = [item.name for item in part]
        results = predictor.predict_batch(
            sources, batch_size=BATCH_SIZE, names=names, on_error="return"
        )
        entries += zip(names, results, strict=True)
        del sources  # the members' bytes: one batch at a time
    return entries


def _classify_volume(
    predictor: Any, volume: Volume, progress: gr.Progress | None, done: int, total: int
) -> list[Entry]:
    """One entry per B-scan, then the volume's summary."""

    def report(step: int, _: int) -> None:
        if progress is not None:
            progress((done + step, total), desc="Classifying", unit="images")

    results = []
    for item in classify_volume(predictor, volume, batch_size=BATCH_SIZE, progress=report):
        item.image = None  # one batch of B-scans at a time
        results.append(item)
    entries: list[Entry] = [(slice_label(volume.name, r.index), r.result) for r in results]
    entries.append((f"{volume.name}: the whole volume", summarize(results, predictor.class_names)))
    return entries


def _answer(result: Prediction) -> str:
    """The prediction cell and count: the class, or :data:`NO_ANSWER` for what is not a
    B-scan."""
    return NO_ANSWER if result.trust == NOT_A_BSCAN else result.label


def _row(name: str, result: Any, classes: Sequence[str]) -> list[Any]:
    if isinstance(result, Prediction):
        probs = [round(result.probabilities[c], 4) for c in classes]
        return [name, _answer(result), *probs, *verdict_cells(result), "; ".join(result.warnings)]
    if isinstance(result, VolumeSummary):
        highest = [round(result.highest[c][0], 4) if c in result.highest else None for c in classes]
        text = f"{result.text()} (Probabilities: each class's highest in any B-scan.)"
        return [name, f"volume: {result.finding or UNREADABLE}", *highest, "", "", "", text]
    return [name, UNREADABLE, *[None] * (len(classes) + 3), result.reason]


def _write_csv(entries: list[Entry], classes: Sequence[str]) -> str:
    """The predictions CSV: a row per image or B-scan; a volume's summary row has its text
    in ``warnings`` and no probabilities."""
    results = [result for _, result in entries]
    predicted = [r if isinstance(r, Prediction) else None for r in results]
    csv_path = output_file("oct-predictions", ".csv")
    write_predictions_csv(
        csv_path,
        classes,
        [name for name, _ in entries],
        [[p.probabilities[c] for c in classes] if p else None for p in predicted],
        warnings=[
            p.warnings if p else [r.text()] if isinstance(r, VolumeSummary) else []
            for p, r in zip(predicted, results, strict=True)
        ],
        errors=[r.reason if isinstance(r, ImageReadError) else None for r in results],
        uncertainty=[p.to_dict() if p else None for p in predicted],
    )
    return str(csv_path)


def _summary_line(entries: list[Entry]) -> str:
    """Counts per class, then each volume's summary in words (also its row in the table)."""
    results = [result for _, result in entries]
    classified = [r for r in results if isinstance(r, Prediction)]
    failed = sum(isinstance(r, ImageReadError) for r in results)
    counts = Counter(_answer(result) for result in classified)
    line = f"**{len(classified)} classified**" + (f", **{failed} unreadable**" if failed else "")
    line += " — " + ", ".join(f"{c}: {n}" for c, n in sorted(counts.items()))
    for name, result in entries:
        if isinstance(result, VolumeSummary):
            text = html.escape(result.text())
            line += f"\n\n**{html.escape(name)}** (its row at the end): {text}"
    verdicts = Counter(r.trust for r in classified)
    if verdicts:
        shown = [f"{verdict_words(v)}: {verdicts[v]}" for v in (*VERDICTS, None) if verdicts[v]]
        line += "\n\nHow far to trust them — " + ", ".join(shown)
    return line


def batch_gpu_seconds(uploads: Sequence[Any] | None, *_: Any, **__: Any) -> int:
    """ZeroGPU seconds to reserve for ``/batch``: a base plus a little per image, capped."""
    base, per_image, cap = BATCH_GPU_SECONDS
    images = 0
    for upload in uploads or []:
        path = upload_path(upload)
        if str(path).lower().endswith(".zip"):
            images += zip_entry_count(path)
        elif volume_kind(path) in VOLUME_FILE_KINDS:
            images += _bscan_count(path)
        else:
            images += 1
    return int(min(cap, base + per_image * images))


def _bscan_count(path: str) -> int:
    """A volume file's B-scans, from its header (1 if it cannot be read)."""
    try:
        with load_volume(path) as volume:
            return len(volume)
    except VolumeError:
        return 1


def build_batch_tab(ctx: AppContext) -> None:
    """Classify many scans or zips: a table, a CSV download, a progress bar."""
    registry = ctx.registry
    with gr.Tab("Batch", id="batch"):
        gr.Markdown(
            "Classify many scans at once: select several images, or a .zip of them, or OCT "
            "volumes (.vol, .e2e, DICOM: a row per B-scan and a summary row). Unreadable "
            "files are listed, not fatal."
        )
        batch_files = gr.File(
            file_count="multiple",
            file_types=[*sorted(IMAGE_SUFFIXES), ".zip", ".vol", ".e2e", ".dcm", ".dicom"],
            label="Scans, .zip archives or OCT volumes",
            elem_id="batch-files",
        )
        batch_button = gr.Button("Classify all", variant="primary")
        batch_summary = gr.Markdown(elem_id="batch-summary")
        batch_table = gr.Dataframe(  # shown with its rows; it scrolls sideways, words whole
            headers=batch_header(registry.config().class_names),
            label="Predictions",
            interactive=False,
            visible=False,
            elem_id="batch-table",
        )
        batch_csv = gr.File(label="Download as CSV", visible=False, elem_id="batch-csv")

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
    ).success(  # shown once there are rows (the endpoint itself returns plain values)
        lambda: (gr.update(visible=True), gr.update(visible=True)),
        outputs=[batch_table, batch_csv],
        api_visibility="private",
    )
    ctx.model.change(on_model, inputs=[ctx.model], outputs=[batch_table], api_visibility="private")
