"""Evaluate a fine-tuned checkpoint on a dataset split and write its report.

    python -m train.evaluate --checkpoint DIR_OR_HUB_ID --data DIR [--split test] [--out DIR]

The report (``metrics.json``, ``predictions.csv``, figures; see :mod:`mirage_demo.metrics`)
goes into ``--out``, by default the checkpoint directory itself. The split is rebuilt exactly
as in training (from the checkpoint's typed split record, ``config.split``), images go
through the app's preprocessing, and probabilities are calibrated with the checkpoint's
temperature, so evaluating a run's own checkpoint reproduces its ``metrics.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mirage_demo.cache import tqdm_disable
from mirage_demo.checkpoint import CheckpointConfig, CheckpointError, load_checkpoint
from mirage_demo.data import DataError, Preprocessing, Sample, load_dataset
from mirage_demo.metrics import softmax, write_report
from train.config import UsageError
from train.data import FileImages, make_loader, to_model_input
from train.distributed import resolve_device

__all__ = ["collect_logits", "evaluate_samples", "main"]

log = logging.getLogger("train.evaluate")


@torch.no_grad()
def collect_logits(
    model: torch.nn.Module,
    loader: DataLoader,
    preprocessing: Preprocessing,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool | None = None,
    desc: str = "predicting",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits (n, K) float32, labels, dataset indices)`` over a loader of
    ``(image, label, index)`` batches, in the loader's order."""
    from tqdm.auto import tqdm

    model.eval()
    logits, labels, indices = [], [], []
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    )
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=tqdm_disable(progress))
    for batch in bar:
        if batch is None:  # every image of the batch was unreadable
            continue
        images, batch_labels, batch_indices = batch
        with autocast:
            out = model(to_model_input(images, preprocessing, device))
        logits.append(out.float().cpu())
        labels.append(batch_labels)
        indices.append(batch_indices)
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (
        torch.cat(logits).numpy(),
        torch.cat(labels).numpy().astype(np.int64),
        torch.cat(indices).numpy().astype(np.int64),
    )


def evaluate_samples(
    model: torch.nn.Module,
    config: CheckpointConfig,
    samples: Sequence[Sample],
    data_root: str | Path,
    out: str | Path,
    *,
    split: str,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Predict ``samples`` from their files, calibrate, and write the report into ``out``."""
    dataset = FileImages(samples, config.preprocessing)
    loader = make_loader(dataset, batch_size, workers, device)
    logits, labels, indices = collect_logits(
        model, loader, config.preprocessing, device, amp_dtype, progress, desc=f"{split} split"
    )
    if len(labels) == 0:
        raise DataError(f"no readable images in the {split} split")
    probs = softmax(logits, config.temperature)
    root = Path(data_root)
    files = [_relative(samples[i].path, root) for i in indices]
    return write_report(
        out,
        labels,
        probs,
        config.class_names,
        files,
        split=split,
        temperature=config.temperature,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def summary(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal: overall metrics with CIs, per-class sensitivity."""

    def fmt(entry: dict[str, Any]) -> str:
        value, (lo, hi) = entry["value"], entry["ci95"]
        if value is None:
            return "n/a"
        ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        return f"{value:.3f}{ci}"

    lines = [
        f"{metrics['split']} split: {metrics['num_images']} images "
        f"({', '.join(f'{k} {v}' for k, v in metrics['images_per_class'].items())}), "
        f"temperature {metrics['temperature']:.3f}"
    ]
    for name, entry in metrics["overall"].items():
        lines.append(f"  {name:<18} {fmt(entry)}")
    for cls, entry in metrics["per_class"].items():
        lines.append(
            f"  {cls:<12} sensitivity {fmt(entry['sensitivity'])}  "
            f"specificity {fmt(entry['specificity'])}  AUROC {fmt(entry['auroc'])}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description="Evaluate a checkpoint (directory or Hugging Face Hub repo id) on a data "
        "split and write metrics.json, predictions.csv and figures.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="DIR_OR_HUB_ID")
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset folder")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument(
        "--exclude",
        action="append",
        metavar="PATH",
        help="images left out of the split (default: the ones the checkpoint's training left out)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="report folder (default: the checkpoint directory)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    model, config = load_checkpoint(args.checkpoint, device=device)
    if config.split is None:
        log.warning("the checkpoint records no data split: using the default split settings")
    data = load_dataset(args.data, config.split, exclude=args.exclude)
    if data.class_names != config.class_names:
        raise UsageError(
            f"{args.data} has classes [{', '.join(data.class_names)}] but the checkpoint was "
            f"trained on [{', '.join(config.class_names)}]: evaluate on data with the same "
            "class folders"
        )
    if args.split not in data.splits:
        raise UsageError(f"{args.data} has no {args.split} split (it has {', '.join(data.splits)})")
    out = args.out
    if out is None:
        local = Path(args.checkpoint).expanduser()
        out = (
            local
            if local.is_dir()
            else Path("evaluation") / str(args.checkpoint).replace("/", "--")
        )
    metrics = evaluate_samples(
        model,
        config,
        data.splits[args.split],
        data.root,
        out,
        split=args.split,
        device=device,
        batch_size=args.batch_size,
        workers=args.workers,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        progress=args.progress,
    )
    print(summary(metrics))
    print(f"report written to {out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, DataError, CheckpointError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
