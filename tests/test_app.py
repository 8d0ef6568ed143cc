"""The Gradio app, served on a free local port and driven through ``gradio_client``."""

from __future__ import annotations

import csv
import socket
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mirage_demo  # noqa: F401
from mirage_demo.checkpoint import CheckpointConfig, save_checkpoint
from mirage_demo.data import Preprocessing
from mirage_demo.ui import (
    EXAMPLES_DIR,
    LAUNCH_OPTIONS,
    ModelChoice,
    ModelRegistry,
    available_models,
    build_app,
)

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
CNV_SCAN = EXAMPLES_DIR / "CNV" / "CNV-451136-1.jpeg"


def tiny_checkpoint(
    directory: Path,
    seed: int = 0,
    report: bool = True,
    classes: list[str] = CLASSES,
    split: str = "test",
) -> Path:
    """A tiny MIRAGE-architecture checkpoint (4 classes by default), with an evaluation
    report on ``split``."""
    torch.manual_seed(seed)
    kwargs = {"img_size": 128, "depth": 2}
    k = len(classes)
    model = timm.create_model("mirage_tiny_patch32_512", num_classes=k, **kwargs).eval()
    config = CheckpointConfig(
        "mirage_tiny_patch32_512",
        classes,
        Preprocessing.from_model(model),
        model_kwargs=kwargs,
        training={"data": "synthetic test data", "epochs": 1},
    )
    save_checkpoint(directory, model, config)
    if report:
        from mirage_demo.metrics import write_report

        rng = np.random.default_rng(seed)
        y_true = np.repeat(np.arange(k), 5)
        probs = rng.dirichlet(np.ones(k), size=5 * k)
        probs[np.arange(5 * k), y_true] += 1.0
        probs /= probs.sum(1, keepdims=True)
        files = [f"img{i}.png" for i in range(5 * k)]
        write_report(directory, y_true, probs, classes, files, split=split, n_bootstrap=50)
    return directory


def serve(demo) -> str:
    """Launch a queued app on a free local port, without blocking; its URL."""
    port = free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        **LAUNCH_OPTIONS,
    )
    return f"http://127.0.0.1:{port}/"


@contextmanager
def serving(registry: ModelRegistry) -> Iterator[str]:
    """The app on ``registry``, queued (2 calls at a time) and served on a free port; its URL.
    Closed on exit."""
    demo = build_app(registry)
    demo.queue(default_concurrency_limit=2)
    url = serve(demo)
    try:
        yield url
    finally:
        demo.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NetworkGuard:
    """Records (and refuses) connections to anything but this machine."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.attempts: list[str] = []
        original = socket.socket.connect

        def connect(sock, address):
            host = address[0] if isinstance(address, tuple) else str(address)
            if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0") and not str(
                host
            ).startswith("/"):
                self.attempts.append(str(host))
                raise OSError(f"test: network access to {host} refused")
            return original(sock, address)

        monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app with two models (one without a report), on a free port; yields its URL."""
    monkeypatch = pytest.MonkeyPatch()
    guard = NetworkGuard(monkeypatch)
    root = tmp_path_factory.mktemp("app")
    registry = ModelRegistry(
        [
            ModelChoice("tiny (report)", str(tiny_checkpoint(root / "a"))),
            ModelChoice("tiny (no report)", str(tiny_checkpoint(root / "b", 1, report=False))),
        ]
    )
    try:
        with serving(registry) as url:
            yield url, guard, registry
    finally:
        monkeypatch.undo()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[0], verbose=False)


def labels_of(label_output) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label_output["confidences"]}


def test_named_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/predict", "/explain", "/batch"} <= set(endpoints)


def test_predict_endpoint(client):
    label, info = client.predict(handle_file(str(CNV_SCAN)), api_name="/predict")
    probabilities = labels_of(label)
    assert set(probabilities) == set(CLASSES)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert label["label"] == max(probabilities, key=probabilities.get)
    assert "s on CPU" in info


@pytest.mark.parametrize("method, target", [("gradcam", "DME"), ("rollout", "the predicted class")])
def test_explain_endpoint(client, method, target):
    overlay, label, info = client.predict(
        handle_file(str(CNV_SCAN)), "tiny (report)", method, target, 0.6, api_name="/explain"
    )
    with Image.open(CNV_SCAN) as scan, Image.open(overlay) as shown:
        assert shown.size == scan.size  # the overlay keeps the scan's own size
        assert shown.mode == "RGB"
    assert set(labels_of(label)) == set(CLASSES)
    if method == "gradcam":
        assert "Map for class **DME**" in info
    else:
        assert "class-agnostic" in info


def test_batch_endpoint_with_zip_and_a_bad_file(client, tmp_path):
    archive = tmp_path / "scans.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(EXAMPLES_DIR / "NORMAL" / "NORMAL-1384-3.jpeg", "inner/NORMAL-1384-3.jpeg")
        zf.writestr("inner/broken.png", b"not a png at all")
        zf.writestr("inner/readme.txt", b"ignored")
    table, csv_file, summary = client.predict(
        [handle_file(str(CNV_SCAN)), handle_file(str(archive))], api_name="/batch"
    )
    rows = table["data"]
    files = [row[0] for row in rows]
    assert files == [
        "CNV-451136-1.jpeg",
        "scans.zip/inner/NORMAL-1384-3.jpeg",
        "scans.zip/inner/broken.png",
    ]
    assert rows[2][1] == "unreadable" and "not a readable image" in rows[2][-1]
    assert all(row[1] in CLASSES for row in rows[:2])
    with open(csv_file, newline="") as stream:
        written = list(csv.reader(stream))
    assert written[0][:2] == ["file", "predicted"] and len(written) == 4
    assert "2 classified" in summary and "1 unreadable" in summary


def write_bad_uploads(folder: Path) -> dict[str, Path]:
    files = {}
    files["text"] = folder / "notes.png"
    files["text"].write_text("this is not an image")
    files["truncated"] = folder / "truncated.jpeg"
    files["truncated"].write_bytes(CNV_SCAN.read_bytes()[:2000])
    files["huge"] = folder / "huge.png"
    Image.new("1", (20000, 20000)).save(files["huge"])
    files["gif"] = folder / "animated.gif"
    frames = [Image.open(CNV_SCAN).convert("L").resize((128, 96)), Image.new("L", (128, 96), 0)]
    frames[0].save(files["gif"], save_all=True, append_images=frames[1:])
    files["16bit"] = folder / "deep.png"
    deep = np.asarray(Image.open(CNV_SCAN).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(deep).save(files["16bit"])
    files["tiny"] = folder / "one-pixel.png"
    Image.new("L", (1, 1), 128).save(files["tiny"])
    return files


def test_bad_uploads_get_friendly_messages_and_the_app_keeps_serving(client, tmp_path):
    files = write_bad_uploads(tmp_path)
    for kind in ("text", "truncated", "huge"):
        with pytest.raises(Exception, match=r"Could not read .*Please upload an OCT B-scan"):
            client.predict(handle_file(str(files[kind])), api_name="/predict")
    for kind in ("gif", "16bit"):
        label, _ = client.predict(handle_file(str(files[kind])), api_name="/predict")
        assert label["label"] in CLASSES, kind
    label, info = client.predict(handle_file(str(files["tiny"])), api_name="/predict")
    assert label["label"] == "Not an OCT B-scan" and "too small to read" in info
    overlay, *_ = client.predict(
        handle_file(str(files["16bit"])),
        "tiny (report)",
        "gradcam",
        "the predicted class",
        0.5,
        api_name="/explain",
    )
    assert Image.open(overlay).size == Image.open(files["16bit"]).size
    label, _ = client.predict(handle_file(str(CNV_SCAN)), api_name="/predict")  # still serving
    assert label["label"] in CLASSES


def test_a_photo_gets_a_warning(client):
    import matplotlib

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    label, info = client.predict(handle_file(str(photo)), api_name="/predict")
    assert label["label"] == "Not an OCT B-scan" and not label.get("confidences")
    assert "in colour" in info and "<details>" in info  # the probabilities, on request


def test_model_loads_once_and_no_network_is_used(served, client):
    _, guard, registry = served
    first = registry.get("tiny (report)")
    client.predict(handle_file(str(CNV_SCAN)), api_name="/predict")
    assert registry.get("tiny (report)") is first
    assert guard.attempts == []


def test_model_report_tables_and_missing_report(served):
    from mirage_demo.ui import model_report

    registry = served[2]
    card, metrics_md, figures = model_report(registry, "tiny (report)")
    assert "`mirage_tiny_patch32_512`" in card and "synthetic test data" in card
    assert "per-image min-max to [0, 1], then (x - 0.2) / 0.2" in card  # the input contract
    assert "| CNV | 5 |" in metrics_md and "Balanced accuracy" in metrics_md
    assert set(figures) == {"confusion_matrix.png", "roc_curves.png", "reliability.png"}
    assert all(Path(path).is_file() for path in figures.values())
    _, message, figures = model_report(registry, "tiny (no report)")
    assert "No evaluation report" in message and "python -m" not in message  # no commands
    assert figures == {}


def test_available_models_lists_given_then_bundled(tmp_path, monkeypatch):
    given = tiny_checkpoint(tmp_path / "mine", report=False)
    monkeypatch.setenv("MIRAGE_DEMO_CHECKPOINTS", "someone/oct-model")
    choices = available_models([str(given)])
    assert choices[0] == ModelChoice("mine", str(given))
    assert choices[1] == ModelChoice("someone/oct-model", "someone/oct-model")
    bundled = [c for c in choices if c.name.endswith("(bundled)")]
    assert bundled and bundled[0].name == "demo-model (bundled)"


def test_unusable_checkpoint_fails_at_start_with_a_clear_message(tmp_path, capsys):
    from mirage_demo.ui import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "nope")])
    assert exit_info.value.code == 1
    assert "no checkpoint directory" in capsys.readouterr().err


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.mark.slow  # headless Chromium
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed (.ci/run installs it)")
def test_browser_upload_shows_label_overlay_and_report(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url = served[0]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(url)
            page.locator("input[type=file]").first.set_input_files(str(CNV_SCAN))
            top = page.locator("#probabilities [data-testid=label-output-value]")
            top.wait_for(timeout=60_000)
            assert top.inner_text().strip() in CLASSES
            overlay = page.locator("#overlay img")
            overlay.wait_for(timeout=60_000)
            width = overlay.evaluate("img => img.naturalWidth")
            assert width == Image.open(CNV_SCAN).width
            sync_api.expect(page.locator("#info")).to_contain_text("Map for class")
            page.screenshot(path=str(tmp_path / "classify.png"), full_page=True)

            page.get_by_role("tab", name="Model").click()
            matrix = page.locator("#report-confusion-matrix img")
            page.locator("#report-confusion-matrix").scroll_into_view_if_needed()  # lazy image
            matrix.wait_for(timeout=30_000)
            assert matrix.evaluate("img => img.naturalWidth") > 200
            sync_api.expect(page.get_by_text("Balanced accuracy").first).to_be_visible()
            page.screenshot(path=str(tmp_path / "model.png"), full_page=True)

            page.get_by_role("tab", name="Learn", exact=True).click()
            sync_api.expect(page.get_by_text("What is OCT?")).to_be_visible()
        finally:
            browser.close()


def test_opacity_reblends_without_the_model(served):
    from mirage_demo.ui import explain_scan, reblend

    registry = served[2]
    overlay, _, _, state = explain_scan(registry, str(CNV_SCAN), "tiny (report)", "gradcam")
    assert np.array_equal(np.asarray(reblend(state, 0.5)), np.asarray(overlay))
    bare = np.asarray(reblend(state, 0.0))
    gray = np.asarray(Image.open(CNV_SCAN).convert("L"), dtype=np.float32)
    expected = (gray - gray.min()) / (gray.max() - gray.min()) * 255
    assert np.abs(bare[..., 0].astype(np.float32) - expected).max() <= 1.0
    assert not np.array_equal(np.asarray(reblend(state, 1.0)), bare)


def test_trust_note_says_what_is_loaded_and_how_far_to_trust_it(served):
    from mirage_demo.ui import trust_note

    registry = served[2]
    name = "tiny (report)"
    note = trust_note(name, registry.get(name).config, registry.report(name))
    line = note[note.index("<summary>") : note.index("</summary>")]  # the banner's one line
    assert "Model: tiny (report)" in line and "not MIRAGE" in line and "not a diagnosis" in line
    assert "balanced accuracy" in line and "mirage_tiny_patch32_512" not in note  # plain words
    assert "On its 20 test scans: balanced accuracy" in note  # the details, on demand
    assert "CNV 100% of 5" in note and "not a diagnosis" in note
    bare = trust_note("tiny (no report)", registry.get("tiny (no report)").config, None)
    assert "no test report" in bare


def test_layout_is_built_from_the_checkpoint_without_loading_a_model(tmp_path, monkeypatch):
    """Texts and counts come from the checkpoint (3 classes, a report on val), each
    checkpoint is resolved once, and no model loads until a request needs it."""
    import gradio as gr

    import mirage_demo.ui.registry as registry_module

    classes = ["CALM", "SPOTS", "WAVES"]
    source = tiny_checkpoint(tmp_path / "three", classes=classes, split="val")
    resolved = []
    resolve = registry_module.resolve_checkpoint_dir
    monkeypatch.setattr(
        registry_module,
        "resolve_checkpoint_dir",
        lambda s: resolved.append(s) or resolve(s),
    )
    registry = ModelRegistry([ModelChoice("three", str(source))])
    loads = []
    monkeypatch.setattr(
        registry_module.Predictor, "from_pretrained", lambda *a, **k: loads.append(a)
    )
    demo = build_app(registry)
    assert loads == []  # the layout needs no model
    blocks = list(demo.blocks.values())
    labels = [b for b in blocks if isinstance(b, gr.Label)]  # Classify's, the Volume tab's
    assert len(labels) == 2 and all(label.num_top_classes == 3 for label in labels)
    texts = " ".join(str(b.value) for b in blocks if isinstance(b, gr.Markdown))
    assert "as CALM, SPOTS or WAVES" in texts
    assert "On its 15 val scans: balanced accuracy" in texts
    assert "test scans: balanced accuracy" not in texts
    assert "Results on the val split (15 images)" in texts
    assert "| Data split | patient-disjoint, seed 0" not in texts  # no split recorded
    (table,) = [b for b in blocks if isinstance(b, gr.Dataframe) and b.label == "Predictions"]
    assert table.headers == [
        "file",
        "prediction",
        "p(CALM)",
        "p(SPOTS)",
        "p(WAVES)",
        "90% set",
        "unlike training scans",
        "verdict",
        "warnings / errors",
    ]
    registry.directory(), registry.report(), registry.config()
    assert resolved == [str(source)]  # resolved once, however often it is asked


def test_new_tabs_and_model_call_wrappers_slot_in(tmp_path):
    """A tab is a function of the app context; every model-running handler is wrapped."""
    import gradio as gr

    from mirage_demo.ui import TABS

    wrapped = []

    def wrap(fn):
        wrapped.append(fn.__name__)
        return fn

    def extra_tab(ctx):
        with gr.Tab("Extra", id="extra"):
            button = gr.Button("Extra")
            names = gr.JSON()
        button.click(
            ctx.model_call(lambda name: ctx.registry.names),
            inputs=[ctx.model],
            outputs=[names],
            api_name="extra",
        )

    registry = ModelRegistry(
        [ModelChoice("tiny", str(tiny_checkpoint(tmp_path / "t", report=False)))]
    )
    demo = build_app(registry, tabs=[*TABS, extra_tab], wrap_model_call=wrap)
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert {"predict", "explain", "batch", "compare", "evaluate", "extra"} <= api_names
    assert sorted(wrapped) == [
        "<lambda>",
        "on_adapt",  # Adapt to your scans
        "on_answer",  # Test yourself
        "on_batch",
        "on_bscan",  # the Volume tab's B-scan and its map
        "on_click",  # the feature map, Model tab
        "on_click",  # the feature map of evaluated scans
        "on_compare",
        "on_compare_record",  # /compare_json
        "on_compute",  # the feature map computed, Model tab
        "on_compute",  # ... and of evaluated scans
        "on_evaluate",
        "on_evaluate_page",  # ... the page's, which keeps an error in its panel
        "on_explain",
        "on_explain_page",  # ... the page's, with the overlay's alt text
        "on_open",  # the Model tab's explorer
        "on_open",  # the explorer of evaluated scans
        "on_pick",  # a feature map's scan chosen from its list, Model tab
        "on_pick",  # ... and of evaluated scans
        "on_predict",
        "on_record",  # /predict_json
        "on_volume",  # /volume
        "reconstruct_view",  # How it learned: /reconstruct
    ]
