"""A checkpoint's report (``metrics.json``) read as untrusted data.

:func:`load_report` refuses a file over :data:`MAX_REPORT_BYTES` unread and one that is not
JSON; :func:`check_report` checks, field by field, everything the app reads from a report (the
figures and their intervals, the per-class rows, the confusion matrix, the prediction sets'
coverage), so a malformed report is one line naming the field (:class:`ReportError`), never a
traceback while a page is built. The report's contract is in :mod:`mirage_demo.metrics`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MAX_REPORT_BYTES", "ReportError", "check_report", "load_report"]

#: A report is a few KB (an adapted model's, with every scan's fold: ~60 KB per 1,000 scans).
MAX_REPORT_BYTES = 2_000_000
REPORT_NAME = "metrics.json"


class ReportError(ValueError):
    """A report that cannot be used; the message names the problem in one line."""


def load_report(directory: str | Path) -> dict[str, Any] | None:
    """The ``metrics.json`` of a checkpoint directory, or ``None`` if it has none; a
    :class:`ReportError` when it is too large or not a JSON object."""
    path = Path(directory) / REPORT_NAME
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_REPORT_BYTES:
        raise ReportError(f"{REPORT_NAME} is larger than {MAX_REPORT_BYTES / 1e6:.0f} MB")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        reason = str(err).split(";")[0][:100]
        raise ReportError(f"{REPORT_NAME} is not valid JSON ({reason})") from err
    if not isinstance(data, dict):
        raise ReportError(f"{REPORT_NAME} must hold a JSON object")
    return data


def _bad(field: str, what: str) -> ReportError:
    return ReportError(f"{REPORT_NAME}: {field} must be {what}")


def _number(value: Any, field: str, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(field, "a number" + (" or null" if optional else ""))


def _count(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(field, "a whole number")


def _mapping(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(field, "a mapping")
    return value


def _metric(value: Any, field: str) -> None:
    """``{"value": number | null, "ci95": [low | null, high | null]}`` (or absent: null)."""
    if value is None:
        return
    entry = _mapping(value, field)
    _number(entry.get("value"), f"{field}.value")
    interval = entry.get("ci95")
    if interval is not None:
        if not isinstance(interval, list) or len(interval) != 2:
            raise _bad(f"{field}.ci95", "a list of two numbers")
        for bound in interval:
            _number(bound, f"{field}.ci95")


def check_report(report: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """``report`` when every field the app reads has the type it expects (a model of
    ``class_names``); else a :class:`ReportError` naming the first bad field."""
    report = _mapping(report, "the report")
    if "num_images" in report:
        _count(report["num_images"], "num_images")
    if not isinstance(report.get("split", ""), str):
        raise _bad("split", "a text")
    for name, value in _mapping(report.get("overall", {}), "overall").items():
        _metric(value, f"overall.{name}")
    for cls, row in _mapping(report.get("per_class", {}), "per_class").items():
        for name, value in _mapping(row, f"per_class.{cls}").items():
            if name == "support":
                _count(value, f"per_class.{cls}.support")
            else:
                _metric(value, f"per_class.{cls}.{name}")
    for cls, value in _mapping(report.get("images_per_class", {}), "images_per_class").items():
        _count(value, f"images_per_class.{cls}")
    if "confusion_matrix" in report:
        matrix, k = report["confusion_matrix"], len(class_names)
        if not isinstance(matrix, list) or len(matrix) != k:
            raise _bad("confusion_matrix", f"{k} rows of {k} counts")
        for row in matrix:
            if not isinstance(row, list) or len(row) != k:
                raise _bad("confusion_matrix", f"{k} rows of {k} counts")
            for value in row:
                _count(value, "confusion_matrix")
    if report.get("uncertainty"):
        _check_uncertainty(_mapping(report["uncertainty"], "uncertainty"))
    return report


def _check_uncertainty(found: dict[str, Any]) -> None:
    """The prediction sets' part: the figures :mod:`mirage_demo.ui.report` shows."""
    for key in ("level", "coverage", "mean_set_size", "flagged", "ood_false_alarm_target"):
        _number(found.get(key), f"uncertainty.{key}", optional=False)
    _number(found.get("mistakes_warned"), "uncertainty.mistakes_warned")
    _number(found.get("sure_probability"), "uncertainty.sure_probability")
    _count(found.get("mistakes"), "uncertainty.mistakes")
    for cls, row in _mapping(found.get("per_class", {}), "uncertainty.per_class").items():
        row = _mapping(row, f"uncertainty.per_class.{cls}")
        _count(row.get("images"), f"uncertainty.per_class.{cls}.images")
        for key in ("coverage", "mean_set_size", "flagged"):
            _number(row.get(key), f"uncertainty.per_class.{cls}.{key}")
    pooled = found.get("pooled_classes", [])
    if not isinstance(pooled, list) or not all(isinstance(c, str) for c in pooled):
        raise _bad("uncertainty.pooled_classes", "a list of class names")
