"""Is a scan unlike the scans the model was trained on? Two detectors, one flag.

>>> flag = UnlikeTraining.fit(train_features, train_labels, train_stats,
...                           val_features, val_stats, false_alarm=0.05)
>>> flag.flags(features, statistics), flag.score(features, statistics)

- :class:`MahalanobisOOD` (Lee et al. 2018): the Mahalanobis distance of the scan's
  penultimate features to the nearest class mean of the training scans, one shared
  covariance (Ledoit-Wolf shrinkage). It sees what the model sees.
- :class:`StatisticsOOD`: the distance of the scan's image statistics
  (:mod:`mirage_demo.imagestats`: intensity mapping, background, speckle, sharpness, aspect
  ratio) to those of the training scans: the mean Euclidean distance to the
  :data:`NEIGHBOURS` nearest training scans (Sun et al. 2022's nearest-neighbour score), each
  statistic centred on the training scans' median and divided by their interquartile range.
  It sees what the device did, which a model trained to ignore devices no longer shows.

:class:`UnlikeTraining` flags a scan when either score passes its threshold. The thresholds are
chosen together on the validation scans: each detector's at the same quantile of its own
validation scores, the quantile set so that ``false_alarm`` of the validation scans are
flagged by one or the other. A score that is not a finite number (a damaged image, an
overflow) is always flagged: the flag can never silently turn off. The score reported for a
scan is the larger of its two scores over their thresholds: above 1, flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FALSE_ALARM",
    "NEIGHBOURS",
    "MahalanobisOOD",
    "StatisticsOOD",
    "UnlikeTraining",
    "conformal_rank",
    "flagged",
]

FALSE_ALARM = 0.05
NEIGHBOURS = 10
MAX_REFERENCE = 8192  # training scans kept for the nearest-neighbour score
_CHUNK = 1024  # scans scored at a time: bounded memory


def conformal_rank(n: int, level: float) -> int:
    """``ceil((n + 1) level)``, immune to float error (``(9 + 1) * 0.7`` is 7.000000000000001):
    the rank of the split-conformal quantile of ``n`` scores."""
    return math.ceil(round((n + 1) * level, 9))


def _quantile(sorted_scores: np.ndarray, level: float) -> float:
    """The ``ceil((n + 1) level)``-th smallest score (the largest when there are fewer)."""
    rank = conformal_rank(len(sorted_scores), level)
    return float(sorted_scores[min(rank, len(sorted_scores)) - 1])


class MahalanobisOOD:
    """Distance of penultimate features to the nearest class mean (shared covariance)."""

    def fit(self, features: np.ndarray, labels: np.ndarray) -> MahalanobisOOD:
        """Class means and covariance from ``features`` (the training scans)."""
        from sklearn.covariance import LedoitWolf

        features, labels = np.asarray(features, np.float64), np.asarray(labels, np.int64)
        classes = np.unique(labels)
        if len(classes) != labels.max() + 1:
            raise ValueError("every class needs training features")
        means = np.stack([features[labels == k].mean(axis=0) for k in classes])
        centred = features - means[labels]
        precision = LedoitWolf(assume_centered=True).fit(centred).get_precision()
        self.class_means_, self.precision_ = _stored(means), _stored(precision)
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """``(N,)`` distances (larger: less like the training scans)."""
        x = np.asarray(features, np.float64)
        squared = np.empty(len(x))
        with np.errstate(over="ignore", invalid="ignore"):  # huge or NaN features: inf, NaN
            for start in range(0, len(x), _CHUNK):  # (1024, K, D) at a time
                diff = x[start : start + _CHUNK, None, :] - self.class_means_[None, :, :]
                squared[start : start + _CHUNK] = ((diff @ self.precision_) * diff).sum(-1).min(1)
            distances = np.sqrt(np.maximum(squared, 0.0))
        return np.where(np.isnan(distances), np.inf, distances)  # not a number: infinitely far


class StatisticsOOD:
    """Mean distance of standardised image statistics to the nearest training scans'."""

    def fit(
        self, statistics: np.ndarray, neighbours: int = NEIGHBOURS, seed: int = 0
    ) -> StatisticsOOD:
        """Centre, scale and reference rows from the training scans' ``statistics`` ``(N, S)``
        (at most :data:`MAX_REFERENCE` rows kept, drawn at random)."""
        x = np.asarray(statistics, np.float64)
        x = x[np.isfinite(x).all(axis=1)]
        if len(x) <= neighbours:
            raise ValueError(f"need more than {neighbours} training scans with finite statistics")
        self.centre_ = _stored(np.median(x, axis=0))
        spread = np.subtract(*np.percentile(x, [75, 25], axis=0))
        self.scale_ = _stored(np.maximum(spread, 1e-3 * np.maximum(np.abs(self.centre_), 1e-3)))
        if len(x) > MAX_REFERENCE:
            x = x[np.random.default_rng(seed).choice(len(x), MAX_REFERENCE, replace=False)]
        self.reference_ = _stored((x - self.centre_) / self.scale_)
        self.neighbours_ = int(neighbours)
        return self

    def score(self, statistics: np.ndarray) -> np.ndarray:
        """``(N,)`` mean distances to the nearest training scans (inf: not finite)."""
        x = (np.asarray(statistics, np.float64) - self.centre_) / self.scale_
        scores = np.full(len(x), np.inf)
        finite = np.isfinite(x).all(axis=1)
        rows = np.flatnonzero(finite)
        squared_ref = (self.reference_**2).sum(axis=1)
        k = min(self.neighbours_, len(self.reference_))
        for start in range(0, len(rows), _CHUNK):
            part = x[rows[start : start + _CHUNK]]
            squared = (
                (part**2).sum(1)[:, None] + squared_ref[None, :] - 2 * part @ self.reference_.T
            )
            nearest = np.partition(np.maximum(squared, 0.0), k - 1, axis=1)[:, :k]
            scores[rows[start : start + _CHUNK]] = np.sqrt(nearest).mean(axis=1)
        return scores


@dataclass
class UnlikeTraining:
    """The "unlike the training scans" flag: feature and image-statistics detectors, each
    with its threshold (``statistics=None``: a checkpoint fitted before image statistics,
    flagged on features alone)."""

    features: MahalanobisOOD
    feature_threshold: float
    false_alarm: float
    statistics: StatisticsOOD | None = None
    statistics_threshold: float | None = None

    @classmethod
    def fit(
        cls,
        train_features: np.ndarray,
        train_labels: np.ndarray,
        train_statistics: np.ndarray | None,
        val_features: np.ndarray,
        val_statistics: np.ndarray | None,
        false_alarm: float = FALSE_ALARM,
    ) -> UnlikeTraining:
        """Fit both detectors on the training scans, their thresholds on the validation
        scans (``None`` statistics: features alone)."""
        if not 0.0 < false_alarm < 1.0:
            raise ValueError(f"false_alarm must be between 0 and 1, got {false_alarm}")
        features = MahalanobisOOD().fit(train_features, train_labels)
        val_scores = [features.score(val_features)]
        statistics = None
        if train_statistics is not None and val_statistics is not None:
            statistics = StatisticsOOD().fit(train_statistics)
            val_scores.append(statistics.score(val_statistics))
        thresholds = _joint_thresholds(val_scores, false_alarm)
        return cls(
            features,
            thresholds[0],
            float(false_alarm),
            statistics,
            thresholds[1] if statistics is not None else None,
        )

    def parts(
        self, features: np.ndarray, statistics: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Each detector's scores over its threshold (above 1: flagged by it; a detector
        without statistics to look at is left out)."""
        parts = {"features": self.features.score(features) / self.feature_threshold}
        if self.statistics is not None and statistics is not None:
            parts["image"] = self.statistics.score(statistics) / self.statistics_threshold
        return parts

    def score(self, features: np.ndarray, statistics: np.ndarray | None = None) -> np.ndarray:
        """``(N,)`` the larger part (above 1: unlike the training scans; inf: not finite)."""
        return _larger(self.parts(features, statistics))

    def flags(self, features: np.ndarray, statistics: np.ndarray | None = None) -> np.ndarray:
        """``(N,)`` bool: unlike the training scans (a score that is not finite included)."""
        return flagged(self.score(features, statistics))


def _stored(values: np.ndarray) -> np.ndarray:
    """``values`` as a checkpoint stores them (float32), so a fitted detector scores exactly
    as the one loaded from its checkpoint."""
    return np.asarray(values, np.float64).astype(np.float32).astype(np.float64)


def _larger(parts: dict[str, np.ndarray]) -> np.ndarray:
    """The elementwise maximum, NaN-safe: a NaN part makes the result inf."""
    stacked = np.stack(list(parts.values()))
    stacked = np.where(np.isnan(stacked), np.inf, stacked)
    return stacked.max(axis=0)


def flagged(scores: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: which :meth:`UnlikeTraining.score` scores flag their scan (above 1, or
    not finite)."""
    return ~(np.isfinite(scores) & (scores <= 1.0))


def _joint_thresholds(val_scores: list[np.ndarray], false_alarm: float) -> list[float]:
    """Thresholds at one quantile of each detector's validation scores, the quantile chosen
    so that ``false_alarm`` of the validation scans pass at least one of them."""
    ordered = [np.sort(s[np.isfinite(s)]) for s in val_scores]
    if any(len(s) == 0 for s in ordered):
        raise ValueError("no finite validation scores to set the thresholds on")
    # each scan's highest rank (its share of validation scores at or below its own) ...
    ranks = np.max(
        [
            np.searchsorted(s, v, side="right") / len(s)
            for s, v in zip(ordered, val_scores, strict=True)
        ],
        axis=0,
    )
    ranks[~np.isfinite(np.stack(val_scores)).all(axis=0)] = np.inf
    # ... and the quantile that flags `false_alarm` of them
    level = _quantile(np.sort(ranks[np.isfinite(ranks)]), 1.0 - false_alarm)
    return [max(_quantile(s, min(level, 1.0)), 1e-12) for s in ordered]
