"""Fine-tune MIRAGE (or any timm model) on OCT B-scans: ``python -m train --help``.

One readable loop in the spirit of nanoGPT: :func:`train` below is the whole run, top to
bottom. Each stage is a file of its own:

- :mod:`train.setup`: the steps every ``--mode`` shares (output folder, data, model, machine,
  the run's record); :mod:`train.run`: the fine-tuning run's state (:class:`~train.run.Run`:
  loaders, optimiser (:mod:`train.optim`), teacher, a resumed run's saved state);
- :mod:`train.loop`: an epoch's steps, the validation, what the end of an epoch saves;
- :mod:`train.finish`: temperature, prediction sets and OOD flag, the test report.

Options live in :mod:`train.config`, the resumable state in :mod:`train.state`, DDP in
:mod:`train.distributed`; ``python -m train`` (:mod:`train.cli`) runs the ``--mode`` asked for.

The output folder is a checkpoint directory (best model by validation balanced accuracy,
ties by loss) plus its test report, ``history.csv``, ``tensorboard/``, the resolved
``train_config.yaml`` and ``train_state.pt`` (what ``--resume`` continues from).
"""

from __future__ import annotations

from typing import Any

from train.config import TrainConfig
from train.distributed import setup
from train.finish import finish
from train.loop import end_epoch, train_one_epoch, validate
from train.run import setup_run
from train.setup import prepare_out

__all__ = ["train"]


def train(config: TrainConfig, explicit: set[str] | None = None) -> dict[str, Any] | None:
    """Fine-tune end to end; returns the test metrics on rank 0 (``None`` elsewhere)."""
    config, state = prepare_out(config, set(explicit or ()))  # state: the run to resume, if any
    dist = setup(config.device)
    try:
        run = setup_run(config, state, dist)  # data, model, loaders, optimiser (+ saved state)
        for epoch in range(run.progress.epoch, config.epochs):
            if run.progress.stopped:
                break
            train_loss, images, seconds = train_one_epoch(run, epoch)
            val = validate(run, epoch)
            better = run.progress.update(
                epoch + 1, val, config.patience, run.warmup_epochs, config.select
            )
            row = {
                "epoch": epoch + 1,
                "step": run.progress.step,
                "lr": run.scheduler.get_last_lr()[-1],
                "train_loss": train_loss,
                **{f"val_{k}": v for k, v in val.items()},
                "images_per_s": images / seconds,
                "seconds": seconds,
                "best": int(better),
            }
            end_epoch(run, row, better)  # best model, resumable state, history, TensorBoard
        if run.writer is not None:
            run.writer.close()
        if not dist.is_main:
            return None
        return finish(config, run.data, run.out, dist.device, run.workers)  # calibrate, report
    finally:
        dist.close()
