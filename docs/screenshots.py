"""The README's screenshots, made from the running app: ``python docs/screenshots.py``.

Starts ``python app.py`` (the bundled models) on a free local port, opens it in headless
Chromium (Playwright) and writes optimised PNGs into ``docs/img/`` (or ``--out``): the Classify
tab after picking a bundled example, at 1440x900 and on a phone (390x844), the Model, Volume,
Batch and How it learned tabs.
Run it again after changing a view.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

from PIL import Image
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the repository's package

from mirage_demo.ui.context import example_order, example_scans  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run"]
OUT = ROOT / "docs" / "img"
MAX_BYTES = 300_000  # each PNG stays under this (the README is the Space's card)
EXAMPLE = "DME"  # the bundled example picked in the Classify screenshots
VOLUME_FILE = ROOT / "assets" / "volumes" / "example-eye.dcm"  # the Volume and Batch shots
VOLUME_EXAMPLE = VOLUME_FILE.name
DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 120_000  # a first answer loads the model (seconds on a busy 2-core machine)


def free_port() -> int:
    """A free local TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(timeout: float = 300.0) -> Iterator[str]:
    """``python app.py`` (the bundled models) on a free local port until ready; its URL.
    Stopped on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if app.poll() is not None:
                raise SystemExit(f"error: python app.py stopped (exit status {app.returncode})")
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    message = f"error: the app did not answer on {url} in {timeout:.0f} s"
                    raise SystemExit(message) from None
                time.sleep(1)
        yield url
    finally:
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()


def save_png(png: bytes, path: Path, max_bytes: int = MAX_BYTES) -> Path:
    """Write a screenshot as an optimised PNG; quantised to 256 colours if still too large."""
    image = Image.open(BytesIO(png)).convert("RGB")
    image.save(path, optimize=True)
    if path.stat().st_size > max_bytes:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def example_index(cls: str = EXAMPLE) -> int:
    """The place of the first bundled example of class ``cls`` among the thumbnails (they are
    shown in :func:`~mirage_demo.ui.context.example_order`, named "Example scan N")."""
    ordered = example_order(example_scans())
    return next(n for n, (_, label) in enumerate(ordered) if label == cls)


def classify_example(page) -> None:
    """Pick the bundled example and wait for its answer and heat map."""
    page.locator("#examples img").nth(example_index()).click()
    page.locator("#probabilities [data-testid=label-output-value]").wait_for(timeout=TIMEOUT_MS)
    page.locator("#overlay img").wait_for(timeout=TIMEOUT_MS)
    expect(page.locator("#info")).to_contain_text("Map for class", timeout=TIMEOUT_MS)


def compare_example(page) -> None:
    """Classify the bundled example, open "Compare all methods" and wait for its grid."""
    classify_example(page)
    page.locator("#compare").get_by_text("Compare all methods, with a trust check").click()
    page.locator("#compare-button").click()
    expect(page.locator("#compare-text")).to_contain_text("whole grid", timeout=TIMEOUT_MS)
    page.locator("#compare-maps img").first.wait_for(timeout=TIMEOUT_MS)
    expect(page.locator("#compare-grid")).to_contain_text(".png", timeout=TIMEOUT_MS)


def model_tab(page) -> None:
    """Open the Model tab and wait for its test figures."""
    page.get_by_role("tab", name="Model", exact=True).click()
    expect(page.get_by_text("Balanced accuracy").first).to_be_visible(timeout=TIMEOUT_MS)


def open_tab(page, name: str) -> None:
    """Click a tab (on a phone the tab bar scrolls sideways: the tab is scrolled into view)."""
    tab = page.get_by_role("tab", name=name, exact=True).first
    tab.wait_for(timeout=TIMEOUT_MS)
    tab.scroll_into_view_if_needed()
    tab.click()


def volume_example(page) -> None:
    """Open the Volume tab, classify the bundled example volume, go two B-scans back with the
    arrow keys and wait for that B-scan's map."""
    page.get_by_role("tab", name="Volume", exact=True).click()
    page.get_by_text(VOLUME_EXAMPLE).first.click()
    answer = page.locator("#volume-answer")
    expect(page.locator("#volume-summary")).to_contain_text("rests on B-scan", timeout=TIMEOUT_MS)
    expect(answer).to_contain_text("of 25", timeout=TIMEOUT_MS)
    page.locator("#volume-slider input[type=range]").focus()
    for _ in range(2):
        page.keyboard.press("ArrowLeft")
    expect(answer).to_contain_text("B-scan 12 of 25", timeout=TIMEOUT_MS)
    page.locator("#volume-map img").wait_for(timeout=TIMEOUT_MS)


def batch_volume(page) -> None:
    """Classify the bundled example volume in the Batch tab: a row per B-scan, a summary row."""
    open_tab(page, "Batch")
    page.locator("#batch-files input[type=file]").set_input_files(str(VOLUME_FILE))
    page.get_by_role("button", name="Classify all").click()
    expect(page.locator("#batch-summary")).to_contain_text("classified", timeout=TIMEOUT_MS)


def pretraining_example(page) -> None:
    """Open "How it learned", pick the DME example scan and wait for its reconstruction."""
    page.get_by_role("tab", name="Classify", exact=True).wait_for(timeout=TIMEOUT_MS)
    open_tab(page, "How it learned")
    page.locator("#rebuild-examples img").nth(example_index()).click()
    expect(page.locator("#rebuild-info")).to_contain_text("The model saw", timeout=TIMEOUT_MS)
    page.locator("#rebuild-difference img").wait_for(timeout=TIMEOUT_MS)


#: name -> (viewport, what to do before the screenshot, the element shown at the top)
VIEWS: dict[str, tuple[dict[str, int], Callable, str | None]] = {
    "classify": (DESKTOP, classify_example, None),
    "classify-phone": (PHONE, classify_example, "#probabilities"),  # the answer, not the header
    "compare": (DESKTOP, compare_example, "#compare"),
    "compare-phone": (PHONE, compare_example, "#compare-text"),
    "model": (DESKTOP, model_tab, None),
    "volume": (DESKTOP, volume_example, "#volume-upload"),
    "volume-strip": (DESKTOP, volume_example, "#volume-bscan"),
    "volume-phone": (PHONE, volume_example, "#volume-slider"),
    "batch-volume": (DESKTOP, batch_volume, "#batch-summary"),
    "batch-volume-phone": (PHONE, batch_volume, "#batch-summary"),
    "pretraining": (DESKTOP, pretraining_example, None),
    "pretraining-phone": (PHONE, pretraining_example, "#rebuild-masked"),
}


def take(url: str, out: Path, names: list[str]) -> list[Path]:
    """One PNG per view in ``names``, written into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            for name in names:
                viewport, prepare, top = VIEWS[name]
                page = browser.new_page(viewport=viewport)
                page.goto(url)
                prepare(page)
                if top:
                    page.locator(top).evaluate("e => e.scrollIntoView({block: 'start'})")
                else:
                    page.evaluate("window.scrollTo(0, 0)")
                page.wait_for_timeout(1000)  # let the last transitions and images settle
                written.append(save_png(page.screenshot(), out / f"{name}.png"))
                page.close()
        finally:
            browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs (docs/img)")
    parser.add_argument(
        "--view",
        action="append",
        choices=sorted(VIEWS),
        help="only this view (repeat; default: all)",
    )
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        parser.exit(2, f"error: Chromium not found at {CHROMIUM} (apt-get install chromium)\n")
    with serving() as url:
        for path in take(url, args.out, args.view or list(VIEWS)):
            print(f"{path} ({path.stat().st_size / 1000:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
