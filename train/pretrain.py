"""``python -m train --mode pretrain``: MIRAGE's masked-autoencoder pre-training, one modality.

Every step hides ``--mask-ratio`` of each B-scan's 32x32 patches (a fresh random choice per
image), the encoder sees only the visible ones plus its global token, and a light decoder
shaped like MIRAGE's (:class:`mirage_demo.decoders.PatchDecoder`: cross-attention to the
visible tokens, an MLP, ``--decoder-depth`` blocks) rebuilds every patch; the loss is
MIRAGE's: the squared error on the hidden patches of the min-maxed [0, 1] pixels. AdamW with
MIRAGE's betas (0.9, 0.95), warm-up then cosine, light augmentation (flip, small affine,
brightness), any ``mirage_*`` size, the same DDP, AMP, cache and ``--resume`` as fine-tuning.

Only the train split is used (labels ignored); each epoch reports the reconstruction loss on
the validation split with masks fixed once (seeded), so epochs compare; the test split is never
seen. After every epoch the folder holds a pre-training checkpoint
(:func:`mirage_demo.pretraining.save_pretraining`: encoder + decoder safetensors and
``config.json``) that the app loads and ``--init DIR`` fine-tunes from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from mirage_demo.augment import BatchAugmentation
from mirage_demo.data import DatasetSplits, Preprocessing
from mirage_demo.decoders import MaskedReconstructor, masked_mse, visible_patches
from mirage_demo.logits import make_loader, to_model_input
from mirage_demo.models import optimizer_param_groups
from mirage_demo.pretraining import (
    PretrainingError,
    create_pretraining_model,
    save_pretraining,
)
from train.config import TrainConfig, UsageError
from train.data import EpochSampler
from train.distributed import Dist, setup
from train.loop import TrainingDivergedError, write_history
from train.optim import lr_factor
from train.run import checked_datasets
from train.setup import (
    EVAL_BATCH_SIZE,
    check_space,
    checked_data,
    fingerprint,
    prepare_out,
    resolve_amp,
    say,
    set_threads,
    write_resolved_options,
)
from train.state import get_rng_state, save_state, set_rng_state

__all__ = ["PRETRAIN_BETAS", "pretrain"]

PRETRAIN_BETAS = (0.9, 0.95)  # MIRAGE's (and MAE's) AdamW betas
LOG_EVERY = 25  # steps between progress lines (a background run's log shows it is alive)
LICENSE = "apache-2.0"  # our weights; MIRAGE's are never part of such a checkpoint


@dataclass
class PretrainRun:
    """Everything the pre-training loop works with."""

    config: TrainConfig
    dist: Dist
    out: Path
    data: DatasetSplits
    preprocessing: Preprocessing
    model: MaskedReconstructor
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: BatchAugmentation | None
    amp_dtype: torch.dtype | None
    sampler: EpochSampler
    train_loader: Any
    val_loader: Any
    val_visible: torch.Tensor  # fixed masks of the validation images (by dataset index)
    record: dict[str, Any]  # config.json of the checkpoint, minus per-epoch facts
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(self.dist.device.type, enabled=False)
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)


def pretrain(config: TrainConfig, explicit: set[str]) -> dict[str, Any] | None:
    """Run masked-autoencoder pre-training end to end; the last epoch's figures on rank 0."""
    if config.pretrained or config.weights or config.init:
        raise UsageError(
            "--mode pretrain starts from random weights: drop --pretrained/--weights/--init"
        )
    config, state = prepare_out(config, explicit)
    dist = setup(config.device)
    try:
        run = _setup(config, state, dist)
        for epoch in range(run.epoch, config.epochs):
            _epoch(run, epoch)
        return run.history[-1] if run.history and dist.is_main else None
    finally:
        dist.close()


def _setup(config: TrainConfig, state: dict | None, dist: Dist) -> PretrainRun:
    set_threads(config, dist)
    amp_dtype = resolve_amp(config.amp, dist.device)
    data = checked_data(config, state, dist)
    torch.manual_seed(config.seed)
    try:
        model = create_pretraining_model(
            config.model,
            config.decoder_dim,
            config.decoder_depth,
            config.decoder_heads,
            config.drop_path,
            **_encoder_kwargs(config),
        )
    except PretrainingError as err:
        raise UsageError(str(err)) from err
    preprocessing = Preprocessing.from_model(model.encoder)
    if dist.is_main:
        check_space(Path(config.out), config, data, preprocessing, model)
    train_set, val_set = checked_datasets(config, data, preprocessing, dist)
    if state is not None:
        model.load_state_dict(state["model"])
    model.to(dist.device)
    ddp_model: torch.nn.Module = model
    if dist.enabled:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        ddp_model = DistributedDataParallel(model, device_ids=ids)
    train_samples = [data.splits["train"][i] for i in train_set.indices]
    sampler = EpochSampler(
        train_samples, len(data.class_names), None, config.seed, dist.rank, dist.world_size
    )
    workers = config.workers if config.workers is not None else 0
    optimizer, scheduler, steps = _optimisation(config, model, len(sampler), dist)
    generator = torch.Generator().manual_seed(config.seed + 1)
    patches = model.grid[0] * model.grid[1]
    val_visible = visible_patches(
        len(data.splits["val"]), config.mask_ratio, patches=patches, generator=generator
    )
    run = PretrainRun(
        config=config,
        dist=dist,
        out=Path(config.out),
        data=data,
        preprocessing=preprocessing,
        model=model,
        ddp_model=ddp_model,
        optimizer=optimizer,
        scheduler=scheduler,
        augment=BatchAugmentation(fill=config.aug_fill) if config.augment else None,
        amp_dtype=amp_dtype,
        sampler=sampler,
        train_loader=make_loader(train_set, config.batch_size, workers, dist.device, sampler),
        val_loader=make_loader(val_set, EVAL_BATCH_SIZE, workers, dist.device),
        val_visible=val_visible,
        record=_record(config, data, preprocessing, dist, amp_dtype, steps),
    )
    torch.manual_seed(config.seed + dist.rank)
    np.random.seed(config.seed + dist.rank)
    if state is not None:
        _restore(run, state)
    if dist.is_main:
        write_resolved_options(config, run.out, run.record["training"]["derived"])
    say(
        dist,
        f"pre-training {config.model} (mask ratio {config.mask_ratio:g}, decoder "
        f"{config.decoder_dim} wide x {config.decoder_depth}) on {dist.device} "
        f"x{dist.world_size}, {run.record['training']['derived']['amp']}; "
        f"{len(train_samples)} train images (labels unused), "
        f"{len(data.splits['val'])} val; {config.epochs} epochs of {steps} steps",
    )
    return run


def _encoder_kwargs(config: TrainConfig) -> dict[str, int]:
    """``--img-size`` and ``--model-kwargs`` (``img_size``, ``depth``) for the encoder."""
    kwargs = dict(config.model_kwargs)
    if config.img_size is not None:
        kwargs["img_size"] = config.img_size
    return kwargs


def _optimisation(
    config: TrainConfig, model: MaskedReconstructor, samples: int, dist: Dist
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, int]:
    groups = optimizer_param_groups(model, config.weight_decay, layer_decay=None)
    lr = pretrain_lr(config, dist)
    for group in groups:
        group["lr"] = lr
    fused = dist.device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=PRETRAIN_BETAS, fused=fused)
    steps = math.ceil(samples / config.batch_size)
    warmup = round(min(config.warmup_epochs, config.epochs / 10) * steps)
    total = config.epochs * steps
    floor = min(1.0, config.min_lr / lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, floor)
    )
    return optimizer, scheduler, steps


def pretrain_lr(config: TrainConfig, dist: Dist) -> float:
    """``--lr``, else MIRAGE's: 1e-4 per 256 images of the effective batch."""
    if config.lr is not None:
        return config.lr
    return 1e-4 * config.batch_size * dist.world_size / 256


def _record(
    config: TrainConfig,
    data: DatasetSplits,
    preprocessing: Preprocessing,
    dist: Dist,
    amp_dtype: torch.dtype | None,
    steps: int,
) -> dict[str, Any]:
    options = {k: v for k, v in config.to_dict().items() if k not in ("resume", "progress")}
    derived = {
        "lr": pretrain_lr(config, dist),
        "betas": list(PRETRAIN_BETAS),
        "world_size": dist.world_size,
        "steps_per_epoch": steps,
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
        "images": {split: len(samples) for split, samples in data.splits.items()},
        "test_split_seen": False,
    }
    description = config.description or (
        f"{config.model} pre-trained as a masked autoencoder (MIRAGE's recipe, B-scans only) "
        f"on the train split of {config.data_name or Path(config.data or '').name}"
    )
    return {
        "architecture": config.model,
        "encoder_kwargs": _encoder_kwargs(config),
        "preprocessing": preprocessing.to_dict(),
        "mask_ratio": config.mask_ratio,
        "loss": "mean squared error on the hidden patches of the [0, 1] pixels",
        "split": config.split.to_dict(),
        "description": description,
        "license": LICENSE,
        "data_name": config.data_name or "",
        "training": {"options": options, "derived": derived},
    }


def _restore(run: PretrainRun, state: dict) -> None:
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.epoch, run.step = state["progress"]["epoch"], state["progress"]["step"]
    run.history = list(state["progress"]["history"])
    if len(state["rng"]) == run.dist.world_size:
        set_rng_state(state["rng"][run.dist.rank])
    say(run.dist, f"resuming {run.out} after epoch {run.epoch} (step {run.step})")


def _epoch(run: PretrainRun, epoch: int) -> None:
    """Train one epoch, measure the validation loss, save the checkpoint and the state."""
    train_loss, images, seconds = _train_epoch(run, epoch)
    val_loss = _validate(run)
    if not math.isfinite(val_loss):
        raise TrainingDivergedError(
            f"the validation loss became {val_loss} after epoch {epoch + 1}: training stopped"
        )
    run.epoch, row = (
        epoch + 1,
        {
            "epoch": epoch + 1,
            "step": run.step,
            "lr": run.scheduler.get_last_lr()[-1],
            "train_loss": train_loss,
            "val_loss": val_loss,
            "images_per_s": images / seconds,
            "seconds": seconds,
        },
    )
    run.history.append(row)
    rng = run.dist.gather(get_rng_state())
    if run.dist.is_main:
        info = {**run.record, "epoch": epoch + 1, "val_loss": val_loss}
        save_pretraining(run.out, run.model, info)
        state = {
            "config": run.config.to_dict(),
            "data": fingerprint(run.data),
            "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": rng,
            "progress": {"epoch": run.epoch, "step": run.step, "history": run.history},
        }
        save_state(run.out, state)
        write_history(run.out, run.history)
    say(
        run.dist,
        f"epoch {epoch + 1}/{run.config.epochs}  train loss {train_loss:.5f}  val loss "
        f"{val_loss:.5f}  lr {row['lr']:.2e}  {row['images_per_s']:.1f} img/s  {seconds:.0f}s",
    )


def _train_epoch(run: PretrainRun, epoch: int) -> tuple[float, int, float]:
    config, dist, device = run.config, run.dist, run.dist.device
    run.sampler.set_epoch(epoch)
    seed = np.random.SeedSequence([config.seed, epoch, dist.rank]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(seed))  # augmentation and masks
    run.ddp_model.train()
    started, total, seen = time.perf_counter(), torch.zeros(()), 0
    std, mean = run.preprocessing.std[0], run.preprocessing.mean[0]
    patches = run.model.grid[0] * run.model.grid[1]
    for batch in run.train_loader:
        if batch is None:
            continue
        images = batch[0]
        x = to_model_input(images, run.preprocessing, device, run.augment, generator)
        target = x * std + mean  # the augmented [0, 1] image
        visible = visible_patches(len(x), config.mask_ratio, patches=patches, generator=generator)
        visible = visible.to(device)
        with run.autocast():
            prediction = run.ddp_model(x, visible)["bscan"]
            loss = masked_mse(prediction, target, visible, run.model.patch)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"the reconstruction loss became {loss.item()} in epoch {epoch + 1}: training "
                "stopped; lower --lr or set --clip-grad 1.0, and start again"
            )
        loss.backward()
        if config.clip_grad:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.clip_grad)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        run.step += 1
        total += loss.detach().float().cpu() * len(x)
        seen += len(x)
        if run.step % LOG_EVERY == 0:
            rate = seen / (time.perf_counter() - started)
            say(dist, f"  step {run.step}  loss {loss.item():.5f}  {rate:.1f} img/s")
    seconds = time.perf_counter() - started
    parts = dist.gather((float(total), seen))
    images = sum(n for _, n in parts)
    return sum(s for s, _ in parts) / max(1, images), images, seconds


@torch.no_grad()
def _validate(run: PretrainRun) -> float:
    """Reconstruction loss over the validation split, with its fixed masks."""
    run.model.eval()
    total, seen = 0.0, 0
    std, mean = run.preprocessing.std[0], run.preprocessing.mean[0]
    for batch in run.val_loader:
        if batch is None:
            continue
        images, _, indices = batch
        x = to_model_input(images, run.preprocessing, run.dist.device)
        visible = run.val_visible[indices].to(run.dist.device)
        with run.autocast():
            prediction = run.model(x, visible)["bscan"]
        loss = masked_mse(prediction, x * std + mean, visible, run.model.patch)
        total += float(loss) * len(x)
        seen += len(x)
    parts = run.dist.gather((total, seen))
    return sum(s for s, _ in parts) / max(1, sum(n for _, n in parts))
