"""``python -m train``: parse the options, run the ``--mode`` asked for, and turn what can go
wrong into one line and an exit code.

Each mode is a run of its own that shares the steps of :mod:`train.setup` and
:mod:`train.finish`: fine-tuning (:mod:`train.train`), the linear probe (:mod:`train.probe`)
and masked-autoencoder pre-training (:mod:`train.pretrain`, which shares the setup only).
A new mode is one line of :data:`RUNS`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mirage_demo.checkpoint import CheckpointError
from mirage_demo.data import DataError
from mirage_demo.fileio import describe_os_error
from train.config import TrainConfig, UsageError, parse_config
from train.loop import TrainingDivergedError
from train.pretrain import pretrain
from train.probe import probe
from train.setup import keep_large_blocks
from train.state import STATE_NAME
from train.train import train

__all__ = ["RUNS", "main", "run"]

#: ``--mode`` -> the run that carries it out (each returns the test metrics on rank 0)
RUNS: dict[str, Callable[[TrainConfig, set[str]], dict[str, Any] | None]] = {
    "full": train,
    "last-k": train,
    "linear": train,
    "probe": probe,
    "pretrain": pretrain,
}


def run(config: TrainConfig, explicit: set[str] | None = None) -> dict[str, Any] | None:
    """Run ``config.mode`` end to end (``explicit``: the options given on the command line);
    returns the test metrics on rank 0 (``None`` elsewhere)."""
    return RUNS[config.mode](config, set(explicit or ()))


def main(argv: list[str] | None = None) -> int:
    """``python -m train``: 0 on success, 2 for bad input, 1 if training diverged."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    keep_large_blocks()
    config: TrainConfig | None = None
    try:
        config, explicit = parse_config(argv)
        run(config, explicit)
    except (UsageError, DataError, CheckpointError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except TrainingDivergedError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, or the output became unwritable during the run
        out = config.out if config is not None else None
        resumable = bool(out) and (Path(out) / STATE_NAME).exists()
        then = "the same command plus --resume" if resumable else "the same command again"
        print(
            f"error: {describe_os_error(err)}: free some space (or fix the folder), then "
            f"run {then}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: continue with the same command plus --resume "
            "(it restarts from the last finished epoch)",
            file=sys.stderr,
        )
        return 130
    return 0
