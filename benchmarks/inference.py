"""Inference benchmark: what predictions and explanations cost against a bare forward pass.

::

    python benchmarks/inference.py                       # MIRAGE-Base at 512, random weights
    python benchmarks/inference.py --model mirage_tiny_patch32_512 --rounds 3 --json out.json
    python benchmarks/inference.py --checkpoint assets/demo-model --threads 2   # the bundled CNN
    python benchmarks/inference.py --checkpoint assets/demo-model --threads 2 --rounds 1 \
        --grid-scans 20      # + the Compare grid on 20 of its bundled real test scans

All timings of a round are taken back to back (in a shuffled order) and each is divided by that
round's bare forward, so the ratios hold on a machine shared with other work; the table gives the
median over rounds (and the range). Measured, for one 768x496 grayscale JPEG (Kermany's most
common size):

- ``bare forward``: ``model(x)`` under ``torch.inference_mode()`` on the preprocessed tensor;
- ``predict``: ``Predictor.predict(path)``: decode, quality check, preprocessing, forward;
- ``predict + <method>``: ``Predictor.explain(path, method)``: the same plus the heatmap at the
  image's size and the RGB overlay, from one forward pass;
- ``compare all methods``: :func:`mirage_demo.trust.compare_methods`, the Classify tab's grid:
  every method's map with its deletion test and sanity check (the model's last block
  randomised); also reported as a ratio to ``predict + gradcam`` (a single explanation);
- ``pytorch-grad-cam GradCAM``: the library's own call on the preprocessed tensor (forward and
  a full backward), for comparison;
- batched throughput: ``predict_batch`` vs ``predict`` one image at a time;
- checkpoint load time (``Predictor.from_pretrained`` on a local directory) and the resident
  memory of a loaded predictor, measured in a fresh process;
- with ``--grid-scans N`` (and ``--checkpoint``): the Compare grid on N of the checkpoint's
  bundled real test scans (the classes in turn), each timed after a bare forward of the same
  scan: median and max seconds, the median ratio, where the time goes, and the load average
  before and after (on a shared machine the seconds are upper bounds; the ratio holds).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mirage_demo  # noqa: F401
from mirage_demo.checkpoint import CheckpointConfig, save_checkpoint
from mirage_demo.data import Preprocessing
from mirage_demo.explain import METHODS
from mirage_demo.inference import Predictor
from mirage_demo.testscans import scan_set_for
from mirage_demo.trust import compare_methods
from tests.synthetic_oct import oct_like

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
GRID = "compare all methods (grid + deletion + sanity)"
SINGLE = "predict + gradcam"  # the single explanation the grid is compared with


def synthetic_scan(height: int = 496, width: int = 768, seed: int = 0) -> np.ndarray:
    """A grayscale uint8 OCT-like B-scan (the tests' :func:`tests.synthetic_oct.oct_like`)."""
    return oct_like(height, width, band_center=0.4, seed=seed)


def seconds(function: Callable[[], object]) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def grid_times(predictor: Predictor, checkpoint: Path, count: int) -> dict:
    """The Compare grid on ``count`` bundled test scans of ``checkpoint`` (the classes in
    turn), each after a bare forward of the same scan: seconds, ratios, the grid's parts."""
    scans, why = scan_set_for(checkpoint)
    if scans is None:
        print(f"--grid-scans: {why}", file=sys.stderr)
        return {}
    by_class: dict[str, list[Path]] = defaultdict(list)
    for entry in scans.entries:
        by_class[entry.true].append(entry.image)
    turns = zip(*by_class.values(), strict=False)  # each class in turn, to the rarest's end
    images = [image for turn in turns for image in turn][:count]
    compare_methods(predictor, images[0])  # warm-up (and the randomised model's copy)
    load_before = os.getloadavg()
    grids, bares, parts = [], [], defaultdict(list)
    for image in images:
        x = predictor.preprocessing.normalize(predictor.preprocessing.read_resized(image))[None]
        with torch.inference_mode():
            bares.append(seconds(lambda x=x: predictor.model(x)))
        began = time.perf_counter()
        comparison = compare_methods(predictor, image)
        grids.append(time.perf_counter() - began)
        for key, value in comparison.timing.items():
            parts[key].append(value)
    ratios = [g / b for g, b in zip(grids, bares, strict=True)]
    load = f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    print(
        f"\nCompare grid on {len(images)} bundled test scans: median "
        f"{statistics.median(grids):.2f} s, max {max(grids):.2f} s; "
        f"{statistics.median(ratios):.1f}x a bare forward (range {min(ratios):.1f}-"
        f"{max(ratios):.1f}); load average (1 min) {load}"
    )
    print(
        "  parts (median s): "
        + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in parts.items())
    )
    return {"grid_s": grids, "bare_s": bares, "ratio": ratios, "load": load, "parts": parts}


def resident_memory(directory: str, threads: int) -> dict[str, float]:
    """RSS (MiB) of a fresh process: after imports, after loading, after predict + explain."""
    code = f"""
import json, torch
torch.set_num_threads({threads})
def rss(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
import numpy as np, mirage_demo
from mirage_demo.inference import Predictor
from mirage_demo.trust import compare_methods
out = {{"imports_mib": rss()}}
p = Predictor.from_pretrained({directory!r})
out["loaded_mib"] = rss()
image = (np.random.default_rng(0).random((496, 768)) * 255).astype(np.uint8)
p.predict(image)
p.explain(image, "gradcam")
out["after_explain_mib"] = rss()
out["peak_mib"] = rss("VmHWM")
print(json.dumps(out))
"""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mirage_base_patch32_512")
    parser.add_argument(
        "--checkpoint", type=Path, help="a checkpoint directory instead of --model's random weights"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-images", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--image", type=Path, help="a scan to use (default: synthetic 768x496)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--grid-scans", type=int, default=0, help="time the Compare grid on N bundled test scans"
    )
    return parser


def load_predictor(args: argparse.Namespace) -> Predictor:
    """``--checkpoint``'s predictor, or ``--model`` with random weights (``args.model`` then
    names what was loaded)."""
    torch.manual_seed(0)
    if args.checkpoint:
        predictor = Predictor.from_pretrained(args.checkpoint)
        args.model = f"{predictor.config.architecture} ({args.checkpoint})"
        return predictor
    model = timm.create_model(args.model, num_classes=len(CLASSES)).eval()
    return Predictor(model, CLASSES, Preprocessing.from_model(model))


def single_image_tasks(
    predictor: Predictor, scan: Path, methods: list[str]
) -> tuple[dict[str, Callable[[], object]], torch.Tensor]:
    """The timed operations on one scan (the first is the bare forward), and its input."""
    model, preprocessing = predictor.model, predictor.preprocessing
    x = preprocessing.normalize(preprocessing.read_resized(scan))[None]
    layer = predictor.explainer.target_layer
    reshape = predictor.explainer.reshape_transform

    def bare() -> None:
        with torch.inference_mode():
            model(x)

    def library_gradcam() -> None:
        with GradCAM(model, [layer], reshape_transform=reshape) as cam:
            cam(x, [ClassifierOutputTarget(0)])
        model.zero_grad(set_to_none=True)

    tasks: dict[str, Callable[[], object]] = {
        "bare forward": bare,
        "predict": lambda: predictor.predict(scan),
        **{f"predict + {m}": (lambda m=m: predictor.explain(scan, m)) for m in methods},
        GRID: lambda: compare_methods(predictor, scan),
        "pytorch-grad-cam GradCAM (full backward)": library_gradcam,
    }
    return tasks, x


def timed_rounds(
    tasks: dict[str, Callable[[], object]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of every task per round, and each divided by that round's bare forward."""
    for task in tasks.values():  # warm-up
        task()
    times: dict[str, list[float]] = {name: [] for name in tasks}
    ratios: dict[str, list[float]] = {name: [] for name in tasks}
    order = list(tasks)
    shuffler = random.Random(0)
    for round_index in range(rounds):
        shuffler.shuffle(order)  # no task always follows the same one (e.g. BLAS threads spinning)
        measured = {name: seconds(tasks[name]) for name in order}
        for name, value in measured.items():
            times[name].append(value)
            ratios[name].append(value / measured["bare forward"])
        print(f"round {round_index + 1}: bare {measured['bare forward']:.3f}s", file=sys.stderr)
    return times, ratios


def batched_throughput(
    predictor: Predictor, count: int, rounds: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Images per second one at a time and with ``predict_batch`` (interleaved), and the
    speed-up per round."""
    images = [synthetic_scan(seed=i) for i in range(count)]
    single, batched = [], []
    for _ in range(max(1, rounds // 2)):
        single.append(seconds(lambda: [predictor.predict(image) for image in images]))
        batched.append(seconds(lambda: predictor.predict_batch(images, batch_size=len(images))))
    throughput = {
        "one at a time (images/s)": [len(images) / s for s in single],
        f"predict_batch, batch {len(images)} (images/s)": [len(images) / s for s in batched],
    }
    return throughput, [s / b for s, b in zip(single, batched, strict=True)]


def load_cost(args: argparse.Namespace, predictor: Predictor, work: Path) -> dict[str, Any]:
    """Checkpoint load times, a fresh process's resident memory, the weights' size."""
    if args.checkpoint:
        directory = args.checkpoint
    else:
        config = CheckpointConfig(args.model, CLASSES, predictor.preprocessing)
        directory = save_checkpoint(work / "checkpoint", predictor.model, config)
    return {
        "load_s": [seconds(lambda: Predictor.from_pretrained(directory)) for _ in range(3)],
        "memory_mib": resident_memory(str(directory), args.threads),
        "weights_mib": (directory / "model.safetensors").stat().st_size / 2**20,
    }


def print_report(results: dict[str, Any], methods: int) -> None:
    """The tables and lines the README quotes."""
    times, ratios = results["times_s"], results["ratios"]
    print()
    print("| operation | median s | min-max s | x bare forward (median, range) |")
    print("| --- | ---: | ---: | ---: |")
    for name in times:
        t_med, t_min, t_max = summary(times[name])
        r_med, r_min, r_max = summary(ratios[name])
        print(
            f"| {name} | {t_med:.3f} | {t_min:.3f}-{t_max:.3f} | "
            f"{r_med:.2f} ({r_min:.2f}-{r_max:.2f}) |"
        )
    grid_ratio = results["compare_vs_single_explanation"]
    if grid_ratio:
        print(
            f"\n{GRID}: {statistics.median(times[GRID]):.3f} s, "
            f"{statistics.median(grid_ratio):.2f}x a single explanation ({SINGLE}; "
            f"range {min(grid_ratio):.2f}-{max(grid_ratio):.2f}), "
            f"{methods} methods"
        )
    print()
    print("| throughput | images/s (median) |")
    print("| --- | ---: |")
    for name, values in results["throughput"].items():
        print(f"| {name} | {statistics.median(values):.2f} |")
    print(f"| batched / one at a time | {statistics.median(results['batch_speedup']):.2f}x |")
    print()
    load_times, memory = results["load_s"], results["memory_mib"]
    print(
        f"checkpoint load (from_pretrained, {results['weights_mib']:.0f} MiB weights): "
        f"median {statistics.median(load_times):.2f}s (min {min(load_times):.2f}s)"
    )
    print(
        f"resident memory: {memory['imports_mib']:.0f} MiB after imports, "
        f"{memory['loaded_mib']:.0f} MiB with the predictor loaded "
        f"(+{memory['loaded_mib'] - memory['imports_mib']:.0f} MiB), "
        f"{memory['after_explain_mib']:.0f} MiB after predict + Grad-CAM, "
        f"peak {memory['peak_mib']:.0f} MiB"
    )


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    predictor = load_predictor(args)
    methods = [m for m in args.methods.split(",") if m and m in predictor.methods]
    work = Path(tempfile.mkdtemp(prefix="mirage-bench-"))
    scan = args.image or work / "scan.jpeg"
    if args.image is None:
        Image.fromarray(synthetic_scan()).save(scan, quality=95)
    tasks, x = single_image_tasks(predictor, scan, methods)
    print(
        f"{args.model}, input {tuple(x.shape)}, torch {torch.__version__}, "
        f"{args.threads} threads, {args.rounds} rounds",
        file=sys.stderr,
    )
    times, ratios = timed_rounds(tasks, args.rounds)
    throughput, speedup = batched_throughput(predictor, args.batch_images, args.rounds)
    grid_ratio = [g / e for g, e in zip(times[GRID], times.get(SINGLE, []), strict=False)]
    results = {
        "model": args.model,
        "threads": args.threads,
        "rounds": args.rounds,
        "times_s": times,
        "ratios": ratios,
        "compare_vs_single_explanation": grid_ratio,
        "throughput": throughput,
        "batch_speedup": speedup,
        **load_cost(args, predictor, work),
    }
    print_report(results, len(predictor.methods))
    if args.grid_scans and args.checkpoint:
        results["compare_grid"] = grid_times(predictor, args.checkpoint, args.grid_scans)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
