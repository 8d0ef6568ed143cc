"""Heidelberg Spectralis exports (``.vol``, XML folders) and B-scan folders as :class:`Volume`.

Read with eyepy's own format definitions (MIT; https://github.com/MedVisBonn/eyepy):

* ``.vol``: eyepy's ``construct`` structures for the 2,048-byte file header and each B-scan's
  header. The headers are walked first (every B-scan's offset checked against the file's size);
  a B-scan's float32 intensities are then read at its offset when asked for and shown with
  eyepy's Heyex display transform (``from_vol_intensity``: the log curve Heyex uses, to 8
  bits). eyepy's own ``HeVolReader`` parses the whole file into memory at once, so it is not
  used as such.
* XML exports (an XML file and one image per B-scan, plus the localizer): eyepy's
  ``HeXmlReader`` reads the XML (B-scan positions in mm, scales, the eye, file names); each
  B-scan image is then read, when asked for, by the app's bounded image reader, as the same
  image file given alone would be.
* B-scan folders (images only): eyepy's conventions (one image per B-scan, in name order: here
  the natural order, ``B2`` before ``B10``); each image is read by the app's bounded reader.

A folder may also be a ``.zip`` (read member by member, with :mod:`mirage_demo.uploads`' caps).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import construct as cs
import numpy as np
from eyepy.core.utils import from_vol_intensity
from eyepy.io.he.vol_reader import bscan_format, vol_format
from eyepy.io.he.xml_reader import HeXmlReader, get_xml_root

from mirage_demo.images import IMAGE_SUFFIXES, ImageReadError, image_header, open_image
from mirage_demo.uploads import RequestBudget, ZipUpload
from mirage_demo.volumes import (
    MAX_LOCALIZER_PIXELS,
    BScans,
    Position,
    Spacing,
    Volume,
    VolumeError,
    check_dimensions,
    check_file_size,
    first_line,
    gray_array,
    laterality_of,
    slice_label,
)

__all__ = [
    "MAX_XML_BYTES",
    "VOL_MAGICS",
    "FileSet",
    "read_bscan_folder",
    "read_vol",
    "read_xml",
]

VOL_MAGICS = (b"HSF-OCT-", b"ep-v")  # Heidelberg's version string, or eyepy's when it wrote it
MAX_XML_BYTES = 32 * 2**20  # an export's XML (segmentation lines make it megabytes)
_VOL_HEADER = cs.Struct(*vol_format.subcons[:-2])  # all but the localizer and B-scans
_VOL_HEADER_SIZE = 2048
_BSCAN_HEADER = cs.Struct(*bscan_format.subcons[:12])  # up to the segmentation lines
_BSCAN_HEADER_SIZE = 256
_MAX_BSCAN_HEADER = 16 * 2**20  # a B-scan's header with its segmentation lines
_PARSE_ERRORS = (cs.ConstructError, ValueError, UnicodeDecodeError, OverflowError)


# --------------------------------------------------------------------------------------------
# .vol


def read_vol(path: str | Path, name: str | None = None) -> Volume:
    """A Heidelberg ``.vol`` file as a :class:`Volume` (B-scans read one at a time)."""
    name = name or Path(path).name
    size = check_file_size(path, name)
    stream = open(path, "rb")  # noqa: SIM115 (kept open for the volume's life, closed by it)
    try:
        header = _vol_header(stream, name)
        count, height, width = header.n_bscans, header.size_y, header.size_x
        check_dimensions(name, count, height, width, 4)
        localizer = _vol_localizer(stream, header, size, name)
        offsets, positions = _vol_bscans(stream, header, size, name)
    except BaseException:
        stream.close()
        raise

    def read(index: int) -> np.ndarray:
        stream.seek(offsets[index])
        raw = np.frombuffer(stream.read(height * width * 4), dtype="<f4")
        intensities = raw.reshape(height, width).astype(np.float32)  # a writable copy
        intensities[~np.isfinite(intensities)] = 0.0
        return from_vol_intensity(intensities)  # eyepy's Heyex display transform, uint8

    volume = Volume(
        name=name,
        source_format="Heidelberg .vol",
        bscans=BScans(count, (height, width), read, name),
        positions=positions,
        localizer=localizer,
        laterality=laterality_of(header.scan_position),
        spacing=_spacing(header.scale_x, header.scale_y, header.distance),
    )
    volume._closers.append(stream.close)
    return volume


def _vol_header(stream: BinaryIO, name: str) -> Any:
    data = stream.read(_VOL_HEADER_SIZE)
    if not data.startswith(VOL_MAGICS) or len(data) < _VOL_HEADER_SIZE:
        raise VolumeError(name, "not a Heidelberg .vol file (no HSF-OCT header)")
    try:
        header = _VOL_HEADER.parse(data)
    except _PARSE_ERRORS as err:
        raise VolumeError(name, f"corrupt .vol header ({first_line(err)})") from err
    if header.scan_pattern in (2, 5):
        pattern = "a circle scan" if header.scan_pattern == 2 else "a radial (star) scan"
        raise VolumeError(name, f"{pattern}, not a volume of parallel B-scans")
    return header


def _vol_localizer(stream: BinaryIO, header: Any, size: int, name: str) -> np.ndarray | None:
    """The near-infrared localizer (uint8) right after the header, or None if it has none."""
    width, height = header.size_x_slo, header.size_y_slo
    if width * height == 0:
        return None
    if width * height > MAX_LOCALIZER_PIXELS:
        raise VolumeError(name, f"a localizer of {width}x{height} pixels is too large")
    if _VOL_HEADER_SIZE + width * height > size:
        raise VolumeError(name, "truncated: the file ends inside its localizer image")
    stream.seek(_VOL_HEADER_SIZE)
    return np.frombuffer(stream.read(width * height), np.uint8).reshape(height, width).copy()


def _vol_bscans(
    stream: BinaryIO, header: Any, size: int, name: str
) -> tuple[list[int], list[Position] | None]:
    """Walk the B-scans' headers (no pixel read): each one's pixel offset, checked against
    the file's size, and its line on the localizer (mm over the localizer's mm per pixel)."""
    count, height, width = header.n_bscans, header.size_y, header.size_x
    at = _VOL_HEADER_SIZE + header.size_x_slo * header.size_y_slo
    offsets, lines = [], []
    for index in range(count):
        stream.seek(at)
        try:
            bscan = _BSCAN_HEADER.parse(stream.read(_BSCAN_HEADER_SIZE))
        except _PARSE_ERRORS as err:
            raise VolumeError(
                name, f"truncated or corrupt: B-scan {index + 1} of {count} has no header"
            ) from err
        if not _BSCAN_HEADER_SIZE <= bscan.bscan_hdr_size <= _MAX_BSCAN_HEADER:
            raise VolumeError(name, f"corrupt: B-scan {index + 1} declares a bad header size")
        end = at + bscan.bscan_hdr_size + height * width * 4
        if end > size:
            raise VolumeError(
                name,
                f"truncated: {count} B-scans of {width}x{height} are declared, "
                f"the file ends inside B-scan {index + 1}",
            )
        offsets.append(at + bscan.bscan_hdr_size)
        lines.append(((bscan.start_x, bscan.start_y), (bscan.end_x, bscan.end_y)))
        at = end
    return offsets, _on_localizer(lines, header.scale_x_slo, header.scale_y_slo)


def _on_localizer(
    lines: Sequence[Position], scale_x: float | None, scale_y: float | None
) -> list[Position] | None:
    """Lines in mm -> the localizer's pixels (mm / mm-per-pixel, as eyepy's transform)."""
    if not scale_x or not scale_y or not lines:
        return None
    try:
        return [
            ((float(x0) / scale_x, float(y0) / scale_y), (float(x1) / scale_x, float(y1) / scale_y))
            for (x0, y0), (x1, y1) in lines
        ]
    except (TypeError, ValueError):
        return None


def _spacing(x_mm: Any, y_mm: Any, z_mm: Any) -> Spacing:
    def value(v: Any) -> float | None:
        try:
            number = float(v)
        except (TypeError, ValueError):
            return None
        return number if np.isfinite(number) and number > 0 else None

    return Spacing(value(x_mm), value(y_mm), value(z_mm))


# --------------------------------------------------------------------------------------------
# Folders and zips of images


class FileSet:
    """The files of an export: a folder's (not searched below it) or a zip's (read member by
    member within a :class:`~mirage_demo.uploads.RequestBudget`), by their plain names."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._paths: dict[str, str] = {}  # lower-case name -> path on disk
        self._items: dict[str, Any] = {}  # lower-case name -> zip item
        self._stack = ExitStack()
        self._budget = RequestBudget()

    @classmethod
    def folder(cls, path: str | Path, label: str | None = None) -> FileSet:
        files = cls(label or Path(path).name)
        for entry in sorted(Path(path).iterdir()):
            if entry.is_file() and not entry.name.startswith("."):
                files._paths.setdefault(entry.name.lower(), str(entry))
        return files

    @classmethod
    def zip(cls, path: str | Path, label: str | None = None) -> FileSet:
        files = cls(label or Path(path).name)
        try:
            upload = ZipUpload.open(path, files.label, suffixes={*IMAGE_SUFFIXES, ".xml"})
        except ImageReadError as err:
            raise VolumeError(files.label, err.reason) from err
        files._stack.callback(upload.close)
        for item in upload.items:
            plain = PurePosixPath(item.member or item.name).name
            files._items.setdefault(plain.lower(), item)
        return files

    @property
    def names(self) -> list[str]:
        """Plain file names, in natural order (``B2`` before ``B10``)."""
        found = [Path(p).name for p in self._paths.values()]
        found += [PurePosixPath(i.member or i.name).name for i in self._items.values()]
        return sorted(found, key=natural_key)

    def has(self, name: str) -> bool:
        return name.lower() in self._paths or name.lower() in self._items

    def read(self, name: str) -> str | bytes:
        """A file's path (folder) or bytes (zip, capped); :class:`ImageReadError` if not there."""
        key = name.lower()
        if key in self._paths:
            return self._paths[key]
        if key in self._items:
            return self._items[key].load(self._budget)
        raise ImageReadError(f"{self.label}/{name}", "not in the export")

    def close(self) -> None:
        self._stack.close()


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``B2`` before ``B10`` (digit runs compared as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def read_bscan_folder(files: FileSet, name: str | None = None) -> Volume:
    """A folder (or zip) of B-scan images, one per B-scan in natural name order."""
    name = name or files.label
    images = [n for n in files.names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        files.close()
        raise VolumeError(name, "no B-scan images (PNG, JPEG, TIFF, BMP) in it")
    return _image_volume(files, images, name, "B-scan images")


def _image_volume(
    files: FileSet,
    images: list[str],
    name: str,
    source_format: str,
    **details: Any,
) -> Volume:
    """A volume of image files (the first one's header gives the size; each is checked when
    it is read)."""
    try:
        height, width = _header_size(files, images[0])
        check_dimensions(name, len(images), height, width)
    except BaseException:
        files.close()
        raise

    def read(index: int) -> np.ndarray:
        label = slice_label(name, index)
        with open_image(files.read(images[index]), label) as image:  # the 2-D path's reader
            return gray_array(image, label)

    volume = Volume(
        name, source_format, BScans(len(images), (height, width), read, name), **details
    )
    volume._closers.append(files.close)
    return volume


def _header_size(files: FileSet, image: str) -> tuple[int, int]:
    try:
        with image_header(files.read(image), image) as header:
            return header.height, header.width
    except ImageReadError as err:
        raise VolumeError(files.label, f"its first B-scan {err.reason}") from err


# --------------------------------------------------------------------------------------------
# XML exports


def read_xml(files: FileSet, xml_name: str, name: str | None = None) -> Volume:
    """A Heidelberg XML export (the XML and its images, in a folder or zip)."""
    name = name or files.label
    try:
        reader = _xml_reader(files, xml_name, name)
        meta = [dict(m) for m in reader.bscan_meta]
        values = reader.parsed_values
        localizer_name = _localizer_name(reader)
    except VolumeError:
        files.close()
        raise
    except Exception as err:  # eyepy reads the XML's fields with few checks: any error
        files.close()
        raise VolumeError(
            name, f"not a readable Heidelberg XML export ({first_line(err)})"
        ) from err
    finally:
        get_xml_root.cache_clear()  # eyepy keeps parsed XML trees: drop them
    images = [_plain(m.get("scan_name")) for m in meta]
    missing = [image for image in images if not image or not files.has(image)]
    if missing or not images:
        files.close()
        what = f"B-scan image {missing[0]!r} is" if missing and missing[0] else "B-scans are"
        raise VolumeError(name, f"{what} missing from the export")
    lines = [(tuple(m["start_pos"]), tuple(m["end_pos"])) for m in meta]
    return _image_volume(
        files,
        images,
        name,
        "Heidelberg XML export",
        positions=_on_localizer(lines, values.get("scale_x_slo"), values.get("scale_y_slo")),
        localizer=_xml_localizer(files, localizer_name),
        laterality=laterality_of(values.get("scan_position")),
        spacing=_spacing(values.get("scale_x"), values.get("scale_y"), _z_spacing(meta)),
    )


def _xml_reader(files: FileSet, xml_name: str, name: str) -> HeXmlReader:
    """eyepy's reader on the export's XML (at most :data:`MAX_XML_BYTES`, copied into a
    temporary folder under a name eyepy accepts)."""
    source = files.read(xml_name)
    size = os.path.getsize(source) if isinstance(source, str) else len(source)
    if size > MAX_XML_BYTES:
        raise VolumeError(name, f"its XML is larger than {MAX_XML_BYTES // 2**20} MB")
    if isinstance(source, str):
        source = Path(source).read_bytes()
    with tempfile.TemporaryDirectory(prefix="mirage-xml-") as folder:
        path = Path(folder) / "export.xml"
        path.write_bytes(source)
        return HeXmlReader(path)


def _localizer_name(reader: HeXmlReader) -> str | None:
    found = reader.xml_root[0].find(".//ImageType[Type='LOCALIZER']../ImageData/ExamURL")
    return _plain(found.text) if found is not None else None


def _xml_localizer(files: FileSet, image: str | None) -> np.ndarray | None:
    """The export's localizer as uint8, read by the bounded reader; None if it has none or
    it cannot be read (the B-scans are still classified)."""
    if not image or not files.has(image):
        return None
    try:
        with open_image(files.read(image), image) as picture:
            if picture.width * picture.height > MAX_LOCALIZER_PIXELS:
                return None
            array = gray_array(picture, image)
    except ImageReadError:
        return None
    if array.dtype != np.uint8:  # 16-bit or float: scaled to 8 bits for display
        low, high = float(array.min()), float(array.max())
        array = ((array - low) * (255.0 / max(high - low, 1e-12))).astype(np.uint8)
    return array


def _z_spacing(meta: list[dict[str, Any]]) -> float | None:
    """The mean distance between consecutive B-scans' start points (mm)."""
    if len(meta) < 2:
        return None
    try:
        starts = np.array([m["start_pos"] for m in meta], dtype=float)
    except (TypeError, ValueError, KeyError):
        return None
    steps = np.hypot(*np.diff(starts, axis=0).T)
    return float(steps.mean()) if np.isfinite(steps).all() and steps.mean() > 0 else None


def _plain(text: Any) -> str:
    """A file name from an XML's ``ExamURL`` (``file:///\\\\host\\dir\\B1.tif`` -> ``B1.tif``):
    only the last part, so it can only name a file of the export itself."""
    return re.split(r"[\\/]", str(text or "").strip())[-1]
