"""Explanations side by side: one map per method, a deletion test and a sanity check."""

import numpy as np
import pytest
import torch

from mirage_demo.inference import DEFAULT_CHECKPOINT, Predictor
from mirage_demo.trust import (
    compare_methods,
    deletion_scores,
    randomized_explainer,
    smooth_random_maps,
    top_mask,
)
from tests.synthetic_oct import SCAN_SIZE, lesion_scan, tiny_cnn_checkpoint, train_tiny_checkpoint

EXAMPLES = DEFAULT_CHECKPOINT.parent / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """The tiny MIRAGE-architecture ViT trained to find the lesion blob."""
    return Predictor.from_pretrained(train_tiny_checkpoint(tmp_path_factory.mktemp("vit")))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    directory = tiny_cnn_checkpoint(tmp_path_factory.mktemp("cnn"), ["A", "B", "C"])
    return Predictor.from_pretrained(directory)


@pytest.mark.parametrize("which", ["vit", "cnn"])
def test_one_map_and_score_per_method(request, which):
    predictor = request.getfixturevalue(which)
    before = {k: v.clone() for k, v in predictor.model.state_dict().items()}
    scan, _ = lesion_scan(1, seed=5)
    comparison = compare_methods(predictor, scan)
    assert [s.method for s in comparison.scores] == list(predictor.methods)
    if which == "vit":
        assert {"attention", "rollout"} <= set(predictor.methods)
    for score in comparison.scores:
        assert score.heatmap.shape == score.randomized_heatmap.shape == SCAN_SIZE
        assert score.overlay.size == (SCAN_SIZE[1], SCAN_SIZE[0])
        assert np.isfinite(
            [score.faithfulness, score.drop, score.random_drop, score.similarity]
        ).all()
        assert -1.0 <= score.similarity <= 1.0
    # the grid's maps are the single explanations' maps
    single = predictor.explain(scan, "gradcam")
    np.testing.assert_allclose(comparison.score("gradcam").heatmap, single.heatmap, atol=1e-6)
    assert comparison.prediction.label == single.prediction.label
    # the sanity check worked on a copy: the served model is untouched
    for key, value in predictor.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_map_on_the_lesion_is_more_faithful_than_random_maps(vit):
    lesion = vit.class_index("LESION")
    height, width = vit.preprocessing.input_size
    for seed in range(6):
        scan, (row, col) = lesion_scan(1, seed=300 + seed)
        rows, cols = np.mgrid[: SCAN_SIZE[0], : SCAN_SIZE[1]]
        on_lesion = np.exp(-(((rows - row) / 10) ** 2 + ((cols - col) / 14) ** 2))
        on_lesion = torch.nn.functional.interpolate(
            torch.from_numpy(on_lesion.astype(np.float32))[None, None], size=(height, width)
        )[0, 0].numpy()
        image = vit.preprocessing.read_resized(scan)
        random_maps = list(smooth_random_maps(4, (height, width), seed=seed))
        drops = deletion_scores(vit, image, [on_lesion, *random_maps], lesion)
        # faithfulness as compare_methods scores it: the drop beyond a random part's
        assert drops[0] - np.mean(drops[1:]) > 0.05, (seed, drops)


@pytest.fixture(scope="module")
def demo_cnn():
    """The bundled ResNet-18 (trained on real scans)."""
    return Predictor.from_pretrained(DEFAULT_CHECKPOINT)


def test_randomising_the_last_block_changes_gradient_maps(vit, demo_cnn):
    cases = [
        (vit, lesion_scan(1, seed=11)[0], ("gradcam", "gradcam++", "hirescam", "layercam")),
        (demo_cnn, str(EXAMPLES / "DME" / "DME-11053-1.jpeg"), ("gradcam", "hirescam")),
    ]
    for predictor, scan, methods in cases:
        comparison = compare_methods(predictor, scan)
        for method in methods:
            score = comparison.score(method)
            assert score.similarity < 0.5, (type(predictor.model).__name__, method)
            assert not np.allclose(score.heatmap, score.randomized_heatmap, atol=1e-2)
        # only the last block and the classifier were re-drawn
        clone = randomized_explainer(predictor).model
        original = predictor.model.state_dict()
        changed = {n for n, v in clone.state_dict().items() if not torch.equal(v, original[n])}
        prefix = "blocks.1." if predictor is vit else "layer4.1."
        assert changed and all(n.startswith((prefix, "head", "fc")) for n in changed), changed


def test_top_mask_takes_exactly_the_fraction():
    heatmap = np.zeros((10, 10), np.float32)
    heatmap[2, 3] = 1.0
    mask = top_mask(heatmap, 0.2)
    assert mask.sum() == 20 and mask[2, 3]


def test_bad_fraction_is_refused(cnn):
    with pytest.raises(ValueError, match="fraction"):
        compare_methods(cnn, lesion_scan(0, 1)[0], fraction=1.5)
