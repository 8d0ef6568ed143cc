"""Classifying a volume against classifying the same B-scans as image files, and its memory.

::

    python benchmarks/volumes.py [--data ../shared/data/oct-real] [--count 49] [--rounds 5]

Takes ``--count`` real B-scans of one size (512x496) from ``--data`` (all classes, name order)
and writes them three ways in a temporary folder: PNG files, a Heidelberg ``.vol`` (eyepy's
format structures, as the tests build it) and a DICOM Ophthalmic Tomography file (uncompressed).
Throughput: the PNG files through the existing batch path
(:meth:`~mirage_demo.inference.Predictor.predict_batch`, batches of 8: what the CLI and the
Batch tab run) against each volume through
:func:`~mirage_demo.volume_predict.classify_volume` (batches of 8), alternating, ``--rounds``
times; the medians and the per-round ratios' median. Memory: each volume (``--count`` B-scans,
then four times as many) classified in a fresh process, after one warm-up batch; the growth of
the peak resident memory (``ru_maxrss``) over the classification: bounded by the batch, it does
not grow with the volume. On the bundled ResNet-18 (or ``--checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirage_demo.inference import DEFAULT_CHECKPOINT, Predictor  # noqa: E402
from mirage_demo.volume_dicom import write_opt  # noqa: E402
from mirage_demo.volume_io import load_volume  # noqa: E402
from mirage_demo.volume_predict import classify_volume  # noqa: E402
from tests.volume_fixtures import write_vol  # noqa: E402

SIZE = (512, 496)


def real_bscans(data: Path, count: int) -> list[np.ndarray]:
    """``count`` real B-scans of :data:`SIZE`, taken in turn from each class (name order)."""
    per_class = {
        folder.name: [p for p in sorted(folder.iterdir()) if p.is_file()]
        for folder in sorted(data.iterdir())
        if folder.is_dir()
    }
    chosen: list[np.ndarray] = []
    cursors = dict.fromkeys(per_class, 0)
    while len(chosen) < count:
        progressed = False
        for name, paths in per_class.items():
            while cursors[name] < len(paths) and len(chosen) < count:
                path = paths[cursors[name]]
                cursors[name] += 1
                with Image.open(path) as image:
                    if image.size == SIZE:
                        chosen.append(np.asarray(image.convert("L")))
                        progressed = True
                        break
        if not progressed:
            raise SystemExit(f"error: fewer than {count} scans of {SIZE[0]}x{SIZE[1]} in {data}")
    return chosen


def write_inputs(bscans: list[np.ndarray], folder: Path) -> dict[str, object]:
    pngs = []
    for i, bscan in enumerate(bscans):
        pngs.append(folder / f"bscan-{i:03d}.png")
        Image.fromarray(bscan).save(pngs[-1])
    return {
        "png": pngs,
        "vol": write_vol(folder / "eye.vol", bscans),
        "dicom": write_opt(folder / "eye.dcm", bscans),
    }


def throughput(predictor: Predictor, inputs: dict[str, object], rounds: int) -> dict[str, dict]:
    """Wall and CPU seconds per round of each input (alternating), and the median per-round
    ratios (CPU time: this machine is shared, wall time waits for other jobs)."""
    times: dict[str, list[float]] = {"png": [], "vol": [], "dicom": []}
    cpu: dict[str, list[float]] = {kind: [] for kind in times}
    for _ in range(rounds):
        for kind in times:
            began, began_cpu = time.perf_counter(), time.process_time()
            if kind == "png":
                predictor.predict_batch([str(p) for p in inputs["png"]], batch_size=8)
            else:
                with load_volume(inputs[kind]) as volume:
                    for _result in classify_volume(predictor, volume, batch_size=8):
                        pass
            times[kind].append(time.perf_counter() - began)
            cpu[kind].append(time.process_time() - began_cpu)
    count = len(inputs["png"])
    out = {}
    for kind, seconds in times.items():
        ratios = [png / own for png, own in zip(times["png"], seconds, strict=True)]
        cpu_ratios = [png / own for png, own in zip(cpu["png"], cpu[kind], strict=True)]
        out[kind] = {
            "median_s": statistics.median(seconds),
            "median_cpu_s": statistics.median(cpu[kind]),
            "bscans_per_s": count / statistics.median(seconds),
            "throughput_vs_png": statistics.median(ratios),
            "cpu_throughput_vs_png": statistics.median(cpu_ratios),
            "rounds_s": [round(s, 3) for s in seconds],
        }
    return out


def memory_child(checkpoint: str, path: str, threads: int) -> None:
    """In a fresh process: the peak RSS growth (MiB) of classifying the volume at ``path``."""
    torch.set_num_threads(threads)
    predictor = Predictor.from_pretrained(checkpoint)
    with load_volume(path) as volume:
        warm = classify_volume(predictor, volume, batch_size=8)
        for _ in range(8):  # one batch: the allocator's pools and the model's buffers
            next(warm)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _result in warm:
            pass
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(
            json.dumps(
                {
                    "slices": len(volume),
                    "peak_before_mib": before / 1024,
                    "peak_growth_mib": (after - before) / 1024,
                }
            )
        )


def memory(checkpoint: str, bscans: list[np.ndarray], folder: Path, threads: int) -> list[dict]:
    rows = []
    for repeat in (1, 4):
        stack = bscans * repeat
        for kind, path in (
            ("vol", folder / f"mem-{repeat}.vol"),
            ("dicom", folder / f"mem-{repeat}.dcm"),
        ):
            if kind == "vol":
                write_vol(path, stack)
            else:
                write_opt(path, stack)
            command = [
                sys.executable,
                __file__,
                "--memory-child",
                str(path),
                "--checkpoint",
                checkpoint,
                "--threads",
                str(threads),
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append({"format": kind, "file_mb": path.stat().st_size / 1e6, **row})
            path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "oct-real")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--count", type=int, default=49)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.checkpoint, args.memory_child, args.threads)
        return
    torch.set_num_threads(args.threads)
    print(f"load: {os.getloadavg()}", flush=True)
    bscans = real_bscans(args.data, args.count)
    predictor = Predictor.from_pretrained(args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="volume-bench-") as tmp:
        inputs = write_inputs(bscans, Path(tmp))
        predictor.predict_batch([str(p) for p in inputs["png"][:8]], batch_size=8)  # warm-up
        speed = throughput(predictor, inputs, args.rounds)
        rss = memory(args.checkpoint, bscans, Path(tmp), args.threads)
    print(
        f"\n{args.count} real B-scans of {SIZE[0]}x{SIZE[1]}, {args.rounds} rounds, "
        f"{args.threads} threads, {Path(args.checkpoint).name}; load after: {os.getloadavg()}"
    )
    print("\n| input | median s | B-scans/s | throughput vs PNG files (median of rounds) |")
    print("| --- | ---: | ---: | ---: |")
    for kind, row in speed.items():
        print(
            f"| {kind} | {row['median_s']:.2f} | {row['bscans_per_s']:.1f} | "
            f"{row['throughput_vs_png']:.2f}x |"
        )
    print("\n| volume | B-scans | file MB | peak RSS before (MiB) | peak RSS growth (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rss:
        print(
            f"| {row['format']} | {row['slices']} | {row['file_mb']:.1f} | "
            f"{row['peak_before_mib']:.0f} | {row['peak_growth_mib']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"throughput": speed, "memory": rss}, indent=2) + "\n")


if __name__ == "__main__":
    main()
