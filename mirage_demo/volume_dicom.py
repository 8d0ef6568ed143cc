"""DICOM Ophthalmic Tomography (and other multi-frame grayscale DICOM) as a :class:`Volume`.

Zeiss, Topcon, Heidelberg and others export OCT volumes as DICOM *Ophthalmic Tomography
Image Storage* (SOP class 1.2.840.10008.5.1.4.1.1.77.1.5.4): one multi-frame dataset, a frame
per B-scan. :func:`read_dicom` reads the header with pydicom (pixels left out), checks what it
declares (frames, rows x columns, bits, the file's size) against :mod:`mirage_demo.volumes`'
limits, indexes where each frame lies, and decodes one frame when it is asked for:

* uncompressed frames are read from their offset (8 or 16 bits);
* JPEG frames (baseline and extended) go through the app's own bounded image reader
  (:func:`mirage_demo.data.open_image`: scan-count and size limits), exactly as the same JPEG
  as a file would: a slice's prediction equals that file's;
* other compressions pydicom decodes without extra plugins (RLE, JPEG 2000 through Pillow) go
  through pydicom one frame at a time; those it cannot (JPEG-LS, lossless JPEG, HTJ2K without
  pylibjpeg or GDCM) and deflated datasets (a whole-file zip stream, a bomb in waiting) are
  refused with one line.

The en-face localizer of an OPT series is a separate DICOM instance, so none is read here;
each frame's line on it (``ReferenceCoordinates``) is, when present. :func:`write_opt` writes
such a dataset (the tests, the bundled example and the benchmark build volumes with it).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    generate_uid,
)

from mirage_demo.images import ImageReadError, open_image
from mirage_demo.volumes import (
    MAX_SLICES,
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

__all__ = ["OPHTHALMIC_TOMOGRAPHY", "is_dicom", "read_dicom", "write_opt"]

OPHTHALMIC_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
_JPEG = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})  # decoded by the app's image reader
_PIXEL_DATA = 0x7FE00010
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
_MAX_FRAGMENTS = 16 * MAX_SLICES  # fragments of encapsulated pixel data we index


def is_dicom(head: bytes) -> bool:
    """Whether a file's first bytes are a DICOM file's (the ``DICM`` mark after 128 bytes)."""
    return head[128:132] == b"DICM"


def read_dicom(path: str | Path, name: str | None = None) -> Volume:
    """A DICOM file of B-scans as a :class:`Volume` (frames decoded one at a time)."""
    name = name or Path(path).name
    size = check_file_size(path, name)
    stream = open(path, "rb")  # noqa: SIM115 (kept open for the volume's life, closed by it)
    try:
        header = _header(stream, name)
        syntax, frames, rows, cols, bits = _declared(header, name)
        spans = _frame_spans(stream, header, syntax, (frames, rows, cols, bits), size, name)
    except BaseException:
        stream.close()
        raise
    reader = _FrameReader(stream, header, syntax, spans, name)
    volume = Volume(
        name=name,
        source_format=_format_name(header),
        bscans=BScans(frames, (rows, cols), reader.read, name),
        positions=_positions(header, frames),
        laterality=laterality_of(header.get("ImageLaterality") or header.get("Laterality")),
        spacing=_spacing(header),
    )
    volume._closers.append(stream.close)
    return volume


def _header(stream: BinaryIO, name: str) -> Dataset:
    """The dataset up to its pixel data (not read), the stream left at the pixel data tag. A
    file without the ``DICM`` preamble or file meta (a bare dataset) is read too, its
    encoding guessed by pydicom."""
    try:
        header = dcmread(stream, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, struct.error, KeyError) as err:
        raise VolumeError(name, f"not a readable DICOM file ({first_line(err)})") from err
    meta = getattr(header, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        implicit, little = header.original_encoding
        if implicit is None or "Rows" not in header:
            raise VolumeError(name, "not a DICOM image (no transfer syntax, no rows)")
        header.file_meta = meta or FileMetaDataset()
        header.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )
        if not little:
            raise VolumeError(name, "a big-endian DICOM file without its file meta")
    return header


def _declared(header: Dataset, name: str) -> tuple[UID, int, int, int, int]:
    """Transfer syntax, frames, rows, columns and bits allocated, checked against the limits
    and what this reader can decode."""
    syntax = UID(header.file_meta.TransferSyntaxUID)
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
        rows, cols = int(header.Rows), int(header.Columns)
        bits = int(header.get("BitsAllocated", 8))
        samples = int(header.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError) as err:
        raise VolumeError(name, "no image in this DICOM file (rows, columns or frames)") from err
    check_dimensions(name, frames, rows, cols, max(1, bits // 8))
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise VolumeError(
            name, f"colour frames ({photometric}) are not OCT B-scans: expected grayscale"
        )
    if bits not in (8, 16):
        raise VolumeError(name, f"{bits}-bit frames are not supported (8 or 16 bits)")
    if syntax.is_deflated:
        raise VolumeError(name, "deflated DICOM files are not read (save it uncompressed)")
    if syntax.is_compressed and syntax not in _JPEG:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise VolumeError(
                name,
                f"its compression ({syntax.name}) needs an extra decoder; "
                "save it uncompressed or as JPEG",
            )
    return syntax, frames, rows, cols, bits


def _frame_spans(
    stream: BinaryIO,
    header: Dataset,
    syntax: UID,
    shape: tuple[int, int, int, int],
    size: int,
    name: str,
) -> list[list[tuple[int, int]]]:
    """Where each frame's bytes lie: a list of (offset, length) per frame."""
    frames, rows, cols, bits = shape
    endian = "<" if syntax.is_little_endian else ">"
    length = _pixel_data_length(stream, syntax, endian, name)
    start = stream.tell()
    if not syntax.is_compressed:
        frame_bytes = rows * cols * bits // 8
        declared_short = length != 0xFFFFFFFF and length < frames * frame_bytes
        if declared_short or start + frames * frame_bytes > size:
            raise VolumeError(
                name,
                f"truncated: {frames} frames of {cols}x{rows} need "
                f"{frames * frame_bytes:,} bytes of pixels, the file holds fewer",
            )
        return [[(start + i * frame_bytes, frame_bytes)] for i in range(frames)]
    fragments, offsets = _fragments(stream, endian, size, name)
    if len(fragments) == frames:
        return [[fragment] for fragment in fragments]
    if frames == 1:
        return [fragments]
    if len(offsets) == frames:  # the basic offset table says where each frame starts
        first = fragments[0][0] - 8 if fragments else 0
        starts = [first + offset for offset in offsets] + [size + 1]
        return [
            [f for f in fragments if starts[i] <= f[0] - 8 < starts[i + 1]] for i in range(frames)
        ]
    raise VolumeError(
        name,
        f"{frames} frames in {len(fragments)} fragments without an offset table: "
        "cannot tell the frames apart",
    )


def _pixel_data_length(stream: BinaryIO, syntax: UID, endian: str, name: str) -> int:
    """Read the pixel data element's header (the stream is at its tag); its value length."""
    head = stream.read(8)
    if len(head) < 8:
        raise VolumeError(name, "the DICOM file holds no pixel data")
    group, element = struct.unpack(f"{endian}HH", head[:4])
    if (group << 16 | element) != _PIXEL_DATA:
        raise VolumeError(name, "the DICOM file holds no pixel data (or only float pixels)")
    if syntax.is_implicit_VR:
        return struct.unpack(f"{endian}L", head[4:8])[0]
    return struct.unpack(f"{endian}L", stream.read(4))[0]  # OB/OW: 2 reserved bytes first


def _fragments(
    stream: BinaryIO, endian: str, size: int, name: str
) -> tuple[list[tuple[int, int]], list[int]]:
    """Encapsulated pixel data: the (offset, length) of each fragment's bytes and the basic
    offset table, read item header by item header (a bounded number of them)."""
    offsets: list[int] = []
    fragments: list[tuple[int, int]] = []
    first = True
    while True:
        head = stream.read(8)
        if len(head) < 8:
            break
        group, element, length = struct.unpack(f"{endian}HHL", head)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            break
        if tag != _ITEM or length == 0xFFFFFFFF or stream.tell() + length > size:
            raise VolumeError(name, "corrupt encapsulated pixel data (a bad item)")
        if first:  # the basic offset table
            if length % 4:
                raise VolumeError(name, "corrupt encapsulated pixel data (offset table)")
            offsets = list(struct.unpack(f"{endian}{length // 4}L", stream.read(length)))
            first = False
            continue
        fragments.append((stream.tell(), length))
        if len(fragments) > _MAX_FRAGMENTS:
            raise VolumeError(name, f"more than {_MAX_FRAGMENTS:,} pixel data fragments")
        stream.seek(length, io.SEEK_CUR)
    return fragments, offsets


class _FrameReader:
    """Decodes one frame at a time from its spans in the open file."""

    def __init__(
        self,
        stream: BinaryIO,
        header: Dataset,
        syntax: UID,
        spans: list[list[tuple[int, int]]],
        name: str,
    ) -> None:
        self.stream, self.header, self.syntax, self.spans = stream, header, syntax, spans
        self.name = name
        self.rows, self.cols = int(header.Rows), int(header.Columns)
        self.bits = int(header.get("BitsAllocated", 8))
        self.signed = int(header.get("PixelRepresentation", 0)) == 1
        self.inverted = str(header.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"

    def read(self, index: int) -> np.ndarray:
        label = slice_label(self.name, index)
        data = b"".join(self._bytes(offset, length) for offset, length in self.spans[index])
        if not self.syntax.is_compressed:
            image = self._native(data)
        elif self.syntax in _JPEG:
            with open_image(data, label) as decoded:  # the 2-D path's reader and limits
                image = gray_array(decoded, label)
        else:
            image = self._decoded(data, label)
        return self._monochrome2(image)

    def _bytes(self, offset: int, length: int) -> bytes:
        self.stream.seek(offset)
        return self.stream.read(length)

    def _native(self, data: bytes) -> np.ndarray:
        kind = ("i" if self.signed else "u") + str(self.bits // 8)
        endian = "<" if self.syntax.is_little_endian else ">"
        array = np.frombuffer(data, dtype=f"{endian}{kind}").reshape(self.rows, self.cols)
        return array.astype(array.dtype.newbyteorder("="))

    def _decoded(self, data: bytes, label: str) -> np.ndarray:
        """One frame through pydicom's decoder (RLE, JPEG 2000), from a one-frame dataset."""
        frame = Dataset()
        frame.file_meta = FileMetaDataset()
        frame.file_meta.TransferSyntaxUID = self.syntax
        for keyword in _PIXEL_MODULE:
            if keyword in self.header:
                setattr(frame, keyword, self.header[keyword].value)
        frame.NumberOfFrames = 1
        frame.PixelData = encapsulate([data])
        try:
            array = pixel_array(frame)
        except Exception as err:  # the decoders' own errors: any of them
            raise ImageReadError(label, f"corrupt frame ({first_line(err)})") from err
        if array.shape != (self.rows, self.cols):
            raise ImageReadError(label, f"the frame decodes to {array.shape}, not its header's")
        return array

    def _monochrome2(self, image: np.ndarray) -> np.ndarray:
        """MONOCHROME1 (white is 0) turned into MONOCHROME2, as every picture is shown."""
        if not self.inverted or not np.issubdtype(image.dtype, np.unsignedinteger):
            return image
        stored = int(self.header.get("BitsStored", self.bits))
        return (np.asarray((1 << stored) - 1, image.dtype) - image).astype(image.dtype)


_PIXEL_MODULE = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
)


def _format_name(header: Dataset) -> str:
    sop = str(header.get("SOPClassUID", "") or header.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop == OPHTHALMIC_TOMOGRAPHY:
        return "DICOM Ophthalmic Tomography"
    return f"DICOM ({UID(sop).name if sop else 'unknown kind'}), read as B-scans"


def _positions(header: Dataset, frames: int) -> list[Position] | None:
    """Each frame's line on the referenced localizer (``ReferenceCoordinates``: row, column
    of its start and end), or None when a frame has none."""
    groups = header.get("PerFrameFunctionalGroupsSequence")
    if not groups or len(groups) != frames:
        return None
    positions: list[Position] = []
    for group in groups:
        try:
            location = group.OphthalmicFrameLocationSequence[0]
            row0, col0, row1, col1 = (float(v) for v in location.ReferenceCoordinates[:4])
        except (AttributeError, IndexError, TypeError, ValueError):
            return None
        positions.append(((col0, row0), (col1, row1)))
    return positions


def _spacing(header: Dataset) -> Spacing:
    """Pixel spacing (row: depth, column: along the B-scan) from the shared functional groups
    or the top level; the distance between B-scans when the file gives it."""
    spacing = header.get("PixelSpacing")
    try:
        shared = header.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        spacing = shared.get("PixelSpacing") or spacing
    except (AttributeError, IndexError):
        pass
    between = header.get("SpacingBetweenSlices")
    try:
        y_mm, x_mm = (float(v) for v in spacing[:2]) if spacing else (None, None)
        z_mm = float(between) if between else None
    except (TypeError, ValueError):
        return Spacing()
    return Spacing(x_mm, y_mm, z_mm)


def write_opt(
    path: str | Path,
    frames: Sequence[np.ndarray] | None = None,
    *,
    jpeg_frames: Sequence[bytes] | None = None,
    laterality: str | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    positions: Sequence[Position] | None = None,
    description: str = "",
) -> Path:
    """Write an Ophthalmic Tomography dataset: ``frames`` (same-shape uint8 or uint16 arrays,
    stored uncompressed) or ``jpeg_frames`` (8-bit grayscale JPEG files, stored as they are:
    JPEG Baseline). ``positions``: each frame's ((x0, y0), (x1, y1)) on a localizer;
    ``pixel_spacing``: (depth, along the B-scan) in mm."""
    if (frames is None) == (jpeg_frames is None):
        raise ValueError("give frames or jpeg_frames")
    ds = _opt_dataset(ExplicitVRLittleEndian if frames is not None else JPEGBaseline8Bit)
    if frames is not None:
        stack = np.stack([np.asarray(f) for f in frames])
        if stack.dtype not in (np.uint8, np.uint16) or stack.ndim != 3:
            raise ValueError("frames must be same-shape 2-D uint8 or uint16 arrays")
        ds.NumberOfFrames, ds.Rows, ds.Columns = stack.shape
        bits = stack.dtype.itemsize * 8
        ds.PixelData = stack.astype(stack.dtype.newbyteorder("<")).tobytes()
    else:
        with open_image(jpeg_frames[0], "frame 1") as first:
            ds.Columns, ds.Rows = first.size
        ds.NumberOfFrames, bits = len(jpeg_frames), 8
        ds.PixelData = encapsulate(list(jpeg_frames))
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.ImageLaterality = {"OD": "R", "OS": "L"}.get(str(laterality), "")
    ds.SeriesDescription = description
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if positions is not None:
        ds.PerFrameFunctionalGroupsSequence = [_frame_location(p) for p in positions]
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def _opt_dataset(syntax: UID) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OPHTHALMIC_TOMOGRAPHY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = OPHTHALMIC_TOMOGRAPHY, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OPT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    return ds


def _frame_location(position: Position) -> Dataset:
    (x0, y0), (x1, y1) = position
    location = Dataset()
    location.ReferenceCoordinates = [float(y0), float(x0), float(y1), float(x1)]
    group = Dataset()
    group.OphthalmicFrameLocationSequence = [location]
    return group
