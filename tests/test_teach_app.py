"""The teaching views in the served app: explorer, /evaluate, /compare, quiz, example labels.

A 3-class checkpoint (built here) runs through every view, next to the bundled demo model.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

from mirage_demo.inference import DEFAULT_CHECKPOINT
from mirage_demo.ui import EXAMPLES_DIR, ModelChoice, ModelRegistry
from mirage_demo.ui.context import method_name
from mirage_demo.ui.explore import explorer_cell, explorer_open, explorer_view
from mirage_demo.ui.quiz import quiz_answer, quiz_next, quiz_start
from tests.synthetic_oct import tiny_cnn_checkpoint, write_labelled_scans
from tests.test_app import CHROMIUM, CHROMIUM_FLAGS, serving
from train import evaluate

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

THREE = ["CNV", "DME", "NORMAL"]
DEMO = "demo-model (bundled)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data with train/val/test splits, a 3-class checkpoint with its test report written
    from those files, and a copy whose data folder is gone."""
    root = tmp_path_factory.mktemp("teach")
    data = root / "data"
    for offset, (split, count) in enumerate((("train", 1), ("val", 1), ("test", 4))):
        write_labelled_scans(data / split, THREE, count, start=1000 * offset)
    three = tiny_cnn_checkpoint(root / "three", THREE, data=data)
    args = ["--checkpoint", str(three), "--data", str(data), "--bootstrap", "50"]
    assert evaluate.main(args) == 0
    lost = tiny_cnn_checkpoint(root / "lost", THREE, data=root / "gone")
    for name in ("predictions.csv", "metrics.json"):
        (lost / name).write_bytes((three / name).read_bytes())
    return root, data, three, lost


@pytest.fixture(scope="module")
def served(setup):
    _, data, three, lost = setup
    registry = ModelRegistry(
        [
            ModelChoice(DEMO, str(DEFAULT_CHECKPOINT)),
            ModelChoice("three", str(three)),
            ModelChoice("lost", str(lost)),
        ],
        data_roots=[data],  # as python app.py --data-root DATA: its scans may be shown
    )
    with serving(registry) as url:
        yield url, registry


@pytest.fixture(scope="module")
def client(served):
    return Client(served[0], verbose=False)


def test_evaluate_endpoint_reproduces_train_evaluate(setup, client, tmp_path):
    _, data, three, _ = setup
    cli = tmp_path / "cli"
    args = ["--checkpoint", str(three), "--data", str(data), "--split", "test", "--out", str(cli)]
    assert evaluate.main(args) == 0  # the app's bootstrap: 1000 resamples, seed 0
    archive = tmp_path / "labelled.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for image in sorted((data / "test").rglob("*.png")):
            zf.write(image, image.relative_to(data / "test").as_posix())
    outputs = client.predict([handle_file(str(archive))], "three", api_name="/evaluate")
    note, report, *_, csv_file, numbers, matrix, _ = outputs
    expected = json.loads((cli / "metrics.json").read_text())
    for key in ("overall", "per_class", "confusion_matrix", "images_per_class", "num_images"):
        assert numbers[key] == expected[key], key
    assert "12 labelled scans" in note and "Balanced accuracy" in report
    rows = Path(csv_file).read_text().splitlines()
    assert rows[0] == (Path(cli) / "predictions.csv").read_text().splitlines()[0]  # as the CLI's
    assert rows[0].startswith("file,true,predicted,prob_CNV,prob_DME,prob_NORMAL,trust,")
    assert len(rows) == 13
    assert matrix["headers"][1:] == THREE


def test_evaluate_counts_files_it_left_out(setup, client, tmp_path):
    _, data, _, _ = setup
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for image in sorted((data / "test").rglob("*.png"))[:4]:
            zf.write(image, image.relative_to(data / "test").as_posix())
        zf.writestr("CNV/broken.png", b"not a png")
        zf.writestr("CNV/inner.zip", b"PK")
        zf.writestr("notes.txt", b"hello")
    note, *_ = client.predict([handle_file(str(archive))], "three", api_name="/evaluate")
    assert "4 labelled scans evaluated" in note
    # broken.png is refused from its header, before anything of it is written
    assert "Left out: 2 (mixed.zip/CNV/inner.zip: skipped: a zip inside a zip" in note


def test_evaluate_names_unknown_classes(client, tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(EXAMPLES_DIR / "DRUSEN" / "DRUSEN-163081-1.jpeg", "DRUSEN/a.jpeg")
    with pytest.raises(Exception, match="DRUSEN"):  # the 3-class model has no DRUSEN
        client.predict([handle_file(str(archive))], "three", api_name="/evaluate")


@pytest.mark.parametrize("model", [DEMO, "three"])
def test_compare_endpoint_gives_one_map_and_score_per_method(served, client, model):
    registry = served[1]
    methods = registry.get(model).methods
    scan = EXAMPLES_DIR / "DME" / "DME-11053-1.jpeg"
    gallery, table, text = client.predict(
        handle_file(str(scan)), model, "the predicted class", api_name="/compare"
    )
    assert len(gallery) == 2 * len(methods)  # each map, then its randomised twin
    *rows, chance = table["data"]
    assert [row[0] for row in rows] == [method_name(m) for m in methods]
    assert all(isinstance(row[1], float) and -1 <= row[5] <= 1 for row in rows)
    assert chance[0] == "A random map (chance level)" and isinstance(chance[1], float)
    assert "Labelled DME" in text.replace(
        "**", ""
    )  # a bundled example: its reference label is shown


def test_compare_json_gives_each_methods_numbers(served, client):
    scan = EXAMPLES_DIR / "DRUSEN" / "DRUSEN-228939-1.jpeg"
    record = client.predict(
        handle_file(str(scan)), DEMO, "the predicted class", api_name="/compare_json"
    )
    methods = record["methods"]
    assert [m["method"] for m in methods] == list(served[1].get(DEMO).methods)
    for entry in methods:
        assert set(entry) == {"method", "faithfulness", "morf", "lerf", "sanity_rho", "same_as"}
        assert entry["faithfulness"] == pytest.approx((entry["lerf"] - entry["morf"]) / 2, abs=1e-3)
        assert -1 <= entry["sanity_rho"] <= 1
    same = {m["method"]: m["same_as"] for m in methods}
    assert same["hirescam"] == "gradcam" and same["gradcam"] is None
    assert set(record["random_reference"]) == {"faithfulness", "morf", "lerf"}
    assert record["target"] == record["label"] and record["fractions"]
    # another class explained: its log-odds followed
    other = client.predict(handle_file(str(scan)), DEMO, "NORMAL", api_name="/compare_json")
    assert other["target"] == "NORMAL"


def test_example_scans_show_their_label_and_the_disagreement(client):
    for cls, name in (("DME", "DME-11053-1.jpeg"), ("CNV", "CNV-451136-1.jpeg")):
        _, probabilities, info = client.predict(
            handle_file(str(EXAMPLES_DIR / cls / name)),
            DEMO,
            "gradcam",
            "the predicted class",
            0.5,
            api_name="/explain",
        )
        predicted = probabilities["label"]
        if predicted == cls:
            assert f"Labelled **{cls}**; the model agrees" in info
        else:
            assert f"Labelled {cls}; the model says {predicted}" in info


@pytest.mark.parametrize("model", ["three", DEMO])
def test_explorer_and_quiz_work_for_every_checkpoint(served, model):
    registry = served[1]
    predictor = registry.get(model)
    names = list(predictor.class_names)
    _, message, state = explorer_view(registry.scan_set(model), registry.report(model), names)
    assert state.scans is not None and "Choose a cell" in message
    total = sum(map(sum, state.counts))
    assert total == registry.report(model)["num_images"]
    row = max(range(len(names)), key=lambda r: sum(state.counts[r]))
    column = max(range(len(names)), key=lambda c: state.counts[row][c])
    gallery, text, state = explorer_cell(state, row, column + 1)
    assert len(gallery) == min(60, state.counts[row][column]) > 0
    assert f"labelled {names[row]}, predicted {names[column]}" in text
    overlay, caption = explorer_open(predictor, state, 0)
    assert overlay.size[0] > 0 and f"Labelled {names[row]}" in caption.replace("**", "")

    quiz, image, _ = quiz_start(registry.scan_set(model), names, 3, seed=0)
    seen = []
    while not quiz.finished:
        seen.append(image)
        _, feedback, score, _ = quiz_answer(predictor, quiz, names[0])
        assert "Reference:" in feedback
        image, text = quiz_next(quiz)
    assert len(set(seen)) == 3 and "Round over" in text and "You:" in score


def test_unreachable_test_scans_are_said_plainly(setup):
    """Its config.json names a data folder; the app was given none: no scans, said plainly."""
    registry = ModelRegistry([ModelChoice("lost", str(setup[3]))], data_roots=[])
    names = list(registry.get("lost").class_names)
    _, message, state = explorer_view(registry.scan_set("lost"), registry.report("lost"), names)
    assert state.scans is None and "not reachable here" in message
    assert sum(map(sum, state.counts)) == 12  # the report's matrix is still shown
    gallery, text, _ = explorer_cell(state, 0, 1)
    assert gallery == [] and "not available" in text
    quiz, _, text = quiz_start(registry.scan_set("lost"), names, 5)
    assert quiz is None and "not reachable here" in text


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium")
def test_browser_clicks_a_confusion_matrix_cell_and_sees_its_scans(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    registry = served[1]
    counts = registry.report(DEMO)["confusion_matrix"]
    row, column = max(
        ((r, c) for r in range(len(counts)) for c in range(len(counts)) if r != c),
        key=lambda rc: counts[rc[0]][rc[1]],
    )  # the largest off-diagonal cell: a mistake
    names = registry.get(DEMO).class_names
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(served[0])
            page.get_by_role("tab", name="Model").click()
            cell = page.locator(f"#explorer-matrix [data-testid=cell-{row}-{column + 1}]")
            cell.click(timeout=60_000)
            sync_api.expect(page.locator("#explorer-cell")).to_contain_text(
                f"{counts[row][column]} scans labelled {names[row]}, predicted {names[column]}",
                timeout=60_000,
            )
            thumbnails = page.locator("#explorer-gallery img")
            sync_api.expect(thumbnails).to_have_count(counts[row][column], timeout=30_000)
            thumbnails.first.click()
            page.locator("#explorer-overlay img").wait_for(timeout=60_000)
            sync_api.expect(page.locator("#explorer-caption")).to_contain_text(
                re.compile(f"[Ll]abelled {names[row]}")
            )
            page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
        finally:
            browser.close()


def test_a_three_class_checkpoint_classifies_explains_and_batches(client, setup):
    scan = EXAMPLES_DIR / "NORMAL" / "NORMAL-1384-3.jpeg"
    _, probabilities, info = client.predict(
        handle_file(str(scan)), "three", "gradcam", "DME", 0.5, api_name="/explain"
    )
    assert {c["label"] for c in probabilities["confidences"]} == set(THREE)
    assert "Labelled **NORMAL**" in info or "Labelled NORMAL;" in info  # a bundled example
    drusen = EXAMPLES_DIR / "DRUSEN" / "DRUSEN-163081-1.jpeg"
    *_, info = client.predict(
        handle_file(str(drusen)), "three", "gradcam", "DME", 0.5, api_name="/explain"
    )
    assert "Labelled **DRUSEN**, a class this model does not know" in info
    table, _, _ = client.predict([handle_file(str(scan))], "three", api_name="/batch")
    assert table["headers"][2:5] == [f"p({c})" for c in THREE]
