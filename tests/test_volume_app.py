"""The Volume tab and volumes in Batch: ``/volume`` and ``/batch`` through ``gradio_client``,
the slider's handlers, and the tab in headless Chromium (the arrow keys move through the
B-scans)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from mirage_demo.ui import ModelChoice, ModelRegistry
from mirage_demo.ui.volume import (
    EXAMPLE_VOLUME,
    classify_volume_upload,
    explain_bscan,
    slice_pictures,
)
from mirage_demo.volume_example import PATTERN, chosen_scans
from mirage_demo.volume_io import load_volume
from mirage_demo.volume_predict import classify_volume, summarize
from tests.test_app import CHROMIUM, CHROMIUM_FLAGS, CNV_SCAN, serving, tiny_checkpoint

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

COUNT = sum(count for _, count in PATTERN)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("volume-app") / "tiny")
    return ModelRegistry([ModelChoice("tiny", str(checkpoint))])


@pytest.fixture(scope="module")
def served(registry):
    with serving(registry) as url:
        yield url


@pytest.fixture(scope="module")
def client(served):
    return Client(served, verbose=False)


def test_example_volume_is_the_bundled_real_scans():
    """The bundled example: 25 frames, each the bundled real JPEG named in its provenance."""
    assert EXAMPLE_VOLUME.stat().st_size < 2 * 2**20
    scans = chosen_scans()
    with load_volume(EXAMPLE_VOLUME) as volume:
        assert len(volume) == COUNT == len(scans)
        for bscan, path in zip(volume.bscans, scans, strict=True):
            np.testing.assert_array_equal(bscan, np.asarray(Image.open(path).convert("L")))


def test_volume_endpoint_summary_matches_the_library(client, registry):
    text, record, slider = client.predict(
        handle_file(str(EXAMPLE_VOLUME)), "tiny", api_name="/volume"
    )
    with load_volume(EXAMPLE_VOLUME) as volume:
        results = list(classify_volume(registry.get("tiny"), volume))
    expected = summarize(results, registry.get("tiny").class_names)
    assert record["slices"] == COUNT
    assert record["per_class_slices"] == expected.per_class_slices
    assert record["key_slice"] == expected.key_slice
    assert slider["value"] == expected.key_slice + 1 and slider["maximum"] == COUNT
    assert "25 B-scans of 384x372 pixels (DICOM Ophthalmic Tomography)" in text
    assert f"rests on B-scan {expected.key_slice + 1}" in text


def test_slider_handlers_show_the_classified_bscan(registry):
    state, _, record = classify_volume_upload(registry, str(EXAMPLE_VOLUME), "tiny")
    strip, where = slice_pictures(state, 3)
    for path in (strip, where):
        with Image.open(path) as picture:
            assert picture.width > 300 and picture.height > 150
    overlay, probabilities, answer = explain_bscan(registry, state, 3)
    assert "**B-scan 3 of 25**" in answer
    with Image.open(overlay) as shown:
        assert shown.size == (384, 372)
    classified = dict(zip(state["classes"], state["probabilities"][2].tolist(), strict=True))
    assert probabilities == pytest.approx(classified, abs=1e-5)  # float noise: batch of 8 vs 1
    assert state["labels"][2] == max(probabilities, key=probabilities.get)
    assert record["slices"] == COUNT
    assert slice_pictures(None, 1) == (None, None)
    assert explain_bscan(registry, state, 999)[2].startswith("**B-scan 25 of 25**")


def test_unreadable_volume_is_one_clear_error(client, tmp_path):
    bad = tmp_path / "eye.vol"
    bad.write_bytes(b"HSF-OCT-103 " + b"\x00" * 64)
    with pytest.raises(Exception, match="not a Heidelberg .vol file"):
        client.predict(handle_file(str(bad)), "tiny", api_name="/volume")


def test_batch_gives_a_row_per_bscan_and_a_summary_row(client):
    table, csv_file, summary = client.predict(
        [handle_file(str(CNV_SCAN)), handle_file(str(EXAMPLE_VOLUME))], api_name="/batch"
    )
    rows = table["data"]
    assert len(rows) == 1 + COUNT + 1
    assert rows[0][0] == CNV_SCAN.name
    assert [row[0] for row in rows[1:-1]] == [
        f"example-eye.dcm [B-scan {i + 1}]" for i in range(COUNT)
    ]
    last = rows[-1]
    assert last[0] == "example-eye.dcm: the whole volume" and last[1].startswith("volume: ")
    assert "rests on B-scan" in last[-1]
    with open(csv_file, newline="") as stream:
        written = list(csv.reader(stream))
    assert len(written) == 1 + len(rows)
    assert "rests on B-scan" in written[-1][written[0].index("warnings")]
    assert f"{1 + COUNT} classified" in summary
    assert "**example-eye.dcm: the whole volume** (its row at the end): " in summary


@pytest.mark.slow  # headless Chromium
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed (.ci/run installs it)")
def test_browser_example_volume_and_arrow_keys(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(served)
            page.get_by_role("tab", name="Volume").click()
            page.get_by_text("example-eye.dcm").first.click()
            answer = page.locator("#volume-answer")
            sync_api.expect(page.locator("#volume-summary")).to_contain_text(
                "rests on B-scan", timeout=120_000
            )
            sync_api.expect(answer).to_contain_text("of 25", timeout=60_000)
            shown = int(answer.inner_text().split("B-scan ")[1].split(" of")[0])
            page.locator("#volume-slider input[type=range]").focus()
            key = "ArrowLeft" if shown > 1 else "ArrowRight"
            page.keyboard.press(key)
            moved = shown - 1 if key == "ArrowLeft" else shown + 1
            sync_api.expect(answer).to_contain_text(f"B-scan {moved} of 25", timeout=60_000)
            for picture in ("#volume-bscan img", "#volume-strip img", "#volume-map img"):
                assert page.locator(picture).evaluate("img => img.naturalWidth") > 300
            page.screenshot(path=str(tmp_path / "volume.png"), full_page=True)
        finally:
            browser.close()
