"""Does the Compare grid's faithfulness tell the methods apart? Measured on bundled test scans.

::

    python benchmarks/faithfulness.py assets/demo-model assets/demo-vit --threads 2
    python benchmarks/faithfulness.py assets/demo-model --per-class 5 --json out.json

For each checkpoint and each of its bundled test scans (``assets/test-scans``, downsized
copies; ``--per-class`` takes the first N of each class), :func:`mirage_demo.trust.compare_methods`
explains the predicted class with every method and scores each map. Reported:

- per reference class and overall: the share of scans on which the best and the worst of the
  *distinct* methods (a method that draws another's map is left out: it shares its score)
  differ by at least ``--gap`` nats (0.3);
- the random map's score (the grid's chance level): median, quartiles and the 90th percentile
  of its absolute value, which sets the width of the band read as chance;
- each method's median faithfulness and how often it is the best and the worst;
- for a CNN, the same share without ``gradcam-early`` (Grad-CAM on the block before the last):
  what the grid's maps of the last block alone would separate.

The grid's time is measured by ``benchmarks/inference.py --grid-scans``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirage_demo.explain import EARLY_METHOD
from mirage_demo.inference import Predictor
from mirage_demo.testscans import ScanEntry, scan_set_for
from mirage_demo.trust import compare_methods


def chosen(entries: list[ScanEntry], per_class: int | None) -> list[ScanEntry]:
    """The first ``per_class`` scans of each reference class (all when None)."""
    taken: dict[str, int] = defaultdict(int)
    kept = []
    for entry in entries:
        if per_class is None or taken[entry.true] < per_class:
            taken[entry.true] += 1
            kept.append(entry)
    return kept


def measure(checkpoint: Path, per_class: int | None, gap: float) -> dict:
    """Every chosen scan's scores: per scan the class, each method's faithfulness and
    ``same_as``, the random map's score, and the spreads with and without ``gradcam-early``."""
    predictor = Predictor.from_pretrained(checkpoint)
    scans, why = scan_set_for(checkpoint)
    if scans is None or not scans.entries:
        raise SystemExit(f"{checkpoint}: {why}")
    entries = chosen(scans.entries, per_class)
    compare_methods(predictor, entries[0].image)  # warm-up (and the randomised model's copy)
    rows = []
    for number, entry in enumerate(entries, 1):
        comparison = compare_methods(predictor, entry.image, name=entry.file)
        distinct = [s.faithfulness for s in comparison.distinct()]
        last_block = [s.faithfulness for s in comparison.distinct() if s.method != EARLY_METHOD]
        rows.append(
            {
                "file": entry.file,
                "true": entry.true,
                "predicted": comparison.prediction.label,
                "faithfulness": {s.method: s.faithfulness for s in comparison.scores},
                "same_as": {s.method: s.same_as for s in comparison.scores if s.same_as},
                "random": comparison.random_reference.faithfulness,
                "spread": max(distinct) - min(distinct),
                "spread_last_block": max(last_block) - min(last_block),
            }
        )
        if number % 25 == 0:
            print(f"  {checkpoint.name}: {number}/{len(entries)} scans", file=sys.stderr)
    return {
        "checkpoint": str(checkpoint),
        "methods": list(predictor.methods),
        "fractions": list(comparison.fractions),
        "gap": gap,
        "scans": rows,
    }


def report(result: dict) -> None:
    rows, gap = result["scans"], result["gap"]
    print(f"\n## {result['checkpoint']} ({len(rows)} test scans, fractions {result['fractions']})")
    print(f"\n| reference class | scans | best - worst distinct method >= {gap} nats |")
    print("| --- | ---: | ---: |")
    by_class: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_class[row["true"]].append(row)
    for name, group in [*sorted(by_class.items()), ("all", rows)]:
        share = np.mean([row["spread"] >= gap for row in group])
        print(f"| {name} | {len(group)} | {share:.0%} |")
    chance = np.array([row["random"] for row in rows])
    q1, median, q3 = np.quantile(chance, [0.25, 0.5, 0.75])
    print(
        f"\nRandom map (chance level): median {median:+.3f} nats, quartiles {q1:+.2f} to "
        f"{q3:+.2f}, 90th percentile of |score| {np.quantile(np.abs(chance), 0.9):.2f}"
    )
    print("\n| method | median faithfulness (nats) | best on | worst on | same map as |")
    print("| --- | ---: | ---: | ---: | --- |")
    for method in result["methods"]:
        values = [row["faithfulness"][method] for row in rows]
        tested = [row for row in rows if method not in row["same_as"]]
        best = sum(max(r["faithfulness"], key=r["faithfulness"].get) == method for r in tested)
        worst = sum(min(r["faithfulness"], key=r["faithfulness"].get) == method for r in tested)
        same = defaultdict(int)
        for row in rows:
            if method in row["same_as"]:
                same[row["same_as"][method]] += 1
        same_text = ", ".join(f"{m} on {n}/{len(rows)}" for m, n in same.items()) or "-"
        print(f"| {method} | {statistics.median(values):+.2f} | {best} | {worst} | {same_text} |")
    if EARLY_METHOD in result["methods"]:
        print(f"\nWithout {EARLY_METHOD} (the last block's maps only), best - worst >= {gap}:")
        for name, group in [*sorted(by_class.items()), ("all", rows)]:
            share = np.mean([row["spread_last_block"] >= gap for row in group])
            print(f"  {name}: {share:.0%} of {len(group)}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--per-class", type=int, help="the first N test scans of each class")
    parser.add_argument("--gap", type=float, default=0.3, help="nats (default 0.3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write every scan's scores here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for checkpoint in args.checkpoints:
        result = measure(checkpoint, args.per_class, args.gap)
        report(result)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
