"""A fine-tuning run's working state, built once by :func:`setup_run`: data, model, loaders,
optimisation, teacher, and (on ``--resume``) what the saved state restores.

:class:`Run` is everything the loop (:mod:`train.loop`) works with; :class:`Progress` is what
the training state records besides the tensors.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mirage_demo.augment import BatchAugmentation
from mirage_demo.cache import CachedImages, build_cache
from mirage_demo.checkpoint import CheckpointConfig, CheckpointError
from mirage_demo.data import DatasetSplits, Preprocessing
from mirage_demo.models import configure_finetuning
from mirage_demo.version import __version__
from train.config import TrainConfig, UsageError
from train.data import EpochSampler, FileImages, make_loader
from train.distill import Teacher
from train.distributed import Dist
from train.optim import Optimisation, create_optimisation
from train.setup import (
    EVAL_BATCH_SIZE,
    check_space,
    check_unreadable,
    checked_data,
    checkpoint_config,
    create_training_model,
    resolve_amp,
    say,
    set_threads,
    write_resolved_options,
)
from train.state import STATE_NAME, set_rng_state

__all__ = ["Loaders", "Progress", "Run", "checked_datasets", "setup_run"]


@dataclass
class Progress:
    """What the training state records besides the tensors."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best: dict[str, Any] = field(default_factory=dict)  # epoch, select, score, loss
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def update(
        self,
        epoch: int,
        val: dict[str, Any],
        patience: int,
        warmup: float,
        select: str = "balanced_accuracy",
    ) -> bool:
        """Record a finished epoch; whether its model is the best so far by ``select`` on the
        validation split (a higher score, or the lower loss; ties broken by the lower loss).
        Early stopping counts epochs after warm-up."""
        loss = val["loss"]
        score = -loss if select == "loss" else (val[select] or 0.0)
        best = self.best
        better = (
            not best
            or score > best["score"] + 1e-12
            or (abs(score - best["score"]) <= 1e-12 and loss < best["loss"])
        )
        self.epoch = epoch
        if better:
            self.best = {"epoch": epoch, "select": select, "score": score, "loss": loss}
            self.bad_epochs = 0
        elif patience and epoch > warmup:
            self.bad_epochs += 1
            self.stopped = self.bad_epochs >= patience
        return better


@dataclass
class Run:
    """Everything the loop works with, built once by :func:`setup_run`."""

    config: TrainConfig
    dist: Dist
    out: Path
    data: DatasetSplits
    preprocessing: Preprocessing
    model: nn.Module  # the bare model (saved, evaluated)
    ddp_model: nn.Module  # what the training step calls (DDP wrapper or the model itself)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    teacher: Teacher | None
    augment: BatchAugmentation | None
    amp_dtype: torch.dtype | None
    sampler: EpochSampler
    train_loader: Any
    val_loader: Any
    workers: int
    warmup_epochs: float
    checkpoint_config: CheckpointConfig  # the best model's config.json, minus per-epoch facts
    progress: Progress = field(default_factory=Progress)
    writer: Any = None

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)


def setup_run(config: TrainConfig, state: dict | None, dist: Dist) -> Run:
    """Everything the loop needs, step by step: threads and precision, data, model, loaders,
    optimisation, the run's record, then (when resuming) the saved state, then the run files."""
    set_threads(config, dist)
    amp_dtype = resolve_amp(config.amp, dist.device)
    data = checked_data(config, state, dist)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model, model_kwargs, preprocessing = create_training_model(
        config, len(data.class_names), fresh=state is None
    )
    if dist.is_main:
        check_space(Path(config.out), config, data, preprocessing, model)
    train_set, val_set = checked_datasets(config, data, preprocessing, dist)
    train_samples = [data.splits["train"][i] for i in train_set.indices]
    if state is not None:
        _restore_weights(model, state, config)
    trainable, ddp_model = _prepare_model(model, config, dist)
    loaders = _loaders(config, train_set, val_set, train_samples, len(data.class_names), dist)
    optimisation = create_optimisation(
        config, model, train_samples, len(loaders.train), len(data.class_names), amp_dtype, dist
    )
    teacher = _teacher(config, preprocessing, data.class_names, dist.device)
    derived = _derived_facts(config, data, dist, amp_dtype, trainable, optimisation)
    run = Run(
        config=config,
        dist=dist,
        out=Path(config.out),
        data=data,
        preprocessing=preprocessing,
        model=model,
        ddp_model=ddp_model,
        optimizer=optimisation.optimizer,
        scheduler=optimisation.scheduler,
        scaler=optimisation.scaler,
        criterion=optimisation.criterion,
        teacher=teacher,
        augment=_augmentation(config),
        amp_dtype=amp_dtype,
        sampler=loaders.sampler,
        train_loader=loaders.train,
        val_loader=loaders.val,
        workers=loaders.workers,
        warmup_epochs=optimisation.warmup_epochs,
        checkpoint_config=checkpoint_config(config, data, preprocessing, model_kwargs, derived),
    )
    torch.manual_seed(config.seed + dist.rank)  # dropout and drop-path differ between ranks
    np.random.seed(config.seed + dist.rank)
    if state is not None:
        _restore_state(run, state)
    if dist.is_main:
        _write_run_files(run, derived)
    say(
        dist,
        f"{config.model} ({config.mode}, {trainable:,} trainable parameters) on "
        f"{dist.device} x{dist.world_size}, {derived['amp']}; {len(train_samples)} train / "
        f"{sum(data.counts('val').values())} val images, {len(data.class_names)} classes; "
        f"{config.epochs} epochs of {optimisation.steps_per_epoch} steps, "
        f"batch {derived['effective_batch_size']}",
    )
    return run


# --------------------------------------------------------------------------------------------
# Data and model


def checked_datasets(
    config: TrainConfig, data: DatasetSplits, preprocessing: Preprocessing, dist: Dist
) -> tuple[Any, Any]:
    """Train and this rank's val datasets (every image decoded once into the cache);
    unreadable images stop the run unless ``--skip-unreadable``."""
    train_set, val_set, unreadable = _datasets(config, data, preprocessing, dist)
    check_unreadable(config, dist, unreadable, "train")
    return train_set, val_set


def _datasets(
    config: TrainConfig, data: DatasetSplits, preprocessing: Preprocessing, dist: Dist
) -> tuple[Any, Any, list[str]]:
    """Train and this rank's validation datasets, and the unreadable files found."""
    train_samples, val_samples = data.splits["train"], data.splits["val"]
    if not config.cache:
        val_indices = range(dist.rank, len(val_samples), dist.world_size)
        return (
            FileImages(train_samples, preprocessing),
            FileImages(val_samples, preprocessing, val_indices),
            [],
        )
    caches = {}
    workers = config.workers if config.workers is not None else min(8, os.cpu_count() or 1)
    for turn in (0, 1):  # local rank 0 decodes; the others open what it built
        if (dist.local_rank == 0) == (turn == 0):
            for split, samples in data.splits.items():
                caches[split] = build_cache(
                    samples,
                    preprocessing,
                    config.cache_dir,
                    workers=workers,
                    progress=config.progress if dist.is_main else False,
                    desc=f"caching {split} images",
                )
        dist.barrier()
    unreadable = [message for cache in caches.values() for message in cache.unreadable]
    val_readable = caches["val"].readable
    return (
        CachedImages(caches["train"]),
        CachedImages(caches["val"], val_readable[dist.rank :: dist.world_size]),
        unreadable,
    )


def _augmentation(config: TrainConfig) -> BatchAugmentation | None:
    if not config.augment:
        return None
    if config.shift_augment:
        return BatchAugmentation.device_shift(fill=config.aug_fill)
    return BatchAugmentation(fill=config.aug_fill)


def _teacher(
    config: TrainConfig, preprocessing: Preprocessing, class_names: list[str], device: torch.device
) -> Teacher | None:
    if not config.teacher:
        return None
    try:
        teacher = Teacher(config.teacher, preprocessing, device)
    except CheckpointError as err:
        raise UsageError(f"--teacher: {err}") from err
    if teacher.class_names != class_names:
        raise UsageError(
            f"--teacher {config.teacher} predicts [{', '.join(teacher.class_names)}], the data "
            f"has [{', '.join(class_names)}]: distil from a model of the same classes"
        )
    return teacher


def _restore_weights(model: nn.Module, state: dict, config: TrainConfig) -> None:
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UsageError(
            f"the weights in {Path(config.out) / STATE_NAME} do not fit {config.model} "
            f"({' '.join(str(err).split())[:300]}): start a new run in another --out"
        ) from err


def _prepare_model(model: nn.Module, config: TrainConfig, dist: Dist) -> tuple[int, nn.Module]:
    """Freeze per ``--mode``, move to the device, wrap in DDP: ``(trainable parameters, the
    module the training step calls)``."""
    trainable = configure_finetuning(model, config.mode, config.last_k)
    if config.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    model.to(dist.device)
    if not dist.enabled:
        return trainable, model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return trainable, DistributedDataParallel(model, device_ids=device_ids)


# --------------------------------------------------------------------------------------------
# Loaders, the run's record, resuming


# --balance choices that resample: class c drawn in proportion to count_c ** (1 - power)
SAMPLING_POWER = {"sampler": 1.0, "sqrt": 0.5}


@dataclass
class Loaders:
    """The epoch sampler and the data loaders."""

    sampler: EpochSampler
    train: Any
    val: Any
    workers: int


def _loaders(
    config: TrainConfig,
    train_set: Any,
    val_set: Any,
    train_samples: list,
    num_classes: int,
    dist: Dist,
) -> Loaders:
    sampler = EpochSampler(
        train_samples,
        num_classes,
        SAMPLING_POWER.get(config.balance),
        config.seed,
        dist.rank,
        dist.world_size,
    )
    workers = config.workers
    if workers is None:  # CUDA: copy pixels in the background; CPU: the cache is fast enough
        workers = min(6, (os.cpu_count() or 1) // dist.local_world_size)
        workers = workers if dist.device.type == "cuda" or not config.cache else 0
    return Loaders(
        sampler=sampler,
        train=make_loader(train_set, config.batch_size, workers, dist.device, sampler),
        val=make_loader(val_set, EVAL_BATCH_SIZE, workers, dist.device),
        workers=workers,
    )


def _derived_facts(
    config: TrainConfig,
    data: DatasetSplits,
    dist: Dist,
    amp_dtype: torch.dtype | None,
    trainable: int,
    optimisation: Optimisation,
) -> dict[str, Any]:
    """What the run worked out from its options (recorded in config.json and the YAML)."""
    return {
        "lr": config.base_lr,
        "warmup_epochs": optimisation.warmup_epochs,
        "world_size": dist.world_size,
        "effective_batch_size": config.batch_size * config.accum_steps * dist.world_size,
        "steps_per_epoch": optimisation.steps_per_epoch,
        "device": str(dist.device),
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
        "trainable_parameters": trainable,
        "images": {split: data.counts(split) for split in data.splits},
        "near_copy_groups": data.near_copies.to_dict() if data.near_copies else None,
        "versions": {"mirage_demo": __version__, "torch": str(torch.__version__)},
    }


def _restore_state(run: Run, state: dict) -> None:
    """Optimiser, schedule, scaler, progress and random streams of the run being resumed."""
    dist = run.dist
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.progress = Progress(**state["progress"])
    if len(state["rng"]) == dist.world_size:
        set_rng_state(state["rng"][dist.rank])
    else:
        say(
            dist,
            "warning: resumed on a different number of processes: random streams "
            "restart, so the result will differ from an uninterrupted run",
        )
    say(dist, f"resuming {run.out} after epoch {run.progress.epoch} (step {run.progress.step})")


def _write_run_files(run: Run, derived: dict[str, Any]) -> None:
    """``train_config.yaml`` (the resolved options) and the TensorBoard writer (rank 0)."""
    config = run.config
    write_resolved_options(config, run.out, derived)
    if config.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.out / "tensorboard"), purge_step=run.progress.epoch + 1)
