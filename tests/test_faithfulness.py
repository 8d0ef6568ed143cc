"""The symmetric deletion test: ROAD's combined score on the log-odds, with a blurred fill."""

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics import road
from torch import nn

from mirage_demo.faithfulness import (
    blurred_copy,
    log_odds,
    removal_masks,
    removal_order,
    road_scores,
    smooth_random_maps,
)
from mirage_demo.inference import Predictor
from mirage_demo.trust import model_forward
from tests.synthetic_oct import lesion_scan, train_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

FRACTIONS = (0.1, 0.3, 0.5, 0.8)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """The tiny MIRAGE-architecture ViT trained to find the lesion blob."""
    return Predictor.from_pretrained(train_tiny_checkpoint(tmp_path_factory.mktemp("vit")))


def cam_like(size: tuple[int, int], seed: int) -> np.ndarray:
    """A map like a CAM after its ReLU: a smooth bump over exact zeros (about 60% of it)."""
    smooth = smooth_random_maps(1, size, seed)[0].astype(np.float64)
    return np.maximum(smooth - np.quantile(smooth, 0.6), 0.0)


def test_log_odds_is_the_class_logit_against_the_others():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    probabilities = torch.softmax(logits, dim=1)[:, 1]
    expected = torch.log(probabilities / (1 - probabilities))
    torch.testing.assert_close(log_odds(logits, 1), expected)


def test_exactly_the_fraction_is_removed_whatever_the_ties():
    heatmap = cam_like((40, 50), seed=1)
    zeros = heatmap == 0
    assert zeros.mean() > 0.5  # the bottom half is one big tie
    order = removal_order(heatmap, seed=7)
    morf, lerf = removal_masks(order, heatmap.shape, FRACTIONS)
    for row, fraction in enumerate(FRACTIONS):
        count = round(fraction * heatmap.size)
        assert morf[row].sum() == lerf[row].sum() == count
        # the most relevant part is the top of the map: nothing left out beats what is taken
        assert heatmap[morf[row]].min() >= heatmap[~morf[row]].max()
        assert heatmap[lerf[row]].max() <= heatmap[~lerf[row]].min()
    assert lerf[0].any() and (heatmap[lerf[0]] == 0).all()  # 10% of the zeros, not all of them
    # seeded: the same tie order every time, another seed picks other zeros
    np.testing.assert_array_equal(order, removal_order(heatmap, seed=7))
    # ties in the seed's permutation's order: value first, then the pixel's place in it
    place = np.random.default_rng(7).permutation(heatmap.size)
    np.testing.assert_array_equal(order, np.lexsort((place, -heatmap.reshape(-1))))
    other = removal_masks(removal_order(heatmap, seed=8), heatmap.shape, FRACTIONS)[1]
    assert not np.array_equal(lerf[0], other[0])
    assert (heatmap[other[0]] == 0).all()


def test_bad_fractions_and_sizes_are_refused():
    order = removal_order(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="fractions"):
        removal_masks(order, (4, 4), (0.0, 0.5))
    with pytest.raises(ValueError, match="order"):
        removal_masks(order, (4, 5), (0.5,))


class _LogOdds:
    """pytorch-grad-cam's target interface: a callable on one sample's model output."""

    def __init__(self, target: int) -> None:
        self.target = target

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return log_odds(output[None], self.target)[0]


class _BlurFill:
    """The library's imputer interface: ``(image (C, H, W), mask (H, W), 1 = keep)``; the
    removed pixels take the blurred copy's values (ours, not the noisy linear imputation)."""

    def __init__(self, fill: torch.Tensor) -> None:
        self.fill = fill

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.bool(), image, self.fill)


def on_lesion(size: tuple[int, int], centre: tuple[float, float]) -> np.ndarray:
    """A map peaking on the lesion (``centre`` as fractions of the height and width): minus the
    squared distance, with a seeded jitter so that no two pixels tie (nor in ``1 - map``)."""
    rows, cols = np.mgrid[: size[0], : size[1]] / np.array(size)[:, None, None]
    jitter = np.random.default_rng(0).random(size) * 1e-6
    return jitter - (rows - centre[0]) ** 2 - (cols - centre[1]) ** 2


def lesion_input(predictor: Predictor, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """A lesion scan as the model input, and a map on its lesion."""
    scan, (row, col) = lesion_scan(1, seed=seed)
    image = predictor.preprocessing.read_resized(scan)
    size = tuple(image.shape[-2:])
    return image, on_lesion(size, (row / scan.shape[0], col / scan.shape[1]))


def test_equals_pytorch_grad_cams_road_combined(vit, monkeypatch):
    """Our score is the library's ``ROADCombined`` given the same fill, the same masks and a
    log-odds target.

    Apples to apples: the library thresholds each map at ``np.percentile(map, p)`` and keeps the
    pixels below it (``RemoveMostRelevantFirst``; ``RemoveLeastRelevantFirst`` does the same on
    ``1 - map``), so ties at the threshold are all removed or all kept. It is therefore given,
    for each map, our tie-broken ranking as the map (the rank of each pixel in
    :func:`removal_order`, scaled to [0, 1]: no two values equal), and for each fraction ``f``
    the percentile ``100 (K - 0.5) / (N - 1)`` with ``K = N - round(f N)`` pixels kept: its
    linear interpolation then falls half-way between the K-th and (K+1)-th smallest values,
    so it removes exactly our ``round(f N)`` pixels from the top (MoRF) and from the bottom
    (LeRF). Its noisy linear imputer is swapped for our blurred copy; the model is the
    predictor's (normalisation included) on [0, 1] images, the target the log-odds.
    """
    image, lesion_map = lesion_input(vit, seed=2)
    size = tuple(image.shape[-2:])
    maps = [lesion_map, 1 - lesion_map, cam_like(size, 1), smooth_random_maps(1, size, 9)[0]]
    target = vit.class_index("LESION")
    ours = road_scores(model_forward(vit), image, maps, target, fractions=FRACTIONS, seed=5)

    pixels = image.shape[-2] * image.shape[-1]
    ranked = []
    for heatmap in maps:
        rank = np.empty(pixels, dtype=np.float32)
        rank[removal_order(heatmap, seed=5)] = np.arange(pixels - 1, -1, -1) / (pixels - 1)
        ranked.append(rank.reshape(size))
    percentiles = [100 * (pixels - round(f * pixels) - 0.5) / (pixels - 1) for f in FRACTIONS]
    monkeypatch.setattr(road, "NoisyLinearImputer", lambda: _BlurFill(blurred_copy(image)))
    model = nn.Sequential(_Normalised(vit), vit.model).eval()
    theirs = road.ROADCombined(percentiles=percentiles)(
        image[None].repeat(len(maps), 1, 1, 1),
        np.stack(ranked),
        [_LogOdds(target)] * len(maps),
        model,
    )
    np.testing.assert_allclose([s.faithfulness for s in ours], theirs, atol=1e-4)
    assert theirs[0] > 0.3 > -0.3 > theirs[1]  # the maps really score differently


class _Normalised(nn.Module):
    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.preprocessing = predictor.preprocessing

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.preprocessing.normalize(images)


def test_flipping_a_map_flips_the_sign(vit):
    image, lesion_map = lesion_input(vit, seed=1)
    size = tuple(image.shape[-2:])
    smooth = [lesion_map, *smooth_random_maps(2, size, seed=4).astype(np.float64)]  # no ties
    lesion = vit.class_index("LESION")
    forward = model_forward(vit)
    scores = road_scores(forward, image, [*smooth, *(1 - m for m in smooth)], lesion)
    straight, flipped = scores[:3], scores[3:]
    assert straight[0].faithfulness > 0.3
    for a, b in zip(straight, flipped, strict=True):
        assert b.faithfulness == pytest.approx(-a.faithfulness, abs=1e-5)
        assert (b.morf, b.lerf) == pytest.approx((a.lerf, a.morf), abs=1e-5)
    # a real map with ties (a CAM's zeros)
    scan, _ = lesion_scan(1, seed=21)
    x = vit.preprocessing.read_resized(scan)
    _, heatmaps = vit.explainer(vit.preprocessing.normalize(x[None]), "gradcam", [lesion])
    cam = heatmaps[0].astype(np.float64)
    straight, flipped = road_scores(model_forward(vit), x, [cam, 1 - cam], lesion)
    # ties broken in one seeded order, not reversed: the flip is near, not exact
    assert abs(straight.faithfulness) > 0.3
    assert flipped.faithfulness == pytest.approx(-straight.faithfulness, rel=0.2)


def test_baseline_given_or_measured_is_the_same(vit):
    image, lesion_map = lesion_input(vit, seed=1)
    maps = [lesion_map, *smooth_random_maps(2, tuple(image.shape[-2:]), seed=1)]
    forward = model_forward(vit)
    measured = road_scores(forward, image, maps, 1, fractions=(0.2, 0.6), batch_size=3)
    baseline = float(log_odds(forward(image[None]), 1)[0])
    given = road_scores(forward, image, maps, 1, fractions=(0.2, 0.6), baseline=baseline)
    for a, b in zip(measured, given, strict=True):
        assert (a.morf, a.lerf) == pytest.approx((b.morf, b.lerf), abs=1e-5)
        assert len(a.morf_curve) == 2
