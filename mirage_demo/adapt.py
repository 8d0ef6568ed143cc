"""Adapt a served model to labelled scans someone brings: a linear probe on its frozen features.

The probe is :mod:`mirage_demo.probe`'s, fitted as ``python -m train --mode probe`` fits it
(:func:`fit_split`: class-balanced logistic regression with ``C`` chosen on a patient-disjoint
validation split carved by :func:`~mirage_demo.data.patient_split`, then temperature scaling on
that split). Every scan is embedded once; then

- **cross-validation** (:func:`cross_validate`): the scans are dealt into patient-disjoint,
  class-stratified folds; each fold is predicted by the probe fitted on the others exactly as
  ``python -m train --mode probe --data D`` would with ``D/train`` the other folds and
  ``D/test`` this one. The out-of-fold probabilities of all scans make the report
  (:func:`~mirage_demo.metrics.write_report`, split ``"cross-validated"``);
- the **label-efficiency curve** (:func:`label_efficiency`): the same folds, with only ``n``
  labelled scans per class drawn from the training folds (several draws), against ``n``;
- the **adapted model** (:func:`adapted_model`): the probe fitted on all the scans, as the
  served model's twin sharing its backbone (no weights copied in memory).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mirage_demo.checkpoint import CheckpointConfig
from mirage_demo.data import DataError, Preprocessing, Sample, discover_dataset, patient_split
from mirage_demo.evaluation import LabelledUpload, labelled_upload
from mirage_demo.fileio import atomic_write_text
from mirage_demo.metrics import fit_temperature, softmax, write_report
from mirage_demo.probe import (
    DEFAULT_CS,
    ProbeFit,
    apply_probe,
    balanced_accuracy,
    embed_in_chunks,
    fit_probe,
)

__all__ = [
    "FOLDS",
    "LABELS_PER_CLASS",
    "MIN_PATIENTS",
    "Adaptation",
    "CrossValidation",
    "adapt_upload",
    "adapted_model",
    "cross_validate",
    "fit_split",
    "label_efficiency",
    "plot_label_efficiency",
]

FOLDS = 5  # at most; fewer when a class has fewer patients
VAL_FRACTION = 0.15  # as python -m train (SplitSpec's default)
LABELS_PER_CLASS = (1, 2, 5, 10, 20, 50)
DRAWS = 5  # random draws of each size on the label-efficiency curve
#: Patients per class that always suffice (one scan each): every cross-validation fold's
#: training part then keeps 7 of each class, what its validation split needs.
MIN_PATIENTS = 9
TOO_FEW = (
    "too few scans of some class to fit a probe and check it on patients it has not seen: "
    f"bring at least {MIN_PATIENTS} patients per class (one scan each is enough)"
)


@dataclass
class SplitFit:
    """A probe fitted on one train split, calibrated on its val split."""

    fit: ProbeFit
    temperature: float
    train: np.ndarray  # indices of the scans it was fitted on
    val: np.ndarray  # indices of those it chose C and the temperature on


def fit_split(
    features: np.ndarray,
    samples: Sequence[Sample],
    indices: Sequence[int],
    num_classes: int,
    *,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    cs: Sequence[float] = DEFAULT_CS,
) -> SplitFit:
    """``python -m train --mode probe`` on the scans ``indices``: a patient-disjoint val split
    carved as :func:`~mirage_demo.data.load_dataset` carves it, the probe (``C`` on val) and
    the temperature on val."""
    chosen = [samples[i] for i in indices]
    position = {id(sample): i for sample, i in zip(chosen, indices, strict=True)}
    parts = patient_split(chosen, {"val": val_fraction}, seed)
    train = np.array([position[id(s)] for s in parts["rest"]], dtype=np.int64)
    val = np.array([position[id(s)] for s in parts["val"]], dtype=np.int64)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    fit = fit_probe(
        features[train], labels[train], features[val], labels[val], num_classes, cs, seed
    )
    temperature = fit_temperature(fit.logits(features[val]).astype(np.float32), labels[val])
    return SplitFit(fit, temperature, train, val)


@dataclass
class CrossValidation:
    """Out-of-fold predictions of every scan and the probe of each fold."""

    probs: np.ndarray  # (n, K) calibrated, each row by the probe that did not see it
    folds: np.ndarray  # (n,) the fold of each scan
    fits: list[SplitFit]


def fold_count(samples: Sequence[Sample], num_classes: int, folds: int = FOLDS) -> int:
    """Folds for these scans: at most ``folds``, at most the patients of the rarest class."""
    patients = [len({s.group for s in samples if s.label == k}) for k in range(num_classes)]
    if min(patients) < 2:
        rare = patients.index(min(patients))
        raise DataError(
            f"class {rare} has scans of {min(patients)} patient(s): cross-validation needs at "
            "least 2 per class (more make the report worth reading)"
        )
    return min(folds, min(patients))


def cross_validate(
    features: np.ndarray,
    samples: Sequence[Sample],
    num_classes: int,
    *,
    folds: int = FOLDS,
    seed: int = 0,
    cs: Sequence[float] = DEFAULT_CS,
) -> CrossValidation:
    """Patient-disjoint, class-stratified folds; each fold predicted by :func:`fit_split` on
    the others (the same split, probe and temperature as ``python -m train --mode probe``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.array([s.label for s in samples], dtype=np.int64)
    groups = [s.group for s in samples]
    splitter = StratifiedGroupKFold(
        fold_count(samples, num_classes, folds), shuffle=True, random_state=seed
    )
    probs = np.zeros((len(samples), num_classes))
    fold_of = np.zeros(len(samples), dtype=np.int64)
    fits = []
    for k, (rest, held) in enumerate(splitter.split(features, labels, groups)):
        split = fit_split(features, samples, rest.tolist(), num_classes, seed=seed, cs=cs)
        probs[held] = softmax(split.fit.logits(features[held]), split.temperature)
        fold_of[held] = k
        fits.append(split)
    return CrossValidation(probs, fold_of, fits)


def label_efficiency(
    features: np.ndarray,
    labels: np.ndarray,
    cv: CrossValidation,
    num_classes: int,
    *,
    sizes: Sequence[int] = LABELS_PER_CLASS,
    draws: int = DRAWS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Balanced accuracy against labelled scans per class: for each size ``n`` (smaller than
    every class in every fold's training part), ``draws`` times: draw ``n`` scans per class
    from each fold's training folds, fit the probe (that fold's ``C``), predict the fold;
    one balanced accuracy per draw over all scans. Rows: ``per_class``, ``mean``, ``low``,
    ``high`` (the draws' range), ``draws``."""
    labels = np.asarray(labels, dtype=np.int64)
    n_folds = len(cv.fits)
    pools = [
        [np.flatnonzero((cv.folds != k) & (labels == c)) for c in range(num_classes)]
        for k in range(n_folds)
    ]
    largest = min(len(pool) for fold in pools for pool in fold)
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        if n >= largest:
            break
        scores = []
        for _ in range(draws):
            logits = np.zeros((len(labels), num_classes))
            for k in range(n_folds):
                chosen = np.concatenate([rng.choice(pool, n, replace=False) for pool in pools[k]])
                held = cv.folds == k
                c = cv.fits[k].fit.c
                fit = fit_probe(
                    features[chosen], labels[chosen], None, None, num_classes, (c,), seed
                )
                logits[held] = fit.logits(features[held])
            scores.append(balanced_accuracy(labels, logits, num_classes))
        rows.append(
            {
                "per_class": n,
                "mean": float(np.mean(scores)),
                "low": float(np.min(scores)),
                "high": float(np.max(scores)),
                "draws": draws,
            }
        )
    return rows


def plot_label_efficiency(
    rows: Sequence[dict[str, Any]],
    full: dict[str, Any],
    num_classes: int,
    path: str | Path,
) -> Path:
    """Balanced accuracy against labelled scans per class (log scale): each size's mean and
    range over draws, the probe on all training scans (``full``: ``per_class``, ``value``,
    ``ci95``), and chance (1 / classes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if rows:
        x = [r["per_class"] for r in rows]
        ax.fill_between(
            x,
            [r["low"] for r in rows],
            [r["high"] for r in rows],
            alpha=0.25,
            color="#0072B2",
            label="range over random draws",
        )
        ax.plot(
            x,
            [r["mean"] for r in rows],
            "o-",
            color="#0072B2",
            lw=2.5,
            ms=8,
            label="mean balanced accuracy",
        )
    low, high = full.get("ci95") or (None, None)
    if full.get("value") is not None:
        err = None
        if low is not None and high is not None:
            err = [[full["value"] - low], [high - full["value"]]]
        ax.errorbar(
            [full["per_class"]],
            [full["value"]],
            yerr=err,
            fmt="s",
            color="#D55E00",
            ms=10,
            capsize=6,
            lw=2,
            label="all labelled scans (95% CI)",
        )
    ax.axhline(1 / num_classes, ls="--", color="gray", label=f"chance (1/{num_classes})")
    ax.set_xscale("log")
    ticks = [n for n in (1, 2, 5, 10, 20, 50, 100, 200, 500) if n <= 2 * full["per_class"]]
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.set_xlim(0.7, max([*ticks, full["per_class"]]) * 1.4)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("labelled scans per class used to fit the probe", fontsize=13)
    ax.set_ylabel("balanced accuracy (cross-validated)", fontsize=13)
    ax.set_title("How many labels does the model need?", fontsize=15)
    ax.tick_params(labelsize=12)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=11, loc="lower right")
    fig.savefig(path)
    return Path(path)


def adapted_model(model: nn.Module, fit: ProbeFit) -> nn.Module:
    """``model``'s twin with the probe as its classifier: every other layer is shared (not
    copied); ``model`` itself is left as it was."""
    twin = copy.copy(model)
    for key, value in vars(model).items():  # own module, parameter and hook tables
        if isinstance(value, dict):
            twin.__dict__[key] = type(value)(value)
    twin.reset_classifier(fit.weight.shape[0])
    twin.get_classifier().to(next(model.parameters()).device)
    return apply_probe(twin, fit).eval()


@dataclass
class Adaptation:
    """A probe adapted to an upload: its cross-validated report and curve, and the model."""

    upload: LabelledUpload
    samples: list[Sample]  # the readable scans, in the trainer's order
    features: np.ndarray
    cv: CrossValidation
    metrics: dict[str, Any]  # the cross-validated report (metrics.json)
    curve: list[dict[str, Any]]
    final: SplitFit  # the probe on all the scans
    model: nn.Module
    config: CheckpointConfig
    seconds: dict[str, float]


def adapt_upload(
    model: nn.Module,
    preprocessing: Preprocessing,
    base: CheckpointConfig,
    uploads: Sequence[tuple[str, str | Path]],
    out: str | Path,
    *,
    device: torch.device,
    folds: int = FOLDS,
    n_bootstrap: int = 1000,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> Adaptation:
    """Adapt ``model`` (frozen; its checkpoint config ``base``) to labelled uploads of any
    classes: unpacked into ``out/scans/<CLASS>/``, embedded, cross-validated (the report in
    ``out``), the label-efficiency curve, and the probe on all scans as a new model. Too few
    scans for any step is a :class:`~mirage_demo.data.DataError` saying what is needed."""
    out = Path(out)
    upload = labelled_upload(uploads, None, out / "scans")
    data = discover_dataset(upload.root)  # the trainer's order, classes and patient groups
    class_names, everything = data.class_names, data.splits["all"]
    if len(class_names) < 2:
        raise DataError(f"only one class ({class_names[0]}): upload scans of at least two")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    feats, kept = embed_in_chunks(model, everything, preprocessing, device, on_progress)
    seconds["embedding"] = time.perf_counter() - started
    samples = [everything[i] for i in kept]
    labels = np.array([s.label for s in samples], dtype=np.int64)
    try:
        started = time.perf_counter()
        cv = cross_validate(feats, samples, len(class_names), folds=folds, seed=seed)
        seconds["cross_validation"] = time.perf_counter() - started
        started = time.perf_counter()
        curve = label_efficiency(feats, labels, cv, len(class_names), seed=seed)
        seconds["label_efficiency"] = time.perf_counter() - started
        final = fit_split(feats, samples, range(len(samples)), len(class_names), seed=seed)
    except ValueError as err:  # scikit-learn's own complaint: too few of something, in words
        raise DataError(f"{TOO_FEW} ({class_counts(samples, class_names)})") from err
    files = [Path(s.path).relative_to(upload.root).as_posix() for s in samples]
    metrics = _write_report(out, labels, cv, final, class_names, files, n_bootstrap, seed)
    config = _adapted_config(base, class_names, final, data.counts("all"), len(samples))
    twin = adapted_model(model, final.fit)
    return Adaptation(upload, samples, feats, cv, metrics, curve, final, twin, config, seconds)


def class_counts(samples: Sequence[Sample], class_names: Sequence[str]) -> str:
    """``"CNV: 12 scans of 5 patients, NORMAL: ..."``."""
    parts = []
    for k, name in enumerate(class_names):
        mine = [s for s in samples if s.label == k]
        parts.append(f"{name}: {len(mine)} scans of {len({s.group for s in mine})} patients")
    return ", ".join(parts)


def _write_report(
    out: Path,
    labels: np.ndarray,
    cv: CrossValidation,
    final: SplitFit,
    class_names: Sequence[str],
    files: list[str],
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """The cross-validated report (``python -m train --mode probe``'s) with each scan's fold."""
    metrics = write_report(
        out,
        labels,
        cv.probs,
        list(class_names),
        files,
        split="cross-validated",
        temperature=final.temperature,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    metrics["cross_validation"] = {
        "folds": len(cv.fits),
        "fold_of": dict(zip(files, cv.folds.tolist(), strict=True)),
        "C": [split.fit.c for split in cv.fits],
        "temperature": [split.temperature for split in cv.fits],
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return metrics


def _adapted_config(
    base: CheckpointConfig,
    class_names: Sequence[str],
    final: SplitFit,
    counts: dict[str, int],
    scans: int,
) -> CheckpointConfig:
    """The adapted model's checkpoint config: the base's, with the probe's classes and
    calibration, and what it was fitted on in words (no server path)."""
    return dataclasses.replace(
        base,
        class_names=list(class_names),
        temperature=final.temperature,
        split=None,
        uncertainty={},  # the base model's sets and flag are not this probe's
        training={
            "mode": "probe",
            "data_name": "uploaded scans",
            "images": {"all": counts},
            "probe": final.fit.summary(),
            "adapted_from": base.description or base.architecture,
        },
        description=(
            f"A linear probe on the frozen features of {base.architecture}, fitted in the app "
            f"on {scans} uploaded scans ({', '.join(class_names)})."
        ),
        created=dt.datetime.now(dt.timezone.utc).isoformat(),
    )
