"""Label efficiency: balanced accuracy of linear probes against labelled scans per class.

::

    python benchmarks/label_efficiency.py --data DATA \\
        --backbone mirage_base_patch32_512:pretrained \\
        --backbone mirage_base_patch32_512:random \\
        --backbone checkpoint:assets/demo-model --backbone checkpoint:assets/demo-vit

The seed paper's central claim is that a foundation model needs fewer labels. For each
backbone, every image of a fixed pool is embedded once (features cached as
``python -m train --mode probe`` caches them); then, for 1, 2, 5, 10, 20, 50 and all training
scans per class, ``--draws`` random draws of that many scans per class each fit a probe
(class-balanced logistic regression, fixed ``--c``: no validation labels are spent) and are
scored on the same test scans. Each point is the mean balanced accuracy over draws with a 95%
interval over draws and test resamples (each draw's test predictions bootstrapped, pooled).

Backbones: ``ARCH:pretrained`` (timm's registered weights: MIRAGE from the Hugging Face Hub),
``ARCH:random`` (the same architecture randomly initialised: the no-pre-training reference),
``checkpoint:DIR`` (a checkpoint's network without its classifier, with its own preprocessing),
``pretraining:DIR`` (the encoder of a ``python -m train --mode pretrain`` checkpoint, e.g.
``assets/tiny-mirage``; compare it with ``mirage_tiny_patch32_512:random``).

The split is ``load_dataset(DATA, SplitSpec(...))`` with ``--split-from``'s settings (default: the
bundled demo models' training config), so a bundled model is never tested on scans it was
trained on (when it was trained on this data with those settings); ``--train-per-class`` and
``--test-per-class`` subsample train and test (seeded) to keep a CPU run short.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mirage_demo  # noqa: F401
from mirage_demo.cache import default_cache_dir
from mirage_demo.checkpoint import load_checkpoint
from mirage_demo.data import Preprocessing, Sample, SplitSpec, load_dataset
from mirage_demo.models import create_classifier
from mirage_demo.pretraining import pretrained_classifier
from mirage_demo.probe import cached_features, fit_probe

REPO = Path(__file__).resolve().parent.parent
SPLIT_CONFIG = REPO / "train" / "configs" / "demo-model.yaml"
PER_CLASS = ("1", "2", "5", "10", "20", "50", "all")


def split_from(config_file: Path) -> SplitSpec:
    """The split settings of a ``python -m train`` YAML config (paths relative to the
    repository, as the configs write them)."""
    from train.config import parse_config

    spec = parse_config(["--config", str(config_file)])[0].split
    exclude = tuple(e if Path(e).is_absolute() else str(REPO / e) for e in spec.exclude)
    return dataclasses.replace(spec, exclude=exclude)


def subsample(samples: list[Sample], per_class: int | None, seed: int) -> list[Sample]:
    """At most ``per_class`` samples of each class (seeded), in the original order."""
    if per_class is None:
        return samples
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    keep: list[int] = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        keep += rng.choice(members, min(per_class, len(members)), replace=False).tolist()
    return [samples[i] for i in sorted(keep)]


def backbone(
    spec: str, num_classes: int, img_size: int | None
) -> tuple[torch.nn.Module, Preprocessing]:
    """A backbone spec as ``(model, preprocessing)``."""
    kind, _, rest = spec.partition(":")
    if kind == "checkpoint":
        model, config = load_checkpoint(rest)
        return model, config.preprocessing
    if kind == "pretraining":  # the encoder of a --mode pretrain checkpoint
        model, _ = pretrained_classifier(rest, num_classes)
        return model, Preprocessing.from_model(model)
    if rest not in ("pretrained", "random"):
        raise SystemExit(
            f"--backbone {spec}: expected ARCH:pretrained, ARCH:random, checkpoint:DIR or "
            "pretraining:DIR"
        )
    torch.manual_seed(0)
    kwargs = {"img_size": img_size} if img_size and kind.startswith("mirage_") else {}
    model = create_classifier(kind, num_classes, pretrained=rest == "pretrained", **kwargs)
    return model.eval(), Preprocessing.from_model(model, None if kwargs else img_size)


def balanced_accuracy_samples(
    y: np.ndarray, pred: np.ndarray, num_classes: int, rng: np.random.Generator, n: int
) -> np.ndarray:
    """Balanced accuracy of ``pred`` on the test set (first) and on ``n`` bootstrap resamples."""
    rows = np.concatenate([np.arange(len(y))[None], rng.integers(0, len(y), (n, len(y)))])
    yt, yp = y[rows], pred[rows]
    recalls = []
    for k in range(num_classes):
        support = (yt == k).sum(1)
        hits = ((yt == k) & (yp == k)).sum(1)
        recalls.append(np.where(support > 0, hits / np.maximum(support, 1), np.nan))
    return np.nanmean(np.stack(recalls, 1), axis=1)


def curve(train, test, num_classes: int, args: argparse.Namespace) -> list[dict]:
    """One backbone's points: per-class label counts -> balanced accuracy (mean, interval)."""
    rng = np.random.default_rng(args.seed)
    by_class = [np.flatnonzero(train.labels == k) for k in range(num_classes)]
    points = []
    for count in args.per_class:
        n = None if count == "all" else int(count)
        if n is not None and n > min(len(m) for m in by_class):
            continue
        draws = 1 if n is None else args.draws
        means, pooled, seconds = [], [], 0.0
        for _ in range(draws):
            chosen = (
                np.concatenate(by_class)
                if n is None
                else np.concatenate([rng.choice(m, n, replace=False) for m in by_class])
            )
            started = time.perf_counter()
            fit = fit_probe(
                train.features[chosen], train.labels[chosen], None, None, num_classes, cs=(args.c,)
            )
            seconds += time.perf_counter() - started
            pred = fit.logits(test.features).argmax(1)
            scores = balanced_accuracy_samples(test.labels, pred, num_classes, rng, args.resamples)
            means.append(scores[0])
            pooled.append(scores[1:])
        pooled_all = np.concatenate(pooled)
        lo, hi = np.percentile(pooled_all, [2.5, 97.5])
        labels = int(sum(len(m) for m in by_class) / num_classes) if n is None else n
        points.append({
            "per_class": count, "labels_per_class": labels, "draws": draws,
            "balanced_accuracy": float(np.mean(means)), "ci95": [float(lo), float(hi)],
            "fit_seconds_per_draw": seconds / draws,
        })  # fmt: skip
    return points


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in results.items():
        x = [p["labels_per_class"] for p in points]
        y = [p["balanced_accuracy"] for p in points]
        lo = [p["ci95"][0] for p in points]
        hi = [p["ci95"][1] for p in points]
        (line,) = ax.plot(x, y, marker="o", label=name)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training scans per class")
    ax.set_ylabel("test balanced accuracy")
    ax.set_ylim(0, 1)
    ax.axhline(0.25, color="gray", lw=0.8, ls=":")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the labelled scans (<CLASS>/* or splits)")
    parser.add_argument("--backbone", action="append", required=True, metavar="SPEC")
    parser.add_argument("--split-from", type=Path, default=SPLIT_CONFIG, metavar="YAML")
    parser.add_argument("--per-class", nargs="+", default=list(PER_CLASS))
    parser.add_argument("--draws", type=int, default=5, help="random draws per point")
    parser.add_argument(
        "--train-per-class", type=int, help="training pool: at most this many per class"
    )
    parser.add_argument(
        "--test-per-class", type=int, help="test scans: at most this many per class"
    )
    parser.add_argument("--img-size", type=int, help="input side for ARCH:... backbones")
    parser.add_argument(
        "--c", type=float, default=0.1, help="the probes' regularisation strength C"
    )
    parser.add_argument(
        "--resamples", type=int, default=200, help="test bootstrap resamples per draw"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir() / "features")
    parser.add_argument("--out", type=Path, default=Path("label-efficiency"))
    return parser


def backbone_curves(
    args: argparse.Namespace, pools: dict[str, list[Sample]], num_classes: int
) -> dict[str, list[dict]]:
    """Each ``--backbone``'s curve: its features of both pools (cached), then the probes."""
    results: dict[str, list[dict]] = {}
    cpu = torch.device("cpu")
    for spec in args.backbone:
        model, preprocessing = backbone(spec, num_classes, args.img_size)
        features = {}
        for split, samples in pools.items():
            features[split] = cached_features(
                model, samples, preprocessing, args.cache_dir, cpu, desc=f"{spec} {split}"
            )
            f = features[split]
            speed = f"{f.images_per_s:.1f} img/s" if f.images_per_s else "all cached"
            print(f"{spec}: {split} {len(f.labels)} images ({speed})", flush=True)
        results[spec] = curve(features["train"], features["test"], num_classes, args)
        for p in results[spec]:
            lo, hi = p["ci95"]
            shown = f"{p['balanced_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
            print(f"  {p['labels_per_class']:>4} per class: {shown} ({p['draws']} draws)")
    return results


def print_table(results: dict[str, list[dict]]) -> None:
    """The README's table: balanced accuracy [CI] per backbone and labels per class."""
    print("\n| labels per class | " + " | ".join(results) + " |")
    print("| ---: |" + " ---: |" * len(results))
    rows = {p["per_class"]: {} for points in results.values() for p in points}
    for spec, points in results.items():
        for p in points:
            lo, hi = p["ci95"]
            rows[p["per_class"]][spec] = f"{p['balanced_accuracy']:.3f} [{lo:.2f}, {hi:.2f}]"
    for count, row in rows.items():
        label = (
            count
            if count != "all"
            else f"all ({max(p['labels_per_class'] for v in results.values() for p in v)})"
        )
        print(f"| {label} | " + " | ".join(row.get(s, "") for s in results) + " |")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.data, split_from(args.split_from))
    names = data.class_names
    pools = {
        "train": subsample(data.splits["train"], args.train_per_class, args.seed),
        "test": subsample(data.splits["test"], args.test_per_class, args.seed + 1),
    }
    counts = {
        s: np.bincount([x.label for x in p], minlength=len(names)).tolist()
        for s, p in pools.items()
    }
    print(f"classes {names}; train pool {counts['train']}, test {counts['test']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = backbone_curves(args, pools, len(names))
    (args.out / "label_efficiency.json").write_text(
        json.dumps({"classes": names, "pools": counts, "c": args.c, "results": results}, indent=2)
    )
    title = f"linear probes, {sum(counts['test'])} test scans; C = {args.c:g}"
    plot(results, args.out / "label_efficiency.png", title)
    print_table(results)
    print(f"\nwritten to {args.out}/label_efficiency.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
