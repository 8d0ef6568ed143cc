"""Untrusted uploads for batch classification: files and zip archives, at a bounded cost.

A request's uploads become a list of :class:`UploadItem` (one per image, or per entry that
cannot be one, so unreadable entries are listed, never fatal for the good ones). Zip members
are read lazily, one at a time, streamed with a real byte cap: the sizes a zip declares are
not trusted. Before any member is read, the archive's entries are counted from its end record.
A :class:`RequestBudget` caps what one request may unpack and decode in all.

>>> budget = RequestBudget()
>>> with ExitStack() as stack:
...     items = expand_uploads([("scans.zip", "/tmp/x.zip")], stack)
...     for item in items:
...         source = item.load(budget)  # a path or the file's bytes; or ImageReadError
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Collection, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mirage_demo.images import IMAGE_SUFFIXES, ImageReadError, image_header

__all__ = [
    "LISTED_SUFFIXES",
    "MAX_MEMBER_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_ENTRIES",
    "MAX_REQUEST_PIXELS",
    "MAX_REQUEST_ZIPS",
    "MAX_ZIP_ENTRIES",
    "RequestBudget",
    "UploadItem",
    "ZipUpload",
    "expand_uploads",
    "zip_entry_count",
]

MAX_ZIP_ENTRIES = 2000  # entries of one zip (images, folders, anything)
MAX_CENTRAL_DIRECTORY = 1 * 2**20  # bytes of a zip's table of contents (parsed in memory)
MAX_REQUEST_ENTRIES = MAX_ZIP_ENTRIES  # entries of all zips of one request together
MAX_REQUEST_ZIPS = 32  # zips opened by one request (each holds a file open)
MAX_MEMBER_BYTES = 64 * 2**20  # one unpacked image file
MAX_REQUEST_BYTES = 256 * 2**20  # unpacked from all zips of one request
MAX_REQUEST_PIXELS = 500_000_000  # declared pixels of all images of one request
#: What a zip's listing holds by default: images, and nested zips (to say they are skipped).
LISTED_SUFFIXES = frozenset({*IMAGE_SUFFIXES, ".zip"})
_CHUNK = 2**20  # inflate this much at a time: a bomb never expands in one call
_SUPPORTED_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError)


@dataclass
class RequestBudget:
    """What one request may still unpack (bytes) and decode (declared pixels)."""

    bytes_left: int = MAX_REQUEST_BYTES
    pixels_left: int = MAX_REQUEST_PIXELS

    def take_bytes(self, count: int) -> bool:
        """Reserve ``count`` unpacked bytes; ``False`` (nothing taken) if they do not fit."""
        if count > self.bytes_left:
            return False
        self.bytes_left -= count
        return True

    def take_pixels(self, source: str | bytes) -> str | None:
        """Reserve an image's declared pixels (read from its header); the reason if refused.

        A header that cannot be read reserves nothing: the decoder reports why later."""
        try:
            with image_header(source) as image:
                pixels = image.width * image.height
        except ImageReadError:  # unreadable: the decoder says why, once
            pixels = 0
        if pixels > self.pixels_left:
            total = MAX_REQUEST_PIXELS // 1_000_000
            return f"skipped: this batch reached its limit of {total} megapixels in all"
        self.pixels_left -= pixels
        return None


@dataclass
class UploadItem:
    """One image of a request (or an entry that is not one): its name for people, and how
    to read it. ``error`` is set when it cannot be read at all."""

    name: str
    reader: Callable[[RequestBudget], str | bytes] | None = None
    error: str | None = None
    member: str | None = None  # its path inside the zip it comes from

    def load(self, budget: RequestBudget) -> str | bytes:
        """The image source (a path or the file's bytes) within ``budget``, or
        :class:`ImageReadError` naming this item and the reason."""
        if self.error is not None or self.reader is None:
            raise ImageReadError(self.name, self.error or "nothing to read")
        source = self.reader(budget)
        refused = budget.take_pixels(source)
        if refused:
            raise ImageReadError(self.name, refused)
        return source


@dataclass
class ZipUpload:
    """An uploaded zip archive, opened for lazy, capped reading of its images."""

    path: str
    label: str
    items: list[UploadItem] = field(default_factory=list)
    _archive: zipfile.ZipFile | None = None

    @classmethod
    def open(
        cls, path: str | Path, label: str, suffixes: Collection[str] = LISTED_SUFFIXES
    ) -> ZipUpload:
        """List ``path``'s entries (counted from the end record before any is read): those
        whose names end with one of ``suffixes`` become items.

        Raises :class:`ImageReadError` (naming ``label``) for an archive that cannot be used
        at all: not a zip, too many entries, a table of contents too large."""
        entries, directory_size = _declared_entries(path, label)
        if entries > MAX_ZIP_ENTRIES:
            raise ImageReadError(
                label, f"the archive holds {entries:,} entries (limit {MAX_ZIP_ENTRIES:,})"
            )
        if directory_size > MAX_CENTRAL_DIRECTORY:
            raise ImageReadError(
                label,
                f"the archive's table of contents is {directory_size:,} bytes "
                f"(limit {MAX_CENTRAL_DIRECTORY:,})",
            )
        try:
            archive = zipfile.ZipFile(path)
        except (*_ZIP_ERRORS, NotImplementedError) as err:
            raise ImageReadError(label, f"not a readable zip archive ({err})") from err
        upload = cls(str(path), label, _archive=archive)
        infos = archive.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:  # the end record understated them
            archive.close()
            raise ImageReadError(
                label, f"the archive holds {len(infos):,} entries (limit {MAX_ZIP_ENTRIES:,})"
            )
        upload.items = [upload._item(info) for info in infos if _is_listed(info, suffixes)]
        return upload

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None

    def _item(self, info: zipfile.ZipInfo) -> UploadItem:
        name = f"{self.label}/{info.filename}"
        error = _unreadable_entry(info)
        if error is not None:
            return UploadItem(name, error=error, member=info.filename)
        return UploadItem(
            name, reader=lambda budget: self._read(info, name, budget), member=info.filename
        )

    def read_member(self, member: str, limit: int, budget: RequestBudget) -> bytes | None:
        """The member named exactly ``member`` (e.g. a manifest beside the images), streamed
        with a cap of ``limit`` bytes; ``None`` if the archive has none. Raises
        :class:`ImageReadError` for a member that is larger, encrypted or corrupt."""
        if self._archive is None:
            raise ImageReadError(self.label, "the archive is closed")
        found = [info for info in self._archive.infolist() if info.filename == member]
        if not found:
            return None
        info, name = found[0], f"{self.label}/{member}"
        error = _unreadable_entry(info)
        if error is None and info.file_size > limit:
            error = f"skipped: larger than {limit:,} bytes"
        if error is not None:
            raise ImageReadError(name, error)
        return self._read(info, name, budget, limit)

    def _read(
        self,
        info: zipfile.ZipInfo,
        name: str,
        budget: RequestBudget,
        limit: int = MAX_MEMBER_BYTES,
    ) -> bytes:
        """One member, streamed: at most its declared size, at most ``limit`` bytes."""
        if self._archive is None:
            raise ImageReadError(name, "the archive is closed")
        if not budget.take_bytes(info.file_size):
            limit = MAX_REQUEST_BYTES // 2**20
            raise ImageReadError(
                name, f"skipped: this batch reached its limit of {limit} MB unpacked"
            )
        chunks, total = [], 0
        try:
            with self._archive.open(info) as stream:  # stops at the declared size, too
                while total <= limit and (chunk := stream.read(min(_CHUNK, limit + 1))):
                    chunks.append(chunk)  # each read inflates at most _CHUNK bytes
                    total += len(chunk)
        except (*_ZIP_ERRORS, NotImplementedError, RuntimeError) as err:
            raise ImageReadError(name, f"corrupt in the zip ({_reason(err)})") from err
        except Exception as err:  # zlib.error and other decompressor errors
            raise ImageReadError(name, f"corrupt in the zip ({_reason(err)})") from err
        if total > limit:
            raise ImageReadError(name, _too_big() if limit == MAX_MEMBER_BYTES else "too large")
        return b"".join(chunks)


def expand_uploads(uploads: Sequence[tuple[str, str]], stack: ExitStack) -> list[UploadItem]:
    """``(name, path)`` of uploaded files -> one item per image; zips are expanded (and kept
    open on ``stack``), a zip that cannot be opened is one item with its error.

    A request opens at most :data:`MAX_REQUEST_ZIPS` zips of :data:`MAX_REQUEST_ENTRIES`
    entries in all (counted from their end records first): one zip listed a thousand times
    is opened a few times, the other listings are items with the reason."""
    items: list[UploadItem] = []
    zips_left, entries_left = MAX_REQUEST_ZIPS, MAX_REQUEST_ENTRIES
    for name, path in uploads:
        if not name.lower().endswith(".zip"):
            items.append(UploadItem(name, reader=lambda budget, path=path: path))
            continue
        entries = max(1, zip_entry_count(path))  # over MAX_ZIP_ENTRIES: refused on opening
        if entries <= MAX_ZIP_ENTRIES and (zips_left == 0 or entries > entries_left):
            items.append(UploadItem(name, error=_request_full()))
            continue
        zips_left, entries_left = zips_left - 1, max(0, entries_left - entries)
        try:
            upload = ZipUpload.open(path, name)
        except ImageReadError as err:
            items.append(UploadItem(name, error=err.reason))
            continue
        stack.callback(upload.close)
        items += upload.items
    return items


def zip_entry_count(path: str | Path) -> int:
    """The number of entries a zip declares in its end record (nothing else is read), at
    most :data:`MAX_ZIP_ENTRIES` + 1; 1 for a file that is not a zip."""
    try:
        entries, _ = _declared_entries(path, "")
    except (ImageReadError, OSError):
        return 1
    return min(entries, MAX_ZIP_ENTRIES + 1)


def _declared_entries(path: str | Path, label: str) -> tuple[int, int]:
    """(entries, size of the central directory) from a zip's end record, read directly."""
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        stream.seek(max(0, size - 65_557))  # the end record and a comment of at most 64 KB
        tail = stream.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            raise ImageReadError(label, "not a readable zip archive (no end record)")
        entries = int.from_bytes(tail[at + 10 : at + 12], "little")
        directory = int.from_bytes(tail[at + 12 : at + 16], "little")
        locator = tail[at - 20 : at] if at >= 20 else b""
        if locator[:4] == b"PK\x06\x07":  # zip64: the real counts are in its own record
            stream.seek(int.from_bytes(locator[8:16], "little"))
            record = stream.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) == 56:
                entries = int.from_bytes(record[32:40], "little")
                directory = int.from_bytes(record[40:48], "little")
    return entries, directory


def _is_listed(info: zipfile.ZipInfo, suffixes: Collection[str] = LISTED_SUFFIXES) -> bool:
    """Images and nested zips (by default) get a row; folders, other files (notes,
    spreadsheets) and operating-system clutter (``__MACOSX/``, ``.DS_Store``, ``._x``) do
    not."""
    path = PurePosixPath(info.filename)
    if info.is_dir() or not path.parts or path.parts[0] == "__MACOSX":
        return False
    if path.name.startswith("."):
        return False
    return path.suffix.lower() in suffixes


def _unreadable_entry(info: zipfile.ZipInfo) -> str | None:
    """Why an entry is not read at all (a nested zip, encrypted, ...), or None."""
    if PurePosixPath(info.filename).suffix.lower() == ".zip":
        return "skipped: a zip inside a zip is not opened"
    if info.flag_bits & 0x1:
        return "skipped: encrypted (password-protected) entry"
    if info.compress_type not in _SUPPORTED_METHODS:
        methods = " or ".join(_SUPPORTED_METHODS.values())
        return f"skipped: compression method {info.compress_type} is not supported (use {methods})"
    if info.file_size > MAX_MEMBER_BYTES:
        return _too_big()
    return None


def _request_full() -> str:
    return (
        f"skipped: this request reached its limit of {MAX_REQUEST_ZIPS} zips and "
        f"{MAX_REQUEST_ENTRIES:,} zip entries in all"
    )


def _too_big() -> str:
    return f"skipped: unpacks to more than {MAX_MEMBER_BYTES // 2**20} MB"


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:120]
