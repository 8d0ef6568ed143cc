"""Training throughput in one run: input pipeline alone, train step alone, end to end.

    python benchmarks/train_throughput.py --data /path/to/oct [--model mirage_base_patch32_512]
        [--modes linear,full] [--device auto] [--json results.json]

1. Input pipeline, per CPU core (one thread, no worker processes), on the same images:
   - baseline: torchvision ``ImageFolder`` + PIL transforms (grayscale, bilinear resize,
     MIRAGE's flip / affine / brightness augmentation, ``ToTensor``), as a plain PyTorch
     pipeline would do every epoch; and the same without augmentation;
   - the preprocessed cache (:mod:`mirage_demo.cache`): building it (decode once), then the
     loader of cached uint8 pixels (what data loader workers do in every later epoch), and the
     loader plus MIRAGE's augmentation batched on this CPU (:mod:`mirage_demo.augment`; in
     training it runs on the training device, a GPU when there is one).
2. Train step alone: the trainer's own ``train_step`` (same model set-up, optimiser groups,
   AMP, loss) on synthetic tensors already on the device: images/s, and on CUDA the MFU from
   FLOPs counted by ``torch.utils.flop_counter`` against the GPU's dense bf16/fp16 peak.
3. End to end: the trainer's loader, ``to_model_input`` (with augmentation) and ``train_step``
   on the cached dataset, with the time spent waiting for data, preparing the batch
   (copy, augmentation) and in the step.

Ratios are within this run only. Without a GPU, step and end-to-end numbers are CPU numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mirage_demo.augment import BatchAugmentation
from mirage_demo.cache import CachedImages, build_cache
from mirage_demo.data import Preprocessing, Sample
from train.config import TrainConfig
from train.data import EpochSampler, make_loader, to_model_input
from train.distributed import Dist, resolve_device
from train.loop import train_step
from train.run import setup_run
from train.setup import keep_large_blocks

# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# 1. Input pipeline, per core


def baseline_transform(size: int, augment: bool) -> Any:
    from torchvision import transforms as T

    steps = [T.Grayscale(1), T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR)]
    if augment:  # MIRAGE's recipe, per image on 8-bit PIL images
        steps += BatchAugmentation().torchvision(fill=255)
    return T.Compose([*steps, T.ToTensor()])


def images_per_second(batches: Any, prepare: Any = None) -> float:
    """Images/s over an iterable of ``(images, labels, ...)`` batches (first batch excluded)."""
    iterator = iter(batches)
    first = next(iterator)
    if prepare is not None:
        prepare(first[0])
    count, started = 0, time.perf_counter()
    for batch in iterator:
        out = prepare(batch[0]) if prepare is not None else batch[0]
        count += len(out)
    return count / (time.perf_counter() - started)


def bench_pipeline(args: argparse.Namespace, size: int) -> dict[str, Any]:
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(1)
    folder = ImageFolder(args.data)
    rng = np.random.default_rng(0)
    n = min(args.pipeline_images, len(folder))
    chosen = sorted(rng.choice(len(folder), size=n, replace=False).tolist())
    samples = [Sample(Path(folder.samples[i][0]), folder.samples[i][1], str(i)) for i in chosen]
    batch = args.pipeline_batch
    results: dict[str, Any] = {"images": n, "image_size": size, "batch_size": batch}

    for name, augment in (("baseline_imagefolder_pil", True), ("baseline_no_augment", False)):
        folder.transform = baseline_transform(size, augment)
        loader = DataLoader(
            Subset(folder, chosen), batch_size=batch, shuffle=True, num_workers=0,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        results[name] = images_per_second(loader)

    pre = Preprocessing(input_size=(size, size))
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        started = time.perf_counter()
        cache = build_cache(samples, pre, tmp, workers=0, progress=False)
        results["cache_build_decode_once"] = n / (time.perf_counter() - started)
        dataset = CachedImages(cache)
        sampler = EpochSampler([samples[i] for i in dataset.indices], len(folder.classes))
        loader = make_loader(dataset, batch, 0, torch.device("cpu"), sampler)
        results["cached_loader"] = images_per_second(loader)
        augment = BatchAugmentation()
        generator = torch.Generator().manual_seed(0)

        def ready(images: torch.Tensor) -> torch.Tensor:
            return to_model_input(images, pre, torch.device("cpu"), augment, generator)

        results["cached_loader_plus_cpu_augment"] = images_per_second(loader, ready)
        del dataset, loader, cache
    base = results["baseline_imagefolder_pil"]
    results["speedup_loader_vs_baseline"] = results["cached_loader"] / base
    results["speedup_loader_vs_baseline_no_augment"] = (
        results["cached_loader"] / results["baseline_no_augment"]
    )
    results["speedup_with_cpu_augment_vs_baseline"] = (
        results["cached_loader_plus_cpu_augment"] / base
    )
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    return results


# --------------------------------------------------------------------------------------------
# 2 and 3. Train step and end to end, with the trainer's own set-up


def make_run(args: argparse.Namespace, mode: str, out: Path) -> Any:
    config = TrainConfig(
        data=args.data,
        model=args.model,
        img_size=args.img_size,
        mode=mode,
        epochs=1,
        warmup_epochs=0,
        batch_size=args.batch_size,
        out=str(out),
        device=args.device,
        amp=args.amp,
        workers=args.workers,
        cache_dir=args.cache_dir,
        threads=args.threads,
        grad_checkpointing=args.grad_checkpointing,
        skip_unreadable=True,
        tensorboard=False,
        progress=False,
    )
    return setup_run(config, None, Dist(device=resolve_device(args.device)))


def bench_step(run: Any, args: argparse.Namespace) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    device = run.dist.device
    size = run.preprocessing.input_size
    x = torch.rand(args.batch_size, 1, *size, device=device)
    y = torch.randint(0, len(run.data.class_names), (args.batch_size,), device=device)
    with FlopCounterMode(display=False) as counter:
        train_step(run, x, y)  # also the warm-up step
    flops_per_image = counter.get_total_flops() / args.batch_size
    for _ in range(args.warmup_steps):
        train_step(run, x, y)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        train_step(run, x, y)
    sync(device)
    seconds = time.perf_counter() - started
    rate = args.steps * args.batch_size / seconds
    result = {
        "images_per_s": rate,
        "ms_per_step": 1000 * seconds / args.steps,
        "gflops_per_image": flops_per_image / 1e9,
        "achieved_tflops": rate * flops_per_image / 1e12,
    }
    peak = peak_tflops(device, args.peak_tflops)
    if peak:
        result["mfu"] = result["achieved_tflops"] / peak
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def bench_end_to_end(run: Any, args: argparse.Namespace) -> dict[str, Any]:
    device = run.dist.device
    run.sampler.set_epoch(0)
    generator = torch.Generator().manual_seed(0)
    wait = prepare = step = 0.0
    images = 0
    iterator = iter(run.train_loader)
    for i in range(args.e2e_batches + 1):
        t0 = time.perf_counter()
        try:
            batch_images, labels, _ = next(iterator)
        except StopIteration:
            run.sampler.set_epoch(i)
            iterator = iter(run.train_loader)
            batch_images, labels, _ = next(iterator)
        t1 = time.perf_counter()
        x = to_model_input(batch_images, run.preprocessing, device, run.augment, generator)
        y = labels.to(device, non_blocking=True)
        sync(device)
        t2 = time.perf_counter()
        train_step(run, x, y)
        sync(device)
        t3 = time.perf_counter()
        if i == 0:
            continue  # warm-up
        wait, prepare, step = wait + t1 - t0, prepare + t2 - t1, step + t3 - t2
        images += len(y)
    total = wait + prepare + step
    return {
        "images_per_s": images / total,
        "workers": run.workers,
        "share_waiting_for_data": wait / total,
        "share_copy_and_augment": prepare / total,
        "share_train_step": step / total,
    }


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="OCT images, DIR/<CLASS>/* or splits")
    parser.add_argument("--model", default="mirage_base_patch32_512")
    parser.add_argument("--img-size", type=int, default=None, help="default: the model's")
    parser.add_argument("--modes", default="linear,full", help="fine-tuning modes to time")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 CUDA, 4 CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (30 CUDA, 2 CPU)")
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--e2e-batches", type=int, default=None, help="(50 CUDA, 2 CPU)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (trainer's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for 2 and 3")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--pipeline-images", type=int, default=400)
    parser.add_argument("--pipeline-batch", type=int, default=32)
    parser.add_argument("--cache-dir", default=None, help="cache for the end-to-end part")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--malloc",
        default="trainer",
        choices=["trainer", "default"],
        help="glibc malloc as python -m train sets it (large blocks from the heap) or as is",
    )
    return parser


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (printed and stored with them)."""
    cuda = device.type == "cuda"
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({cpu_name()})",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "malloc": args.malloc,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def report_pipeline(args: argparse.Namespace, size: int) -> dict[str, Any]:
    """Part 1, printed: the input pipeline per core."""
    print(f"\n1. input pipeline, per core (1 thread, 0 workers), {size}x{size}:")
    pipe = bench_pipeline(args, size)
    for key, value in pipe.items():
        unit = "x" if key.startswith("speedup") else (" img/s" if isinstance(value, float) else "")
        print(
            f"   {key:<40} {value:,.2f}{unit}"
            if isinstance(value, float)
            else f"   {key:<40} {value}"
        )
    return pipe


def report_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Parts 2 and 3 for one fine-tuning mode, printed: the step alone, then end to end."""
    with tempfile.TemporaryDirectory(prefix="bench-run-") as out:
        run = make_run(args, mode, Path(out))
        print(f"\n2. train step alone, {args.model} {mode}, batch {args.batch_size}, "
              f"{run.amp_dtype or 'fp32'} on {run.dist.device}:")  # fmt: skip
        step = bench_step(run, args)
        for key, value in step.items():
            print(f"   {key:<40} {value:,.3f}")
        print(f"3. end to end ({args.e2e_batches} batches from the cache):")
        e2e = bench_end_to_end(run, args)
        for key, value in e2e.items():
            print(f"   {key:<40} {value:,.3f}")
        del run
    return {"step": step, "end_to_end": e2e}


def main() -> int:
    args = build_parser().parse_args()
    if args.malloc == "trainer":
        keep_large_blocks()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (64 if cuda else 4)
    args.steps = args.steps or (30 if cuda else 2)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (5 if cuda else 0)
    args.e2e_batches = args.e2e_batches or (50 if cuda else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.img_size or 512
    env = environment(args, device)
    print(json.dumps(env, indent=1))
    if not cuda:
        print(
            "NOTE: no GPU in this session: steps 2 and 3 run on the CPU; GPU throughput and MFU "
            "of MIRAGE-Base at 512 are NOT measured here (run this script on a GPU for them)."
        )
    results: dict[str, Any] = {"environment": env}
    if not args.skip_pipeline:
        results["pipeline"] = report_pipeline(args, size)
    for mode in args.modes.split(","):
        results[f"train_{mode}"] = report_mode(args, mode)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
