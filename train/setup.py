"""The steps every run shares, whatever its ``--mode``: the output folder, the data, the model,
the machine (threads, precision), and the run's record (``config.json``, ``train_config.yaml``).

The fine-tuning run (:mod:`train.train`) and the probe (:mod:`train.probe`) both start with
:func:`prepare_out`, :func:`checked_data` and :func:`create_training_model`, and record what
they did with :func:`checkpoint_config` and :func:`write_resolved_options`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mirage_demo.cache import cache_key, default_cache_dir
from mirage_demo.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointConfig, read_config
from mirage_demo.data import DatasetSplits, Preprocessing, load_dataset
from mirage_demo.fileio import atomic_write, check_writable, describe_os_error, remove_stale_temps
from mirage_demo.models import cpu_computes_bf16, create_classifier, pretrained_source
from mirage_demo.pretraining import PretrainingError, load_encoder_weights, read_pretraining_config
from train.config import TrainConfig, UsageError, check_resumable
from train.distributed import Dist
from train.state import STATE_NAME, load_state

__all__ = [
    "EVAL_BATCH_SIZE",
    "FINISHED_FILES",
    "check_space",
    "check_unreadable",
    "checked_data",
    "checkpoint_config",
    "cpu_computes_bf16",
    "create_training_model",
    "fingerprint",
    "keep_large_blocks",
    "prepare_out",
    "resolve_amp",
    "say",
    "set_threads",
    "write_resolved_options",
]


EVAL_BATCH_SIZE = 64  # the final report's batch size, as train.evaluate's default


def say(dist: Dist, *args: Any) -> None:
    """Print on the main process only (flushed)."""
    if dist.is_main:
        print(*args, flush=True)


# --------------------------------------------------------------------------------------------
# The output folder


def prepare_out(config: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, dict | None]:
    """Check ``--out`` (and the cache folder) before any work: a new run's folder, or with
    ``--resume`` the run to continue. Returns the config (a resumed run's, with the options
    given now that may change) and the saved state to resume (``None`` for a new run)."""
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
    finished = any((out / name).exists() for name in FINISHED_FILES)
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
FINISHED_FILES = ("history.csv", "metrics.json", "README.md")


def _check_writable(folder: Path, option: str) -> None:
    try:
        check_writable(folder)
    except OSError as err:
        raise UsageError(
            f"{option} {folder} is not writable ({describe_os_error(err).split(': ', 1)[-1]}): "
            f"choose another {option}"
        ) from err


def check_space(
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


# --------------------------------------------------------------------------------------------
# The data


def _load_data(config: TrainConfig) -> DatasetSplits:
    if not config.data:
        raise UsageError("--data DIR is required: a folder of train|val|test/<CLASS>/ images")
    data = load_dataset(config.data, config.split)
    if not data.splits.get("val"):
        raise UsageError(f"{config.data}: the validation split is empty")
    return data


def checked_data(config: TrainConfig, state: dict | None, dist: Dist) -> DatasetSplits:
    """The folders and splits, their notes said; a resumed run must see the same images."""
    data = _load_data(config)
    for note in data.notes:
        say(dist, f"note: {note}")
    for split in data.splits:
        missing = [c for c, n in data.counts(split).items() if n == 0]
        if missing:
            say(dist, f"warning: the {split} split has no {', '.join(missing)} images")
    if state is not None and state.get("data") != fingerprint(data):
        raise UsageError(
            f"the images in {config.data} differ from those of the run being resumed: "
            "resume with the same data, or start a new run in another --out"
        )
    return data


def fingerprint(data: DatasetSplits) -> str:
    """A short digest of the train and val images and labels (a resumed run must see the same)."""
    import hashlib

    digest = hashlib.sha256()
    for split in ("train", "val"):
        for sample in data.splits[split]:
            name = Path(sample.path).relative_to(data.root).as_posix()
            digest.update(f"{split}\0{name}\0{sample.label}\n".encode())
    return digest.hexdigest()[:16]


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
        say(dist, f"warning: skipping unreadable image {message}")


# --------------------------------------------------------------------------------------------
# The model and the machine


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
    """``--init DIR``: the encoder of a ``--mode pretrain`` checkpoint of the same architecture
    (the new norm and head keep their fresh initialisation)."""
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


def set_threads(config: TrainConfig, dist: Dist) -> None:
    """``--threads``, or under DDP on CPU the cores shared between this machine's processes."""
    if config.threads:
        torch.set_num_threads(config.threads)
    elif dist.enabled and dist.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.local_world_size))


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``--amp`` on ``device`` as an autocast dtype (``None``: float32)."""
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


# --------------------------------------------------------------------------------------------
# The run's record


def checkpoint_config(
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


def _description(config: TrainConfig, class_names: list[str]) -> str:
    how = (
        f"fine-tuned ({config.mode})"
        if config.pretrained or config.weights
        else "trained from scratch"
    )
    if config.init:
        how = f"pre-trained as a masked autoencoder, then fine-tuned ({config.mode})"
    if config.mode == "probe":
        started = config.pretrained or config.weights or config.init
        start = "pretrained" if started else "randomly initialised"
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


def write_resolved_options(config: TrainConfig, out: Path, derived: dict[str, Any]) -> None:
    """``train_config.yaml``: the resolved options (``--config`` reuses them), derived facts
    as comments."""
    out.mkdir(parents=True, exist_ok=True)
    resolved = yaml.safe_dump({**config.to_dict(), "resume": False}, sort_keys=False)
    derived_yaml = yaml.safe_dump(derived, sort_keys=False)
    comment = "".join(f"# {line}\n" for line in derived_yaml.splitlines())
    text = f"# python -m train --config this-file (resolved options)\n{comment}{resolved}"
    atomic_write(out / "train_config.yaml", lambda tmp: Path(tmp).write_text(text))
