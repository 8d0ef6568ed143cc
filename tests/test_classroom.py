"""The app in a classroom, in headless Chromium: on a phone (390x844) and on a projector
(1440x900), with the keyboard, with a screen reader's alt texts, with figures for slides, a
lesson link, and Evaluate's errors. Served on the bundled models, as ``python app.py`` does."""

from __future__ import annotations

import re
import urllib.request
import zipfile
from pathlib import Path

import pytest

from mirage_demo.inference import DEFAULT_CHECKPOINT
from mirage_demo.ui import ModelChoice, ModelRegistry
from mirage_demo.ui.context import EXAMPLES_DIR
from tests.test_app import CHROMIUM, CHROMIUM_FLAGS, serving

pytestmark = [
    pytest.mark.slow,  # headless Chromium
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed"),
    pytest.mark.usefixtures("one_thread"),
]

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1440, "height": 900}
TABS = [
    "Classify",
    "Volume",
    "Model",
    "How it learned",
    "Evaluate your scans",
    "Adapt to your scans",
    "Batch",
    "Test yourself",
    "Learn",
]
WAIT = 90_000  # ms: a first answer loads the model on a busy 2-core machine
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def url():
    bundled = DEFAULT_CHECKPOINT.parent
    registry = ModelRegistry(
        [
            ModelChoice("demo-model (bundled)", str(bundled / "demo-model")),
            ModelChoice("demo-vit (bundled)", str(bundled / "demo-vit")),
        ]
    )
    with serving(registry) as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    playwright = sync_api.sync_playwright().start()
    chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
    yield chromium
    chromium.close()
    playwright.stop()


def open_page(browser, url: str, viewport: dict[str, int]):
    phone = viewport == PHONE
    page = browser.new_page(
        viewport=viewport, is_mobile=phone, has_touch=phone, accept_downloads=True
    )
    page.goto(url)
    page.locator("#scan").wait_for(timeout=WAIT)
    return page


def on_first_screen(page, selector: str) -> bool:
    """Whether the element is wholly inside the first screen, the page not scrolled."""
    box = page.locator(selector).first.bounding_box()
    height = page.viewport_size["height"]
    scrolled = page.evaluate("window.scrollY")
    return (
        box is not None and scrolled == 0 and box["y"] >= 0 and box["y"] + box["height"] <= height
    )


def pick_example(page, number: int = 1) -> None:
    """Click the example thumbnail ``number`` and wait for the answer and its map."""
    page.locator("#examples img").nth(number - 1).click()
    page.locator("#probabilities [data-testid=label-output-value]").wait_for(timeout=WAIT)
    page.locator("#overlay img").wait_for(timeout=WAIT)


def test_on_a_phone_the_upload_and_then_the_answer_are_on_the_first_screen(browser, url):
    page = open_page(browser, url, PHONE)
    try:
        assert on_first_screen(page, "#scan")
        banner = page.locator("#model-banner summary").bounding_box()
        assert banner["height"] < 40  # the banner is one line, its details on demand
        picker = page.locator(".header-row .block").first.bounding_box()
        assert picker["width"] > 0.8 * PHONE["width"]  # the picker is full width
        assert on_first_screen(page, "#examples")  # the picks, too
        pick_example(page)
        page.evaluate("window.scrollTo(0, 0)")
        assert on_first_screen(page, "#probabilities [data-testid=label-output-value]")
    finally:
        page.close()


def test_on_a_phone_every_tab_is_reachable_and_tables_scroll(browser, url):
    page = open_page(browser, url, PHONE)
    try:
        tabs = page.get_by_role("tab")
        assert [t.inner_text().strip() for t in tabs.all()] == TABS  # none behind a menu
        assert page.locator("[aria-label='More tabs']").count() == 0
        for name in TABS:
            tab = page.get_by_role("tab", name=name, exact=True)
            tab.click()
            assert tab.get_attribute("aria-selected") == "true"
            assert tab.is_visible()
        page.get_by_role("tab", name="Model", exact=True).click()
        table = page.locator(".prose table").first
        table.wait_for(timeout=WAIT)
        assert table.evaluate("t => t.clientWidth") <= PHONE["width"]  # it scrolls instead
        lines = page.locator(".prose td, .prose th").evaluate_all(
            """cells => cells.map(c => {  // the text's lines: its boxes' tops, 8 px apart
                const range = document.createRange(); range.selectNodeContents(c);
                const tops = [...range.getClientRects()].map(r => r.top).sort((a, b) => a - b);
                return tops.filter((top, i) => i === 0 || top - tops[i - 1] > 8).length;
            })"""
        )
        assert lines and max(lines) == 1  # no word broken over lines ("NO RM AL")
    finally:
        page.close()


def test_every_result_image_says_what_it_shows(browser, url):
    page = open_page(browser, url, DESKTOP)
    try:
        pick_example(page, 2)
        alt = page.locator("#overlay img").get_attribute("alt")
        assert re.fullmatch(r"Grad-CAM heat map for \w+ over the B-scan, strongest .+", alt)
        assert page.locator("#examples img").first.get_attribute("alt") == "Example scan 1"
        page.get_by_role("tab", name="Model", exact=True).click()
        page.locator("#explorer-matrix [data-testid=cell-0-1]").click(timeout=WAIT)
        page.locator("#explorer-gallery img").first.click(timeout=WAIT)
        sync_api = pytest.importorskip("playwright.sync_api")
        sync_api.expect(page.locator("#explorer-overlay img")).to_have_attribute(
            "alt", re.compile("heat map for"), timeout=WAIT
        )
        page.get_by_role("tab", name="Test yourself", exact=True).click()
        page.locator("#quiz-start").click()
        page.locator("#quiz-scan img").wait_for(timeout=WAIT)
        page.locator("#quiz-choice label").first.click()
        page.locator("#quiz-answer").click()
        sync_api.expect(page.locator("#quiz-map img")).to_have_attribute(
            "alt", re.compile("heat map for"), timeout=WAIT
        )
        shown = page.locator("img").evaluate_all(
            "images => images.filter(i => i.offsetParent !== null).map(i => i.alt)"
        )
        assert shown and all(text.strip() for text in shown), shown
    finally:
        page.close()


def test_the_overlay_and_the_figure_download_as_png(browser, url):
    page = open_page(browser, url, DESKTOP)
    try:
        pick_example(page, 3)
        page.locator("#overlay").hover()
        with page.expect_download() as download:
            page.locator("#overlay [data-testid=download-link]").click()
        saved = download.value
        assert saved.suggested_filename.endswith(".png")
        assert Path(saved.path()).read_bytes()[:8] == PNG
        page.locator("#figure-button").click()
        link = page.locator("#figure a").first
        link.wait_for(timeout=WAIT)
        assert re.fullmatch(r"figure-Grad-CAM-\w+-example-3\.png", link.get_attribute("download"))
        with urllib.request.urlopen(link.get_attribute("href")) as answer:
            assert answer.read(8) == PNG
    finally:
        page.close()


def test_sliders_react_to_the_keyboard(browser, url):
    sync_api = pytest.importorskip("playwright.sync_api")
    page = open_page(browser, url, DESKTOP)
    try:
        pick_example(page, 4)
        before = page.locator("#overlay img").get_attribute("src")
        page.locator("#opacity input[type=range]").focus()
        page.keyboard.press("ArrowRight")
        sync_api.expect(page.locator("#overlay img")).not_to_have_attribute(
            "src", before, timeout=WAIT
        )
        assert page.locator("#opacity input[type=number]").input_value() == "0.55"
        page.locator("#level input[type=range]").focus()
        for _ in range(10):
            page.keyboard.press("ArrowLeft")
        sync_api.expect(page.locator("#info")).to_contain_text("80%", timeout=WAIT)
        number = page.locator("#level input[type=number]")
        number.fill("0.6")
        number.press("Enter")
        sync_api.expect(page.locator("#info")).to_contain_text("60%", timeout=WAIT)
    finally:
        page.close()


def test_evaluate_has_no_placeholder_and_keeps_an_error_in_its_panel(browser, url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    archive = tmp_path / "unknown-class.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(EXAMPLES_DIR / "DME" / "DME-11053-1.jpeg", "GLAUCOMA/a.jpeg")
    page = open_page(browser, url, DESKTOP)
    try:
        page.get_by_role("tab", name="Evaluate your scans", exact=True).click()
        page.locator("#evaluate-button").wait_for()
        assert not page.locator("#evaluate-matrix").is_visible()  # no empty "1 2 3" matrix
        page.locator("#evaluate-files input[type=file]").set_input_files(str(archive))
        page.locator("#evaluate-files").get_by_text("unknown-class.zip").wait_for(timeout=WAIT)
        page.locator("#evaluate-button").click()
        note = page.locator("#evaluate-note")
        sync_api.expect(note).to_contain_text("GLAUCOMA", timeout=WAIT)
        page.wait_for_timeout(6000)  # a toast would be gone by now
        sync_api.expect(note).to_contain_text("classes the model does not know: GLAUCOMA")
        assert not page.get_by_text("Error", exact=True).is_visible()
    finally:
        page.close()


def test_a_lesson_link_gives_every_student_the_same_round(browser, url):
    sync_api = pytest.importorskip("playwright.sync_api")
    teacher = open_page(browser, url, DESKTOP)
    try:
        teacher.get_by_role("tab", name="Test yourself", exact=True).click()
        teacher.get_by_text("For teachers: make a lesson").click()
        teacher.locator("#lesson-fill").click()
        sync_api.expect(teacher.locator("#lesson-picked .token")).to_have_count(10, timeout=WAIT)
        teacher.locator("#lesson-make").click()
        link = teacher.locator("#lesson-link textarea")
        sync_api.expect(link).to_have_value(re.compile(r"\?lesson=[0-9a-f-]+$"), timeout=WAIT)
        address = link.input_value()
        captions = teacher.locator("#lesson-preview img").evaluate_all("i => i.map(x => x.alt)")
    finally:
        teacher.close()
    order = [caption.split(". ")[1] for caption in captions]
    for _ in range(2):  # two students: the same scans, in the same order
        student = browser.new_page(viewport=PHONE, is_mobile=True, has_touch=True)
        try:
            student.goto(address)
            score = student.locator("#quiz-score")
            sync_api.expect(score).to_contain_text("Lesson of 10 scans", timeout=WAIT)
            student.locator("#quiz-choice label").first.click()
            student.locator("#quiz-answer").click()
            feedback = student.locator("#quiz-feedback")
            sync_api.expect(feedback).to_contain_text(f"Reference: {order[0]}", timeout=WAIT)
            sync_api.expect(feedback).to_contain_text("look for")
            assert student.locator("#quiz-answer").bounding_box()["y"] < PHONE["height"]
            student.locator("#quiz-csv-button").click()
            sync_api.expect(student.locator("#quiz-csv a").first).to_have_attribute(
                "download", re.compile(r"my-answers-.*\.csv"), timeout=WAIT
            )
            student.locator("#quiz-learn").click()
            anchor = student.locator(f"#learn-{order[0].lower()}")
            sync_api.expect(anchor).to_be_in_viewport(timeout=WAIT)
        finally:
            student.close()


@pytest.mark.parametrize(
    "button, target",
    [
        ("→ Model tab: reliability diagram", "#report-reliability"),
        ("→ Model tab: explore the confusion matrix", "#explorer-heading"),
        ("→ Classify tab: compare all methods", "#compare-button"),  # the accordion opened
    ],
)
def test_learns_buttons_land_on_what_they_name(browser, url, button, target):
    sync_api = pytest.importorskip("playwright.sync_api")
    page = open_page(browser, url, DESKTOP)
    try:
        page.get_by_role("tab", name="Learn", exact=True).click()
        page.get_by_role("button", name=button).click()
        sync_api.expect(page.locator(target)).to_be_in_viewport(timeout=WAIT)
    finally:
        page.close()
