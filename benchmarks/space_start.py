"""What a Space costs: staged size, cold start, memory and CPU time per request.

    python benchmarks/space_start.py [--requests 10] [--checkpoint DIR_OR_HUB_ID ...]

Stages the Space (``python -m mirage_demo.space deploy x/y --dry-run``) into a temporary folder,
then, for that folder and, as the baseline in the same run, for this checkout: starts
``python app.py`` and times process start to the first ``/predict`` answer on an example scan
(cold start), reads the app process's resident memory after it (VmRSS, and its peak VmHWM),
then times ``--requests`` ``/predict`` and ``/explain`` (Grad-CAM) calls one at a time: the
client's wall time and the model time the app reports. Medians over ``--rounds`` alternating
starts of each. CPU only: on a GPU machine the same
numbers are GPU figures only if the app chose CUDA (it says so in its answer).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from app_load import EXAMPLES, free_port, start_app
from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mirage_demo import space  # noqa: E402


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss, peak = (re.search(rf"{key}:\s+(\d+)", status).group(1) for key in ("VmRSS", "VmHWM"))
    return float(rss) / 1024, float(peak) / 1024


def measure(root: Path, requests: int, checkpoints: list[str]) -> dict[str, float]:
    port = free_port()
    began = time.perf_counter()
    process = start_app(port, [a for c in checkpoints for a in ("--checkpoint", c)], root=root)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, info = client.predict(handle_file(str(EXAMPLES[0])), api_name="/predict")
        cold = time.perf_counter() - began
        rss, peak = memory_mib(process.pid)
        figures = {"cold_start_s": cold, "rss_mib": rss, "peak_mib": peak}
        for endpoint in ("/predict", "/explain"):
            walls, models = [], []
            for i in range(requests):
                scan = handle_file(str(EXAMPLES[i % len(EXAMPLES)]))
                start = time.perf_counter()
                *_, info = client.predict(scan, api_name=endpoint)
                walls.append(time.perf_counter() - start)
                models.append(float(re.search(r": ([\d.]+) s on", info).group(1)))
            figures[f"{endpoint}_wall_s"] = statistics.median(walls)
            figures[f"{endpoint}_model_s"] = statistics.median(models)
        figures["device"] = "CUDA" if "on CUDA" in info else "CPU"
        return figures
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--checkpoint", action="append", default=[])
    parser.add_argument("--rounds", type=int, default=3, help="alternating starts of each")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"staged Space": [], "this checkout (baseline)": []}
    with tempfile.TemporaryDirectory() as tmp:
        staged = space.stage(
            Path(tmp) / "space", space.check_checkpoints(args.checkpoint, offline=True)
        )
        print(f"staged: {len(staged.files)} files, {staged.size_bytes / 2**20:.1f} MiB")
        served = [s for s in staged.variables.get(space.ENV_CHECKPOINTS, "").split(",") if s]
        for _ in range(args.rounds):  # alternate, so neither gets all the warm caches
            runs["staged Space"].append(measure(staged.directory, args.requests, served))
            runs["this checkout (baseline)"].append(measure(ROOT, args.requests, args.checkpoint))
    results = {
        name: {
            key: statistics.median(r[key] for r in rs) if key != "device" else rs[0][key]
            for key in rs[0]
        }
        for name, rs in runs.items()
    }
    base = results["this checkout (baseline)"]["cold_start_s"]
    print(
        "| app | device | cold start s (x baseline) | RSS / peak MiB "
        "| /predict wall / model s | /explain wall / model s |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        cells = [
            name,
            r["device"],
            f"{r['cold_start_s']:.1f} ({r['cold_start_s'] / base:.2f})",
            f"{r['rss_mib']:.0f} / {r['peak_mib']:.0f}",
            f"{r['/predict_wall_s']:.3f} / {r['/predict_model_s']:.3f}",
            f"{r['/explain_wall_s']:.3f} / {r['/explain_model_s']:.3f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
