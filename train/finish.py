"""The end of every run, whatever its ``--mode``: calibrate the best model, fit its prediction
sets and out-of-distribution flag, write its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mirage_demo.checkpoint import load_checkpoint, save_checkpoint
from mirage_demo.data import DatasetSplits
from mirage_demo.evaluation import evaluate_samples, summary
from mirage_demo.logits import collect_logits
from mirage_demo.metrics import fit_temperature, nll
from mirage_demo.uncertainty import fit_uncertainty, save_uncertainty
from train.config import TrainConfig
from train.data import FileImages, make_loader
from train.setup import EVAL_BATCH_SIZE

__all__ = ["finish"]


def finish(
    config: TrainConfig, data: DatasetSplits, out: Path, device: torch.device, workers: int
) -> dict[str, Any]:
    """Calibrate the best model on val, fit its prediction sets and out-of-distribution flag
    (train and val), then write the report on test (val if none): all from the image files, as
    the app and ``train.evaluate`` see them."""
    model, checkpoint = load_checkpoint(out, device=device)
    val_loader = make_loader(
        FileImages(data.splits["val"], checkpoint.preprocessing),
        EVAL_BATCH_SIZE,
        workers,
        device,
    )
    logits, labels, _ = collect_logits(
        model, val_loader, checkpoint.preprocessing, device, None, config.progress, "val split"
    )
    temperature = fit_temperature(logits, labels)
    checkpoint.temperature = temperature
    checkpoint.training["calibration"] = {
        "temperature": temperature,
        "val_nll_before": nll(logits, labels),
        "val_nll_after": nll(logits, labels, temperature),
    }
    save_checkpoint(out, model, checkpoint, getattr(torch, config.save_dtype))
    uncertainty = fit_uncertainty(
        model,
        checkpoint,
        data.splits["train"],
        data.splits["val"],
        device,
        batch_size=EVAL_BATCH_SIZE,
        workers=workers,
        progress=config.progress,
    )
    save_uncertainty(out, checkpoint, uncertainty)
    split = "test" if data.splits.get("test") else "val"
    if split == "val":
        print("warning: no test split: the report is on the validation split", flush=True)
    metrics = evaluate_samples(
        model,
        checkpoint,
        data.splits[split],
        data.root,
        out,
        split=split,
        device=device,
        batch_size=EVAL_BATCH_SIZE,
        workers=workers,
        n_bootstrap=config.bootstrap,
        progress=config.progress,
        uncertainty=uncertainty,
    )
    best = checkpoint.training.get("best_epoch")
    which = f"best model: epoch {best}" if best else "probe"
    print(f"{which}, temperature {temperature:.3f}; report on the {split} split:")
    print(summary(metrics))
    print(f"checkpoint and report written to {out}", flush=True)
    return metrics
