"""The README's screenshots, made from the running app: ``python docs/screenshots.py``.

Serves the app on the bundled models (as ``python app.py`` does, on a free local port), opens
it in headless Chromium (Playwright) and writes optimised PNGs into ``docs/img/`` (or
``--out``): the Classify tab after picking a bundled example, at 1440x900 and on a phone
(390x844), and the Model tab. Run it again after changing a view.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

from PIL import Image
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the checkout's mirage_demo

from mirage_demo.ui import (  # noqa: E402
    LAUNCH_OPTIONS,
    ModelRegistry,
    available_models,
    build_app,
    setup_queue,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run"]
OUT = ROOT / "docs" / "img"
MAX_BYTES = 300_000  # each PNG stays under this (the README is the Space's card)
EXAMPLE = "DME"  # the bundled example picked in the Classify screenshots
DESKTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 120_000  # a first answer loads the model (seconds on a busy 2-core machine)


def free_port() -> int:
    """A free local TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving() -> Iterator[str]:
    """The app on the bundled models, queued and served on a free local port; its URL."""
    demo = build_app(ModelRegistry(available_models([]), device="cpu"))
    setup_queue(demo, concurrency=2)
    port = free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        **LAUNCH_OPTIONS,
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def save_png(png: bytes, path: Path, max_bytes: int = MAX_BYTES) -> Path:
    """Write a screenshot as an optimised PNG; quantised to 256 colours if still too large."""
    image = Image.open(BytesIO(png)).convert("RGB")
    image.save(path, optimize=True)
    if path.stat().st_size > max_bytes:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


def classify_example(page) -> None:
    """Pick the bundled example and wait for its answer and heat map."""
    page.get_by_role("button", name=EXAMPLE, exact=True).first.click()
    page.locator("#probabilities [data-testid=label-output-value]").wait_for(timeout=TIMEOUT_MS)
    page.locator("#overlay img").wait_for(timeout=TIMEOUT_MS)
    expect(page.locator("#info")).to_contain_text("Predicted", timeout=TIMEOUT_MS)


def model_tab(page) -> None:
    """Open the Model tab and wait for its test figures."""
    page.get_by_role("tab", name="Model", exact=True).click()
    expect(page.get_by_text("Balanced accuracy").first).to_be_visible(timeout=TIMEOUT_MS)


#: name -> (viewport, what to do before the screenshot, the element shown at the top)
VIEWS: dict[str, tuple[dict[str, int], Callable, str | None]] = {
    "classify": (DESKTOP, classify_example, None),
    "classify-phone": (PHONE, classify_example, "#probabilities"),  # the answer, not the header
    "model": (DESKTOP, model_tab, None),
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
