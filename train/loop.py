"""One epoch of fine-tuning: the training steps, the validation, and what the end of an epoch
saves (the best model, the resumable state, ``history.csv``, TensorBoard)."""

from __future__ import annotations

import csv
import io
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mirage_demo.cache import tqdm_disable
from mirage_demo.checkpoint import save_checkpoint
from mirage_demo.fileio import atomic_write
from mirage_demo.logits import collect_logits
from mirage_demo.metrics import compute_metrics, nll, softmax
from mirage_demo.models import set_training_mode
from train.data import to_model_input
from train.distill import distillation_loss
from train.run import Run
from train.setup import fingerprint, say
from train.state import get_rng_state, save_state

__all__ = [
    "TrainingDivergedError",
    "end_epoch",
    "train_one_epoch",
    "train_step",
    "validate",
    "write_history",
]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


_TENSORBOARD_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "val_accuracy": "val/accuracy",
    "val_balanced_accuracy": "val/balanced_accuracy",
    "val_macro_f1": "val/macro_f1",
    "val_macro_auroc": "val/macro_auroc",
    "lr": "train/lr",
    "images_per_s": "train/images_per_s",
}


def train_one_epoch(run: Run, epoch: int) -> tuple[float, int, float]:
    """One pass over this epoch's order: ``(mean loss, images seen by all ranks, seconds)``."""
    config, dist, device = run.config, run.dist, run.dist.device
    run.sampler.set_epoch(epoch)
    seed = np.random.SeedSequence([config.seed, epoch, dist.rank]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(seed))  # augmentation parameters
    set_training_mode(run.ddp_model)
    started = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), device=device)
    seen = 0
    hide = (not dist.is_main) or tqdm_disable(config.progress)
    bar = tqdm(
        total=len(run.sampler) * dist.world_size,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="img",
        disable=hide,
        leave=False,
    )
    batches = len(run.train_loader)
    for i, batch in enumerate(run.train_loader):
        group_start = i - i % config.accum_steps  # gradient accumulation group
        group_size = min(config.accum_steps, batches - group_start)
        last_micro = i == group_start + group_size - 1
        if batch is None:  # every image unreadable (only without the cache)
            continue
        images, labels, _ = batch
        x = to_model_input(images, run.preprocessing, device, run.augment, generator)
        y = labels.to(device, non_blocking=True)
        soft = None
        if run.teacher is not None:
            with run.autocast():  # in float32 the teacher's forward cost as much as the step
                soft = run.teacher(x)
        loss = train_step(run, x, y, group_size, last_micro, soft)
        loss_sum += loss * len(y)
        nonfinite += (~torch.isfinite(loss)).float()
        seen += len(y)
        if i % 10 == 9 or i == batches - 1:  # check now and then: a sync costs GPU time
            if dist.any(bool(nonfinite.item() > 0)):
                bar.close()
                raise TrainingDivergedError(
                    f"the training loss became NaN or infinite in epoch {epoch + 1} "
                    f"(step {run.progress.step}): training stopped; {_kept(run)}. Lower --lr, "
                    "set --clip-grad 1.0 or try --amp bf16/off, and start again"
                )
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{run.scheduler.get_last_lr()[-1]:.2e}")
        bar.update(len(y) * dist.world_size)
    bar.close()
    seconds = time.perf_counter() - started
    totals = dist.gather((float(loss_sum.item()), seen))
    images = sum(n for _, n in totals)
    return sum(s for s, _ in totals) / max(1, images), images, seconds


def train_step(
    run: Run,
    x: torch.Tensor,
    y: torch.Tensor,
    group_size: int = 1,
    last_micro: bool = True,
    teacher_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward and backward of one micro-batch; the optimiser steps on the last micro-batch of
    an accumulation group of ``group_size``. Returns the (detached, float) loss. With
    ``teacher_logits`` the loss mixes in the distillation term (``--distill-weight``)."""
    config, dist = run.config, run.dist
    sync = nullcontext() if last_micro or not dist.enabled else run.ddp_model.no_sync()
    with sync:
        with run.autocast():
            logits = run.ddp_model(x)
            loss = run.criterion(logits, y)
            if teacher_logits is not None:
                weight = config.distill_weight
                soft = distillation_loss(logits, teacher_logits, config.distill_temperature)
                loss = (1 - weight) * loss + weight * soft
        run.scaler.scale(loss / group_size).backward()
    if last_micro:
        if config.clip_grad:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        run.progress.step += 1
    return loss.detach().float()


def _kept(run: Run) -> str:
    if run.progress.epoch == 0:
        return "no epoch finished, so nothing was saved"
    return f"the last good checkpoint (epoch {run.progress.epoch}) is kept in {run.out}"


def validate(run: Run, epoch: int) -> dict[str, Any]:
    """Loss and metrics on the whole validation split (every rank's share, gathered)."""
    logits, labels, indices = collect_logits(
        run.model, run.val_loader, run.preprocessing, run.dist.device, run.amp_dtype, False
    )
    parts = run.dist.gather((logits, labels, indices))
    order = np.argsort(np.concatenate([p[2] for p in parts]), kind="stable")
    logits = np.concatenate([p[0] for p in parts if len(p[1])])[order]
    labels = np.concatenate([p[1] for p in parts])[order]
    metrics = compute_metrics(labels, softmax(logits), run.data.class_names, n_bootstrap=0)
    val = {"loss": nll(logits, labels)}
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"):
        val[name] = metrics["overall"][name]["value"]
    val["images"] = len(labels)
    if not math.isfinite(val["loss"]):
        raise TrainingDivergedError(
            f"the validation loss became {val['loss']} after epoch {epoch + 1}: training "
            f"stopped; {_kept(run)}"
        )
    return val


def end_epoch(run: Run, row: dict[str, Any], better: bool) -> None:
    """Save the best model, then the state (atomically, so a kill leaves the previous one),
    the history and TensorBoard; print the epoch's line."""
    config, dist, epoch = run.config, run.dist, row["epoch"]
    if better and dist.is_main:
        val = {k.removeprefix("val_"): v for k, v in row.items() if k.startswith("val_")}
        run.checkpoint_config.training.update(best_epoch=epoch, val=val)
        dtype = getattr(torch, config.save_dtype)
        save_checkpoint(run.out, run.model, run.checkpoint_config, dtype)
    run.progress.history.append(row)
    rng = run.dist.gather(get_rng_state())
    if dist.is_main:
        state = {
            "config": config.to_dict(),
            "data": fingerprint(run.data),
            "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng,
            "progress": run.progress.__dict__,
        }
        save_state(run.out, state)
        write_history(run.out, run.progress.history)
        if run.writer is not None:
            for key, tag in _TENSORBOARD_TAGS.items():
                if row.get(key) is not None:
                    run.writer.add_scalar(tag, row[key], epoch)
            run.writer.flush()
    say(
        dist,
        f"epoch {epoch}/{config.epochs}  train loss {row['train_loss']:.4f}  "
        f"val loss {row['val_loss']:.4f}  val acc {row['val_accuracy']:.3f}  "
        f"val bal acc {row['val_balanced_accuracy']:.3f}  lr {row['lr']:.2e}  "
        f"{row['images_per_s']:.1f} img/s  {row['seconds']:.0f}s" + ("  *best*" if better else ""),
    )
    if run.progress.stopped:
        say(dist, f"early stopping: no better model for {config.patience} epochs")


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out / "history.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))
