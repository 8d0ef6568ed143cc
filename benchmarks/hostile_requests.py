"""What one hostile request costs the app: time, peak memory and disk, against a real scan.

    python benchmarks/hostile_requests.py [--checkpoint DIR] [--threads 1] [--images 1000]

Serves the app in this process as ``python app.py`` does (``build_app`` + ``setup_queue``, one
model call per two cores), with its temporary folder (uploads, outputs, evaluations) in a fresh
directory, builds the uploads of issues 12 and 20 there and sends each through
``gradio_client``; the baseline is ``/predict`` on a real 512x496 example scan in the same run.
Issue 30's attacks first (``--part round3`` for them alone; :mod:`hostile_round3`): hostile
checkpoints, a feature map of identical scans, ``--rounds`` rounds of /adapt + Use it +
Download (the disk they leave), and a /predict sent while a feature map of ``--images``
scans is computed.
Peak memory is the process's ``VmHWM`` above its resident memory before the request (Linux);
disk is the growth of the temporary folder. Last, a ``/predict`` is sent while an
``/evaluate`` of ``--images`` labelled scans (the bundled test scans, repeated) runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

WORK = Path(tempfile.mkdtemp(prefix="hostile-requests-"))  # the app's temporary folder
tempfile.tempdir = str(WORK)
os.environ["GRADIO_TEMP_DIR"] = str(WORK / "gradio")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.utils import Status  # noqa: E402
from PIL import Image  # noqa: E402

from mirage_demo.inference import DEFAULT_CHECKPOINT  # noqa: E402
from mirage_demo.ui import ModelChoice, ModelRegistry, build_app, setup_queue  # noqa: E402
from mirage_demo.ui.app import LAUNCH_OPTIONS, default_concurrency  # noqa: E402
from mirage_demo.ui.context import EXAMPLES_DIR  # noqa: E402
from mirage_demo.ui.registry import ASSETS  # noqa: E402
from tests.hostile_files import ico_bomb, many_entries_zip, scan_bomb, zeros_zip  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_round3  # noqa: E402

EXAMPLE = EXAMPLES_DIR / "CNV" / "CNV-451136-1.jpeg"
TEST_SCANS = ASSETS / "test-scans" / "images"


def status_mib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) // 1024
    return 0


def disk_mib() -> float:
    return sum(p.stat().st_size for p in WORK.rglob("*") if p.is_file()) / 2**20


def measure(run: Callable[[], Any]) -> tuple[float, int, float, str]:
    """(seconds, peak MiB above the resident memory before, disk MiB grown, outcome)."""
    before, disk = status_mib("VmRSS"), disk_mib()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    began = time.perf_counter()
    try:
        outcome = str(run())
    except Exception as err:  # the app's answer was an error: what it said
        outcome = f"error: {err}"
    seconds = time.perf_counter() - began
    return seconds, status_mib("VmHWM") - before, disk_mib() - disk, outcome


def labelled_zip(path: Path, images: int) -> Path:
    """A zip of ``images`` labelled scans (the bundled test scans, repeated) at ``path``."""
    scans = sorted(TEST_SCANS.glob("*/*"))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as stream:
        for i in range(images):
            scan = scans[i % len(scans)]
            stream.write(scan, f"{scan.parent.name}/{i:04d}-{scan.name}")
    return path


def build_uploads(folder: Path, images: int) -> dict[str, Path]:
    """The hostile files of issues 12 and 20 (and a large labelled zip) in ``folder``."""
    big = Image.new("L", (8000, 8000), 0)
    big.paste(200, (0, 3000, 8000, 5000))
    uploads = {"png": folder / "8000x8000.png"}
    big.save(uploads["png"])
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    del big
    uploads["jpeg"] = folder / "7999x7999.jpeg"
    noise = np.random.default_rng(0).random((7999, 7999)) * 255
    Image.fromarray(noise.astype(np.uint8)).save(uploads["jpeg"], quality=30)
    del noise
    uploads["sixteen"] = folder / "sixteen.zip"
    with zipfile.ZipFile(uploads["sixteen"], "w", zipfile.ZIP_DEFLATED) as stream:
        for i in range(16):
            stream.writestr(f"{i:02d}.png", buffer.getvalue())
    uploads["scans"] = folder / "scans.jpeg"
    uploads["scans"].write_bytes(scan_bomb(scans=20_000))
    uploads["ico"] = folder / "scan.png"  # an .ico, named as a PNG
    uploads["ico"].write_bytes(ico_bomb(13000))
    for i in range(3):
        uploads[f"zeros{i}"] = zeros_zip(folder / f"zeros{i}.zip", members=4)
    uploads["many"] = many_entries_zip(folder / "many.zip")
    uploads["labelled"] = labelled_zip(folder / "labelled.zip", images)
    return uploads


def predict_during_evaluate(url: str, labelled: Path) -> tuple[float, float, str]:
    """(seconds of a /predict sent while the /evaluate runs, seconds of the /evaluate, its
    note)."""
    began = time.perf_counter()
    job = Client(url, verbose=False).submit(
        [handle_file(str(labelled))], "model", api_name="/evaluate"
    )
    while job.status().code != Status.PROCESSING and not job.done():
        time.sleep(0.1)
    time.sleep(2.0)  # well into the evaluation
    asked = time.perf_counter()
    Client(url, verbose=False).predict(handle_file(str(EXAMPLE)), api_name="/predict")
    answered = time.perf_counter() - asked
    running = not job.done()
    note = job.result()[0]
    seconds = time.perf_counter() - began
    return answered, seconds, f"{note} (evaluation still running: {running})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadiest on a busy machine)"
    )
    parser.add_argument("--images", type=int, default=1000, help="images of the long /evaluate")
    parser.add_argument(
        "--part",
        choices=("all", "uploads", "round3"),
        default="all",
        help="uploads: issues 12 and 20; round3: issue 30 (feature map, /adapt, checkpoints)",
    )
    parser.add_argument("--rounds", type=int, default=17, help="/adapt rounds (round3)")
    return parser


def main() -> None:
    args = _parser().parse_args()
    torch.set_num_threads(args.threads)
    registry = ModelRegistry([ModelChoice("model", args.checkpoint)])
    demo = setup_queue(build_app(registry), default_concurrency(), registry=registry)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS)
    url = demo.local_url
    client = Client(url, verbose=False)
    folder = Path(tempfile.mkdtemp(prefix="uploads-", dir="/tmp"))  # outside the app's disk
    try:
        if args.part == "round3":  # its attacks need only the labelled scans
            uploads = {"labelled": labelled_zip(folder / "labelled.zip", args.images)}
        else:
            uploads = build_uploads(folder, args.images)

        def predict(path: Path) -> Any:
            return client.predict(handle_file(str(path)), api_name="/predict")[0]["label"]

        predict(EXAMPLE)  # loads the model, warms up
        print(f"torch threads: {args.threads}; model: {args.checkpoint}; cores: {os.cpu_count()}")
        base = measure(lambda: predict(EXAMPLE))[0]
        if args.part in ("all", "round3"):
            assets = {"checkpoint": Path(args.checkpoint), "example": EXAMPLE}
            assets["test_scans"] = TEST_SCANS
            hostile_round3.run(url, demo, uploads, assets, base, args.rounds)
        if args.part in ("all", "uploads"):
            uploads_part(client, url, uploads, base, args.images)
    finally:
        demo.close()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(WORK, ignore_errors=True)


def uploads_part(
    client: Client, url: str, uploads: dict[str, Path], base: float, images: int
) -> None:
    """Issues 12 and 20: each hostile upload's row, then a /predict during a long /evaluate."""

    def predict(key: str | Path) -> Any:
        path = uploads[key] if isinstance(key, str) else key
        return client.predict(handle_file(str(path)), api_name="/predict")[0]["label"]

    def batch(paths: list[Path]) -> Any:
        return client.predict([handle_file(str(p)) for p in paths], api_name="/batch")[2]

    def evaluate(key: str) -> Any:
        files = [handle_file(str(uploads[key]))]
        return client.predict(files, "model", api_name="/evaluate")[0]

    print("| request | upload | seconds | x baseline | peak MiB above before | disk MiB |", end="")
    print(" answer |\n| --- | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
    row = functools.partial(print_row, base=base)
    row("/predict, real 512x496 scan (baseline)", EXAMPLE, lambda: predict(EXAMPLE))
    for key, what in (
        ("png", "/predict, 8000x8000 PNG"),
        ("jpeg", "/predict, 7999x7999 noise JPEG"),
        ("scans", "/predict, 7999x7999 progressive JPEG + 20,000 empty scans"),
        ("ico", "/predict, .ico of a 13000x13000 PNG, named scan.png"),
    ):
        row(what, uploads[key], lambda k=key: predict(k))
    row(
        "/batch, zip of sixteen 8000x8000 PNGs",
        uploads["sixteen"],
        lambda: batch([uploads["sixteen"]]),
    )
    for i in range(3):
        key = f"zeros{i}"
        what = f"/evaluate #{i + 1}, 4 real scans + 4 zero-filled 64 MB .jpeg"
        row(what, uploads[key], lambda k=key: evaluate(k))
    rss = status_mib("VmRSS")
    what = "/batch, one 2,000-entry zip listed 200 times"
    row(what, uploads["many"], lambda: batch([uploads["many"]] * 200))
    time.sleep(5)
    print(f"resident memory 5 s after it: {status_mib('VmRSS') - rss:+d} MiB", flush=True)
    predicted, evaluated, note = predict_during_evaluate(url, uploads["labelled"])
    print(
        f"/evaluate of {images} labelled scans: {evaluated:.1f} s; a /predict sent "
        f"meanwhile answered in {predicted:.2f} s ({predicted / base:.1f}x baseline); {note}"
    )


def print_row(what: str, upload: Path, run: Callable[[], Any], base: float) -> None:
    """Measure ``run()`` and print its table row at once (a long run shows progress)."""
    seconds, mib, disk, outcome = measure(run)
    print(
        f"| {what} | {upload.stat().st_size / 1024:,.0f} KB | {seconds:.2f} | "
        f"{seconds / base:.1f} | {mib} | {disk:+.1f} | {outcome[:90]} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
