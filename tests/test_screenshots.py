"""``python docs/screenshots.py``: the README's screenshots, made from the running app."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow  # serves the app and drives headless Chromium
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed (.ci/run installs it)")
def test_the_screenshot_command_writes_small_pngs_of_the_app(tmp_path):
    pytest.importorskip("playwright.sync_api")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("MIRAGE_DEMO_CHECKPOINTS", None)  # the bundled models, as the README's are
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "screenshots.py"), "--out", str(tmp_path)],
        cwd=tmp_path,  # from anywhere, not only the repository root
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    views = [
        "classify",
        "classify-phone",
        "compare",
        "compare-phone",
        "model",
        "volume",
        "volume-strip",
        "volume-phone",
        "batch-volume",
        "batch-volume-phone",
        "pretraining",
        "pretraining-phone",
    ]
    sizes = {n: (390, 844) if n.endswith("-phone") else (1440, 900) for n in views}
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{n}.png" for n in sizes)
    for name, size in sizes.items():
        path = tmp_path / f"{name}.png"
        assert path.stat().st_size < 300_000, name
        image = Image.open(path)
        assert image.format == "PNG" and image.size == size, name
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert pixels.std() > 10, f"{name} is nearly blank"
    # the Classify screenshots show the picked example's heat map: colour, not only gray UI
    rgb = np.asarray(Image.open(tmp_path / "classify.png").convert("RGB"), dtype=np.int16)
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 100).mean() > 0.01
