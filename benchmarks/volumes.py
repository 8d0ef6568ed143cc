"""Classifying a volume against classifying the same B-scans as image files, and its memory.

::

    python benchmarks/volumes.py [--data ../shared/data/oct-real] [--count 49] [--rounds 5]
                                  [--no-memory]

Takes ``--count`` real B-scans of one size (512x496) from ``--data`` (all classes, name order)
and writes them three ways in a temporary folder: PNG files, a Heidelberg ``.vol`` (eyepy's
format structures, as the tests build it) and a DICOM Ophthalmic Tomography file (uncompressed).
Throughput: the PNG files through the existing batch path
(:meth:`~mirage_demo.inference.Predictor.predict_batch`, batches of 8: what the CLI and the
Batch tab run) against each volume through
:func:`~mirage_demo.volume_predict.classify_volume` (batches of 8), alternating, ``--rounds``
times; the medians (wall and CPU time: the machine is shared) and the per-round ratios' median.
Memory: each volume (``--count`` B-scans, then four times as many) classified in a fresh
process, after one warm-up batch; the growth of the peak resident memory (VmHWM, reset after
the warm-up) over the classification: bounded by the batch, it does not grow with the volume.
A control keeps every B-scan of the larger volume in a list, to show the measure sees growth.
On the bundled ResNet-18 (or ``--checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import os
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


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(checkpoint: str, path: str, threads: int, keep: bool) -> None:
    """In a fresh process: the growth of the peak RSS (MiB) over classifying the volume at
    ``path``, after a warm-up batch. The peak (VmHWM) is reset to the current RSS first
    (``/proc/self/clear_refs``: ru_maxrss would carry the parent's peak across exec).
    ``keep``: the control, every B-scan kept in a list (what bounded memory avoids)."""
    torch.set_num_threads(threads)
    predictor = Predictor.from_pretrained(checkpoint)
    kept = []
    with load_volume(path) as volume:
        results = classify_volume(predictor, volume, batch_size=8)
        for _ in range(8):  # one batch: the allocator's pools and the model's buffers
            next(results)
        Path("/proc/self/clear_refs").write_text("5")  # peak := current
        before = _status_mib("VmRSS")
        for result in results:
            if keep:
                kept.append(result.image)
        growth = _status_mib("VmHWM") - before
        print(
            json.dumps(
                {
                    "slices": len(volume),
                    "rss_before_mib": before,
                    "peak_growth_mib": growth,
                    "kept": len(kept),
                }
            )
        )


def memory(checkpoint: str, bscans: list[np.ndarray], folder: Path, threads: int) -> list[dict]:
    """Peak RSS growth per volume (``.vol``, DICOM; 1x and 4x the B-scans), each in a fresh
    process, and the control (the 4x DICOM with every B-scan kept)."""
    rows = []
    runs = [(kind, repeat, False) for repeat in (1, 4) for kind in ("vol", "dicom")]
    for kind, repeat, keep in [*runs, ("dicom", 4, True)]:
        path = folder / f"mem-{repeat}.{'vol' if kind == 'vol' else 'dcm'}"
        if not path.exists():
            (write_vol if kind == "vol" else write_opt)(path, bscans * repeat)
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
        result = subprocess.run(
            command + ["--keep"] * keep, capture_output=True, text=True, check=True
        )
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "format": kind + (" (control: B-scans kept)" if keep else ""),
                "file_mb": path.stat().st_size / 1e6,
                **row,
            }
        )
    return rows


def report(args: argparse.Namespace, speed: dict[str, dict], rss: list[dict]) -> None:
    print(
        f"\n{args.count} real B-scans of {SIZE[0]}x{SIZE[1]}, {args.rounds} rounds, "
        f"{args.threads} threads, {Path(args.checkpoint).name}; load after: {os.getloadavg()}"
    )
    print(
        "\n| input | median wall s | B-scans/s | vs PNG files, wall | median CPU s "
        "| vs PNG files, CPU |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, row in speed.items():
        print(
            f"| {kind} | {row['median_s']:.2f} | {row['bscans_per_s']:.2f} | "
            f"{row['throughput_vs_png']:.2f}x | {row['median_cpu_s']:.2f} | "
            f"{row['cpu_throughput_vs_png']:.2f}x |"
        )
    print("\n| volume | B-scans | file MB | RSS after warm-up (MiB) | peak RSS growth (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rss:
        print(
            f"| {row['format']} | {row['slices']} | {row['file_mb']:.1f} | "
            f"{row['rss_before_mib']:.0f} | {row['peak_growth_mib']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "oct-real")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--count", type=int, default=49)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="throughput only")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.checkpoint, args.memory_child, args.threads, args.keep)
        return
    torch.set_num_threads(args.threads)
    print(f"load: {os.getloadavg()}", flush=True)
    bscans = real_bscans(args.data, args.count)
    predictor = Predictor.from_pretrained(args.checkpoint)
    speed: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="volume-bench-") as tmp:
        inputs = write_inputs(bscans, Path(tmp))
        if args.rounds > 0:
            predictor.predict_batch([str(p) for p in inputs["png"][:8]], batch_size=8)  # warm
            speed = throughput(predictor, inputs, args.rounds)
        rss = memory(args.checkpoint, bscans, Path(tmp), args.threads) if args.memory else []
    report(args, speed, rss)
    if args.json:
        args.json.write_text(json.dumps({"throughput": speed, "memory": rss}, indent=2) + "\n")


if __name__ == "__main__":
    main()
