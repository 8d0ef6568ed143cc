"""Classify every B-scan of a volume, batch by batch, and say where each class is.

>>> with load_volume("eye.vol") as volume:
...     results = list(classify_volume(predictor, volume))   # one SliceResult per B-scan
>>> summary = summarize(results, predictor.class_names)
>>> summary.text()    # "DME in B-scans 19-28 of 49 (highest 0.97, B-scan 23); ..."

Each B-scan goes through :meth:`~mirage_demo.inference.Predictor.predict_batch` as the array
its picture decodes to (:mod:`mirage_demo.volumes`), so its prediction equals the 2-D
prediction of that picture. Only one batch of B-scans is decoded at a time: memory is bounded
by the batch, not the volume.

**The volume's finding.** A disease seen in one B-scan is a finding for the eye, so the
summary rests on the B-scan where a class other than the normal one (a class named
``NORMAL``, any case) is most probable among the B-scans predicted as that class; the volume
is normal only when every readable B-scan is predicted normal (it then rests on the B-scan
most probably normal). A checkpoint without a normal class rests on its most probable
prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mirage_demo.images import ImageReadError
from mirage_demo.inference import Prediction, Predictor
from mirage_demo.volumes import Volume, VolumeError, slice_label

__all__ = [
    "NORMAL_CLASSES",
    "SliceResult",
    "VolumeSummary",
    "classify_volume",
    "index_ranges",
    "summarize",
]

BATCH_SIZE = 8
NORMAL_CLASSES = frozenset({"normal", "healthy"})  # class names meaning "no disease"


@dataclass
class SliceResult:
    """One B-scan's answer (or why it could not be read) and, while it is handed over, the
    B-scan itself (the caller may keep it or let it go)."""

    index: int
    result: Prediction | ImageReadError
    image: np.ndarray | None = None

    @property
    def prediction(self) -> Prediction | None:
        return self.result if isinstance(self.result, Prediction) else None

    def record(self, file: str) -> dict[str, Any]:
        """The CLI's ``--json`` record of this B-scan: the usual fields (or ``error``) and
        ``slice``, its index from 0."""
        if isinstance(self.result, Prediction):
            return {**self.result.record(), "file": file, "slice": self.index}
        return {"file": file, "slice": self.index, "error": self.result.reason}


def classify_volume(
    predictor: Predictor,
    volume: Volume,
    *,
    batch_size: int = BATCH_SIZE,
    level: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[SliceResult]:
    """Yield every B-scan's :class:`SliceResult`, in order, decoding ``batch_size`` at a time.

    A B-scan that cannot be read (corrupt, another size) is a result with its reason; the
    others go on. ``progress(done, total)`` is called before each batch and at the end."""
    total, step = len(volume), max(1, int(batch_size))
    for start in range(0, total, step):
        if progress is not None:
            progress(start, total)
        indices = range(start, min(start + step, total))
        images: list[np.ndarray | ImageReadError] = []
        for index in indices:
            try:
                images.append(volume.bscans[index])
            except (ImageReadError, VolumeError) as err:
                images.append(ImageReadError(slice_label(volume.name, index), err.reason))
        names = [slice_label(volume.name, index) for index in indices]
        results = predictor.predict_batch(
            images, batch_size=step, names=names, on_error="return", level=level
        )
        for index, image, result in zip(indices, images, results, strict=True):
            yield SliceResult(index, result, None if isinstance(image, Exception) else image)
    if progress is not None:
        progress(total, total)


@dataclass
class VolumeSummary:
    """Which classes appear in which B-scans, each class's highest B-scan probability, and
    the B-scan the volume's finding rests on (indices from 0)."""

    slices: int
    class_names: list[str]
    per_class_slices: dict[str, list[int]]
    highest: dict[str, tuple[float, int]]  # class -> (its highest probability, that B-scan)
    finding: str | None  # the class the summary rests on (None: no B-scan readable)
    key_slice: int | None
    key_probability: float | None  # the finding's probability on that B-scan
    unreadable: list[int] = field(default_factory=list)
    unlike_training: list[int] = field(default_factory=list)
    not_like_bscans: list[int] = field(default_factory=list)  # the quality check's warnings

    def to_dict(self) -> dict[str, Any]:
        """The CLI's ``volume_summary`` record."""
        return {
            "slices": self.slices,
            "per_class_slices": self.per_class_slices,
            "highest_probability": {
                c: {"probability": round(p, 6), "slice": i} for c, (p, i) in self.highest.items()
            },
            "finding": self.finding,
            "key_slice": self.key_slice,
            "key_probability": None
            if self.key_probability is None
            else round(self.key_probability, 6),
            "unreadable_slices": self.unreadable,
            "unlike_training_slices": self.unlike_training,
            "not_like_bscan_slices": self.not_like_bscans,
            "text": self.text(),
        }

    def text(self) -> str:
        """The summary in plain words; B-scans are numbered from 1, as people count them."""
        if self.finding is None or self.key_slice is None:
            return f"None of the {self.slices} B-scans could be read."
        parts = []
        for name in self.class_names:
            indices = self.per_class_slices[name]
            if indices:
                probability, at = self.highest[name]
                parts.append(
                    f"{name} in {_bscans(indices)} of {self.slices} "
                    f"(highest {probability:.2f}, B-scan {at + 1})"
                )
        text = "; ".join(parts) + "."
        text += (
            f" The volume's finding, {self.finding}, rests on B-scan {self.key_slice + 1} "
            f"({self.finding} {self.key_probability:.2f})."
        )
        if self.unreadable:
            text += f" Unreadable: {_bscans(self.unreadable)}."
        if self.not_like_bscans:
            text += f" Not like an OCT B-scan: {_bscans(self.not_like_bscans)}."
        if self.unlike_training:
            text += f" Unlike the training scans: {_bscans(self.unlike_training)}."
        return text


def summarize(results: Sequence[SliceResult], class_names: Sequence[str]) -> VolumeSummary:
    """The summary of a volume's :class:`SliceResult` (every B-scan's, in any order)."""
    classes = list(class_names)
    per_class: dict[str, list[int]] = {c: [] for c in classes}
    highest: dict[str, tuple[float, int]] = {}
    unreadable, unlike, odd = [], [], []
    results_by_index = {r.index: r.prediction for r in results}
    for item in sorted(results, key=lambda r: r.index):
        prediction = item.prediction
        if prediction is None:
            unreadable.append(item.index)
            continue
        per_class[prediction.label].append(item.index)
        if prediction.out_of_distribution:
            unlike.append(item.index)
        if prediction.warnings:
            odd.append(item.index)
        for name in classes:
            probability = float(prediction.probabilities[name])
            if name not in highest or probability > highest[name][0]:
                highest[name] = (probability, item.index)
    finding = _finding(per_class, results)
    key = None if finding is None else _key_slice(finding, results)
    key_probability = None
    if key is not None:
        key_probability = float(results_by_index[key].probabilities[finding])
    return VolumeSummary(
        len(results),
        classes,
        per_class,
        highest,
        finding,
        key,
        key_probability,
        unreadable,
        unlike,
        odd,
    )


def _finding(per_class: dict[str, list[int]], results: Sequence[SliceResult]) -> str | None:
    """The class the volume's summary rests on (see the module's notes)."""
    predicted = [c for c, indices in per_class.items() if indices]
    if not predicted:
        return None
    diseases = [c for c in predicted if c.lower() not in NORMAL_CLASSES] or predicted

    def strength(name: str) -> float:  # the highest probability among its own B-scans
        return max(
            r.prediction.probabilities[name]
            for r in results
            if r.prediction is not None and r.prediction.label == name
        )

    return max(diseases, key=strength)


def _key_slice(finding: str, results: Sequence[SliceResult]) -> int:
    """The B-scan predicted ``finding`` where that class is most probable."""
    candidates = [r for r in results if r.prediction is not None and r.prediction.label == finding]
    best = max(candidates, key=lambda r: (r.prediction.probabilities[finding], -r.index))
    return best.index


def _bscans(indices: Sequence[int]) -> str:
    """``"B-scan 5"`` or ``"B-scans 18-20, 26"`` (numbered from 1)."""
    return f"B-scan{'s' if len(indices) > 1 else ''} {index_ranges(indices)}"


def index_ranges(indices: Sequence[int], *, first: int = 1) -> str:
    """``[17, 18, 19, 25]`` -> ``"18-20, 26"`` (numbered from ``first``)."""
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(
        f"{run[0] + first}" if len(run) == 1 else f"{run[0] + first}-{run[-1] + first}"
        for run in runs
    )
