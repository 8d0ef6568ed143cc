"""``python -m train --mode probe``: a linear probe on frozen features, in minutes on a CPU.

The same data, split, output and report options as every other mode. Each image goes once
through the frozen backbone (features cached on disk: :mod:`mirage_demo.probe`), a
class-balanced logistic regression is fitted on them (``C`` chosen on the validation split)
and written into the model's linear head; then the run ends as every run does
(:func:`train.finish.finish`: temperature on the validation split, the report on the test
split), on features read from the same cache: a run on scans it has seen embeds none of them
again (another C, another split, the same data again). Its set-up steps are the fine-tuning
run's (:mod:`train.setup`). A backbone whose weights come from the Hub (``--pretrained`` on
MIRAGE or any timm model with Hub weights) is saved head-only: the checkpoint names it, never
copies it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mirage_demo.cache import default_cache_dir
from mirage_demo.checkpoint import BackboneRef, CheckpointConfig, save_checkpoint
from mirage_demo.data import DatasetSplits, Preprocessing
from mirage_demo.images import Sample
from mirage_demo.logits import Outputs
from mirage_demo.models import WeightsUnavailableError, hub_weights, registered_hub_weights
from mirage_demo.probe import (
    DEFAULT_CS,
    Features,
    apply_probe,
    bare_forward_speed,
    cached_features,
    fit_probe,
    head_outputs,
    weights_digest,
)
from mirage_demo.version import __version__
from train.config import TrainConfig, UsageError
from train.distributed import Dist, setup
from train.finish import OutputsOf, finish
from train.setup import (
    check_unreadable,
    checked_data,
    checkpoint_config,
    create_training_model,
    prepare_out,
    resolve_amp,
    say,
    set_threads,
    write_resolved_options,
)

__all__ = ["cached_outputs_of", "feature_cache_dir", "probe", "probe_model"]


def feature_cache_dir(config: TrainConfig) -> Path:
    """Where pooled features are cached: ``features/`` in the image cache folder."""
    return Path(config.cache_dir or default_cache_dir()) / "features"


def probe(config: TrainConfig, explicit: set[str]) -> dict[str, Any] | None:
    """Fit, save and report a probe; returns the test metrics on rank 0 (``None`` elsewhere)."""
    if config.resume:
        raise UsageError(
            "a probe has nothing to resume: run it again without --resume (its features are "
            "cached, so it takes seconds)"
        )
    config, _ = prepare_out(config, explicit)
    dist = setup(config.device)
    try:
        return _probe(config, dist)
    finally:
        dist.close()


def probe_model(
    config: TrainConfig, num_classes: int
) -> tuple[nn.Module, dict[str, Any], Preprocessing, BackboneRef | None]:
    """The frozen model, its architecture kwargs, preprocessing and, for Hub weights, the
    reference a head-only checkpoint stores. Hub weights are fetched through the Hugging Face
    cache (as ``--pretrained`` does), hashed, and loaded from that very file."""
    backbone = None
    if config.pretrained and not config.weights:
        try:
            registered_hub_weights(config.model)
        except ValueError:  # weights from a URL, or none: saved whole, as any checkpoint
            pass
        else:
            try:
                found = hub_weights(config.model)
            except WeightsUnavailableError as err:
                raise UsageError(str(err)) from err
            backbone = BackboneRef(found.name, found.revision, found.sha256)
            config = dataclasses.replace(config, pretrained=False, weights=str(found.path))
    model, kwargs, preprocessing = create_training_model(config, num_classes)
    model.requires_grad_(False)
    return model.eval(), kwargs, preprocessing, backbone


def _probe(config: TrainConfig, dist: Dist) -> dict[str, Any] | None:
    set_threads(config, dist)
    device = dist.device
    amp_dtype = resolve_amp(config.amp, device)
    data = checked_data(config, None, dist)
    torch.manual_seed(config.seed)  # a randomly initialised backbone is the same every run
    model, model_kwargs, preprocessing, backbone = probe_model(config, len(data.class_names))
    model.to(device)
    workers = config.workers
    if workers is None:  # as training: background decoding on CUDA
        workers = (
            min(6, (os.cpu_count() or 1) // dist.local_world_size) if device.type == "cuda" else 0
        )
    features = _train_and_val_features(config, dist, data, model, preprocessing, workers, amp_dtype)
    facts = _embedding_facts(config, dist, model, preprocessing, features, amp_dtype)
    if not dist.is_main:
        return None
    train, val = features["train"], features["val"]
    fit = fit_probe(
        train.features,
        train.labels,
        val.features,
        val.labels,
        len(data.class_names),
        cs=config.probe_c or DEFAULT_CS,
        seed=config.seed,
    )
    apply_probe(model, fit)
    facts.update(fit.summary(), feature_dim=int(train.features.shape[1]))
    say(dist, _speed_line(facts, len(data.splits["train"]) + len(data.splits["val"]), dist))
    derived = {
        "world_size": dist.world_size,
        "device": str(device),
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "fp32",
        "trainable_parameters": int(fit.weight.size + fit.bias.size),
        "images": {split: data.counts(split) for split in data.splits},
        "versions": {"mirage_demo": __version__, "torch": str(torch.__version__)},
    }
    checkpoint = checkpoint_config(config, data, preprocessing, model_kwargs, derived)
    checkpoint.backbone = backbone
    checkpoint.training["probe"] = facts
    out = Path(config.out)
    save_checkpoint(out, model, checkpoint, getattr(torch, config.save_dtype))
    write_resolved_options(config, out, derived)
    return finish(config, data, out, device, workers, cached_outputs_of(config, device, workers))


def _train_and_val_features(
    config: TrainConfig,
    dist: Dist,
    data: DatasetSplits,
    model: nn.Module,
    preprocessing: Preprocessing,
    workers: int,
    amp_dtype: torch.dtype | None,
) -> dict[str, Features]:
    """The pooled features of the train and val images, from the cache or embedded (shared out
    across the processes); unreadable images stop the run unless ``--skip-unreadable``."""
    digest = weights_digest(model)
    features: dict[str, Features] = {}
    for split in ("train", "val"):
        features[split] = cached_features(
            model,
            data.splits[split],
            preprocessing,
            feature_cache_dir(config),
            dist.device,
            digest=digest,
            batch_size=config.batch_size,
            workers=workers,
            amp_dtype=amp_dtype,
            progress=config.progress if dist.is_main else False,
            desc=f"embedding {split}",
            rank=dist.rank,
            world_size=dist.world_size,
            gather=dist.gather,
        )
    check_unreadable(config, dist, [p for f in features.values() for p in f.unreadable], "fit")
    return features


def _embedding_facts(
    config: TrainConfig,
    dist: Dist,
    model: nn.Module,
    preprocessing: Preprocessing,
    features: dict[str, Features],
    amp_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """What embedding cost (recorded in ``config.json``): images from the cache and embedded,
    the time, and, when anything was embedded, a bare forward's speed to compare with."""
    embedded = sum(f.embedded for f in features.values())
    seconds = sum(f.seconds for f in features.values())
    facts: dict[str, Any] = {
        "images_cached": sum(f.cached for f in features.values()),
        "images_embedded": embedded,
        "embedding_seconds": round(seconds, 2),
        "embedding_images_per_s": round(embedded / seconds, 2) if embedded and seconds else None,
    }
    if embedded and dist.is_main:
        bare = bare_forward_speed(
            model, preprocessing, dist.device, min(config.batch_size, 16), amp_dtype=amp_dtype
        )
        facts["bare_forward_images_per_s"] = round(bare, 2)
    return facts


def cached_outputs_of(config: TrainConfig, device: torch.device, workers: int) -> OutputsOf:
    """The end of a probe run (temperature, prediction sets and OOD flag, report) on the
    features in the cache, float32 as the report always is: what is missing is embedded once
    and added, so a run on the same scans embeds nothing."""
    digests: dict[int, str] = {}  # the loaded model's, hashed once

    def outputs_of(
        model: nn.Module, checkpoint: CheckpointConfig, samples: Sequence[Sample], desc: str
    ) -> Outputs:
        if id(model) not in digests:
            digests[id(model)] = weights_digest(model)
        found = cached_features(
            model,
            samples,
            checkpoint.preprocessing,
            feature_cache_dir(config),
            device,
            digest=digests[id(model)],
            batch_size=config.batch_size,
            workers=workers,
            progress=config.progress,
            desc=f"embedding {desc}",
        )
        return head_outputs(model, found)

    return outputs_of


def _speed_line(facts: dict[str, Any], images: int, dist: Dist) -> str:
    """What the probe cost: embedding (against a bare forward) and fitting."""
    if facts["images_embedded"]:
        speed = (
            f"embedded {facts['images_embedded']} images in {facts['embedding_seconds']:.1f} s "
            f"({facts['embedding_images_per_s']:.1f} img/s on {dist.world_size} process(es); "
            f"a bare forward: {facts['bare_forward_images_per_s']:.1f} img/s per process)"
        )
    else:
        speed = "nothing to embed"
    return (
        f"probe: {images} train+val images, {facts['images_cached']} from the feature cache, "
        f"{speed}; fitted in {facts['fit_seconds']:.2f} s, C = {facts['C']:g}"
    )
