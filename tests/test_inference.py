import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import mirage_demo.inference as inference
from mirage_demo.checkpoint import CheckpointError, load_checkpoint
from mirage_demo.data import ImageReadError, Preprocessing
from mirage_demo.explain import (
    CAM_METHODS,
    EARLY_METHOD,
    METHODS,
    Explainer,
    ViTReshapeTransform,
    _attention_weights,
    canonical_method,
)
from mirage_demo.inference import Predictor
from mirage_demo.models import create_classifier
from mirage_demo.quality import assess_image
from tests.synthetic_oct import CLASSES, lesion_scan, oct_like, train_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny MIRAGE-architecture model trained on a separable synthetic task (acc >= 0.9)."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def cnn_predictor():
    torch.manual_seed(0)
    model = create_classifier("resnet18", num_classes=2)
    preprocessing = Preprocessing(input_size=(128, 128))
    return Predictor(model, CLASSES, preprocessing)


def hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------------------------
# Predictions


def test_trained_fixture_separates_the_classes(predictor):
    results = predictor.predict_batch([lesion_scan(i % 2, 5000 + i)[0] for i in range(20)])
    accuracy = np.mean([r.index == i % 2 for i, r in enumerate(results)])
    assert accuracy >= 0.9


def test_probabilities_are_softmax_of_logits_over_temperature(predictor, checkpoint):
    image, _ = lesion_scan(1, 7)
    result = predictor.predict(image)
    assert predictor.temperature == pytest.approx(1.7)
    model, config = load_checkpoint(checkpoint)
    x = config.preprocessing.normalize(config.preprocessing.read_resized(image))[None]
    with torch.no_grad():
        logits = model(x)[0]
    expected = torch.softmax(logits / 1.7, dim=-1).tolist()
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert list(result.probabilities) == CLASSES
    assert list(result.probabilities.values()) == pytest.approx(expected, abs=1e-6)
    assert result.logits == pytest.approx(logits.tolist(), abs=1e-5)
    assert result.label == CLASSES[int(logits.argmax())]
    assert result.image_size == image.shape
    assert result.timing["total_s"] > 0


def test_path_pil_and_array_give_the_same_prediction(predictor, tmp_path):
    image, _ = lesion_scan(0, 8)
    Image.fromarray(image).save(tmp_path / "scan.png")
    results = [
        predictor.predict(tmp_path / "scan.png"),
        predictor.predict(str(tmp_path / "scan.png")),
        predictor.predict(Image.fromarray(image)),
        predictor.predict(image),
        predictor.predict(np.stack([image] * 3, axis=-1)),  # gray stored as RGB
    ]
    for result in results[1:]:
        assert result.probabilities == pytest.approx(results[0].probabilities, abs=1e-5)
        assert result.warnings == []
    assert results[0].source == str(tmp_path / "scan.png")


def test_predict_batch_equals_one_at_a_time_and_reports_bad_files(predictor, tmp_path):
    images = [lesion_scan(i % 2, 300 + i)[0] for i in range(5)]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    single = [predictor.predict(image) for image in images]
    batched = predictor.predict_batch(images, batch_size=3)
    for one, many in zip(single, batched, strict=True):
        assert many.probabilities == pytest.approx(one.probabilities, abs=1e-5)
    mixed = predictor.predict_batch(
        [images[0], tmp_path / "broken.png", tmp_path / "missing.png", images[1]],
        batch_size=2,
        on_error="return",
    )
    assert isinstance(mixed[1], ImageReadError) and "broken.png" in str(mixed[1])
    assert isinstance(mixed[2], ImageReadError) and "not found" in str(mixed[2])
    assert mixed[3].probabilities == pytest.approx(single[1].probabilities, abs=1e-5)
    with pytest.raises(ImageReadError, match="broken.png"):
        predictor.predict(tmp_path / "broken.png")


def test_predict_batch_takes_bytes_and_reports_errors_as_data(predictor, tmp_path):
    image = Image.fromarray(lesion_scan(1, 310)[0])
    image.save(tmp_path / "scan.png")
    data = (tmp_path / "scan.png").read_bytes()
    given = ImageReadError("archive.zip/x.png", "corrupt in zip (bad CRC)")
    seen = []
    results = predictor.predict_batch(
        [tmp_path / "scan.png", data, image, b"not an image", given],
        batch_size=2,
        names=[None, "upload.png", None, "junk.png", "x"],
        on_error="return",
        progress=lambda done, total: seen.append((done, total)),
    )
    reference = results[0].probabilities
    for result in results[1:3]:  # the same scan as bytes and as a PIL image
        assert result.probabilities == pytest.approx(reference, abs=1e-6)
    assert results[1].source == "upload.png"
    junk, passed = results[3], results[4]
    assert (junk.name, junk.reason) == ("junk.png", "not a readable image (unknown format)")
    assert str(junk) == "junk.png: not a readable image (unknown format)"
    assert passed is given
    assert seen == [(0, 5), (2, 5), (4, 5), (5, 5)]
    with pytest.raises(ImageReadError) as raised:
        predictor.predict(b"\x89PNG\r\n\x1a\n broken", name="broken.png")
    assert raised.value.name == "broken.png" and "not a readable image" in raised.value.reason


def test_tta_averages_the_logits_of_the_image_and_its_mirror(checkpoint):
    plain = Predictor.from_pretrained(checkpoint)
    tta = Predictor.from_pretrained(checkpoint, tta=True)
    image, _ = lesion_scan(1, 9)
    mirrored = plain.predict(image[:, ::-1].copy())
    expected = (np.array(plain.predict(image).logits) + np.array(mirrored.logits)) / 2
    result = tta.predict(image)
    assert result.logits == pytest.approx(expected.tolist(), abs=1e-5)
    explained = tta.explain(image, "gradcam")
    assert explained.prediction.logits == pytest.approx(expected.tolist(), abs=1e-4)


def test_wrong_class_count_and_temperature_are_rejected():
    model = create_classifier("resnet18", num_classes=3)
    with pytest.raises(ValueError, match="3 outputs but 2 class names"):
        Predictor(model, ["A", "B"])
    with pytest.raises(ValueError, match="temperature"):
        Predictor(model, ["A", "B", "C"], temperature=0)


def test_missing_default_checkpoint_says_so(monkeypatch, tmp_path):
    missing = tmp_path / "assets" / "demo-model"
    monkeypatch.setattr(inference, "DEFAULT_CHECKPOINT", missing)
    with pytest.raises(CheckpointError, match="bundled demo model is missing"):
        inference.Predictor.from_pretrained(missing)
    assert inference.DEFAULT_CHECKPOINT.name == "demo-model"


def test_default_checkpoint_is_assets_demo_model_at_the_repo_root(monkeypatch):
    root = Path(__file__).resolve().parent.parent
    assert root / "assets" / "demo-model" == inference.DEFAULT_CHECKPOINT
    if not inference.DEFAULT_CHECKPOINT.is_dir():  # until the demo model is committed
        monkeypatch.chdir(root)
        for source in (inference.DEFAULT_CHECKPOINT, "assets/demo-model"):
            with pytest.raises(CheckpointError, match="bundled demo model is missing"):
                Predictor.from_pretrained(source)


# --------------------------------------------------------------------------------------------
# Explanations


@pytest.mark.parametrize("method", [m for m in METHODS if m != EARLY_METHOD])
def test_vit_methods_give_nonconstant_heatmaps_at_the_image_size(predictor, method):
    image, _ = lesion_scan(1, 11)
    explanation = predictor.explain(image, method)
    heatmap = explanation.heatmap
    assert heatmap.shape == image.shape == (96, 144)
    assert heatmap.dtype == np.float32
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    assert heatmap.std() > 0.05, f"{method} heatmap is (nearly) constant"
    assert explanation.overlay.mode == "RGB"
    assert explanation.overlay.size == (144, 96)  # PIL: (width, height)
    assert explanation.prediction.label in CLASSES
    assert explanation.target == explanation.prediction.label
    assert not any(p.grad is not None for p in predictor.model.parameters())
    assert hooks_left(predictor.model) == 0


@pytest.mark.parametrize("method", [*CAM_METHODS, EARLY_METHOD])
def test_cnn_cam_methods(cnn_predictor, method):
    image = oct_like(100, 170, seed=3)
    explanation = cnn_predictor.explain(image, method, target=1)
    assert explanation.heatmap.shape == (100, 170)
    assert np.isfinite(explanation.heatmap).all()
    assert explanation.heatmap.std() > 0.01
    assert explanation.target == "LESION"
    assert hooks_left(cnn_predictor.model) == 0


def test_cnn_has_no_attention_maps(cnn_predictor):
    assert cnn_predictor.methods == (*CAM_METHODS, EARLY_METHOD)
    with pytest.raises(ValueError, match="needs a ViT"):
        cnn_predictor.explain(oct_like(seed=1), "rollout")


def test_any_class_can_be_explained(predictor):
    image, _ = lesion_scan(1, 12)
    by_name = predictor.explain(image, "gradcam", target="NORMAL")
    by_index = predictor.explain(image, "gradcam", target=0)
    other = predictor.explain(image, "gradcam", target="LESION")
    assert by_name.target == "NORMAL" and by_name.target_index == 0
    np.testing.assert_allclose(by_name.heatmap, by_index.heatmap, atol=1e-6)
    assert not np.allclose(by_name.heatmap, other.heatmap, atol=1e-2)
    with pytest.raises(ValueError, match="unknown class"):
        predictor.explain(image, "gradcam", target="CNV")
    with pytest.raises(ValueError, match="not in 0..1"):
        predictor.explain(image, "gradcam", target=5)
    with pytest.raises(ValueError, match="unknown explanation method"):
        predictor.explain(image, "saliency")
    assert canonical_method("Grad-CAM++") == "gradcam++"
    assert canonical_method("HiResCAM") == "hirescam"


def test_explain_and_predict_agree(predictor):
    image, _ = lesion_scan(1, 13)
    predicted = predictor.predict(image)
    for method in ("gradcam", "eigencam", "rollout"):
        explained = predictor.explain(image, method).prediction
        assert explained.probabilities == pytest.approx(predicted.probabilities, abs=1e-5)


def test_overlay_blends_colormap_and_image(predictor):
    image, _ = lesion_scan(1, 14)
    clear = predictor.explain(image, "gradcam", opacity=0.0).overlay
    opaque = predictor.explain(image, "gradcam", opacity=1.0, colormap="gray")
    grey = np.asarray(clear).astype(float)
    assert np.allclose(grey[..., 0], grey[..., 1])  # the scan itself, gray
    shown = (image.astype(float) - image.min()) / (image.max() - image.min()) * 255
    assert np.abs(grey[..., 0] - shown).max() <= 1.0
    heat = np.asarray(opaque.overlay)[..., 0].astype(float) / 255
    assert np.abs(heat - opaque.heatmap).max() < 0.01


# --------------------------------------------------------------------------------------------
# Equivalence with pytorch-grad-cam and with timm's own attention


LIBRARY_CAMS = {  # the reference each of our CAM methods must equal
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
}


def _models():
    torch.manual_seed(1)
    vit = timm.create_model("mirage_tiny_patch32_512", num_classes=3, img_size=128, depth=2)
    cnn = create_classifier("resnet18", num_classes=3)
    return {"vit": vit.eval(), "cnn": cnn.eval()}


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_fast_cams_equal_pytorch_grad_cam(kind):
    model = _models()[kind]
    explainer = Explainer(model)
    x = torch.rand(2, 1, 128, 128)
    targets = [2, 0]
    for name in CAM_METHODS:
        cam_class = LIBRARY_CAMS[name]
        logits, ours = explainer(x, name, targets=targets)
        with cam_class(
            model, [explainer.target_layer], reshape_transform=explainer.reshape_transform
        ) as cam:
            reference = cam(x, [ClassifierOutputTarget(t) for t in targets])
        assert ours.shape == reference.shape == (2, 128, 128)
        np.testing.assert_allclose(ours, reference, atol=1e-5, err_msg=name)
        with torch.no_grad():
            torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)
    if kind == "vit":
        assert explainer.target_layer is model.blocks[-1].norm1
        assert explainer.earlier_layer is None and EARLY_METHOD not in explainer.methods
        with pytest.raises(ValueError, match="needs a CNN"):
            explainer(x, EARLY_METHOD)
        return
    assert explainer.target_layer is model.layer4
    assert explainer.earlier_layer is model.layer3
    logits, ours = explainer(x, EARLY_METHOD, targets=targets)  # Grad-CAM one stage earlier
    with GradCAM(model, [model.layer3]) as cam:
        reference = cam(x, [ClassifierOutputTarget(t) for t in targets])
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    # its trace keeps both layers, so it serves every CAM: the same maps as their own traces
    both = explainer.trace(x, EARLY_METHOD)
    for name in CAM_METHODS:
        shared = explainer.heatmaps(replace(both, method=name), targets)
        np.testing.assert_allclose(shared, explainer(x, name, targets=targets)[1], atol=1e-6)


def test_fast_path_computes_no_parameter_gradients():
    model = _models()["vit"]
    explainer = Explainer(model)
    grad_mode = torch.is_grad_enabled()
    explainer(torch.rand(1, 1, 128, 128), "gradcam")
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled() == grad_mode
    with torch.inference_mode():  # works inside the caller's inference mode too
        _, maps = explainer(torch.rand(1, 1, 128, 128), "hirescam")
    assert maps.shape == (1, 128, 128)
    cnn = _models()["cnn"]  # the two-layer trace too: gradients of activations only
    with torch.inference_mode():
        _, maps = Explainer(cnn)(torch.rand(1, 1, 128, 128), EARLY_METHOD)
    assert maps.shape == (1, 128, 128)
    assert all(p.grad is None for p in cnn.parameters())
    assert torch.is_grad_enabled() == grad_mode


def test_reshape_transform_follows_the_model_grid():
    model = timm.create_model("mirage_tiny_patch32_512", num_classes=2, img_size=(96, 160))
    transform = ViTReshapeTransform.from_model(model)
    assert transform.grid_size == (3, 5) and transform.num_prefix_tokens == 1
    tokens = torch.arange(16.0)[None, :, None].expand(1, 16, 2)
    grid = transform(tokens)
    assert grid.shape == (1, 2, 3, 5)
    assert grid[0, 0, 1, 0] == 6  # row 1, column 0 is patch 5, token 6
    _, maps = Explainer(model.eval())(torch.rand(1, 1, 96, 160), "gradcam")
    assert maps.shape == (1, 96, 160)


def test_attention_weights_from_qkv_equal_unfused_attention():
    model = _models()["vit"]
    x = torch.rand(2, 1, 128, 128)
    ours, reference = [], []
    for block in model.blocks:
        block.attn.qkv.register_forward_hook(
            lambda m, i, o, attn=block.attn: ours.append(_attention_weights(attn, o))
        )
        block.attn.attn_drop.register_forward_hook(lambda m, i, o: reference.append(o.mean(1)))
        block.attn.fused_attn = False
    with torch.no_grad():
        model(x)
    assert len(ours) == len(reference) == 2
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 17))


def test_fused_attention_outputs_are_unchanged_by_the_attention_hooks():
    model = _models()["vit"]
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        plain = model(x)
    logits, _ = Explainer(model)(x, "rollout")
    assert torch.equal(logits, plain)


def test_hooks_are_released_and_grad_mode_restored_after_an_exception(predictor):
    image, _ = lesion_scan(1, 15)
    head = predictor.model.head

    def broken(*args):
        raise RuntimeError("head exploded")

    for method in ("gradcam", "eigencam", "attention", "rollout"):
        handle = head.register_forward_pre_hook(broken)
        try:
            with pytest.raises(RuntimeError, match="head exploded"):
                predictor.explain(image, method)
        finally:
            handle.remove()
        assert hooks_left(predictor.model) == 0
        assert torch.is_grad_enabled()
    assert predictor.explain(image, "gradcam").heatmap.std() > 0


def test_threads_share_one_predictor_safely(predictor):
    images = [lesion_scan(i % 2, 400 + i)[0] for i in range(6)]
    jobs = [(image, method) for image in images for method in ("gradcam", "rollout", None)]

    def run(job):
        image, method = job
        if method is None:
            return predictor.predict(image).probabilities, None
        explanation = predictor.explain(image, method)
        return explanation.prediction.probabilities, explanation.heatmap

    sequential = [run(job) for job in jobs]
    barrier = threading.Barrier(4)

    def concurrent(numbered):
        number, job = numbered
        if number < 4:  # the first four start together
            barrier.wait(timeout=60)
        return run(job)

    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(concurrent, enumerate(jobs)))
    for (p1, h1), (p2, h2) in zip(sequential, parallel, strict=True):
        assert p1 == pytest.approx(p2, abs=1e-5)
        if h1 is not None:
            np.testing.assert_allclose(h1, h2, atol=1e-4)
    assert hooks_left(predictor.model) == 0


# --------------------------------------------------------------------------------------------
# Quality gate


def _fundus_like(size: int = 300) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size] / size - 0.5
    disc = (rows**2 + cols**2) < 0.2
    image = np.zeros((size, size, 3), np.uint8)
    image[disc] = (200, 90, 40)  # orange-red retina on black
    image[disc & (np.abs(cols - 0.1) < 0.01)] = (120, 20, 20)  # a vessel
    return image


def test_quality_gate_passes_oct_like_scans(predictor):
    for seed in range(3):
        assert predictor.predict(oct_like(seed=seed)).warnings == []
        assert assess_image(lesion_scan(1, seed)[0]).looks_like_oct


def test_quality_gate_flags_real_photographs_fundus_and_blank_images(predictor):
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        photo = Image.open(handle)
        photo.load()
    result = predictor.predict(photo)
    assert any("in colour" in w for w in result.warnings), result.warnings
    assert result.quality.colourfulness > 30

    from sklearn.datasets import load_sample_image

    gray_photo = Image.fromarray(load_sample_image("china.jpg")).convert("L")
    result = predictor.predict(gray_photo)
    assert any("no retinal layers" in w for w in result.warnings), result.warnings
    assert result.quality.oct_score < 0.7 and result.trust == "not_a_bscan"

    fundus = predictor.predict(_fundus_like())
    assert any("in colour" in w for w in fundus.warnings)

    blank = predictor.predict(np.full((200, 300), 37, np.uint8))
    assert any("almost uniform" in w for w in blank.warnings)
    assert set(blank.probabilities) == set(CLASSES)  # still answered, with the warning
