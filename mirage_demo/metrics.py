"""Classification metrics with bootstrap confidence intervals, calibration, and the report.

Pure numpy/scipy/scikit-learn/matplotlib: the trainer, ``train.evaluate`` and the app share it.
The report written into a checkpoint directory is a fixed contract:

``metrics.json``
    ``{"split", "num_images", "class_names", "images_per_class", "temperature",
    "overall": {accuracy, balanced_accuracy, macro_f1, mcc, cohen_kappa, macro_auroc, ece},
    "per_class": {CLASS: {sensitivity, specificity, precision, f1, auroc, "support"}},
    "confusion_matrix" (rows true, columns predicted), "bootstrap": {"n", "seed"}, "created"}``;
    every metric is ``{"value": float | null, "ci95": [lo | null, hi | null]}``, ``null`` where
    it is undefined (e.g. the AUROC of a class absent from the split). The JSON holds no NaN.
``predictions.csv``
    ``file,true,predicted,prob_<CLASS>...`` (probabilities after temperature scaling), written
    by :func:`~mirage_demo.predictions_csv.write_predictions_csv`, the one writer of
    predictions files (the CLI's and the app's add ``warnings`` and ``error`` columns and have
    no ``true``).
``confusion_matrix.png``, ``roc_curves.png``, ``reliability.png``
    Counts and row-normalised confusion matrices, one-vs-rest ROC curves, reliability diagram.

Definitions: one-vs-rest per class; balanced accuracy is the mean sensitivity over the classes
present; macro F1 averages the classes that are present or predicted (as scikit-learn does);
macro AUROC averages the classes whose AUROC is defined; MCC is the multi-class (Gorodkin)
form, 0 when undefined (as scikit-learn); ECE uses 15 equal-width bins of top-1 confidence.
Confidence intervals are percentile intervals over ``n`` bootstrap resamples of the images.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mirage_demo.fileio import atomic_write_text
from mirage_demo.predictions_csv import write_predictions_csv
from mirage_demo.reports import load_report  # its home is reports; re-exported here

__all__ = [
    "ECE_BINS",
    "OVERALL_METRICS",
    "PER_CLASS_METRICS",
    "REPORT_FILES",
    "compute_metrics",
    "confusion_matrix",
    "expected_calibration_error",
    "fit_temperature",
    "load_report",
    "nll",
    "plot_confusion_matrix",
    "plot_reliability",
    "plot_roc_curves",
    "softmax",
    "write_predictions_csv",
    "write_report",
]

OVERALL_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "mcc",
    "cohen_kappa",
    "macro_auroc",
    "ece",
)
PER_CLASS_METRICS = ("sensitivity", "specificity", "precision", "f1", "auroc")
REPORT_FILES = (
    "metrics.json",
    "predictions.csv",
    "confusion_matrix.png",
    "roc_curves.png",
    "reliability.png",
)
ECE_BINS = 15
_CHUNK = 100  # bootstrap resamples computed at once (bounds memory for large splits)


# --------------------------------------------------------------------------------------------
# Probabilities and calibration


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64, numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y_true: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (cross-entropy) of ``softmax(logits / temperature)``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(y_true)), y_true].mean())


def fit_temperature(
    logits: np.ndarray, y_true: Sequence[int], bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``.

    Guo et al. 2017 temperature scaling, fitted on held-out (validation) logits. Returns 1.0
    (the model as it is) when there is nothing to fit, or when the optimum runs into the lower
    bound: validation images all classified correctly make the likelihood keep growing as
    ``T -> 0``, and a near-zero temperature would turn every prediction into a certainty.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) == 0 or not np.isfinite(logits).all():
        return 1.0
    rows = np.arange(len(y_true))
    others = logits.copy()
    others[rows, y_true] = -np.inf
    if np.all(logits[rows, y_true] > others.max(axis=1)):
        return 1.0  # all correct: the likelihood only grows as T -> 0
    result = minimize_scalar(
        lambda log_t: nll(logits, y_true, math.exp(log_t)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-6},
    )
    if result.x - math.log(bounds[0]) < 1e-3:
        return 1.0
    return float(math.exp(result.x))


# --------------------------------------------------------------------------------------------
# Metrics from confusion matrices, vectorised over bootstrap resamples


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    count = np.sum(~np.isnan(values), axis=axis)
    total = np.nansum(values, axis=axis)
    return _div(total, count)


def _from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Every confusion-matrix metric for a stack of matrices ``(B, K, K)``."""
    cm = cm.astype(np.float64)
    n = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)  # true counts
    predicted = cm.sum(axis=1)
    fp, fn = predicted - tp, support - tp
    tn = n[:, None] - tp - fp - fn
    sensitivity = _div(tp, support)
    f1 = _div(2 * tp, support + predicted)
    correct = tp.sum(axis=1)
    cov_ytyp = correct * n - np.sum(predicted * support, axis=1)
    cov_ypyp = n**2 - np.sum(predicted**2, axis=1)
    cov_ytyt = n**2 - np.sum(support**2, axis=1)
    mcc = _div(cov_ytyp, np.sqrt(cov_ytyt * cov_ypyp))
    mcc = np.where(np.isnan(mcc) & (n > 0), 0.0, mcc)  # undefined -> 0, as scikit-learn
    p_observed = _div(correct, n)
    p_expected = _div(np.sum(predicted * support, axis=1), n**2)
    kappa = _div(p_observed - p_expected, 1.0 - p_expected)
    return {
        "accuracy": p_observed,
        "balanced_accuracy": _nanmean(sensitivity),
        "macro_f1": _nanmean(f1),
        "mcc": mcc,
        "cohen_kappa": kappa,
        "sensitivity": sensitivity,
        "specificity": _div(tn, tn + fp),
        "precision": _div(tp, predicted),
        "f1": f1,
    }


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks within each row of ``(B, n)`` values, ties sharing their mean rank."""
    rows, n = values.shape
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    position = np.broadcast_to(np.arange(n), (rows, n))
    starts = np.ones((rows, n), dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = np.ones((rows, n), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, position, n - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty((rows, n))
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=1)
    return ranks


def _auroc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC per row (Mann-Whitney U with average ranks for ties); NaN if a row
    has no positives or no negatives."""
    ranks = _average_ranks(scores)
    n_pos = positive.sum(axis=-1).astype(np.float64)
    n_neg = positive.shape[-1] - n_pos
    u = np.sum(ranks * positive, axis=-1) - n_pos * (n_pos + 1) / 2
    return _div(u, n_pos * n_neg)


def expected_calibration_error(
    y_true: Sequence[int], probs: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE: weighted mean |accuracy - confidence| over equal-width top-1 confidence bins."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    return float(_ece(y_true[None], probs.argmax(1)[None], probs.max(1)[None], n_bins)[0])


def _bin_of(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin ``m`` holds ``(m / n_bins, (m + 1) / n_bins]``; confidence 0 goes to bin 0."""
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def _ece(y_true: np.ndarray, y_pred: np.ndarray, conf: np.ndarray, n_bins: int) -> np.ndarray:
    rows, n = y_true.shape
    flat = (np.arange(rows)[:, None] * n_bins + _bin_of(conf, n_bins)).ravel()
    size = rows * n_bins
    conf_sum = np.bincount(flat, weights=conf.ravel(), minlength=size).reshape(rows, n_bins)
    hits = (y_true == y_pred).ravel().astype(np.float64)
    hit_sum = np.bincount(flat, weights=hits, minlength=size)
    gap = np.abs(hit_sum.reshape(rows, n_bins) - conf_sum).sum(axis=1)
    return _div(gap, np.full(rows, n))


def _all_metrics(y_true: np.ndarray, probs: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of the resamples ``rows`` (``(B, n)`` indices into the images)."""
    num_classes = probs.shape[1]
    yt = y_true[rows]
    y_pred = probs.argmax(axis=1)
    yp = y_pred[rows]
    batch = rows.shape[0]
    flat = (np.arange(batch)[:, None] * num_classes * num_classes + yt * num_classes + yp).ravel()
    cm = np.bincount(flat, minlength=batch * num_classes * num_classes).reshape(
        batch, num_classes, num_classes
    )
    out = _from_confusion(cm)
    auroc = np.stack(
        [_auroc(probs[rows, k], yt == k) for k in range(num_classes)], axis=1
    )  # (B, K)
    out["auroc"] = auroc
    out["macro_auroc"] = _nanmean(auroc)
    out["ece"] = _ece(yt, yp, probs.max(axis=1)[rows], ECE_BINS)
    return out


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _interval(samples: np.ndarray) -> list[float | None]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [None, None]
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return [float(lo), float(hi)]


def compute_metrics(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    split: str = "test",
    temperature: float = 1.0,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``metrics.json`` dictionary for true labels and (calibrated) class probabilities.

    ``probs`` is ``(n, K)`` with rows summing to 1 (already temperature-scaled; ``temperature``
    is only recorded). The prediction is the most probable class. Confidence intervals come
    from ``n_bootstrap`` resamples of the images drawn with ``seed`` (``0`` resamples: none).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    if probs.ndim != 2 or probs.shape != (len(y_true), num_classes):
        raise ValueError(
            f"probs must be (n_images, n_classes) = ({len(y_true)}, {num_classes}), "
            f"got {probs.shape}"
        )
    if len(y_true) == 0:
        raise ValueError("no images to compute metrics on")
    if y_true.min() < 0 or y_true.max() >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    n = len(y_true)
    point = {k: v[0] for k, v in _all_metrics(y_true, probs, np.arange(n)[None]).items()}
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, n_bootstrap, _CHUNK):
        rows = rng.integers(0, n, size=(min(_CHUNK, n_bootstrap - start), n))
        chunks.append(_all_metrics(y_true, probs, rows))
    boot = {k: np.concatenate([c[k] for c in chunks]) for k in point} if chunks else {}

    def entry(name: str, k: int | None = None) -> dict[str, Any]:
        value = point[name] if k is None else point[name][k]
        value = _finite(value)
        if value is None or not boot:
            return {"value": value, "ci95": [None, None]}
        samples = boot[name] if k is None else boot[name][:, k]
        return {"value": value, "ci95": _interval(samples)}

    support = np.bincount(y_true, minlength=num_classes)
    cm = confusion_matrix(y_true, probs.argmax(axis=1), num_classes)
    per_class = {}
    for k, name in enumerate(class_names):
        per_class[name] = {m: entry(m, k) for m in PER_CLASS_METRICS}
        per_class[name]["support"] = int(support[k])
    return {
        "split": split,
        "num_images": int(n),
        "class_names": list(class_names),
        "images_per_class": {name: int(support[k]) for k, name in enumerate(class_names)},
        "temperature": float(temperature),
        "overall": {m: entry(m) for m in OVERALL_METRICS},
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "bootstrap": {"n": int(n_bootstrap), "seed": int(seed)},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
    }


# --------------------------------------------------------------------------------------------
# Figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def plot_confusion_matrix(
    matrix: np.ndarray | Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    """Counts and row-normalised (recall) confusion matrices side by side."""
    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    normalized = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = max(3.5, 0.9 * len(class_names) + 1.5)
    fig = _figure(2 * size + 1.0, size + 0.4)
    axes = fig.subplots(1, 2)
    panels = [
        (axes[0], counts, "Counts", lambda v: f"{v:d}", counts.max() or 1),
        (axes[1], normalized, "Row-normalized (recall per true class)", lambda v: f"{v:.2f}", 1.0),
    ]
    for ax, values, label, fmt, vmax in panels:
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(label)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45, ha="right")
        ax.set_yticks(ticks, class_names)
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                dark = values[i, j] > 0.55 * vmax
                ax.text(
                    j,
                    i,
                    fmt(values[i, j]),
                    ha="center",
                    va="center",
                    color="white" if dark else "black",
                    fontsize=10,
                )
    fig.suptitle(title)
    fig.savefig(path)
    return Path(path)


def plot_roc_curves(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "ROC curves (one-vs-rest)",
) -> Path:
    """One-vs-rest ROC curve of every class with its AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    fig = _figure(6.0, 5.5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for k, name in enumerate(class_names):
        positive = y_true == k
        if positive.all() or not positive.any():
            ax.plot([], [], label=f"{name} (AUC undefined: {int(positive.sum())} positives)")
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, k])
        auc = roc_auc_score(positive, probs[:, k])
        ax.plot(fpr, tpr, linewidth=2, label=f"{name} (AUC {auc:.3f}, n={int(positive.sum())})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=9)
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return Path(path)


def plot_reliability(
    y_true: Sequence[int],
    probs: np.ndarray,
    path: str | Path,
    title: str = "Reliability diagram",
    n_bins: int = ECE_BINS,
) -> Path:
    """Accuracy against top-1 confidence per bin, the gap shaded, ECE in the title."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    bins = _bin_of(conf, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    acc = _div(np.bincount(bins, weights=(pred == y_true).astype(float), minlength=n_bins), counts)
    mean_conf = _div(np.bincount(bins, weights=conf, minlength=n_bins), counts)
    ece = expected_calibration_error(y_true, probs, n_bins)
    edges = np.linspace(0, 1, n_bins + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    fig = _figure(6.0, 6.5)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    filled = counts > 0
    top.bar(centers[filled], acc[filled], width=width, edgecolor="black", label="accuracy")
    low = np.minimum(acc[filled], mean_conf[filled])
    top.bar(
        centers[filled],
        np.abs(mean_conf[filled] - acc[filled]),
        bottom=low,
        width=width,
        facecolor="none",
        edgecolor="tab:red",
        hatch="//",
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("Accuracy")
    top.set_title(f"{title} (ECE {ece:.3f}, {n_bins} bins)")
    top.legend(loc="upper left", fontsize=9)
    bottom.bar(centers, counts, width=width, color="grey", edgecolor="black")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("Confidence (top-1 probability)")
    bottom.set_ylabel("Images")
    fig.savefig(path)
    return Path(path)


# --------------------------------------------------------------------------------------------
# The report


def write_report(
    directory: str | Path,
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    files: Sequence[str],
    *,
    split: str = "test",
    temperature: float = 1.0,
    n_bootstrap: int = 1000,
    seed: int = 0,
    tta: bool = False,
    extra: dict[str, Any] | None = None,
    answers: Sequence[dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``predictions.csv`` and the three figures; returns the metrics.

    ``probs`` are the calibrated probabilities (after ``temperature``); ``files`` names each
    image (e.g. its path relative to the data folder); ``tta``: the probabilities average each
    scan with its mirror image (recorded as ``"tta": "horizontal flip"``); ``extra``: more
    top-level entries for ``metrics.json`` (e.g. ``"uncertainty"``); ``answers``: each
    image's verdict, set and flag for ``predictions.csv`` (see :func:`write_predictions_csv`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    probs = np.asarray(probs, dtype=np.float64)
    if len(files) != len(probs):
        raise ValueError(f"{len(files)} file names for {len(probs)} predictions")
    metrics = compute_metrics(
        y_true,
        probs,
        class_names,
        split=split,
        temperature=temperature,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    if tta:
        metrics["tta"] = "horizontal flip"
    metrics.update(extra or {})
    atomic_write_text(
        directory / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    )

    true = [class_names[int(label)] for label in y_true]
    write_predictions_csv(
        directory / "predictions.csv", class_names, files, probs, true=true, uncertainty=answers
    )

    where = f"{split} split, {len(probs)} images"
    plot_confusion_matrix(
        metrics["confusion_matrix"],
        class_names,
        directory / "confusion_matrix.png",
        title=f"Confusion matrix ({where})",
    )
    plot_roc_curves(
        y_true, probs, class_names, directory / "roc_curves.png", title=f"ROC curves ({where})"
    )
    plot_reliability(
        y_true,
        probs,
        directory / "reliability.png",
        title=f"Reliability, T={temperature:.2f}",
    )
    return metrics
