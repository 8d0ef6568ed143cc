"""Linear probes on frozen features: MIRAGE at work without a GPU, in minutes.

Every image goes once through the frozen backbone (no augmentation, the app's preprocessing);
its pooled features are cached on disk, keyed by the backbone's weights, the preprocessing and
the image file's SHA-256, so a second run, another regularisation or another split re-uses
them. A multinomial logistic regression (scikit-learn, class-balanced, ``C`` chosen on the
validation split) is fitted on them in seconds and written into the model's own linear head:
backbone + head stay one ``nn.Module`` that the Predictor, the explanations and every
checkpoint consumer take as they take any model.

::

    from mirage_demo.probe import cached_features, fit_probe, apply_probe

    train = cached_features(model, samples_train, preprocessing, cache_root, device)
    val = cached_features(model, samples_val, preprocessing, cache_root, device)
    fit = fit_probe(train.features, train.labels, val.features, val.labels, num_classes)
    apply_probe(model, fit)  # model.get_classifier() now holds the probe

A probe on weights fetched from the Hub is saved head-only (``CheckpointConfig.backbone``;
see :mod:`mirage_demo.checkpoint`): MIRAGE's weights are never copied into a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mirage_demo.data import DataError, FileImages, Preprocessing
from mirage_demo.fileio import atomic_write
from mirage_demo.images import Sample
from mirage_demo.logits import Outputs, make_loader, to_model_input
from mirage_demo.metrics import compute_metrics, nll, softmax

__all__ = [
    "DEFAULT_CS",
    "FeatureCache",
    "Features",
    "ProbeFit",
    "apply_probe",
    "balanced_accuracy",
    "bare_forward_speed",
    "cached_features",
    "embed",
    "embed_in_chunks",
    "file_sha256",
    "fit_probe",
    "head_outputs",
    "pooled_features",
    "weights_digest",
]

FEATURES_VERSION = 1
#: the regularisation strengths tried on the validation split (inverse L2 strength, on
#: standardised features)
DEFAULT_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
SHARD_PREFIX = "shard-"


# --------------------------------------------------------------------------------------------
# Features


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a timm model's classifier sees: ``(B, num_features)`` pooled features (for MIRAGE
    the norm on every token, then the mean over the patches)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def classifier_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the final linear classifier (``model.get_classifier()``)."""
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head:
            return [f"{name}.{key}" for key in head.state_dict()]
    return []


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every tensor that shapes the pooled features (all but the final classifier),
    by name, dtype, shape and bytes."""
    skip = set(classifier_keys(model))
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if key in skip:
            continue
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}\0{value.dtype}\0{tuple(value.shape)}\n".encode())
        flat = value.reshape(-1)  # a 0-d tensor (BatchNorm's counter) cannot be viewed as bytes
        digest.update(flat.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def embed(
    model: nn.Module,
    samples: Sequence[Sample],
    preprocessing: Preprocessing,
    device: torch.device,
    *,
    batch_size: int = 32,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    desc: str = "embedding",
) -> tuple[np.ndarray, list[int]]:
    """One forward pass per image, no augmentation: ``(features (n, D) float32, the indices
    into ``samples`` they belong to)``; unreadable images are left out (and logged)."""
    from tqdm.auto import tqdm

    from mirage_demo.cache import tqdm_disable

    model.eval()
    loader = make_loader(FileImages(samples, preprocessing), batch_size, workers, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    features, indices = [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=tqdm_disable(progress)):
        if batch is None:
            continue
        images, _, batch_indices = batch
        with autocast:
            out = pooled_features(model, to_model_input(images, preprocessing, device))
        features.append(out.float().cpu())
        indices += batch_indices.tolist()
    width = int(getattr(model, "num_features", 0))
    stacked = torch.cat(features).numpy() if features else np.zeros((0, width), np.float32)
    return stacked, indices


def embed_in_chunks(
    model: nn.Module,
    samples: Sequence[Sample],
    preprocessing: Preprocessing,
    device: torch.device,
    on_progress: Callable[[int, int], None] | None = None,
    chunk: int = 32,
) -> tuple[np.ndarray, list[int]]:
    """:func:`embed`, ``chunk`` images at a time, calling ``on_progress(done, total)`` after
    each (the app's progress bars): ``(features (n, D) float32, indices into samples)``."""
    features, kept = [], []
    for first in range(0, len(samples), chunk):
        part = samples[first : first + chunk]
        values, indices = embed(model, part, preprocessing, device, progress=False)
        features.append(values)
        kept += [first + i for i in indices]
        if on_progress is not None:
            on_progress(min(first + chunk, len(samples)), len(samples))
    width = int(getattr(model, "num_features", 0))
    stacked = np.concatenate(features) if features else np.zeros((0, width), np.float32)
    return stacked.astype(np.float32, copy=False), kept


class FeatureCache:
    """Pooled features on disk: one folder per (backbone weights, preprocessing, precision),
    holding shards of ``(image SHA-256, features)`` written atomically; a run adds one shard
    with the images it embedded. Plain ``.npz`` arrays, never pickles."""

    def __init__(self, root: str | Path, key: str) -> None:
        self.directory = Path(root) / key

    @staticmethod
    def key(digest: str, preprocessing: Preprocessing, dtype: torch.dtype | None = None) -> str:
        header = {
            "version": FEATURES_VERSION,
            "weights": digest,
            "preprocessing": preprocessing.to_dict(),
            "dtype": str(dtype or torch.float32),
        }
        return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:24]

    def load(self) -> dict[str, np.ndarray]:
        """Every cached image's features by SHA-256."""
        found: dict[str, np.ndarray] = {}
        for shard in sorted(self.directory.glob(f"{SHARD_PREFIX}*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as data:
                    found.update(zip(data["sha256"].tolist(), data["features"], strict=True))
            except (OSError, ValueError, KeyError):  # a damaged shard: embed those again
                continue
        return found

    def add(self, digests: Sequence[str], features: np.ndarray) -> None:
        if not len(digests):
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        shard = self.directory / f"{SHARD_PREFIX}{uuid.uuid4().hex[:12]}.npz"

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, sha256=np.array(digests), features=features.astype(np.float32))

        atomic_write(shard, write)


@dataclass
class Features:
    """Pooled features of the readable images of a sample list, with what it cost."""

    features: np.ndarray  # (n, D) float32
    labels: np.ndarray  # (n,) int64
    indices: list[int]  # into the samples
    cached: int  # images found in the cache
    embedded: int  # images run through the backbone in this call (all ranks)
    seconds: float  # embedding time (0 when everything was cached)
    unreadable: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float | None:
        return self.embedded / self.seconds if self.embedded and self.seconds else None


def cached_features(
    model: nn.Module,
    samples: Sequence[Sample],
    preprocessing: Preprocessing,
    cache_root: str | Path,
    device: torch.device,
    *,
    digest: str | None = None,
    batch_size: int = 32,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    desc: str = "embedding",
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[Any], list[Any]] | None = None,
) -> Features:
    """Features of ``samples``: from the cache, the rest embedded (shared out across
    ``world_size`` processes, each embedding every ``world_size``-th missing image and
    ``gather`` collecting them) and added to the cache by rank 0. ``digest``: the model's
    :func:`weights_digest`, if already known."""
    digest = digest or weights_digest(model)
    cache = FeatureCache(cache_root, FeatureCache.key(digest, preprocessing, amp_dtype))
    hashes = [file_sha256(s.path) if Path(s.path).is_file() else "" for s in samples]
    known = cache.load()
    missing = [i for i, h in enumerate(hashes) if h not in known]
    mine = missing[rank::world_size]
    started = time.perf_counter()
    feats, kept = embed(
        model,
        [samples[i] for i in mine],
        preprocessing,
        device,
        batch_size=batch_size,
        workers=workers,
        amp_dtype=amp_dtype,
        progress=progress,
        desc=desc,
    )
    seconds = time.perf_counter() - started
    parts = [([mine[j] for j in kept], feats)]
    if world_size > 1 and gather is not None:
        parts = gather(parts[0])
    new: dict[int, np.ndarray] = {}
    for indices, values in parts:
        new.update(zip(indices, values, strict=True))
    if rank == 0:
        cache.add([hashes[i] for i in new], np.stack(list(new.values())) if new else feats)
    rows, indices = [], []
    for i, h in enumerate(hashes):
        value = known.get(h) if i not in new else new[i]
        if value is not None:
            rows.append(value)
            indices.append(i)
    unreadable = [str(samples[i].path) for i in range(len(samples)) if i not in set(indices)]
    width = feats.shape[1] if feats.size else int(getattr(model, "num_features", 0))
    return Features(
        features=np.stack(rows).astype(np.float32) if rows else np.zeros((0, width), np.float32),
        labels=np.array([samples[i].label for i in indices], dtype=np.int64),
        indices=indices,
        cached=len(samples) - len(missing),
        embedded=len(new),
        seconds=seconds if missing else 0.0,
        unreadable=unreadable,
    )


@torch.no_grad()
def head_outputs(model: nn.Module, found: Features) -> Outputs:
    """What :func:`~mirage_demo.logits.file_outputs` gives, from pooled features already at hand
    (:func:`cached_features`, float32 for a report): the logits from the model's own linear
    head, the one part a probe fits."""
    head = model.get_classifier()
    weight = next(head.parameters())
    logits = head(torch.from_numpy(found.features).to(weight.device, weight.dtype))
    indices = np.asarray(found.indices, dtype=np.int64)
    return Outputs(logits.float().cpu().numpy(), found.labels, indices, found.features)


@torch.no_grad()
def bare_forward_speed(
    model: nn.Module,
    preprocessing: Preprocessing,
    device: torch.device,
    batch_size: int = 32,
    rounds: int = 2,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Images per second of the backbone alone on a synthetic batch (no decoding, no I/O):
    the baseline the embedding speed is measured against, in the same run."""
    height, width = preprocessing.input_size
    x = torch.rand(batch_size, preprocessing.in_chans, height, width, device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    model.eval()
    with autocast:
        pooled_features(model, x[:1])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(rounds):
            pooled_features(model, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return rounds * batch_size / (time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# The probe


@dataclass
class ProbeFit:
    """A fitted probe as a linear map of the raw pooled features: ``logits = X @ W.T + b``."""

    weight: np.ndarray  # (K, D)
    bias: np.ndarray  # (K,)
    c: float  # the regularisation strength chosen (scikit-learn's C)
    seconds: float  # fitting time, every C tried included
    scores: list[dict[str, float]] = field(default_factory=list)  # per C: val figures

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.weight.T + self.bias

    def summary(self) -> dict[str, Any]:
        return {"C": self.c, "fit_seconds": round(self.seconds, 3), "val_by_C": self.scores}


def _logistic(features: np.ndarray, labels: np.ndarray, c: float, num_classes: int, seed: int):
    """One class-balanced multinomial logistic regression, as ``(W, b)`` on ``features``."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    lr.fit(features, labels)
    coef, intercept = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # two classes: sklearn fits one logit; the head has two
        coef = np.concatenate([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros_like(intercept), intercept])
    return coef, intercept


def fit_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray | None,
    val_labels: np.ndarray | None,
    num_classes: int,
    cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
) -> ProbeFit:
    """Class-balanced multinomial logistic regression on standardised features; ``C`` is the
    one of ``cs`` with the best validation balanced accuracy (ties: lower validation NLL), or
    ``cs[0]`` without a validation split. The standardisation is folded into the returned
    weights, so they apply to the raw features."""
    started = time.perf_counter()
    train_labels = np.asarray(train_labels, np.int64)
    present = set(np.unique(train_labels).tolist())
    if present != set(range(num_classes)):
        absent = sorted(set(range(num_classes)) - present)
        raise DataError(f"a probe needs training images of every class; none of class {absent}")
    if not len(cs):
        raise ValueError("no regularisation strength C to try")
    mean = train_features.mean(0, dtype=np.float64)
    scale = train_features.std(0, dtype=np.float64)
    scale[scale < 1e-6] = 1.0
    x_train = (train_features - mean) / scale
    candidates: list[tuple[float, float, ProbeFit]] = []
    scores: list[dict[str, float]] = []
    for c in cs:
        coef, intercept = _logistic(x_train, train_labels, c, num_classes, seed)
        fit = ProbeFit(coef / scale, intercept - (coef / scale) @ mean, float(c), 0.0)
        if val_features is None or val_labels is None or not len(val_labels):
            candidates.append((0.0, 0.0, fit))
            break
        logits = fit.logits(val_features)
        score, loss = balanced_accuracy(val_labels, logits, num_classes), nll(logits, val_labels)
        scores.append({"C": float(c), "val_balanced_accuracy": score, "val_nll": loss})
        candidates.append((score, -loss, fit))
    best = max(candidates, key=lambda c: c[:2])[2]  # ties: the first, the strongest penalty
    best.scores = scores
    best.seconds = time.perf_counter() - started
    return best


def balanced_accuracy(labels: np.ndarray, logits: np.ndarray, num_classes: int) -> float:
    """Balanced accuracy of the most probable class (as :func:`~mirage_demo.metrics.compute_metrics`
    computes it)."""
    names = [str(k) for k in range(num_classes)]
    metrics = compute_metrics(labels, softmax(logits), names, n_bootstrap=0)
    return float(metrics["overall"]["balanced_accuracy"]["value"] or 0.0)


def apply_probe(model: nn.Module, fit: ProbeFit) -> nn.Module:
    """Write the probe into ``model``'s final linear classifier (in place; returns ``model``)."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"a probe needs a linear classifier; this model has {type(head).__name__}")
    if tuple(head.weight.shape) != fit.weight.shape:
        raise ValueError(
            f"the probe is {fit.weight.shape}, the model's classifier {tuple(head.weight.shape)}"
        )
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(fit.weight).to(head.weight))
        if head.bias is not None:
            head.bias.copy_(torch.from_numpy(fit.bias).to(head.bias))
    return model
