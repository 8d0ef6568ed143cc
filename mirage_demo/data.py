"""OCT B-scan datasets: discovery, patient-disjoint splits, image reading and transforms.

One preprocessing path serves training, evaluation, the app and the CLI:

``read_image`` (any file, PIL image or array -> float32 grayscale) -> bilinear resize to the
model's input size -> per-image min-max to [0, 1] -> (training only) augmentation ->
``(x - mean) / std`` from the model's ``pretrained_cfg`` (a no-op for MIRAGE).
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, WeightedRandomSampler, default_collate
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

if TYPE_CHECKING:  # mirage_demo.nearcopies reads images through this module
    from mirage_demo.nearcopies import NearCopyGroups

__all__ = [
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
    "MAX_JPEG_SCANS",
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
    "decoded_bytes",
    "discover_dataset",
    "image_header",
    "load_dataset",
    "open_image",
    "patient_id",
    "patient_split",
    "read_image",
    "train_augmentation",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"})
#: The only formats PIL may open (those of IMAGE_SUFFIXES): no other plugin runs, and some
#: (ICO, EPS) decode or run programs inside ``Image.open``.
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP")
SPLIT_NAMES = ("train", "val", "test")
MAX_PIXELS = 64_000_000  # a B-scan is ~0.5 MP; refuse decompression bombs early
MAX_WORK_PIXELS = 2048 * 2048  # larger images are decoded reduced to at most this
MAX_DECODE_BYTES = 192 * 2**20  # decoded pixels a file may need before it is reduced
MAX_JPEG_SCANS = 64  # a progressive JPEG has ~10 scans; each is a pass over every pixel
_T = TypeVar("_T")
#: What every reader accepts: a path, the file's bytes, a PIL image or an array.
ImageSource = Union[str, Path, bytes, Image.Image, np.ndarray]  # noqa: UP007 (runtime alias)


class DataError(ValueError):
    """A dataset that cannot be used as it is; the message says what to fix."""


class ImageReadError(ValueError):
    """An image that cannot be decoded: ``name`` says which, ``reason`` why.

    The message is ``"<name>: <reason>"``; callers that show or store the two apart read the
    attributes, never the text.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across processes
        return type(self), (self.name, self.reason)


# --------------------------------------------------------------------------------------------
# Reading images


def open_image(
    source: str | Path | bytes | BinaryIO | Image.Image, name: str | None = None
) -> Image.Image:
    """Decode an image at a bounded cost: the loaded first frame, EXIF orientation applied,
    at most :data:`MAX_WORK_PIXELS` (larger images are decoded reduced).

    The one place images are opened (app, CLI, evaluation, training). Everything
    :func:`image_header` refuses is refused before decoding; JPEGs decode directly at 1/2, 1/4
    or 1/8 scale (``draft``); other formats are refused above :data:`MAX_DECODE_BYTES` of
    decoded pixels, then reduced. Unreadable input raises :class:`ImageReadError` naming the
    image and the reason.
    """
    label = name or _label_of(source)
    if isinstance(source, Image.Image):  # opened by the caller: checked here, unless loaded
        _guarded(lambda: _check_header(source, label), label)
        return _guarded(lambda: _bounded(source, label), label)
    image = _guarded(lambda: _opened(source, label), label)
    try:
        result = _guarded(lambda: _bounded(image, label), label)
    except ImageReadError:
        image.close()
        raise
    if result is not image:
        image.close()
    return result


def image_header(source: str | Path | bytes | BinaryIO, name: str | None = None) -> Image.Image:
    """``source`` opened, its header read and checked, no pixel decoded (close it after use).

    Only :data:`IMAGE_FORMATS` are tried; over :data:`MAX_PIXELS`, and a JPEG with more than
    :data:`MAX_JPEG_SCANS` scans (each one a pass over every pixel, ~10 bytes each), raise
    :class:`ImageReadError`, as does anything that is not such an image."""
    label = name or _label_of(source)
    return _guarded(lambda: _opened(source, label), label)


def _opened(source: str | Path | bytes | BinaryIO, label: str) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    image = Image.open(source, formats=IMAGE_FORMATS)
    try:
        _check_header(image, label)
    except ImageReadError:
        image.close()
        raise
    return image


def _guarded(work: Callable[[], _T], label: str) -> _T:
    """``work()``, PIL's errors turned into :class:`ImageReadError` naming ``label``."""
    try:
        return work()
    except ImageReadError:
        raise
    except FileNotFoundError as err:
        raise ImageReadError(label, "file not found") from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(label, f"image is too large ({err})") from err
    except UnidentifiedImageError as err:
        raise ImageReadError(label, "not a readable image (unknown format)") from err
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as err:
        raise ImageReadError(label, f"corrupt or truncated image ({err})") from err


def _check_header(image: Image.Image, label: str) -> None:
    """What an opened image may cost to decode, from its header alone."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            label,
            f"{width}x{height} pixels is too large (limit {MAX_PIXELS // 1_000_000} megapixels)",
        )
    limit = _scan_limit(image) if getattr(image, "fp", None) is not None else None
    if limit is not None:  # not loaded yet
        scans = _count_in(image.fp, b"\xff\xda")
        if scans > limit:
            raise ImageReadError(label, f"a JPEG of {scans:,} scans (limit {limit:,})")


def _scan_limit(image: Image.Image) -> int | None:
    """The most JPEG scans an image may hold: per JPEG stream (a TIFF's strips or tiles
    each hold one), or None for a format without JPEG data."""
    if image.format in ("JPEG", "MPO"):
        return MAX_JPEG_SCANS
    if image.format == "TIFF" and image.info.get("compression") in ("jpeg", "tiff_jpeg"):
        streams = image.tag_v2.get(324) or image.tag_v2.get(273) or (0,)  # tiles or strips
        return MAX_JPEG_SCANS * len(streams)
    return None


def _count_in(stream: BinaryIO, marker: bytes, chunk: int = 2**20) -> int:
    """Occurrences of a two-byte ``marker`` in the whole ``stream``, read 1 MB at a time; its
    position is kept. An SOS marker (``FFDA``) never occurs inside entropy-coded data (a 0xFF
    there is followed by 0x00 or a restart marker), so the count bounds a JPEG's scans."""
    position = stream.tell()
    stream.seek(0)
    count, carry = 0, b""
    while block := stream.read(chunk):
        count += (carry + block).count(marker)
        carry = block[-1:]
    stream.seek(position)
    return count


def _bounded(image: Image.Image, label: str) -> Image.Image:
    """:func:`open_image`'s work on an image whose header passed :func:`_check_header`
    (errors are PIL's own)."""
    width, height = image.size
    if getattr(image, "tell", lambda: 0)() != 0:
        image.seek(0)  # animated: the first frame
    factor = max(1, math.ceil(math.sqrt(width * height / MAX_WORK_PIXELS)))
    if factor > 1 and image.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale
        image.draft(image.mode, (width // factor, height // factor))
    decoded = decoded_bytes(image)
    if decoded > MAX_DECODE_BYTES:
        raise ImageReadError(
            label,
            f"{width}x{height} {image.mode} pixels decode to {decoded / 2**20:.0f} MB "
            f"(limit {MAX_DECODE_BYTES // 2**20} MB)",
        )
    orientation = _orientation(image)
    image.load()
    factor = max(1, math.ceil(math.sqrt(image.width * image.height / MAX_WORK_PIXELS)))
    if factor > 1:
        image = _reducible(image).reduce(factor)
    if orientation in _TRANSPOSE:  # upright, and says so: never turned twice
        image = image.transpose(_TRANSPOSE[orientation])
        for key in ("exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp"):
            image.info.pop(key, None)
    return image


def read_image(source: ImageSource, name: str | None = None) -> np.ndarray:
    """Any OCT image as a float32 ``(H, W)`` grayscale array in its own intensity range.

    8/16-bit grayscale, float TIFF, RGB(A), palette and animated images (first frame) work;
    files and PIL images go through :func:`open_image` (bounded size, EXIF orientation).
    Unreadable input raises :class:`ImageReadError` with the file's name and the reason.
    """
    label = name or _label_of(source)
    if isinstance(source, np.ndarray):
        return _array_to_gray(source, label)
    return _pil_to_gray(open_image(source, label), label)


def _label_of(source: Any) -> str:
    """A name for messages: a file's name, never an object's repr."""
    if isinstance(source, (str, Path)):
        return Path(source).name
    name = getattr(source, "filename" if isinstance(source, Image.Image) else "name", None)
    return Path(name).name if isinstance(name, str) and name else "image"


def _reducible(image: Image.Image) -> Image.Image:
    """``image`` in a mode ``Image.reduce`` supports, keeping colour, alpha and depth."""
    if image.mode in _REDUCIBLE_MODES:
        return image
    if image.mode.startswith("I;16"):
        return image.convert("I")
    if image.mode in ("P", "PA"):
        return image.convert("RGBA")
    return image.convert("L" if image.mode == "1" else "RGB")


def decoded_bytes(image: Image.Image) -> int:
    """Bytes PIL holds for ``image``'s pixels at its current size (known from the header)."""
    return image.width * image.height * _bytes_per_pixel(image.mode)


def _bytes_per_pixel(mode: str) -> int:
    """Bytes PIL holds per pixel of ``mode`` (RGB is stored as 4)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode in ("LA", "PA", "La") or mode.startswith("I;16"):
        return 2
    return 4


_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I", "F", "I;16", "CMYK", "La", "RGBa"})
_TRANSPOSE = {  # EXIF orientation -> the transposition that shows the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block: show the pixels as stored
        return 1


def _pil_to_gray(image: Image.Image, label: str) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.asarray(image, dtype=np.float32)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode != "L":
        image = image.convert("L")
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 2:
        raise ImageReadError(label, f"unsupported image mode {image.mode}")
    return array


def _array_to_gray(array: np.ndarray, label: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        if array.shape[-1] == 1:
            array = array[..., 0]
        else:
            rgb = array[..., :3].astype(np.float32)
            array = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ImageReadError(label, f"expected a 2-D image, got an array of shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise ImageReadError(label, "array must hold finite numbers")
    return array.astype(np.float32, copy=False)


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


@dataclass(frozen=True)
class Sample:
    """One image: its path, class index and group (patient) for disjoint splits."""

    path: Path
    label: int
    group: str


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
    from mirage_demo.nearcopies import group_near_copies

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
