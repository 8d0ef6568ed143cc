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
from pathlib import Path
from typing import Any

from mirage_demo.checkpoint import CheckpointError, load_checkpoint
from mirage_demo.data import DataError, load_dataset
from mirage_demo.evaluation import collect_logits, evaluate_samples, summary
from train.config import UsageError
from train.distributed import resolve_device

# collect_logits, evaluate_samples and summary live in mirage_demo.evaluation (the app shares
# them); re-exported here
__all__ = ["collect_logits", "evaluate_samples", "main", "summary"]

log = logging.getLogger("train.evaluate")


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
    parser.add_argument(
        "--tta",
        action="store_true",
        help="average each scan's logits with its horizontal mirror's (as predict --tta)",
    )
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
        tta=args.tta,
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
