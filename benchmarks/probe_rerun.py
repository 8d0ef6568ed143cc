"""What a probe's second run on the same scans costs against its first (the feature cache).

::

    python benchmarks/probe_rerun.py --data /work/shared/data/oct-real --per-class 18 --repeats 2

Copies ``--per-class`` scans of each class of ``--data`` (``<CLASS>/*``, chosen with ``--seed``)
into a temporary folder and writes a randomly initialised MIRAGE-Base in the Hub's file format
into a temporary Hugging Face cache (the real weights need a network; the code path is the
same). Then, ``--repeats`` times, back to back on the same machine: with an empty feature
cache, ``python -m train --mode probe --model mirage_base_patch32_512 --pretrained`` (the first
run), then the same command into another output folder (the second run). Prints each run's wall
time and CPU time (the whole process: start-up, embedding, fit, calibration, prediction sets,
report), the load average before it, and the ratios of the second run to the first. On a
shared machine the CPU time is the steadier figure: wall time there says more about the other
processes. ``--repo`` times another
checkout's ``python -m train`` (e.g. one from before the cache served every pass).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirage_demo.images import IMAGE_SUFFIXES
from tests import mirage_reference as ref

ROOT = Path(__file__).resolve().parent.parent
REVISION = "1" * 40


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="real scans, <CLASS>/*")
    parser.add_argument("--per-class", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=2, help="first/second run pairs")
    parser.add_argument("--seed", type=int, default=0, help="which scans are copied")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--repo", type=Path, default=ROOT, help="the checkout whose python -m train is timed"
    )
    return parser


def copy_scans(source: Path, target: Path, per_class: int, seed: int) -> int:
    """``per_class`` scans of each class folder of ``source`` copied to ``target/<CLASS>/``."""
    copied = 0
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        (target / folder.name).mkdir(parents=True)
        for file in random.Random(seed).sample(files, min(per_class, len(files))):
            shutil.copy2(file, target / folder.name / file.name)
            copied += 1
    return copied


def random_mirage_base(hub_cache: Path) -> None:
    """A randomly initialised MIRAGE-Base in the Hub's file format, as a cached Hub repo."""
    repo = hub_cache / "models--j-morano--MIRAGE-Base"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    save_file(ref.hub_checkpoint(768, 12, seed=3), str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


def timed_probe(
    repo: Path, data: Path, out: Path, cache: Path, env: dict[str, str]
) -> dict[str, object]:
    """One ``python -m train --mode probe`` process: its wall time, what it embedded."""
    command = [
        sys.executable, "-m", "train", "--mode", "probe", "--model", "mirage_base_patch32_512",
        "--pretrained", "--data", str(data), "--out", str(out), "--cache-dir", str(cache),
        "--no-progress", "--no-tensorboard",
    ]  # fmt: skip
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"the probe failed:\n{done.stdout}\n{done.stderr}")
    facts = json.loads((out / "config.json").read_text())["training"]["probe"]
    line = next(line for line in done.stdout.splitlines() if line.startswith("probe: "))
    return {"seconds": seconds, "cpu_seconds": cpu, "load_before": load,
            "train_val_embedded": facts["images_embedded"], "line": line}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="probe-rerun-"))
    scans = copy_scans(args.data, work / "data", args.per_class, args.seed)
    random_mirage_base(work / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(work / "hub"), "HF_HUB_OFFLINE": "1"}
    print(f"{scans} scans; MIRAGE-Base (random weights) at 512x512; {os.cpu_count()} cores")
    pairs = []
    for repeat in range(args.repeats):
        cache = work / f"cache-{repeat}"  # empty: the first run embeds everything
        first = timed_probe(args.repo, work / "data", work / f"first-{repeat}", cache, env)
        second = timed_probe(args.repo, work / "data", work / f"second-{repeat}", cache, env)
        pairs.append({"first": first, "second": second})
        for name, run in (("first", first), ("second", second)):
            print(f"{name}: {run['seconds']:.1f} s wall, {run['cpu_seconds']:.1f} s CPU "
                  f"(load average {run['load_before']:.1f}) {run['line']}")  # fmt: skip
        print(f"second / first: wall {second['seconds'] / first['seconds']:.2f}, "
              f"CPU {second['cpu_seconds'] / first['cpu_seconds']:.2f}")  # fmt: skip
    for measure in ("seconds", "cpu_seconds"):
        ratios = [p["second"][measure] / p["first"][measure] for p in pairs]
        print(f"second run / first run ({'wall' if measure == 'seconds' else 'CPU'} time): "
              f"median {statistics.median(ratios):.2f} "
              f"(each pair: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"scans": scans, "pairs": pairs}))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
