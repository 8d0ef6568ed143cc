"""Training on a CPU: float32 against bfloat16 autocast, glibc malloc as is against the trainer's.

    python benchmarks/cpu_training.py --data /path/to/oct [--model resnet18] [--img-size 384]
        [--batch-size 32] [--steps 3] [--threads 2]

Runs ``benchmarks/train_throughput.py`` (train step alone and end to end, whole network) once
per combination, each in a fresh process (malloc settings cannot be undone in-process), and
prints images/s with ratios against float32 with malloc as is, all measured in this run. bf16
needs a CPU that computes it natively (AVX512-BF16 or AMX); ``python -m train --amp bf16``
refuses others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMBINATIONS = [("off", "default"), ("off", "trainer"), ("bf16", "default"), ("bf16", "trainer")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="OCT images, DIR/<CLASS>/*")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cache-dir", default=None, help="the trainer's cache (default: its own)")
    args = parser.parse_args()

    rates: dict[tuple[str, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cpu-training-") as tmp:
        for amp, malloc in COMBINATIONS:
            out = Path(tmp) / f"{amp}-{malloc}.json"
            command = [
                sys.executable, str(HERE / "train_throughput.py"), "--data", args.data,
                "--model", args.model, "--img-size", str(args.img_size), "--modes", "full",
                "--device", "cpu", "--amp", amp, "--malloc", malloc,
                "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                "--warmup-steps", "1", "--e2e-batches", str(args.steps),
                "--threads", str(args.threads), "--skip-pipeline", "--json", str(out),
            ]  # fmt: skip
            if args.cache_dir:
                command += ["--cache-dir", args.cache_dir]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            result = json.loads(out.read_text())["train_full"]
            rates[amp, malloc] = (
                result["step"]["images_per_s"],
                result["end_to_end"]["images_per_s"],
            )
    base_step, base_e2e = rates["off", "default"]
    print(f"{args.model} at {args.img_size}, batch {args.batch_size}, {args.threads} threads")
    header = ("precision", "malloc", "step img/s", "ratio", "e2e img/s", "ratio")
    print("{:<10} {:<8} {:>11} {:>6} {:>10} {:>6}".format(*header))
    for (amp, malloc), (step, e2e) in rates.items():
        name = "float32" if amp == "off" else "bfloat16"
        print(
            f"{name:<10} {malloc:<8} {step:>11.2f} {step / base_step:>5.2f}x "
            f"{e2e:>10.2f} {e2e / base_e2e:>5.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
