"""The feature map of the bundled models ships precomputed (issue 29): current, checked, never
silently wrong; opened in the browser within seconds."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from mirage_demo.featuremap import (
    PRECOMPUTED_NAME,
    capped,
    compute_feature_map,
    load_precomputed,
    map_digest,
)
from mirage_demo.inference import DEFAULT_CHECKPOINT
from mirage_demo.testscans import ScanSet, scan_set_for
from mirage_demo.ui.featuremap import feature_map_status

pytestmark = pytest.mark.usefixtures("one_thread")

BUNDLED = DEFAULT_CHECKPOINT.parent
RERUN = "python -m mirage_demo.featuremap assets/demo-model assets/demo-vit"


@pytest.mark.parametrize("name", ["demo-model", "demo-vit"])
def test_the_bundled_models_maps_are_precomputed_and_current(name):
    """Fails after retraining or re-bundling the test scans until the command is re-run."""
    directory = BUNDLED / name
    scans, _ = capped(scan_set_for(directory)[0])
    fmap = load_precomputed(directory, scans)
    assert fmap is not None, f"{directory / PRECOMPUTED_NAME} is missing or stale: run {RERUN}"
    assert len(fmap.entries) == len(scans.entries) and set(fmap.coords) == {"t-SNE", "PCA"}
    assert (directory / PRECOMPUTED_NAME).stat().st_size < 64 * 1024
    note, ready = feature_map_status(directory, (scans, ""))
    assert ready and "opens at once" in note


def test_a_stale_or_malformed_map_is_never_shown(tmp_path):
    """Other weights, other scans, a damaged file: not used (the map is computed instead)."""
    directory = tmp_path / "demo-vit"  # the bundled scans' manifest is found by this name
    shutil.copytree(BUNDLED / "demo-vit", directory)
    scans, _ = capped(scan_set_for(directory)[0])
    assert load_precomputed(directory, scans) is not None  # an exact copy: current
    relabelled = ScanSet(scans.class_names, list(scans.entries), scans.origin)
    first = relabelled.entries[0]
    other = next(c for c in scans.class_names if c != first.true)
    relabelled.entries[0] = dataclasses.replace(first, true=other)
    assert load_precomputed(directory, relabelled) is None
    stored = json.loads((directory / PRECOMPUTED_NAME).read_text())
    stored["coords"]["PCA"][0] = [float("nan"), 0.0]
    (directory / PRECOMPUTED_NAME).write_text(json.dumps(stored))
    assert load_precomputed(directory, scans) is None
    shutil.copyfile(BUNDLED / "demo-vit" / PRECOMPUTED_NAME, directory / PRECOMPUTED_NAME)
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert map_digest(directory, scans) != map_digest(BUNDLED / "demo-vit", scans)
    assert load_precomputed(directory, scans) is None
    note, ready = feature_map_status(directory, (scans, ""))
    assert not ready and "not precomputed" in note


@pytest.mark.slow  # embeds the 452 bundled scans (minutes on a busy CPU)
def test_the_precomputed_pca_is_the_models_own():
    """The shipped PCA coordinates are those of the tiny ViT's features of its test scans (up
    to the sign of each axis): the file holds the model's map, not just a matching digest."""
    import torch

    from mirage_demo.checkpoint import load_checkpoint

    directory = BUNDLED / "demo-vit"
    scans, _ = capped(scan_set_for(directory)[0])
    stored = load_precomputed(directory, scans)
    model, config = load_checkpoint(directory)
    fresh = compute_feature_map(model, config.preprocessing, scans, torch.device("cpu"), ["PCA"])
    signs = np.sign((stored.coords["PCA"] * fresh.coords["PCA"]).sum(axis=0))
    scale = np.abs(fresh.coords["PCA"]).max()
    assert np.abs(stored.coords["PCA"] - signs * fresh.coords["PCA"]).max() < 0.01 * scale


@pytest.mark.slow  # headless Chromium
def test_browser_shows_the_bundled_models_map_within_seconds(tmp_path):
    """Issue 29: the bundled model's feature map appears within 15 s of the click."""
    from tests.test_app import CHROMIUM, CHROMIUM_FLAGS, serving

    if not CHROMIUM.exists():
        pytest.skip("needs Chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    from mirage_demo.ui import ModelChoice, ModelRegistry

    registry = ModelRegistry([ModelChoice("demo-model (bundled)", str(DEFAULT_CHECKPOINT))])
    shots = Path("/tmp/featuremap-shots")
    with serving(registry) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            for width, height in ((1440, 900), (390, 844)):
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(url)
                page.get_by_role("tab", name="Model").click(timeout=120_000)
                button = page.get_by_role("button", name="Show the feature map")
                button.wait_for(timeout=60_000)
                sync_api.expect(page.locator("#featuremap-note")).to_contain_text("precomputed")
                started = time.perf_counter()
                button.click()
                page.locator("#featuremap-plot img").wait_for(timeout=15_000)
                assert time.perf_counter() - started < 15
                sync_api.expect(page.locator("#featuremap-text")).to_contain_text("452 scans")
                page.locator("#featuremap-plot").scroll_into_view_if_needed()
                page.screenshot(path=str(tmp_path / f"map-{width}.png"))
                page.close()
        finally:
            browser.close()
    if shots.is_dir():  # kept for a person to look at
        for png in tmp_path.glob("map-*.png"):
            shutil.copyfile(png, shots / png.name)
