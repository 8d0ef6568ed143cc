"""How long "How it learned" takes for one scan: ``/reconstruct``'s handler with the bundled
tiny MIRAGE, against a baseline measured in the same run (the Classify tab's ``/predict``
on the bundled ViT, the same scans).

::

    python benchmarks/reconstruction.py [--repeats 5] [--threads 2]

Each example scan is reconstructed ``--repeats`` times (the mask ratio 0.75, a new seed each
time), image decoding and the three output pictures included; the first call (loading the
model) is reported apart. The target is under 2 s a scan on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirage_demo.inference import Predictor
from mirage_demo.ui.context import example_scans
from mirage_demo.ui.pretraining import reconstruct_view

VIT = Path(__file__).resolve().parent.parent / "assets" / "demo-vit"


def timed(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scans = [path for path, _ in example_scans()]
    first = timed(reconstruct_view, scans[0], 0.75, 0, "tiny")
    predictor = Predictor.from_pretrained(str(VIT))
    predictor.predict(scans[0])
    rebuild, predict = [], []
    for repeat in range(args.repeats):
        for scan in scans:
            rebuild.append(timed(reconstruct_view, scan, 0.75, repeat + 1, "tiny"))
            predict.append(timed(predictor.predict, scan))
    median, worst = statistics.median(rebuild), max(rebuild)
    baseline = statistics.median(predict)
    print(f"{len(rebuild)} reconstructions, torch threads {torch.get_num_threads()}")
    print(f"first call (loads the model): {first:.2f} s")
    print(f"/reconstruct (tiny MIRAGE): median {median:.2f} s, worst {worst:.2f} s")
    print(f"baseline /predict (bundled ViT): median {baseline:.2f} s")
    print(f"ratio reconstruct / predict: {median / baseline:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
