"""Self-describing fine-tuned checkpoints: a directory, never a pickle.

::

    my-model/
      model.safetensors   weights (timm state dict)
      config.json         architecture, class names, preprocessing, temperature, training
      uncertainty.safetensors   optional: the out-of-distribution statistics and conformal
                          calibration scores (mirage_demo.uncertainty; summary in config.json)
      metrics.json, predictions.csv, *.png   optional evaluation report

Loadable from a local directory or a Hugging Face Hub repo id (downloaded once into the Hub
cache, then usable offline with ``HF_HUB_OFFLINE=1``), and pushable to the Hub.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mirage_demo.data import DataError, Preprocessing, SplitSpec
from mirage_demo.fileio import atomic_write, atomic_write_text
from mirage_demo.models import (
    WeightsUnavailableError,
    classifier_parameter_names,
    create_classifier,
    hub_weights,
    registered_hub_weights,
)
from mirage_demo.version import __version__

__all__ = [
    "CONFIG_NAME",
    "UNCERTAINTY_NAME",
    "WEIGHTS_NAME",
    "BackboneRef",
    "CheckpointConfig",
    "CheckpointError",
    "load_checkpoint",
    "model_from_config",
    "push_to_hub",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "save_config",
    "validate_config",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
UNCERTAINTY_NAME = "uncertainty.safetensors"
FORMAT = "mirage-demo-checkpoint"
FORMAT_VERSION = 1
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
_HEX = {"revision": re.compile(r"^[0-9a-f]{40}$"), "sha256": re.compile(r"^[0-9a-f]{64}$")}
MAX_CONFIG_BYTES = 1_000_000  # a config.json is a few KB; refuse anything absurd unread

#: Architecture arguments a checkpoint may pass to ``timm.create_model``, with the values
#: allowed. Never weights locations (``pretrained``, ``pretrained_cfg(_overlay)``, ``file``,
#: ``url``, ``hf_hub_id``...): a checkpoint is data, and loading it must not fetch or read
#: anything else. Integers are inclusive ranges; tuples of strings are choices.
ALLOWED_MODEL_KWARGS: dict[str, Any] = {
    "in_chans": (1, 4),
    "img_size": (16, 4096),
    "patch_size": (1, 256),
    "depth": (1, 64),
    "embed_dim": (8, 4096),
    "num_heads": (1, 64),
    "mlp_ratio": (0.25, 16.0),
    "qkv_bias": bool,
    "class_token": bool,
    "no_embed_class": bool,
    "reg_tokens": (0, 64),
    "init_values": (0.0, 10.0),
    "global_pool": ("", "avg", "avgmax", "max", "token", "map", "avgtoken"),
    "drop_rate": (0.0, 1.0),
    "drop_path_rate": (0.0, 1.0),
}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
MAX_CLASSES = 1000
MAX_INPUT_SIDE = 2048  # model input side in pixels (MIRAGE: 512)
#: What one scan may cost a model a checkpoint declares, checked on the meta device before
#: any weights are read or downloaded: parameters (MIRAGE-Large: 303 M), tokens of a
#: transformer (MIRAGE at 512 px: 256; a ViT-L/16 at 1024 px: 4,096) and floating-point
#: operations of one forward pass (ResNet-18 at 512 px: 18 G; a ViT-L/16 at 512 px: 724 G).
MAX_PARAMETERS = 600_000_000
MAX_TOKENS = 4096
MAX_FORWARD_FLOPS = 1.0e12


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong."""


@dataclass(frozen=True)
class BackboneRef:
    """The frozen backbone of a head-only (probe) checkpoint, named by architecture: timm's
    registry says which Hub repo and file hold its weights (``weights`` is ``architecture.tag``);
    the checkpoint pins the commit and the file's SHA-256. Never a URL or a repo id: loading
    derives the repo from the registry, so a config.json cannot make the app fetch anything else.
    """

    weights: str
    revision: str
    sha256: str

    @property
    def repo_id(self) -> str:
        return registered_hub_weights(self.weights)[1]

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, architecture: str) -> BackboneRef:
        """From untrusted JSON: exactly these keys, hex digests, weights registered on the Hub
        for ``architecture``."""
        allowed = "a mapping of weights, revision (40 hex digits) and sha256 (64 hex digits)"
        if not isinstance(data, dict) or set(data) != set(cls.__dataclass_fields__):
            raise _bad("backbone", allowed, data)
        for key, pattern in _HEX.items():
            if not isinstance(data[key], str) or not pattern.match(data[key]):
                raise _bad(f"backbone.{key}", allowed, data[key])
        weights = data["weights"]
        valid = isinstance(weights, str) and weights.partition(".")[0] == architecture
        try:
            valid = valid and registered_hub_weights(weights)[0] == weights
        except ValueError:
            valid = False
        if not valid:
            raise _bad(
                "backbone.weights",
                f"'{architecture}.<tag>' with Hub weights in timm's registry",
                weights,
            )
        return cls(weights, data["revision"], data["sha256"])


@dataclass
class CheckpointConfig:
    """Everything needed to rebuild, run and describe a fine-tuned model."""

    architecture: str
    class_names: list[str]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    source_weights: dict[str, Any] = field(default_factory=dict)
    #: how the training data was split (``None``: not recorded); evaluation rebuilds it
    split: SplitSpec | None = None
    #: free-form provenance (resolved options, image counts, best epoch...): read by people
    training: dict[str, Any] = field(default_factory=dict)
    #: prediction sets and out-of-distribution flag (:mod:`mirage_demo.uncertainty`, which
    #: validates it; its arrays are in ``uncertainty.safetensors``); empty: not fitted
    uncertainty: dict[str, Any] = field(default_factory=dict)
    #: a probe's frozen backbone, fetched from the Hub on load (``None``: all weights here)
    backbone: BackboneRef | None = None
    description: str = ""
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    library_version: str = __version__

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        data["split"] = None if self.split is None else self.split.to_dict()
        data["backbone"] = None if self.backbone is None else self.backbone.to_dict()
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Any) -> CheckpointConfig:
        """A config from untrusted data: every field checked by :func:`validate_config`."""
        fields = validate_config(data)
        fields["preprocessing"] = Preprocessing.from_dict(fields.get("preprocessing", {}))
        try:
            if data.get("split") is not None:
                fields["split"] = SplitSpec.from_dict(data["split"])
            else:  # written before the split had its own record
                fields["split"] = legacy_split(data.get("training"))
        except (DataError, TypeError, ValueError, AttributeError) as err:
            reason = " ".join(str(err).split())[:200]
            raise CheckpointError(f"{CONFIG_NAME} has an unusable split record: {reason}") from err
        if data.get("backbone") is not None:
            fields["backbone"] = BackboneRef.from_dict(data["backbone"], fields["architecture"])
        return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})


def _bad(field_name: str, allowed: str, value: Any = None) -> CheckpointError:
    shown = "" if value is None else f" (got {_short(value)})"
    return CheckpointError(f"{CONFIG_NAME}: {field_name} must be {allowed}{shown}")


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, bool)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any, field_name: str, low: float, high: float, integer: bool = False) -> Any:
    """``value`` as a finite number in ``[low, high]`` (an int if ``integer``), or an error."""
    kind = "an integer" if integer else "a number"
    allowed = f"{kind} from {low:g} to {high:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(field_name, allowed, value)
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise _bad(field_name, allowed, value)
    if not (isinstance(value, int) or math.isfinite(value)) or not low <= value <= high:
        raise _bad(field_name, allowed, value)
    return int(value) if integer else float(value)


def _numbers(value: Any, field_name: str, lengths: tuple[int, ...], **bounds: Any) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) not in lengths:
        shown = " or ".join(str(n) for n in lengths)
        raise _bad(field_name, f"a list of {shown} numbers", value)
    return tuple(_number(v, f"{field_name}[{i}]", **bounds) for i, v in enumerate(value))


def _model_kwarg(key: str, value: Any) -> Any:
    rule = ALLOWED_MODEL_KWARGS.get(key)
    where = f"model_kwargs.{key}"
    if rule is None:
        raise _bad(
            "model_kwargs",
            "architecture arguments among " + ", ".join(ALLOWED_MODEL_KWARGS),
            key,
        )
    if rule is bool:
        if not isinstance(value, bool):
            raise _bad(where, "true or false", value)
        return value
    if isinstance(rule[0], str):
        if value not in rule:
            raise _bad(where, "one of " + ", ".join(repr(c) for c in rule), value)
        return value
    low, high = rule
    integer = isinstance(low, int) and isinstance(high, int)
    if key == "img_size" and isinstance(value, (list, tuple)):
        return list(_numbers(value, where, (2,), low=low, high=high, integer=True))
    return _number(value, where, low, high, integer=integer)


def _validate_preprocessing(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _bad(
            "preprocessing", "a mapping of input_size, in_chans, interpolation, mean, std", data
        )
    out: dict[str, Any] = {}
    if "input_size" in data:
        out["input_size"] = _numbers(
            data["input_size"],
            "preprocessing.input_size",
            (2,),
            low=8,
            high=MAX_INPUT_SIDE,
            integer=True,
        )
    chans = _number(data.get("in_chans", 1), "preprocessing.in_chans", 1, 4, integer=True)
    out["in_chans"] = chans
    if "interpolation" in data:
        if data["interpolation"] not in INTERPOLATIONS:
            raise _bad(
                "preprocessing.interpolation",
                "one of " + ", ".join(INTERPOLATIONS),
                data["interpolation"],
            )
        out["interpolation"] = data["interpolation"]
    lengths = tuple(sorted({1, chans}))
    if "mean" in data:
        out["mean"] = _numbers(data["mean"], "preprocessing.mean", lengths, low=-1e3, high=1e3)
    if "std" in data:
        out["std"] = _numbers(data["std"], "preprocessing.std", lengths, low=1e-6, high=1e3)
    if "normalization" in data:
        if not isinstance(data["normalization"], str) or len(data["normalization"]) > 200:
            raise _bad("preprocessing.normalization", "a short text", data["normalization"])
        out["normalization"] = data["normalization"]
    return out


def validate_config(data: Any) -> dict[str, Any]:
    """Check an untrusted ``config.json`` mapping field by field; return the clean fields.

    A :class:`CheckpointError` names the first bad field and the values it allows. Model
    arguments must be in :data:`ALLOWED_MODEL_KWARGS` (never a weights location).
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"{CONFIG_NAME} must hold a JSON object, not {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise _bad("format", repr(FORMAT), data.get("format"))
    version = data.get("format_version", FORMAT_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format {version} is newer than this mirage_demo ({FORMAT_VERSION}): "
            "upgrade mirage_demo"
        )
    _number(version, "format_version", 1, FORMAT_VERSION, integer=True)
    out: dict[str, Any] = {}
    architecture = data.get("architecture")
    if not isinstance(architecture, str) or architecture not in timm.list_models():
        raise CheckpointError(
            f"{CONFIG_NAME}: unknown architecture {architecture!r:.80}: architecture must be "
            "a timm model name (see timm.list_models())"
        )
    out["architecture"] = architecture
    names = data.get("class_names")
    if (
        not isinstance(names, list)
        or not 2 <= len(names) <= MAX_CLASSES
        or not all(isinstance(n, str) and 0 < len(n) <= 100 for n in names)
        or len(set(names)) != len(names)
    ):
        raise _bad(
            "class_names", f"a list of 2 to {MAX_CLASSES} distinct names (1-100 characters)", names
        )
    out["class_names"] = list(names)
    out["preprocessing"] = _validate_preprocessing(data.get("preprocessing", {}))
    kwargs = data.get("model_kwargs", {})
    if not isinstance(kwargs, dict):
        raise _bad("model_kwargs", "a mapping of architecture arguments", kwargs)
    out["model_kwargs"] = {key: _model_kwarg(key, value) for key, value in kwargs.items()}
    out["temperature"] = _number(data.get("temperature", 1.0), "temperature", 0.01, 100.0)
    for key in ("source_weights", "training", "uncertainty"):
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise _bad(key, "a mapping", value)
        out[key] = value
    for key in ("description", "created", "library_version"):
        if key in data:
            if not isinstance(data[key], str) or len(data[key]) > 10_000:
                raise _bad(key, "a text of at most 10,000 characters", data[key])
            out[key] = data[key]
    return out


#: ``training`` keys that held the split before ``CheckpointConfig.split`` existed.
_LEGACY_SPLIT_KEYS = {
    "val_fraction": "val_fraction",
    "test_fraction": "test_fraction",
    "split_seed": "seed",
    "exclude": "exclude",
}


def legacy_split(training: Any) -> SplitSpec | None:
    """The split recorded in an older checkpoint's ``training`` settings, if it has one."""
    if not isinstance(training, dict):
        return None
    found = {new: training[old] for old, new in _LEGACY_SPLIT_KEYS.items() if old in training}
    if not found:
        return None
    if found.get("exclude") is None:
        found.pop("exclude", None)
    return SplitSpec(**found, near_copies=None)  # written before near-copies were grouped


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    config: CheckpointConfig,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each atomically).

    ``dtype`` (e.g. ``torch.float16``) stores the floating-point weights at that precision, to
    halve the file; :func:`load_checkpoint` always computes in float32. With
    ``config.backbone`` (a probe) only the classifier is written: the backbone's weights are
    fetched from the Hub on load, never copied.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kept = set(classifier_parameter_names(model)) if config.backbone else None
    state = {}
    for key, value in model.state_dict().items():
        if kept is not None and key not in kept:
            continue
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous()
    meta = {"format": "pt", "architecture": config.architecture}
    if config.backbone:
        meta["head_only"] = config.backbone.weights
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata=meta))
    return save_config(directory, config)


def save_config(directory: str | Path, config: CheckpointConfig) -> Path:
    """(Re)write a checkpoint's ``config.json`` atomically."""
    directory = Path(directory)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")
    return directory


def resolve_checkpoint_dir(source: str | Path, local_files_only: bool = False) -> Path:
    """A local checkpoint directory, or a Hub repo id (``owner/name[@revision]``) downloaded
    into the Hugging Face cache (offline once cached; ``local_files_only``: never online)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or not _REPO_ID.match(text):
        raise CheckpointError(f"no checkpoint directory at {source} (nor is it a Hub repo id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = text.partition("@")
    try:
        return Path(
            snapshot_download(repo_id, revision=revision or None, local_files_only=local_files_only)
        )
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline?): download it once with network access"
        ) from err
    except HfHubHTTPError as err:
        raise CheckpointError(f"cannot download {repo_id} from the Hub: {err}") from err


def read_config(directory: str | Path) -> CheckpointConfig:
    """The ``config.json`` of a checkpoint directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG_NAME} is missing")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_CONFIG_BYTES:,} bytes: not a config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        # JSONDecodeError, numbers over Python's 4300-digit limit, absurd nesting
        reason = str(err).split(";")[0]
        raise CheckpointError(f"{path} is not valid JSON ({reason})") from err
    return CheckpointConfig.from_dict(data)


def model_from_config(
    config: CheckpointConfig, device: str | torch.device | None = None
) -> nn.Module:
    """The untrained model a checkpoint's weights belong to (``device="meta"``: no memory)."""
    if config.architecture not in timm.list_models():
        raise CheckpointError(f"unknown architecture {config.architecture!r} in {CONFIG_NAME}")
    kwargs = {"in_chans": config.preprocessing.in_chans, **config.model_kwargs}
    if device is not None:
        kwargs["device"] = device
    try:
        return create_classifier(config.architecture, num_classes=config.num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise CheckpointError(
            f"{CONFIG_NAME}: {config.architecture} cannot be built with model_kwargs "
            f"{_short(config.model_kwargs)} ({str(err).splitlines()[0][:200]})"
        ) from err


def check_input_size(model: nn.Module, config: CheckpointConfig) -> None:
    """Run the model once on a shape-only (meta) input of the configured size: a
    ``preprocessing.input_size`` the architecture cannot take fails here, at load time, not on
    every request; so does a model that would cost one scan more than :data:`MAX_PARAMETERS`,
    :data:`MAX_TOKENS` or :data:`MAX_FORWARD_FLOPS` (counted on that pass)."""
    from torch.utils.flop_counter import FlopCounterMode

    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_PARAMETERS:
        raise CheckpointError(
            f"{CONFIG_NAME}: {config.architecture} has {parameters / 1e6:,.0f} M parameters "
            f"(limit {MAX_PARAMETERS / 1e6:,.0f} M)"
        )
    tokens = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if isinstance(tokens, int) and tokens > MAX_TOKENS:
        raise CheckpointError(
            f"{CONFIG_NAME}: {config.architecture} at this input size and patch size makes "
            f"{tokens:,} tokens per scan (limit {MAX_TOKENS:,})"
        )
    height, width = config.preprocessing.input_size
    x = torch.zeros(1, config.preprocessing.in_chans, height, width, device="meta")
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            shape = tuple(model(x).shape)
    except Exception as err:  # any architecture's complaint, in one line
        raise CheckpointError(
            f"{CONFIG_NAME}: preprocessing.input_size {height}x{width} does not fit "
            f"{config.architecture} ({str(err).splitlines()[0][:200]})"
        ) from err
    if shape != (1, config.num_classes):
        raise CheckpointError(
            f"{CONFIG_NAME}: {config.architecture} gives outputs of shape {shape}, "
            f"expected (1, {config.num_classes}) for class_names"
        )
    flops = counter.get_total_flops()
    if flops > MAX_FORWARD_FLOPS:
        raise CheckpointError(
            f"{CONFIG_NAME}: {config.architecture} at {height}x{width} needs "
            f"{flops / 1e9:,.0f} GFLOP per scan (limit {MAX_FORWARD_FLOPS / 1e9:,.0f})"
        )


def load_checkpoint(
    source: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, CheckpointConfig]:
    """Load a checkpoint directory or Hub repo id: ``(model in eval mode, config)``."""
    directory = resolve_checkpoint_dir(source)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {WEIGHTS_NAME} is missing")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {err}") from err
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise CheckpointError(f"{weights}: {broken[0]} holds values that are not finite numbers")
    model = model_from_config(config, device="meta")  # weights come from the file: allocate once
    check_input_size(model, config)
    if config.backbone is not None:
        return _load_probe(config, state, weights).to(device).eval(), config
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} is {tuple(v.shape)}, {config.architecture} with {config.num_classes} classes "
        f"expects {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise CheckpointError(
            f"weights in {weights} do not match config.json: " + "; ".join(problems[:5])
        )
    model.load_state_dict(state, assign=True)
    return model.to(device).eval(), config


def _load_probe(
    config: CheckpointConfig, head: dict[str, torch.Tensor], weights: Path
) -> nn.Module:
    """A probe checkpoint's model: its frozen backbone from the Hugging Face cache (the commit
    and SHA-256 it was fitted on, checked), then its classifier from ``weights``."""
    ref = config.backbone
    assert ref is not None
    try:
        found = hub_weights(ref.weights, ref.revision)
    except WeightsUnavailableError as err:
        raise CheckpointError(f"this probe's backbone cannot be loaded: {err}") from err
    if found.sha256 != ref.sha256:
        raise CheckpointError(
            f"the backbone {found.repo_id} at {ref.revision[:12]} in the Hugging Face cache has "
            f"SHA-256 {found.sha256[:12]}..., this probe was fitted on {ref.sha256[:12]}...: "
            "delete the cached copy and download it again"
        )
    kwargs = {"in_chans": config.preprocessing.in_chans, **config.model_kwargs}
    try:
        model = create_classifier(
            config.architecture, config.num_classes, weights=found.path, **kwargs
        )
    except (ValueError, RuntimeError, OSError) as err:
        raise CheckpointError(
            f"the backbone {found.path} does not load ({str(err).splitlines()[0][:200]})"
        ) from err
    expected = {
        k: v for k, v in model.state_dict().items() if k in classifier_parameter_names(model)
    }
    problems = [f"missing {k}" for k in expected if k not in head]
    problems += [f"unexpected {k}" for k in head if k not in expected]
    problems += [
        f"{k} is {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
        for k, v in head.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise CheckpointError(
            f"the classifier in {weights} does not fit {config.architecture} with "
            f"{config.num_classes} classes: " + "; ".join(problems[:5])
        )
    model.load_state_dict(head, strict=False)
    return model


def push_to_hub(
    directory: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload fine-tuned OCT classifier",
) -> str:
    """Upload a checkpoint directory to a Hub model repo (created if needed); returns its URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    config = read_config(directory)
    card = directory / "README.md"
    if not card.exists():
        card.write_text(hub_model_card(config))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(directory), repo_id=repo_id, commit_message=commit_message
    )
    return str(getattr(info, "repo_url", f"https://huggingface.co/{repo_id}"))


def hub_model_card(config: CheckpointConfig) -> str:
    """A short Hub model card for a checkpoint."""
    source = config.source_weights
    license_id = source.get("license", "apache-2.0")
    return (
        f"---\nlicense: {license_id}\nlibrary_name: timm\ntags:\n- OCT\n- image-classification\n"
        f"- mirage-demo\n---\n\n# {config.architecture} OCT classifier\n\n"
        f"Classes: {', '.join(config.class_names)}.\n\n"
        f"Source weights: {source.get('name', 'none (trained from scratch)')}.\n\n"
        + (
            f"A linear probe: this repository holds only the classifier; the frozen backbone "
            f"is [{config.backbone.repo_id}](https://huggingface.co/{config.backbone.repo_id}) "
            f"at commit {config.backbone.revision}, downloaded on load.\n\n"
            if config.backbone
            else ""
        )
        + f"{config.description}\n\nA teaching and research model, not a medical device.\n"
    )
