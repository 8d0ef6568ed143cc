"""Linear probes on frozen features: the library, ``python -m train --mode probe``, and the
head-only checkpoint of a probe on a (randomly initialised) MIRAGE-Base written in the Hub's own
file format into a temporary Hugging Face cache, driven through every consumer, offline."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from mirage_demo import predict, space
from mirage_demo.bundled_probe import bundled_probe
from mirage_demo.checkpoint import CheckpointConfig, CheckpointError, load_checkpoint, push_to_hub
from mirage_demo.data import DataError, Preprocessing, Sample
from mirage_demo.inference import Predictor
from mirage_demo.models import create_classifier
from mirage_demo.probe import (
    FeatureCache,
    apply_probe,
    cached_features,
    fit_probe,
    pooled_features,
    weights_digest,
)
from mirage_demo.ui import app as ui_app
from mirage_demo.ui.registry import available_models
from tests import mirage_reference as ref
from tests.test_space import read_front_matter
from tests.test_train import make_bands
from train import evaluate
from train.cli import main as train_main

TINY = ["--model", "mirage_tiny_patch32_512", "--model-kwargs", "{depth: 2}", "--img-size", "64"]
FAST = ["--workers", "0", "--bootstrap", "100", "--threads", "1", "--no-progress"]
REVISION = "1" * 40
REPO = Path(__file__).resolve().parents[1]
HEAD_KEYS = {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def run_train(capsys, *args):
    code = train_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def separable(n_per_class: int, num_classes: int = 3, dim: int = 16, seed: int = 0):
    """Gaussian clusters in ``dim`` dimensions (``seed``: another draw of the same task),
    offset and scaled unlike standardised features."""
    centres = np.random.default_rng(0).normal(0, 3, (num_classes, dim))  # one task
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    features = centres[labels] + rng.normal(0, 1, (len(labels), dim))
    return (features * 50 + 7).astype(np.float32), labels


# --------------------------------------------------------------------------------------------
# The library


def test_fit_probe_learns_picks_c_on_val_and_folds_the_standardisation():
    x, y = separable(30)
    xv, yv = separable(10, seed=1)
    fit = fit_probe(x, y, xv, yv, 3, cs=(1e-4, 1e-2, 1.0))
    assert [s["C"] for s in fit.scores] == [1e-4, 1e-2, 1.0]
    best = max(fit.scores, key=lambda s: (s["val_balanced_accuracy"], -s["val_nll"]))
    assert fit.c == best["C"]
    assert (fit.logits(xv).argmax(1) == yv).mean() > 0.9
    # the weights apply to the raw features: scikit-learn on standardised ones agrees
    from sklearn.linear_model import LogisticRegression

    mean, std = x.mean(0), x.std(0)
    lr = LogisticRegression(C=fit.c, class_weight="balanced", max_iter=2000).fit(
        (x - mean) / std, y
    )
    expected = lr.decision_function((xv - mean) / std)
    np.testing.assert_allclose(fit.logits(xv), expected, rtol=1e-4, atol=1e-3)


def test_fit_probe_two_classes_and_a_missing_class():
    x, y = separable(20, num_classes=2)
    fit = fit_probe(x, y, None, None, 2, cs=(1.0,))
    assert fit.weight.shape == (2, 16) and (fit.logits(x).argmax(1) == y).mean() > 0.9
    with pytest.raises(DataError, match="every class"):
        fit_probe(x, y, None, None, 3)


def test_the_probe_is_the_models_own_linear_head():
    torch.manual_seed(0)
    model = create_classifier("mirage_tiny_patch32_512", 3, depth=2, img_size=64).eval()
    x = torch.rand(6, 1, 64, 64)
    with torch.no_grad():
        features = pooled_features(model, x).numpy()
    fit = fit_probe(features, np.array([0, 1, 2] * 2), None, None, 3, cs=(1.0,))
    before = weights_digest(model)
    apply_probe(model, fit)
    with torch.no_grad():
        logits = model(x).numpy()
    np.testing.assert_allclose(logits, fit.logits(features), rtol=1e-4, atol=1e-4)
    assert weights_digest(model) == before  # the head does not shape the features
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] += 1
    assert weights_digest(model) != before


def test_feature_cache_hits_by_image_content_and_keys_the_preprocessing(tmp_path):
    data = make_bands(tmp_path / "data", counts=(3, 1, 0))
    files = sorted((data / "train").rglob("*.png"))
    samples = [Sample(p, i % 3, p.stem) for i, p in enumerate(files)]
    torch.manual_seed(0)
    model = create_classifier("mirage_tiny_patch32_512", 3, depth=2, img_size=64).eval()
    prep = Preprocessing(input_size=(64, 64), mean=(0.2,), std=(0.2,))
    cpu = torch.device("cpu")
    first = cached_features(model, samples, prep, tmp_path / "cache", cpu)
    assert (first.cached, first.embedded) == (0, len(samples))
    copy = tmp_path / "copy.png"  # the same image under another name and in another list
    copy.write_bytes(files[0].read_bytes())
    second = cached_features(
        model, [Sample(copy, 0, "x"), samples[1]], prep, tmp_path / "cache", cpu
    )
    assert (second.cached, second.embedded) == (2, 0)
    np.testing.assert_array_equal(second.features, first.features[:2])
    other = Preprocessing(input_size=(64, 64), mean=(0.0,), std=(1.0,))
    assert FeatureCache.key("d", prep) != FeatureCache.key("d", other)
    third = cached_features(model, samples[:1], other, tmp_path / "cache", cpu)
    assert third.embedded == 1
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    fourth = cached_features(
        model, [Sample(broken, 0, "b"), samples[0]], prep, tmp_path / "cache", cpu
    )
    assert fourth.unreadable == [str(broken)] and fourth.indices == [1]


# --------------------------------------------------------------------------------------------
# python -m train --mode probe


@pytest.fixture(scope="module")
def bands(tmp_path_factory):
    return make_bands(tmp_path_factory.mktemp("bands") / "data", counts=(12, 5, 5))


def test_probe_mode_writes_a_complete_checkpoint_and_reuses_its_features(bands, tmp_path, capsys):
    args = ["--data", bands, "--cache-dir", tmp_path / "cache", "--mode", "probe", *TINY, *FAST]
    code, out, err = run_train(capsys, *args, "--out", tmp_path / "a")
    assert code == 0, err
    assert "0 from the feature cache, embedded 51 images" in out
    assert "a bare forward" in out
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["overall"]["balanced_accuracy"]["value"] == 1.0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["backbone"] is None  # random weights: saved whole, like any checkpoint
    probe = config["training"]["probe"]
    assert probe["images_embedded"] == 51 and probe["fit_seconds"] > 0
    assert probe["bare_forward_images_per_s"] > 0 and probe["embedding_images_per_s"] > 0
    assert "calibration" in config["training"]  # the common end of every run
    assert "linear probe" in config["description"]
    # another C and another split: every image from the cache
    code, out, err = run_train(
        capsys, *args, "--out", tmp_path / "b", "--probe-c", "0.5", "--val-fraction", "0.3"
    )
    assert code == 0, err
    assert "51 from the feature cache, nothing to embed" in out
    assert "C = 0.5" in out
    # one model for every consumer
    code, out, err = run_train(capsys, "--mode", "probe", "--out", tmp_path / "a", "--resume")
    assert code == 2 and "nothing to resume" in err


def test_a_probe_run_again_on_the_same_scans_sends_none_through_the_backbone(
    bands, tmp_path, capsys, monkeypatch
):
    """Every pass of a probe run reads and fills the feature cache (train, val, the
    temperature, the prediction sets and OOD flag, the test report): the first run sends each
    scan through the backbone once, a second run none, and both report the same."""
    from timm.models.vision_transformer import VisionTransformer

    import train.probe

    images: list[int] = []  # the batch sizes that went through a ViT's forward_features
    real = VisionTransformer.forward_features

    def counting(self, x, *args, **kwargs):
        if x.device.type != "meta":  # loading a checkpoint checks its input size on "meta"
            images.append(len(x))
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(VisionTransformer, "forward_features", counting)
    monkeypatch.setattr(train.probe, "bare_forward_speed", lambda *a, **k: 1.0)  # not a scan
    args = ["--data", bands, "--cache-dir", tmp_path / "cache", "--mode", "probe", *TINY, *FAST]
    code, _, err = run_train(capsys, *args, "--out", tmp_path / "first")
    assert code == 0, err
    assert sum(images) == 36 + 15 + 15  # train, val and test scans, once each
    images.clear()
    code, out, err = run_train(capsys, *args, "--out", tmp_path / "again")
    assert code == 0, err
    assert images == []
    assert "51 from the feature cache, nothing to embed" in out
    first, again = (
        json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("first", "again")
    )
    assert again["overall"] == first["overall"] and again["uncertainty"] == first["uncertainty"]


# --------------------------------------------------------------------------------------------
# A head-only probe on MIRAGE-Base from a (temporary) Hugging Face cache


def add_random_mirage_base(cache: Path, seed: int = 3) -> Path:
    """A randomly initialised MIRAGE-Base, in the Hub's file format, as a cached Hub repo."""
    repo = cache / "models--j-morano--MIRAGE-Base"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    save_file(ref.hub_checkpoint(768, 12, seed=seed), str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot / "model.safetensors"


@pytest.fixture(scope="module")
def hub_mirage(tmp_path_factory):
    """A Hugging Face cache holding a random MIRAGE-Base (HF_HUB_OFFLINE=1 from conftest)."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    weights = add_random_mirage_base(cache)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setenv("HF_HUB_CACHE", str(cache))  # for python -m train in a subprocess
        yield weights


@pytest.fixture(scope="module")
def mirage_probe(hub_mirage, bands, tmp_path_factory):
    """``python -m train --mode probe --model mirage_base_patch32_512 --pretrained``."""
    root = tmp_path_factory.mktemp("probe")
    out = root / "mirage-probe"
    args = ["--data", bands, "--cache-dir", root / "cache", "--out", out, "--mode", "probe"]
    args += ["--model", "mirage_base_patch32_512", "--pretrained", "--img-size", "64", *FAST]
    assert train_main([str(a) for a in args]) == 0
    return out


@pytest.mark.slow  # MIRAGE-Base
def test_a_mirage_probe_checkpoint_holds_the_head_and_names_its_backbone(mirage_probe, hub_mirage):
    weights = mirage_probe / "model.safetensors"
    assert set(load_file(str(weights))) == HEAD_KEYS
    assert weights.stat().st_size < 64_000  # kilobytes: MIRAGE's weights are not in it
    config = json.loads((mirage_probe / "config.json").read_text())
    digest = __import__("hashlib").sha256(hub_mirage.read_bytes()).hexdigest()
    assert config["backbone"] == {
        "weights": "mirage_base_patch32_512.mirage",
        "revision": REVISION,
        "sha256": digest,
    }
    text = (mirage_probe / "config.json").read_text()
    assert "huggingface.co" not in text and "http" not in text
    model, _ = load_checkpoint(mirage_probe)  # the backbone comes from the Hub cache
    expected = ref.encoder_weights(768, 12, seed=3)["encoder.3.attn.proj.weight"]
    assert torch.equal(model.blocks[3].attn.proj.weight, expected)
    head = load_file(str(weights))["head.weight"]
    assert torch.equal(model.head.weight, head)


@pytest.mark.slow  # MIRAGE-Base
def test_every_consumer_takes_the_probe(mirage_probe, bands, tmp_path, capsys):
    metrics = json.loads((mirage_probe / "metrics.json").read_text())
    assert metrics["overall"]["balanced_accuracy"]["value"] > 0.9  # bands: easy even at random
    # train.evaluate reproduces the run's report
    code = evaluate.main(["--checkpoint", str(mirage_probe), "--data", str(bands), "--out",
                          str(tmp_path / "eval"), "--bootstrap", "100"])  # fmt: skip
    assert code == 0
    capsys.readouterr()
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["overall"]["accuracy"] == metrics["overall"]["accuracy"]
    # the CLI
    scan = next((bands / "test" / "TOP").glob("*.png"))
    assert predict.main(["--checkpoint", str(mirage_probe), "--json", str(scan)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["label"] == "TOP"
    # the Predictor and explanations on backbone + head
    p = Predictor.from_pretrained(mirage_probe)
    assert p.predict(scan).label == "TOP"
    for method in ("gradcam", "attention", "rollout"):
        e = p.explain(scan, method=method)
        assert e.heatmap.shape == (48, 64) and np.isfinite(e.heatmap).all()
        assert e.heatmap.max() > e.heatmap.min()


@pytest.mark.slow  # MIRAGE-Base
def test_a_missing_or_changed_backbone_is_one_line(mirage_probe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="j-morano/MIRAGE-Base") as err:
        load_checkpoint(mirage_probe)
    assert "\n" not in str(err.value) and "hf download j-morano/MIRAGE-Base" in str(err.value)
    scan = tmp_path / "x.png"
    scan.write_bytes(b"")
    assert predict.main(["--checkpoint", str(mirage_probe), str(scan)]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
    # a changed file under the same revision: refused
    other = tmp_path / "other"
    add_random_mirage_base(other, seed=4)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(other))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(mirage_probe)


@pytest.mark.parametrize(
    "backbone, message",
    [
        ({"weights": "mirage_base_patch32_512.mirage", "revision": REVISION}, "backbone must"),
        (
            {
                "weights": "mirage_base_patch32_512.mirage",
                "revision": REVISION,
                "sha256": "0" * 64,
                "url": "https://example.com/x",
            },
            "backbone must",
        ),
        ({"weights": "resnet18.a1_in1k", "revision": REVISION, "sha256": "0" * 64}, "weights"),
        (
            {"weights": "mirage_tiny_patch32_512", "revision": REVISION, "sha256": "0" * 64},
            "weights",
        ),
        (
            {"weights": "mirage_base_patch32_512.mirage", "revision": "main", "sha256": "0" * 64},
            "revision",
        ),
        ("j-morano/MIRAGE-Base", "backbone must"),
    ],
)
def test_a_backbone_record_is_data_never_a_location(backbone, message):
    config = CheckpointConfig("mirage_base_patch32_512", ["A", "B"]).to_dict()
    config["backbone"] = backbone
    with pytest.raises(CheckpointError, match=message):
        CheckpointConfig.from_dict(config)


# --------------------------------------------------------------------------------------------
# The app's probe (python app.py --probe), the Space (deploy --probe), push_to_hub


@pytest.fixture(scope="module")
def app_probe(hub_mirage, bands, tmp_path_factory):
    """:func:`bundled_probe` on a small synthetic probe set, its test scans ``bands/test``."""
    root = tmp_path_factory.mktemp("probes")
    options = dict(probe_set=bands, test_set=bands / "test", root=root)
    options["train_args"] = ["--img-size", "64", "--bootstrap", "50", "--threads", "1"]
    lines: list[str] = []
    path = bundled_probe("mirage_base", log=lines.append, **options)
    return path, options, lines


@pytest.mark.slow  # MIRAGE-Base
def test_the_apps_probe_is_fitted_once_then_cached(app_probe, monkeypatch):
    path, options, lines = app_probe
    assert path.name == "MIRAGE-Base-probe"
    assert any("Fitting a probe on mirage_base_patch32_512" in line for line in lines)
    config = json.loads((path / "config.json").read_text())
    assert config["backbone"]["weights"] == "mirage_base_patch32_512.mirage"
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 15  # the test scans

    def no_fitting(*args, **kwargs):
        raise AssertionError("fitted again")

    monkeypatch.setattr("subprocess.Popen", no_fitting)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/nonexistent")  # and no network needed
    assert bundled_probe("mirage_base", **options) == path


def stop_before_serving(registry, **options):
    raise SystemExit((registry.names, options.get("notice")))


@pytest.mark.slow  # MIRAGE-Base
def test_app_serves_the_probe_first(app_probe, monkeypatch):
    _path, options, _ = app_probe
    monkeypatch.setattr(ui_app, "bundled_probe", functools.partial(bundled_probe, **options))
    monkeypatch.setattr(ui_app, "build_app", stop_before_serving)
    with pytest.raises(SystemExit) as stopped:
        ui_app.main(["--probe", "mirage_base"])
    names, notice = stopped.value.code
    assert names[0] == "MIRAGE-Base-probe" and "demo-model (bundled)" in names
    assert notice is None


@pytest.mark.slow  # MIRAGE-Base
def test_app_without_the_backbone_serves_the_bundled_models_with_a_notice(
    app_probe, tmp_path, monkeypatch
):
    path, options, _ = app_probe
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(ui_app, "build_app", stop_before_serving)
    # not fitted yet (another probe set) and offline: the probe cannot be had
    fresh = functools.partial(bundled_probe, **{**options, "root": tmp_path / "probes"})
    monkeypatch.setattr(ui_app, "bundled_probe", fresh)
    with pytest.raises(SystemExit) as stopped:
        ui_app.main(["--probe", "mirage_base"])
    names, notice = stopped.value.code
    assert "MIRAGE-Base-probe" not in names and names[0] == "demo-model (bundled)"
    assert "j-morano/MIRAGE-Base" in notice and "not in the Hugging Face cache" in notice
    # fitted earlier, but the backbone is gone (a Space whose download failed)
    with pytest.raises(SystemExit) as stopped:
        ui_app.main(["--checkpoint", str(path)])
    names, notice = stopped.value.code
    assert "MIRAGE-Base-probe" not in names and "hf download j-morano/MIRAGE-Base" in notice
    # on ZeroGPU the registry left keeps the small models on the CPU
    registry = ui_app.ModelRegistry(available_models([str(path)]), small_on_cpu=True)
    kept = ui_app.without_missing_backbones(registry, [])
    assert "MIRAGE-Base-probe" not in kept.names and kept.small_on_cpu


@pytest.mark.slow  # MIRAGE-Base
def test_space_dry_run_stages_the_head_and_preloads_the_backbone(app_probe, tmp_path, monkeypatch):
    _path, options, _ = app_probe
    import mirage_demo.bundled_probe as module

    monkeypatch.setattr(module, "bundled_probe", functools.partial(bundled_probe, **options))
    out = tmp_path / "space"
    assert space.main(["deploy", "you/oct", "--probe", "mirage_base", "--dry-run", str(out)]) == 0
    meta = read_front_matter(out / "README.md")
    assert meta["preload_from_hub"] == [f"j-morano/MIRAGE-Base model.safetensors {REVISION}"]
    assert "j-morano/MIRAGE-Base" in meta["models"]
    assert meta["license"] == "cc-by-nc-nd-4.0"
    served = out / "checkpoints" / "MIRAGE-Base-probe"
    assert set(load_file(str(served / "model.safetensors"))) == HEAD_KEYS
    assert not (out / "assets" / "probe-set").exists()  # fitted here: not needed there
    big = [p for p in out.rglob("*.safetensors") if p.stat().st_size > 50_000_000]
    assert big == []  # no MIRAGE weights anywhere in the Space


@pytest.mark.slow  # MIRAGE-Base
def test_push_to_hub_uploads_kilobytes(app_probe, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    path, _, _ = app_probe
    directory = tmp_path / "probe"
    shutil.copytree(path, directory)
    uploaded: dict[str, int] = {}

    class Recording(huggingface_hub.HfApi):
        def create_repo(self, *args, **kwargs):
            return None

        def upload_folder(self, *, folder_path, **kwargs):
            for file in Path(folder_path).rglob("*"):
                uploaded[file.name] = file.stat().st_size

    monkeypatch.setattr(huggingface_hub, "HfApi", Recording)
    push_to_hub(directory, "you/mirage-probe")
    assert uploaded["model.safetensors"] < 64_000
    # the head is kilobytes; the rest is the report and the out-of-distribution statistics
    # (class means and a 768x768 precision matrix of MIRAGE-Base's features: 2.4 MB)
    assert sum(v for k, v in uploaded.items() if k != "uncertainty.safetensors") < 1_000_000
    assert uploaded["uncertainty.safetensors"] < 3_000_000
    assert "only the classifier" in (directory / "README.md").read_text()


# --------------------------------------------------------------------------------------------
# The shipped probe set, and a probe on real scans


def test_the_probe_set_is_balanced_small_and_disjoint_from_test_scans_and_examples():
    from mirage_demo.bundled_probe import EXAMPLES, PROBE_SET, TEST_SCANS, _images
    from mirage_demo.data import patient_id
    from mirage_demo.nearcopies import near_copy_pairs, thumbnails

    manifest = json.loads((PROBE_SET / "manifest.json").read_text())
    images = _images(PROBE_SET)
    assert sorted(p.relative_to(PROBE_SET).as_posix() for p in images) == sorted(
        s["image"] for s in manifest["scans"]
    )
    assert sum(p.stat().st_size for p in images) < 15 * 2**20
    counts: dict[tuple[str, str], int] = {}
    for scan in manifest["scans"]:
        counts[scan["split"], scan["class"]] = counts.get((scan["split"], scan["class"]), 0) + 1
    assert len(counts) == 8  # train/val x 4 classes, each part with as many of every class
    assert len({n for (part, _), n in counts.items() if part == "train"}) == 1
    assert len({n for (part, _), n in counts.items() if part == "val"}) == 1
    references = _images(TEST_SCANS) + _images(EXAMPLES)
    shared = {patient_id(p) for p in images} & {patient_id(p) for p in references} - {None}
    assert shared == set()
    rows = thumbnails(images + references)
    near = [(i, j) for i, j, _ in near_copy_pairs(rows, 0.95) if i < len(images) <= j]
    assert near == []
    assert manifest["license"] == "CC BY 4.0" and "Kermany" in manifest["attribution"]
    assert "probe-set" in (REPO / "assets" / "ATTRIBUTION.md").read_text()


@pytest.mark.slow  # 525 real scans through a ResNet-18 at 384
def test_a_probe_on_the_bundled_resnet18_features_learns_real_scans(tmp_path, capsys):
    from mirage_demo.bundled_probe import PROBE_SET, TEST_SCANS, _link_tree

    data = tmp_path / "data"
    for split in ("train", "val"):
        _link_tree(PROBE_SET / split, data / split)
    _link_tree(TEST_SCANS, data / "test")
    weights = REPO / "assets" / "demo-model" / "model.safetensors"
    code, _, err = run_train(
        capsys, "--mode", "probe", "--model", "resnet18", "--weights", weights,
        "--img-size", 384, "--data", data, "--out", tmp_path / "out",
        "--cache-dir", tmp_path / "cache", *FAST,
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    balanced = metrics["overall"]["balanced_accuracy"]
    assert balanced["ci95"][0] > 0.4  # chance: 0.25
    assert metrics["overall"]["macro_auroc"]["value"] > 0.85
    for cls, entry in metrics["per_class"].items():
        assert entry["sensitivity"]["value"] > 0, cls  # every class is found
