"""What a request costs on a ZeroGPU Space, measured on this CPU through the app's own handlers.

::

    python benchmarks/zerogpu_cost.py                       # both parts, 9 rounds
    python benchmarks/zerogpu_cost.py --rounds 5 --mirage base,large --batch 8

1. **Small models on the CPU, or through ZeroGPU.** Each bundled model answers ``/predict`` and
   ``/explain`` (Grad-CAM) on an example scan two ways, alternating within each round: as a
   ZeroGPU Space now serves it (``small_on_cpu``: in the main process, no ``spaces.GPU`` call)
   and through the ``spaces.GPU`` stand-in the tests use (``tests.test_zerogpu.StandInZeroGPU``:
   arguments and results pickled across, as to the real worker). Both run on this CPU, so the
   ratio is the wrapper's own overhead; what the real ZeroGPU adds on top (a scheduling request
   to the Hub, a worker process, the model's weights onto the GPU) and the quota each call
   reserves are reported, not measured here.
2. **What a MIRAGE-sized call needs** (``--mirage base``: random weights in a temporary
   checkpoint): ``/predict``, ``/explain``, ``/compare`` and ``/batch`` of ``--batch`` scans
   through the same handlers on this CPU (one round: these take seconds to minutes). An H200
   runs the model part far faster, so these are upper bounds for the model part of a ZeroGPU
   call; the durations the app reserves are printed beside them.

Times are process CPU seconds (all threads), not wall time: on a machine shared with other jobs
they are what the call itself costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import spaces  # noqa: E402

from mirage_demo.checkpoint import CheckpointConfig, save_checkpoint  # noqa: E402
from mirage_demo.data import Preprocessing  # noqa: E402
from mirage_demo.ui import ModelChoice, ModelRegistry, build_app  # noqa: E402
from mirage_demo.ui.batch import batch_gpu_seconds  # noqa: E402
from mirage_demo.ui.context import COMPARE_GPU_SECONDS, PREDICTED, SCAN_GPU_SECONDS  # noqa: E402
from mirage_demo.uncertainty import DEFAULT_LEVEL  # noqa: E402
from mirage_demo.zerogpu import parameter_count  # noqa: E402
from tests.test_zerogpu import StandInZeroGPU  # noqa: E402

SCAN = ROOT / "assets/examples/DME/DME-11053-1.jpeg"
BUNDLED = {"demo-model": ROOT / "assets/demo-model", "demo-vit": ROOT / "assets/demo-vit"}


def handlers(registry: ModelRegistry) -> dict[str, Callable[..., Any]]:
    """The app's named endpoints (as wrapped for ZeroGPU), by api_name."""
    demo = build_app(registry)
    return {fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name}


def upload(path: Path) -> dict[str, str]:
    return {"path": str(path), "orig_name": path.name}


def timed(call: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Seconds ``call`` took: process CPU time (all threads), which a busy machine's other
    jobs inflate far less than wall time."""
    start = time.process_time()
    call(*args, **kwargs)
    return time.process_time() - start


def small_models(rounds: int) -> None:
    gpu = StandInZeroGPU()
    spaces.GPU = gpu  # what build_app's handlers are wrapped with (gpu_task reads it)
    print("| model | endpoint | main process, CPU s | via spaces.GPU stand-in, CPU s | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, path in BUNDLED.items():
        choices = [ModelChoice(name, str(path))]
        ways = {
            "cpu": handlers(ModelRegistry(choices, small_on_cpu=True)),
            "gpu": handlers(ModelRegistry(choices, small_on_cpu=False)),
        }
        calls = {
            "/predict": ("predict", (upload(SCAN), name, DEFAULT_LEVEL)),
            "/explain": ("explain", (upload(SCAN), name, "gradcam", PREDICTED, 0.5, DEFAULT_LEVEL)),
        }
        for endpoint, (api, args) in calls.items():
            for h in ways.values():  # warm: each model loaded, first call paid
                h[api](*args)
            times: dict[str, list[float]] = {"cpu": [], "gpu": []}
            for _ in range(rounds):
                for way, h in ways.items():
                    times[way].append(timed(h[api], *args))
            cpu, via = statistics.median(times["cpu"]), statistics.median(times["gpu"])
            print(f"| {name} | {endpoint} | {cpu:.3f} | {via:.3f} | {via / cpu:.2f}x |")
    print(
        f"\nQuota reserved per call: 0 s on the CPU; {SCAN_GPU_SECONDS} s through ZeroGPU "
        f"(/predict, /explain). Stand-in calls recorded: {len(gpu.calls)} "
        "(only the second way's)."
    )


def random_checkpoint(directory: Path, architecture: str) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(architecture, num_classes=4, in_chans=1).eval()
    config = CheckpointConfig(architecture, ["CNV", "DME", "DRUSEN", "NORMAL"])
    config.preprocessing = Preprocessing.from_model(model)
    save_checkpoint(directory, model, config)
    return directory


def mirage_calls(sizes: list[str], batch: int) -> None:
    scans = sorted((ROOT / "assets/examples").glob("*/*.jpeg"))
    files = [upload(scans[i % len(scans)]) for i in range(batch)]
    print("\n| model | parameters | endpoint | CPU seconds, all threads | reserved on ZeroGPU |")
    print("| --- | ---: | --- | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            architecture = f"mirage_{size}_patch32_512"
            path = random_checkpoint(Path(tmp) / size, architecture)
            registry = ModelRegistry([ModelChoice(size, str(path))])
            h = handlers(registry)
            count = parameter_count(registry.config(size))
            registry.get(size)  # loaded before timing, as on ZeroGPU (placed at start-up)
            calls = {
                "/predict": ("predict", (upload(SCAN), size, DEFAULT_LEVEL), SCAN_GPU_SECONDS),
                "/explain": (
                    "explain",
                    (upload(SCAN), size, "gradcam", PREDICTED, 0.5, DEFAULT_LEVEL),
                    SCAN_GPU_SECONDS,
                ),
                "/compare": ("compare", (upload(SCAN), size, PREDICTED), COMPARE_GPU_SECONDS),
                f"/batch of {batch}": ("batch", (files, size, None), batch_gpu_seconds(files)),
            }
            for endpoint, (api, args, reserved) in calls.items():
                seconds = timed(h[api], *args)
                millions = f"{count / 1e6:.0f} M"
                print(f"| {size} | {millions} | {endpoint} | {seconds:.2f} | {reserved} s |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--mirage", default="base", help="MIRAGE sizes, e.g. base,large ('' to skip)"
    )
    parser.add_argument("--batch", type=int, default=16, help="scans in the /batch request")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds\n")
    small_models(args.rounds)
    if args.mirage:
        mirage_calls([s for s in args.mirage.split(",") if s], args.batch)


if __name__ == "__main__":
    main()
