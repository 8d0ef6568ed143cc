"""OCT B-scan datasets: discovery, patient-disjoint splits, preprocessing and class balance.

One preprocessing path serves training, evaluation, the app and the CLI:

``read_image`` (:mod:`mirage_demo.images`: any file, PIL image or array -> float32 grayscale)
-> bilinear resize to the model's input size -> per-image min-max to [0, 1] -> (training only)
augmentation -> ``(x - mean) / std`` from the model's ``pretrained_cfg`` (a no-op for MIRAGE).

The image readers and :class:`Sample` live in :mod:`mirage_demo.images` (below this module and
:mod:`mirage_demo.nearcopies`); the names the tests and the README use are re-exported here.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler, default_collate
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from mirage_demo.images import (
    IMAGE_SUFFIXES,
    MAX_JPEG_SCANS,
    MAX_WORK_PIXELS,
    ImageReadError,
    ImageSource,
    Sample,
    open_image,
    read_image,
)
from mirage_demo.nearcopies import NearCopyGroups, group_near_copies

__all__ = [
    "MAX_JPEG_SCANS",
    "MAX_WORK_PIXELS",
    "DataError",
    "DatasetSplits",
    "FileImages",
    "ImageReadError",
    "Preprocessing",
    "Sample",
    "SplitSpec",
    "balanced_sampler",
    "class_counts",
    "class_weights",
    "collate_skip_unreadable",
    "discover_dataset",
    "load_dataset",
    "open_image",
    "patient_id",
    "patient_split",
    "read_image",
    "train_augmentation",
]

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


class DataError(ValueError):
    """A dataset that cannot be used as it is; the message says what to fix."""


# --------------------------------------------------------------------------------------------
# Preprocessing contract


@dataclass(frozen=True)
class Preprocessing:
    """The model's input contract, read from its ``pretrained_cfg`` and stored in checkpoints."""

    input_size: tuple[int, int] = (512, 512)
    in_chans: int = 1
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    normalization: str = "per-image min-max to [0, 1]"

    @classmethod
    def from_model(cls, model: torch.nn.Module, input_size: int | None = None) -> Preprocessing:
        """The contract of a timm model (``input_size`` overrides the square side, for CNNs)."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        chans, height, width = cfg.get("input_size", (1, 512, 512))
        chans = getattr(model, "in_chans", chans)
        if input_size is not None:
            height = width = input_size
        return cls(
            input_size=(int(height), int(width)),
            in_chans=int(chans),
            interpolation=cfg.get("interpolation", "bilinear"),
            mean=_per_channel(cfg.get("mean", (0.0,)), chans),
            std=_per_channel(cfg.get("std", (1.0,)), chans),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("input_size", "mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def standardizes(self) -> bool:
        """Whether ``(x - mean) / std`` changes anything (MIRAGE's contract: it does not)."""
        return any(m != 0 for m in self.mean) or any(s != 1 for s in self.std)

    def describe(self) -> str:
        """One line for people, e.g. ``512x512, bilinear, per-image min-max to [0, 1]``."""
        line = f"{self.input_size[0]}x{self.input_size[1]}, {self.interpolation}, "
        line += self.normalization
        if self.standardizes:
            mean, std = "/".join(f"{m:g}" for m in self.mean), "/".join(f"{s:g}" for s in self.std)
            line += f", then (x - {mean}) / {std}"
        return line

    def read_resized(self, source: ImageSource, name: str | None = None) -> torch.Tensor:
        """Read an image, resize it to the input size and min-max it: a ``(1, H, W)`` float
        tensor in [0, 1] (before :meth:`normalize`)."""
        return self.resize_minmax(torch.from_numpy(read_image(source, name))[None])

    def resize_minmax(self, image: torch.Tensor) -> torch.Tensor:
        """Resize a ``(1, H, W)`` grayscale tensor to the input size, then min-max it."""
        mode = InterpolationMode(self.interpolation)
        image = TF.resize(image.float(), list(self.input_size), interpolation=mode, antialias=True)
        return minmax(image)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` and channel repeat: [0, 1] image -> model input."""
        if self.in_chans != image.shape[-3]:
            image = image.expand(*image.shape[:-3], self.in_chans, *image.shape[-2:])
        if not self.standardizes:
            return image
        mean = torch.tensor(self.mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        return (image - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`: model input -> ``(..., 1, H, W)`` [0, 1] image."""
        if self.standardizes:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            x = x * std + mean
        return x[..., :1, :, :]

    def __call__(self, source: ImageSource, name: str | None = None) -> torch.Tensor:
        """An image as the model's input tensor ``(in_chans, H, W)`` (no augmentation)."""
        return self.normalize(self.read_resized(source, name))


def _per_channel(values: Sequence[float], chans: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == chans:
        return values
    return (sum(values) / len(values),) * chans


def minmax(image: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1]; a constant image becomes all zeros."""
    low, high = image.amin(dim=(-2, -1), keepdim=True), image.amax(dim=(-2, -1), keepdim=True)
    return (image - low) / (high - low).clamp_min(1e-12) * (high > low)


def train_augmentation(fill: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """MIRAGE's fine-tuning augmentation on one [0, 1] image (the recipe of
    :class:`~mirage_demo.augment.BatchAugmentation`; ``fill`` is the border value, white for
    Kermany's white-padded scans)."""
    from mirage_demo.augment import BatchAugmentation

    return v2.Compose(BatchAugmentation(fill=fill).torchvision())


# --------------------------------------------------------------------------------------------
# Dataset discovery and splits


@dataclass
class DatasetSplits:
    """A dataset's class names and its train/val/test samples."""

    root: Path
    class_names: list[str]
    splits: dict[str, list[Sample]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    near_copies: NearCopyGroups | None = None  # what load_dataset grouped, if it did

    def counts(self, split: str) -> dict[str, int]:
        """Images per class in ``split``."""
        counts = class_counts(self.splits.get(split, []), len(self.class_names))
        return dict(zip(self.class_names, counts, strict=True))


_KERMANY_NAME = re.compile(r"^(?P<cls>[A-Za-z]+)-(?P<patient>\d+)-(?P<n>\d+)$")


def patient_id(path: str | Path) -> str | None:
    """The patient id in a Kermany file name (``CNV-1016042-1.jpeg`` -> ``1016042``)."""
    match = _KERMANY_NAME.match(Path(path).stem)
    return match.group("patient") if match else None


def _group_of(path: Path) -> str:
    pid = patient_id(path)
    return f"patient:{pid}" if pid else f"file:{path.parent.name}/{path.name}"


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _class_folders(folder: Path) -> dict[str, Path]:
    return {
        p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")
    }


def _read_split(folder: Path, class_names: list[str]) -> list[Sample]:
    samples = []
    for label, name in enumerate(class_names):
        images = _images_in(folder / name)
        if not images:
            raise DataError(
                f"class {name!r} has no images in {folder / name} "
                f"(expected {', '.join(sorted(IMAGE_SUFFIXES))} files)"
            )
        samples += [Sample(path, label, _group_of(path)) for path in images]
    return samples


def discover_dataset(root: str | Path) -> DatasetSplits:
    """Find the classes and images under ``root``.

    Layouts: ``root/{train,val,test}/<CLASS>/*`` (any subset of the splits, ``train`` needed)
    or flat ``root/<CLASS>/*``. Class names are the folder names, sorted, and must be the same
    in every split.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a folder")
    top = _class_folders(root)
    split_dirs = {name: top[name] for name in SPLIT_NAMES if name in top}
    if not split_dirs:  # flat layout
        class_names = sorted(top)
        if not class_names:
            raise DataError(
                f"{root} has no class folders: expected {root}/<CLASS>/*.png or "
                f"{root}/train/<CLASS>/*.png"
            )
        return DatasetSplits(root, class_names, {"all": _read_split(root, class_names)})
    if "train" not in split_dirs:
        raise DataError(f"{root} has {', '.join(split_dirs)} but no train/ folder")
    class_names = sorted(_class_folders(split_dirs["train"]))
    if not class_names:
        raise DataError(f"{split_dirs['train']} has no class folders (expected train/<CLASS>/)")
    for split, folder in split_dirs.items():
        names = sorted(_class_folders(folder))
        if names != class_names:
            missing = sorted(set(class_names) - set(names))
            extra = sorted(set(names) - set(class_names))
            detail = "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"extra {', '.join(extra)}" if extra else "",
                )
                if part
            )
            raise DataError(
                f"classes differ between splits: {split}/ has [{', '.join(names)}], "
                f"train/ has [{', '.join(class_names)}] ({detail})"
            )
    splits = {split: _read_split(folder, class_names) for split, folder in split_dirs.items()}
    return DatasetSplits(root, class_names, splits)


def patient_split(
    samples: Sequence[Sample],
    fractions: dict[str, float],
    seed: int = 0,
) -> dict[str, list[Sample]]:
    """Stratified, patient-disjoint split of ``samples``.

    ``fractions`` maps the split names to carve off (e.g. ``{"val": 0.15}``) to their share;
    the rest is returned under ``"rest"``. Samples of one group never straddle two splits;
    files without a patient id are groups of their own. Deterministic for a ``seed``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    remaining = list(samples)
    out: dict[str, list[Sample]] = {}
    left = 1.0
    for name, fraction in fractions.items():
        share = fraction / left
        if not 0.0 < share < 1.0:
            raise DataError(f"split fraction for {name!r} must be between 0 and 1")
        labels = [s.label for s in remaining]
        groups = [s.group for s in remaining]
        n_splits = max(2, round(1.0 / share))
        smallest = min(Counter(labels).values())
        if len(set(groups)) < n_splits:
            raise DataError(f"too few patients to carve a {name} split of {fraction:.0%}")
        if smallest < n_splits:
            log.warning("a class has only %d images: the %s split may miss it", smallest, name)
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, held = next(folds.split(np.zeros(len(labels)), labels, groups))
        held_set = set(held.tolist())
        out[name] = [s for i, s in enumerate(remaining) if i in held_set]
        remaining = [s for i, s in enumerate(remaining) if i not in held_set]
        left -= fraction
    out["rest"] = remaining
    return out


@dataclass(frozen=True)
class SplitSpec:
    """How :func:`load_dataset` completes a dataset's splits: the typed record a checkpoint
    stores (``config.json: "split"``) so that evaluation rebuilds exactly the training split.

    ``val_fraction`` of ``train`` becomes ``val`` when there is no ``val/`` folder; a flat
    dataset also loses ``test_fraction`` to ``test``; both patient-disjoint with ``seed``.
    ``exclude`` (image files or folders) leaves those images and their patients out.
    ``near_copies``: images whose thumbnails correlate at least this much, mirrored or not,
    join one group first (:mod:`mirage_demo.nearcopies`; ``None``: off, as in records written
    before it existed). Fractions
    are checked where they are used (a dataset with a ``val/`` folder never uses
    ``val_fraction``).
    """

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    exclude: tuple[str, ...] = ()
    near_copies: float | None = 0.95

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"split {name} must be a number, not {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DataError(f"split seed must be an integer, not {self.seed!r}")
        exclude = (self.exclude,) if isinstance(self.exclude, (str, Path)) else self.exclude
        if not all(isinstance(e, (str, Path)) for e in exclude):
            raise DataError(f"split exclude must be a list of paths, not {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(str(e) for e in exclude))
        near = self.near_copies
        if near is not None and (
            isinstance(near, bool) or not isinstance(near, (int, float)) or not 0 < near <= 1
        ):
            raise DataError(f"split near_copies must be a correlation in (0, 1], not {near!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitSpec:
        """From stored JSON (untrusted: types are checked, unknown keys refused)."""
        if not isinstance(data, dict):
            raise DataError(f"a split record must be an object, not {data!r}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataError(f"unknown split settings: {', '.join(sorted(unknown))}")
        return cls(**{"near_copies": None, **data})  # older records: no grouping


def load_dataset(
    root: str | Path,
    split: SplitSpec | None = None,
    *,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int | None = None,
    exclude: Sequence[str | Path] | None = None,
) -> DatasetSplits:
    """Discover a dataset and complete its splits as ``split`` says (default
    :class:`SplitSpec`); the keywords override single fields of it.

    A missing ``val`` split is carved from ``train`` (``val_fraction`` of it), and a flat
    dataset is split into train/val/test, patient-disjoint and stratified by class.
    ``exclude`` (image files or folders of them) takes those images, and every image of their
    patients, out of every split, e.g. scans kept aside as app examples.
    """
    overrides = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "exclude": None if exclude is None else tuple(str(e) for e in exclude),
    }
    spec = replace(split or SplitSpec(), **{k: v for k, v in overrides.items() if v is not None})
    data = discover_dataset(root)
    if spec.exclude:
        _exclude(data, spec.exclude)
    if spec.near_copies is not None:
        _group_near_copies(data, spec.near_copies)
    if "all" in data.splits:
        fractions = {"test": spec.test_fraction, "val": spec.val_fraction}
        parts = patient_split(data.splits.pop("all"), fractions, spec.seed)
        data.splits = {"train": parts["rest"], "val": parts["val"], "test": parts["test"]}
        data.notes.append(
            f"flat layout: split {spec.val_fraction:.0%} val, {spec.test_fraction:.0%} test"
        )
    elif "val" not in data.splits:
        parts = patient_split(data.splits["train"], {"val": spec.val_fraction}, spec.seed)
        data.splits["train"], data.splits["val"] = parts["rest"], parts["val"]
        data.notes.append(f"no val/ folder: carved {spec.val_fraction:.0%} of train as val")
    shared = _shared_patients(data.splits)
    if shared:
        data.notes.append(
            f"{len(shared)} patients or near-copy groups appear in more than one of the "
            "given split folders"
        )
    return data


def _exclude(data: DatasetSplits, references: Sequence[str | Path]) -> None:
    import hashlib

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    files: list[Path] = []
    for reference in map(Path, references):
        if reference.is_dir():
            files += [p for p in sorted(reference.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        elif reference.is_file():
            files.append(reference)
        else:
            raise DataError(f"--exclude {reference}: no such file or folder")
    hashes = {digest(p) for p in files}
    groups = {_group_of(p) for p in files if patient_id(p)}
    removed = 0
    for split, samples in data.splits.items():
        kept = [s for s in samples if s.group not in groups and digest(s.path) not in hashes]
        removed += len(samples) - len(kept)
        data.splits[split] = kept
    data.notes.append(
        f"excluded {removed} images (copies of {len(files)} reference files and their patients)"
    )


def _group_near_copies(data: DatasetSplits, threshold: float) -> None:
    """Merge the groups of near-copies across all of ``data``'s samples (in place)."""
    names = list(data.splits)
    samples = [s for name in names for s in data.splits[name]]
    merged, found = group_near_copies(samples, threshold)
    start = 0
    for name in names:
        count = len(data.splits[name])
        data.splits[name] = merged[start : start + count]
        start += count
    data.near_copies = found
    data.notes.append(found.note())


def _shared_patients(splits: dict[str, list[Sample]]) -> set[str]:
    seen: dict[str, str] = {}
    shared = set()
    for split, samples in splits.items():
        for sample in samples:
            if seen.setdefault(sample.group, split) != split:
                shared.add(sample.group)
    return shared


# --------------------------------------------------------------------------------------------
# Torch dataset, class balance


class FileImages(Dataset):
    """``(image in [0, 1] (1, H, W), label, index)`` decoded from the file every time.

    The app's exact preprocessing up to normalisation (the trainer normalises and augments
    whole batches on its device). An unreadable file gives ``None`` (logged with its name),
    which :func:`collate_skip_unreadable` drops from the batch.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        preprocessing: Preprocessing,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.preprocessing = preprocessing
        self.indices = list(range(len(self.samples)) if indices is None else indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int] | None:
        index = self.indices[item]
        sample = self.samples[index]
        try:
            image = self.preprocessing.read_resized(sample.path, name=str(sample.path))
        except ImageReadError as err:
            log.warning("skipping unreadable image: %s", err)
            return None
        return image, sample.label, index


def collate_skip_unreadable(batch: list[tuple | None]) -> tuple | None:
    """``default_collate`` minus the ``None`` of unreadable files (``None`` if none is left)."""
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


def class_counts(samples: Iterable[Sample], num_classes: int) -> list[int]:
    """Number of samples of each class."""
    counts = Counter(s.label for s in samples)
    return [counts.get(i, 0) for i in range(num_classes)]


def class_weights(samples: Sequence[Sample], num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Per-class weights ``count ** -power``, scaled so the mean weight over samples is 1.

    ``power=1`` is inverse frequency (a class-weighted loss, or equal draws per class);
    ``power=0.5`` is square-root sampling, halfway between natural and equal frequencies.
    """
    counts = torch.tensor(class_counts(samples, num_classes), dtype=torch.float32)
    if torch.any(counts == 0):
        raise DataError("cannot weight classes: some class has no training images")
    weights = counts.pow(-power)
    return weights * counts.sum() / (weights * counts).sum()


def balanced_sampler(
    samples: Sequence[Sample],
    num_classes: int,
    num_samples: int | None = None,
    seed: int = 0,
    power: float = 1.0,
) -> WeightedRandomSampler:
    """Sampler (with replacement) drawing class ``c`` in proportion to ``count_c ** (1 - power)``.

    ``power=1``: every class equally often; ``power=0.5``: square-root sampling.
    """
    per_class = class_weights(samples, num_classes, power)
    weights = per_class[torch.tensor([s.label for s in samples])]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        weights.double(), num_samples or len(samples), replacement=True, generator=generator
    )
