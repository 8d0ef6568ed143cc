"""Where a model places scans: its penultimate features drawn in two dimensions.

:func:`compute_feature_map` embeds a :class:`~mirage_demo.testscans.ScanSet` with the model's
pooled features (:func:`mirage_demo.probe.embed`: what a probe is fitted on), then projects them
to 2-D by PCA and by t-SNE (scikit-learn). :func:`plot_feature_map` draws one projection
(colour: the reference class; a cross: the model's answer was wrong) and returns each point's
pixel position in the picture, so a click on the picture finds its scan
(:func:`nearest_point`). :func:`cached_feature_map` computes a map once per model and scan set.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mirage_demo.data import Preprocessing, Sample
from mirage_demo.probe import FeatureCache, embed, weights_digest
from mirage_demo.testscans import ScanEntry, ScanSet

__all__ = [
    "PROJECTIONS",
    "FeatureMap",
    "cached_feature_map",
    "compute_feature_map",
    "feature_map_key",
    "nearest_point",
    "plot_feature_map",
    "project",
]

#: Projection name -> what it is, for people.
PROJECTIONS = {
    "t-SNE": "t-SNE: neighbours stay neighbours; distances between clusters mean little",
    "PCA": "PCA: the two directions along which the features vary most; distances are linear",
}
MIN_TSNE_POINTS = 6
CACHE_SIZE = 8  # feature maps kept in memory (a few hundred points each: kilobytes)
# Colour-blind-safe colours (Okabe-Ito), one per class; the wrong answers get a cross
CLASS_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")


def project(features: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """``(n, 2)`` coordinates of ``features`` by ``"PCA"`` or ``"t-SNE"`` (on the first 50
    principal components, perplexity at most 30), on one thread: OpenMP's threads spinning
    against a busy machine made t-SNE of 225 scans 5x slower on two."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _project(features, method, seed)


def _project(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0)
    if method == "PCA":
        if len(x) < 2:
            return np.zeros((len(x), 2))
        coords = PCA(n_components=min(2, *x.shape), random_state=seed).fit_transform(x)
        return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    if method != "t-SNE":
        raise ValueError(f"unknown projection {method!r}: choose one of {', '.join(PROJECTIONS)}")
    if len(x) < MIN_TSNE_POINTS:
        raise ValueError(f"t-SNE needs at least {MIN_TSNE_POINTS} scans, not {len(x)}")
    reduced = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (len(x) - 1) / 3))
    tsne = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(reduced)


@dataclass
class FeatureMap:
    """Scans placed by a model's features: one row of ``coords[method]`` per entry."""

    class_names: list[str]
    entries: list[ScanEntry]
    coords: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)  # embedding, each projection

    @property
    def wrong(self) -> np.ndarray:
        return np.array([not e.correct for e in self.entries], dtype=bool)


def compute_feature_map(
    model: nn.Module,
    preprocessing: Preprocessing,
    scans: ScanSet,
    device: torch.device,
) -> FeatureMap:
    """Embed ``scans`` (unreadable images left out) and project them by every method."""
    index = {name: i for i, name in enumerate(scans.class_names)}
    samples = [Sample(e.image, index[e.true], e.file) for e in scans.entries]
    start = time.perf_counter()
    features, kept = embed(model, samples, preprocessing, device, progress=False)
    seconds = {"embedding": time.perf_counter() - start}
    coords = {}
    for method in PROJECTIONS:
        if method == "t-SNE" and len(kept) < MIN_TSNE_POINTS:
            continue
        start = time.perf_counter()
        coords[method] = project(features, method)
        seconds[method] = time.perf_counter() - start
    entries = [scans.entries[i] for i in kept]
    return FeatureMap(list(scans.class_names), entries, coords, seconds)


def plot_feature_map(
    fmap: FeatureMap, method: str, path: str | Path, chosen: int | None = None, title: str = ""
) -> np.ndarray:
    """Draw ``fmap`` by ``method`` into the PNG ``path``; returns each point's ``(x, y)`` pixel
    in that picture (origin top left). ``chosen`` is ringed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    coords, wrong = fmap.coords[method], fmap.wrong
    labels = np.array([fmap.class_names.index(e.true) for e in fmap.entries])
    fig = Figure(figsize=(10.0, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.03, 0.64, 0.89))
    handles = []
    for k, name in enumerate(fmap.class_names):
        colour = CLASS_COLOURS[k % len(CLASS_COLOURS)]
        right, miss = (labels == k) & ~wrong, (labels == k) & wrong
        ax.scatter(*coords[right].T, s=60, color=colour, alpha=0.85, linewidths=0)
        ax.scatter(*coords[miss].T, s=110, color=colour, marker="X", edgecolors="black")
        label = f"{name}: {int((labels == k).sum())} ({int(miss.sum())} wrong)"
        handles.append(Line2D([], [], marker="o", ls="", color=colour, ms=11, label=label))
    handles.append(
        Line2D(
            [], [], marker="X", ls="", color="white", mec="black", ms=12, label="the model is wrong"
        )
    )
    if chosen is not None:
        ax.scatter(*coords[chosen], s=600, facecolors="none", edgecolors="black", linewidths=2.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{len(coords)} scans by the model's features ({method})", fontsize=15)
    fig.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(0.67, 0.5),
        fontsize=13,
        title="reference class",
        title_fontsize=13,
        frameon=False,
    )
    fig.canvas.draw()
    pixels = ax.transData.transform(coords)
    pixels[:, 1] = fig.bbox.height - pixels[:, 1]
    fig.savefig(path, dpi=fig.dpi)
    return pixels


def nearest_point(pixels: np.ndarray, x: float, y: float, radius: float = 15.0) -> int | None:
    """The index of the point drawn nearest to pixel ``(x, y)``, if within ``radius``."""
    if len(pixels) == 0:
        return None
    distances = np.hypot(pixels[:, 0] - x, pixels[:, 1] - y)
    best = int(distances.argmin())
    return best if distances[best] <= radius else None


# --------------------------------------------------------------------------------------------
# One map per model and scan set


def feature_map_key(model: nn.Module, preprocessing: Preprocessing, scans: ScanSet) -> str:
    """What a feature map depends on: the backbone's weights and preprocessing (as the probe's
    feature cache keys them) and the scans with their labels and predictions."""
    rows = [(e.file, str(e.image), e.true, e.predicted) for e in scans.entries]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:24]
    return f"{FeatureCache.key(weights_digest(model), preprocessing)}-{digest}"


_cache: OrderedDict[str, FeatureMap] = OrderedDict()
_cache_lock = threading.Lock()


def cached_feature_map(key: str, compute: Callable[[], FeatureMap]) -> FeatureMap:
    """The feature map stored under ``key``, computed by ``compute()`` on first use (the
    :data:`CACHE_SIZE` most recent maps are kept)."""
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    fmap = compute()
    with _cache_lock:
        _cache[key] = fmap
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return fmap
