"""The served app under hostile use (issues 12, 20): bounded per request, fair between clients,
long jobs in their own lane, nothing runs as HTML or as a formula.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mirage_demo  # noqa: F401  (registers the mirage_* models)
from tests.adversarial import (
    CLASSES,
    EXAMPLE,
    animated,
    labelled_zip,
    make_zip,
    patch_entry,
    png_bytes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_model_events_share_two_lanes_and_uploads_expire(app_server):
    from mirage_demo.ui import LAUNCH_OPTIONS

    _, _, demo = app_server
    fns = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    assert {"predict", "explain", "compare", "batch", "evaluate"} <= set(fns)
    assert {fns[name].concurrency_id for name in ("predict", "explain", "compare")} == {"model"}
    long_jobs = {
        (fns[name].concurrency_id, fns[name].concurrency_limit) for name in ("batch", "evaluate")
    }
    assert long_jobs == {("long-jobs", 1)}
    assert demo.delete_cache is not None and demo.delete_cache[1] <= 3600
    assert LAUNCH_OPTIONS["max_file_size"] == "50mb"
    states = [b for b in demo.blocks.values() if type(b).__name__ == "State"]
    assert states and all(s.time_to_live <= 600 for s in states)


def test_explain_state_is_small_whatever_the_upload(app_server, huge_png):
    from mirage_demo.ui import explain_scan

    _, registry, _ = app_server
    overlay, _, _, state = explain_scan(registry, str(huge_png), "tiny", "gradcam")
    assert max(overlay.size) <= 1024
    for key in ("scan", "heatmap"):
        assert state[key].dtype == np.uint8 and max(state[key].shape) <= 1024
    assert sum(state[k].nbytes for k in ("scan", "heatmap")) <= 2 * 2**20


def test_one_session_cannot_fill_the_queue(app_server, monkeypatch):
    import time

    from gradio_client import Client, handle_file

    url, registry, _ = app_server
    predictor = registry.get("tiny")
    real = predictor.predict_batch

    def slow(*args, **kwargs):
        time.sleep(0.4)
        return real(*args, **kwargs)

    monkeypatch.setattr(predictor, "predict_batch", slow)
    scan = handle_file(str(EXAMPLE))
    flooder = Client(url, verbose=False)
    jobs = [flooder.submit(scan, api_name="/predict") for _ in range(8)]
    other = Client(url, verbose=False).submit(scan, api_name="/predict")
    outcomes = []
    for job in jobs:
        try:
            job.result(timeout=60)
            outcomes.append("ok")
        except Exception as err:
            outcomes.append(str(err))
    refused = [o for o in outcomes if o != "ok"]
    assert 1 <= outcomes.count("ok") <= 5 and refused
    # refused at once with HTTP 503 (gradio_client words it "Queue is full"), though the
    # queue (64) is far from full: the per-session limit
    assert all("Queue is full" in o for o in refused), refused
    label, _ = other.result(timeout=60)  # the other client is served meanwhile
    assert len(label["confidences"]) == 4


def test_the_session_limit_counts_model_work_only():
    """A page fires a dozen load events of its own (reading a checkpoint's metadata): they are
    never refused by the per-session limit, which holds back model work only."""
    import threading
    import time

    import gradio as gr
    from gradio_client import Client

    from mirage_demo.ui import setup_queue
    from mirage_demo.ui.context import MODEL_CONCURRENCY_ID
    from tests.test_app import serve

    gate = threading.Event()

    def slow(x: str) -> str:
        gate.wait(10)
        return x

    with gr.Blocks() as demo:
        box = gr.Textbox()
        gr.Button().click(slow, box, box, api_name="metadata", concurrency_limit=1)
        gr.Button().click(slow, box, box, api_name="model", concurrency_id=MODEL_CONCURRENCY_ID)
    setup_queue(demo, concurrency=1, per_session=2)
    url = serve(demo)
    try:
        client = Client(url, verbose=False)
        reads = [client.submit("a", api_name="/metadata") for _ in range(6)]
        work = [client.submit("b", api_name="/model") for _ in range(6)]
        time.sleep(1.0)
        gate.set()
        assert [job.result(timeout=30) for job in reads] == ["a"] * 6
        outcomes = []
        for job in work:
            try:
                outcomes.append(job.result(timeout=30))
            except Exception as err:
                outcomes.append(str(err))
        assert "b" in outcomes and any("Queue is full" in o for o in outcomes), outcomes
    finally:
        gate.set()
        demo.close()


def test_names_are_escaped_and_csv_cells_neutralised(app_server, tmp_path):
    import csv

    from gradio_client import Client, handle_file

    url, _, _ = app_server
    client = Client(url, verbose=False)
    import gradio as gr

    from mirage_demo.ui import explain_scan
    from mirage_demo.ui.classify import predict_scans

    # the payload a raw API call sends (gradio_client would strip the brackets itself)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    payload = {"path": str(bad), "orig_name": "<img src=x onerror=alert(1)>.png"}
    with pytest.raises(gr.Error) as info:  # the error toast
        explain_scan(app_server[1], payload, "tiny")
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in info.value.message
    assert "<img" not in info.value.message
    _, texts = predict_scans(app_server[1], [payload], ["tiny"])  # batched /predict: a text
    assert "&lt;img src=x" in texts[0] and "<img" not in texts[0]

    formula = tmp_path / "=1+2.png"
    formula.write_bytes(EXAMPLE.read_bytes())
    table, csv_file, _ = client.predict([handle_file(str(formula))], api_name="/batch")
    with open(csv_file, newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[1][0] == "'=1+2.png" and rows[1][1] in CLASSES
    assert table["headers"] == [
        "file",
        "prediction",
        *(f"p({c})" for c in CLASSES),
        "90% set",
        "unlike training scans",
        "verdict",
        "warnings / errors",
    ]


def test_batch_lists_bad_entries_and_takes_animated_images(app_server, tmp_path):

    from gradio_client import Client, handle_file

    url, _, _ = app_server
    gif, webp = tmp_path / "anim.gif", tmp_path / "anim.webp"
    gif.write_bytes(animated("GIF"))
    webp.write_bytes(animated("WEBP"))
    archive = make_zip(
        tmp_path / "scans.zip",
        {"a.gif": animated("GIF"), "b.webp": animated("WEBP"), "inner.zip": b"PK"},
    )
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(archive.read_bytes()[:-30])  # no end record
    secret = make_zip(tmp_path / "secret.zip", {"s.png": png_bytes()})
    patch_entry(secret, "s.png", flags=1)
    client = Client(url, verbose=False)
    table, _, summary = client.predict(
        [handle_file(str(p)) for p in (gif, webp, archive, corrupt, secret)], api_name="/batch"
    )
    rows = {row[0]: row for row in table["data"]}
    for name in ("anim.gif", "anim.webp", "scans.zip/a.gif", "scans.zip/b.webp"):
        # read and answered (a 32x24 blank frame: the answer is that it is not a B-scan)
        assert rows[name][1] == "(not an OCT B-scan)", rows[name]
    assert "zip inside a zip" in rows["scans.zip/inner.zip"][-1]
    assert "not a readable zip archive" in rows["corrupt.zip"][-1]
    assert "encrypted" in rows["secret.zip/s.png"][-1]
    assert not [r for r in table["data"] if "object at 0x" in str(r) or "<_io" in str(r)]
    assert "4 classified" in summary and "3 unreadable" in summary


def test_one_zip_listed_many_times_is_opened_once(app_server, tmp_path, monkeypatch):
    import gradio as gr

    from mirage_demo.ui import classify_batch
    from mirage_demo.uploads import ZipUpload
    from tests.hostile_files import many_entries_zip

    opened, real = [], ZipUpload.open.__func__

    def counting(cls, *args, **kwargs):
        opened.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(ZipUpload, "open", classmethod(counting))
    many = {"path": str(many_entries_zip(tmp_path / "many.zip")), "orig_name": "many.zip"}
    with pytest.raises(gr.Error, match=r"files is too many for one batch \(limit 500\)"):
        classify_batch(app_server[1], [many] * 200, "tiny")
    assert len(opened) == 1  # 2,000 entries: the request's budget of entries

    from mirage_demo.uploads import MAX_REQUEST_ZIPS

    opened.clear()
    small = make_zip(tmp_path / "small.zip", {"a.png": png_bytes(), "b.png": png_bytes()})
    payload = {"path": str(small), "orig_name": "small.zip"}
    table, _, summary = classify_batch(app_server[1], [payload] * 40, "tiny")
    assert len(opened) == MAX_REQUEST_ZIPS
    assert f"{2 * MAX_REQUEST_ZIPS} classified" in summary
    refused = [row for row in table if "limit of 32 zips" in row[-1]]
    assert len(refused) == 40 - MAX_REQUEST_ZIPS


def test_a_long_job_does_not_hold_up_one_scan(app_server, monkeypatch):
    """/batch and /evaluate have their own lane: a /predict sent while one runs is answered
    before it ends (the app serves one model call at a time here)."""
    import threading

    from gradio_client import Client, handle_file

    import mirage_demo.ui.batch as batch

    started, gate = threading.Event(), threading.Event()
    real = batch.expand_uploads

    def held(*args, **kwargs):  # a long job: it runs until the test lets it go
        started.set()
        gate.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "expand_uploads", held)
    url = app_server[0]
    scan = handle_file(str(EXAMPLE))
    try:
        job = Client(url, verbose=False).submit([scan], api_name="/batch")
        assert started.wait(30)
        label, _ = Client(url, verbose=False).submit(scan, api_name="/predict").result(timeout=60)
        assert len(label["confidences"]) == 4 and not job.done()
    finally:
        gate.set()
    _, _, summary = job.result(timeout=60)
    assert "1 classified" in summary


def test_names_are_escaped_in_evaluate_explorer_and_compare(app_server, tmp_path):
    import shutil

    import gradio as gr

    from mirage_demo.ui.compare import compare_scan
    from mirage_demo.ui.evaluate import evaluate_scans
    from mirage_demo.ui.explore import explorer_cell, explorer_open

    predictor = app_server[1].get("tiny")
    bad = "<img src=x onerror=alert(1)>"
    upload = labelled_zip(
        tmp_path / "scans.zip", [f"CNV/{bad}.jpeg", "DME/b.jpeg", f"DME/{bad}junk.png"]
    )
    result = evaluate_scans(predictor, [upload])
    try:
        assert "&lt;img src=x" in result["note"] and "<img" not in result["note"]
        state = result["state"]
        entry = next(e for e in state.scans.entries if bad in e.file)
        row, column = CLASSES.index(entry.true), CLASSES.index(entry.predicted) + 1
        explorer_cell(state, row, column)
        _, caption = explorer_open(predictor, state, state.shown.index(entry))
        assert "&lt;img src=x" in caption and "<img" not in caption
    finally:
        shutil.rmtree(result["folder"], ignore_errors=True)

    unknown = labelled_zip(tmp_path / "unknown.zip", [f"{bad}/a.jpeg"])
    with pytest.raises(gr.Error) as info:
        evaluate_scans(predictor, [unknown])
    assert "&lt;img src=x" in info.value.message and "<img" not in info.value.message

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(gr.Error) as info:
        compare_scan(predictor, str(junk), f"{bad}.png")
    assert "&lt;img src=x" in info.value.message and "<img" not in info.value.message


def test_evaluate_takes_long_names_and_leaves_nothing_when_it_fails(
    app_server, tmp_path, monkeypatch
):
    import shutil

    import mirage_demo.ui.evaluate as evaluate

    predictor = app_server[1].get("tiny")
    long_name = "CNV/" + "a" * 300 + ".jpeg"  # 305 bytes: over the file system's 255
    result = evaluate.evaluate_scans(
        predictor, [labelled_zip(tmp_path / "long.zip", [long_name, "DME/b.jpeg"])]
    )
    try:
        assert result["metrics"]["num_images"] == 2
        files = [p for p in (result["folder"] / "scans").rglob("*") if p.is_file()]
        assert len(files) == 2 and max(len(p.name.encode()) for p in files) <= 125
    finally:
        shutil.rmtree(result["folder"], ignore_errors=True)

    folders = []

    def failing(model, config, uploads, out, **kwargs):
        folders.append(Path(out))
        (Path(out) / "scans").mkdir()
        raise RuntimeError("disk trouble")

    monkeypatch.setattr(evaluate, "evaluate_upload", failing)
    with pytest.raises(RuntimeError):
        evaluate.evaluate_scans(predictor, [labelled_zip(tmp_path / "b.zip", ["DME/b.jpeg"])])
    assert folders and not folders[0].exists()


def test_kept_evaluations_are_bounded_on_disk(tmp_path, monkeypatch):
    """Sizes are measured on disk (every file counts, however late it was written); the
    oldest go first, never the job writing now."""
    import os
    import time

    from mirage_demo.ui import jobs

    monkeypatch.setattr(jobs, "JOBS_MAX_BYTES", 250)
    now = time.time()
    for age, size in ((4000, 10), (300, 100), (200, 100), (100, 100), (50, 300)):
        folder = tmp_path / f"job-{age}"
        folder.mkdir()
        (folder / "scan.png").write_bytes(bytes(size))
        os.utime(folder, (now - age, now - age))
    kept = jobs.account(keep=tmp_path / "job-50", parent=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job-50"] and kept == 300
    jobs.account(parent=tmp_path)
    assert not list(tmp_path.iterdir())  # alone over the cap, and no longer writing


def test_quiz_scans_do_not_give_their_class_away():
    from mirage_demo.testscans import scan_set_for
    from mirage_demo.ui.quiz import quiz_next, quiz_start
    from mirage_demo.ui.registry import ASSETS

    quiz, image, _ = quiz_start(scan_set_for(ASSETS / "demo-model"), CLASSES, 4, seed=0)
    shown = [image]
    while True:
        quiz.answer(CLASSES[0])
        image, _ = quiz_next(quiz)
        if image is None:
            break
        shown.append(image)
    originals = {Path(item.image).name for item in quiz.round}
    assert len(shown) == 4 and not originals & {Path(p).name for p in shown}
    assert not [p for p in shown if any(c.lower() in Path(p).name.lower() for c in CLASSES)]
