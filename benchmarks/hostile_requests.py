"""What one hostile request costs the app: time and peak memory, against a real scan.

    python benchmarks/hostile_requests.py [--checkpoint DIR] [--threads 1]

Builds the uploads of issue 12 in a temporary folder (a ~66 KB 8000x8000 PNG, a ~21 MB
7999x7999 noise JPEG, a ~9 KB zip of sixteen 8000x8000 PNGs) and sends each once through the
app's own handlers (``explain_scan``, ``classify_batch``) on the bundled model; the baseline
is a real 512x496 example scan, explained in the same run. Peak memory is the process's
``VmHWM`` above its resident memory before the request (Linux).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirage_demo.inference import DEFAULT_CHECKPOINT
from mirage_demo.ui import ModelChoice, ModelRegistry, classify_batch, explain_scan
from mirage_demo.ui.context import EXAMPLES_DIR, image_file

EXAMPLE = EXAMPLES_DIR / "CNV" / "CNV-451136-1.jpeg"


def status_mib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) // 1024
    return 0


def measure(run) -> tuple[float, int]:
    """(seconds, peak MiB above the resident memory before) of ``run()``."""
    before = status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    began = time.perf_counter()
    run()
    return time.perf_counter() - began, status_mib("VmHWM") - before


def build_uploads(folder: Path) -> dict[str, Path]:
    big = Image.new("L", (8000, 8000), 0)
    big.paste(200, (0, 3000, 8000, 5000))
    png = folder / "8000x8000.png"
    big.save(png)
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    del big
    jpeg = folder / "7999x7999.jpeg"
    noise = np.random.default_rng(0).random((7999, 7999)) * 255
    Image.fromarray(noise.astype(np.uint8)).save(jpeg, quality=30)
    del noise
    archive = folder / "sixteen.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as stream:
        for i in range(16):
            stream.writestr(f"{i:02d}.png", buffer.getvalue())
    return {"png": png, "jpeg": jpeg, "zip": archive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadiest on a busy machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registry = ModelRegistry([ModelChoice("model", args.checkpoint)])

    def explain(path: Path) -> None:
        overlay, *_ = explain_scan(registry, str(path), "model", "gradcam")
        image_file(overlay)  # what the app sends back

    with tempfile.TemporaryDirectory() as folder:
        uploads = build_uploads(Path(folder))
        explain(EXAMPLE)  # loads the model, warms up
        base, base_mib = measure(lambda: explain(EXAMPLE))
        rows = [("/explain, real 512x496 scan (baseline)", EXAMPLE, base, base_mib)]
        for key, what in (("png", "8000x8000 PNG"), ("jpeg", "7999x7999 noise JPEG")):
            path = uploads[key]
            seconds, mib = measure(lambda path=path: explain(path))
            rows.append((f"/explain, {what}", path, seconds, mib))
        payload = [{"path": str(uploads["zip"]), "orig_name": "sixteen.zip"}]
        result: list = []
        seconds, mib = measure(lambda: result.append(classify_batch(registry, payload, "model")))
        rows.append(("/batch, zip of sixteen 8000x8000 PNGs", uploads["zip"], seconds, mib))
        print(f"torch threads: {args.threads}; model: {args.checkpoint}")
        print("| request | upload | seconds | x baseline | peak MiB above before |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for what, path, seconds, mib in rows:
            size = path.stat().st_size / 1024
            ratio = seconds / base
            print(f"| {what} | {size:,.0f} KB | {seconds:.2f} | {ratio:.1f} | {mib} |")
        print(f"/batch summary: {result[0][2]}")


if __name__ == "__main__":
    main()
