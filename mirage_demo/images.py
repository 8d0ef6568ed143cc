"""Image files: reading one at a bounded cost, and :class:`Sample`, one labelled image file.

``read_image`` (any file, PIL image or array -> float32 grayscale) is the first step of the
one preprocessing path (:class:`mirage_demo.data.Preprocessing`). :func:`open_image` is the one
place images are opened (app, CLI, evaluation, training, near-copy search).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
    "MAX_JPEG_SCANS",
    "ImageReadError",
    "ImageSource",
    "Sample",
    "decoded_bytes",
    "image_header",
    "open_image",
    "read_image",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"})
#: The only formats PIL may open (those of IMAGE_SUFFIXES): no other plugin runs, and some
#: (ICO, EPS) decode or run programs inside ``Image.open``.
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP")
MAX_PIXELS = 64_000_000  # a B-scan is ~0.5 MP; refuse decompression bombs early
MAX_WORK_PIXELS = 2048 * 2048  # larger images are decoded reduced to at most this
MAX_DECODE_BYTES = 192 * 2**20  # decoded pixels a file may need before it is reduced
MAX_JPEG_SCANS = 64  # a progressive JPEG has ~10 scans; each is a pass over every pixel
_T = TypeVar("_T")
#: What every reader accepts: a path, the file's bytes, a PIL image or an array.
ImageSource = Union[str, Path, bytes, Image.Image, np.ndarray]  # noqa: UP007 (runtime alias)


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


@dataclass(frozen=True)
class Sample:
    """One image: its path, class index and group (patient) for disjoint splits."""

    path: Path
    label: int
    group: str


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
