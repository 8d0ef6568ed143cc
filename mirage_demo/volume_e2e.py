"""Heidelberg ``.e2e`` files as a :class:`Volume`, read with eyepy's ``HeE2eReader``.

An E2E file is a chain of chunks, each a table of folder headers (patient, study, series,
slice, type) pointing at data containers. eyepy indexes the whole chain with one greedy parse;
here its reader indexes it under bounds instead (:class:`_BoundedE2eReader`): each chunk must
lie after the previous one (a chain that loops is refused), holds at most 512 folders, and
the file at most :data:`MAX_E2E_FOLDERS`. The first series holding B-scans is the volume; each
B-scan's declared size is read from its container's header before any pixel is decoded, and a
B-scan is decoded (eyepy's ``float16u`` table, then its E2E display transform to 8 bits) when
it is asked for. B-scan lines are stored in degrees; they are placed on the localizer as
eyepy does (a 30-degree field, its centre at 15 degrees).

eyepy's E2E module builds a 65,536-entry table in Python when it is imported (about a
second), so this module is imported only when an E2E file is read
(:func:`mirage_demo.volume_io.load_volume`).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import construct as cs
import numpy as np
from eyepy.core.utils import from_e2e_intensity
from eyepy.io.he.e2e_format import (
    TypesEnum,
    containerheader_format,
    datacontainer_format,
    folderheader_format,
    header_format,
    version_format,
)
from eyepy.io.he.e2e_reader import E2EFolder, E2ESeriesStructure, HeE2eReader

from mirage_demo.volumes import (
    MAX_LOCALIZER_PIXELS,
    BScans,
    Position,
    Spacing,
    Volume,
    VolumeError,
    check_dimensions,
    check_file_size,
    laterality_of,
)

__all__ = ["E2E_MAGIC", "MAX_E2E_FOLDERS", "read_e2e"]

E2E_MAGIC = b"CMDb"
MAX_E2E_FOLDERS = 200_000  # folder headers indexed in one file (a B-scan has ~10)
_MAX_CHUNK_FOLDERS = 512  # what every chunk holds in Heidelberg's files
_BSCAN_IMAGE, _LOCALIZER_IMAGE = 35652097, 33620481  # eyepy's image types
_CONTAINER = containerheader_format.sizeof()  # 60 bytes before each folder's data
_FIELD_DEGREES = 30.0  # eyepy's assumed localizer field (its origin at the centre)
_PARSE_ERRORS = (cs.ConstructError, ValueError, UnicodeDecodeError, OverflowError, KeyError)


def read_e2e(path: str | Path, name: str | None = None) -> Volume:
    """The first series of B-scans in an ``.e2e`` file, as a :class:`Volume`."""
    name = name or Path(path).name
    size = check_file_size(path, name)
    reader = _BoundedE2eReader(path, name)
    stream = open(path, "rb")  # noqa: SIM115 (kept open for the volume's life, closed by it)
    reader.file_object = stream  # eyepy's folders read through it
    try:
        series, slices = _bscan_slices(reader, name)
        bscans = [folder for folder, _ in slices]
        height, width = _image_size(stream, bscans[0], size, name)
        check_dimensions(name, len(bscans), height, width, 2)
        for folder in bscans[1:]:
            if _image_size(stream, folder, size, name) != (height, width):
                raise VolumeError(name, "its B-scans differ in size")
        localizer = _localizer(stream, series, size)
        positions = _positions([structure for _, structure in slices], localizer)
        laterality = _laterality(series)
    except BaseException:
        stream.close()
        raise

    def read(index: int) -> np.ndarray:
        intensities = np.array(_pixels(stream, bscans[index]), dtype=np.float32)  # eyepy's table
        return from_e2e_intensity(intensities)  # eyepy's E2E display transform, uint8

    volume = Volume(
        name=name,
        source_format="Heidelberg .e2e",
        bscans=BScans(len(bscans), (height, width), read, name),
        positions=positions,
        localizer=localizer,
        laterality=laterality,
        spacing=Spacing(),  # eyepy does not know where E2E keeps the scales
    )
    volume._closers.append(stream.close)
    return volume


class _BoundedE2eReader(HeE2eReader):
    """eyepy's E2E reader, indexing the chunk chain under bounds (see the module's notes)."""

    def __init__(self, path: str | Path, name: str) -> None:
        self.name = name
        super().__init__(path)

    def _index_file(self) -> None:
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as stream:
            try:
                version = version_format.parse_stream(stream)
                header_format.parse_stream(stream)
            except _PARSE_ERRORS as err:
                raise VolumeError(self.name, "not a readable .e2e file (no header)") from err
            if not str(version.name).startswith(E2E_MAGIC.decode()):
                raise VolumeError(self.name, "not a Heidelberg .e2e file")
            position, indexed = stream.tell(), 0
            while position + header_format.sizeof() <= size:
                headers = self._chunk(stream, position, size)
                indexed += len(headers)
                if indexed > MAX_E2E_FOLDERS:
                    raise VolumeError(self.name, f"more than {MAX_E2E_FOLDERS:,} folders")
                for header in headers:
                    if int(header.type) != 0:  # empty folders pad the last chunk
                        self.file_hierarchy.add_folder(self._folder(header))
                if not headers:
                    break
                following = headers[-1].start + headers[-1].size + _CONTAINER
                if following <= position:
                    raise VolumeError(self.name, "corrupt .e2e file: its chunks loop")
                position = following

    def _chunk(self, stream: BinaryIO, position: int, size: int) -> list[Any]:
        stream.seek(position)
        try:
            chunk = header_format.parse_stream(stream)
        except _PARSE_ERRORS as err:
            raise VolumeError(self.name, "corrupt .e2e file (a chunk header)") from err
        count = chunk.num_entries
        if count > _MAX_CHUNK_FOLDERS or position + (count * folderheader_format.sizeof()) > size:
            raise VolumeError(self.name, f"corrupt .e2e file (a chunk of {count:,} folders)")
        try:
            return list(cs.Array(count, folderheader_format).parse_stream(stream))
        except _PARSE_ERRORS as err:
            raise VolumeError(self.name, "corrupt .e2e file (a folder header)") from err

    def _folder(self, header: Any) -> E2EFolder:
        fields = ("patient_id", "study_id", "series_id", "slice_id", "pos", "start", "type")
        values = {key: getattr(header, key) for key in (*fields, "size", "ind")}
        return E2EFolder(**values, reader=self)


def _bscan_slices(
    reader: HeE2eReader, name: str
) -> tuple[E2ESeriesStructure, list[tuple[E2EFolder, Any]]]:
    """The first series (by id) with B-scan images, and its (B-scan image folder, slice)
    pairs in scan order (the B-scan's index in its metadata, else the slice id)."""
    for series in reader.series:
        slices = []
        for slice_id, structure in series.slices.items():
            images = [
                f
                for f in structure.folders.get(TypesEnum.image, [])
                if _item_fields(reader.file_object, f)[1] == _BSCAN_IMAGE
            ]
            if images:
                slices.append((_scan_index(structure, slice_id), images[0], structure))
        if slices:
            slices.sort(key=lambda entry: entry[0])
            return series, [(folder, structure) for _, folder, structure in slices]
    raise VolumeError(name, "no series of B-scans in this .e2e file")


def _pixels(stream: BinaryIO, folder: E2EFolder) -> np.ndarray:
    """An image folder's pixels, parsed by eyepy's format (not kept: eyepy's ``folder.data``
    would keep every B-scan it ever decoded)."""
    stream.seek(folder.start)
    return datacontainer_format.parse_stream(stream).item.data


def _scan_index(structure: Any, slice_id: int) -> tuple[int, int]:
    try:
        return (int(structure._get_bscanmeta_data().aktImage), slice_id)
    except (KeyError, IndexError, *_PARSE_ERRORS):
        return (slice_id // 2, slice_id)


def _item_fields(stream: BinaryIO, folder: E2EFolder) -> tuple[int, ...]:
    """An image container's first fields: (size, type, values, height, width); never its
    pixels."""
    stream.seek(folder.start + _CONTAINER)
    head = stream.read(20)
    return struct.unpack("<5I", head) if len(head) == 20 else (0, 0, 0, 0, 0)


def _image_size(stream: BinaryIO, folder: E2EFolder, size: int, name: str) -> tuple[int, int]:
    """A B-scan's declared (height, width), checked against its container and the file."""
    _, _, values, height, width = _item_fields(stream, folder)
    if values != height * width or folder.start + _CONTAINER + 20 + 2 * values > size:
        raise VolumeError(name, "corrupt .e2e file: a B-scan's size does not match its data")
    return height, width


def _localizer(stream: BinaryIO, series: E2ESeriesStructure, size: int) -> np.ndarray | None:
    """The series' localizer image (uint8), or None when it has none (or a bad one)."""
    for folder in series.folders.get(TypesEnum.image, []):
        _, kind, values, height, width = _item_fields(stream, folder)
        if kind != _LOCALIZER_IMAGE or values != height * width or values == 0:
            continue
        if values > MAX_LOCALIZER_PIXELS or folder.start + _CONTAINER + 20 + values > size:
            return None
        return np.array(_pixels(stream, folder), dtype=np.uint8)
    return None


def _positions(slices: list[Any], localizer: np.ndarray | None) -> list[Position] | None:
    """Each B-scan's line (degrees) on the localizer's pixels, as eyepy places them."""
    if localizer is None:
        return None
    height, width = localizer.shape
    scale_x, scale_y = _FIELD_DEGREES / width, _FIELD_DEGREES / height
    centre = _FIELD_DEGREES / 2
    lines: list[Position] = []
    for structure in slices:
        try:
            meta = structure._get_bscanmeta_data()
        except (KeyError, IndexError, *_PARSE_ERRORS):
            return None
        lines.append(
            (
                ((meta.start_x + centre) / scale_x, (meta.start_y + centre) / scale_y),
                ((meta.end_x + centre) / scale_x, (meta.end_y + centre) / scale_y),
            )
        )
    return lines


def _laterality(series: E2ESeriesStructure) -> str | None:
    try:
        value = series.laterality()
    except (KeyError, IndexError, *_PARSE_ERRORS):
        return None
    return laterality_of({"82": "R", "76": "L"}.get(value, value))
