"""OCT volumes: what every volume reader returns (:class:`Volume`), its limits and its errors.

A volume is a stack of B-scans of one eye, often with an en-face localizer image on which
each B-scan is a line. Readers (:mod:`mirage_demo.volume_io`: Heidelberg ``.vol``, ``.e2e``
and XML exports, B-scan folders, DICOM Ophthalmic Tomography) check the sizes a file declares
against the limits below before any pixel is decoded, and return the B-scans as a lazy
sequence: a B-scan is decoded when it is asked for, so a volume never sits in memory whole.

Each B-scan comes as the 2-D array a picture of it decodes to (``uint8`` for 8-bit data,
``uint16`` for 16-bit data): given to :class:`~mirage_demo.inference.Predictor`, it takes the
very path a PNG of it would, so its prediction equals the 2-D prediction of that picture.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
from PIL import Image

from mirage_demo.images import MAX_WORK_PIXELS, ImageReadError, read_image

__all__ = [
    "MAX_LOCALIZER_PIXELS",
    "MAX_SLICES",
    "MAX_SLICE_PIXELS",
    "MAX_VOLUME_BYTES",
    "MAX_VOLUME_PIXELS",
    "BScans",
    "Position",
    "Spacing",
    "Volume",
    "VolumeError",
    "check_dimensions",
    "check_file_size",
    "first_line",
    "gray_array",
    "laterality_of",
    "slice_label",
]

MAX_SLICES = 512  # B-scans of one volume (clinical volumes: 19-261)
MAX_SLICE_PIXELS = MAX_WORK_PIXELS  # one B-scan (2048x2048; clinical B-scans: 0.2-1 MP)
MAX_VOLUME_PIXELS = 500_000_000  # all B-scans of one volume together (declared)
MAX_VOLUME_BYTES = 2 * 2**30  # a volume file on disk
MAX_LOCALIZER_PIXELS = MAX_WORK_PIXELS  # the en-face localizer image
#: A B-scan's line on the localizer: ((x0, y0), (x1, y1)), the localizer's pixel coordinates.
Position = tuple[tuple[float, float], tuple[float, float]]


class VolumeError(ImageReadError):
    """A volume that cannot be read: ``name`` says which, ``reason`` why (one line). An
    :class:`~mirage_demo.data.ImageReadError`, so whatever lists unreadable inputs lists it."""


@dataclass(frozen=True)
class Spacing:
    """Millimetres between A-scans (``x``, along a B-scan), between samples of an A-scan
    (``y``, depth) and between B-scans (``z``); None where the file does not say."""

    x_mm: float | None = None
    y_mm: float | None = None
    z_mm: float | None = None

    def describe(self) -> str:
        """``"0.0118 x 0.0039 mm per pixel, 0.12 mm between B-scans"`` (what is known)."""
        parts = []
        if self.x_mm and self.y_mm:
            parts.append(f"{self.x_mm:.4g} x {self.y_mm:.4g} mm per pixel")
        if self.z_mm:
            parts.append(f"{self.z_mm:.3g} mm between B-scans")
        return ", ".join(parts)


class BScans(Sequence[np.ndarray]):
    """A volume's B-scans, each decoded when it is asked for (``read(index)``), never kept.

    Every B-scan has ``shape`` (height, width); reading one that does not raises
    :class:`VolumeError`. Reads are serialised (one file handle serves them all)."""

    def __init__(
        self,
        count: int,
        shape: tuple[int, int],
        read: Callable[[int], np.ndarray],
        name: str,
    ) -> None:
        self.count = int(count)
        self.shape = (int(shape[0]), int(shape[1]))
        self.name = name
        self._read = read
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        index = int(index)
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(f"B-scan {index} is not in 0..{self.count - 1}")
        with self._lock:
            image = self._read(index)
        if image.shape[:2] != self.shape:
            height, width = image.shape[:2]
            raise VolumeError(
                slice_label(self.name, index),
                f"this B-scan is {width}x{height}, the volume's are "
                f"{self.shape[1]}x{self.shape[0]}",
            )
        return image

    def __iter__(self) -> Iterator[np.ndarray]:
        for index in range(self.count):
            yield self[index]


@dataclass
class Volume:
    """An OCT volume: its B-scans (lazy), where each lies on the localizer, the localizer,
    the eye and the spacing, where the file has them. Close it (or use ``with``) to release
    its file."""

    name: str
    source_format: str  # e.g. "Heidelberg .vol", "DICOM Ophthalmic Tomography"
    bscans: BScans
    positions: list[Position] | None = None
    localizer: np.ndarray | None = None  # (H, W) uint8
    laterality: str | None = None  # "OD" (right eye) or "OS" (left eye)
    spacing: Spacing = field(default_factory=Spacing)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.bscans)

    @property
    def shape(self) -> tuple[int, int]:
        """A B-scan's (height, width)."""
        return self.bscans.shape

    def close(self) -> None:
        """Release the file (and any temporary copy) behind the B-scans."""
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """One line for people: ``49 B-scans of 512x496 pixels (Heidelberg .vol, right eye)``."""
        height, width = self.shape
        eye = {"OD": ", right eye", "OS": ", left eye"}.get(self.laterality or "", "")
        text = f"{len(self)} B-scans of {width}x{height} pixels ({self.source_format}{eye})"
        spacing = self.spacing.describe()
        return f"{text}; {spacing}" if spacing else text


def check_dimensions(
    name: str, count: int, height: int, width: int, bytes_per_pixel: int = 1
) -> None:
    """Refuse, before decoding, a volume whose declared size passes a limit (one line naming
    the limit): B-scan count, pixels per B-scan, pixels in all."""
    if count < 1:
        raise VolumeError(name, "the file declares no B-scans")
    if height < 1 or width < 1:
        raise VolumeError(name, f"the file declares B-scans of {width}x{height} pixels")
    if count > MAX_SLICES:
        raise VolumeError(name, f"{count:,} B-scans is too many (limit {MAX_SLICES})")
    if height * width > MAX_SLICE_PIXELS:
        raise VolumeError(
            name,
            f"B-scans of {width}x{height} pixels are too large "
            f"(limit {MAX_SLICE_PIXELS / 1e6:.1f} megapixels each)",
        )
    if count * height * width > MAX_VOLUME_PIXELS:
        raise VolumeError(
            name,
            f"{count} B-scans of {width}x{height} pixels are too many pixels "
            f"(limit {MAX_VOLUME_PIXELS // 1_000_000} megapixels per volume)",
        )
    if bytes_per_pixel not in (1, 2, 4):
        raise VolumeError(name, f"{bytes_per_pixel * 8}-bit pixels are not supported")


def check_file_size(path: str | Path, name: str) -> int:
    """A volume file's size in bytes, refused above :data:`MAX_VOLUME_BYTES`."""
    size = os.path.getsize(path)
    if size > MAX_VOLUME_BYTES:
        raise VolumeError(name, f"the file is {size / 2**30:.1f} GB (limit 2 GB)")
    return size


def first_line(err: BaseException) -> str:
    """An exception's message for a one-line reason: its first line, at most 160 characters."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:160]


def gray_array(image: Image.Image, name: str) -> np.ndarray:
    """A decoded picture as the array the 2-D path classifies it from: ``uint8`` for 8-bit
    and colour pictures (converted to gray as :func:`~mirage_demo.data.read_image` does),
    ``uint16`` for 16-bit ones, ``float32`` for 32-bit integer or float ones."""
    gray = read_image(image, name)  # float32, the picture's own values
    if image.mode.startswith("I;16"):
        return gray.astype(np.uint16)
    if image.mode in ("I", "F"):
        return gray
    return gray.astype(np.uint8)  # integral values 0..255


def laterality_of(text: object) -> str | None:
    """``"OD"`` (right eye) or ``"OS"`` (left eye) from how a file says it, else None."""
    value = str(text or "").strip().upper().rstrip("\x00")
    if value in ("OD", "R", "RIGHT"):
        return "OD"
    if value in ("OS", "L", "LEFT"):
        return "OS"
    return None


def slice_label(name: str, index: int) -> str:
    """How a B-scan is named in messages and tables: ``scan.vol [B-scan 3]`` (from 1)."""
    return f"{name} [B-scan {index + 1}]"
