"""Evaluate a checkpoint on labelled scans: the report of ``python -m train.evaluate`` and the app.

One code path computes the report wherever it is asked for: :func:`evaluate_samples` decodes the
files with the checkpoint's preprocessing and the quality gate
(:class:`~mirage_demo.quality.CheckedImages`), predicts in batches
(:func:`~mirage_demo.logits.file_outputs`), calibrates with the checkpoint's temperature and
writes :func:`~mirage_demo.metrics.write_report`. ``train.evaluate`` (a data split), the
trainer's final report and the app's ``/evaluate`` (uploaded scans) all call it, so their
numbers are the same for the same images.

Uploaded labelled scans (:func:`labelled_upload`): a ``.zip`` laid out ``<CLASS>/<image>`` (any
folders above the class folder are ignored) or image files named ``<CLASS>/<image>``. Zips are
read by :mod:`mirage_demo.uploads` (entries counted from the end record, members streamed with
byte caps per entry and per request), and at most ``max_files`` images are taken, so the cost
of a request does not depend on what the archive claims.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from mirage_demo.checkpoint import CheckpointConfig
from mirage_demo.data import (
    _KERMANY_NAME,
    DataError,
)
from mirage_demo.images import IMAGE_SUFFIXES, ImageReadError, Sample, decoded_bytes, image_header
from mirage_demo.logits import Outputs, file_outputs
from mirage_demo.metrics import softmax, write_report
from mirage_demo.uncertainty import Uncertainty
from mirage_demo.uploads import RequestBudget, UploadItem, expand_uploads
from mirage_demo.verdict import decide

__all__ = [
    "LabelledUpload",
    "evaluate_samples",
    "evaluate_upload",
    "labelled_upload",
    "report_outputs",
    "summary",
]


MAX_UPLOAD_FILES = 1000
MAX_UPLOAD_CLASSES = 20  # an upload whose classes are its folders' names
_CLASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+-]{0,39}")
MAX_FILE_OVERHEAD = 2**20  # bytes an unpacked image may hold beyond its pixels (metadata)
MAX_NAME_BYTES = 120  # of an unpacked image's file name, before its suffix


# --------------------------------------------------------------------------------------------
# Predicting and reporting


def evaluate_samples(
    model: torch.nn.Module,
    config: CheckpointConfig,
    samples: Sequence[Sample],
    data_root: str | Path,
    out: str | Path,
    *,
    split: str,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: bool | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    tta: bool = False,
    uncertainty: Uncertainty | None = None,
) -> dict[str, Any]:
    """Predict ``samples`` from their files, calibrate, and write the report into ``out``
    (file names in ``predictions.csv`` relative to ``data_root``; ``tta``: see
    :func:`~mirage_demo.logits.collect_logits`, recorded in ``metrics.json``). Each scan gets
    its verdict in ``predictions.csv`` (``trust``: the quality gate's, and with the
    checkpoint's ``uncertainty`` its prediction set and flag too); ``metrics.json`` then also
    holds the sets' coverage and set sizes, the share of scans flagged and the share of each
    verdict with the accuracy within it (:meth:`~mirage_demo.uncertainty.Uncertainty.report`)."""
    outputs = file_outputs(
        model,
        samples,
        config.preprocessing,
        device,
        batch_size=batch_size,
        workers=workers,
        amp_dtype=amp_dtype,
        progress=progress,
        desc=f"{split} split",
        on_batch=on_batch,
        tta=tta,
        copies=[],
    )
    return report_outputs(
        config,
        samples,
        outputs,
        data_root,
        out,
        split=split,
        n_bootstrap=n_bootstrap,
        seed=seed,
        tta=tta,
        uncertainty=uncertainty,
    )


def report_outputs(
    config: CheckpointConfig,
    samples: Sequence[Sample],
    outputs: Outputs,
    data_root: str | Path,
    out: str | Path,
    *,
    split: str,
    n_bootstrap: int = 1000,
    seed: int = 0,
    tta: bool = False,
    uncertainty: Uncertainty | None = None,
) -> dict[str, Any]:
    """The report of :func:`evaluate_samples` from the model's ``outputs`` on ``samples``
    however they were computed (from the files, or a probe's feature cache)."""
    labels = outputs.labels
    if len(labels) == 0:
        raise DataError(f"no readable images in the {split} split")
    probs = softmax(outputs.logits, config.temperature)
    features, statistics = outputs.features, outputs.statistics
    passes = outputs.looks_like_oct
    if passes is None:  # not checked (a probe's feature cache): every scan passes the gate
        passes = np.ones(len(labels), dtype=bool)
    extra: dict[str, Any] = {}
    answers: list[dict[str, Any]] = [{"trust": decide(bool(p), None, None)} for p in passes]
    if uncertainty is not None:
        answers = uncertainty.answers(probs, features, statistics=statistics, looks_like_oct=passes)
        extra["uncertainty"] = uncertainty.report(answers, probs, labels)
    root = Path(data_root)
    files = [_relative(samples[i].path, root) for i in outputs.indices]
    return write_report(
        out,
        labels,
        probs,
        config.class_names,
        files,
        split=split,
        temperature=config.temperature,
        n_bootstrap=n_bootstrap,
        seed=seed,
        tta=tta,
        extra=extra,
        answers=answers,
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def summary(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: overall metrics with CIs, per-class sensitivity."""

    def fmt(entry: dict[str, Any]) -> str:
        value, (lo, hi) = entry["value"], entry["ci95"]
        if value is None:
            return "n/a"
        ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        return f"{value:.3f}{ci}"

    lines = [
        f"{metrics['split']} split: {metrics['num_images']} images "
        f"({', '.join(f'{k} {v}' for k, v in metrics['images_per_class'].items())}), "
        f"temperature {metrics['temperature']:.3f}"
    ]
    for name, entry in metrics["overall"].items():
        lines.append(f"  {name:<18} {fmt(entry)}")
    for cls, entry in metrics["per_class"].items():
        lines.append(
            f"  {cls:<12} sensitivity {fmt(entry['sensitivity'])}  "
            f"specificity {fmt(entry['specificity'])}  AUROC {fmt(entry['auroc'])}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Labelled uploads


@dataclass
class LabelledUpload:
    """Uploaded labelled scans unpacked under ``root`` as ``<CLASS>/<image>``."""

    root: Path
    samples: list[Sample]
    skipped: list[str]  # entries that are not images (named, with the reason)
    class_names: list[str] = field(default_factory=list)  # what the sample labels index


def labelled_upload(
    uploads: Sequence[tuple[str, str | Path]],
    class_names: Sequence[str] | None,
    root: str | Path,
    *,
    max_files: int = MAX_UPLOAD_FILES,
    budget: RequestBudget | None = None,
) -> LabelledUpload:
    """Unpack ``(name, path)`` uploads into ``root/<CLASS>/<image>``: a ``.zip`` laid out
    ``<CLASS>/<image>``, or an image whose ``name`` is ``<CLASS>/<image>``.

    The class is an image's parent folder (for a file without one, the class in a Kermany-style
    name, ``CNV-1016042-1.jpeg``). Every name is checked before anything is read: classes the
    checkpoint does not know, an image without a class folder and more than ``max_files``
    images raise :class:`~mirage_demo.data.DataError`. Zips are read by
    :mod:`mirage_demo.uploads` (streamed, byte caps per entry and per request: ``budget``); an
    image is written only when its header is one the app reads and the file is at most its
    pixels' size plus :data:`MAX_FILE_OVERHEAD`, so what is kept on disk is bounded by what
    can be evaluated. Entries left out are listed in ``skipped``; an upload with no usable
    image raises :class:`~mirage_demo.data.DataError`. ``class_names=None`` takes any classes:
    the class folders' names, sorted (at most :data:`MAX_UPLOAD_CLASSES`, each a plain name).
    """
    root = Path(root)
    budget = budget or RequestBudget()
    with ExitStack() as stack:
        items = expand_uploads([(str(n), str(p)) for n, p in uploads], stack)
        if len(items) > max_files:
            raise DataError(f"more than {max_files} images in one upload")
        if class_names is None:
            class_names = _classes_named(items)
        known = {name: index for index, name in enumerate(class_names)}
        labelled, skipped = _labelled(items, known)
        samples: list[Sample] = []
        taken: set[Path] = set()
        for item, cls in labelled:
            try:
                target = _unpack(item, root / cls, budget, taken)
            except ImageReadError as err:
                skipped.append(f"{item.name}: {err.reason}")
                continue
            samples.append(Sample(target, known[cls], target.stem))
    if not samples:
        reason = f" (left out: {skipped[0]})" if skipped else ""
        raise DataError(
            f"no labelled images found{reason}: upload a .zip laid out as <CLASS>/<image>"
        )
    return LabelledUpload(root, samples, skipped, list(class_names))


def _classes_named(items: Sequence[UploadItem]) -> list[str]:
    """The classes an upload's image names give (sorted); a name that is not a plain folder
    name, or more than :data:`MAX_UPLOAD_CLASSES` of them, raise :class:`DataError`."""
    found = set()
    for item in items:
        shown = item.member if item.member is not None else item.name
        if item.error is None and _is_image_name(shown) and (cls := _class_of(shown)):
            found.add(cls)
    bad = sorted(c for c in found if not _CLASS_NAME.fullmatch(c))
    if bad:
        raise DataError(
            f"class folder {bad[0][:40]!r} is not a plain name (letters, digits, "
            "space, . _ + -; at most 40 characters): rename it"
        )
    if len(found) > MAX_UPLOAD_CLASSES:
        raise DataError(f"{len(found)} class folders: at most {MAX_UPLOAD_CLASSES}")
    return sorted(found)


def _labelled(
    items: Sequence[UploadItem], known: dict[str, int]
) -> tuple[list[tuple[UploadItem, str]], list[str]]:
    """``([(item, class)], skipped)`` from the items' names alone (nothing is read); unknown
    classes and images without one raise :class:`DataError`."""
    labelled, skipped, unknown, unlabelled = [], [], set(), []
    for item in items:
        shown = item.member if item.member is not None else item.name
        if item.error is None and item.member is None and not _is_image_name(shown):
            skipped.append(f"{item.name}: not an image or a .zip")
        elif item.error is not None:
            skipped.append(f"{item.name}: {item.error}")
        elif (cls := _class_of(shown)) is None:
            unlabelled.append(shown)
        elif cls not in known:
            unknown.add(cls)
        else:
            labelled.append((item, cls))
    if unknown:
        raise DataError(
            f"classes the model does not know: {', '.join(sorted(unknown))} "
            f"(it knows {', '.join(known)}); rename or remove those folders"
        )
    if unlabelled:
        raise DataError(
            f"{len(unlabelled)} image(s) without a class folder (e.g. {unlabelled[0]}): "
            "lay the scans out as <CLASS>/<image>"
        )
    return labelled, skipped


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _class_of(name: str) -> str | None:
    """An image's class: its parent folder, else the class of a Kermany-style file name."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if len(parts) >= 2:
        return parts[-2]
    kermany = _KERMANY_NAME.match(PurePosixPath(parts[-1]).stem) if parts else None
    return kermany.group("cls") if kermany else None


def _unpack(item: UploadItem, folder: Path, budget: RequestBudget, taken: set[Path]) -> Path:
    """Write one labelled image into ``folder`` under a new, safe name; refuse (before
    writing) what the app cannot read and a file much larger than its pixels."""
    source = item.load(budget)
    size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
    with image_header(source, item.name) as header:
        most = decoded_bytes(header) + MAX_FILE_OVERHEAD
        width, height = header.size
    if size > most:
        raise ImageReadError(
            item.name, f"skipped: {size:,} bytes, more than its {width}x{height} pixels need"
        )
    target = _new_path(folder, PurePosixPath(item.member or item.name).name, taken)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(source, bytes):
        target.write_bytes(source)
    else:
        shutil.copyfile(source, target)
    return target


def _new_path(folder: Path, name: str, taken: set[Path]) -> Path:
    """``folder/name`` made safe (no separators or control characters, no leading dot, at
    most :data:`MAX_NAME_BYTES`), numbered if ``taken``; added to ``taken``."""
    path = PurePosixPath(name)
    stem = re.sub(r"[\x00-\x1f\\/]", "_", path.stem).lstrip(".")
    stem = stem.encode()[:MAX_NAME_BYTES].decode(errors="ignore") or "image"
    suffix = path.suffix.lower() if _is_image_name(name) else ""
    target, n = folder / f"{stem}{suffix}", 1
    while target in taken:
        target, n = folder / f"{stem}-{n}{suffix}", n + 1
    taken.add(target)
    return target


def evaluate_upload(
    model: torch.nn.Module,
    config: CheckpointConfig,
    uploads: Sequence[tuple[str, str | Path]],
    out: str | Path,
    *,
    device: torch.device,
    n_bootstrap: int = 1000,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
    max_files: int = MAX_UPLOAD_FILES,
    uncertainty: Uncertainty | None = None,
) -> tuple[dict[str, Any], LabelledUpload]:
    """The report of ``train.evaluate`` on uploaded labelled scans: unpacked into
    ``out/scans/<CLASS>/``, evaluated (split ``"uploaded"``), written into ``out`` (with the
    checkpoint's ``uncertainty``: its sets' coverage and the share flagged on these scans)."""
    upload = labelled_upload(uploads, config.class_names, Path(out) / "scans", max_files=max_files)
    metrics = evaluate_samples(
        model,
        config,
        upload.samples,
        upload.root,
        out,
        split="uploaded",
        device=device,
        n_bootstrap=n_bootstrap,
        seed=seed,
        on_batch=on_batch,
        uncertainty=uncertainty,
    )
    return metrics, upload
