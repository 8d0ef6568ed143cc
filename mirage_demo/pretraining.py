"""MIRAGE's pre-training model: its GitHub release weights with their decoders, and our own
masked-autoencoder checkpoints (``python -m train --mode pretrain``).

::

    from mirage_demo.pretraining import load_release, release_path, visible_patches

    model = load_release(release_path("mirage_base"))   # downloaded once, SHA-256 checked
    visible = visible_patches(len(bscans), ratio=0.75, seed=0)
    out = model.reconstruct(bscans, visible)   # bscans: (B, 1, 512, 512) in [0, 1]
    out["bscan"], out["slo"], out["bscanlayermap"]   # rebuilt B-scan, SLO, 13-class logits

A release file (``MIRAGE-Base.pth``, ``MIRAGE-Large.pth``: ``{"model": ..., "args": ...}``)
is read with ``torch.load(weights_only=True)`` allowing one class, ``argparse.Namespace``;
any other pickled object is refused. MIRAGE publishes no checksums: the first download's
SHA-256 is recorded next to the file and every later load must match it (trust on first use),
or the one pinned with ``MIRAGE_BASE_SHA256`` / ``MIRAGE_LARGE_SHA256``.

Our checkpoints are a folder: ``encoder.safetensors`` (the timm encoder, without the final
norm it does not use), ``decoder.safetensors`` (the B-scan decoder) and ``config.json``
(untrusted data: every field is checked). MIRAGE's weights are never written into one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file

from mirage_demo.cache import default_cache_dir
from mirage_demo.decoders import MaskedReconstructor, PatchDecoder, visible_patches
from mirage_demo.fileio import atomic_write, atomic_write_text
from mirage_demo.models import checkpoint_filter_fn, create_classifier

__all__ = [
    "LAYER_NAMES",
    "LAYER_NOTE",
    "RELEASES",
    "PretrainingError",
    "create_pretraining_model",
    "is_pretraining_checkpoint",
    "load_encoder_weights",
    "load_pretraining",
    "load_release",
    "pretrained_classifier",
    "release_path",
    "save_pretraining",
    "visible_patches",
]

#: Registered names of MIRAGE's release weights: name -> (file, architecture).
RELEASES = {
    "mirage_base": ("MIRAGE-Base.pth", "mirage_base_patch32_512"),
    "mirage_large": ("MIRAGE-Large.pth", "mirage_large_patch32_512"),
}
RELEASE_URL = "https://github.com/j-morano/MIRAGE/releases/download/weights/{file}"
#: MIRAGE's modalities in its input order, and what each decoder outputs:
#: (channels, patch side) over a 16x16 grid (B-scan and SLO 512x512, layer map 128x128).
RELEASE_MODALITIES = ("bscan", "slo", "bscanlayermap")
RELEASE_OUTPUTS = {"bscan": (1, 32), "slo": (1, 32), "bscanlayermap": (13, 8)}
#: MIRAGE's 13 layer-map classes by number: its code and documentation do not name them
#: (its issue #3 asks for a mapping to other data sets' layers), so neither do we.
LAYER_NAMES: tuple[str, ...] = tuple(f"layer class {i}" for i in range(13))
LAYER_NOTE = (
    "MIRAGE numbers its 13 layer classes (automatic labels it was pre-trained on) but does "
    "not publish their names; the colours show where the model places each class."
)

FORMAT = "mirage-demo-pretraining"
FORMAT_VERSION = 1
CONFIG_NAME, ENCODER_NAME, DECODER_NAME = (
    "config.json",
    "encoder.safetensors",
    "decoder.safetensors",
)
MAX_CONFIG_BYTES = 1_000_000
_UNUSED_ENCODER_PREFIXES = ("norm.", "fc_norm.", "head.")
#: Encoder arguments a pre-training checkpoint may record, with their allowed ranges.
ENCODER_KWARGS = {"img_size": (32, 2048), "depth": (1, 64)}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PretrainingError(ValueError):
    """A release file or pre-training checkpoint that cannot be used: one line says why."""


# --------------------------------------------------------------------------------------------
# Building


def create_pretraining_model(
    architecture: str,
    decoder_dim: int = 256,
    decoder_depth: int = 2,
    decoder_heads: int = 8,
    drop_path: float = 0.0,
    **encoder_kwargs: int,
) -> MaskedReconstructor:
    """A MIRAGE-style encoder (``mirage_*`` timm architecture, randomly initialised) with one
    B-scan decoder shaped like MIRAGE's (MIRAGE: 256 wide, 2 blocks, 8 heads).
    ``encoder_kwargs``: ``img_size`` and ``depth`` (smaller test models)."""
    if not architecture.startswith("mirage_") or architecture not in timm.list_models("mirage_*"):
        raise PretrainingError(f"masked pre-training needs a mirage_* model, not {architecture!r}")
    unknown = set(encoder_kwargs) - set(ENCODER_KWARGS)
    if unknown:
        raise PretrainingError(f"unsupported encoder arguments: {', '.join(sorted(unknown))}")
    encoder = timm.create_model(
        architecture, num_classes=0, drop_path_rate=drop_path, **encoder_kwargs
    )
    grid = tuple(encoder.patch_embed.grid_size)
    patch = int(encoder.patch_embed.patch_size[0])
    decoder = PatchDecoder(
        encoder.embed_dim, decoder_dim, decoder_depth, decoder_heads, 1, patch, grid, ("bscan",)
    )
    cfg = encoder.pretrained_cfg
    return MaskedReconstructor(
        encoder, {"bscan": decoder}, [("bscan", grid)], cfg["mean"][0], cfg["std"][0]
    )


def encoder_state(model: MaskedReconstructor) -> dict[str, torch.Tensor]:
    """The encoder's tensors a classifier uses (timm names; not the unused final norm)."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.encoder.state_dict().items()
        if not k.startswith(_UNUSED_ENCODER_PREFIXES)
    }


# --------------------------------------------------------------------------------------------
# Our checkpoints


def save_pretraining(directory: str | Path, model: MaskedReconstructor, info: dict) -> Path:
    """Write ``encoder.safetensors``, ``decoder.safetensors`` and ``config.json`` (each
    atomically). ``info`` holds the rest of the record (see :func:`read_pretraining_config`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    decoder = model.decoders["bscan"]
    encoder = encoder_state(model)
    decoder_tensors = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    meta = {"format": FORMAT}
    atomic_write(directory / ENCODER_NAME, lambda tmp: save_file(encoder, tmp, metadata=meta))
    atomic_write(
        directory / DECODER_NAME, lambda tmp: save_file(decoder_tensors, tmp, metadata=meta)
    )
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **info,
        "decoder": {
            "dim": decoder.mask_token.shape[-1],
            "depth": len(decoder.decoder_transformer),
            "num_heads": decoder.decoder.num_heads,
        },
    }
    atomic_write_text(directory / CONFIG_NAME, json.dumps(record, indent=2) + "\n")
    return directory


def is_pretraining_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds one of our pre-training checkpoints (by its files)."""
    directory = Path(directory)
    return all((directory / name).is_file() for name in (CONFIG_NAME, ENCODER_NAME))


def read_pretraining_config(directory: str | Path) -> dict[str, Any]:
    """A pre-training checkpoint's ``config.json``, checked: ``architecture`` (a registered
    ``mirage_*`` model), ``decoder`` (``dim``, ``depth``, ``num_heads``), ``mask_ratio``, and
    free text (``description``, ``license``) kept short."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise PretrainingError(f"{directory} is not a pre-training checkpoint: no {CONFIG_NAME}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise PretrainingError(f"{path} is larger than {MAX_CONFIG_BYTES:,} bytes: not a config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise PretrainingError(f"{path} is not valid JSON ({str(err).split(';')[0]})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PretrainingError(f"{path} is not a pre-training record (format {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise PretrainingError(f"{path}: format version {data.get('format_version')!r} unknown")
    architecture = data.get("architecture")
    if not isinstance(architecture, str) or architecture not in timm.list_models("mirage_*"):
        raise PretrainingError(f"{path}: architecture must be a mirage_* model")
    decoder = data.get("decoder")
    bounds = {"dim": (8, 4096), "depth": (0, 16), "num_heads": (1, 64)}
    if not isinstance(decoder, dict) or set(decoder) != set(bounds):
        raise PretrainingError(f"{path}: decoder must give dim, depth and num_heads")
    for key, (low, high) in bounds.items():
        value = decoder[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise PretrainingError(f"{path}: decoder {key} must be an integer in [{low}, {high}]")
    if decoder["dim"] % decoder["num_heads"]:
        raise PretrainingError(f"{path}: decoder dim is not divisible by its heads")
    kwargs = data.get("encoder_kwargs", {})
    if not isinstance(kwargs, dict) or set(kwargs) - set(ENCODER_KWARGS):
        raise PretrainingError(f"{path}: encoder_kwargs may hold only {', '.join(ENCODER_KWARGS)}")
    for key, value in kwargs.items():
        low, high = ENCODER_KWARGS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise PretrainingError(f"{path}: encoder {key} must be an integer in [{low}, {high}]")
    ratio = data.get("mask_ratio", 0.75)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise PretrainingError(f"{path}: mask_ratio must be a number in [0, 1]")
    for key in ("description", "license", "data_name"):
        value = data.get(key, "")
        if not isinstance(value, str) or len(value) > 2000:
            raise PretrainingError(f"{path}: {key} must be a short text")
    return data


def load_pretraining(directory: str | Path) -> tuple[MaskedReconstructor, dict[str, Any]]:
    """Our pre-training checkpoint as a :class:`MaskedReconstructor` (float32, eval mode) and
    its checked ``config.json``."""
    directory = Path(directory)
    config = read_pretraining_config(directory)
    decoder = config["decoder"]
    model = create_pretraining_model(
        config["architecture"],
        decoder["dim"],
        decoder["depth"],
        decoder["num_heads"],
        **config.get("encoder_kwargs", {}),
    )
    load_encoder_weights(model.encoder, directory)
    path = directory / DECODER_NAME
    if not path.is_file():
        raise PretrainingError(f"{directory} has no {DECODER_NAME}: it cannot reconstruct")
    _load_strict(model.decoders["bscan"], _read_safetensors(path), path)
    return model.float().eval(), config


def load_encoder_weights(encoder: torch.nn.Module, directory: str | Path) -> None:
    """Load a pre-training checkpoint's encoder into ``encoder`` (a timm ViT of the same
    architecture; its final norm and head keep their own initialisation)."""
    path = Path(directory) / ENCODER_NAME
    if not path.is_file():
        raise PretrainingError(f"{directory} is not a pre-training checkpoint: no {ENCODER_NAME}")
    state = _read_safetensors(path)
    expected = {
        k: v for k, v in encoder.state_dict().items() if not k.startswith(_UNUSED_ENCODER_PREFIXES)
    }
    _check_tensors(state, expected, path)
    encoder.load_state_dict(state, strict=False)


def pretrained_classifier(
    directory: str | Path, num_classes: int
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A classifier of the checkpoint's architecture whose encoder is the pre-trained one (a
    fresh final norm and ``num_classes`` head), in eval mode, and the checked ``config.json``."""
    config = read_pretraining_config(directory)
    model = create_classifier(
        config["architecture"], num_classes, **config.get("encoder_kwargs", {})
    )
    load_encoder_weights(model, directory)
    return model.eval(), config


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # a truncated or foreign file
        raise PretrainingError(f"{path} is not a readable safetensors file ({err})") from err


def _check_tensors(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: object
) -> None:
    """Refuse missing, unknown or wrongly shaped tensors, naming a few."""
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}")
    if unknown:
        problems.append(f"unknown {', '.join(unknown[:4])}")
    if shapes:
        problems.append(f"wrong shapes {'; '.join(shapes[:3])}")
    if problems:
        raise PretrainingError(f"{source} does not fit the model: " + " | ".join(problems))


def _load_strict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: object
) -> None:
    _check_tensors(state, module.state_dict(), source)
    with torch.no_grad():
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


# --------------------------------------------------------------------------------------------
# MIRAGE's release files


def read_release(path: str | Path) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    """The ``model`` tensors and ``args`` of a release ``.pth``, unpickled with only
    ``argparse.Namespace`` allowed beyond torch's tensors and plain values."""
    path = Path(path)
    if not path.is_file():
        raise PretrainingError(f"MIRAGE release weights not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for any other global, or a broken file
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        reason = (
            f"it holds a pickled {refused.group(1)} (only argparse.Namespace is allowed), "
            "so it was not loaded"
            if refused
            else " ".join(str(err).split())[:200]
        )
        raise PretrainingError(
            f"{path} is not a MIRAGE release file we can read: {reason}"
        ) from err
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        raise PretrainingError(f"{path} is not a MIRAGE release file: no 'model' dictionary")
    state = {k: v for k, v in checkpoint["model"].items() if isinstance(v, torch.Tensor)}
    args = checkpoint.get("args")
    return state, args if isinstance(args, argparse.Namespace) else None


def load_release(path: str | Path) -> MaskedReconstructor:
    """MIRAGE's pre-training model from a release ``.pth``: the encoder and the ``bscan``,
    ``slo`` and ``bscanlayermap`` decoders (float32, eval mode), in this project's code."""
    state, args = read_release(path)
    key = "input_adapters.bscan.proj.weight"
    if key not in state:
        raise PretrainingError(f"{path} is not a MIRAGE release file: no {key}")
    heads = getattr(args, "decoder_num_heads", 8)
    if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= 64:
        raise PretrainingError(f"{path}: args.decoder_num_heads must be a small integer")
    width = state[key].shape[0]
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("encoder.")), default=-1)
    sizes = {(768, 12): "mirage_base_patch32_512", (1024, 24): "mirage_large_patch32_512"}
    if (width, depth) not in sizes:
        raise PretrainingError(f"{path}: a {width}-wide, {depth}-block encoder is no MIRAGE size")
    encoder = timm.create_model(sizes[width, depth], num_classes=0)
    try:
        encoder.load_state_dict(checkpoint_filter_fn(state, encoder))
    except ValueError as err:
        raise PretrainingError(f"{path}: {err}") from err
    modalities = [m for m in RELEASE_MODALITIES if f"input_adapters.{m}.pos_emb" in state]
    decoders = {
        task: _release_decoder(state, task, width, heads, path)
        for task in RELEASE_MODALITIES
        if f"output_adapters.{task}.out_proj.weight" in state
    }
    if "bscan" not in decoders:
        raise PretrainingError(f"{path} holds no B-scan decoder (output_adapters.bscan)")
    grids = [(m, (16, 16)) for m in modalities]
    return MaskedReconstructor(encoder, decoders, grids).float().eval()


def _release_decoder(
    state: Mapping[str, torch.Tensor], task: str, width: int, heads: int, path: object
) -> PatchDecoder:
    prefix = f"output_adapters.{task}."
    tensors = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    channels, patch = RELEASE_OUTPUTS[task]
    dim = tensors["mask_token"].shape[-1] if "mask_token" in tensors else 0
    if dim == 0 or dim % heads:
        raise PretrainingError(f"{path}: the {task} decoder's width does not fit {heads} heads")
    depth = len({k.split(".")[1] for k in tensors if k.startswith("decoder_transformer.")})
    contexts = sorted({k.split(".")[1] for k in tensors if k.startswith("task_embeddings.")})
    grid = tuple(tensors["pos_emb"].shape[-2:]) if "pos_emb" in tensors else (16, 16)
    decoder = PatchDecoder(width, dim, depth, heads, channels, patch, grid, contexts)
    _load_strict(decoder, tensors, f"{path} ({task} decoder)")
    return decoder


def _releases_dir() -> Path:
    """``$MIRAGE_DEMO_RELEASES``, else next to the image cache (``~/.cache/mirage-demo``)."""
    if os.environ.get("MIRAGE_DEMO_RELEASES"):
        return Path(os.environ["MIRAGE_DEMO_RELEASES"])
    return default_cache_dir().parent / "releases"


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "MIRAGE_DEMO_OFFLINE")
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def release_path(name: str, sha256: str | None = None, url: str | None = None) -> Path:
    """The cached release file of a registered name (``mirage_base``, ``mirage_large``),
    downloaded on first use, its SHA-256 checked.

    The hash to match is ``sha256``, else ``$MIRAGE_BASE_SHA256`` / ``$MIRAGE_LARGE_SHA256``,
    else the one recorded at the first download (``<file>.sha256`` beside it). Offline
    (``HF_HUB_OFFLINE=1`` or ``MIRAGE_DEMO_OFFLINE=1``) or unreachable, a missing file is one
    line naming the URL to fetch. ``url`` replaces the release URL (tests, mirrors).
    """
    if name not in RELEASES:
        raise PretrainingError(f"unknown MIRAGE release {name!r}: one of {', '.join(RELEASES)}")
    file = RELEASES[name][0]
    url = url or RELEASE_URL.format(file=file)
    pinned = sha256 or os.environ.get(f"{name.upper()}_SHA256") or None
    if pinned is not None and not _SHA256.match(pinned.lower()):
        raise PretrainingError(f"the pinned SHA-256 of {file} is not 64 hex digits: {pinned!r}")
    folder = _releases_dir()
    path, record = folder / file, folder / f"{file}.sha256"
    if not path.is_file():
        _download(url, path)
    digest = _file_sha256(path)
    expected = pinned.lower() if pinned else None
    if expected is None and record.is_file():
        expected = record.read_text().strip() or None
    if expected is not None and digest != expected:
        raise PretrainingError(
            f"{path} has SHA-256 {digest}, expected {expected}: delete it to download it again "
            f"from {url}"
        )
    if not record.is_file():  # trust on first use: later loads must match this file
        atomic_write_text(record, digest + "\n")
    return path


def _download(url: str, path: Path) -> None:
    if _offline():
        raise PretrainingError(
            f"{path.name} is not cached and downloads are off (offline): fetch {url} into "
            f"{path.parent} with network access"
        )
    path.parent.mkdir(parents=True, exist_ok=True)

    def fetch(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as handle:
            for block in iter(lambda: response.read(1 << 20), b""):
                handle.write(block)

    try:
        atomic_write(path, fetch)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = " ".join(str(getattr(err, "reason", err)).split())[:200]
        raise PretrainingError(
            f"cannot download {url} ({reason}): offline? fetch it by hand into {path.parent}"
        ) from err
