"""Where a model places scans: its penultimate features drawn in two dimensions.

:func:`compute_feature_map` embeds a :class:`~mirage_demo.testscans.ScanSet` (at most
:data:`MAX_MAP_SCANS`, :func:`capped`) with the model's pooled features
(:func:`mirage_demo.probe.embed_in_chunks`: what a probe is fitted on, with progress), then
projects them to 2-D by the projections asked for (:func:`project`: PCA here, t-SNE in a child
process, so that no native crash can end the app; features without spread are one point).
:func:`plot_feature_map` draws one projection (colour: the reference class; a cross: the
model's answer was wrong) and returns each point's pixel position in the picture, so a click
finds its scan (:func:`nearest_point`). :func:`cached_feature_map` keeps a few maps in memory.

A checkpoint may ship its map precomputed (``featuremap.json``, both projections of its test
scans, about 30 KB): :func:`load_precomputed` uses it only when its digest
(:func:`map_digest`: the weights file, the architecture and preprocessing, every scan's
name, labels and image bytes) matches, so a stale file is recomputed, never shown. Write it
(again after retraining or re-bundling the test scans) with::

    python -m mirage_demo.featuremap assets/demo-model assets/demo-vit
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mirage_demo.checkpoint import WEIGHTS_NAME, CheckpointError, load_checkpoint, read_config
from mirage_demo.data import Preprocessing, Sample
from mirage_demo.fileio import atomic_write_text
from mirage_demo.probe import FeatureCache, embed_in_chunks, file_sha256, weights_digest
from mirage_demo.testscans import ScanEntry, ScanSet, scan_set_for

__all__ = [
    "MAX_MAP_SCANS",
    "PRECOMPUTED_NAME",
    "PROJECTIONS",
    "FeatureMap",
    "FeatureMapError",
    "cached_feature_map",
    "capped",
    "compute_feature_map",
    "feature_map_key",
    "load_precomputed",
    "map_digest",
    "nearest_point",
    "peek_feature_map",
    "plot_feature_map",
    "project",
    "save_precomputed",
]

#: Projection name -> what it is, for people.
PROJECTIONS = {
    "t-SNE": "t-SNE: neighbours stay neighbours; distances between clusters mean little",
    "PCA": "PCA: the two directions along which the features vary most; distances are linear",
}
MIN_TSNE_POINTS = 6
MAX_MAP_SCANS = 1000  # scans one map embeds (more are sampled): minutes on a CPU, not hours
CACHE_SIZE = 8  # feature maps kept in memory (features and coordinates: a few MB each)
PROJECTION_TIMEOUT_S = 600  # a t-SNE of 1,000 points takes well under a minute
SAME_PLACE = 1e-9  # features spread less than this (relative to their size) are one point
PRECOMPUTED_NAME = "featuremap.json"
PRECOMPUTED_FORMAT = "mirage-demo-featuremap"
MAX_PRECOMPUTED_BYTES = 2_000_000  # 1,000 scans' names and two projections: about 80 KB
# Colour-blind-safe colours (Okabe-Ito), one per class; the wrong answers get a cross
CLASS_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")
TSNE_SCRIPT = Path(__file__).with_name("tsne.py")


class FeatureMapError(RuntimeError):
    """A map that cannot be drawn; the message says why, in one line."""


# --------------------------------------------------------------------------------------------
# Projections


def project(features: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """``(n, 2)`` coordinates of ``features`` by ``"PCA"`` (here) or ``"t-SNE"`` (in a child
    process, :mod:`mirage_demo.tsne`; its crash is a :class:`FeatureMapError`). Features that
    do not vary (copies of one scan, blank images) all lie at the origin."""
    if method not in PROJECTIONS:
        raise ValueError(f"unknown projection {method!r}: choose one of {', '.join(PROJECTIONS)}")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be an (n, d) array, not {x.shape}")
    if not np.isfinite(x).all():
        raise FeatureMapError("the model gave features that are not finite numbers")
    scale = 1.0 + float(np.abs(x).max(initial=0.0))
    x = x - x.mean(axis=0)
    if len(x) < 2 or float(np.abs(x).max()) <= SAME_PLACE * scale:
        return np.zeros((len(x), 2))
    if method == "PCA":
        from sklearn.decomposition import PCA
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):  # OpenMP threads spinning on a busy machine: 5x slower
            coords = PCA(n_components=min(2, *x.shape), random_state=seed).fit_transform(x)
        return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    if len(x) < MIN_TSNE_POINTS:
        raise ValueError(f"t-SNE needs at least {MIN_TSNE_POINTS} scans, not {len(x)}")
    return _tsne_in_child(x, seed)


def _tsne_in_child(x: np.ndarray, seed: int) -> np.ndarray:
    buffer = io.BytesIO()
    np.save(buffer, x, allow_pickle=False)
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        done = subprocess.run(
            [sys.executable, str(TSNE_SCRIPT), str(seed)],
            input=buffer.getvalue(),
            capture_output=True,
            timeout=PROJECTION_TIMEOUT_S,
            env={**os.environ, **threads},
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise FeatureMapError("placing the scans by t-SNE took too long: choose PCA") from err
    if done.returncode != 0:
        how = "crashed" if done.returncode < 0 else "failed"
        raise FeatureMapError(f"placing the scans by t-SNE {how}: choose PCA")
    try:
        coords = np.load(io.BytesIO(done.stdout), allow_pickle=False)
    except ValueError as err:
        raise FeatureMapError("placing the scans by t-SNE failed: choose PCA") from err
    if coords.shape != (len(x), 2) or not np.isfinite(coords).all():
        raise FeatureMapError("placing the scans by t-SNE failed: choose PCA")
    return coords


# --------------------------------------------------------------------------------------------
# A map: the scans, their features, each projection computed so far


@dataclass
class FeatureMap:
    """Scans placed by a model's features: one row of ``coords[method]`` per entry.
    ``features`` (kept when computed here, ``None`` when loaded precomputed) let another
    projection be added later (:meth:`ensure`)."""

    class_names: list[str]
    entries: list[ScanEntry]
    coords: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)  # embedding, each projection
    features: np.ndarray | None = None
    precomputed: bool = False

    @property
    def wrong(self) -> np.ndarray:
        return np.array([not e.correct for e in self.entries], dtype=bool)

    def ensure(self, method: str) -> None:
        """Compute the projection ``method`` if it is missing (and features are kept)."""
        if method in self.coords:
            return
        if self.features is None:
            raise FeatureMapError(f"this map holds no {method} projection")
        if method == "t-SNE" and len(self.entries) < MIN_TSNE_POINTS:
            raise FeatureMapError(f"t-SNE needs at least {MIN_TSNE_POINTS} readable scans")
        start = time.perf_counter()
        self.coords[method] = project(self.features, method)
        self.seconds[method] = time.perf_counter() - start


def capped(scans: ScanSet, limit: int = MAX_MAP_SCANS) -> tuple[ScanSet, int]:
    """``scans`` with at most ``limit`` entries (the same random sample every time) and how
    many there were."""
    total = len(scans.entries)
    if total <= limit:
        return scans, total
    chosen = np.sort(np.random.default_rng(0).choice(total, limit, replace=False))
    entries = [scans.entries[i] for i in chosen]
    return ScanSet(list(scans.class_names), entries, scans.origin), total


def compute_feature_map(
    model: nn.Module,
    preprocessing: Preprocessing,
    scans: ScanSet,
    device: torch.device,
    methods: Sequence[str] = tuple(PROJECTIONS),
    on_progress: Callable[[int, int], None] | None = None,
) -> FeatureMap:
    """Embed ``scans`` (unreadable images left out; ``on_progress(done, total)`` as it goes)
    and project them by ``methods`` (t-SNE left out below :data:`MIN_TSNE_POINTS`)."""
    if len(scans.entries) > MAX_MAP_SCANS:
        raise ValueError(f"a map embeds at most {MAX_MAP_SCANS} scans: cap them first")
    index = {name: i for i, name in enumerate(scans.class_names)}
    samples = [Sample(e.image, index[e.true], e.file) for e in scans.entries]
    start = time.perf_counter()
    features, kept = embed_in_chunks(model, samples, preprocessing, device, on_progress)
    entries = [scans.entries[i] for i in kept]
    fmap = FeatureMap(list(scans.class_names), entries, {}, features=features)
    fmap.seconds["embedding"] = time.perf_counter() - start
    for method in methods:
        if method != "t-SNE" or len(kept) >= MIN_TSNE_POINTS:
            fmap.ensure(method)
    return fmap


# --------------------------------------------------------------------------------------------
# Drawing


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
# One map per model and scan set: in memory, or precomputed beside the checkpoint


def feature_map_key(model: nn.Module, preprocessing: Preprocessing, scans: ScanSet) -> str:
    """What a feature map depends on, for a model without a weights file (an adapted model):
    the backbone's weights and preprocessing (as the probe's feature cache keys them) and the
    scans with their labels and predictions."""
    rows = [(e.file, str(e.image), e.true, e.predicted) for e in scans.entries]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:24]
    return f"{FeatureCache.key(weights_digest(model), preprocessing)}-{digest}"


_digests: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """SHA-256 of a file, remembered while its size and modification time stay the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        _digests[key] = file_sha256(path)
    return _digests[key]


def map_digest(directory: str | Path, scans: ScanSet) -> str | None:
    """What a checkpoint's map depends on: its weights file, architecture, model arguments and
    preprocessing, and every scan's name, labels and image bytes. ``None`` when the
    checkpoint has no weights file or a scan's image cannot be read."""
    directory = Path(directory)
    try:
        config = read_config(directory).to_dict()
        header = {
            "weights": _file_digest(directory / WEIGHTS_NAME),
            **{k: config.get(k) for k in ("architecture", "model_kwargs", "preprocessing")},
            "scans": [(e.file, e.true, e.predicted, _file_digest(e.image)) for e in scans.entries],
        }
    except (CheckpointError, OSError):
        return None
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def save_precomputed(directory: str | Path, fmap: FeatureMap, digest: str) -> Path:
    """Write ``fmap``'s projections (every one in :data:`PROJECTIONS`) as ``featuremap.json``."""
    missing = [m for m in PROJECTIONS if m not in fmap.coords]
    if missing:
        raise FeatureMapError(f"the map lacks the {', '.join(missing)} projection")
    data = {
        "format": PRECOMPUTED_FORMAT,
        "digest": digest,
        "files": [e.file for e in fmap.entries],
        "coords": {m: np.round(fmap.coords[m], 3).tolist() for m in PROJECTIONS},
        "seconds": {k: round(v, 1) for k, v in fmap.seconds.items()},
    }
    path = Path(directory) / PRECOMPUTED_NAME
    atomic_write_text(path, json.dumps(data, separators=(",", ":")) + "\n")
    return path


def load_precomputed(directory: str | Path, scans: ScanSet) -> FeatureMap | None:
    """The map shipped beside a checkpoint, when it was computed from this very checkpoint
    and these scans (:func:`map_digest`); else ``None`` (missing, stale, malformed)."""
    path = Path(directory) / PRECOMPUTED_NAME
    try:
        if not path.is_file() or path.stat().st_size > MAX_PRECOMPUTED_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != PRECOMPUTED_FORMAT:
        return None
    if data.get("digest") != map_digest(directory, scans):
        return None
    by_file = {e.file: e for e in scans.entries}
    files = data.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and f in by_file for f in files):
        return None
    coords = {}
    for method in PROJECTIONS:
        try:
            values = np.asarray(data["coords"][method], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            return None
        if values.shape != (len(files), 2) or not np.isfinite(values).all():
            return None
        coords[method] = values
    entries = [by_file[f] for f in files]
    return FeatureMap(list(scans.class_names), entries, coords, precomputed=True)


_cache: OrderedDict[str, FeatureMap] = OrderedDict()
_cache_lock = threading.Lock()


def peek_feature_map(key: str) -> FeatureMap | None:
    """The map kept under ``key``, if any (nothing is computed)."""
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    return None


def cached_feature_map(key: str, compute: Callable[[], FeatureMap]) -> FeatureMap:
    """The feature map stored under ``key``, computed by ``compute()`` on first use (the
    :data:`CACHE_SIZE` most recent maps are kept)."""
    found = peek_feature_map(key)
    if found is not None:
        return found
    fmap = compute()
    with _cache_lock:
        _cache[key] = fmap
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return fmap


# --------------------------------------------------------------------------------------------
# The precomputed maps of the bundled models


def precompute(directory: str | Path, device: str = "cpu") -> dict[str, Any]:
    """Compute a checkpoint's map of its test scans (both projections) and write it beside
    the checkpoint: ``{"path", "scans", "bytes", "seconds"}``."""
    directory = Path(directory)
    found, why = scan_set_for(directory)
    if found is None:
        raise FeatureMapError(f"{directory}: {why}")
    scans, _ = capped(found)
    digest = map_digest(directory, scans)
    if digest is None:
        raise FeatureMapError(f"{directory}: no weights file, or a test scan cannot be read")
    model, config = load_checkpoint(directory, device)
    fmap = compute_feature_map(model, config.preprocessing, scans, torch.device(device))
    path = save_precomputed(directory, fmap, digest)
    return {
        "path": path,
        "scans": len(fmap.entries),
        "bytes": path.stat().st_size,
        "seconds": fmap.seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mirage_demo.featuremap",
        description="Precompute checkpoints' feature maps of their test scans (featuremap.json "
        "beside each), so that the app opens them at once.",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT_DIR")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    for directory in args.checkpoints:
        try:
            result = precompute(directory, args.device)
        except (CheckpointError, FeatureMapError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        cost = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
        print(f"{result['path']}: {result['scans']} scans, {result['bytes']:,} bytes ({cost})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
