"""Does a heat map point at what the model uses? A symmetric deletion test on the log-odds.

For each map and each fraction ``f`` of :data:`FRACTIONS`, two copies of the scan are scored:

- **MoRF** (most relevant first): the ``f`` of the pixels the map ranks *highest* replaced by a
  blurred copy of the scan;
- **LeRF** (least relevant first): the ``f`` it ranks *lowest* replaced the same way.

The score followed is the explained class's **log-odds**, ``z_c - logsumexp(z_others)`` on the
model's logits (in nats): a probability saturates near 1 on a confident model (a CNV scan at
0.999 barely moves when a tenth of it is blurred), the log-odds keep moving. A map's
**faithfulness** is the mean over the fractions of ``(LeRF - MoRF) / 2``: the form of ROAD's
combined score (Rong et al., "A consistent and efficient evaluation strategy for attribution
methods", ICML 2022; Blücher et al., "Decoupling pixel flipping and occlusion strategy for
consistent XAI benchmarks", TMLR 2024). Positive: removing what the map highlights lowers the
score more than removing what it ignores. A random map scores about 0 (its top and bottom parts
are two random parts of the same size): :func:`smooth_random_maps` gives the chance level.

Choices, and why:

- *The fill is a heavily blurred copy of the scan* (Gaussian, sigma a quarter of the longer
  side; RISE's blur baseline, Petsiuk et al. 2018): it keeps the local brightness and removes
  the detail (layers, fluid, drusen). A black fill paints a sharp hole whose *shape* the model
  reacts to; ROAD's noisy linear imputation removes that cue too but solves a sparse linear
  system per mask, too slow for an interactive grid. Because the test is symmetric (the same
  fill, the same area, on both sides), a cue the fill itself gives cancels out.
- *Exactly the fraction asked for is removed*: ``round(f * pixels)`` pixels, whatever the ties.
  CAMs hold many exact zeros (every position the ReLU cut), so a percentile threshold would
  remove far more than ``f`` from the bottom; equal values are ranked in a seeded random order
  (:func:`removal_order`), the same for every map of a call.
- *All copies go through the model in a few batched forward passes*.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

__all__ = [
    "BLUR_SIGMA",
    "FRACTIONS",
    "RoadScore",
    "blurred_copy",
    "log_odds",
    "removal_masks",
    "removal_order",
    "road_scores",
    "smooth_random_maps",
]

#: Fractions of the scan removed, from the most and from the least relevant end: three across
#: ROAD's usual range. Every fraction costs a forward pass per map and side, and the grid must
#: stay interactive on a 2-core CPU. On validation scans 2, 3, 4 or 8 fractions separated the
#: methods on the same scans; 3 widened the gap over 2 (docs/explanations.md).
FRACTIONS: tuple[float, ...] = (0.1, 0.5, 0.8)
#: The fill's Gaussian sigma, as a fraction of the input's longer side.
BLUR_SIGMA = 0.25

Forward = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) [0, 1] images -> (B, K) logits


@dataclass(frozen=True)
class RoadScore:
    """One map's symmetric deletion test, in nats of the explained class's log-odds."""

    morf: float  # mean change of the log-odds with the most relevant part removed
    lerf: float  # ... with the least relevant part removed
    morf_curve: tuple[float, ...]  # per fraction
    lerf_curve: tuple[float, ...]

    @property
    def faithfulness(self) -> float:
        """``(LeRF - MoRF) / 2``: > 0 when removing what the map highlights costs more."""
        return (self.lerf - self.morf) / 2


def log_odds(logits: torch.Tensor, target: int) -> torch.Tensor:
    """``z_c - logsumexp(z_others)`` for each row of ``(B, K)`` logits: the log-odds of class
    ``target`` under ``softmax(logits)`` (in nats)."""
    logits = logits.float()
    others = torch.cat([logits[:, :target], logits[:, target + 1 :]], dim=1)
    return logits[:, target] - torch.logsumexp(others, dim=1)


def removal_order(heatmap: np.ndarray, seed: int = 0) -> np.ndarray:
    """The map's flat pixel indices, most relevant first; equal values come in a random order
    drawn from ``seed`` (deterministic)."""
    flat = np.asarray(heatmap, dtype=np.float64).reshape(-1)
    tiebreak = np.random.default_rng(seed).permutation(flat.size)  # each pixel's place in a tie
    in_tie_order = np.empty_like(tiebreak)
    in_tie_order[tiebreak] = np.arange(flat.size)  # the pixels in that order
    # a stable sort of the values taken in that order: np.lexsort((tiebreak, -flat)), faster
    return in_tie_order[np.argsort(-flat[in_tie_order], kind="stable")]


def removal_masks(
    order: np.ndarray, shape: tuple[int, int], fractions: Sequence[float] = FRACTIONS
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks ``(len(fractions), H, W)``: the most relevant ``f`` of the pixels (MoRF)
    and the least relevant ``f`` (LeRF), each exactly ``round(f * H * W)`` pixels."""
    pixels = int(np.prod(shape))
    if order.shape != (pixels,):
        raise ValueError(f"an order of {order.shape} pixels for a {shape} map")
    morf = np.zeros((len(fractions), pixels), dtype=bool)
    lerf = np.zeros((len(fractions), pixels), dtype=bool)
    for row, fraction in enumerate(fractions):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fractions must be in (0, 1), got {fraction}")
        count = round(fraction * pixels)
        morf[row, order[:count]] = True
        lerf[row, order[pixels - count :]] = True
    return morf.reshape(-1, *shape), lerf.reshape(-1, *shape)


def blurred_copy(image: torch.Tensor, sigma: float = BLUR_SIGMA, factor: int = 8) -> torch.Tensor:
    """A ``(C, H, W)`` image blurred with a Gaussian of sigma ``sigma`` times its longer side:
    averaged down ``factor`` times, blurred there, then back up (bilinear), so the cost does
    not grow with sigma."""
    height, width = image.shape[-2:]
    small = F.interpolate(
        image[None].float(), size=(max(1, height // factor), max(1, width // factor)), mode="area"
    )[0]
    radius = max(height, width) * sigma / factor
    blurred = np.stack(
        [ndimage.gaussian_filter(channel.numpy(), radius, mode="nearest") for channel in small]
    )
    up = F.interpolate(torch.from_numpy(blurred)[None], size=(height, width), mode="bilinear")
    return up[0].to(image.dtype)


def road_scores(
    forward: Forward,
    image: torch.Tensor,
    maps: Sequence[np.ndarray],
    target: int,
    *,
    fractions: Sequence[float] = FRACTIONS,
    seed: int = 0,
    baseline: float | None = None,
    batch_size: int = 16,
    fill: torch.Tensor | None = None,
) -> list[RoadScore]:
    """Each map's symmetric deletion test on the ``(C, H, W)`` [0, 1] ``image``.

    ``maps`` are ``(H, W)`` at the image's size; ``forward`` maps [0, 1] images to logits.
    ``baseline``: the unmodified image's log-odds when already known (else one more image is
    scored). ``fill`` (default :func:`blurred_copy`) replaces the removed pixels. Every copy
    goes through ``forward`` in batches of ``batch_size``.
    """
    if not fractions:
        raise ValueError("at least one fraction is needed")
    shape = tuple(image.shape[-2:])
    fill = blurred_copy(image) if fill is None else fill
    masks = []
    for heatmap in maps:
        if heatmap.shape != shape:
            raise ValueError(f"a map of {heatmap.shape} for an image of {shape}")
        masks.extend(removal_masks(removal_order(heatmap, seed), shape, fractions))
    removed = torch.from_numpy(np.concatenate(masks))[:, None]  # per map: MoRF rows, LeRF rows
    scores = _scored(forward, image, fill, removed, target, batch_size, baseline is None)
    if baseline is None:
        baseline, scores = float(scores[0]), scores[1:]
    changes = (scores - baseline).reshape(len(maps), 2, len(fractions))
    return [
        RoadScore(
            morf=float(morf.mean()),
            lerf=float(lerf.mean()),
            morf_curve=tuple(float(v) for v in morf),
            lerf_curve=tuple(float(v) for v in lerf),
        )
        for morf, lerf in changes
    ]


def _scored(
    forward: Forward,
    image: torch.Tensor,
    fill: torch.Tensor,
    removed: torch.Tensor,
    target: int,
    batch_size: int,
    with_original: bool,
) -> np.ndarray:
    """The log-odds of ``target`` for each copy of ``image`` with its ``removed`` pixels
    (``(N, 1, H, W)`` bools) filled (and first for the image itself when ``with_original``),
    built and scored ``batch_size`` at a time."""
    scores = []
    if with_original:
        scores.append(log_odds(forward(image[None]), target))
    for start in range(0, len(removed), batch_size):
        batch = torch.where(removed[start : start + batch_size], fill[None], image[None])
        scores.append(log_odds(forward(batch), target))
    return torch.cat(scores).double().numpy()


def smooth_random_maps(
    count: int, size: tuple[int, int], seed: int | Sequence[int] = 0
) -> np.ndarray:
    """``count`` random maps ``(count, H, W)`` whose top part forms blobs, as contiguous as a
    heat map's hot region: uniform noise on an 8x8 grid, upsampled bicubically (deterministic
    for a seed, or a sequence of ints as NumPy takes). Their deletion test gives the chance
    level."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((count, 1, 8, 8)).astype(np.float32))
    return F.interpolate(coarse, size=tuple(size), mode="bicubic")[:, 0].numpy()
