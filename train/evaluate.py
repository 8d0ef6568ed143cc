"""Evaluate a fine-tuned checkpoint on a dataset split and write its report.

    python -m train.evaluate --checkpoint DIR_OR_HUB_ID --data DIR [--split test] [--out DIR]
        [--fit-uncertainty]

The report (``metrics.json``, ``predictions.csv``, figures; see :mod:`mirage_demo.metrics`)
goes into ``--out``, by default the checkpoint directory itself. ``--fit-uncertainty`` first
fits the prediction sets and the out-of-distribution flag (:mod:`mirage_demo.uncertainty`) on
the train and val splits and stores them in the (local) checkpoint directory; a checkpoint
that has them gets their coverage, set sizes and flag rate in ``metrics.json``.

The split is rebuilt exactly as in training (from the checkpoint's typed split record,
``config.split``), images go through the app's preprocessing, and probabilities are calibrated
with the checkpoint's temperature, so evaluating a run's own checkpoint reproduces its
``metrics.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from mirage_demo.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint_dir,
)
from mirage_demo.data import DataError, DatasetSplits, load_dataset
from mirage_demo.evaluation import evaluate_samples, summary
from mirage_demo.uncertainty import (
    Uncertainty,
    fit_uncertainty,
    load_uncertainty,
    save_uncertainty,
)
from train.config import UsageError
from train.distributed import resolve_device

# the report itself is mirage_demo.evaluation's (the app and the trainer's finish share it)
__all__ = ["build_parser", "main", "run"]

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
        help="average each scan's logits with its horizontal mirror's (as predict --tta; "
        "not with --fit-uncertainty)",
    )
    parser.add_argument(
        "--fit-uncertainty",
        action="store_true",
        help="first fit the prediction sets (on val) and the out-of-distribution flag (train "
        "features, threshold on val) and store them in the checkpoint directory",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.tta and args.fit_uncertainty:
        raise UsageError(
            "--fit-uncertainty fits the sets, the flag and the bar on single forward passes "
            "(as the app predicts), not on mirrored pairs: fit without --tta, then evaluate "
            "with --tta in a second run"
        )
    device = resolve_device(args.device)
    directory = resolve_checkpoint_dir(args.checkpoint)
    model, config = load_checkpoint(directory, device=device)
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
    uncertainty = _uncertainty(args, model, config, data, device)
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
        uncertainty=uncertainty,
    )
    print(summary(metrics))
    print(f"report written to {out}")
    return metrics


def _uncertainty(
    args: argparse.Namespace,
    model: torch.nn.Module,
    config: CheckpointConfig,
    data: DatasetSplits,
    device: torch.device,
) -> Uncertainty | None:
    """The checkpoint's prediction sets and OOD flag: fitted now (``--fit-uncertainty``) or
    as stored (None when it has none)."""
    directory = resolve_checkpoint_dir(args.checkpoint)
    if not args.fit_uncertainty:
        return load_uncertainty(directory, config)
    if not Path(args.checkpoint).expanduser().is_dir():
        raise UsageError("--fit-uncertainty stores into the checkpoint: give a local directory")
    missing = [s for s in ("train", "val") if not data.splits.get(s)]
    if missing:
        raise UsageError(f"--fit-uncertainty needs the {' and '.join(missing)} split(s)")
    uncertainty = fit_uncertainty(
        model,
        config,
        data.splits["train"],
        data.splits["val"],
        device,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=args.progress,
    )
    save_uncertainty(directory, config, uncertainty)
    print(f"prediction sets and out-of-distribution flag stored in {directory}")
    return uncertainty


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
