"""How far to trust a heat map: every method side by side, each with two checks.

:func:`compare_methods` explains one scan with every method the model supports and scores each
map twice:

**Faithfulness** (:mod:`mirage_demo.faithfulness`): a symmetric deletion test on the explained
class's log-odds. For several fractions of the scan, the part the map ranks highest and the
part it ranks lowest are each replaced by a blurred copy; the score is the mean of
``(log-odds without the least relevant part - log-odds without the most relevant part) / 2``,
in nats (ROAD's combined score). A random map's test (:attr:`Comparison.random_reference`)
gives the chance level, about 0. Two methods whose maps rank the pixels alike (Spearman
correlation >= :data:`SAME_MAP_RHO`) are one map: it is tested once and the second method says
which it equals (:attr:`MethodScore.same_as`). On a CNN whose last block is followed by global
average pooling, Grad-CAM and HiResCAM always coincide: the gradient of a class score is then
the same at every position of the block's output, so weighting the activations by the mean
gradient (Grad-CAM) or by the gradient at each position (HiResCAM) gives one map.

**Sanity check** (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018). The model's
last block (a ViT's last transformer block, a CNN's last residual block) and its classifier are
re-drawn at random (each tensor from a normal with the tensor's own mean and standard
deviation, seeded), the same map is computed on that model, and its Spearman rank correlation
with the original map is reported. A map that barely changes (correlation near 1) is drawn
from the scan's structure rather than from what the model learnt.

The two checks answer different questions: faithfulness, whether the pixels a map highlights
matter to the model's answer on this scan; the sanity check, whether the map is drawn from
what the model learnt. A map can pass one and not the other (a map of the scan's structure can
happen to cover what the model uses).

The maps come from :class:`~mirage_demo.explain.Explainer`'s one-pass traces: one forward for all
CAMs (and one for the attention maps of a ViT) on the trained model, the same on the randomised
copy, and batched forwards for the deletions. Test-time augmentation is not used here.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

from mirage_demo.explain import (
    ATTENTION_METHODS,
    CLASS_AGNOSTIC_METHODS,
    EARLY_METHOD,
    Explainer,
    Trace,
    default_target_layer,
    is_vit,
    render_overlay,
)
from mirage_demo.faithfulness import (
    FRACTIONS,
    Forward,
    RoadScore,
    road_scores,
    smooth_random_maps,
)
from mirage_demo.images import ImageSource
from mirage_demo.inference import Prediction, Predictor
from mirage_demo.models import cpu_computes_bf16

__all__ = [
    "SAME_MAP_RHO",
    "Comparison",
    "MethodScore",
    "channels_last_copy",
    "compare_methods",
    "model_forward",
    "randomized_explainer",
    "rank_similarity",
    "same_map_reason",
    "same_maps",
]

SIMILARITY_GRID = 56  # maps are compared on this grid (they are smooth upsamplings anyway)
#: Two methods whose maps' rank correlation reaches this are one map (tested once).
SAME_MAP_RHO = 0.999
#: Copies of the scan per forward pass of the deletion test (the scan itself, then the ResNet-18's
#: 5 distinct maps and the random one at 3 fractions, both sides: 37 copies, three passes).
DELETION_BATCH = 16
_LOCK = threading.Lock()  # guards the per-predictor copies (channels-last, randomised)


@dataclass
class MethodScore:
    """One method's map of one scan, with its faithfulness and sanity-check scores."""

    method: str
    class_specific: bool
    heatmap: np.ndarray  # (H, W) in [0, 1] at the scan's size
    overlay: Image.Image
    road: RoadScore  # the deletion test (nats of the explained class's log-odds)
    same_as: str | None  # an earlier method whose map this one is (its test is shared)
    randomized_heatmap: np.ndarray  # the map on the model with its last block randomised
    randomized_overlay: Image.Image
    similarity: float  # Spearman rank correlation of the two maps (1: unchanged)

    @property
    def faithfulness(self) -> float:
        """``(LeRF - MoRF) / 2`` in nats: > 0 when removing what the map highlights costs
        the explained class more than removing what it ignores."""
        return self.road.faithfulness


@dataclass
class Comparison:
    """Every method's map of one scan, scored (see the module docstring)."""

    prediction: Prediction
    target: str
    target_index: int
    fractions: tuple[float, ...]
    scores: list[MethodScore]
    random_reference: RoadScore  # a random smooth map's deletion test: the chance level
    image: np.ndarray  # the scan the overlays are drawn on, (H, W) in [0, 1]
    timing: dict[str, float] = field(default_factory=dict)

    def score(self, method: str) -> MethodScore:
        for entry in self.scores:
            if entry.method == method:
                return entry
        raise KeyError(method)

    def distinct(self) -> list[MethodScore]:
        """The scores of the distinct maps (those that are not another method's map)."""
        return [entry for entry in self.scores if entry.same_as is None]

    def record(self) -> dict[str, Any]:
        """The numbers as JSON (``/compare_json``): per method ``method``, ``faithfulness``,
        ``morf``, ``lerf`` (nats), ``sanity_rho``, ``same_as``; the ``random_reference``."""

        def nats(road: RoadScore) -> dict[str, float]:
            return {
                "faithfulness": round(road.faithfulness, 4),
                "morf": round(road.morf, 4),
                "lerf": round(road.lerf, 4),
            }

        return {
            "label": self.prediction.label,
            "target": self.target,
            "units": "nats of the target's log-odds",
            "fractions": list(self.fractions),
            "methods": [
                {
                    "method": entry.method,
                    **nats(entry.road),
                    "sanity_rho": round(entry.similarity, 4),
                    "same_as": entry.same_as,
                }
                for entry in self.scores
            ],
            "random_reference": nats(self.random_reference),
            "seconds": round(self.timing.get("total_s", 0.0), 3),
        }


def compare_methods(
    predictor: Predictor,
    image: ImageSource,
    target: int | str | None = None,
    *,
    name: str | None = None,
    fractions: Sequence[float] = FRACTIONS,
    seed: int = 0,
    opacity: float | None = None,
) -> Comparison:
    """Explain ``image`` with every method of ``predictor`` and score each map.

    ``target`` (class name or index; default: the predicted class) is the class explained and
    whose log-odds the deletion test follows; ``fractions`` the parts of the scan removed;
    ``seed`` draws the random map and the order of equal pixels.
    """
    fractions = tuple(float(f) for f in fractions)
    if not fractions or not all(0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"fractions must be in (0, 1), got {list(fractions)}")
    timing: dict[str, float] = {}
    loaded = predictor._load(image, name)
    timing["load_s"] = loaded.seconds
    with _timed(timing, "maps_s"):
        maps = _explained(predictor, loaded, target)
        same_as = same_maps(maps.methods, maps.at_input)
    with _timed(timing, "deletion_s"):
        roads, reference = _deletions(predictor, loaded.tensor, maps, same_as, fractions, seed)
    with _timed(timing, "sanity_s"):
        randomized = _randomized_maps(predictor, maps, seed)
    with _timed(timing, "render_s"):
        alpha = predictor.opacity if opacity is None else opacity
        scores = [
            _score(predictor, loaded.display, maps, randomized, roads, same_as, m, alpha)
            for m in maps.methods
        ]
    timing["total_s"] = sum(timing.values())
    return Comparison(
        prediction=maps.prediction,
        target=predictor.class_names[maps.target],
        target_index=maps.target,
        fractions=fractions,
        scores=scores,
        random_reference=reference,
        image=loaded.display,
        timing=timing,
    )


@contextlib.contextmanager
def _timed(timing: dict[str, float], key: str) -> Iterator[None]:
    began = time.perf_counter()
    yield
    timing[key] = time.perf_counter() - began


@dataclass
class _Maps:
    """Every method's map of one scan for one class, at the scan's and the input's size."""

    prediction: Prediction
    target: int
    methods: list[str]
    x: torch.Tensor  # the model input (1, C, H, W)
    shown: dict[str, np.ndarray]
    at_input: dict[str, np.ndarray]

    @property
    def sizes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(the scan's size, the model input's size)."""
        first = next(iter(self.shown.values()))
        return first.shape, tuple(self.x.shape[-2:])


def _explained(predictor: Predictor, loaded: Any, target: int | str | None) -> _Maps:
    """The prediction and every method's map, from one trace per family of methods."""
    x = predictor.preprocessing.normalize(loaded.tensor[None])
    explainer = predictor.explainer
    methods = list(explainer.methods)
    traces = _traces(explainer, x, methods)
    trace = next(iter(traces.values()))
    logits, features = trace.logits.float().cpu()[0], trace.features.float().cpu()[0]
    prediction = predictor._prediction(logits, features, loaded, {}, predictor.level)
    index = prediction.index if target is None else predictor.class_index(target)
    input_size = tuple(x.shape[-2:])
    shown, at_input = _maps(explainer, traces, index, loaded.display.shape, input_size)
    return _Maps(prediction, index, methods, x, shown, at_input)


def same_maps(methods: Sequence[str], maps: dict[str, np.ndarray]) -> dict[str, str | None]:
    """For each method, the first earlier method whose map ranks the pixels alike
    (:func:`rank_similarity` >= :data:`SAME_MAP_RHO`), else None."""
    same: dict[str, str | None] = {}
    for index, method in enumerate(methods):
        earlier = (m for m in methods[:index] if same[m] is None)
        same[method] = next(
            (m for m in earlier if rank_similarity(maps[m], maps[method]) >= SAME_MAP_RHO), None
        )
    return same


def same_map_reason(first: str, second: str, *, vit: bool) -> str:
    """Why two methods draw the same map (a sentence; empty when there is no general reason)."""
    if {first, second} == {"gradcam", "hirescam"} and not vit:
        return (
            "On a CNN whose last block is followed by global average pooling, the gradient of "
            "a class score is the same at every position of that block's output, so weighting "
            "the activations by the mean gradient (Grad-CAM) or by the gradient at each "
            "position (HiResCAM) gives one map."
        )
    return ""


def model_forward(predictor: Predictor, *, fast: bool = False) -> Forward:
    """The predictor's model as a function of ``(B, 1, H, W)`` [0, 1] images: ``(B, K)``
    logits on the CPU (no test-time augmentation, no gradient). ``fast``, on a CPU: a CNN runs
    as a channels-last copy (:func:`channels_last_copy`; oneDNN's convolutions ~30% faster),
    and in bfloat16 where the CPU computes it natively
    (:func:`~mirage_demo.models.cpu_computes_bf16`; about twice as fast again)."""
    on_cpu = predictor.device.type == "cpu"
    bf16 = fast and on_cpu and cpu_computes_bf16()
    model = channels_last_copy(predictor) if fast and on_cpu else predictor.model

    def forward(images: torch.Tensor) -> torch.Tensor:
        x = predictor.preprocessing.normalize(images).to(predictor.device)
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return model(x).float().cpu()

    return forward


_CHANNELS_LAST: weakref.WeakKeyDictionary[Predictor, nn.Module] = weakref.WeakKeyDictionary()


def channels_last_copy(predictor: Predictor) -> nn.Module:
    """The predictor's CNN with its weights in channels-last memory order (a copy, made once
    per predictor; the served model stays as loaded); a ViT's own model (no convolutions past
    the patch embedding to speed up)."""
    if is_vit(predictor.model):
        return predictor.model
    with _LOCK:
        if predictor not in _CHANNELS_LAST:
            clone = copy.deepcopy(predictor.model).eval()
            _CHANNELS_LAST[predictor] = clone.to(memory_format=torch.channels_last)
        return _CHANNELS_LAST[predictor]


def _deletions(
    predictor: Predictor,
    image: torch.Tensor,
    maps: _Maps,
    same_as: dict[str, str | None],
    fractions: tuple[float, ...],
    seed: int,
) -> tuple[dict[str, RoadScore], RoadScore]:
    """Each distinct map's deletion test and a random map's, in batched forward passes. The
    random map is drawn from ``seed`` and the scan's pixels: the same for a scan, another for
    the next scan (one fixed map would favour the same parts of every scan)."""
    distinct = [m for m in maps.methods if same_as[m] is None]
    scan_seed = zlib.crc32(image.numpy().tobytes())
    random_map = smooth_random_maps(1, maps.sizes[1], (seed, scan_seed))[0]
    tested = [maps.at_input[m] for m in distinct] + [random_map]
    *roads, reference = road_scores(  # the unmodified scan scored too, in the same precision
        model_forward(predictor, fast=True),
        image,
        tested,
        maps.target,
        fractions=fractions,
        seed=seed,
        batch_size=DELETION_BATCH,
    )
    road_of = dict(zip(distinct, roads, strict=True))
    return {m: road_of[same_as[m] or m] for m in maps.methods}, reference


def _randomized_maps(predictor: Predictor, maps: _Maps, seed: int) -> _Maps:
    """The same maps on the model with its last block and classifier re-drawn."""
    randomized = randomized_explainer(predictor, seed)
    traces = _traces(randomized, maps.x, maps.methods)
    display_size, input_size = maps.sizes
    shown, at_input = _maps(randomized, traces, maps.target, display_size, input_size)
    return replace(maps, shown=shown, at_input=at_input)


def _score(
    predictor: Predictor,
    display: np.ndarray,
    maps: _Maps,
    randomized: _Maps,
    roads: dict[str, RoadScore],
    same_as: dict[str, str | None],
    method: str,
    alpha: float,
) -> MethodScore:
    def overlay(heatmap: np.ndarray) -> Image.Image:
        return render_overlay(display, heatmap, predictor.colormap, alpha)

    return MethodScore(
        method=method,
        class_specific=method not in CLASS_AGNOSTIC_METHODS,
        heatmap=maps.shown[method].astype(np.float32),
        overlay=overlay(maps.shown[method]),
        road=roads[method],
        same_as=same_as[method],
        randomized_heatmap=randomized.shown[method].astype(np.float32),
        randomized_overlay=overlay(randomized.shown[method]),
        similarity=rank_similarity(maps.at_input[method], randomized.at_input[method]),
    )


def _maps(
    explainer: Explainer,
    traces: dict[str, Trace],
    target: int,
    display_size: tuple[int, int],
    input_size: tuple[int, int],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every method's map from the traces: at the scan's size (shown, as
    :meth:`Predictor.explain` draws it) and at the model input's size (for the deletions)."""
    shown, at_input = {}, {}
    methods = explainer.methods
    for method in methods:
        trace = replace(traces[_trace_key(method, methods)], method=method)
        shown[method] = explainer.heatmaps(trace, [target], [0], display_size)[0]
        at_input[method] = _resize(shown[method], input_size, "area")
    return shown, at_input


def _resize(maps: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """``(H, W)`` or ``(N, H, W)`` float maps resized to ``size`` (``area`` or ``bicubic``)."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    batch = tensor.reshape(-1, 1, *tensor.shape[-2:])
    resized = F.interpolate(batch, size=tuple(size), mode=mode)
    return resized.reshape(*maps.shape[:-2], *size).numpy()


def _trace_key(method: str, methods: Sequence[str]) -> str:
    """Which trace serves ``method``: the CAM trace keeps the target layer's activations and
    the tail's graph (every CAM; with ``gradcam-early`` among ``methods``, the earlier stage's
    too, both gradients from one backward); the rollout trace keeps every block's attention."""
    if method in ATTENTION_METHODS:
        return "rollout"
    return EARLY_METHOD if EARLY_METHOD in methods else "gradcam"


def _traces(explainer: Explainer, x: torch.Tensor, methods: list[str]) -> dict[str, Trace]:
    keys = {_trace_key(m, methods) for m in methods}
    return {key: explainer.trace(x, key) for key in sorted(keys)}


# --------------------------------------------------------------------------------------------
# Sanity check


_RANDOMIZED: weakref.WeakKeyDictionary[Predictor, dict[int, Explainer]] = (
    weakref.WeakKeyDictionary()
)


def last_block(model: nn.Module) -> nn.Module:
    """A ViT's last transformer block; a CNN's last block of its last stage."""
    if is_vit(model):
        return model.blocks[-1]
    layer = default_target_layer(model)
    children = list(layer.children())
    return children[-1] if isinstance(layer, nn.Sequential) and children else layer


def randomized_explainer(predictor: Predictor, seed: int = 0) -> Explainer:
    """An :class:`Explainer` on a copy of the predictor's model whose last block and
    classifier are re-drawn at random (cached per predictor and seed)."""
    with _LOCK:
        cache = _RANDOMIZED.setdefault(predictor, {})
        if seed not in cache:
            cache[seed] = _build_randomized(predictor, seed)
        return cache[seed]


def _build_randomized(predictor: Predictor, seed: int) -> Explainer:
    model = predictor.model
    names = {module: name for name, module in model.named_modules()}
    clone = copy.deepcopy(model).eval()
    parts = [last_block(clone)]
    classifier = clone.get_classifier() if hasattr(clone, "get_classifier") else None
    if isinstance(classifier, nn.Module):
        parts.append(classifier)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in parts:
            for parameter in part.parameters():
                values = parameter.detach().float()
                mean = float(values.mean())
                std = float(values.std()) if values.numel() > 1 else abs(mean) or 0.02
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_((noise * std + mean).to(parameter.dtype))
    explainer = predictor.explainer
    target_layer = clone.get_submodule(names[explainer.target_layer])
    earlier = explainer.earlier_layer
    earlier_layer = None if earlier is None else clone.get_submodule(names[earlier])
    return Explainer(clone, target_layer, explainer.reshape_transform, earlier_layer)


def rank_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps on a :data:`SIMILARITY_GRID` grid (area
    averaging); a flat map is 1 against the same flat map, else 0."""
    grid = (SIMILARITY_GRID, SIMILARITY_GRID)
    small_a = _resize(a, grid, "area").ravel()
    small_b = _resize(b, grid, "area").ravel()
    if np.ptp(small_a) == 0 or np.ptp(small_b) == 0:  # a flat map: no ranking to compare
        return 1.0 if np.allclose(small_a, small_b) else 0.0
    return float(spearmanr(small_a, small_b).statistic)
