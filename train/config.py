"""Training options: MIRAGE's recipe as defaults, then a YAML file, then the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mirage_demo.data import SplitSpec

__all__ = ["RESUMABLE_CHANGES", "TrainConfig", "UsageError", "build_parser", "parse_config"]


class UsageError(Exception):
    """Bad input that stops the run before training: one line that says what to fix."""


@dataclass
class TrainConfig:
    """Every option of ``python -m train`` (the resolved copy is saved with the run)."""

    # data
    data: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    exclude: list[str] = field(default_factory=list)
    near_copies: float = 0.95
    cache: bool = True
    cache_dir: str | None = None
    skip_unreadable: bool = False
    workers: int | None = None
    # model
    model: str = "mirage_base_patch32_512"
    pretrained: bool = False
    weights: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    mode: str = "full"
    last_k: int = 2
    probe_c: list[float] = field(default_factory=list)
    init: str | None = None
    mask_ratio: float = 0.75
    decoder_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    drop_path: float = 0.1
    grad_checkpointing: bool = False
    # optimisation
    epochs: int = 50
    batch_size: int = 32
    accum_steps: int = 1
    lr: float | None = None
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    layer_decay: float = 0.75
    warmup_epochs: float = 10.0
    label_smoothing: float = 0.1
    clip_grad: float | None = None
    balance: str = "loss"
    augment: bool = True
    shift_augment: bool = False
    aug_fill: float = 1.0
    patience: int = 10
    select: str = "balanced_accuracy"
    teacher: str | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 2.0
    # run
    out: str | None = None
    save_dtype: str = "float32"
    data_name: str | None = None
    description: str | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    threads: int | None = None
    resume: bool = False
    progress: bool | None = None
    tensorboard: bool = True
    bootstrap: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def split(self) -> SplitSpec:
        """The data split these options ask for (stored in the checkpoint as is)."""
        exclude = tuple(self.exclude)
        near = self.near_copies or None
        return SplitSpec(self.val_fraction, self.test_fraction, self.split_seed, exclude, near)

    @property
    def base_lr(self) -> float:
        """``--lr``, else MIRAGE's: 1e-3 for a linear probe, 1e-5 for fine-tuning."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.mode == "linear" else 1e-5


# Options a resumed run may change: they do not alter what is computed.
RESUMABLE_CHANGES = frozenset(
    {"data", "cache", "cache_dir", "workers", "device", "threads", "progress", "resume"}
    | {"tensorboard", "bootstrap", "data_name", "description"}
)

_DEFAULTS = TrainConfig()


def _help(text: str, key: str) -> str:
    default = getattr(_DEFAULTS, key)
    if default is None or default == {} or isinstance(default, bool):
        return text
    return f"{text} (default: {default})"


def _mapping(text: str) -> dict[str, Any]:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not a YAML/JSON mapping: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a mapping such as '{\"img_size\": 256}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m train`` parser; options that are not given stay unset (SUPPRESS)."""
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune MIRAGE (or any timm model) on OCT B-scans laid out as "
        "DIR/{train,val,test}/<CLASS>/* or DIR/<CLASS>/*. The output folder is a checkpoint "
        "the app and `python -m train.evaluate` load directly; it also holds the test report, "
        "logs and the state that --resume continues from. Multi-GPU: torchrun "
        "--nproc_per_node=N -m train ...",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    flag = argparse.BooleanOptionalAction
    add("--config", metavar="FILE.yaml", help="options from a YAML file (command line wins)")

    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", help="dataset folder (required)")
    g.add_argument(
        "--val-fraction",
        type=float,
        help=_help("val share carved from train when there is no val/", "val_fraction"),
    )
    g.add_argument(
        "--test-fraction",
        type=float,
        help=_help("test share carved from a flat dataset", "test_fraction"),
    )
    g.add_argument(
        "--split-seed", type=int, help=_help("seed of the patient-disjoint split", "split_seed")
    )
    g.add_argument(
        "--exclude",
        action="append",
        metavar="PATH",
        help="leave these images (a file or folder; repeatable), and all images of their "
        "patients, out of every split, e.g. --exclude assets/examples",
    )
    g.add_argument(
        "--near-copies",
        type=float,
        metavar="R",
        help=_help(
            "keep images whose 64x64 thumbnails correlate at least R (mirrored or not) on one "
            "side of every split; 0 = off",
            "near_copies",
        ),
    )
    g.add_argument(
        "--cache",
        action=flag,
        help="decode every image once into a uint8 memory-mapped cache (default: on)",
    )
    g.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the cache lives (default: $MIRAGE_DEMO_CACHE or ~/.cache/mirage-demo/images)",
    )
    g.add_argument(
        "--skip-unreadable",
        action=flag,
        help="train without unreadable images instead of stopping (default: stop)",
    )
    g.add_argument(
        "--workers",
        type=int,
        help="data loader processes per GPU (default: 6 on CUDA, 0 on CPU with the cache)",
    )

    g = parser.add_argument_group("model")
    g.add_argument("--model", metavar="NAME", help=_help("timm architecture", "model"))
    g.add_argument(
        "--pretrained",
        action=flag,
        help="start from the registry's weights (MIRAGE: the Hugging Face Hub)",
    )
    g.add_argument(
        "--weights",
        metavar="FILE",
        help="start from a local weights file (MIRAGE .pth/.safetensors)",
    )
    g.add_argument(
        "--model-kwargs",
        type=_mapping,
        metavar="MAPPING",
        help="extra architecture arguments, e.g. '{\"depth\": 2}'",
    )
    g.add_argument(
        "--img-size", type=int, help="input side in pixels (default: the model's, 512 for MIRAGE)"
    )
    g.add_argument(
        "--mode",
        choices=["linear", "last-k", "full", "probe", "pretrain"],
        help=_help(
            "what to train: head only, last k blocks + head, everything, a logistic-"
            "regression probe on frozen features cached on disk (seconds once embedded), or "
            "MIRAGE's masked-autoencoder pre-training of a mirage_* encoder on the train "
            "split's images (labels unused)",
            "mode",
        ),
    )
    g.add_argument(
        "--init",
        metavar="DIR",
        help="start the encoder from a --mode pretrain checkpoint (same architecture); the "
        "new norm and head start fresh",
    )
    g.add_argument(
        "--mask-ratio",
        type=float,
        help=_help("--mode pretrain: share of the patches hidden from the encoder", "mask_ratio"),
    )
    g.add_argument(
        "--decoder-dim", type=int, help=_help("--mode pretrain: decoder width", "decoder_dim")
    )
    g.add_argument(
        "--decoder-depth",
        type=int,
        help=_help("--mode pretrain: decoder blocks after its cross-attention", "decoder_depth"),
    )
    g.add_argument(
        "--decoder-heads",
        type=int,
        help=_help("--mode pretrain: decoder attention heads", "decoder_heads"),
    )
    g.add_argument(
        "--probe-c",
        type=float,
        action="append",
        metavar="C",
        help="--mode probe: a regularisation strength to try (repeatable; the best on the "
        "validation split is kept; default: 1e-4 to 10 in decades)",
    )
    g.add_argument("--last-k", type=int, help=_help("blocks trained in --mode last-k", "last_k"))
    g.add_argument("--drop-path", type=float, help=_help("stochastic depth rate", "drop_path"))
    g.add_argument(
        "--grad-checkpointing",
        action=flag,
        help="recompute activations in backward (less memory, ~30%% slower)",
    )

    g = parser.add_argument_group("optimisation (MIRAGE recipe)")
    g.add_argument("--epochs", type=int, help=_help("training epochs", "epochs"))
    g.add_argument(
        "--batch-size", type=int, help=_help("images per step and process", "batch_size")
    )
    g.add_argument(
        "--accum-steps", type=int, help=_help("gradient accumulation steps", "accum_steps")
    )
    g.add_argument(
        "--lr", type=float, help="peak learning rate (default: 1e-3 linear probe, 1e-5 otherwise)"
    )
    g.add_argument(
        "--min-lr", type=float, help=_help("final learning rate of the cosine", "min_lr")
    )
    g.add_argument("--weight-decay", type=float, help=_help("AdamW weight decay", "weight_decay"))
    g.add_argument(
        "--layer-decay", type=float, help=_help("layer-wise lr decay (1 = off)", "layer_decay")
    )
    g.add_argument(
        "--warmup-epochs",
        type=float,
        help=_help("linear warm-up before the cosine", "warmup_epochs"),
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        help=_help("cross-entropy label smoothing", "label_smoothing"),
    )
    g.add_argument(
        "--clip-grad", type=float, help="clip the gradient norm to this value (default: off)"
    )
    g.add_argument(
        "--balance",
        choices=["loss", "sampler", "sqrt", "none"],
        help=_help(
            "class imbalance: class-weighted loss, sampling every class equally often, "
            "square-root sampling (class c drawn in proportion to sqrt(count_c)) or nothing",
            "balance",
        ),
    )
    g.add_argument(
        "--augment", action=flag, help="flip, affine, intensity augmentation (default: on)"
    )
    g.add_argument(
        "--shift-augment",
        action=flag,
        help="also simulate other OCT devices: retinal curvature, aspect ratio, contrast and "
        "gamma, intensity offset, blur, speckle and noise (default: off)",
    )
    g.add_argument(
        "--aug-fill",
        type=float,
        help=_help("border value brought in by the affine, in [0, 1]", "aug_fill"),
    )
    g.add_argument(
        "--patience",
        type=int,
        help=_help(
            "stop after this many epochs past warm-up without a better model (0 = never)",
            "patience",
        ),
    )
    g.add_argument(
        "--select",
        choices=["balanced_accuracy", "accuracy", "macro_f1", "macro_auroc", "loss"],
        help=_help(
            "validation measure that picks the best model (ties: lower loss); with a few "
            "images of a class, 'loss' is steadier",
            "select",
        ),
    )
    g.add_argument(
        "--teacher",
        metavar="DIR_OR_HUB_ID",
        help="distil from this trained checkpoint (same classes): the loss mixes the labels "
        "with the teacher's softened predictions",
    )
    g.add_argument(
        "--distill-weight",
        type=float,
        help=_help("share of the distillation term in the loss, with --teacher", "distill_weight"),
    )
    g.add_argument(
        "--distill-temperature",
        type=float,
        help=_help("softmax temperature of the distillation term", "distill_temperature"),
    )

    g = parser.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="output checkpoint folder (required)")
    g.add_argument(
        "--save-dtype",
        choices=["float32", "float16", "bfloat16"],
        help=_help("precision of the saved weights (float16 halves the file)", "save_dtype"),
    )
    g.add_argument(
        "--data-name",
        metavar="TEXT",
        help="how the model card names the training data (default: the data folder's name)",
    )
    g.add_argument(
        "--description",
        metavar="TEXT",
        help="a sentence for the model card: what this model is and how far to trust it",
    )
    g.add_argument(
        "--seed", type=int, help=_help("seed of initialisation, order, augmentation", "seed")
    )
    g.add_argument("--device", help=_help("auto, cpu, cuda or cuda:N", "device"))
    g.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16", "off"],
        help=_help(
            "mixed precision: on CUDA auto is bf16 if supported, else fp16; on CPU auto is fp32 "
            "and bf16 trains ~1.6-3x faster where the CPU has AVX512-BF16 or AMX",
            "amp",
        ),
    )
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    g.add_argument(
        "--resume",
        action=flag,
        help="continue the run saved in --out (same final weights as an uninterrupted run)",
    )
    g.add_argument("--progress", action=flag, help="progress bars (default: on a terminal)")
    g.add_argument(
        "--tensorboard", action=flag, help="TensorBoard logs in OUT/tensorboard (default: on)"
    )
    g.add_argument(
        "--bootstrap",
        type=int,
        help=_help("bootstrap resamples for the report's confidence intervals", "bootstrap"),
    )
    return parser


def _from_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise UsageError(f"config file {path} is not valid YAML: {detail}") from err
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must be a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"config file {path} has unknown options: {', '.join(unknown)}")
    return values


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """Resolved options and the names given explicitly (in the YAML file or on the command line)."""
    namespace = vars(build_parser().parse_args(argv))
    explicit: dict[str, Any] = {}
    if "config" in namespace:
        explicit.update(_from_yaml(namespace.pop("config")))
    explicit.update(namespace)
    config = TrainConfig(**{**_DEFAULTS.to_dict(), **explicit})
    _validate(config)
    return config, set(explicit)


def _validate(config: TrainConfig) -> None:
    checks = [
        (config.epochs >= 1, "--epochs must be at least 1"),
        (config.batch_size >= 1, "--batch-size must be at least 1"),
        (config.accum_steps >= 1, "--accum-steps must be at least 1"),
        (config.warmup_epochs >= 0, "--warmup-epochs must be 0 or more"),
        (config.patience >= 0, "--patience must be 0 (off) or more"),
        (config.bootstrap >= 0, "--bootstrap must be 0 or more"),
        (0 <= config.aug_fill <= 1, "--aug-fill must be in [0, 1]"),
        (0 <= config.near_copies <= 1, "--near-copies must be in [0, 1] (0 = off)"),
        (0 <= config.distill_weight <= 1, "--distill-weight must be in [0, 1]"),
        (config.distill_temperature > 0, "--distill-temperature must be positive"),
        (
            config.mode in ("linear", "last-k", "full", "probe", "pretrain"),
            "--mode must be linear, last-k, full, probe or pretrain",
        ),
        (0 <= config.mask_ratio < 1, "--mask-ratio must be in [0, 1)"),
        (config.decoder_dim >= 8, "--decoder-dim must be at least 8"),
        (config.decoder_depth >= 0, "--decoder-depth must be 0 or more"),
        (
            config.decoder_heads >= 1 and config.decoder_dim % config.decoder_heads == 0,
            "--decoder-heads must divide --decoder-dim",
        ),
        (
            not (config.init and (config.pretrained or config.weights)),
            "--init replaces --pretrained and --weights: give one of them",
        ),
        (all(c > 0 for c in config.probe_c), "--probe-c must be positive"),
        (
            config.balance in ("loss", "sampler", "sqrt", "none"),
            "--balance must be loss, sampler, sqrt or none",
        ),
        (config.amp in ("auto", "bf16", "fp16", "off"), "--amp must be auto, bf16, fp16 or off"),
        (config.img_size is None or config.img_size >= 8, "--img-size must be at least 8"),
        (config.workers is None or config.workers >= 0, "--workers must be 0 or more"),
        (isinstance(config.model_kwargs, dict), "model_kwargs must be a mapping"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def check_resumable(saved: dict[str, Any], config: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The saved run's options, with the changes allowed on ``--resume`` applied.

    Anything that changes what is computed (model, data split, optimiser, schedule, seed...)
    must stay as saved, or the resumed run would not end where the uninterrupted one would.
    """
    resumed = TrainConfig(**{**_DEFAULTS.to_dict(), **saved})
    for key in sorted(explicit):
        asked, was = getattr(config, key), getattr(resumed, key)
        if key in RESUMABLE_CHANGES or key == "out":
            setattr(resumed, key, asked)
        elif asked != was:
            flag = "--" + key.replace("_", "-")
            if key == "model":
                raise UsageError(
                    f"{config.out} holds a {was} run, not {asked}: use another --out to train "
                    f"{asked}, or drop --model to resume the {was} run"
                )
            raise UsageError(
                f"{flag} {json.dumps(asked)} differs from the run being resumed "
                f"({json.dumps(was)}): drop {flag} to resume, or start a new run in another --out"
            )
    resumed.resume = True
    return resumed
