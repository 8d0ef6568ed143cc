"""Adapt (a probe on the served model's frozen features, /adapt) and the feature map.

The upload is a zip of real scans bundled with the app (``assets/test-scans``: CNV and NORMAL,
a two-class task the served model was not trained for); the served model is a small untrained
checkpoint, so everything runs in seconds.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mirage_demo.adapt import adapted_model, cross_validate, label_efficiency
from mirage_demo.data import DataError, Sample, patient_id
from mirage_demo.evaluation import labelled_upload
from mirage_demo.featuremap import nearest_point, plot_feature_map, project
from mirage_demo.metrics import compute_metrics
from mirage_demo.probe import fit_probe
from mirage_demo.testscans import BUNDLED_SCANS, read_predictions, scan_set_for
from mirage_demo.ui import ModelChoice, ModelRegistry
from mirage_demo.ui.featuremap import feature_map_choose, feature_map_click, feature_map_for
from tests.synthetic_oct import tiny_cnn_checkpoint
from tests.test_app import CHROMIUM, CHROMIUM_FLAGS, serving
from train.cli import main as train_main

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FOUR = ["CNV", "DME", "DRUSEN", "NORMAL"]
TWO = ["CNV", "NORMAL"]
PER_CLASS = 12


def real_scans(cls: str, count: int) -> list[Path]:
    """Bundled real scans of one class, one per patient (where the name gives one)."""
    seen, chosen = set(), []
    for path in sorted((BUNDLED_SCANS / "images" / cls).iterdir()):
        patient = patient_id(path) or path.name
        if patient not in seen:
            seen.add(patient)
            chosen.append(path)
    return chosen[:count]


def labelled_zip(path: Path, classes=TWO, per_class=PER_CLASS) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for cls in classes:
            for scan in real_scans(cls, per_class):
                archive.write(scan, f"my-scans/{cls}/{scan.name}")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    checkpoint = tiny_cnn_checkpoint(root / "served", FOUR, seed=3)
    return root, checkpoint, labelled_zip(root / "cnv-normal.zip")


@pytest.fixture(scope="module")
def served(setup):
    _, checkpoint, _ = setup
    registry = ModelRegistry([ModelChoice("served", str(checkpoint))])
    with serving(registry) as url:
        yield url, registry


@pytest.fixture(scope="module")
def adapted(served, setup):
    """/adapt called once on the zip (through gradio_client)."""
    client = Client(served[0], verbose=False)
    return client.predict([handle_file(str(setup[2]))], "served", api_name="/adapt")


# --------------------------------------------------------------------------------------------
# The library


def test_an_upload_of_any_classes_takes_its_folder_names(tmp_path):
    archive = labelled_zip(tmp_path / "any.zip", ["CNV", "NORMAL"], 2)
    upload = labelled_upload([("any.zip", str(archive))], None, tmp_path / "out")
    assert upload.class_names == ["CNV", "NORMAL"] and len(upload.samples) == 4
    known = labelled_upload([("any.zip", str(archive))], FOUR, tmp_path / "out2")
    assert known.class_names == FOUR  # the checkpoint's classes, as /evaluate asks


@pytest.mark.parametrize("folder", ["..", ".hidden", "<img src=x>", "x" * 41])
def test_an_upload_whose_class_is_not_a_plain_name_is_refused(tmp_path, folder):
    scan = real_scans("CNV", 1)[0]
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(scan, f"{folder}/{scan.name}")
        zf.write(scan, f"CNV/{scan.name}")
    with pytest.raises(DataError, match="not a plain name"):
        labelled_upload([("bad.zip", str(archive))], None, tmp_path / "out")
    assert not any((tmp_path / "out").rglob("*.jpg"))  # refused before anything is written


def test_adapted_model_shares_the_backbone_and_leaves_the_served_model_alone(setup):
    import timm

    model = timm.create_model("resnet10t", in_chans=1, num_classes=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = fit_probe(
        np.random.randn(6, model.num_features), np.array([0, 1, 0, 1, 0, 1]), None, None, 2
    )
    twin = adapted_model(model, fit)
    x = torch.randn(2, 1, 64, 64)
    assert model(x).shape == (2, 4) and twin(x).shape == (2, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert twin.conv1[0].weight is model.conv1[0].weight  # shared, not copied
    assert twin.get_classifier() is not model.get_classifier()
    features = model.forward_head(model.forward_features(x), pre_logits=True).detach().numpy()
    assert torch.allclose(twin(x), torch.from_numpy(fit.logits(features)).float(), atol=1e-4)


def test_label_efficiency_rises_with_labels_on_separable_features():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    features = rng.normal(size=(60, 8)) + labels[:, None] * 1.5  # overlapping clusters
    samples = [Sample(Path(f"{c}/{i}.png"), int(c), f"patient:{i}") for i, c in enumerate(labels)]
    cv = cross_validate(features, samples, 2, folds=3)
    rows = label_efficiency(features, labels, cv, 2, sizes=(1, 2, 5, 10), draws=8)
    assert [r["per_class"] for r in rows] == [1, 2, 5, 10]
    assert rows[-1]["mean"] > rows[0]["mean"] and rows[-1]["mean"] > 0.8
    assert all(r["low"] <= r["mean"] <= r["high"] for r in rows)
    assert set(cv.folds.tolist()) == {0, 1, 2}


def test_feature_map_click_finds_the_point_drawn_there(tmp_path):
    from mirage_demo.featuremap import FeatureMap
    from mirage_demo.testscans import ScanEntry

    entries = [
        ScanEntry(f"{c}/{i}.jpg", Path(f"{i}.jpg"), c, c if i % 4 else "B", {"A": 0.5, "B": 0.5})
        for i, c in enumerate(["A", "B"] * 6)
    ]
    coords = {"PCA": project(np.random.default_rng(1).normal(size=(12, 5)), "PCA")}
    fmap = FeatureMap(["A", "B"], entries, coords)
    pixels = plot_feature_map(fmap, "PCA", tmp_path / "map.png")
    width, height = Image.open(tmp_path / "map.png").size
    assert (pixels[:, 0] >= 0).all() and (pixels[:, 0] < width).all()
    assert (pixels[:, 1] >= 0).all() and (pixels[:, 1] < height).all()
    for index in (0, 7, 11):
        x, y = pixels[index]
        assert nearest_point(pixels, x + 2, y - 2) == index
    assert nearest_point(pixels, -100, -100) is None


# --------------------------------------------------------------------------------------------
# /adapt against python -m train --mode probe


def test_adapt_endpoint_gives_the_report_of_train_mode_probe(setup, adapted, tmp_path):
    """Each fold of /adapt's cross-validation is ``python -m train --mode probe`` with the other
    folds as train/ (val carved by the trainer) and this fold as test/: run the CLI on each,
    pool its test predictions, and the report is /adapt's."""
    _, checkpoint, _ = setup
    note, report, _, _, metrics, curve = adapted[:6]
    fold_of = metrics["cross_validation"]["fold_of"]
    assert len(fold_of) == 2 * PER_CLASS and metrics["class_names"] == TWO
    sources = {p.name: p for cls in TWO for p in real_scans(cls, PER_CLASS)}
    rows = {}
    for k in range(metrics["cross_validation"]["folds"]):
        data = tmp_path / f"fold{k}"
        for file, fold in fold_of.items():
            split = "test" if fold == k else "train"
            target = data / split / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sources[Path(file).name], target)
        out = tmp_path / f"run{k}"
        args = [
            "--mode", "probe", "--data", data, "--out", out, "--model", "resnet10t",
            "--weights", checkpoint / "model.safetensors", "--img-size", 128,
            "--cache-dir", tmp_path / "cache", "--no-progress", "--bootstrap", 10,
        ]  # fmt: skip
        assert train_main([str(a) for a in args]) == 0
        for row in read_predictions(out / "predictions.csv", TWO):  # file: test/<CLASS>/<name>
            rows[row["file"].removeprefix("test/")] = row
    files = list(fold_of)
    labels = [TWO.index(rows[f]["true"]) for f in files]
    probs = np.array([[rows[f]["probabilities"][c] for c in TWO] for f in files])
    expected = compute_metrics(labels, probs, TWO, split="cross-validated", n_bootstrap=1000)
    assert metrics["confusion_matrix"] == expected["confusion_matrix"]
    for name, value in expected["overall"].items():
        assert metrics["overall"][name]["value"] == pytest.approx(value["value"], abs=1e-4), name
    for cls in TWO:
        got, want = metrics["per_class"][cls], expected["per_class"][cls]
        assert got["sensitivity"] == want["sensitivity"], cls  # counts: exact, CIs included
    assert "cross-validated" in report and "Balanced accuracy" in report
    assert "24 of your scans" in note
    assert curve and curve[0]["per_class"] == 1


def test_adapt_refuses_one_class_and_names_it(served, tmp_path):
    archive = labelled_zip(tmp_path / "one.zip", ["CNV"], 4)
    client = Client(served[0], verbose=False)
    with pytest.raises(Exception, match="only one class"):
        client.predict([handle_file(str(archive))], "served", api_name="/adapt")


# --------------------------------------------------------------------------------------------
# The feature map, served


def test_feature_map_opens_the_scan_chosen(tmp_path):
    """The bundled model's map of its bundled test scans: the point drawn at a pixel opens
    that scan, with its map."""
    from mirage_demo.inference import DEFAULT_CHECKPOINT, Predictor

    predictor = Predictor.from_pretrained(DEFAULT_CHECKPOINT)
    scans, _ = scan_set_for(DEFAULT_CHECKPOINT)
    scans.entries = scans.entries[::9]  # 25 scans: seconds, not a minute
    path, text, state = feature_map_for(predictor, scans, "t-SNE")
    assert Path(path).is_file() and f"{len(scans.entries)} scans" in text
    wrong = int(np.flatnonzero(state.fmap.wrong)[0])
    x, y = state.pixels[wrong]
    index = feature_map_click(state, x + 1, y + 1)
    assert index == wrong
    _, overlay, caption, state = feature_map_choose(predictor, state, index)
    entry = state.fmap.entries[wrong]
    assert Path(overlay).is_file() and entry.file in caption
    assert f"Labelled {entry.true}; the model says" in caption.replace("**", "")


@pytest.mark.slow  # headless Chromium
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium")
def test_browser_adapts_to_a_zip_and_classifies_with_the_adapted_model(served, setup, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    scan = real_scans("NORMAL", PER_CLASS + 1)[-1]  # not in the zip
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            # wide enough for every tab in the bar (narrower, the last ones fold into a menu)
            page = browser.new_page(viewport={"width": 1900, "height": 1000})
            page.goto(served[0])
            page.get_by_role("tab", name="Adapt to your scans").click(timeout=120_000)
            page.locator("#adapt-files input[type=file]").set_input_files(str(setup[2]))
            page.get_by_role("button", name="Adapt the model to these scans").click()
            expect(page.locator("#adapt-note")).to_contain_text("cross-validated", timeout=120_000)
            expect(page.locator("#adapt-report")).to_contain_text("Balanced accuracy")
            page.locator("#adapt-curve img").wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "adapt.png"), full_page=True)
            page.get_by_role("button", name="Use it: serve the adapted model here").click()
            expect(page.locator("#adapt-served")).to_contain_text("Now serving", timeout=60_000)
            page.get_by_role("tab", name="Classify").click()
            page.locator("input[type=file]").first.set_input_files(str(scan))
            labels = page.locator("#probabilities")
            expect(labels).to_contain_text("NORMAL", timeout=60_000)
            expect(labels).not_to_contain_text("DRUSEN")  # two classes: the adapted model's
            page.screenshot(path=str(tmp_path / "classify-adapted.png"), full_page=True)
        finally:
            browser.close()
    shots = Path("/tmp/adapt-shots")
    if shots.is_dir():  # kept for a person to look at
        for name in ("adapt.png", "classify-adapted.png"):
            shutil.copyfile(tmp_path / name, shots / name)
