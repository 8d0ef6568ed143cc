"""The optimisation of a fine-tuning run: AdamW over the trainable parameter groups (layer
decay, no weight decay on norms and biases), linear warm-up then cosine, the loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mirage_demo.data import class_weights
from mirage_demo.models import optimizer_param_groups
from train.config import TrainConfig
from train.distributed import Dist
from train.setup import say

__all__ = ["Optimisation", "create_optimisation", "lr_factor"]


@dataclass
class Optimisation:
    """Optimiser, schedule, loss scaling and loss."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    warmup_epochs: float
    steps_per_epoch: int


def create_optimisation(
    config: TrainConfig,
    model: nn.Module,
    train_samples: list,
    batches: int,
    num_classes: int,
    amp_dtype: torch.dtype | None,
    dist: Dist,
) -> Optimisation:
    """AdamW over the trainable groups (layer decay, no decay on norms and biases), warm-up
    then cosine over ``batches`` per epoch, the (class-weighted, label-smoothed) loss."""
    device = dist.device
    groups = optimizer_param_groups(model, config.weight_decay, config.layer_decay)
    for group in groups:
        group["lr"] = config.base_lr * group.get("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=config.base_lr, fused=device.type == "cuda")
    steps_per_epoch = math.ceil(batches / config.accum_steps)
    warmup_epochs = config.warmup_epochs
    if warmup_epochs >= config.epochs:
        warmup_epochs = config.epochs / 10
        say(
            dist,
            f"note: --warmup-epochs {config.warmup_epochs:g} >= --epochs "
            f"{config.epochs}: warming up for {warmup_epochs:g} epochs instead",
        )
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    total_steps = config.epochs * steps_per_epoch
    floor = min(1.0, config.min_lr / config.base_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, floor)
    )
    weights = class_weights(train_samples, num_classes) if config.balance == "loss" else None
    return Optimisation(
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        criterion=nn.CrossEntropyLoss(
            weight=None if weights is None else weights.to(device),
            label_smoothing=config.label_smoothing,
        ),
        warmup_epochs=warmup_epochs,
        steps_per_epoch=steps_per_epoch,
    )


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
