"""MIRAGE as timm models, its checkpoint filter, baselines and fine-tuning modes.

MIRAGE's encoder is timm's stock :class:`~timm.models.vision_transformer.VisionTransformer`
(patch 32, one input channel, one global token, fixed 2-D sin-cos position embedding on the
patches only, pre-norm blocks with LayerNorm eps 1e-6). Importing this module registers:

=============================  =====  =====  =====  ===========================
name                           dim    depth  heads  weights
=============================  =====  =====  =====  ===========================
``mirage_base_patch32_512``    768    12     12     ``j-morano/MIRAGE-Base``
``mirage_large_patch32_512``   1024   24     16     ``j-morano/MIRAGE-Large``
``mirage_tiny_patch32_512``    192    6      3      none (demo model and tests)
=============================  =====  =====  =====  ===========================

so ``timm.create_model("mirage_base_patch32_512", pretrained=True, num_classes=4)`` downloads
the official weights from the Hugging Face Hub, and
``pretrained_cfg_overlay=dict(file="MIRAGE-Base.pth")`` loads a local copy; both go through
:func:`checkpoint_filter_fn`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn

__all__ = [
    "MIRAGE_LICENSE",
    "FinetuneMode",
    "HubWeights",
    "WeightsUnavailableError",
    "checkpoint_filter_fn",
    "configure_finetuning",
    "cpu_computes_bf16",
    "create_classifier",
    "features_and_logits",
    "hub_weights",
    "is_mirage",
    "load_mirage_state_dict",
    "optimizer_param_groups",
    "set_training_mode",
]

MIRAGE_LICENSE = "cc-by-nc-nd-4.0"
MIRAGE_PAPER = "arXiv:2506.08900"
FinetuneMode = Literal["linear", "last-k", "full"]

# Keys of the new classifier (norm on every token + linear head): never in a MIRAGE checkpoint.
_NEW_HEAD_PREFIXES = ("norm.", "fc_norm.", "head.")
# Parts of a MIRAGE checkpoint that a B-scan classifier does not use.
_UNUSED_PREFIXES = ("input_adapters.slo.", "input_adapters.bscanlayermap.", "output_adapters.")


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """The preprocessing contract of a MIRAGE-style model.

    Grayscale, bilinear resize to ``input_size`` (no crop), per-image min-max to [0, 1];
    mean 0 and std 1 mean no further normalisation (see :mod:`mirage_demo.data`).
    """
    return {
        "num_classes": 0,
        "input_size": (1, 512, 512),
        "fixed_input_size": True,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "mean": (0.0,),
        "std": (1.0,),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "paper_name": "MIRAGE: Multimodal foundation model and benchmark for comprehensive "
        "retinal OCT image analysis",
        "paper_ids": MIRAGE_PAPER,
        "origin_url": "https://github.com/j-morano/MIRAGE",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "mirage_base_patch32_512.mirage": _cfg(
            hf_hub_id="j-morano/MIRAGE-Base",
            hf_hub_filename="model.safetensors",
            license=MIRAGE_LICENSE,
        ),
        "mirage_large_patch32_512.mirage": _cfg(
            hf_hub_id="j-morano/MIRAGE-Large",
            hf_hub_filename="model.safetensors",
            license=MIRAGE_LICENSE,
        ),
        # No published weights: MIRAGE's architecture at a CPU-friendly size, trained from
        # scratch. Its input is standardised with the mean and std of min-maxed Kermany scans:
        # on raw [0, 1] input the patch signal is far weaker than the fixed sin-cos position
        # embedding and a from-scratch model stays at chance for epochs.
        "mirage_tiny_patch32_512": _cfg(
            license="apache-2.0", paper_name=None, paper_ids=None, mean=(0.2,), std=(0.2,)
        ),
    }
)


def is_mirage(model: nn.Module) -> bool:
    """Whether ``model`` was built from one of the ``mirage_*`` architectures."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture", "")).startswith("mirage_")


# --------------------------------------------------------------------------------------------
# Reading MIRAGE's files without unpickling arbitrary objects


class _InertGlobal:
    """Stand-in for a class named in a pickle that we refuse to import (e.g. in ``args``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


@contextlib.contextmanager
def _safe_pickle_globals(path: str | Path | None) -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` read a MIRAGE release ``.pth``.

    Its ``args`` entry is an ``argparse.Namespace`` that may hold other objects (paths, numpy
    scalars). Those are rebuilt as inert placeholders instead of importing their classes, so
    nothing outside torch's allow-list ever runs.
    """
    allowed: list[Any] = [argparse.Namespace]
    if path is not None and Path(path).is_file() and not str(path).endswith(".safetensors"):
        for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
            if name != "argparse.Namespace":
                allowed.append((type(name, (_InertGlobal,), {}), name))
    with torch.serialization.safe_globals(allowed):
        yield


def load_mirage_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a MIRAGE checkpoint file (Hub ``.safetensors`` or release ``.pth``), unfiltered."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MIRAGE weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    with _safe_pickle_globals(path):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(checkpoint).__name__}")
    return dict(checkpoint)


# --------------------------------------------------------------------------------------------
# Checkpoint filter

_ENCODER_KEY = re.compile(r"^encoder\.(\d+)\.(.+)$")


def _map_mirage_key(key: str) -> str | None:
    """timm name of a MIRAGE encoder key, ``None`` for parts we drop, ``""`` if unknown."""
    if key.startswith(_UNUSED_PREFIXES):
        return None
    if key == "input_adapters.bscan.pos_emb":
        return "pos_embed"
    if key.startswith("input_adapters.bscan.proj."):
        return "patch_embed.proj." + key.removeprefix("input_adapters.bscan.proj.")
    if key == "global_tokens":
        return "cls_token"
    match = _ENCODER_KEY.match(key)
    if match:
        return f"blocks.{match.group(1)}.{match.group(2)}"
    return ""


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: VisionTransformer
) -> dict[str, torch.Tensor]:
    """Map any MIRAGE checkpoint onto ``model``'s state dict.

    Accepts the GitHub release ``.pth`` contents (``{"model": ..., "args": ...}``), the Hub
    safetensors (keys prefixed ``model.``, with ``bscan`` and ``slo`` adapters) and an already
    converted timm state dict. The new classifier (``norm``, ``head``) keeps ``model``'s own
    initialisation when the checkpoint has none. Anything else missing, unknown or of the wrong
    shape raises ``ValueError`` naming the keys. ``state_dict`` and ``model`` are not modified.
    """
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
    converted = "patch_embed.proj.weight" in state_dict or any(
        k.startswith("blocks.") for k in state_dict
    )

    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    grid: tuple[int, int] | None = None
    for key, value in state_dict.items():
        name = key if converted else _map_mirage_key(key)
        if name is None:
            continue
        if not name:
            unknown.append(key)
            continue
        if name == "pos_embed" and value.ndim == 4:  # (1, D, H, W) -> (1, H*W, D)
            grid = (value.shape[-2], value.shape[-1])
            value = value.flatten(2).transpose(1, 2).contiguous()
        out[name] = value

    expected = model.state_dict()
    if "pos_embed" in out and "pos_embed" in expected:
        out["pos_embed"] = _fit_pos_embed(out["pos_embed"], expected["pos_embed"], model, grid)
    if "cls_token" in out and out["cls_token"].shape[1] != 1:
        raise ValueError(
            f"checkpoint has {out['cls_token'].shape[1]} global tokens; MIRAGE models use one"
        )

    missing, wrong_shape = [], []
    for key, target in expected.items():
        if key not in out:
            if key.startswith(_NEW_HEAD_PREFIXES):
                out[key] = target  # the new classifier keeps its fresh initialisation
            else:
                missing.append(key)
        elif out[key].shape != target.shape:
            wrong_shape.append(
                f"{key}: checkpoint {tuple(out[key].shape)} vs model {tuple(target.shape)}"
            )
    unknown += [k for k in out if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:4])})")
    if unknown:
        problems.append(f"unknown keys {', '.join(unknown[:6])}")
    if wrong_shape:
        problems.append("wrong shapes: " + "; ".join(wrong_shape[:4]))
    if problems:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "this model")
        raise ValueError(
            f"checkpoint does not fit {arch} (is it the right size?): " + " | ".join(problems)
        )
    return out


def _fit_pos_embed(
    pos_embed: torch.Tensor,
    target: torch.Tensor,
    model: VisionTransformer,
    grid: tuple[int, int] | None,
) -> torch.Tensor:
    """Resample a patch position embedding to the model's grid (MIRAGE interpolates too)."""
    if pos_embed.shape == target.shape or pos_embed.shape[-1] != target.shape[-1]:
        return pos_embed  # equal, or a different width: reported as a shape error
    old = grid or (int(pos_embed.shape[1] ** 0.5),) * 2
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    return resample_abs_pos_embed(
        pos_embed, new_size=model.patch_embed.grid_size, old_size=old, num_prefix_tokens=prefix
    )


# --------------------------------------------------------------------------------------------
# Model builders


def _create_mirage(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    global_pool = kwargs.setdefault("global_pool", "avg")
    if global_pool not in ("avg", "token"):
        raise ValueError(f"MIRAGE pooling is 'avg' (MIRAGE's own) or 'token', not {global_pool!r}")
    kwargs.setdefault("fc_norm", False)  # norm on every token, then pool (MIRAGE's classifier)
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    file = overlay.get("file") if pretrained else None
    with _safe_pickle_globals(file):
        model = build_model_with_cfg(
            VisionTransformer,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            **kwargs,
        )
    if not pretrained:  # MIRAGE's position embedding is a fixed 2-D sin-cos table
        grid = model.patch_embed.grid_size
        table = build_sincos2d_pos_embed(list(grid), dim=model.embed_dim)
        model.pos_embed.data.copy_(table.unsqueeze(0))
    model.pos_embed.requires_grad_(False)
    height, width = model.patch_embed.img_size
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (model.in_chans, height, width)}
    return model


def _mirage_args(embed_dim: int, depth: int, num_heads: int) -> dict[str, Any]:
    return dict(
        img_size=512,
        patch_size=32,
        in_chans=1,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        class_token=True,
        no_embed_class=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


@register_model
def mirage_base_patch32_512(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MIRAGE-Base encoder (ViT-B/32 at 512x512, one channel)."""
    args = _mirage_args(768, 12, 12)
    return _create_mirage("mirage_base_patch32_512", pretrained, **dict(args, **kwargs))


@register_model
def mirage_large_patch32_512(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MIRAGE-Large encoder (ViT-L/32 at 512x512, one channel)."""
    args = _mirage_args(1024, 24, 16)
    return _create_mirage("mirage_large_patch32_512", pretrained, **dict(args, **kwargs))


@register_model
def mirage_tiny_patch32_512(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """MIRAGE's architecture, narrow and shallow: the CPU demo model and tests."""
    args = _mirage_args(192, 6, 3)
    return _create_mirage("mirage_tiny_patch32_512", pretrained, **dict(args, **kwargs))


def create_classifier(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Any timm model as a one-channel OCT classifier.

    ``weights`` is a local file (MIRAGE ``.pth``/``.safetensors``, or a timm checkpoint) that
    replaces the registry's download; it implies ``pretrained``. Baselines (``resnet50``,
    ``convnext_tiny``, ``efficientnetv2_rw_s``, ``vit_small_patch16_224``...) get ``in_chans=1``.
    """
    if name not in timm.list_models():
        raise ValueError(f"unknown architecture {name!r} (see timm.list_models())")
    kwargs.setdefault("in_chans", 1)
    if weights is not None:
        pretrained = True
        overlay: dict[str, Any] = dict(file=str(weights))
        input_size = _source_input_size(name, Path(weights))
        if input_size is not None:  # e.g. a one-channel checkpoint of this project
            overlay["input_size"] = input_size
        kwargs["pretrained_cfg_overlay"] = overlay
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The penultimate features ``(B, D)`` (timm's pre-logits: pooled, after the final norm) and
    the logits ``(B, K)`` from one forward pass, the same as ``model(x)``. A model without
    timm's ``forward_features``/``forward_head``/``get_classifier`` gives ``(B, 0)`` features."""
    if not all(hasattr(model, a) for a in ("forward_features", "forward_head", "get_classifier")):
        logits = model(x)
        return logits.new_zeros(len(x), 0), logits
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    return features.flatten(1), model.get_classifier()(features)


def _source_input_size(name: str, weights: Path) -> tuple[int, ...] | None:
    """The registry's input size with the channels of the first convolution stored in a
    ``.safetensors`` file (read from its header; None when unknown), so timm adapts the stem
    from what the file really holds."""
    from safetensors import safe_open

    cfg = resolve_pretrained_cfg(name)
    if weights.suffix != ".safetensors" or not isinstance(cfg.first_conv, str):
        return None
    with safe_open(str(weights), framework="pt") as handle:
        key, stored = f"{cfg.first_conv}.weight", set(handle.keys())
        if key not in stored:
            return None
        shape = handle.get_slice(key).get_shape()
    return (int(shape[1]), *cfg.input_size[1:]) if len(shape) == 4 else None


class WeightsUnavailableError(ValueError):
    """A registered architecture's weights cannot be had here; the message says what to do."""


@dataclass(frozen=True)
class HubWeights:
    """A registered architecture's weights file, as stored in the Hugging Face cache."""

    name: str  # the registry's ``architecture.tag``
    repo_id: str  # from the registry, never from a checkpoint
    filename: str
    revision: str  # the Hub commit the file belongs to
    path: Path
    sha256: str


def registered_hub_weights(name: str) -> tuple[str, str, str]:
    """``(architecture.tag, repo id, file name)`` of the Hub weights timm's registry names for
    ``name`` (an architecture, or ``architecture.tag``); ``ValueError`` when it names none."""
    try:
        cfg = resolve_pretrained_cfg(name)
    except Exception as err:  # timm raises RuntimeError or KeyError for unknown names
        raise ValueError(f"{name!r} is not a registered timm architecture") from err
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f"timm's registry names no Hugging Face Hub weights for {name!r}")
    repo_id = str(cfg.hf_hub_id).partition("@")[0]
    return f"{cfg.architecture}.{cfg.tag}", repo_id, cfg.hf_hub_filename or "model.safetensors"


def hub_weights(name: str, revision: str | None = None) -> HubWeights:
    """The registry's Hub weights for ``name``, fetched through the Hugging Face cache like
    ``pretrained=True`` (offline with ``HF_HUB_OFFLINE=1`` once cached), with their commit and
    SHA-256. Not cached and the Hub unreachable: :class:`WeightsUnavailableError`, one line
    naming the repo to download."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    tagged, repo_id, filename = registered_hub_weights(name)
    pinned = f" --revision {revision}" if revision else ""
    try:
        path = Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError as err:
        raise WeightsUnavailableError(
            f"the weights of {tagged} ({repo_id}) are not in the Hugging Face cache and the Hub "
            f"cannot be reached (offline?): download them once with network access, e.g. "
            f"`hf download {repo_id} {filename}{pinned}`"
        ) from err
    except HfHubHTTPError as err:
        reason = " ".join(str(err).split())[:200]
        raise WeightsUnavailableError(f"cannot download {repo_id}: {reason}") from err
    parts = path.parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else (revision or "")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return HubWeights(tagged, repo_id, filename, commit, path, digest.hexdigest())


def pretrained_source(name: str) -> dict[str, Any]:
    """Where the registry's weights for ``name`` come from, and their license."""
    cfg = resolve_pretrained_cfg(name).to_dict()
    return {k: cfg[k] for k in ("hf_hub_id", "url", "license", "paper_ids") if cfg.get(k)}


# --------------------------------------------------------------------------------------------
# Fine-tuning modes and optimiser parameter groups


def classifier_parameter_names(model: nn.Module) -> list[str]:
    """Parameters of the new classifier: final norm(s) and head."""
    return [n for n, _ in model.named_parameters() if n.startswith(_NEW_HEAD_PREFIXES)] or [
        n
        for n, _ in model.named_parameters()
        if n.startswith(model.pretrained_cfg.get("classifier", "head") + ".")
    ]


def configure_finetuning(model: nn.Module, mode: FinetuneMode = "full", last_k: int = 2) -> int:
    """Set ``requires_grad`` for a fine-tuning mode; returns the number of trainable parameters.

    - ``linear``: the new norm and head only (MIRAGE's linear probe).
    - ``last-k``: the last ``last_k`` transformer blocks (or CNN stages) and the head.
    - ``full``: everything, except MIRAGE's fixed sin-cos position embedding.
    """
    if mode not in ("linear", "last-k", "full"):
        raise ValueError(f"fine-tuning mode must be linear, last-k or full, not {mode!r}")
    head = set(classifier_parameter_names(model))
    trainable: set[str] = set(head)
    if mode == "full":
        trainable = {n for n, _ in model.named_parameters()}
    elif mode == "last-k":
        if last_k < 1:
            raise ValueError("last-k fine-tuning needs --last-k >= 1")
        layer_of = _layer_ids(model)
        top = max(layer_of.values())
        trainable |= {n for n, layer in layer_of.items() if layer > top - 1 - last_k}
    if is_mirage(model):
        trainable.discard("pos_embed")
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
        count += param.numel() if name in trainable else 0
    return count


def set_training_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, with every fully frozen part in eval mode.

    Frozen layers then run as at inference: batch-norm statistics stay those the weights were
    trained with and stochastic depth is off, as a linear probe or classifier re-training expects.
    """
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
    return model


def _layer_ids(model: nn.Module) -> dict[str, int]:
    """Layer index of every parameter (stem 0, blocks 1..N, head N+1) from timm's group matcher."""
    from timm.models._manipulate import group_parameters

    if hasattr(model, "group_matcher"):
        return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    from timm.optim._param_groups import auto_group_layers

    return auto_group_layers(model)


def optimizer_param_groups(
    model: nn.Module, weight_decay: float = 0.01, layer_decay: float | None = 0.75
) -> list[dict[str, Any]]:
    """AdamW parameter groups: layer-wise lr decay (``lr_scale``) and no weight decay on norms,
    biases, position embedding and tokens. Frozen parameters are left out."""
    no_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    if layer_decay is None or layer_decay >= 1.0:
        groups: dict[bool, list[nn.Parameter]] = {True: [], False: []}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups[param.ndim > 1 and name not in no_decay].append(param)
        return [
            {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": 1.0}
            for decay, params in groups.items()
            if params
        ]
    return param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay
    )


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX) through oneDNN."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
