"""Issue 30's attacks, measured by ``benchmarks/hostile_requests.py`` (``--part round3``).

The feature map, /adapt with Use it and Download, and hostile checkpoints, sent as a visitor
(or an operator serving a checkpoint it did not make) would send them. The page's own events
(the feature map, Use it, Download) are not API endpoints: they are sent here as the browser
sends them, through the queue with the visitor's session (:func:`page_call`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from gradio_client import Client, handle_file

from mirage_demo.checkpoint import load_checkpoint
from mirage_demo.featuremap import project
from mirage_demo.testscans import scan_set_for
from mirage_demo.ui import ModelChoice, ModelRegistry, build_app
from mirage_demo.ui.context import app_temp
from mirage_demo.ui.jobs import JOBS_MAX_BYTES, account, folder_bytes, jobs_dir

__all__ = ["run"]

CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")


def page_call(url: str, session: str, fn_index: int, data: list[Any], timeout: float = 3600) -> Any:
    """Send one of the page's events through the queue in ``session``; its output (or raise
    with its error)."""
    api = f"{url.rstrip('/')}/gradio_api"
    with httpx.Client(timeout=timeout) as http:
        body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None}
        joined = http.post(f"{api}/queue/join", json=body)
        joined.raise_for_status()
        event = joined.json()["event_id"]
        with http.stream("GET", f"{api}/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("event_id") == event and message.get("msg") == "process_completed":
                    if not message.get("success"):
                        raise RuntimeError(str(message.get("output", {}).get("error")))
                    return message["output"]["data"]
    raise RuntimeError("the event never completed")


def fn_index(demo: Any, name: str, inputs: int) -> int:
    """The index of the page's event handled by ``name`` with ``inputs`` inputs."""
    for index, fn in demo.fns.items():
        if getattr(fn.fn, "__name__", "") == name and len(fn.inputs) == inputs:
            return index
    raise LookupError(name)


def _zip(path: Path, members: dict[str, Path]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, source in members.items():
            archive.write(source, name)
    return path


def row(what: str, run: Callable[[], Any]) -> Any:
    began = time.perf_counter()
    try:
        outcome = run()
    except Exception as err:  # what the app said
        outcome = f"refused: {err}"
    seconds = time.perf_counter() - began
    print(f"| {what} | {seconds:.2f} | {str(outcome)[:110]} |", flush=True)
    return outcome


def identical_scans_map(url: str, demo: Any, example: Path, folder: Path) -> None:
    """Issue 30, 1: /evaluate eight copies of one scan, then draw the feature map (t-SNE)."""
    members = {
        f"{c}/copy-{i}.jpeg": example for c in ("CNV", "DME", "DRUSEN", "NORMAL") for i in (1, 2)
    }
    archive = _zip(folder / "copies.zip", members)
    client = Client(url, verbose=False)
    client.predict([handle_file(str(archive))], "model", api_name="/evaluate")
    index = fn_index(demo, "on_compute", 3)
    what = "feature map (t-SNE) of 8 copies of one scan, after /evaluate"
    row(what, lambda: page_call(url, client.session_hash, index, ["model", "t-SNE", None])[1][:60])
    answer = Client(url, verbose=False).predict(handle_file(str(example)), api_name="/predict")
    print(f"the app still answers: /predict says {answer[0]['label']}", flush=True)


def predict_during_map(url: str, demo: Any, labelled: Path, example: Path, base: float) -> None:
    """Issue 30, 3: a /predict sent while a 1,000-scan feature map is computed."""
    client = Client(url, verbose=False)
    client.predict([handle_file(str(labelled))], "model", api_name="/evaluate")
    index, done = fn_index(demo, "on_compute", 3), {}

    def draw() -> None:
        began = time.perf_counter()
        done["text"] = page_call(url, client.session_hash, index, ["model", "t-SNE", None])[1]
        done["seconds"] = time.perf_counter() - began

    worker = threading.Thread(target=draw)
    worker.start()
    time.sleep(20.0)  # well into the embedding
    asked = time.perf_counter()
    Client(url, verbose=False).predict(handle_file(str(example)), api_name="/predict")
    answered = time.perf_counter() - asked
    running = worker.is_alive()
    worker.join()
    print(
        f"feature map of {labelled.name}: {done['seconds']:.1f} s ({done['text'][:80]}); a "
        f"/predict sent 20 s in answered in {answered:.2f} s ({answered / base:.1f}x baseline; "
        f"map still running: {running})",
        flush=True,
    )


def adapt_rounds(url: str, demo: Any, test_scans: Path, folder: Path, rounds: int) -> None:
    """Issue 30, 4: ``rounds`` of /adapt + Use it + Download (and a second Download), then
    what the app's folders hold: job folders (capped), outputs, Gradio's cache."""
    members = {}
    for cls in ("CNV", "NORMAL"):
        seen: set[str] = set()
        for path in sorted((test_scans / cls).iterdir()):
            patient = path.name.split("-")[1] if path.name.count("-") >= 2 else path.name
            if patient not in seen and len(seen) < 12:
                seen.add(patient)
                members[f"{cls}/{path.name}"] = path
    archive = _zip(folder / "adapt.zip", members)
    use, download = fn_index(demo, "on_use", 1), fn_index(demo, "download_adapted", 1)
    cache = Path(tempfile.gettempdir()) / "gradio"
    before = {"cache": folder_bytes(cache), "outputs": folder_bytes(app_temp() / "outputs")}
    began = time.perf_counter()
    for _ in range(rounds):
        client = Client(url, verbose=False)
        client.predict([handle_file(str(archive))], "model", api_name="/adapt")
        page_call(url, client.session_hash, use, [None])
        page_call(url, client.session_hash, download, [None])
        page_call(url, client.session_hash, download, [None])  # a second Download
    seconds = time.perf_counter() - began
    measured = folder_bytes(jobs_dir())
    mib = 2**20
    print(
        f"{rounds} rounds of /adapt ({len(members)} scans) + Use it + 2 Downloads: "
        f"{seconds:.0f} s; "
        f"job folders {measured / mib:.1f} MiB on disk (accounted {account() / mib:.1f} MiB, cap "
        f"{JOBS_MAX_BYTES / mib:.0f} MiB); outputs "
        f"{(folder_bytes(app_temp() / 'outputs') - before['outputs']) / mib:+.1f} MiB; Gradio's "
        f"cache {(folder_bytes(cache) - before['cache']) / mib:+.1f} MiB (uploads included)",
        flush=True,
    )


def _variant(checkpoint: Path, directory: Path, change: Callable[[dict], None]) -> Path:
    """``checkpoint``'s weights (linked) with its config.json through ``change``."""
    directory.mkdir()
    (directory / "model.safetensors").symlink_to(checkpoint / "model.safetensors")
    config = json.loads((checkpoint / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def costly_checkpoints(checkpoint: Path, folder: Path) -> None:
    """Issue 30, 7: a checkpoint that would cost minutes a scan, or a giant download."""

    def tokens(config: dict) -> None:
        config.update(architecture="mirage_tiny_patch32_512")
        config["model_kwargs"] = {"img_size": 1024, "patch_size": 2, "depth": 1}
        config["preprocessing"]["input_size"] = [1024, 1024]

    def giant(config: dict) -> None:
        config.update(architecture="vit_gigantic_patch14_clip_224", model_kwargs={})
        config["preprocessing"]["input_size"] = [224, 224]
        weights = "vit_gigantic_patch14_clip_224.laion2b"
        config["backbone"] = {"weights": weights, "revision": "0" * 40, "sha256": "0" * 64}

    what = "load a one-block ViT at 1024 px in 2x2 patches"
    row(what, lambda: load_checkpoint(_variant(checkpoint, folder / "tokens", tokens)))
    what = "load a probe on a 1.8 B-parameter backbone"
    row(what, lambda: load_checkpoint(_variant(checkpoint, folder / "giant", giant)))
    same = np.ones((8, 512))
    row("t-SNE of 8 identical feature vectors", lambda: project(same, "t-SNE").tolist()[:2])


def hostile_report_files(checkpoint: Path, folder: Path) -> None:
    """Issue 30, 2 and 7: test scans naming server files, huge or malformed report files."""
    header = "file,true,predicted," + ",".join(f"prob_{c}" for c in CLASSES)
    environ = _variant(checkpoint, folder / "environ", lambda c: c.update(training={"data": "/"}))
    (environ / "predictions.csv").write_text(f"{header}\nproc/self/environ,CNV,CNV,1,0,0,0\n")
    registry = ModelRegistry([ModelChoice("environ", str(environ))], data_roots=[])
    what = "test scans of a checkpoint listing proc/self/environ"
    row(what, lambda: registry.scan_set("environ")[1][:100])
    large = _variant(checkpoint, folder / "large", lambda c: None)
    rows = [f"CNV/{i}.jpeg,CNV,CNV,1,0,0,0" for i in range(300_000)]
    (large / "predictions.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    (large / "metrics.json").write_text(json.dumps({"overall": {}, "padding": "x" * 100_000_000}))
    what = "test scans of a 300,000-row predictions.csv"
    row(what, lambda: scan_set_for(large, roots=[folder])[1][:100])
    served = ModelRegistry([ModelChoice("large", str(large))])
    row("report of a 100 MB metrics.json (a page load, a model switch)", lambda: served.report())
    broken = _variant(checkpoint, folder / "broken", lambda c: None)
    (broken / "metrics.json").write_text('{"overall": {"balanced_accuracy": {"value": "high"}}}')
    served = ModelRegistry([ModelChoice("broken", str(broken))])
    what = "the page built on a malformed metrics.json (the default model)"
    row(what, lambda: f"built; its report: {served.report()} ({build_app(served).title})")


def run(
    url: str, demo: Any, uploads: dict[str, Path], assets: dict[str, Path], base: float, rounds: int
) -> None:
    """Every round-3 measurement, in order."""
    folder = Path(tempfile.mkdtemp(prefix="round3-", dir="/tmp"))
    try:
        print("| round 3 | seconds | outcome |\n| --- | ---: | --- |", flush=True)
        costly_checkpoints(assets["checkpoint"], folder)
        hostile_report_files(assets["checkpoint"], folder)
        identical_scans_map(url, demo, assets["example"], folder)
        adapt_rounds(url, demo, assets["test_scans"], folder, rounds)
        predict_during_map(url, demo, uploads["labelled"], assets["example"], base)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
