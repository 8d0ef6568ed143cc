"""Self-describing fine-tuned checkpoints: a directory, never a pickle.

::

    my-model/
      model.safetensors   weights (timm state dict)
      config.json         architecture, class names, preprocessing, temperature, training
      metrics.json, predictions.csv, *.png   optional evaluation report

Loadable from a local directory or a Hugging Face Hub repo id (downloaded once into the Hub
cache, then usable offline with ``HF_HUB_OFFLINE=1``), and pushable to the Hub.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import mirage_demo
from mirage_demo.data import DataError, Preprocessing, SplitSpec
from mirage_demo.fileio import atomic_write, atomic_write_text
from mirage_demo.models import create_classifier

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CheckpointConfig",
    "CheckpointError",
    "load_checkpoint",
    "model_from_config",
    "push_to_hub",
    "resolve_checkpoint_dir",
    "save_checkpoint",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mirage-demo-checkpoint"
FORMAT_VERSION = 1
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong."""


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
    description: str = ""
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    library_version: str = mirage_demo.__version__

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        data["split"] = None if self.split is None else self.split.to_dict()
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointConfig:
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{CONFIG_NAME} is not a {FORMAT} config")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format {data['format_version']} is newer than this "
                f"mirage_demo ({FORMAT_VERSION}): upgrade mirage_demo"
            )
        for key in ("architecture", "class_names"):
            if not data.get(key):
                raise CheckpointError(f"{CONFIG_NAME} has no {key!r}")
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["preprocessing"] = Preprocessing.from_dict(data.get("preprocessing", {}))
        try:
            if data.get("split") is not None:
                fields["split"] = SplitSpec.from_dict(data["split"])
            else:  # written before the split had its own record
                fields["split"] = legacy_split(data.get("training"))
        except (DataError, TypeError) as err:
            raise CheckpointError(f"{CONFIG_NAME} has an unusable split record: {err}") from err
        return cls(**fields)


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
    return SplitSpec(**found)


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    config: CheckpointConfig,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each atomically).

    ``dtype`` (e.g. ``torch.float16``) stores the floating-point weights at that precision, to
    halve the file; :func:`load_checkpoint` always computes in float32.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous()
    meta = {"format": "pt", "architecture": config.architecture}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata=meta))
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
    try:
        return CheckpointConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def model_from_config(
    config: CheckpointConfig, device: str | torch.device | None = None
) -> nn.Module:
    """The untrained model a checkpoint's weights belong to (``device="meta"``: no memory)."""
    if config.architecture not in timm.list_models():
        raise CheckpointError(f"unknown architecture {config.architecture!r} in {CONFIG_NAME}")
    kwargs = {"in_chans": config.preprocessing.in_chans, **config.model_kwargs}
    if device is not None:
        kwargs["device"] = device
    return create_classifier(config.architecture, num_classes=config.num_classes, **kwargs)


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
    model = model_from_config(config, device="meta")  # weights come from the file: allocate once
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
        f"{config.description}\n\nA teaching and research model, not a medical device.\n"
    )
