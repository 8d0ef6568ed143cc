"""How far to trust an answer: conformal prediction sets and an "unlike the training scans" flag.

>>> sets = ConformalSets().fit(val_probs, val_labels)
>>> sets.predict_sets(probs, level=0.9)                    # (N, K) bool: each scan's 90% set
>>> flag = UnlikeTraining.fit(train_features, train_labels, train_stats, val_features, val_stats)
>>> flag.score(features, stats), flag.flags(features, stats)

**Prediction sets** (split conformal, Vovk et al. 2005; class-conditional or "Mondrian"):
the nonconformity of a scan of class ``k`` is ``1 - p_k`` (LAC, Sadinle et al. 2019), and a
class enters a scan's set when its score is within the ``ceil((n_k + 1) * level)``-th smallest
of the ``n_k`` validation scans of that class. *The guarantee*: if a new scan and the
validation scans of its class are exchangeable (drawn alike: same population, same device),
its set holds its true class with probability at least ``level``, for every class separately.
The classes with too few validation scans for the level (``n_k < level / (1 - level)``: 9 at
90%) are calibrated together, on their scans pooled (a cluster of rare classes, as in Ding et
al. 2023's clustered conformal prediction; on all validation scans when even those are too
few): their coverage is then that of the cluster, not guaranteed for each. Pooling them with the
frequent classes instead would calibrate them on scores the model gets right easily, and miss
most of them. The top class is always in the set.
The sorted scores are stored, so any level can be asked at run time.

**Out of distribution** (:mod:`mirage_demo.ood`): the penultimate features' Mahalanobis
distance to the training scans and the image statistics' distance to theirs
(:mod:`mirage_demo.imagestats`), with thresholds set together on the validation scans at a
stated false-alarm rate; a score that is not finite is always flagged.

**Sure** (:func:`sure_bar`): a set of one class is not enough to call an answer sure: its
class must also be at least this probable. The bar is the lowest probability from which up the
validation scans' would-be sure answers are right at least :data:`SURE_PRECISION` of the time.

With the quality gate, these decide each answer's verdict (:mod:`mirage_demo.verdict`).
:func:`fit_uncertainty` fits both for a trained model (``python -m train`` at the end of a run,
``python -m train.evaluate --fit-uncertainty`` for an existing checkpoint);
:func:`save_uncertainty` and :func:`load_uncertainty` store them in a checkpoint directory
(a summary under ``config.json``'s ``"uncertainty"``, the arrays in ``uncertainty.safetensors``,
read with safetensors only and validated). Checkpoints fitted before the image statistics
(format 1) load and flag on their features alone; those fitted before the bar for "sure"
(formats 1 and 2) load without it (a set of one class is then enough).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from mirage_demo.checkpoint import (
    UNCERTAINTY_NAME,
    CheckpointConfig,
    CheckpointError,
    save_config,
)
from mirage_demo.data import DataError
from mirage_demo.fileio import atomic_write
from mirage_demo.images import Sample
from mirage_demo.imagestats import STAT_NAMES
from mirage_demo.logits import Outputs, file_outputs
from mirage_demo.metrics import softmax
from mirage_demo.ood import (
    FALSE_ALARM,
    MAX_REFERENCE,
    MahalanobisOOD,
    StatisticsOOD,
    UnlikeTraining,
    conformal_rank,
    flagged,
)
from mirage_demo.testscans import JPEG_QUALITY, MAX_WIDTH
from mirage_demo.verdict import SURE, decide, verdict_report

__all__ = [
    "DEFAULT_LEVEL",
    "FALSE_ALARM",
    "GUARANTEE",
    "NEVER_SURE",
    "OOD_NOTE",
    "SURE_PRECISION",
    "ConformalSets",
    "MahalanobisOOD",
    "Uncertainty",
    "UnlikeTraining",
    "coverage_report",
    "fit_uncertainty",
    "load_uncertainty",
    "save_uncertainty",
    "sure_bar",
    "uncertainty_from_outputs",
]

log = logging.getLogger(__name__)

DEFAULT_LEVEL = 0.9
FORMAT_VERSION = 3  # 1: the flag on features alone; 2: no bar for "sure"
#: How often the validation scans' sure answers must be right: sets the bar for "sure"
#: (:func:`sure_bar`). Between the sets' 90% and the 98% wanted of sure answers: with ~450
#: validation scans, a higher target rests on a handful of mistakes (docs/trust.md).
SURE_PRECISION = 0.97
MAX_FEATURES = 8192  # penultimate width (MIRAGE-Large: 1024); bounds the precision matrix
MAX_CALIBRATION = 1_000_000
#: The copies of each training scan whose statistics join the training scans': as the app
#: bundles its test scans (width, JPEG quality), so its own copies are not "unlike training".
BUNDLED_COPY = (MAX_WIDTH, JPEG_QUALITY)
#: The copies whose statistics the training scans add to the flag's: the bundled copy.
TRAIN_COPIES = [BUNDLED_COPY]

#: The guarantee and its assumption, in plain words (shown once wherever sets are shown).
GUARANTEE = (
    "What the set promises: for scans like the validation scans it was calibrated on, the "
    "set holds the true class {level:.0%} of the time, for each class (classes with very few "
    "validation scans: for them together). It holds only if the scan comes from the same kind "
    "of data (the same devices, the same kind of patients); a scan from another device may "
    "break it."
)
OOD_NOTE = (
    "unlike the scans this model was trained on: another device or acquisition? "
    "Its answer is less reliable"
)


class ConformalSets:
    """Class-conditional split-conformal prediction sets on probabilities (LAC scores)."""

    def fit(self, probs: np.ndarray, labels: np.ndarray) -> ConformalSets:
        """Calibrate on held-out ``probs`` ``(N, K)`` and their true ``labels``."""
        probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
        if probs.ndim != 2 or len(probs) != len(labels) or len(labels) == 0:
            raise ValueError(f"need (N, K) probabilities and N labels, got {probs.shape}")
        scores = 1.0 - probs[np.arange(len(labels)), labels]
        self.n_classes_ = probs.shape[1]
        self.scores_ = [np.sort(scores[labels == k]) for k in range(self.n_classes_)]
        return self

    def thresholds(self, level: float = DEFAULT_LEVEL) -> np.ndarray:
        """Each class's largest admitted score ``(K,)`` at ``level`` (1.0: always admitted)."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be between 0 and 1, got {level}")
        rare = [s for s in self.scores_ if not _enough(s, level)]
        pooled = np.sort(np.concatenate(rare if rare else self.scores_))
        if not _enough(pooled, level):
            pooled = np.sort(np.concatenate(self.scores_))
        chosen = [s if _enough(s, level) else pooled for s in self.scores_]
        return np.array([_quantile(s, level) for s in chosen])

    def predict_sets(self, probs: np.ndarray, level: float = DEFAULT_LEVEL) -> np.ndarray:
        """``(N, K)`` bool: class ``k`` is in a scan's set when ``1 - p_k`` is admitted; the
        top class always is."""
        probs = np.asarray(probs, np.float64)
        sets = 1.0 - probs <= self.thresholds(level)[None, :] + 1e-12
        sets[np.arange(len(probs)), probs.argmax(axis=1)] = True
        return sets

    def pooled_classes(self, level: float = DEFAULT_LEVEL) -> list[int]:
        """Classes with too few calibration scans for ``level`` (calibrated together)."""
        return [k for k, s in enumerate(self.scores_) if not _enough(s, level)]


def _enough(scores: np.ndarray, level: float) -> bool:
    return conformal_rank(len(scores), level) <= len(scores)


def _quantile(sorted_scores: np.ndarray, level: float, too_few: float = 1.0) -> float:
    """The ``ceil((n + 1) level)``-th smallest score (``too_few`` when there are fewer)."""
    rank = conformal_rank(len(sorted_scores), level)
    return float(sorted_scores[rank - 1]) if rank <= len(sorted_scores) else too_few


@dataclass
class Uncertainty:
    """A checkpoint's fitted prediction sets and out-of-distribution flag."""

    class_names: list[str]
    sets: ConformalSets
    ood: UnlikeTraining
    #: the probability the top class needs for "sure" (:func:`sure_bar`; 0: no bar)
    sure_probability: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # what they were fitted on

    def answers(
        self,
        probs: np.ndarray,
        features: np.ndarray,
        level: float = DEFAULT_LEVEL,
        statistics: np.ndarray | None = None,
        looks_like_oct: Sequence[bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Each scan's ``trust`` verdict (:func:`~mirage_demo.verdict.decide`),
        ``prediction_set`` (class names, most probable first), ``level``,
        ``out_of_distribution``, ``ood_score`` (above 1: unlike the training scans; inf:
        not finite) and ``sure_probability`` (the bar), from its probabilities, features,
        image ``statistics`` and whether it passes the quality gate (``looks_like_oct``,
        default: all do)."""
        member = self.sets.predict_sets(probs, level)
        probable = np.asarray(probs).max(axis=1) >= self.sure_probability
        order = np.argsort(-np.asarray(probs), axis=1, kind="stable")
        scores = self.ood.score(features, statistics)
        flags = flagged(scores)
        passes = [True] * len(scores) if looks_like_oct is None else list(looks_like_oct)
        answers = []
        for i, row in enumerate(order):
            named = [self.class_names[k] for k in row if member[i, k]]
            answers.append(
                {
                    "trust": decide(bool(passes[i]), bool(flags[i]), len(named), probable[i]),
                    "prediction_set": named,
                    "level": level,
                    "out_of_distribution": bool(flags[i]),
                    "ood_score": round(float(scores[i]), 3) if np.isfinite(scores[i]) else None,
                    "sure_probability": self.sure_probability,
                }
            )
        return answers

    def report(
        self,
        answers: Sequence[dict[str, Any]],
        probs: np.ndarray,
        labels: np.ndarray,
    ) -> dict[str, Any]:
        """:func:`coverage_report` of these scans' :meth:`answers`: their sets (at the answers'
        level), flags and verdicts."""
        level = answers[0]["level"] if answers else DEFAULT_LEVEL
        report = coverage_report(
            self.class_names,
            [a["prediction_set"] for a in answers],
            [a["out_of_distribution"] for a in answers],
            np.asarray(probs).argmax(axis=1),
            labels,
            [a["trust"] for a in answers],
        )
        pooled = [self.class_names[k] for k in self.sets.pooled_classes(level)]
        return {
            "level": level,
            **report,
            "pooled_classes": pooled,
            "ood_false_alarm_target": self.ood.false_alarm,
            "ood_image_statistics": self.ood.statistics is not None,
            "sure_probability": self.sure_probability,
        }

    def to_json(self) -> dict[str, Any]:
        """The summary stored under ``config.json``'s ``"uncertainty"``."""
        ood = self.ood
        summary: dict[str, Any] = {
            "method": "Mahalanobis distance of the penultimate features to the nearest class "
            "mean (shared Ledoit-Wolf covariance)",
            "threshold": ood.feature_threshold,
            "false_alarm": ood.false_alarm,
            "feature_dim": int(ood.features.class_means_.shape[1]),
        }
        if ood.statistics is not None:
            summary["method"] += (
                f"; or image statistics far from the training scans' (mean distance to the "
                f"{ood.statistics.neighbours_} nearest, robust units); thresholds set together "
                "on the validation scans"
            )
            summary["statistics"] = {
                "names": list(STAT_NAMES),
                "threshold": ood.statistics_threshold,
                "neighbours": ood.statistics.neighbours_,
                "copies": [list(BUNDLED_COPY)],
            }
        return {
            "format_version": FORMAT_VERSION,
            "file": UNCERTAINTY_NAME,
            "sets": {
                "method": "split conformal, class-conditional (Mondrian), LAC scores; classes "
                "with too few calibration scans for a level are calibrated together",
                "calibration_per_class": [len(s) for s in self.sets.scores_],
                "default_level": DEFAULT_LEVEL,
            },
            "ood": summary,
            "sure": {
                "probability": self.sure_probability,
                "method": "the lowest top-class probability from which up the validation "
                f"scans' would-be sure answers (a set of one class at the {DEFAULT_LEVEL:.0%} "
                f"level, not flagged) are right at least {SURE_PRECISION:.0%} of the time",
            },
            **self.info,
        }


# --------------------------------------------------------------------------------------------
# Fitting, measuring


def fit_uncertainty(
    model: torch.nn.Module,
    config: CheckpointConfig,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    device: torch.device | str = "cpu",
    *,
    false_alarm: float = FALSE_ALARM,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool | None = None,
) -> Uncertainty:
    """Fit the sets on the validation scans (calibrated probabilities) and the OOD flag on
    the training scans' features and image statistics (those of each scan and of its copy as
    the app bundles it; thresholds on the validation scans'), from the image files as the app
    reads them."""
    _require_every_class(
        config, {"train": [s.label for s in train_samples], "val": [s.label for s in val_samples]}
    )
    device = torch.device(device)
    run = dict(batch_size=batch_size, workers=workers, progress=progress)
    prep = config.preprocessing
    train = file_outputs(
        model, train_samples, prep, device, desc="train", copies=TRAIN_COPIES, **run
    )
    val = file_outputs(model, val_samples, prep, device, desc="val", copies=[], **run)
    return uncertainty_from_outputs(config, train, val, false_alarm=false_alarm)


def uncertainty_from_outputs(
    config: CheckpointConfig, train: Outputs, val: Outputs, *, false_alarm: float = FALSE_ALARM
) -> Uncertainty:
    """:func:`fit_uncertainty` from the model's outputs on the training and validation scans,
    however they were computed (from the files, or a probe's feature cache); the validation
    probabilities are calibrated with the checkpoint's temperature. Outputs without image
    checks (a feature cache) give a flag on features alone."""
    _require_every_class(config, {"train": train.labels, "val": val.labels})
    val_probs = softmax(val.logits, config.temperature)
    sets = ConformalSets().fit(val_probs, val.labels)
    checked = train.statistics is not None and val.statistics is not None
    ood = UnlikeTraining.fit(
        train.features,
        train.labels,
        train.statistics.reshape(-1, len(STAT_NAMES)) if checked else None,
        val.features,
        val.statistics if checked else None,
        false_alarm,
    )
    info = {"fitted_on": {"train": len(train.labels), "val": len(val.labels)}}
    fitted = Uncertainty(list(config.class_names), sets, ood, 0.0, info)  # no bar yet
    answers = fitted.answers(
        val_probs,
        val.features,
        statistics=val.statistics if checked else None,
        looks_like_oct=val.looks_like_oct,
    )
    would_be_sure = np.array([a["trust"] == SURE for a in answers], bool)
    fitted.sure_probability = sure_bar(val_probs, val.labels, would_be_sure)
    return fitted


#: The bar when no probability makes the would-be sure answers right often enough: above any
#: probability, so that no answer is called sure.
NEVER_SURE = float(np.nextafter(1.0, 2.0))


def sure_bar(
    probs: np.ndarray,
    labels: np.ndarray,
    candidates: np.ndarray,
    precision: float = SURE_PRECISION,
) -> float:
    """The lowest top-class probability ``p`` such that, at ``p`` and every higher bar, the
    ``candidates`` (bool ``(N,)``: the answers that would be sure without a bar) whose top class
    is at least that probable are right at least ``precision`` of the time; :data:`NEVER_SURE`
    when no ``p`` does. Bars that keep fewer answers than one mistake needs to be allowed
    (``1 / (1 - precision)``) are not judged: one early mistake does not make every bar fail."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    candidates = np.asarray(candidates, bool)
    top = probs.max(axis=1)[candidates]
    right = (probs.argmax(axis=1) == labels)[candidates]
    order = np.argsort(-top, kind="stable")
    top, right = top[order], right[order]
    kept = np.arange(1, len(right) + 1)
    holds = np.cumsum(right) / kept >= precision
    judged = kept >= math.ceil(round(1 / (1 - precision), 9))
    failing = np.flatnonzero(judged & ~holds)
    reach = failing.min() if len(failing) else len(top)  # every bar above this one holds
    last_of_ties = np.r_[top[1:] != top[:-1], True]  # equal probabilities pass or fail together
    good = np.flatnonzero((holds & last_of_ties)[:reach])
    return float(top[good.max()]) if len(good) else NEVER_SURE


def _require_every_class(config: CheckpointConfig, labels: dict[str, Sequence[int]]) -> None:
    """A :class:`DataError` naming the classes a split has no scans of."""
    for split, values in labels.items():
        missing = set(range(config.num_classes)) - {int(v) for v in values}
        if missing:
            names = ", ".join(config.class_names[k] for k in sorted(missing))
            raise DataError(f"cannot fit the uncertainty statistics: no {split} scans of {names}")


def coverage_report(
    class_names: Sequence[str],
    sets: Sequence[Sequence[str]],
    flags: Sequence[bool],
    predicted: np.ndarray,
    labels: np.ndarray,
    verdicts: Sequence[str | None],
) -> dict[str, Any]:
    """Empirical coverage and mean set size (overall and per class) of each scan's set (class
    names), the share flagged as unlike the training scans (``flags``), the share of the
    model's mistakes (``predicted != labels``) that carry a warning (any verdict but sure: the
    flag, a set of 2+ classes, a probability below the bar, not a B-scan), and
    ``"verdicts"``: the share of each of the scans' ``verdicts`` and the accuracy within it
    (:func:`~mirage_demo.verdict.verdict_report`)."""
    labels, flagged = np.asarray(labels, np.int64), np.asarray(flags, bool)
    sets = np.array([[c in named for c in class_names] for named in sets], bool)
    sets = sets.reshape(len(labels), len(class_names))
    covered = sets[np.arange(len(labels)), labels]
    size = sets.sum(axis=1)
    wrong = np.asarray(predicted) != labels
    per_class = {}
    for k, name in enumerate(class_names):
        mine = labels == k
        per_class[name] = {
            "images": int(mine.sum()),
            "coverage": _mean(covered[mine]),
            "mean_set_size": _mean(size[mine]),
            "flagged": _mean(flagged[mine]),
        }
    verdicts = list(verdicts)
    if len(verdicts) != len(labels):
        raise ValueError(f"{len(verdicts)} verdicts for {len(labels)} scans")
    return {
        "images": len(labels),
        "accuracy": _mean(~wrong),
        "coverage": _mean(covered),
        "mean_set_size": _mean(size),
        "flagged": _mean(flagged),
        "mistakes": int(wrong.sum()),
        "mistakes_warned": _mean(np.array([v != SURE for v in verdicts], bool)[wrong]),
        "per_class": per_class,
        "verdicts": verdict_report(verdicts, ~wrong),
    }


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


# --------------------------------------------------------------------------------------------
# Storage


def save_uncertainty(
    directory: str | Path, config: CheckpointConfig, uncertainty: Uncertainty
) -> None:
    """Write ``uncertainty.safetensors`` and the summary into ``config.json`` (``config`` is
    updated)."""
    directory = Path(directory)
    scores = uncertainty.sets.scores_
    ood = uncertainty.ood
    arrays = {
        "class_means": ood.features.class_means_.astype(np.float32),
        "precision": ood.features.precision_.astype(np.float32),
        "calibration_scores": np.concatenate(scores).astype(np.float32),
        "calibration_labels": np.repeat(np.arange(len(scores)), [len(s) for s in scores]),
    }
    if ood.statistics is not None:
        arrays |= {
            "stat_centre": ood.statistics.centre_.astype(np.float32),
            "stat_scale": ood.statistics.scale_.astype(np.float32),
            "stat_reference": ood.statistics.reference_.astype(np.float32),
        }
    atomic_write(directory / UNCERTAINTY_NAME, lambda tmp: save_file(arrays, tmp))
    config.uncertainty = uncertainty.to_json()
    save_config(directory, config)


def load_uncertainty(
    directory: str | Path, config: CheckpointConfig, feature_dim: int | None = None
) -> Uncertainty | None:
    """A checkpoint's fitted statistics, or None when it has none (or its file is missing: a
    warning is logged); a bad file or summary, or statistics for another width than the
    model's ``feature_dim``, is a :class:`~mirage_demo.checkpoint.CheckpointError` of one
    line. A format-1 summary (before image statistics) gives a flag on features alone."""
    summary = config.uncertainty
    if not summary:
        return None
    path = Path(directory) / UNCERTAINTY_NAME
    if not path.is_file():  # e.g. copied without it: serve without sets and flags
        log.warning("%s is missing: no prediction sets or out-of-distribution flag", path)
        return None
    values = _summary_values(summary)
    with_statistics = values["statistics_threshold"] is not None
    arrays = _read_arrays(path, config.num_classes, statistics=with_statistics)
    width = arrays["class_means"].shape[1]
    if feature_dim is not None and width != feature_dim:
        raise CheckpointError(f"{path} is for {width} features; the model has {feature_dim}")
    sets = ConformalSets()
    sets.n_classes_ = config.num_classes
    labels, scores = arrays["calibration_labels"], arrays["calibration_scores"].astype(np.float64)
    sets.scores_ = [np.sort(scores[labels == k]) for k in range(config.num_classes)]
    features = MahalanobisOOD()
    features.class_means_ = arrays["class_means"].astype(np.float64)
    features.precision_ = arrays["precision"].astype(np.float64)
    ood = UnlikeTraining(features, values["threshold"], values["false_alarm"])
    if with_statistics:
        if values["neighbours"] >= len(arrays["stat_reference"]):
            raise CheckpointError(f"{path}: fewer reference scans than neighbours")
        ood.statistics = StatisticsOOD()
        ood.statistics.centre_ = arrays["stat_centre"].astype(np.float64)
        ood.statistics.scale_ = arrays["stat_scale"].astype(np.float64)
        ood.statistics.reference_ = arrays["stat_reference"].astype(np.float64)
        ood.statistics.neighbours_ = values["neighbours"]
        ood.statistics_threshold = values["statistics_threshold"]
    info = {k: v for k, v in summary.items() if k == "fitted_on"}
    return Uncertainty(list(config.class_names), sets, ood, values["sure_probability"], info)


def _summary_values(summary: dict[str, Any]) -> dict[str, Any]:
    """The thresholds, false-alarm rate, neighbours and bar for "sure" of a ``config.json``
    summary, checked (``statistics_threshold`` None: features alone, as format 1; format 3
    with or without statistics; ``sure_probability`` 0 before format 3)."""
    try:
        version = int(summary.get("format_version", 1))
        ood = summary["ood"]
        values = {
            "threshold": float(ood["threshold"]),
            "false_alarm": float(ood["false_alarm"]),
            "statistics_threshold": None,
            "sure_probability": float(summary["sure"]["probability"]) if version >= 3 else 0.0,
        }
        if version == 2 or (version >= 3 and "statistics" in ood):
            stats = ood["statistics"]
            values["statistics_threshold"] = float(stats["threshold"])
            values["neighbours"] = int(stats["neighbours"])
            names = list(stats["names"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        reason = f"{type(err).__name__}: {err}"[:100]
        raise CheckpointError(f"config.json: unusable 'uncertainty' summary ({reason})") from err
    if version not in (1, 2, FORMAT_VERSION):
        raise CheckpointError(f"config.json: 'uncertainty' format {version} is not one I read")
    threshold, false_alarm = values["threshold"], values["false_alarm"]
    if not (math.isfinite(threshold) and threshold > 0 and 0 < false_alarm < 1):
        raise CheckpointError("config.json: the 'uncertainty' threshold or false alarm is invalid")
    if not 0.0 <= values["sure_probability"] <= NEVER_SURE:
        raise CheckpointError("config.json: the bar for 'sure' must be a probability")
    if values["statistics_threshold"] is not None:
        if names != list(STAT_NAMES):
            raise CheckpointError("config.json: the image statistics named are not this app's")
        limit = values["statistics_threshold"]
        if not (math.isfinite(limit) and limit > 0 and 0 < values["neighbours"] <= 100):
            raise CheckpointError("config.json: the image statistics' threshold is invalid")
    return values


_FEATURE_ARRAYS = ("class_means", "precision", "calibration_scores", "calibration_labels")
_STATISTICS_ARRAYS = ("stat_centre", "stat_scale", "stat_reference")


def _read_arrays(path: Path, num_classes: int, statistics: bool) -> dict[str, np.ndarray]:
    """The arrays, shapes checked from the header before reading, values after."""
    expected = _FEATURE_ARRAYS + (_STATISTICS_ARRAYS if statistics else ())
    try:
        with safe_open(str(path), framework="numpy") as handle:
            if sorted(handle.keys()) != sorted(expected):
                raise CheckpointError(f"{path} must hold exactly {', '.join(expected)}")
            shapes = {key: handle.get_slice(key).get_shape() for key in expected}
            _check_shapes(path, shapes, num_classes)
            arrays = {key: handle.get_tensor(key) for key in expected}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    labels = arrays["calibration_labels"]
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_classes:
        raise CheckpointError(f"{path}: calibration_labels must be class indices")
    for key in expected:
        if key == "calibration_labels":
            continue
        # float32's range: a distance of features within it cannot overflow in float64
        with np.errstate(over="ignore"):
            finite = arrays[key].dtype.kind == "f" and np.isfinite(arrays[key].astype(np.float32))
        if not np.all(finite):
            raise CheckpointError(f"{path}: {key} must hold finite float32 numbers")
    scores = arrays["calibration_scores"]
    if scores.min() < 0 or scores.max() > 1:
        raise CheckpointError(f"{path}: calibration_scores must lie in [0, 1]")
    if statistics and arrays["stat_scale"].min() <= 0:
        raise CheckpointError(f"{path}: stat_scale must be positive")
    return arrays


def _check_shapes(path: Path, shapes: dict[str, list[int]], num_classes: int) -> None:
    means, precision = shapes["class_means"], shapes["precision"]
    if len(means) != 2 or means[0] != num_classes or not 0 < means[1] <= MAX_FEATURES:
        raise CheckpointError(
            f"{path}: class_means is {tuple(means)}, expected ({num_classes} classes, at most "
            f"{MAX_FEATURES} features)"
        )
    if list(precision) != [means[1], means[1]]:
        raise CheckpointError(f"{path}: precision is {tuple(precision)}, expected {means[1]}^2")
    n = shapes["calibration_scores"]
    if len(n) != 1 or not 0 < n[0] <= MAX_CALIBRATION or shapes["calibration_labels"] != n:
        raise CheckpointError(f"{path}: calibration_scores and _labels must be two (N,) arrays")
    if "stat_reference" not in shapes:
        return
    width = len(STAT_NAMES)
    reference = shapes["stat_reference"]
    if shapes["stat_centre"] != [width] or shapes["stat_scale"] != [width]:
        raise CheckpointError(f"{path}: stat_centre and stat_scale must be ({width},) arrays")
    if len(reference) != 2 or reference[1] != width or not 0 < reference[0] <= MAX_REFERENCE:
        raise CheckpointError(
            f"{path}: stat_reference is {tuple(reference)}, expected (at most {MAX_REFERENCE}, "
            f"{width})"
        )
