"""Explanations side by side: one map per method, a deletion test and a sanity check."""

import numpy as np
import pytest
import torch

from mirage_demo.faithfulness import road_scores, smooth_random_maps
from mirage_demo.inference import DEFAULT_CHECKPOINT, Predictor
from mirage_demo.models import cpu_computes_bf16
from mirage_demo.trust import (
    SAME_MAP_RHO,
    SIMILARITY_GRID,
    channels_last_copy,
    compare_methods,
    model_forward,
    randomized_explainer,
    rank_similarity,
    same_maps,
)
from mirage_demo.ui.compare import _explanation
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
        road = score.road
        assert np.isfinite([road.faithfulness, road.morf, road.lerf, score.similarity]).all()
        assert score.faithfulness == (road.lerf - road.morf) / 2
        assert len(road.morf_curve) == len(road.lerf_curve) == len(comparison.fractions)
        assert -1.0 <= score.similarity <= 1.0
    assert np.isfinite(comparison.random_reference.faithfulness)
    record = comparison.record()
    assert [m["method"] for m in record["methods"]] == list(predictor.methods)
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
    faithful, chance = [], []
    for seed in range(6):
        scan, (row, col) = lesion_scan(1, seed=300 + seed)
        rows, cols = np.mgrid[: SCAN_SIZE[0], : SCAN_SIZE[1]]
        on_lesion = np.exp(-(((rows - row) / 10) ** 2 + ((cols - col) / 14) ** 2))
        on_lesion = torch.nn.functional.interpolate(
            torch.from_numpy(on_lesion.astype(np.float32))[None, None], size=(height, width)
        )[0, 0].numpy()
        image = vit.preprocessing.read_resized(scan)
        random_maps = list(smooth_random_maps(4, (height, width), seed=seed))
        scores = road_scores(model_forward(vit), image, [on_lesion, *random_maps], lesion)
        faithful.append(scores[0].faithfulness)
        chance.extend(s.faithfulness for s in scores[1:])
    # the toy model also reacts to the blur itself: compared on the median, not scan by scan
    assert np.median(faithful) > max(0.3, np.quantile(chance, 0.75)), (faithful, chance)


@pytest.fixture(scope="module")
def demo_cnn():
    """The bundled ResNet-18 (trained on real scans)."""
    return Predictor.from_pretrained(DEFAULT_CHECKPOINT)


def test_randomising_the_last_block_changes_gradient_maps(vit, demo_cnn):
    cases = [
        (vit, lesion_scan(1, seed=11)[0], ("gradcam", "gradcam++", "hirescam", "layercam")),
        (
            demo_cnn,
            str(EXAMPLES / "DME" / "DME-11053-1.jpeg"),
            ("gradcam", "hirescam", "gradcam-early"),
        ),
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


def test_grad_cam_and_hirescam_are_one_map_on_the_resnet(demo_cnn, vit):
    """Global average pooling after the last block: the same gradient at every position, so
    Grad-CAM and HiResCAM coincide; the ViT's maps differ."""
    comparison = compare_methods(demo_cnn, str(EXAMPLES / "DRUSEN" / "DRUSEN-228939-1.jpeg"))
    same = {s.method: s.same_as for s in comparison.scores}
    assert same["hirescam"] == "gradcam"
    distinct = ["gradcam", "gradcam++", "layercam", "eigencam", "gradcam-early"]
    assert all(same[m] is None for m in distinct)
    gradcam, hirescam = comparison.score("gradcam"), comparison.score("hirescam")
    np.testing.assert_allclose(gradcam.heatmap, hirescam.heatmap, atol=1e-5)
    assert hirescam.road == gradcam.road  # tested once
    assert [s.method for s in comparison.distinct()] == distinct
    record = {m["method"]: m for m in comparison.record()["methods"]}
    assert record["hirescam"]["same_as"] == "gradcam" and record["gradcam"]["same_as"] is None
    text = _explanation(comparison, demo_cnn)  # the grid says so, and why
    assert "Grad-CAM and HiResCAM draw the same map" in text
    assert "global average pooling" in text
    scan, _ = lesion_scan(1, seed=8)  # on a ViT, Grad-CAM and HiResCAM differ
    assert compare_methods(vit, scan).score("hirescam").same_as is None


def test_the_earlier_block_shares_the_last_blocks_trace(demo_cnn):
    """The grid takes every CAM from one trace that keeps both layers: its maps equal each
    method's own single explanation, and the earlier block's map is drawn on its finer grid."""
    scan = str(EXAMPLES / "NORMAL" / "NORMAL-1384-3.jpeg")
    comparison = compare_methods(demo_cnn, scan)
    for method in ("gradcam", "layercam", "eigencam", "gradcam-early"):
        single = demo_cnn.explain(scan, method).heatmap
        np.testing.assert_allclose(comparison.score(method).heatmap, single, atol=1e-5)
    early = comparison.score("gradcam-early")
    assert early.class_specific and early.same_as is None
    assert rank_similarity(early.heatmap, comparison.score("gradcam").heatmap) < SAME_MAP_RHO


def test_same_maps_groups_by_rank_correlation():
    rng = np.random.default_rng(0)
    size = (SIMILARITY_GRID, SIMILARITY_GRID)  # compared at this size: no resampling
    a = rng.random(size)
    maps = {"a": a, "b": a * 2 + 1, "c": rng.random(size), "d": a**3}  # d: same ranks
    assert same_maps(list(maps), maps) == {"a": None, "b": "a", "c": None, "d": "a"}


def test_the_random_reference_follows_the_scan_not_a_fixed_map(cnn):
    first, second = (compare_methods(cnn, lesion_scan(1, seed=s)[0]) for s in (3, 4))
    again = compare_methods(cnn, lesion_scan(1, seed=3)[0])
    assert again.random_reference == first.random_reference  # deterministic for a scan
    assert first.random_reference != second.random_reference


def test_bad_fractions_are_refused(cnn):
    for fractions in ([1.5], [], [0.0, 0.5]):
        with pytest.raises(ValueError, match="fractions"):
            compare_methods(cnn, lesion_scan(0, 1)[0], fractions=fractions)


def test_the_fast_forward_gives_the_models_logits_and_leaves_it_as_loaded(demo_cnn):
    """The deletion test's forward: a channels-last copy of the CNN (bfloat16 where the CPU
    computes it natively) scores copies as the served model does; the served model is
    untouched and the copy is made once."""
    images = torch.stack(
        [demo_cnn.preprocessing.read_resized(str(p)) for p in sorted(EXAMPLES.glob("*/*"))[:4]]
    )
    exact, fast = model_forward(demo_cnn)(images), model_forward(demo_cnn, fast=True)(images)
    tolerance = 0.15 if cpu_computes_bf16() else 1e-3  # logits of a few units, bf16's 8 bits
    torch.testing.assert_close(fast, exact, atol=tolerance, rtol=0.05)
    assert torch.equal(fast.argmax(1), exact.argmax(1))
    copy = channels_last_copy(demo_cnn)
    assert copy is not demo_cnn.model and copy is channels_last_copy(demo_cnn)
    assert copy.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not demo_cnn.model.layer1[0].conv1.weight.is_contiguous(
        memory_format=torch.channels_last
    )
