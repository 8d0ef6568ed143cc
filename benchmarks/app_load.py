"""Load test of the running app: many concurrent clients, zero errors, latency percentiles.

    python benchmarks/app_load.py                      # starts `python app.py` on a free port
    python benchmarks/app_load.py --url http://host:7860/ --clients 16 --requests 5

Each client sends ``--requests`` calls, alternating ``/predict`` and ``/explain`` (Grad-CAM)
over the bundled example scans. Reports errors, throughput and p50/p95/max latency per
endpoint, plus a single-client baseline measured in the same run (the ratio shows queueing).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "assets" / "examples").glob("*/*.jp*g"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(port: int, extra: list[str], root: Path = ROOT) -> subprocess.Popen:
    """``python app.py`` in ``root`` (this checkout, or a staged Space), once it listens."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "app.py", "--port", str(port), *extra]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"app.py exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("app.py did not start within 3 minutes")


def one_call(client: Client, index: int) -> tuple[str, float, str | None]:
    scan = handle_file(str(EXAMPLES[index % len(EXAMPLES)]))
    endpoint = "/predict" if index % 2 == 0 else "/explain"
    began = time.perf_counter()
    try:  # /explain with its defaults: the first model, Grad-CAM, the predicted class
        client.predict(scan, api_name=endpoint)
        error = None
    except Exception as err:  # the benchmark counts every failure
        error = f"{type(err).__name__}: {err}"
    return endpoint, time.perf_counter() - began, error


def run_client(url: str, requests: int, offset: int) -> list[tuple[str, float, str | None]]:
    client = Client(url, verbose=False)
    return [one_call(client, offset + i) for i in range(requests)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running app (default: start app.py here)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=5, help="requests per client")
    parser.add_argument("--app-args", default="", help="extra arguments for app.py")
    args = parser.parse_args()

    process = None
    url = args.url
    if url is None:
        port = free_port()
        process = start_app(port, args.app_args.split())
        url = f"http://127.0.0.1:{port}/"
    try:
        baseline = run_client(url, 6, 0)  # one client alone, also warms the model up
        base = {
            e: statistics.median(t for ep, t, _ in baseline if ep == e)
            for e in ("/predict", "/explain")
        }
        began = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            futures = [
                pool.submit(run_client, url, args.requests, c * args.requests)
                for c in range(args.clients)
            ]
            results = [r for f in futures for r in f.result()]
        wall = time.perf_counter() - began
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)

    errors = [e for _, _, e in results if e]
    print(
        f"{args.clients} clients x {args.requests} requests = {len(results)} calls "
        f"in {wall:.1f} s ({len(results) / wall:.2f} calls/s), errors: {len(errors)}"
    )
    print(f"CPU cores: {os.cpu_count()}")
    print("| endpoint | calls | alone, median s | p50 s | p95 s | max s | p50 / alone |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for endpoint in ("/predict", "/explain"):
        times = [t for e, t, err in results if e == endpoint and not err]
        if not times:
            continue
        p50 = percentile(times, 0.5)
        print(
            f"| {endpoint} | {len(times)} | {base[endpoint]:.3f} | {p50:.3f} | "
            f"{percentile(times, 0.95):.3f} | {max(times):.3f} | {p50 / base[endpoint]:.1f} |"
        )
    for error in errors[:5]:
        print("error:", error)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
