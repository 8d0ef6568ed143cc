"""How far to trust a heat map: every method side by side, each with two checks.

:func:`compare_methods` explains one scan with every method the model supports and scores each
map twice:

**Faithfulness (a deletion test).** The ``fraction`` of the model input that the map ranks
highest is *deleted* and the model is asked again; so are ``random_masks`` random parts of the
same area. The score is how much more the explained class's probability drops for the map's
part than for a random part (in probability points; > 0: the map points at pixels the model
uses). Variant and why:

- *Deletion = replacement by a heavily blurred copy of the scan* (Gaussian, sigma a quarter
  of the input side: about the local mean brightness; the "blur" baseline of RISE's deletion
  metric, Petsiuk et al. 2018). A black or constant fill paints a sharp, unnatural hole whose
  *shape* the model can react to; the blur keeps the local brightness, so what is removed is
  the detail (layers, fluid, drusen), not light. A lighter blur (sigma 1/16) left a synthetic
  lesion visible enough that deleting it did not change the answer.
  ROAD's noisy linear imputation (Rong et al. 2022, in pytorch-grad-cam) removes the shape cue
  more thoroughly but solves a sparse linear system per mask: too slow for an interactive grid
  of up to seven maps plus the random references.
- *One fraction* (10 % by default: lesions are small), not a whole deletion curve: one batched
  forward pass for all maps and references keeps the grid well under two seconds on a CPU.
- *Random parts are blobs, not scattered pixels*: thresholded smooth random noise, so they are
  as contiguous as a heat map's hot region; removing scattered pixels barely changes a blurred
  scan and would flatter every map. The same random parts serve every method.

**Sanity check (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018).** The model's
last block (a ViT's last transformer block, a CNN's last residual block) and its classifier are
re-drawn at random (each tensor from a normal with the tensor's own mean and standard
deviation, seeded), the same map is computed on that model, and its Spearman rank correlation
with the original map is reported. A method whose map barely changes (correlation near 1) shows
the scan's edges rather than what the model learnt; the gradient-based CAMs should change.

The maps come from :class:`~mirage_demo.explain.Explainer`'s one-pass traces: one forward for all
CAMs (and one for the attention maps of a ViT) on the trained model, the same on the randomised
copy, and one batched forward for the deletions. Test-time augmentation is not used here.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

from mirage_demo.explain import (
    ATTENTION_METHODS,
    CLASS_AGNOSTIC_METHODS,
    Explainer,
    Trace,
    is_vit,
    render_overlay,
)
from mirage_demo.images import ImageSource
from mirage_demo.inference import Prediction, Predictor

__all__ = [
    "Comparison",
    "MethodScore",
    "compare_methods",
    "deletion_scores",
    "randomized_explainer",
    "rank_similarity",
]

SIMILARITY_GRID = 56  # maps are compared on this grid (they are smooth upsamplings anyway)


@dataclass
class MethodScore:
    """One method's map of one scan, with its faithfulness and sanity-check scores."""

    method: str
    class_specific: bool
    heatmap: np.ndarray  # (H, W) in [0, 1] at the scan's size
    overlay: Image.Image
    faithfulness: float  # drop for the map's part minus mean drop for random parts
    drop: float  # probability of the explained class: before minus after deleting the part
    random_drop: float  # the same, mean over the random parts
    randomized_heatmap: np.ndarray  # the map on the model with its last block randomised
    randomized_overlay: Image.Image
    similarity: float  # Spearman rank correlation of the two maps (1: unchanged)


@dataclass
class Comparison:
    """Every method's map of one scan, scored (see the module docstring)."""

    prediction: Prediction
    target: str
    target_index: int
    fraction: float
    scores: list[MethodScore]
    image: np.ndarray  # the scan the overlays are drawn on, (H, W) in [0, 1]
    timing: dict[str, float] = field(default_factory=dict)

    def score(self, method: str) -> MethodScore:
        for entry in self.scores:
            if entry.method == method:
                return entry
        raise KeyError(method)


def compare_methods(
    predictor: Predictor,
    image: ImageSource,
    target: int | str | None = None,
    *,
    name: str | None = None,
    fraction: float = 0.1,
    random_masks: int = 4,
    seed: int = 0,
    opacity: float | None = None,
) -> Comparison:
    """Explain ``image`` with every method of ``predictor`` and score each map.

    ``target`` (class name or index; default: the predicted class) is the class explained and
    whose probability the deletion test follows.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    timing: dict[str, float] = {}
    loaded = predictor._load(image, name)
    timing["load_s"] = loaded.seconds
    with _timed(timing, "maps_s"):
        maps = _explained(predictor, loaded, target)
    with _timed(timing, "deletion_s"):
        drops, random_drop = _deletions(predictor, loaded, maps, fraction, random_masks, seed)
    with _timed(timing, "sanity_s"):
        randomized = _randomized_maps(predictor, maps, seed)
    with _timed(timing, "render_s"):
        alpha = predictor.opacity if opacity is None else opacity
        scores = [
            _score(predictor, loaded.display, maps, randomized, drops, random_drop, m, alpha)
            for m in maps.methods
        ]
    timing["total_s"] = sum(timing.values())
    return Comparison(
        prediction=maps.prediction,
        target=predictor.class_names[maps.target],
        target_index=maps.target,
        fraction=fraction,
        scores=scores,
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


def _deletions(
    predictor: Predictor,
    loaded: Any,
    maps: _Maps,
    fraction: float,
    random_masks: int,
    seed: int,
) -> tuple[dict[str, float], float]:
    """Each map's probability drop, and the mean drop for the random parts."""
    random_maps = smooth_random_maps(random_masks, maps.sizes[1], seed)
    parts = [maps.at_input[m] for m in maps.methods] + list(random_maps)
    drops = deletion_scores(predictor, loaded.tensor, parts, maps.target, fraction)
    drop_of = dict(zip(maps.methods, drops[: len(maps.methods)], strict=True))
    random_drop = float(np.mean(drops[len(maps.methods) :])) if random_masks else 0.0
    return drop_of, random_drop


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
    drops: dict[str, float],
    random_drop: float,
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
        faithfulness=drops[method] - random_drop,
        drop=drops[method],
        random_drop=random_drop,
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
    for method in explainer.methods:
        trace = replace(traces[_trace_key(method)], method=method)
        shown[method] = explainer.heatmaps(trace, [target], [0], display_size)[0]
        at_input[method] = _resize(shown[method], input_size, "area")
    return shown, at_input


def _resize(maps: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """``(H, W)`` or ``(N, H, W)`` float maps resized to ``size`` (``area`` or ``bicubic``)."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    batch = tensor.reshape(-1, 1, *tensor.shape[-2:])
    resized = F.interpolate(batch, size=tuple(size), mode=mode)
    return resized.reshape(*maps.shape[:-2], *size).numpy()


def _trace_key(method: str) -> str:
    """Which trace serves ``method``: the CAM trace keeps the target layer's activations and
    the tail's graph (every CAM); the rollout trace keeps every block's attention."""
    return "rollout" if method in ATTENTION_METHODS else "gradcam"


def _traces(explainer: Explainer, x: torch.Tensor, methods: list[str]) -> dict[str, Trace]:
    keys = {_trace_key(m) for m in methods}
    return {key: explainer.trace(x, key) for key in sorted(keys)}


# --------------------------------------------------------------------------------------------
# Faithfulness


def smooth_random_maps(count: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """``count`` random maps ``(count, H, W)`` whose top part forms blobs: uniform noise on an
    8x8 grid, upsampled bicubically (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    height, width = size
    coarse = rng.random((count, 8, 8)).astype(np.float32)
    return _resize(coarse, (height, width), "bicubic")


def top_mask(heatmap: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the ``fraction`` of pixels the map ranks highest (ties: first in
    raster order), always exactly ``round(fraction * pixels)`` of them."""
    flat = heatmap.reshape(-1)
    count = round(fraction * flat.size)
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="stable")[:count]] = True
    return mask.reshape(heatmap.shape)


def _heavy_blur(image: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """A ``(1, H, W)`` image blurred with a Gaussian of sigma a quarter of its longer side:
    averaged down ``factor`` times, blurred there, then back up (bilinear), so the cost does
    not grow with sigma."""
    height, width = image.shape[-2:]
    small = F.interpolate(
        image[None].float(), size=(max(1, height // factor), max(1, width // factor)), mode="area"
    )
    sigma = max(height, width) / 4 / factor
    small = torch.from_numpy(ndimage.gaussian_filter(small[0, 0].numpy(), sigma, mode="nearest"))
    return F.interpolate(small[None, None], size=(height, width), mode="bilinear")[0]


def deletion_scores(
    predictor: Predictor,
    image: torch.Tensor,
    maps: list[np.ndarray],
    target: int,
    fraction: float = 0.1,
) -> list[float]:
    """For each map (at the model input's size): the explained class's probability on the
    ``(1, H, W)`` [0, 1] input minus the probability once the map's top ``fraction`` is
    replaced by a blurred copy of the input. One batched forward pass."""
    blurred = _heavy_blur(image)
    masks = torch.from_numpy(np.stack([top_mask(m, fraction) for m in maps]))[:, None]
    deleted = torch.where(masks, blurred[None], image[None])
    batch = torch.cat([image[None], deleted])
    logits, _ = predictor._outputs(batch)
    probs = predictor.probabilities(logits)[:, target]
    return (probs[0] - probs[1:]).tolist()


# --------------------------------------------------------------------------------------------
# Sanity check


_RANDOMIZED: weakref.WeakKeyDictionary[Predictor, dict[int, Explainer]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


def last_block(model: nn.Module) -> nn.Module:
    """A ViT's last transformer block; a CNN's last block of its last stage."""
    if is_vit(model):
        return model.blocks[-1]
    from mirage_demo.explain import default_target_layer

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
    target_layer = clone.get_submodule(names[predictor.explainer.target_layer])
    return Explainer(clone, target_layer, predictor.explainer.reshape_transform)


def rank_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps on a :data:`SIMILARITY_GRID` grid (area
    averaging); a flat map is 1 against the same flat map, else 0."""
    grid = (SIMILARITY_GRID, SIMILARITY_GRID)
    small_a = _resize(a, grid, "area").ravel()
    small_b = _resize(b, grid, "area").ravel()
    if np.ptp(small_a) == 0 or np.ptp(small_b) == 0:  # a flat map: no ranking to compare
        return 1.0 if np.allclose(small_a, small_b) else 0.0
    return float(spearmanr(small_a, small_b).statistic)
