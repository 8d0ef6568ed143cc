"""How sure the model may be: conformal prediction sets and an "unlike the training scans" flag.

>>> sets = ConformalSets().fit(val_probs, val_labels)
>>> sets.predict_sets(probs, level=0.9)                    # (N, K) bool: each scan's 90% set
>>> ood = MahalanobisOOD().fit(train_features, train_labels, val_features, false_alarm=0.05)
>>> ood.score(features), ood.flags(features)

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

**Out of distribution** (Lee et al. 2018): the Mahalanobis distance of a scan's penultimate
features (:func:`~mirage_demo.models.features_and_logits`) to the nearest class mean of the
training scans, with one shared covariance (Ledoit-Wolf shrinkage); flagged above the
distance that ``1 - false_alarm`` of the validation scans stay under.

:func:`fit_uncertainty` fits both for a trained model (``python -m train`` at the end of a run,
``python -m train.evaluate --fit-uncertainty`` for an existing checkpoint);
:func:`save_uncertainty` and :func:`load_uncertainty` store them in a checkpoint directory
(a summary under ``config.json``'s ``"uncertainty"``, the arrays in ``uncertainty.safetensors``,
read with safetensors only and validated).
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
from mirage_demo.logits import Outputs, file_outputs
from mirage_demo.metrics import softmax

__all__ = [
    "DEFAULT_LEVEL",
    "FALSE_ALARM",
    "GUARANTEE",
    "OOD_NOTE",
    "ConformalSets",
    "MahalanobisOOD",
    "Uncertainty",
    "coverage_report",
    "fit_uncertainty",
    "load_uncertainty",
    "save_uncertainty",
    "uncertainty_from_outputs",
]

log = logging.getLogger(__name__)

DEFAULT_LEVEL = 0.9
FALSE_ALARM = 0.05
FORMAT_VERSION = 1
MAX_FEATURES = 8192  # penultimate width (MIRAGE-Large: 1024); bounds the precision matrix
MAX_CALIBRATION = 1_000_000

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


def _rank(n: int, level: float) -> int:
    """``ceil((n + 1) level)``, immune to float error (``(9 + 1) * 0.7`` is 7.000000000000001)."""
    return math.ceil(round((n + 1) * level, 9))


def _enough(scores: np.ndarray, level: float) -> bool:
    return _rank(len(scores), level) <= len(scores)


def _quantile(sorted_scores: np.ndarray, level: float, too_few: float = 1.0) -> float:
    """The ``ceil((n + 1) level)``-th smallest score (``too_few`` when there are fewer)."""
    rank = _rank(len(sorted_scores), level)
    return float(sorted_scores[rank - 1]) if rank <= len(sorted_scores) else too_few


class MahalanobisOOD:
    """Distance of penultimate features to the nearest class mean (shared covariance)."""

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        val_features: np.ndarray,
        false_alarm: float = FALSE_ALARM,
    ) -> MahalanobisOOD:
        """Class means and covariance from ``features`` (the training scans); the threshold
        from ``val_features``, so that about ``false_alarm`` of scans like them are flagged."""
        from sklearn.covariance import LedoitWolf

        features, labels = np.asarray(features, np.float64), np.asarray(labels, np.int64)
        if not 0.0 < false_alarm < 1.0:
            raise ValueError(f"false_alarm must be between 0 and 1, got {false_alarm}")
        classes = np.unique(labels)
        if len(classes) != labels.max() + 1:
            raise ValueError("every class needs training features")
        self.class_means_ = np.stack([features[labels == k].mean(axis=0) for k in classes])
        centred = features - self.class_means_[labels]
        self.precision_ = LedoitWolf(assume_centered=True).fit(centred).get_precision()
        val = np.sort(self.score(val_features))
        self.threshold_ = _quantile(val, 1.0 - false_alarm, too_few=float(val[-1]))
        self.false_alarm_ = float(false_alarm)
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """``(N,)`` distances (larger: less like the training scans); a distance that is not a
        finite number (features or statistics out of range) is ``inf``: flagged, never NaN."""
        x = np.asarray(features, np.float64)
        squared = np.empty(len(x))
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, len(x), 1024):  # (1024, K, D) at a time: bounded memory
                diff = x[start : start + 1024, None, :] - self.class_means_[None, :, :]
                squared[start : start + 1024] = ((diff @ self.precision_) * diff).sum(-1).min(1)
        distances = np.sqrt(np.maximum(squared, 0.0))
        return np.where(np.isfinite(distances), distances, np.inf)

    def flags(self, features: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: unlike the training scans."""
        return self.score(features) > self.threshold_


@dataclass
class Uncertainty:
    """A checkpoint's fitted prediction sets and out-of-distribution flag."""

    class_names: list[str]
    sets: ConformalSets
    ood: MahalanobisOOD
    info: dict[str, Any] = field(default_factory=dict)  # what they were fitted on

    def assess(
        self, probs: np.ndarray, features: np.ndarray, level: float = DEFAULT_LEVEL
    ) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
        """Each scan's set (class names, most probable first), OOD scores and flags."""
        member = self.sets.predict_sets(probs, level)
        order = np.argsort(-np.asarray(probs), axis=1, kind="stable")
        named = [[self.class_names[k] for k in row if member[i, k]] for i, row in enumerate(order)]
        scores = self.ood.score(features)
        return named, scores, scores > self.ood.threshold_

    def report(
        self,
        probs: np.ndarray,
        features: np.ndarray,
        labels: np.ndarray,
        level: float = DEFAULT_LEVEL,
    ) -> dict[str, Any]:
        """:func:`coverage_report` of these scans' sets and flags."""
        report = coverage_report(
            self.class_names,
            self.sets.predict_sets(probs, level),
            self.ood.flags(features),
            np.asarray(probs).argmax(axis=1),
            labels,
        )
        pooled = [self.class_names[k] for k in self.sets.pooled_classes(level)]
        return {
            "level": level,
            **report,
            "pooled_classes": pooled,
            "ood_false_alarm_target": self.ood.false_alarm_,
        }

    def to_json(self) -> dict[str, Any]:
        """The summary stored under ``config.json``'s ``"uncertainty"``."""
        return {
            "format_version": FORMAT_VERSION,
            "file": UNCERTAINTY_NAME,
            "sets": {
                "method": "split conformal, class-conditional (Mondrian), LAC scores; classes "
                "with too few calibration scans for a level are calibrated together",
                "calibration_per_class": [len(s) for s in self.sets.scores_],
                "default_level": DEFAULT_LEVEL,
            },
            "ood": {
                "method": "Mahalanobis distance of the penultimate features to the nearest "
                "class mean, shared Ledoit-Wolf covariance",
                "threshold": self.ood.threshold_,
                "false_alarm": self.ood.false_alarm_,
                "feature_dim": int(self.ood.class_means_.shape[1]),
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
    """Fit the sets on the validation scans (calibrated probabilities) and the OOD flag on the
    training scans' features (threshold on the validation scans'), from the image files as the
    app reads them."""
    _require_every_class(
        config, {"train": [s.label for s in train_samples], "val": [s.label for s in val_samples]}
    )
    device = torch.device(device)
    run = dict(batch_size=batch_size, workers=workers, progress=progress)
    train = file_outputs(model, train_samples, config.preprocessing, device, desc="train", **run)
    val = file_outputs(model, val_samples, config.preprocessing, device, desc="val", **run)
    return uncertainty_from_outputs(config, train, val, false_alarm=false_alarm)


def uncertainty_from_outputs(
    config: CheckpointConfig, train: Outputs, val: Outputs, *, false_alarm: float = FALSE_ALARM
) -> Uncertainty:
    """:func:`fit_uncertainty` from the model's outputs on the training and validation scans,
    however they were computed (from the files, or a probe's feature cache); the validation
    probabilities are calibrated with the checkpoint's temperature."""
    _require_every_class(config, {"train": train.labels, "val": val.labels})
    val_probs = softmax(val.logits, config.temperature)
    sets = ConformalSets().fit(val_probs, val.labels)
    ood = MahalanobisOOD().fit(train.features, train.labels, val.features, false_alarm)
    info = {"fitted_on": {"train": len(train.labels), "val": len(val.labels)}}
    return Uncertainty(list(config.class_names), sets, ood, info)


def _require_every_class(config: CheckpointConfig, labels: dict[str, Sequence[int]]) -> None:
    """A :class:`DataError` naming the classes a split has no scans of."""
    for split, values in labels.items():
        missing = set(range(config.num_classes)) - {int(v) for v in values}
        if missing:
            names = ", ".join(config.class_names[k] for k in sorted(missing))
            raise DataError(f"cannot fit the uncertainty statistics: no {split} scans of {names}")


def coverage_report(
    class_names: Sequence[str],
    sets: np.ndarray,
    flagged: np.ndarray,
    predicted: np.ndarray,
    labels: np.ndarray,
) -> dict[str, Any]:
    """Empirical coverage and mean set size (overall and per class) of ``sets`` ``(N, K)``
    bool, the share ``flagged`` as unlike the training scans, and the share of the model's
    mistakes (``predicted != labels``) that carry a warning (flag or a set of 2+ classes)."""
    labels, flagged = np.asarray(labels, np.int64), np.asarray(flagged, bool)
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
    return {
        "images": len(labels),
        "accuracy": _mean(~wrong),
        "coverage": _mean(covered),
        "mean_set_size": _mean(size),
        "flagged": _mean(flagged),
        "mistakes": int(wrong.sum()),
        "mistakes_warned": _mean((flagged | (size > 1))[wrong]),
        "per_class": per_class,
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
    arrays = {
        "class_means": uncertainty.ood.class_means_.astype(np.float32),
        "precision": uncertainty.ood.precision_.astype(np.float32),
        "calibration_scores": np.concatenate(scores).astype(np.float32),
        "calibration_labels": np.repeat(np.arange(len(scores)), [len(s) for s in scores]),
    }
    atomic_write(directory / UNCERTAINTY_NAME, lambda tmp: save_file(arrays, tmp))
    config.uncertainty = uncertainty.to_json()
    save_config(directory, config)


def load_uncertainty(
    directory: str | Path, config: CheckpointConfig, feature_dim: int | None = None
) -> Uncertainty | None:
    """A checkpoint's fitted statistics, or None when it has none (or its file is missing: a
    warning is logged); a bad file or summary, or
    statistics for another width than the model's ``feature_dim``, is a
    :class:`~mirage_demo.checkpoint.CheckpointError` of one line."""
    summary = config.uncertainty
    if not summary:
        return None
    path = Path(directory) / UNCERTAINTY_NAME
    if not path.is_file():  # e.g. copied without it: serve without sets and flags
        log.warning("%s is missing: no prediction sets or out-of-distribution flag", path)
        return None
    arrays = _read_arrays(path, config.num_classes)
    width = arrays["class_means"].shape[1]
    if feature_dim is not None and width != feature_dim:
        raise CheckpointError(f"{path} is for {width} features; the model has {feature_dim}")
    try:
        threshold = float(summary["ood"]["threshold"])
        false_alarm = float(summary["ood"]["false_alarm"])
        info = {k: v for k, v in summary.items() if k == "fitted_on"}
    except (KeyError, TypeError, ValueError) as err:
        reason = f"{type(err).__name__}: {err}"[:100]
        raise CheckpointError(f"config.json: unusable 'uncertainty' summary ({reason})") from err
    if not (math.isfinite(threshold) and threshold > 0 and 0 < false_alarm < 1):
        raise CheckpointError("config.json: the 'uncertainty' threshold or false alarm is invalid")
    sets = ConformalSets()
    sets.n_classes_ = config.num_classes
    labels, scores = arrays["calibration_labels"], arrays["calibration_scores"].astype(np.float64)
    sets.scores_ = [np.sort(scores[labels == k]) for k in range(config.num_classes)]
    ood = MahalanobisOOD()
    ood.class_means_ = arrays["class_means"].astype(np.float64)
    ood.precision_ = arrays["precision"].astype(np.float64)
    ood.threshold_, ood.false_alarm_ = threshold, false_alarm
    return Uncertainty(list(config.class_names), sets, ood, info)


def _read_arrays(path: Path, num_classes: int) -> dict[str, np.ndarray]:
    """The four arrays, shapes checked from the header before reading, values after."""
    expected = ("class_means", "precision", "calibration_scores", "calibration_labels")
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
    for key in ("class_means", "precision", "calibration_scores"):
        # float32's range: a distance of features within it cannot overflow in float64
        with np.errstate(over="ignore"):
            finite = arrays[key].dtype.kind == "f" and np.isfinite(arrays[key].astype(np.float32))
        if not np.all(finite):
            raise CheckpointError(f"{path}: {key} must hold finite float32 numbers")
    scores = arrays["calibration_scores"]
    if scores.min() < 0 or scores.max() > 1:
        raise CheckpointError(f"{path}: calibration_scores must lie in [0, 1]")
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
