"""The end of every run, whatever its ``--mode``: calibrate the best model, fit its prediction
sets and out-of-distribution flag, write its report.

Each needs the model's outputs on a split (:class:`~mirage_demo.logits.Outputs`): by default
from the image files, as the app and ``train.evaluate`` see them; a probe passes
``outputs_of`` that reads its feature cache instead (:func:`train.probe.cached_outputs_of`),
so a run on the same scans embeds none of them again. Each split is run through once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mirage_demo.checkpoint import CheckpointConfig, load_checkpoint, save_checkpoint
from mirage_demo.data import DatasetSplits
from mirage_demo.evaluation import report_outputs, summary
from mirage_demo.images import Sample
from mirage_demo.logits import Outputs, file_outputs
from mirage_demo.metrics import fit_temperature, nll
from mirage_demo.uncertainty import TRAIN_COPIES, save_uncertainty, uncertainty_from_outputs
from train.config import TrainConfig
from train.setup import EVAL_BATCH_SIZE

__all__ = ["OutputsOf", "finish", "outputs_from_files"]

#: ``(model, its checkpoint config, samples, progress label) -> the model's outputs on them``
OutputsOf = Callable[[nn.Module, CheckpointConfig, Sequence[Sample], str], Outputs]


def outputs_from_files(config: TrainConfig, device: torch.device, workers: int) -> OutputsOf:
    """The model's outputs from the image files (float32, batches of ``EVAL_BATCH_SIZE``), each
    image checked (the gate, its statistics; a training scan's also of its bundled copy)."""

    def outputs_of(
        model: nn.Module, checkpoint: CheckpointConfig, samples: Sequence[Sample], desc: str
    ) -> Outputs:
        return file_outputs(
            model,
            samples,
            checkpoint.preprocessing,
            device,
            batch_size=EVAL_BATCH_SIZE,
            workers=workers,
            progress=config.progress,
            desc=desc,
            copies=TRAIN_COPIES if desc == "train" else [],
        )

    return outputs_of


def finish(
    config: TrainConfig,
    data: DatasetSplits,
    out: Path,
    device: torch.device,
    workers: int,
    outputs_of: OutputsOf | None = None,
) -> dict[str, Any]:
    """Calibrate the best model on val, fit its prediction sets and out-of-distribution flag
    (train and val), then write the report on test (val if none), from the outputs
    ``outputs_of`` gives (default: :func:`outputs_from_files`)."""
    outputs_of = outputs_of or outputs_from_files(config, device, workers)
    model, checkpoint = load_checkpoint(out, device=device)
    val = outputs_of(model, checkpoint, data.splits["val"], "val split")
    temperature = fit_temperature(val.logits, val.labels)
    checkpoint.temperature = temperature
    checkpoint.training["calibration"] = {
        "temperature": temperature,
        "val_nll_before": nll(val.logits, val.labels),
        "val_nll_after": nll(val.logits, val.labels, temperature),
    }
    save_checkpoint(out, model, checkpoint, getattr(torch, config.save_dtype))
    train = outputs_of(model, checkpoint, data.splits["train"], "train")
    uncertainty = uncertainty_from_outputs(checkpoint, train, val)
    save_uncertainty(out, checkpoint, uncertainty)
    split = "test" if data.splits.get("test") else "val"
    if split == "val":
        print("warning: no test split: the report is on the validation split", flush=True)
    tested = (
        val if split == "val" else outputs_of(model, checkpoint, data.splits[split], "test split")
    )
    metrics = report_outputs(
        checkpoint,
        data.splits[split],
        tested,
        data.root,
        out,
        split=split,
        n_bootstrap=config.bootstrap,
        uncertainty=uncertainty,
    )
    best = checkpoint.training.get("best_epoch")
    which = f"best model: epoch {best}" if best else "probe"
    print(f"{which}, temperature {temperature:.3f}; report on the {split} split:")
    print(summary(metrics))
    print(f"checkpoint and report written to {out}", flush=True)
    return metrics
