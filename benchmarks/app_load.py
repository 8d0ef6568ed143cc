"""Load test of the app: a classroom of concurrent clients, zero errors, latency, memory.

    python benchmarks/app_load.py                       # 32 clients, 2 minutes per phase
    python benchmarks/app_load.py --clients 32 --duration 120 --batch 8
    python benchmarks/app_load.py --url http://host:7860/ --duration 60   # a running app

Each client (its own ``gradio_client`` session) calls ``/predict`` and ``/explain``
(Grad-CAM) in turn on the bundled example scans until ``--duration`` seconds have passed.
Reports errors, calls/s, p50/p95/max latency per endpoint and the app's resident memory
after warm-up and at the end. Without ``--url`` it starts ``python app.py`` twice, in the
same run: unbatched, then with Gradio batching of ``/predict`` (``--max-batch N``), and
prints the throughput ratio of the two.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "assets" / "examples").glob("*/*.jp*g"))
ENDPOINTS = ("/predict", "/explain")


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


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a local process, in MiB (``None`` for a remote app)."""
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


@dataclass
class Calls:
    """Latencies and errors of one phase, per endpoint."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {e: [] for e in ENDPOINTS})
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, endpoint: str, seconds: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.seconds[endpoint].append(seconds)
            else:
                self.errors.append(f"{endpoint}: {error}")

    @property
    def count(self) -> int:
        return sum(map(len, self.seconds.values())) + len(self.errors)


def one_call(client: Client, index: int, calls: Calls) -> None:
    scan = handle_file(str(EXAMPLES[index % len(EXAMPLES)]))
    endpoint = ENDPOINTS[index % 2]
    began = time.perf_counter()
    try:  # /explain with its defaults: the first model, Grad-CAM, the predicted class
        client.predict(scan, api_name=endpoint)
        error = None
    except Exception as err:  # the benchmark counts every failure
        error = f"{type(err).__name__}: {str(err)[:200]}"
    calls.add(endpoint, time.perf_counter() - began, error)


def run_client(url: str, offset: int, deadline: float, calls: Calls) -> None:
    client = Client(url, verbose=False)
    index = offset
    while time.monotonic() < deadline:
        one_call(client, index, calls)
        index += 1


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


@dataclass
class Phase:
    name: str
    calls: Calls
    wall: float
    rss: list[float]  # the app's resident memory (MiB): after warm-up, then every 5 s

    @property
    def rate(self) -> float:
        return (self.calls.count - len(self.calls.errors)) / self.wall


def run_phase(name: str, url: str, pid: int | None, clients: int, duration: float) -> Phase:
    warm = Calls()
    for index in range(4):  # loads the model, first calls: not measured
        one_call(Client(url, verbose=False), index, warm)
    rss = [rss_mb(pid)] if pid is not None else []
    calls = Calls()
    began = time.monotonic()
    deadline = began + duration
    done = threading.Event()

    def sample() -> None:
        while not done.wait(5.0):
            rss.append(rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    if pid is not None:
        sampler.start()
    with ThreadPoolExecutor(clients) as pool:
        for future in [
            pool.submit(run_client, url, 7 * c, deadline, calls) for c in range(clients)
        ]:
            future.result()
    wall = time.monotonic() - began
    done.set()
    if pid is not None:
        sampler.join()
        rss.append(rss_mb(pid))
    return Phase(name, calls, wall, rss)


def report(phase: Phase, clients: int) -> None:
    calls = phase.calls
    rss = phase.rss
    memory = (
        f"; app resident memory (MiB): {rss[0]:.0f} after warm-up, {rss[len(rss) // 2]:.0f} "
        f"half-way, {rss[-1]:.0f} at the end, {max(rss):.0f} at most"
        if rss
        else ""
    )
    print(
        f"\n{phase.name}: {clients} clients, {phase.wall:.0f} s: {calls.count} calls "
        f"({phase.rate:.2f} calls/s), errors: {len(calls.errors)}{memory}"
    )
    print("| endpoint | calls | p50 s | p95 s | max s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for endpoint, times in calls.seconds.items():
        if times:
            print(
                f"| {endpoint} | {len(times)} | {percentile(times, 0.5):.2f} | "
                f"{percentile(times, 0.95):.2f} | {max(times):.2f} |"
            )
    for error in calls.errors[:5]:
        print("error:", error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running app (default: start app.py here)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds per phase")
    parser.add_argument(
        "--batch", type=int, default=8, help="max batch for the batched phase (0: skip it)"
    )
    parser.add_argument("--app-args", default="", help="extra arguments for app.py")
    args = parser.parse_args()
    print(f"CPU cores: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.1f}")

    phases = []
    if args.url:
        phases.append(run_phase("app", args.url, None, args.clients, args.duration))
    else:
        settings = [("unbatched", ["--max-batch", "1"])]
        if args.batch > 1:
            settings.append(
                (f"/predict batched (max {args.batch})", ["--max-batch", str(args.batch)])
            )
        for name, flags in settings:
            port = free_port()
            process = start_app(port, [*args.app_args.split(), *flags])
            try:
                url = f"http://127.0.0.1:{port}/"
                phases.append(run_phase(name, url, process.pid, args.clients, args.duration))
            finally:
                process.terminate()
                process.wait(30)
    for phase in phases:
        report(phase, args.clients)
    if len(phases) == 2:
        print(
            f"\nthroughput batched / unbatched: {phases[1].rate / phases[0].rate:.2f}x "
            f"(same run, same clients and duration)"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    sys.exit(1 if any(p.calls.errors for p in phases) else 0)


if __name__ == "__main__":
    main()
