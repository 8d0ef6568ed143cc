"""The predictions file (``predictions.csv``): one writer for the report's, the CLI's and the
app's, every text cell safe to open in a spreadsheet."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mirage_demo.fileio import atomic_write_text

__all__ = ["UNCERTAINTY_COLUMNS", "csv_text", "write_predictions_csv"]


_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: Any) -> str:
    """A text cell a spreadsheet shows as text, never runs: a leading ``= + - @``, tab or
    carriage return (a file named ``=HYPERLINK(...).png``) gets a ``'`` in front (OWASP)."""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


#: The predictions file's columns for an answer's verdict (:mod:`mirage_demo.verdict`) and a
#: checkpoint's uncertainty (:mod:`mirage_demo.uncertainty`).
UNCERTAINTY_COLUMNS = ("trust", "prediction_set", "out_of_distribution", "ood_score")


def _uncertainty_cells(entry: dict[str, Any] | None) -> list[str]:
    trust = csv_text((entry or {}).get("trust") or "")
    if not entry or entry.get("prediction_set") is None:
        return [trust] + [""] * (len(UNCERTAINTY_COLUMNS) - 1)
    score = entry.get("ood_score")
    return [
        trust,
        csv_text("|".join(entry["prediction_set"])),
        str(int(bool(entry["out_of_distribution"]))),
        f"{score:.3f}" if score is not None and np.isfinite(score) else "",
    ]


def write_predictions_csv(
    path: str | Path,
    class_names: Sequence[str],
    files: Sequence[str],
    probs: Sequence[Sequence[float] | None] | np.ndarray,
    *,
    true: Sequence[str] | None = None,
    warnings: Sequence[Sequence[str]] | None = None,
    errors: Sequence[str | None] | None = None,
    uncertainty: Sequence[dict[str, Any] | None] | None = None,
) -> Path:
    """Write a predictions file (atomically): one row per image, in order.

    Columns: ``file``, ``true`` (only when ``true`` is given), ``predicted``,
    ``prob_<CLASS>`` for each class (6 decimals), then, when ``uncertainty`` is given (each
    row's ``trust``, ``prediction_set``, ``out_of_distribution`` and ``ood_score``, or None),
    ``trust`` (the verdict: ``not_a_bscan``, ``unlike_training``, ``unsure``, ``sure``, or
    empty), ``prediction_set`` (class names joined with ``"|"``), ``out_of_distribution``
    (0/1) and ``ood_score`` (empty: not a finite number), then ``warnings`` (joined with
    ``"; "``) and ``error`` when those are given.
    A row whose ``probs`` is ``None`` (an image that could not be read) leaves ``predicted``
    and the probabilities empty.
    """
    columns = {
        "probabilities": probs,
        "true": true,
        "warnings": warnings,
        "errors": errors,
        "uncertainty": uncertainty,
    }
    for what, column in columns.items():
        if column is not None and len(column) != len(files):
            raise ValueError(f"{len(column)} {what} for {len(files)} files")
    header = ["file", *(["true"] if true is not None else []), "predicted"]
    header += [f"prob_{c}" for c in class_names]
    header += list(UNCERTAINTY_COLUMNS) if uncertainty is not None else []
    header += ["warnings"] if warnings is not None else []
    header += ["error"] if errors is not None else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([csv_text(cell) for cell in header])
    for i, name in enumerate(files):
        row = [csv_text(name), *([csv_text(true[i])] if true is not None else [])]
        if probs[i] is None:
            row += ["", *([""] * len(class_names))]
        else:
            values = np.asarray(probs[i], dtype=np.float64)
            row += [csv_text(class_names[int(values.argmax())]), *(f"{p:.6f}" for p in values)]
        if uncertainty is not None:
            row += _uncertainty_cells(uncertainty[i])
        if warnings is not None:
            row.append(csv_text("; ".join(warnings[i])))
        if errors is not None:
            row.append(csv_text(errors[i] or ""))
        writer.writerow(row)
    atomic_write_text(Path(path), buffer.getvalue())
    return Path(path)
