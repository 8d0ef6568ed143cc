"""Fine-tune MIRAGE (or any timm model) on OCT B-scans: ``python -m train --help``.

One readable loop in the spirit of nanoGPT; options live in :mod:`train.config`, data plumbing
in :mod:`train.data`, the resumable state in :mod:`train.state`, DDP in
:mod:`train.distributed`, and the model, data, metrics and checkpoint formats in
:mod:`mirage_demo`.

The output folder is a checkpoint directory (best model by validation balanced accuracy,
ties by loss) plus its test report, ``history.csv``, ``tensorboard/``, the resolved
``train_config.yaml`` and ``train_state.pt`` (what ``--resume`` continues from).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import logging
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import mirage_demo
from mirage_demo.augment import BatchAugmentation
from mirage_demo.cache import (
    CachedImages,
    build_cache,
    cache_key,
    default_cache_dir,
    tqdm_disable,
)
from mirage_demo.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from mirage_demo.data import DataError, DatasetSplits, Preprocessing, class_weights, load_dataset
from mirage_demo.fileio import (
    atomic_write,
    check_writable,
    describe_os_error,
    remove_stale_temps,
)
from mirage_demo.metrics import compute_metrics, fit_temperature, nll, softmax
from mirage_demo.models import (
    configure_finetuning,
    create_classifier,
    optimizer_param_groups,
    pretrained_source,
    set_training_mode,
)
from mirage_demo.pretraining import (
    PretrainingError,
    load_encoder_weights,
    read_pretraining_config,
)
from mirage_demo.uncertainty import fit_uncertainty, save_uncertainty
from train.config import TrainConfig, UsageError, check_resumable, parse_config
from train.data import EpochSampler, FileImages, make_loader, to_model_input
from train.distill import Teacher, distillation_loss
from train.distributed import Dist, setup
from train.evaluate import collect_logits, evaluate_samples, summary
from train.state import STATE_NAME, get_rng_state, load_state, save_state, set_rng_state

if TYPE_CHECKING:
    from train.probe import ProbeRun

__all__ = ["TrainingDivergedError", "main", "train"]

log = logging.getLogger("train")
EVAL_BATCH_SIZE = 64  # the final report's batch size, as train.evaluate's default
# --balance choices that resample: class c drawn in proportion to count_c ** (1 - power)
SAMPLING_POWER = {"sampler": 1.0, "sqrt": 0.5}
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


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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


# --------------------------------------------------------------------------------------------
# Setting up: output folder, data, model


def _say(dist: Dist, *args: Any) -> None:
    if dist.is_main:
        print(*args, flush=True)


def _prepare_out(config: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, dict | None]:
    if not config.out:
        raise UsageError("--out DIR is required: the folder the checkpoint is written to")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    _check_writable(out, "--out")
    if config.cache:
        _check_writable(Path(config.cache_dir or default_cache_dir()), "--cache-dir")
    remove_stale_temps(out)  # a write killed half-way: its complete original is still there
    started = (out / STATE_NAME).exists()
    finished = any((out / name).exists() for name in _FINISHED_FILES)
    if config.resume:
        if not started and (out / WEIGHTS_NAME).exists() and not finished:
            raise UsageError(
                f"nothing to resume: the run in {out} stopped before its first epoch was "
                "saved; start it again with the same command without --resume"
            )
        state = load_state(out)
        return check_resumable(state["config"], config, explicit), state
    if started:
        raise UsageError(
            f"{out} already holds a training run: pass --resume to continue it, "
            "or choose another --out"
        )
    if (out / WEIGHTS_NAME).exists() and finished:
        raise UsageError(f"{out} already holds a trained model: choose another --out")
    # model.safetensors without a state or a report: a run stopped during its first save
    return config, None


#: Files that mean a run got past its first epoch (or a published model): never overwritten.
_FINISHED_FILES = ("history.csv", "metrics.json", "README.md")


def _check_writable(folder: Path, option: str) -> None:
    try:
        check_writable(folder)
    except OSError as err:
        raise UsageError(
            f"{option} {folder} is not writable ({describe_os_error(err).split(': ', 1)[-1]}): "
            f"choose another {option}"
        ) from err


def _check_space(
    out: Path,
    config: TrainConfig,
    data: DatasetSplits,
    preprocessing: Preprocessing,
    model: nn.Module,
) -> None:
    """Refuse to start when the disk cannot hold the checkpoint, the training state (an
    estimate: the weights x4, AdamW's moments included) and the image cache still to build."""
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    needs = {out: 5 * weights}
    cache_root = Path(config.cache_dir or default_cache_dir()) if config.cache else None
    if cache_root is not None:
        height, width = preprocessing.input_size
        cache_bytes = sum(
            len(samples) * height * width
            for samples in data.splits.values()
            if not (cache_root / cache_key(samples, preprocessing)).is_dir()
        )
        if cache_bytes:
            needs[cache_root] = needs.get(cache_root, 0) + cache_bytes
    for folder, needed in needs.items():
        existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
        free = shutil.disk_usage(existing).free
        if free < needed:
            option = "--out" if folder == out else "--cache-dir"
            raise UsageError(
                f"not enough disk space in {folder}: {free / 2**20:,.0f} MB free, this run "
                f"needs about {needed / 2**20:,.0f} MB: free some space or choose another {option}"
            )


def _load_data(config: TrainConfig) -> DatasetSplits:
    if not config.data:
        raise UsageError("--data DIR is required: a folder of train|val|test/<CLASS>/ images")
    data = load_dataset(config.data, config.split)
    if not data.splits.get("val"):
        raise UsageError(f"{config.data}: the validation split is empty")
    return data


def _fingerprint(data: DatasetSplits) -> str:
    import hashlib

    digest = hashlib.sha256()
    for split in ("train", "val"):
        for sample in data.splits[split]:
            name = Path(sample.path).relative_to(data.root).as_posix()
            digest.update(f"{split}\0{name}\0{sample.label}\n".encode())
    return digest.hexdigest()[:16]


def _fixed_input_size(name: str) -> bool:
    from timm.models._builder import resolve_pretrained_cfg

    try:
        return bool(resolve_pretrained_cfg(name).fixed_input_size)
    except Exception:
        return False


def create_training_model(
    config: TrainConfig, num_classes: int, fresh: bool = True
) -> tuple[nn.Module, dict[str, Any], Preprocessing]:
    """The classifier, the architecture kwargs stored in the checkpoint, its preprocessing.

    Pretrained weights are loaded only for a ``fresh`` run (a resumed one has its own)."""
    kwargs: dict[str, Any] = {"in_chans": 1, **config.model_kwargs}
    input_size = None
    if config.img_size is not None:
        if _fixed_input_size(config.model):
            kwargs["img_size"] = config.img_size
        else:
            input_size = config.img_size
    extra = {"drop_path_rate": config.drop_path} if config.drop_path > 0 else {}
    weights = config.weights if fresh else None
    if weights is not None and not Path(weights).is_file():
        raise UsageError(f"--weights {weights} does not exist")
    try:
        model = create_classifier(
            config.model,
            num_classes,
            pretrained=config.pretrained and fresh,
            weights=weights,
            **kwargs,
            **extra,
        )
    except (ValueError, TypeError) as err:
        raise UsageError(f"cannot build {config.model}: {err}") from err
    except Exception as err:  # Hub download, missing cache, unreadable weights file
        raise UsageError(
            f"cannot load pretrained weights for {config.model} ({type(err).__name__}: {err}); "
            "offline? download them once, or pass --weights FILE"
        ) from err
    if config.init and fresh:
        _load_init(model, config)
    return model, kwargs, Preprocessing.from_model(model, input_size)


def _load_init(model: nn.Module, config: TrainConfig) -> None:
    """``--init DIR``: the encoder of a ``--mode pretrain`` checkpoint of the same architecture."""
    init = Path(config.init)
    try:
        record = read_pretraining_config(init)
        if record["architecture"] != config.model:
            raise UsageError(
                f"--init {init} pre-trained {record['architecture']}, not {config.model}: "
                f"pass --model {record['architecture']}"
            )
        load_encoder_weights(model, init)
    except PretrainingError as err:
        raise UsageError(f"--init: {err}") from err


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


def _description(config: TrainConfig, class_names: list[str]) -> str:
    how = (
        f"fine-tuned ({config.mode})"
        if config.pretrained or config.weights
        else "trained from scratch"
    )
    if config.init:
        how = f"pre-trained as a masked autoencoder ({Path(config.init).name}), fine-tuned ({config.mode})"
    if config.mode == "probe":
        start = "pretrained" if config.pretrained or config.weights or config.init else "randomly initialised"
        how = f"frozen ({start} weights), a linear probe fitted"
    taught = f", distilled from {Path(config.teacher).name}" if config.teacher else ""
    classes = ", ".join(class_names)
    return f"{config.model} {how}{taught} on {len(class_names)} OCT classes ({classes})."


def _source_weights(config: TrainConfig) -> dict[str, Any]:
    if config.init:
        record = read_pretraining_config(config.init)
        return {
            "name": f"{Path(config.init).name} (masked-autoencoder pre-training of this project)",
            "checkpoint": str(config.init),
            "from_scratch": False,
            "pretraining_epochs": record.get("epoch"),
            "license": record.get("license") or "unknown",
        }
    if config.weights:
        weights = Path(config.weights)
        if (weights.parent / CONFIG_NAME).is_file():  # a checkpoint of this project
            earlier = read_config(weights.parent).source_weights
            return {
                "name": f"{weights.parent.name} (a checkpoint of this project)",
                "checkpoint": str(weights.parent),
                "from_scratch": bool(earlier.get("from_scratch", not earlier)),
                **{k: earlier[k] for k in ("license",) if k in earlier},
            }
        return {"name": weights.name, **pretrained_source(config.model)}
    if config.pretrained:
        source = pretrained_source(config.model)
        return {"name": source.get("hf_hub_id") or config.model, **source}
    return {}


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


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX) through oneDNN."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        if amp == "fp16":
            raise UsageError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or off")
        if amp != "bf16":
            return None  # auto stays fp32 on CPU: bf16 pays only where the CPU computes it natively
        if not cpu_computes_bf16():
            raise UsageError(
                "--amp bf16 on CPU needs native bfloat16 (AVX512-BF16 or AMX); this CPU would "
                "emulate it, slower than fp32: leave --amp at auto"
            )
        return torch.bfloat16
    if amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# The loop


def train(config: TrainConfig, explicit: set[str] | None = None) -> dict[str, Any] | None:
    """Run training end to end; returns the test metrics on rank 0 (``None`` elsewhere)."""
    explicit = set(explicit or ())
    if config.mode == "probe":
        from train.probe import probe

        return probe(config, explicit)
    if config.mode == "pretrain":
        from train.pretrain import pretrain

        return pretrain(config, explicit)
    config, state = _prepare_out(config, explicit)
    dist = setup(config.device)
    try:
        return _train(config, state, dist)
    finally:
        dist.close()


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


def _train(config: TrainConfig, state: dict | None, dist: Dist) -> dict[str, Any] | None:
    run = setup_run(config, state, dist)
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
        end_epoch(run, row, better)
    if run.writer is not None:
        run.writer.close()
    return _finish(run) if dist.is_main else None


def setup_run(config: TrainConfig, state: dict | None, dist: Dist) -> Run:
    """Everything the loop needs, step by step: threads and precision, data, model, loaders,
    optimisation, the run's record, then (when resuming) the saved state, then the run files."""
    _set_threads(config, dist)
    amp_dtype = _resolve_amp(config.amp, dist.device)
    data = _checked_data(config, state, dist)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model, model_kwargs, preprocessing = create_training_model(
        config, len(data.class_names), fresh=state is None
    )
    if dist.is_main:
        _check_space(Path(config.out), config, data, preprocessing, model)
    train_set, val_set = _checked_datasets(config, data, preprocessing, dist)
    train_samples = [data.splits["train"][i] for i in train_set.indices]
    if state is not None:
        _restore_weights(model, state, config)
    trainable, ddp_model = _prepare_model(model, config, dist)
    loaders = _loaders(config, train_set, val_set, train_samples, len(data.class_names), dist)
    optimisation = _optimisation(config, model, train_samples, loaders, amp_dtype, dist)
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
        checkpoint_config=_checkpoint_config(config, data, preprocessing, model_kwargs, derived),
    )
    torch.manual_seed(config.seed + dist.rank)  # dropout and drop-path differ between ranks
    np.random.seed(config.seed + dist.rank)
    if state is not None:
        _restore_state(run, state)
    if dist.is_main:
        _write_run_files(run, derived)
    _say(
        dist,
        f"{config.model} ({config.mode}, {trainable:,} trainable parameters) on "
        f"{dist.device} x{dist.world_size}, {derived['amp']}; {len(train_samples)} train / "
        f"{sum(data.counts('val').values())} val images, {len(data.class_names)} classes; "
        f"{config.epochs} epochs of {optimisation.steps_per_epoch} steps, "
        f"batch {derived['effective_batch_size']}",
    )
    return run


def _set_threads(config: TrainConfig, dist: Dist) -> None:
    """``--threads``, or under DDP on CPU the cores shared between this machine's processes."""
    if config.threads:
        torch.set_num_threads(config.threads)
    elif dist.enabled and dist.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world_size))


def _checked_data(config: TrainConfig, state: dict | None, dist: Dist) -> DatasetSplits:
    """The folders and splits, their notes said; a resumed run must see the same images."""
    data = _load_data(config)
    for note in data.notes:
        _say(dist, f"note: {note}")
    for split in data.splits:
        missing = [c for c, n in data.counts(split).items() if n == 0]
        if missing:
            _say(dist, f"warning: the {split} split has no {', '.join(missing)} images")
    if state is not None and state.get("data") != _fingerprint(data):
        raise UsageError(
            f"the images in {config.data} differ from those of the run being resumed: "
            "resume with the same data, or start a new run in another --out"
        )
    return data


def _checked_datasets(
    config: TrainConfig, data: DatasetSplits, preprocessing: Preprocessing, dist: Dist
) -> tuple[Any, Any]:
    """Train and this rank's val datasets (every image decoded once into the cache);
    unreadable images stop the run unless ``--skip-unreadable``."""
    train_set, val_set, unreadable = _datasets(config, data, preprocessing, dist)
    check_unreadable(config, dist, unreadable, "train")
    return train_set, val_set


def check_unreadable(config: TrainConfig, dist: Dist, unreadable: list[str], verb: str) -> None:
    """Stop on unreadable images (one line naming the first few), or, with
    ``--skip-unreadable``, warn about each and go on (``verb``: what the run does)."""
    if unreadable and not config.skip_unreadable:
        shown = "; ".join(unreadable[:3]) + ("; ..." if len(unreadable) > 3 else "")
        raise UsageError(
            f"{len(unreadable)} unreadable image(s): {shown} - fix or remove them, "
            f"or pass --skip-unreadable to {verb} without them"
        )
    for message in unreadable:
        _say(dist, f"warning: skipping unreadable image {message}")


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


@dataclass
class Optimisation:
    """Optimiser, schedule, loss scaling and loss."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    warmup_epochs: float
    steps_per_epoch: int


def _optimisation(
    config: TrainConfig,
    model: nn.Module,
    train_samples: list,
    loaders: Loaders,
    amp_dtype: torch.dtype | None,
    dist: Dist,
) -> Optimisation:
    """AdamW over the trainable groups (layer decay, no decay on norms and biases), warm-up
    then cosine, the (class-weighted, label-smoothed) loss."""
    device = dist.device
    groups = optimizer_param_groups(model, config.weight_decay, config.layer_decay)
    for group in groups:
        group["lr"] = config.base_lr * group.get("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=config.base_lr, fused=device.type == "cuda")
    steps_per_epoch = math.ceil(len(loaders.train) / config.accum_steps)
    warmup_epochs = config.warmup_epochs
    if warmup_epochs >= config.epochs:
        warmup_epochs = config.epochs / 10
        _say(
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
    num_classes = loaders.sampler.num_classes
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
        "versions": {"mirage_demo": mirage_demo.__version__, "torch": str(torch.__version__)},
    }


def _checkpoint_config(
    config: TrainConfig,
    data: DatasetSplits,
    preprocessing: Preprocessing,
    model_kwargs: dict[str, Any],
    derived: dict[str, Any],
) -> CheckpointConfig:
    """The best model's config.json, minus the per-epoch facts: the split as a typed record,
    the options and derived facts as provenance."""
    options = {k: v for k, v in config.to_dict().items() if k not in ("resume", "progress")}
    return CheckpointConfig(
        architecture=config.model,
        class_names=data.class_names,
        preprocessing=preprocessing,
        model_kwargs=model_kwargs,
        source_weights=_source_weights(config),
        split=config.split,
        training={**options, **derived},
        description=config.description or _description(config, data.class_names),
    )


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
        _say(
            dist,
            "warning: resumed on a different number of processes: random streams "
            "restart, so the result will differ from an uninterrupted run",
        )
    _say(dist, f"resuming {run.out} after epoch {run.progress.epoch} (step {run.progress.step})")


def _write_run_files(run: Run, derived: dict[str, Any]) -> None:
    """``train_config.yaml`` (the resolved options) and the TensorBoard writer (rank 0)."""
    config = run.config
    write_resolved_options(config, run.out, derived)
    if config.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.out / "tensorboard"), purge_step=run.progress.epoch + 1)


def write_resolved_options(config: TrainConfig, out: Path, derived: dict[str, Any]) -> None:
    """``train_config.yaml``: the resolved options (``--config`` reuses them), derived facts
    as comments."""
    out.mkdir(parents=True, exist_ok=True)
    resolved = yaml.safe_dump({**config.to_dict(), "resume": False}, sort_keys=False)
    derived_yaml = yaml.safe_dump(derived, sort_keys=False)
    comment = "".join(f"# {line}\n" for line in derived_yaml.splitlines())
    text = f"# python -m train --config this-file (resolved options)\n{comment}{resolved}"
    atomic_write(out / "train_config.yaml", lambda tmp: Path(tmp).write_text(text))


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
            "data": _fingerprint(run.data),
            "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng,
            "progress": run.progress.__dict__,
        }
        save_state(run.out, state)
        _write_history(run.out, run.progress.history)
        if run.writer is not None:
            for key, tag in _TENSORBOARD_TAGS.items():
                if row.get(key) is not None:
                    run.writer.add_scalar(tag, row[key], epoch)
            run.writer.flush()
    _say(
        dist,
        f"epoch {epoch}/{config.epochs}  train loss {row['train_loss']:.4f}  "
        f"val loss {row['val_loss']:.4f}  val acc {row['val_accuracy']:.3f}  "
        f"val bal acc {row['val_balanced_accuracy']:.3f}  lr {row['lr']:.2e}  "
        f"{row['images_per_s']:.1f} img/s  {row['seconds']:.0f}s" + ("  *best*" if better else ""),
    )
    if run.progress.stopped:
        _say(dist, f"early stopping: no better model for {config.patience} epochs")


def _finish(run: Run | ProbeRun) -> dict[str, Any]:
    """Calibrate the best model on val, fit its prediction sets and out-of-distribution flag
    (train and val), then write the report on test (val if none): all from the image files, as
    the app and ``train.evaluate`` see them."""
    config, data, out, device = run.config, run.data, run.out, run.dist.device
    model, checkpoint = load_checkpoint(out, device=device)
    val_loader = make_loader(
        FileImages(data.splits["val"], checkpoint.preprocessing),
        EVAL_BATCH_SIZE,
        run.workers,
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
        workers=run.workers,
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
        workers=run.workers,
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


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out / "history.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()))


def keep_large_blocks(threshold: int = 256 << 20) -> None:
    """Serve blocks under ``threshold`` bytes from glibc's heap instead of fresh ``mmap`` pages.

    A training step allocates and frees activations of tens of MB; by default each is a new
    mapping whose pages the kernel zeroes on first touch. On 2 CPU cores that page faulting
    took about a third of a ResNet-18 bf16 step at 384 px (``benchmarks/cpu_training.py``).
    A no-op off glibc or where ``MALLOC_MMAP_THRESHOLD_`` is set.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD


def main(argv: list[str] | None = None) -> int:
    """``python -m train``: 0 on success, 2 for bad input, 1 if training diverged."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    keep_large_blocks()
    config: TrainConfig | None = None
    try:
        config, explicit = parse_config(argv)
        train(config, explicit)
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
